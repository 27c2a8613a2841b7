"""notebooks/colab_tpu_qwen3.ipynb runs end to end on CPU with a tiny random Qwen3 checkpoint and a few
MATH rows in place of Qwen3-0.6B-Base and GSM8K, substituted through one injected parameters cell (as
papermill does), and configs/qwen3_0p6b_colab.py fits a 16 GiB Colab TPU by the dry run."""
import json
import os
import re
import subprocess
import sys

import jax
import nbformat
import pyarrow.parquet as pq
import pytest
from nbclient import NotebookClient

from masa_jax.models import qwen
from masa_jax.toy import tokenizer as toy_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "colab_tpu_qwen3.ipynb")
MATH_SAMPLE = os.path.join(REPO, "tests", "data", "math_sample.parquet")

# Tiny lengths and counts: the CPU run takes seconds per step after compilation.
CI_OVERRIDES = {
    "model.dtype": "float32", "model.remat": "none",
    "data.problems_per_step": 2, "data.max_prompt_length": 512,
    "rollout.num_solutions": 2, "rollout.num_meta": 2, "rollout.max_response_length": 16,
    "rollout.meta_max_new_tokens": 16, "rollout.num_slots": 8,
    "prompts.min_solution_length": 4,
    "prompts.meta_template": ("Assess {question} Write <meta>...</meta>, then JSON with math_notion, "
                              "pass_rate (0-{k}), solution_length ({min_length}-{max_length})."),
    "prompts.solution_template": "{question} Answer in \\boxed{{}}.",
    "bc.buffer_size": 2, "bc.steps": 1, "bc.min_notion_reward": 0.0,
    "rl.micro_batch_size": 4, "rl.chunk_size": 64, "rl.lr": 1e-3, "rl.warmup_steps": 1,
    "reward.num_workers": 1, "checkpoint.every": 1,
}


def _tiny_qwen3(path):
    """A random 2-layer Qwen3 over the toy (character-level) tokenizer: a complete HF directory."""
    tok = toy_tokenizer.load_tokenizer()
    cfg = qwen.ModelConfig(family="qwen3", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=2,
                           num_heads=2, num_kv_heads=1, head_dim=16, tie_word_embeddings=True,
                           max_position_embeddings=2048, eos_token_id=tok.eos_token_id)
    qwen.save_pretrained(cfg, qwen.init_params(cfg, jax.random.key(0)), str(path),
                         tokenizer_dir=toy_tokenizer.TOKENIZER_DIR)
    return str(path)


def _small_data(tmp_path):
    """Training: 4 short MATH rows as verl parquet (the sample's own schema); eval: 2 others as JSONL."""
    table = pq.read_table(MATH_SAMPLE)
    rows = table.to_pylist()
    short = sorted(range(len(rows)), key=lambda i: len(rows[i]["reward_model"]["ground_truth"]["question"]))
    train = str(tmp_path / "math_train.parquet")
    pq.write_table(table.take(short[:4]), train)
    evaluation = tmp_path / "math_eval.jsonl"
    evaluation.write_text("".join(json.dumps({"problem": rows[i]["reward_model"]["ground_truth"]["question"],
                                              "answer": rows[i]["reward_model"]["ground_truth"]["target"]}) + "\n"
                                  for i in short[4:6]))
    return train, str(evaluation)


def _inject_parameters(nb, params: dict):
    """papermill's mechanism: a cell after the one tagged "parameters" that overrides its names."""
    (index,) = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    declared = {}
    exec(nb.cells[index].source, declared)  # plain assignments
    unknown = set(params) - set(declared)
    assert not unknown, f"not parameters of the notebook: {unknown}"
    source = "# injected by tests/test_colab_notebook.py\n" + "".join(f"{k} = {v!r}\n" for k, v in params.items())
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))


@pytest.mark.slow  # executes the notebook
def test_colab_notebook_runs_on_cpu_with_local_files(tmp_path):
    model_dir = _tiny_qwen3(tmp_path / "tiny_qwen3")
    train_file, eval_file = _small_data(tmp_path)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    _inject_parameters(nb, {
        "MODEL_DIR": model_dir, "DATA_FILES": (train_file,), "EVAL_FILES": (eval_file,),
        "CONFIG_OVERRIDES": CI_OVERRIDES, "STEPS": 2, "SWITCH_STEP": 1, "EVAL_PROBLEMS": 2, "EVAL_N": 2,
        "EVAL_K": (1, 2), "WORKDIR": str(tmp_path / "run"), "OUTPUT_DIR": str(tmp_path / "hf_out"),
        "DATA_DIR": str(tmp_path / "data")})
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "backend cpu" in text
    assert "mesh: {'data': 1, 'fsdp': 1, 'tensor': 1}" in text
    assert "per-device memory, rough formula" in text and "train_total" in text  # the dry run on this device
    assert re.search(r"^before\s+\d\.\d{4}\s+\d\.\d{4}", text, re.M)  # pass@1, pass@2 before and after
    assert re.search(r"^after\s+\d\.\d{4}\s+\d\.\d{4}", text, re.M)
    assert not (tmp_path / "data").exists()  # nothing downloaded: the local files were used
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history] == [1, 2]
    assert "reward/meta_total" in history[-1] and history[-1]["efficient/active"] == 1.0
    # The live figure: one display, updated in place.
    images = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") in ("display_data",
                                                                                          "update_display_data")]
    assert images and all("image/png" in o["data"] for o in images)
    # save_pretrained wrote an HF directory that loads back.
    out = tmp_path / "hf_out"
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    assert (out / "tokenizer.json").exists()
    cfg, params = qwen.from_pretrained(str(out))
    assert cfg.num_layers == 2 and cfg.vocab_size == len(toy_tokenizer.load_tokenizer())


def test_notebook_parameters_cell_is_tagged_and_defaults_download():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    ns = {}
    exec(tagged[0].source, ns)  # plain assignments, nothing else
    assert ns["MODEL_ID"] == "Qwen/Qwen3-0.6B-Base" and ns["MODEL_DIR"] == "" and ns["DATA_FILES"] == ()
    assert ns["CONFIG"] == "configs/qwen3_0p6b_colab.py"
    source = "\n".join(c.source for c in nb.cells)
    for api in ("snapshot_download", "load_dataset", "train.train(config, WORKDIR)", "evaluate.evaluate_problems",
                "qwen.save_pretrained", "mesh_lib.make_mesh"):
        assert api in source


def _dry_run(*flags):
    out = subprocess.run([sys.executable, "-m", "masa_jax.train", "--config=configs/qwen3_0p6b_colab.py", "--dry_run",
                          *flags], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.parametrize("devices, gib, extra", [
    (1, 16, ()),                                       # TPU v5e-1: one chip of 16 GiB
    (8, 8, ("--config.rl.micro_batch_size=8",)),       # TPU v2-8: 8 cores of 8 GiB (16 GiB per chip)
])
def test_colab_config_fits_a_16_gib_tpu(devices, gib, extra):
    out = _dry_run(f"--dry_run_devices={devices}", f"--config.mesh.device_memory_gib={gib}", *extra)
    assert "qwen3 28 layers, hidden 1024, vocab 151936: 0.60 B params" in out
    assert f"'fsdp': {devices}, 'tensor': 1}} ({devices} devices)" in out
    peak = float(re.search(r"peak (\d+\.\d+) GiB", out).group(1))
    assert peak <= 0.9 * gib and ": fits" in out


def test_qwen3_0p6b_preset_has_the_released_parameter_count():
    from masa_jax.models.qwen.presets import preset
    cfg = preset("qwen3-0.6b")
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size,
            cfg.vocab_size, cfg.tie_word_embeddings) == (1024, 28, 16, 8, 128, 3072, 151936, True)
    shapes = jax.eval_shape(lambda k: qwen.init_params(cfg, k), jax.random.key(0))
    assert sum(x.size for x in jax.tree.leaves(shapes)) == 596_049_920  # Qwen/Qwen3-0.6B-Base: 596.0 M


# ---- the install cell (both notebooks), run against a fake Colab: git, pip, the devices, the versions ----

QUICKSTART = os.path.join(REPO, "notebooks", "quickstart.ipynb")
SETUP_PY = os.path.join(REPO, "setup.py")


def _install_cell(path):
    """The install cell's code, and the parameters it reads (the Colab notebook's parameters cell; the
    quickstart's lines at the top of the cell itself)."""
    nb = nbformat.read(path, as_version=4)
    (cell,) = [c for c in nb.cells if c.cell_type == "code" and "def install_masa_jax" in c.source]
    params = {}
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    if tagged:
        exec(tagged[0].source, params)
    return cell.source, params


class FakeColab:
    """google.colab imported; `git clone` copies a setup.py (the real one, or it without the gpu extra) into
    a directory with a .git; pip fails as often as told, then replaces the preinstalled jax / numpy;
    glob / shutil.which report the runtime's devices; sys.modules holds the loaded jax / numpy."""

    def __init__(self, monkeypatch, tmp_path, runtime="tpu", pip_failures=0, gpu_extra=True):
        import glob
        import importlib.metadata
        import shutil
        import subprocess as sp
        import types
        self.calls, self.pip_failures, self.tmp_path = [], pip_failures, tmp_path
        self.setup_text = open(SETUP_PY).read()
        if not gpu_extra:
            self.setup_text = re.sub(r'\n[ \t]*"gpu":[^\n]*', "", self.setup_text)
            assert '"gpu"' not in self.setup_text
        self.versions = {"jax": "0.4.33", "jaxlib": "0.4.33", "numpy": "2.0.2", "scipy": "1.13.1"}
        monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
        self.modules = {}
        self.monkeypatch = monkeypatch
        monkeypatch.setattr(sp, "run", self.run)
        devices = {"tpu": {"/dev/accel*": ["/dev/accel0"]}, "gpu": {}, "cpu": {}}[runtime]
        monkeypatch.setattr(glob, "glob", lambda pattern: devices.get(pattern, []))
        monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/nvidia-smi" if runtime == "gpu" else None)

        def version(dist):
            if self.versions.get(dist) is None:
                raise importlib.metadata.PackageNotFoundError(dist)
            return self.versions[dist]
        monkeypatch.setattr(importlib.metadata, "version", version)
        self.monkeypatch.setattr(sys, "path", list(sys.path))

    def load(self, binary):
        """The session's loaded modules: each of the cell's compiled packages at its installed version."""
        import types
        for dist, module in binary.items():
            if self.versions.get(dist):
                self.monkeypatch.setitem(sys.modules, module, types.SimpleNamespace(__version__=self.versions[dist]))
            else:
                self.monkeypatch.delitem(sys.modules, module, raising=False)

    def run(self, cmd, **kwargs):
        import subprocess as sp
        self.calls.append(list(cmd))
        if cmd[:2] == ["git", "clone"]:
            dest = cmd[-1]
            os.makedirs(os.path.join(dest, ".git"))
            with open(os.path.join(dest, "setup.py"), "w") as f:
                f.write(self.setup_text)
            return sp.CompletedProcess(cmd, 0, "", "")
        assert cmd[1:4] == ["-m", "pip", "install"], cmd
        if self.pip_failures:
            self.pip_failures -= 1
            return sp.CompletedProcess(cmd, 1, "", "ERROR: Could not install packages due to an OSError\n")
        self.versions.update({"jax": "0.10.2", "jaxlib": "0.10.2", "numpy": "2.4.6", "libtpu": "0.0.42"})
        return sp.CompletedProcess(cmd, 0, "", "")

    def pips(self):
        return [c for c in self.calls if c[1:3] == ["-m", "pip"]]


def _exec_cell(source, params, install_dir):
    ns = {**params, "REPO_URL": "https://example.com/fork/masa_jax", "INSTALL_DIR": str(install_dir)}
    # The quickstart sets them at the top of the cell: the test's values replace those lines.
    source = re.sub(r'^(REPO_URL|INSTALL_DIR) = .*$', "", source, flags=re.M)
    exec(compile(source, "install_cell", "exec"), ns)
    return ns


@pytest.mark.parametrize("notebook", [NOTEBOOK, QUICKSTART])
def test_install_cell_does_nothing_outside_colab(notebook, tmp_path, monkeypatch):
    source, params = _install_cell(notebook)
    url = "https://github.com/masa-jax/masa_jax"  # the default clone URL, a parameter at the top
    assert params.get("REPO_URL") == url or source.startswith("#") and f'\nREPO_URL = "{url}"' in source
    import subprocess as sp
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    monkeypatch.setattr(sp, "run", lambda *a, **k: pytest.fail("ran a command outside Colab"))
    _exec_cell(source, params, tmp_path / "masa_jax")
    assert not (tmp_path / "masa_jax").exists()


@pytest.mark.parametrize("notebook", [NOTEBOOK, QUICKSTART])
def test_install_cell_retries_a_failed_pip_then_skips_and_says_when_to_restart(notebook, tmp_path, monkeypatch,
                                                                             capsys):
    source, params = _install_cell(notebook)
    colab = FakeColab(monkeypatch, tmp_path, runtime="tpu", pip_failures=1)
    install_dir = tmp_path / "masa_jax"
    # Run 1: the clone works, pip fails: the cell raises, no marker.
    with pytest.raises(RuntimeError, match="pip install failed .*run this cell again to retry"):
        _exec_cell(source, params, install_dir)
    assert [c[:2] for c in colab.calls] == [["git", "clone"], [sys.executable, "-m"]]
    assert colab.calls[0][-2:] == ["https://example.com/fork/masa_jax", str(install_dir)]
    assert not (install_dir / ".colab_install_done").exists()
    # Run 2: the clone exists (not cloned again), pip is retried and succeeds: the marker, and the restart
    # instruction since the preinstalled jax / numpy were replaced.
    capsys.readouterr()
    ns = _exec_cell(source, params, install_dir)
    out = capsys.readouterr().out
    assert len(colab.pips()) == 2 and sum(c[0] == "git" for c in colab.calls) == 1
    assert colab.pips()[-1][4:7] == ["-q", "-e", f"{install_dir}[tpu]"]
    assert json.loads((install_dir / ".colab_install_done").read_text())["extra"] == "[tpu]"
    assert "Runtime > Restart session" in out and "jax 0.4.33 -> 0.10.2" in out and "numpy 2.0.2 -> 2.4.6" in out
    assert str(install_dir) == sys.path[0]
    # Run 3, before the restart (the old jax still loaded): no pip, the instruction again.
    colab.versions.update({"jax": "0.4.33", "numpy": "2.0.2"})
    colab.load(ns["BINARY"])
    colab.versions.update({"jax": "0.10.2", "numpy": "2.4.6"})
    _exec_cell(source, params, install_dir)
    out = capsys.readouterr().out
    assert len(colab.pips()) == 2
    assert "is installed from" in out and "Runtime > Restart session" in out and "jax 0.4.33 -> 0.10.2" in out
    # Run 4, after the restart (the new versions loaded): no pip, no instruction.
    colab.load(ns["BINARY"])
    _exec_cell(source, params, install_dir)
    out = capsys.readouterr().out
    assert len(colab.pips()) == 2 and "is installed from" in out and "Restart" not in out


def test_install_cell_says_no_restart_when_nothing_compiled_was_replaced(tmp_path, monkeypatch, capsys):
    source, params = _install_cell(NOTEBOOK)
    colab = FakeColab(monkeypatch, tmp_path, runtime="cpu")
    colab.versions = {"jax": "0.10.2", "jaxlib": "0.10.2", "numpy": "2.4.6"}  # already the pinned ones
    _exec_cell(source, params, tmp_path / "masa_jax")
    out = capsys.readouterr().out
    assert "no restart needed" in out and "Restart" not in out
    assert colab.pips()[0][4:] == ["-q", "-e", str(tmp_path / "masa_jax"), "datasets", "huggingface_hub"]


@pytest.mark.parametrize("runtime, gpu_extra, extra", [
    ("tpu", True, "[tpu]"), ("gpu", True, "[gpu]"), ("gpu", False, ""), ("cpu", True, "")])
@pytest.mark.parametrize("notebook", [NOTEBOOK, QUICKSTART])
def test_install_cell_picks_the_extra_of_the_runtime(notebook, runtime, gpu_extra, extra, tmp_path, monkeypatch):
    source, params = _install_cell(notebook)
    colab = FakeColab(monkeypatch, tmp_path, runtime=runtime, gpu_extra=gpu_extra)
    _exec_cell(source, params, tmp_path / "masa_jax")
    (pip,) = colab.pips()
    assert pip[6] == f"{tmp_path / 'masa_jax'}{extra}"
    assert json.loads((tmp_path / "masa_jax" / ".colab_install_done").read_text())["extra"] == extra


def test_install_cell_reclones_after_a_failed_clone(tmp_path, monkeypatch):
    source, params = _install_cell(QUICKSTART)
    colab = FakeColab(monkeypatch, tmp_path, runtime="cpu")
    (tmp_path / "masa_jax").mkdir()
    (tmp_path / "masa_jax" / "half").write_text("")  # a clone interrupted before .git was complete
    _exec_cell(source, params, tmp_path / "masa_jax")
    assert colab.calls[0][:2] == ["git", "clone"] and not (tmp_path / "masa_jax" / "half").exists()


def test_both_notebooks_share_the_install_code():
    a, _ = _install_cell(NOTEBOOK)
    b, _ = _install_cell(QUICKSTART)
    start = "# Colab: clone REPO_URL"
    assert a[a.index(start):] == b[b.index(start):]
    assert "[tpu]" not in b.split(start)[0]  # the quickstart no longer installs [tpu] everywhere
