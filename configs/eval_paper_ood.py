"""The paper's out-of-domain suite on top of a run config: `--config=configs/eval_paper_ood.py[:BASE]`.

    python -m masa_jax.evaluate --config=configs/eval_paper_ood.py:qwen8b --checkpoint=gs://bucket/run1 \
        --config.model.path=/data/Qwen3-8B-Base \
        --data=/data/MASA-RL/eval/data/ProntoQA/dev.json,/data/MASA-RL/eval/data/ProofWriter/dev.json,\
/data/MASA-RL/eval/data/FOLIO/dev.json,/data/MASA-RL/eval/data/LogicalDeduction/dev.json,\
/data/MASA-RL/eval/data/AR-LSAT/dev.json,/data/MASA-RL/eval/data/MBPP/mbpp.jsonl,\
gpqa_diamond=/data/gpqa_diamond.parquet,rbench=/data/rbench-t_en.parquet,arc_challenge=/data/arc_challenge_test.parquet,\
scibench=/data/scibench.parquet

The ten benchmarks of the authors' eval.sh (science: GPQA-Diamond, R-Bench, ARC-Challenge, SciBench; logic:
ProntoQA, ProofWriter, FOLIO, LogicalDeduction, AR-LSAT; coding: MBPP), each with the authors' prompt and
answer extraction (`masa_jax.evaluation.ood`), on the math protocol's sampling (configs/eval_paper.py: 32
samples, temperature 0.6, top-p 1.0, at most 16384 new tokens, pass@1 / pass@k). BASE (default qwen8b) gives
the model, mesh and tokenizer; config.reward.num_workers is the number of MBPP sandboxes run at once.
"""
import importlib.util
import os


def get_config(base: str = "qwen8b"):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "eval_paper.py")
    spec = importlib.util.spec_from_file_location("_eval_paper_for_ood", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(base or "qwen8b")
    c.evaluate.suite = "ood"
    return c
