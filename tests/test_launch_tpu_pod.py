"""scripts/launch_tpu_pod.sh: valid bash, and the gcloud commands it prints (--print) are the ones it runs,
with the same training command on every worker and the extra flags passed through intact."""
import os
import shlex
import stat
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "launch_tpu_pod.sh")
EXTRA = ["--config.model.path=gs://b/Qwen3-8B-Base", "--config.data.train_files=('gs://b/deep scaler.parquet',)",
         "--config.prompts.solution_template={question} Let's go $HOME \\boxed{{}}"]


def _run(*args, env=None):
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=60, env=env)


def _train_argv(line):
    """The words of the remote training command in one printed `gcloud ... ssh` line."""
    argv = shlex.split(line)
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-pod"]
    assert "--worker=all" in argv and "--zone=us-east5-a" in argv
    (command,) = [a[len("--command="):] for a in argv if a.startswith("--command=")]
    return argv, shlex.split(command)


def test_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", SCRIPT], capture_output=True).returncode == 0
    assert os.stat(SCRIPT).st_mode & stat.S_IXUSR
    out = _run("--help")
    assert out.returncode == 0 and "--worker=all" in out.stdout and "--print" in out.stdout


def test_print_shows_the_same_train_command_for_every_worker():
    out = _run("--tpu=my-pod", "--zone=us-east5-a", "--project=proj", "--workdir=gs://b/run1", "--print",
               "--env=XLA_FLAGS=--xla_dump_to=/tmp/d x", "--", *EXTRA)
    assert out.returncode == 0, out.stderr
    (line,) = out.stdout.strip().splitlines()
    argv, words = _train_argv(line)
    assert "--project=proj" in argv
    assert words[:3] == ["cd", "~/masa_jax", "&&"]
    assert words[3:7] == ["env", "PYTHONUNBUFFERED=1", "TF_CPP_MIN_LOG_LEVEL=1", "XLA_FLAGS=--xla_dump_to=/tmp/d x"]
    assert words[7:] == ["python3", "-m", "masa_jax.train", "--config=configs/qwen8b.py", "--workdir=gs://b/run1",
                         "--config.mesh.tpu_pod=True", *EXTRA]


def test_install_sync_and_background_steps():
    out = _run("--tpu=my-pod", "--zone=us-east5-a", "--workdir=gs://b/run1", "--install", "--ref=v1",
               "--config=configs/qwen1p7b.py", "--log=~/train.log", "--dry-run")
    assert out.returncode == 0, out.stderr
    install, train = out.stdout.strip().splitlines()
    _, words = _train_argv(install)
    text = " ".join(words)
    assert "git clone -q https://github.com/masa-jax/masa_jax ~/masa_jax" in text
    assert "git checkout -q v1" in text and "pip install -q -e .[tpu]" in text
    _, words = _train_argv(train)
    assert words[3] == "nohup" and "--config=configs/qwen1p7b.py" in words
    assert words[-6:] == [">", "~/train.log", "2>&1", "<", "/dev/null", "&"]
    out = _run("--tpu=my-pod", "--zone=us-east5-a", "--workdir=gs://b/run1", "--sync", "--print")
    tar, scp, unpack, train = out.stdout.strip().splitlines()
    assert "git ls-files" in tar and shlex.split(scp)[4] == "scp" and "--worker=all" in scp
    assert "tar -xzf /tmp/masa_jax_sync.tar.gz -C ~/masa_jax" in " ".join(_train_argv(unpack)[1])


def test_runs_what_it_prints(tmp_path):
    """With a stand-in gcloud on PATH, the commands run are exactly the printed ones."""
    log = tmp_path / "calls"
    fake = tmp_path / "gcloud"
    fake.write_text(f'#!/usr/bin/env bash\nprintf "%q " gcloud "$@" >> {shlex.quote(str(log))}\necho >> {shlex.quote(str(log))}\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    args = ["--tpu=my-pod", "--zone=us-east5-a", "--workdir=gs://b/run1", "--install"]
    assert _run(*args, "--", *EXTRA, env=env).returncode == 0
    printed = _run(*args, "--print", "--", *EXTRA).stdout.strip().splitlines()
    assert len(printed) == 2
    ran = log.read_text().strip().splitlines()
    assert [shlex.split(x) for x in ran] == [shlex.split(x) for x in printed]


def test_argument_errors():
    out = _run("--zone=z", "--workdir=gs://b/r")
    assert out.returncode == 2 and "--tpu=NAME is required" in out.stderr
    out = _run("--tpu=t", "--zone=z", "--workdir=gs://b/r", "--bogus")
    assert out.returncode == 2 and "unknown argument '--bogus'" in out.stderr
    out = _run("--tpu=t", "--zone=z", "--workdir=gs://b/r", "--install", "--sync")
    assert out.returncode == 2 and "alternatives" in out.stderr
    out = _run("--tpu=t", "--zone=z", "--workdir=/local/run", "--print")
    assert out.returncode == 0 and "not gs://" in out.stderr
