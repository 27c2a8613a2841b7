"""scripts/launch_tpu_pod.sh: valid bash; the gcloud commands it prints (--print) are the ones it runs, with
the same training command on every worker and the extra flags passed through intact; and, against a
stand-in gcloud that runs each worker's command locally (its own home directory per worker, a fake
`sudo` / `lsof` and a host `python3` that only makes virtual environments): the cleanup kills what
holds the TPU and removes libtpu's lock file, a failing worker stops the others and the exit status
names it, every worker has a log file here, the hosts' virtual environment is what installs and
trains, and --sync deletes on the hosts what was deleted here."""
import os
import shlex
import shutil
import stat
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "launch_tpu_pod.sh")
EXTRA = ["--config.model.path=gs://b/Qwen3-8B-Base", "--config.data.train_files=('gs://b/deep scaler.parquet',)",
         "--config.prompts.solution_template={question} Let's go $HOME \\boxed{{}}"]
POD = ["--tpu=my-pod", "--zone=us-east5-a", "--workdir=gs://b/run1"]


def _run(*args, env=None, script=SCRIPT, timeout=60):
    return subprocess.run(["bash", script, *args], capture_output=True, text=True, timeout=timeout, env=env,
                          stdin=subprocess.DEVNULL)


def _ssh_argv(line):
    """The words of one printed `gcloud ... ssh` line, its worker and the words of its remote command."""
    argv = shlex.split(line)
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-pod"]
    assert "--zone=us-east5-a" in argv
    (worker,) = [a.split("=", 1)[1] for a in argv if a.startswith("--worker=")]
    (command,) = [a[len("--command="):] for a in argv if a.startswith("--command=")]
    return argv, worker, command


def _grouped(command):
    """The command a `setsid --wait bash -c BODY` runs in its own process group."""
    words = shlex.split(command)
    i = words.index("setsid")
    assert words[i:i + 4] == ["setsid", "--wait", "bash", "-c"]
    body = words[i + 4]
    assert body.startswith("echo $$ > ~/.masa_jax_launch.pid; ( ")
    return words[:i], body[len("echo $$ > ~/.masa_jax_launch.pid; ( "):body.index(" ); rc=$?")]


def test_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", SCRIPT], capture_output=True).returncode == 0
    assert os.stat(SCRIPT).st_mode & stat.S_IXUSR
    out = _run("--help")
    assert out.returncode == 0 and "--worker=" in out.stdout and "--print" in out.stdout


def test_print_shows_the_same_train_command_for_every_worker():
    out = _run(*POD, "--project=proj", "--num_workers=4", "--print",
               "--env=XLA_FLAGS=--xla_dump_to=/tmp/d x", "--", *EXTRA)
    assert out.returncode == 0, out.stderr
    cleanup, *trains = out.stdout.strip().splitlines()
    argv, worker, command = _ssh_argv(cleanup)
    assert worker == "all" and "--project=proj" in argv
    assert "sudo lsof -t /dev/accel* /dev/vfio/*" in command and "sudo kill -9 $p" in command
    assert command.endswith("sudo rm -f /tmp/libtpu_lockfile")
    assert [_ssh_argv(t)[1] for t in trains] == ["0", "1", "2", "3"]
    commands = {_ssh_argv(t)[2] for t in trains}
    assert len(commands) == 1  # the same on every worker
    before, train = _grouped(commands.pop())
    assert before[:4] == ["cd", "~/masa_jax", "||", "exit"]
    words = shlex.split(train)
    assert words[:4] == ["env", "PYTHONUNBUFFERED=1", "TF_CPP_MIN_LOG_LEVEL=1", "XLA_FLAGS=--xla_dump_to=/tmp/d x"]
    assert words[4:] == [".venv/bin/python", "-m", "masa_jax.train", "--config=configs/qwen8b.py",
                         "--workdir=gs://b/run1", "--config.mesh.tpu_pod=True", *EXTRA]


def test_install_sync_and_background_steps():
    out = _run(*POD, "--num_workers=2", "--install", "--ref=v1", "--config=configs/qwen1p7b.py",
               "--log=~/train.log", "--dry-run")
    assert out.returncode == 0, out.stderr
    cleanup, install0, install1, start0, start1 = out.stdout.strip().splitlines()
    _, install = _grouped(_ssh_argv(install0)[2])
    assert "git clone -q https://github.com/masa-jax/masa_jax ~/masa_jax" in install
    assert "git checkout -q v1" in install
    assert "python3 -m venv ~/masa_jax/.venv" in install  # the hosts' venv, not the system python
    assert '~/masa_jax/.venv/bin/python -m pip install -q -e ".[tpu]"' in install
    command = _ssh_argv(start0)[2]
    assert command.startswith("cd ~/masa_jax || exit 3;") and "nohup setsid --wait bash -c" in command
    assert "--config=configs/qwen1p7b.py" in command
    assert shlex.split(command)[-6:] == [">", "~/train.log", "2>&1", "<", "/dev/null", "&"]
    out = _run(*POD, "--num_workers=2", "--sync", "--print", "--log_dir=/tmp/L")
    cleanup, tar, sync0, sync1, train0, train1 = out.stdout.strip().splitlines()
    assert "git ls-files" in tar and tar.endswith("-czf /tmp/L/sync.tgz")
    assert sync0.endswith(" < /tmp/L/sync.tgz") and _ssh_argv(sync1.rsplit(" < ", 1)[0])[1] == "1"


def _write(path, text, mode=0o755):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


class Pod:
    """A stand-in gcloud (local PATH) simulating `n` TPU hosts as directories worker-N (each one's $HOME
    and current directory for its commands; /tmp/ in sudo's arguments is the host's own tmp/), with a
    fake sudo and lsof and a host python3 that can only make virtual environments (on the hosts' PATH).
    A venv's python records its calls and, as masa_jax.train, does what the host's `behaviour` file says:
    ok (exit 0), fail (exit 7 after 2 s) or hang (sleep, as a worker waiting in a collective)."""

    def __init__(self, root, n):
        self.root, self.n = root, n
        local, host = root / "local_bin", root / "host_bin"
        # A remote command gets stdin / stdout / stderr only (close_fds), as over ssh.
        _write(local / "gcloud", f"""#!{sys.executable}
import fcntl, os, shlex, subprocess, sys
root = {str(root)!r}
with open(os.path.join(root, "calls"), "a") as f:  # parallel calls: one line each
    fcntl.flock(f, fcntl.LOCK_EX)
    f.write(" ".join(shlex.quote(a) for a in ["gcloud", *sys.argv[1:]]) + "\\n")
args = sys.argv[1:]
if args[:3] != ["compute", "tpus", "tpu-vm"]:
    sys.exit(64)
if args[3] == "describe":
    print("\\n".join(f"10.0.0.{{i}}" for i in range({n})))
    sys.exit(0)
assert args[3] == "ssh", args
opts = dict(a[2:].split("=", 1) for a in args[5:] if a.startswith("--") and "=" in a)
workers = range({n}) if opts["worker"] == "all" else [int(opts["worker"])]
rc = 0
for w in workers:
    home = os.path.join(root, f"worker-{{w}}")
    env = {{**os.environ, "HOME": home, "PATH": {str(host)!r} + ":" + os.environ["PATH"]}}
    rc = subprocess.run(["bash", "-c", opts["command"]], cwd=home, env=env).returncode or rc
sys.exit(rc)
""")
        _write(host / "sudo", """#!/usr/bin/env bash
echo "$*" >> "$HOME/sudo.log"
exec "${@//\\/tmp\\//$HOME/tmp/}"
""")
        _write(host / "lsof", """#!/usr/bin/env bash
[[ "$*" == "-t /dev/accel* /dev/vfio/*" ]] && cat "$HOME/tpu_holders" 2>/dev/null
exit 0
""")
        _write(host / "python3", f"""#!/usr/bin/env bash
echo "$*" >> "$HOME/python3.log"
[[ $1 == -m && $2 == venv ]] || exit 1
mkdir -p "$3/bin" && cp {shlex.quote(str(root / 'venv_python'))} "$3/bin/python"
""")
        _write(root / "venv_python", """#!/usr/bin/env bash
echo "$(readlink -f "$0") $*" >> "$HOME/venv_python.log"
if [[ "$1 $2" == "-m pip" ]]; then exit 0; fi
[[ "$1 $2" == "-m masa_jax.train" ]] || exit 1
echo "$(basename "$HOME") training in $PWD"
case "$(cat "$HOME/behaviour" 2>/dev/null)" in
  fail) sleep 2; echo "$(basename "$HOME"): RuntimeError: boom" >&2; exit 7 ;;
  hang) echo $$ > "$HOME/train.pid"; exec sleep 300 ;;
esac
""")
        for w in range(n):
            (root / f"worker-{w}" / "tmp").mkdir(parents=True)
        self.env = {**os.environ, "PATH": f"{local}:{os.environ['PATH']}"}

    def host(self, w):
        return self.root / f"worker-{w}"

    def calls(self):
        return [shlex.split(line) for line in (self.root / "calls").read_text().splitlines()]


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in "ZX"
    except FileNotFoundError:
        return False


def _checkout(tmp_path):
    """A git checkout holding the launcher (--sync sends the checkout the script lies in)."""
    repo = tmp_path / "checkout"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(SCRIPT, repo / "scripts" / "launch_tpu_pod.sh")
    (repo / "pkg" / "sub").mkdir(parents=True)
    (repo / "pkg" / "a.py").write_text("A = 1\n")
    (repo / "pkg" / "b.py").write_text("B = 2\n")
    (repo / "pkg" / "sub" / "only.py").write_text("C = 3\n")
    (repo / "name with space.txt").write_text("x\n")
    (repo / ".gitignore").write_text("/logs/\n/ignored/\n")
    (repo / "ignored").mkdir()
    (repo / "ignored" / "big.bin").write_text("not sent\n")
    git = ["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "init"], check=True)
    (repo / "untracked.py").write_text("U = 4\n")  # untracked, not ignored: sent too
    return repo


def test_sync_makes_the_venv_installs_into_it_and_trains_with_it(tmp_path):
    pod = Pod(tmp_path / "pod", 3)
    repo = _checkout(tmp_path)
    logs = tmp_path / "logs"
    out = _run(*POD, "--sync", f"--log_dir={logs}", "--", "--config.total_steps=3",
               env=pod.env, script=str(repo / "scripts" / "launch_tpu_pod.sh"))
    assert out.returncode == 0, out.stderr
    assert f"per-worker logs: {logs}/worker-{{0..2}}.log" in out.stderr  # 3 workers, from `describe`
    assert any(c[4] == "describe" for c in pod.calls())
    for w in range(3):
        host = pod.host(w)
        checkout = host / "masa_jax"
        assert (checkout / "pkg" / "a.py").read_text() == "A = 1\n"
        assert (checkout / "untracked.py").exists() and (checkout / "name with space.txt").exists()
        assert not (checkout / "ignored").exists()
        venv_python = f"{checkout}/.venv/bin/python"
        assert (host / "python3.log").read_text().splitlines() == [f"-m venv {checkout}/.venv"]  # only the venv
        calls = (host / "venv_python.log").read_text().splitlines()
        assert f"{venv_python} -m pip install -q -e .[tpu]" in calls
        (train,) = [c for c in calls if "masa_jax.train" in c]
        assert train == (f"{checkout}/.venv/bin/python -m masa_jax.train --config=configs/qwen8b.py "
                         "--workdir=gs://b/run1 --config.mesh.tpu_pod=True --config.total_steps=3")
        log = (logs / f"worker-{w}.log").read_text()
        assert f"worker-{w} training in {checkout}" in log and "==== sync" in log and "==== train" in log
        assert not (host / ".masa_jax_launch.pid").exists()  # removed when the command ended
    assert "worker-0 training" in out.stdout  # worker 0's output is shown here too
    # A second launch reuses the venv: no second `python3 -m venv`.
    assert _run(*POD, "--sync", f"--log_dir={logs}", env=pod.env,
                script=str(repo / "scripts" / "launch_tpu_pod.sh")).returncode == 0
    assert len((pod.host(0) / "python3.log").read_text().splitlines()) == 1


def test_sync_deletes_on_the_hosts_what_was_deleted_here(tmp_path):
    pod = Pod(tmp_path / "pod", 2)
    repo = _checkout(tmp_path)
    script = str(repo / "scripts" / "launch_tpu_pod.sh")
    assert _run(*POD, "--sync", f"--log_dir={tmp_path / 'logs'}", env=pod.env, script=script).returncode == 0
    for w in range(2):  # made on the host, not by a sync: kept
        (pod.host(w) / "masa_jax" / "runs").mkdir()
        (pod.host(w) / "masa_jax" / "runs" / "metrics.jsonl").write_text("{}\n")
    (repo / "pkg" / "b.py").unlink()                  # tracked, deleted in the working tree (not committed)
    (repo / "untracked.py").unlink()                  # untracked
    (repo / "pkg" / "sub" / "only.py").unlink()       # the only file of its directory
    (repo / "pkg" / "new.py").write_text("N = 5\n")
    (repo / "pkg" / "a.py").write_text("A = 10\n")
    out = _run(*POD, "--sync", f"--log_dir={tmp_path / 'logs'}", env=pod.env, script=script)
    assert out.returncode == 0, out.stderr
    for w in range(2):
        checkout = pod.host(w) / "masa_jax"
        assert not (checkout / "pkg" / "b.py").exists()
        assert not (checkout / "untracked.py").exists()
        assert not (checkout / "pkg" / "sub").exists()
        assert (checkout / "pkg" / "new.py").read_text() == "N = 5\n"
        assert (checkout / "pkg" / "a.py").read_text() == "A = 10\n"
        assert (checkout / "runs" / "metrics.jsonl").exists() and (checkout / ".venv" / "bin" / "python").exists()
        assert (checkout / "name with space.txt").exists()
        log = (tmp_path / "logs" / f"worker-{w}.log").read_text()
        assert "removed pkg/b.py" in log and "removed untracked.py" in log


def test_sync_into_a_clone_deletes_what_the_clone_had(tmp_path):
    """A host set up by --install (a git clone) and then --sync'ed: the clone's tracked files that the
    checkout here no longer has are deleted too."""
    pod = Pod(tmp_path / "pod", 1)
    repo = _checkout(tmp_path)
    subprocess.run(["git", "clone", "-q", str(repo), str(pod.host(0) / "masa_jax")], check=True)
    (repo / "pkg" / "b.py").unlink()
    out = _run(*POD, "--sync", f"--log_dir={tmp_path / 'logs'}", env=pod.env,
               script=str(repo / "scripts" / "launch_tpu_pod.sh"))
    assert out.returncode == 0, out.stderr
    assert not (pod.host(0) / "masa_jax" / "pkg" / "b.py").exists()
    assert (pod.host(0) / "masa_jax" / "pkg" / "a.py").exists()


def test_cleanup_kills_what_holds_the_tpu_and_removes_the_lock_file(tmp_path):
    pod = Pod(tmp_path / "pod", 2)
    repo = _checkout(tmp_path)
    script = str(repo / "scripts" / "launch_tpu_pod.sh")
    assert _run(*POD, "--sync", f"--log_dir={tmp_path / 'logs'}", env=pod.env, script=script).returncode == 0
    holders, previous = [], []
    try:
        for w in range(2):
            host = pod.host(w)
            holder = subprocess.Popen(["sleep", "300"])  # holds /dev/accel0 (says the fake lsof)
            holders.append(holder)
            (host / "tpu_holders").write_text(f"{holder.pid}\n")
            (host / "tmp" / "libtpu_lockfile").write_text("")
            # The previous launch, still running in its process group (as a pre-empted run's survivors).
            group = subprocess.Popen(["setsid", "bash", "-c", "sleep 300 & sleep 300"])
            previous.append(group)
            (host / ".masa_jax_launch.pid").write_text(f"{group.pid}\n")
            (host / "sudo.log").unlink(missing_ok=True)
        out = _run(*POD, f"--log_dir={tmp_path / 'logs'}", env=pod.env, script=script)
        assert out.returncode == 0, out.stderr
        for w in range(2):
            host = pod.host(w)
            assert holders[w].wait(timeout=5) == -9
            assert previous[w].wait(timeout=5) == -9
            assert not (host / "tmp" / "libtpu_lockfile").exists()
            assert (host / "sudo.log").read_text().splitlines() == [
                "lsof -t /dev/accel* /dev/vfio/*", f"kill -9 {holders[w].pid}", "rm -f /tmp/libtpu_lockfile"]
        text = (tmp_path / "logs" / "cleanup.log").read_text()
        assert f"killing process {holders[1].pid}, which holds the TPU: sleep 300" in text
        assert f"stopping the previous launch (process group {previous[0].pid})" in text
        # The cleanup ran before the training, on all workers in one command.
        ssh = [c for c in pod.calls() if c[4] == "ssh"]
        assert "--worker=all" in ssh[-3] and "libtpu_lockfile" in ssh[-3][-1]
        assert [c for c in ssh[-2:] if "masa_jax.train" in c[-1]] == ssh[-2:]
    finally:
        for p in holders + previous:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_a_failing_worker_stops_the_others(tmp_path):
    pod = Pod(tmp_path / "pod", 3)
    repo = _checkout(tmp_path)
    for w, behaviour in enumerate(["hang", "fail", "hang"]):
        (pod.host(w) / "behaviour").write_text(behaviour)
    logs = tmp_path / "logs"
    start = time.monotonic()
    out = _run(*POD, "--sync", f"--log_dir={logs}", env=pod.env, script=str(repo / "scripts" / "launch_tpu_pod.sh"))
    assert time.monotonic() - start < 45
    assert out.returncode == 7, out.stderr  # the failed worker's exit status
    assert "worker 1 failed (train, exit status 7): stopping the other workers" in out.stderr
    assert f"worker 1's log: {logs}/worker-1.log" in out.stderr
    assert "worker 1| worker-1: RuntimeError: boom" in out.stderr  # its last lines
    for w in (0, 2):  # were waiting (as in a collective): their process groups are gone
        pid = int((pod.host(w) / "train.pid").read_text())
        deadline = time.monotonic() + 5
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(pid), f"worker {w}'s training process {pid} still runs"
    stops = [c for c in pod.calls() if c[4] == "ssh" and c[-1].startswith("--command=pg=$(cat ~/.masa_jax_launch.pid")
             and "kill -TERM" in c[-1]]
    assert sorted(next(a for a in c if a.startswith("--worker=")) for c in stops) == [
        "--worker=0", "--worker=1", "--worker=2"]
    assert "RuntimeError: boom" in (logs / "worker-1.log").read_text()


def test_log_runs_in_the_background_and_the_next_launch_stops_it(tmp_path):
    pod = Pod(tmp_path / "pod", 2)
    repo = _checkout(tmp_path)
    script = str(repo / "scripts" / "launch_tpu_pod.sh")
    for w in range(2):
        (pod.host(w) / "behaviour").write_text("hang")
    out = _run(*POD, "--sync", "--log=~/train.log", f"--log_dir={tmp_path / 'logs'}", env=pod.env, script=script)
    assert out.returncode == 0, out.stderr
    assert "started in the background on all 2 workers" in out.stderr and "kill -TERM" in out.stderr
    pids = []
    for w in range(2):
        deadline = time.monotonic() + 10
        while not (pod.host(w) / "train.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        pids.append(int((pod.host(w) / "train.pid").read_text()))
        assert _alive(pids[-1]) and "training in" in (pod.host(w) / "train.log").read_text()
    try:
        for w in range(2):
            (pod.host(w) / "behaviour").write_text("ok")
        out = _run(*POD, f"--log_dir={tmp_path / 'logs'}", env=pod.env, script=script)
        assert out.returncode == 0, out.stderr
        assert "stopping the previous launch" in (tmp_path / "logs" / "cleanup.log").read_text()
        for pid in pids:
            deadline = time.monotonic() + 5
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not _alive(pid)
    finally:
        for pid in pids:
            if _alive(pid):
                os.kill(pid, 9)


def test_without_a_venv_the_hosts_say_how_to_make_one(tmp_path):
    pod = Pod(tmp_path / "pod", 2)
    for w in range(2):
        (pod.host(w) / "masa_jax").mkdir()
    out = _run(*POD, f"--log_dir={tmp_path / 'logs'}", env=pod.env)
    assert out.returncode == 3
    assert "worker 0 failed" in out.stderr or "worker 1 failed" in out.stderr
    assert "no virtual environment at ~/masa_jax/.venv: run with --install or --sync first" in out.stderr


def test_runs_what_it_prints(tmp_path):
    """With the stand-in gcloud on PATH, the commands run are exactly the printed ones."""
    pod = Pod(tmp_path / "pod", 2)
    args = [*POD, "--install", "--num_workers=2", f"--repo={_checkout(tmp_path)}", "--ref=HEAD"]
    out = _run(*args, f"--log_dir={tmp_path / 'logs'}", "--", *EXTRA, env=pod.env)
    assert out.returncode == 0, out.stderr
    printed = _run(*args, "--print", "--", *EXTRA).stdout.strip().splitlines()
    assert len(printed) == 5  # cleanup, install on 2 workers, train on 2 workers
    assert sorted(pod.calls()) == sorted(shlex.split(x) for x in printed)
    for w in range(2):  # cloned, installed into the venv, trained with it
        assert (pod.host(w) / "masa_jax" / ".git").is_dir()
        calls = (pod.host(w) / "venv_python.log").read_text()
        assert "-m pip install -q -e .[tpu]" in calls and "-m masa_jax.train" in calls
    # A failed clone: fail-fast after the install, no training started.
    pod = Pod(tmp_path / "pod2", 2)
    out = _run(*POD, "--install", "--num_workers=2", "--repo=/nonexistent/repo", f"--log_dir={tmp_path / 'l2'}",
               env=pod.env)
    assert out.returncode != 0 and "failed (install, exit status" in out.stderr
    assert not any("masa_jax.train" in c[-1] for c in pod.calls())


def test_argument_errors():
    out = _run("--zone=z", "--workdir=gs://b/r")
    assert out.returncode == 2 and "--tpu=NAME is required" in out.stderr
    out = _run("--tpu=t", "--zone=z", "--workdir=gs://b/r", "--bogus")
    assert out.returncode == 2 and "unknown argument '--bogus'" in out.stderr
    out = _run("--tpu=t", "--zone=z", "--workdir=gs://b/r", "--install", "--sync")
    assert out.returncode == 2 and "alternatives" in out.stderr
    out = _run("--tpu=t", "--zone=z", "--workdir=gs://b/r", "--num_workers=0", "--print")
    assert out.returncode == 2 and "positive integer" in out.stderr
    out = _run("--tpu=t", "--zone=z", "--workdir=/local/run", "--num_workers=1", "--print")
    assert out.returncode == 0 and "not gs://" in out.stderr
