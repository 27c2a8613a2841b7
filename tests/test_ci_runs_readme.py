"""`.ci/run` runs the README's two set-up commands as a user types them (issue 19.2): the install and the
train command with the default workdir (only --config.total_steps added), and the test command."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_setup_commands():
    readme = open(os.path.join(ROOT, "README.md")).read()
    setup = readme.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", setup)


def test_ci_runs_both_readme_setup_commands_as_written():
    commands = _readme_setup_commands()
    assert len(commands) == 2, commands
    ci = open(os.path.join(ROOT, ".ci", "run")).read().replace("pip install -q ", "pip install ")  # quieter, same
    train_cmd, test_cmd = commands
    *install, run = [part.strip() for part in train_cmd.split("&&")]
    for part in install[2:]:  # the venv is made and activated by .ci/run itself, in its own folder
        assert part in ci, part
    assert run == "python -m masa_jax.train --config=configs/tiny.py", run
    ci_runs = [line.strip() for line in ci.splitlines() if line.strip().startswith(run)]
    assert len(ci_runs) >= 2, "train twice (the second resumes)"
    for line in ci_runs:  # the default workdir: only the step count may differ
        assert re.fullmatch(re.escape(run) + r"( --config\.total_steps=\d+)?", line), line
        assert "--workdir" not in line
    assert "checkpoints/10" in ci and "checkpoints/11" in ci
    *_, test_run = [part.strip() for part in test_cmd.split("&&")]
    assert test_cmd.split("&& ", 2)[2] in ci, test_cmd
    assert test_run in ci
