#!/usr/bin/env bash
# Launch `python -m masa_jax.train` on every host of a Cloud TPU pod slice: the same command on all
# workers (gcloud compute tpus tpu-vm ssh --worker=all), one JAX process per host. Each process calls
# jax.distributed.initialize() with TPU auto-discovery (--config.mesh.tpu_pod=True, added here), so no
# coordinator address, process count or id is passed; every host reads only its block of rows of the
# training files (masa_jax.data.pipeline.load_host_problems).
#
#   scripts/launch_tpu_pod.sh --tpu=NAME --zone=ZONE [--project=P] --workdir=gs://BUCKET/run \
#       [--config=configs/qwen8b.py] [--install | --sync] [--print] [-- EXTRA TRAIN FLAGS...]
#
# Options:
#   --tpu=NAME          TPU VM name (required)
#   --zone=ZONE         its zone (required)
#   --project=PROJECT   GCP project (default: gcloud's configured project)
#   --config=FILE       config file relative to the checkout (default: configs/qwen8b.py)
#   --workdir=DIR       run directory; gs://... (all hosts write checkpoints to the same place; required)
#   --remote_dir=DIR    checkout on every host (default: ~/masa_jax; ~ is the remote home)
#   --python=PY         interpreter on the hosts (default: python3)
#   --install           first clone (or update) --repo at --ref into --remote_dir and pip install -e ".[tpu]"
#   --sync              first copy this checkout (git's tracked and untracked, not ignored, files) to every
#                       host and pip install -e ".[tpu]" (for local changes; instead of --install)
#   --repo=URL          (--install) git repository (default: https://github.com/masa-jax/masa_jax)
#   --ref=REF           (--install) branch, tag or commit (default: main)
#   --env=KEY=VALUE     environment of the training command on every host (repeatable); the defaults
#                       PYTHONUNBUFFERED=1 and TF_CPP_MIN_LOG_LEVEL=1 are always set
#   --log=FILE          run in the background on every host (nohup), output to FILE on each host
#                       (default: in the foreground, all hosts' output streamed here)
#   --internal_ip       pass --internal-ip to gcloud (from a VM in the TPU's VPC)
#   --print, --dry-run  print the commands instead of running them
#   --                  everything after it is passed to masa_jax.train on every host
#                       (e.g. --config.model.path=gs://bucket/Qwen3-8B-Base --config.rl.lr=2e-6)
#
# The hosts need read access to the model and data paths (gs:// or a path present on every host) and
# write access to --workdir; a gs:// model directory is copied once per host into $MASA_JAX_CACHE.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() { echo "launch_tpu_pod.sh: $*" >&2; exit 2; }

TPU="" ZONE="" PROJECT="" CONFIG="configs/qwen8b.py" WORKDIR="" REMOTE_DIR="~/masa_jax" PY="python3"
INSTALL=0 SYNC=0 REPO="https://github.com/masa-jax/masa_jax" REF="main" LOG="" INTERNAL_IP=0 PRINT=0
ENVS=("PYTHONUNBUFFERED=1" "TF_CPP_MIN_LOG_LEVEL=1")
EXTRA=()

while (($#)); do
  case "$1" in
    --tpu=*) TPU="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
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
[[ "$WORKDIR" == gs://* ]] || echo "launch_tpu_pod.sh: warning: --workdir=$WORKDIR is not gs://; the hosts of a pod share no disk" >&2
((INSTALL && SYNC)) && die "--install and --sync are alternatives: pick one"

# Shell quoting: a word as is when it is plain, else in single quotes (readable in --print's output).
q() {
  if [[ -n "$1" && "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then printf '%s' "$1"
  else local sq="'\\''"; printf "'%s'" "${1//\'/$sq}"; fi
}
# A flag as --flag='value' rather than '--flag=value'.
qarg() { if [[ "$1" =~ ^(--[A-Za-z0-9_.-]+=)(.*)$ ]]; then printf '%s%s' "${BASH_REMATCH[1]}" "$(q "${BASH_REMATCH[2]}")"; else q "$1"; fi; }
# The remote checkout: a leading "~/" stays unquoted so that the remote shell expands it.
remote_path() { if [[ "$1" == "~/"* ]]; then printf '~/%s' "$(q "${1#\~/}")"; else q "$1"; fi; }
RDIR="$(remote_path "$REMOTE_DIR")"

GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE" --worker=all)
[[ -n "$PROJECT" ]] && WHERE+=(--project="$PROJECT")
((INTERNAL_IP)) && WHERE+=(--internal-ip)

run() {  # prints (--print) or runs one command, given as words
  if ((PRINT)); then
    local out="" w
    for w in "$@"; do out+="$(qarg "$w") "; done
    echo "${out% }"
  else
    "$@"
  fi
}

ssh_all() { run "${GCLOUD[@]}" ssh "$TPU" "${WHERE[@]}" --command="$1"; }

PIP_INSTALL="$(q "$PY") -m pip install -q -U pip && $(q "$PY") -m pip install -q -e '.[tpu]'"

if ((INSTALL)); then
  ssh_all "set -e; if [ -d $RDIR/.git ]; then cd $RDIR && git fetch -q origin; else git clone -q $(q "$REPO") $RDIR && cd $RDIR; fi; git checkout -q $(q "$REF") && { git pull -q --ff-only 2>/dev/null || true; }; $PIP_INSTALL"
fi

if ((SYNC)); then
  here="$(cd "$(dirname "$0")/.." && pwd)"
  archive="/tmp/masa_jax_sync_${USER:-user}.tar.gz"
  if ((PRINT)); then
    echo "(cd $(q "$here") && git ls-files -z -co --exclude-standard | tar --null -T - -czf $(q "$archive"))"
  else
    (cd "$here" && git ls-files -z -co --exclude-standard | tar --null -T - -czf "$archive")
  fi
  run "${GCLOUD[@]}" scp "$archive" "$TPU:/tmp/masa_jax_sync.tar.gz" "${WHERE[@]}"
  ssh_all "set -e; mkdir -p $RDIR && tar -xzf /tmp/masa_jax_sync.tar.gz -C $RDIR && cd $RDIR && $PIP_INSTALL"
fi

# The training command, identical on every host.
TRAIN="env"
for kv in "${ENVS[@]}"; do TRAIN+=" $(q "${kv%%=*}")=$(q "${kv#*=}")"; done
TRAIN+=" $(q "$PY") -m masa_jax.train --config=$(q "$CONFIG") --workdir=$(q "$WORKDIR") --config.mesh.tpu_pod=True"
for a in "${EXTRA[@]+"${EXTRA[@]}"}"; do TRAIN+=" $(qarg "$a")"; done
if [[ -n "$LOG" ]]; then
  TRAIN="nohup $TRAIN > $(remote_path "$LOG") 2>&1 < /dev/null &"
fi
ssh_all "cd $RDIR && $TRAIN"
