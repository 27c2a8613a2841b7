#!/usr/bin/env bash
# Launch `python -m masa_jax.train` on every host of a Cloud TPU pod slice: the same command on all
# workers, one JAX process per host, one `gcloud compute tpus tpu-vm ssh --worker=N` per worker. Each
# process calls jax.distributed.initialize() with TPU auto-discovery (--config.mesh.tpu_pod=True, added
# here), so no coordinator address, process count or id is passed; every host reads only its block of
# rows of the training files (masa_jax.data.pipeline.load_host_problems).
#
#   scripts/launch_tpu_pod.sh --tpu=NAME --zone=ZONE [--project=P] --workdir=gs://BUCKET/run \
#       [--config=configs/qwen8b.py] [--install | --sync] [--print] [-- EXTRA TRAIN FLAGS...]
#
# What it does, in order:
#   1. cleanup, on all workers (one `--worker=all` command): stops the previous launch's process group
#      (its id is in ~/.masa_jax_launch.pid on each host), kills every process still holding the TPU
#      (`sudo lsof -t /dev/accel* /dev/vfio/*`, kill -9, waits until they are gone) and removes
#      /tmp/libtpu_lockfile, so that a crashed or pre-empted earlier run cannot block this one;
#   2. --install or --sync (below), on every worker at once;
#   3. the training command, on every worker at once, in its own process group (setsid), with the
#      virtual environment's python (<remote_dir>/.venv/bin/python, made by --install / --sync).
# Each worker's output goes to <log_dir>/worker-N.log on this machine (worker 0's is also shown here).
# Fail-fast: when the command of one worker fails (or its ssh connection drops), the others are stopped
# (SIGTERM to their process group, SIGKILL 30 s later) instead of waiting in a collective for ever, and
# the script exits with that worker's exit status, naming the worker and its log. Ctrl-C stops every
# worker the same way.
#
# Options:
#   --tpu=NAME          TPU VM name (required; for a queued resource, its node id)
#   --zone=ZONE         its zone (required)
#   --project=PROJECT   GCP project (default: gcloud's configured project)
#   --num_workers=N     the slice's host count (default: asked of `gcloud compute tpus tpu-vm describe`)
#   --config=FILE       config file relative to the checkout (default: configs/qwen8b.py)
#   --workdir=DIR       run directory; gs://... (all hosts write checkpoints to the same place; required)
#   --remote_dir=DIR    checkout on every host (default: ~/masa_jax; ~ is the remote home); the virtual
#                       environment is DIR/.venv
#   --python=PY         interpreter on the hosts that makes the virtual environment (default: python3)
#   --install           first clone (or update) --repo at --ref into --remote_dir, make DIR/.venv if it is
#                       missing (python3 -m venv) and pip install -e ".[tpu]" into it
#   --sync              first copy this checkout (git's tracked and untracked, not ignored, files) to every
#                       host, delete there the files an earlier --sync (or the clone of --install) put
#                       there that this checkout no longer has, and pip install -e ".[tpu]" into DIR/.venv
#                       (for local changes; instead of --install)
#   --repo=URL          (--install) git repository (default: https://github.com/masa-jax/masa_jax)
#   --ref=REF           (--install) branch, tag or commit (default: main)
#   --env=KEY=VALUE     environment of the training command on every host (repeatable); the defaults
#                       PYTHONUNBUFFERED=1 and TF_CPP_MIN_LOG_LEVEL=1 are always set
#   --log=FILE          run in the background on every host (nohup), output to FILE on each host; the
#                       script returns once all have started (no fail-fast then; a later launch's cleanup
#                       stops it) (default: in the foreground, with fail-fast and the local logs)
#   --log_dir=DIR       where the per-worker logs go on this machine (default: logs/TPU-YYYYmmdd-HHMMSS)
#   --internal_ip       pass --internal-ip to gcloud (from a VM in the TPU's VPC)
#   --print, --dry-run  print the gcloud commands instead of running them (the worker count is still
#                       asked of gcloud unless --num_workers is given)
#   --                  everything after it is passed to masa_jax.train on every host
#                       (e.g. --config.model.path=gs://bucket/Qwen3-8B-Base --config.rl.lr=2e-6)
#
# The hosts need read access to the model and data paths (gs:// or a path present on every host) and
# write access to --workdir; a gs:// model directory is copied once per host into $MASA_JAX_CACHE.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() { echo "launch_tpu_pod.sh: $*" >&2; exit 2; }
say() { echo "launch_tpu_pod.sh: $*" >&2; }

TPU="" ZONE="" PROJECT="" CONFIG="configs/qwen8b.py" WORKDIR="" REMOTE_DIR="~/masa_jax" PY="python3"
INSTALL=0 SYNC=0 REPO="https://github.com/masa-jax/masa_jax" REF="main" LOG="" INTERNAL_IP=0 PRINT=0
NUM_WORKERS="" LOG_DIR=""
ENVS=("PYTHONUNBUFFERED=1" "TF_CPP_MIN_LOG_LEVEL=1")
EXTRA=()

while (($#)); do
  case "$1" in
    --tpu=*) TPU="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --num_workers=*) NUM_WORKERS="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --remote_dir=*) REMOTE_DIR="${1#*=}" ;;
    --python=*) PY="${1#*=}" ;;
    --install) INSTALL=1 ;;
    --sync) SYNC=1 ;;
    --repo=*) REPO="${1#*=}" ;;
    --ref=*) REF="${1#*=}" ;;
    --env=*) kv="${1#*=}"; [[ "$kv" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env needs KEY=VALUE, got '$kv'"; ENVS+=("$kv") ;;
    --log=*) LOG="${1#*=}" ;;
    --log_dir=*) LOG_DIR="${1#*=}" ;;
    --internal_ip) INTERNAL_IP=1 ;;
    --print|--dry-run|--dry_run) PRINT=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument '$1' (train flags go after --; see --help)" ;;
  esac
  shift
done

[[ -n "$TPU" ]] || die "--tpu=NAME is required"
[[ -n "$ZONE" ]] || die "--zone=ZONE is required"
[[ -n "$WORKDIR" ]] || die "--workdir is required (gs://BUCKET/PATH: every host writes there)"
[[ "$WORKDIR" == gs://* ]] || say "warning: --workdir=$WORKDIR is not gs://; the hosts of a pod share no disk"
((INSTALL && SYNC)) && die "--install and --sync are alternatives: pick one"
[[ -z "$NUM_WORKERS" || "$NUM_WORKERS" =~ ^[1-9][0-9]*$ ]] || die "--num_workers needs a positive integer, got '$NUM_WORKERS'"
[[ -n "$LOG_DIR" ]] || LOG_DIR="logs/$TPU-$(date -u +%Y%m%d-%H%M%S)"

# Shell quoting: a word as is when it is plain, else in single quotes (readable in --print's output).
q() {
  if [[ -n "$1" && "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then printf '%s' "$1"
  else local sq="'\\''"; printf "'%s'" "${1//\'/$sq}"; fi
}
# A flag as --flag='value' rather than '--flag=value'.
qarg() { if [[ "$1" =~ ^(--[A-Za-z0-9_.-]+=)(.*)$ ]]; then printf '%s%s' "${BASH_REMATCH[1]}" "$(q "${BASH_REMATCH[2]}")"; else q "$1"; fi; }
# The remote checkout: a leading "~/" stays unquoted so that the remote shell expands it.
remote_path() { if [[ "$1" == "~/"* ]]; then printf '~/%s' "$(q "${1#\~/}")"; else q "$1"; fi; }
words() { local out="" w; for w in "$@"; do out+="$(qarg "$w") "; done; printf '%s' "${out% }"; }

RDIR="$(remote_path "$REMOTE_DIR")"
VENV="$RDIR/.venv"
VPY="$VENV/bin/python"

GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && WHERE+=(--project="$PROJECT")
((INTERNAL_IP)) && WHERE+=(--internal-ip)

# ---- the remote commands -------------------------------------------------------------------------

PIDFILE='~/.masa_jax_launch.pid'  # the process group of the launch's command running on a host

# Stale processes: the previous launch's process group, then whatever still holds the TPU's device files
# (a process that is gone or a zombie holds nothing), then libtpu's lock file.
CLEANUP="pg=\$(cat $PIDFILE 2>/dev/null); if [ -n \"\$pg\" ] && kill -0 -- -\$pg 2>/dev/null; then \
echo \"\$(hostname): stopping the previous launch (process group \$pg)\"; kill -KILL -- -\$pg 2>/dev/null; fi; \
rm -f $PIDFILE; \
pids=\$(sudo lsof -t /dev/accel* /dev/vfio/* 2>/dev/null | sort -u); \
for p in \$pids; do echo \"\$(hostname): killing process \$p, which holds the TPU: \$(ps -o args= -p \$p)\"; \
sudo kill -9 \$p; done; \
for p in \$pids; do n=0; while [ \$n -lt 60 ] && ps -o stat= -p \$p 2>/dev/null | grep -qv Z; do sleep 0.5; n=\$((n+1)); done; done; \
sudo rm -f /tmp/libtpu_lockfile"

# Stop what a launch runs on a host: SIGTERM to its process group (the trainer saves a checkpoint on it
# when it can), SIGKILL if it is still there 30 s later.
STOP="pg=\$(cat $PIDFILE 2>/dev/null) || exit 0; kill -TERM -- -\$pg 2>/dev/null || exit 0; \
for n in \$(seq 30); do kill -0 -- -\$pg 2>/dev/null || exit 0; sleep 1; done; kill -KILL -- -\$pg 2>/dev/null; exit 0"

# A command in its own session / process group, its id in $PIDFILE while it runs: the launcher's fail-fast
# stops the whole group (the ssh connection ending would not: ssh without a terminal sends no SIGHUP).
in_group() {
  local body="echo \$\$ > $PIDFILE; ( $1 ); rc=\$?; [ \"\$(cat $PIDFILE 2>/dev/null)\" = \$\$ ] && rm -f $PIDFILE; exit \$rc"
  printf 'setsid --wait bash -c %s' "$(q "$body")"
}

# The virtual environment on the host, and the install into it.
MAKE_VENV="if ! $VPY -m pip --version > /dev/null 2>&1; then rm -rf $VENV; \
$(q "$PY") -m venv $VENV || { echo \"\$(hostname): $(q "$PY") -m venv failed; installing python3-venv\"; \
rm -rf $VENV; sudo apt-get install -y -q python3-venv > /dev/null && $(q "$PY") -m venv $VENV; }; fi"
PIP_INSTALL="$MAKE_VENV && $VPY -m pip install -q -U pip && $VPY -m pip install -q -e \".[tpu]\""

# (set -e does not stop at a failure on the left of && or ||: each step is its own command.)
INSTALL_CMD="set -e; if [ -d $RDIR/.git ]; then cd $RDIR; git fetch -q origin; else git clone -q $(q "$REPO") $RDIR; cd $RDIR; fi; \
git checkout -q $(q "$REF"); git pull -q --ff-only 2>/dev/null || true; $PIP_INSTALL"

# --sync: the archive arrives on stdin. The files an earlier sync put there are in .masa_jax_sync.files
# (for a clone of --install: git's tracked files); those the archive no longer has are deleted (and
# directories left empty by that), then the archive is unpacked.
SYNC_CMD="set -e; mkdir -p $RDIR; cd $RDIR; cat > .masa_jax_sync.tgz; \
tar --quoting-style=literal -tzf .masa_jax_sync.tgz | grep -v /\$ | LC_ALL=C sort -u > .masa_jax_sync.new; \
if [ -f .masa_jax_sync.files ]; then LC_ALL=C sort -u .masa_jax_sync.files; \
elif [ -d .git ]; then git -c core.quotepath=off ls-files | LC_ALL=C sort -u; fi > .masa_jax_sync.old; \
LC_ALL=C comm -23 .masa_jax_sync.old .masa_jax_sync.new | while IFS= read -r f; do \
rm -f -- \"\$f\"; echo \"\$(hostname): removed \$f\"; d=\$(dirname -- \"\$f\"); \
while [ \"\$d\" != . ] && rmdir -- \"\$d\" 2>/dev/null; do d=\$(dirname -- \"\$d\"); done; done; \
tar -xzf .masa_jax_sync.tgz; mv .masa_jax_sync.new .masa_jax_sync.files; rm -f .masa_jax_sync.old .masa_jax_sync.tgz; \
$PIP_INSTALL"

# The training command, identical on every host.
TRAIN="env"
for kv in "${ENVS[@]}"; do TRAIN+=" $(q "${kv%%=*}")=$(q "${kv#*=}")"; done
TRAIN+=" .venv/bin/python -m masa_jax.train --config=$(q "$CONFIG") --workdir=$(q "$WORKDIR") --config.mesh.tpu_pod=True"
for a in "${EXTRA[@]+"${EXTRA[@]}"}"; do TRAIN+=" $(qarg "$a")"; done
NO_VENV="echo \"\$(hostname): no virtual environment at $REMOTE_DIR/.venv: run with --install or --sync first\" >&2; exit 3"
RUN_CMD="cd $RDIR || exit 3; [ -x .venv/bin/python ] || { $NO_VENV; }; "
if [[ -n "$LOG" ]]; then
  RUN_CMD+="nohup $(in_group "$TRAIN") > $(remote_path "$LOG") 2>&1 < /dev/null &"
else
  RUN_CMD+="$(in_group "$TRAIN")"
fi

# ---- running them --------------------------------------------------------------------------------

if [[ -z "$NUM_WORKERS" ]]; then
  DESCRIBE=("${GCLOUD[@]}" describe "$TPU" --zone="$ZONE")
  [[ -n "$PROJECT" ]] && DESCRIBE+=(--project="$PROJECT")
  endpoints="$("${DESCRIBE[@]}" --flatten='networkEndpoints[]' --format='value(networkEndpoints.ipAddress)')" \
    || die "could not describe TPU '$TPU' in $ZONE (gcloud failed; --num_workers=N skips this)"
  NUM_WORKERS="$(grep -c . <<< "$endpoints" || true)"
  ((NUM_WORKERS > 0)) || die "TPU '$TPU' in $ZONE has no network endpoints (not ready yet?)"
fi

ssh_cmd() { # the gcloud command for worker $1 ("all" or N) and remote command $2, into the array CMD
  CMD=("${GCLOUD[@]}" ssh "$TPU" "${WHERE[@]}" --worker="$1" --command="$2")
}

PIDS=() RUNNING=()
stop_workers() { # the local gcloud processes, then the remote process groups, of every worker
  local i
  for ((i = 0; i < NUM_WORKERS; i++)); do
    if [[ "${RUNNING[i]:-0}" == 1 ]]; then kill -TERM "${PIDS[i]}" 2>/dev/null || true; RUNNING[i]=0; fi
  done
  local stoppers=()
  for ((i = 0; i < NUM_WORKERS; i++)); do
    ssh_cmd "$i" "$STOP"
    ( exec "${CMD[@]}" < /dev/null >> "$LOG_DIR/worker-$i.log" 2>&1 ) &
    stoppers+=($!)
  done
  wait "${stoppers[@]}" 2>/dev/null || true
}

on_signal() {
  trap - INT TERM
  say "interrupted: stopping every worker"
  stop_workers
  exit 130
}

# Runs remote command $2 on every worker at once (stdin from file $3, default /dev/null), each one's
# output appended to its log; returns when all succeeded, stops the others and exits when one fails.
run_phase() {
  local name="$1" command="$2" input="${3:-/dev/null}" i
  if ((PRINT)); then
    for ((i = 0; i < NUM_WORKERS; i++)); do
      ssh_cmd "$i" "$command"
      if [[ "$input" == /dev/null ]]; then words "${CMD[@]}"; echo; else echo "$(words "${CMD[@]}") < $(q "$input")"; fi
    done
    return 0
  fi
  say "$name on $NUM_WORKERS workers (worker 0's output follows; logs: $LOG_DIR/worker-N.log)"
  for ((i = 0; i < NUM_WORKERS; i++)); do
    local log="$LOG_DIR/worker-$i.log"
    printf '==== %s, %s UTC\n' "$name" "$(date -u '+%Y-%m-%d %H:%M:%S')" >> "$log"
    ssh_cmd "$i" "$command"
    if ((i == 0)); then
      ( exec "${CMD[@]}" < "$input" ) > >(tee -a "$log") 2>&1 &
    else
      ( exec "${CMD[@]}" < "$input" ) >> "$log" 2>&1 &
    fi
    PIDS[i]=$!
    RUNNING[i]=1
  done
  local left=$NUM_WORKERS rc
  while ((left > 0)); do
    for ((i = 0; i < NUM_WORKERS; i++)); do
      [[ "${RUNNING[i]}" == 1 ]] || continue
      kill -0 "${PIDS[i]}" 2>/dev/null && continue
      if wait "${PIDS[i]}"; then rc=0; else rc=$?; fi
      RUNNING[i]=0
      left=$((left - 1))
      if ((rc != 0)); then
        say "worker $i failed ($name, exit status $rc): stopping the other workers"
        say "worker $i's log: $LOG_DIR/worker-$i.log; its last lines:"
        tail -n 20 "$LOG_DIR/worker-$i.log" | sed "s/^/  worker $i| /" >&2
        trap - INT TERM
        stop_workers
        say "stopped all $NUM_WORKERS workers after worker $i failed; logs: $LOG_DIR/worker-N.log"
        exit "$rc"
      fi
    done
    ((left == 0)) || sleep 1
  done
}

if ((!PRINT)); then
  mkdir -p "$LOG_DIR"
  LOG_DIR="$(cd "$LOG_DIR" && pwd)"
  say "per-worker logs: $LOG_DIR/worker-{0..$((NUM_WORKERS - 1))}.log"
  trap on_signal INT TERM
fi

# 1. cleanup: one gcloud command for all workers (it also makes and propagates the ssh key on first use).
ssh_cmd all "$CLEANUP"
if ((PRINT)); then words "${CMD[@]}"; echo
else
  "${CMD[@]}" 2>&1 | tee -a "$LOG_DIR/cleanup.log" || die "the cleanup failed on some worker (see $LOG_DIR/cleanup.log)"
fi

# 2. install or sync.
if ((INSTALL)); then
  run_phase install "$(in_group "$INSTALL_CMD")"
fi
if ((SYNC)); then
  here="$(cd "$(dirname "$0")/.." && pwd)"
  archive="$LOG_DIR/sync.tgz"
  if ((PRINT)); then
    echo "# archive: the files of git ls-files -z -co --exclude-standard in $(q "$here") that are present | tar --null -T - -czf $(q "$archive")"
  else
    # Tracked files deleted in the working tree are listed by git too: only the present ones are sent.
    (cd "$here" && git ls-files -z -co --exclude-standard \
      | while IFS= read -r -d '' f; do if [[ -e "$f" || -L "$f" ]]; then printf '%s\0' "$f"; fi; done \
      | COPYFILE_DISABLE=1 tar --null -T - -czf "$archive")
  fi
  run_phase sync "$(in_group "$SYNC_CMD")" "$archive"
fi

# 3. train.
if [[ -n "$LOG" ]]; then
  run_phase start "$RUN_CMD"
  ((PRINT)) || say "started in the background on all $NUM_WORKERS workers, output in $LOG on each; stop them with:
  $(words "${GCLOUD[@]}" ssh "$TPU" "${WHERE[@]}" --worker=all --command="$STOP")"
else
  run_phase train "$RUN_CMD"
  ((PRINT)) || say "all $NUM_WORKERS workers finished; logs: $LOG_DIR/worker-N.log"
fi
