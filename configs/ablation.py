"""The paper's ablations as overrides of the 8B setup: `--config=configs/ablation.py:NAME`.

    python -m masa_jax.train --config=configs/ablation.py:no_notion --workdir=gs://bucket/abl_no_notion \
        --config.model.path=/data/Qwen3-8B-Base --config.data.train_files="('/data/deepscaler.parquet',)"

Each NAME is configs/qwen8b.py (MASA-efficient, the paper's hyper-parameters) with the few fields below
changed; everything else, the command line included, works as for qwen8b.

Figure 6, the meta reward's components: the total is the weighted mean of (length, difficulty, notion)
(`config.meta.weights`, `rewards/meta.self_alignment`); an ablation drops one part and averages the other two.
    no_notion      meta.weights = (1/2, 1/2, 0)
    no_difficulty  meta.weights = (1/2, 0, 1/2)   (difficulty = the pass-rate prediction's reward)
    no_length      meta.weights = (0, 1/2, 1/2)
Table 4, DAPO as the base algorithm:
    dapo           algorithm = dapo: GRPO with dynamic sampling (solution path only; clip-higher 0.2 / 0.28 and
                   token-mean are qwen8b's already)
    masa_dapo      algorithm = masa with DAPO's dynamic sampling on both paths (dapo.dynamic_sampling)
"""
import importlib.util
import os

ABLATIONS = {
    "no_notion": {"meta.weights": (0.5, 0.5, 0.0)},
    "no_difficulty": {"meta.weights": (0.5, 0.0, 0.5)},
    "no_length": {"meta.weights": (0.0, 0.5, 0.5)},
    "dapo": {"algorithm": "dapo"},
    "masa_dapo": {"algorithm": "masa", "dapo.dynamic_sampling": True},
}


def _qwen8b():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "qwen8b.py")
    spec = importlib.util.spec_from_file_location("_ablation_base_qwen8b", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config(name: str = ""):
    from masa_jax.config import override
    if name not in ABLATIONS:
        raise ValueError(f"configs/ablation.py:{name}: name one of {sorted(ABLATIONS)}")
    return override(_qwen8b(), ABLATIONS[name])
