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
    assert "per-device memory estimate" in text  # the dry run on this device
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
