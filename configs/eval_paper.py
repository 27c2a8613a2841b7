"""The paper's evaluation protocol on top of a run config: `--config=configs/eval_paper.py[:BASE]`.

    python -m masa_jax.evaluate --config=configs/eval_paper.py:qwen8b --checkpoint=gs://bucket/run1 \
        --config.model.path=/data/Qwen3-8B-Base \
        --data=/data/eval/aime24.parquet,/data/eval/aime25.parquet,/data/eval/amc23.parquet,/data/eval/math500.parquet,/data/eval/minerva.parquet,/data/eval/olympiadbench.parquet \
        --meta

BASE (default qwen8b) is a config in this folder: it gives the model (path, dtypes), mesh, tokenizer,
the prompt templates and the meta settings (meta.k, rollout.max_response_length / meta_max_new_tokens /
num_meta, efficient.gate_std / gate_tol) the checkpoint was trained with, so the evaluation prompts are
the training prompts. This file adds the `evaluate` section, the paper's protocol
(`masa_jax.evaluation.paper.PAPER`):

    n = 32 samples per problem, temperature 0.6, top-p 1.0, top-k off, at most 16384 new tokens,
    pass@1 = mean accuracy, pass@k (k = 1, 8, 32) unbiased; seed 0; meta off (--meta turns it on);
    prompt "raw": the problem text alone, as the authors' eval/inference.py (the paper's tables);
    --config.evaluate.prompt=solution prompts with the training solution template instead
    (`:tiny` does, the toy model knows only that).

Any field can be overridden (`--config.evaluate.n=4`) and the flags of `masa_jax.evaluate` (`--n`,
`--temperature`, ...) win over both. `configs/eval_paper.py:tiny` is the toy world's (CPU) variant.
"""
import importlib.util
import os

from masa_jax.evaluation import paper


def _base(name: str):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"configs/eval_paper.py:{name}: no config {path}")
    spec = importlib.util.spec_from_file_location(f"_eval_base_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config(base: str = "qwen8b"):
    base = base or "qwen8b"
    # The toy model knows only its training prompt (no authors' evaluation exists for the toy world).
    return paper.with_protocol(_base(base), **({"prompt": "solution"} if base == "tiny" else {}))
