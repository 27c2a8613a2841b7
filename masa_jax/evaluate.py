"""`python -m masa_jax.evaluate --config=configs/<name>.py --checkpoint=DIR --data=FILE[,FILE...]`.

pass@1 (mean accuracy over n samples) and pass@k (unbiased estimator 1 - C(n-c, k) / C(n, k)) of a
training checkpoint (a workdir or its checkpoints/ folder) or of an HF model directory, on benchmark
files (verl parquet or JSONL). Never uses notion hints. Prints a per-benchmark table, writes JSON.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Callable, Sequence

import jax
import numpy as np

from masa_jax import checkpointing
from masa_jax import errors
from masa_jax import metrics as metrics_lib
from masa_jax.data import sources
from masa_jax.rewards import prompts

log = logging.getLogger("masa_jax.evaluate")


def sample_and_score(problems: Sequence[sources.Problem], generate: Callable, codec, verify: Callable, *,
                     n: int, max_new_tokens: int, rng: jax.Array, solution_template: str = ""
                     ) -> tuple[np.ndarray, np.ndarray]:
    """n solutions per problem (solution prompt, no hint), scored: (correct bool [P, n], response
    tokens int [P, n])."""
    prompt_ids = [codec.encode_chat(prompts.solution_prompt(p.question, template=solution_template or None))
                  for p in problems]
    out = generate([ids for ids in prompt_ids for _ in range(n)], None, max_new_tokens, rng)
    texts = [codec.decode(t[:-1] if r == "eos" and t else t) for t, r in zip(out.tokens, out.finish_reasons)]
    answers = [p.answer for p in problems for _ in range(n)]
    ok, _ = verify(texts, answers)
    lengths = np.array([len(t) for t in out.tokens], np.int64).reshape(len(problems), n)
    return np.asarray(ok, bool).reshape(len(problems), n), lengths


def evaluate_problems(problems: Sequence[sources.Problem], generate: Callable, codec, verify: Callable, *,
                      n: int, ks: Sequence[int], max_new_tokens: int, rng: jax.Array,
                      solution_template: str = "") -> dict:
    """Samples n solutions per problem and scores them. Returns pass@1, pass@k for k <= n, the number
    of problems and mean response length."""
    correct, lengths = sample_and_score(problems, generate, codec, verify, n=n, max_new_tokens=max_new_tokens,
                                        rng=rng, solution_template=solution_template)
    c = correct.sum(axis=1)
    result = {"problems": len(problems), "n": n, "pass@1": float(correct.mean()),
              "mean_length": float(lengths.mean())}
    for k in ks:
        if 1 < k <= n:
            result[f"pass@{k}"] = float(np.mean(metrics_lib.pass_at_k(n, c, k)))
    return result


def load_policy(config, checkpoint: str):
    """(model_cfg, params) from an HF directory (has config.json) or from an Orbax run checkpoint."""
    from masa_jax.dry_run import model_config_for
    from masa_jax.models import qwen
    from masa_jax.parallel import mesh as mesh_lib
    from masa_jax.rl import update as update_lib

    _check_checkpoint(checkpoint)
    mesh = mesh_lib.make_mesh(config.mesh.shape)
    if errors.is_hf_dir(checkpoint):
        cfg, params = qwen.from_pretrained(checkpoint, dtype=config.model.param_dtype, mesh=mesh,
                                           compute_dtype=config.model.dtype)
        return cfg, params, mesh
    model_cfg = model_config_for(config)
    model_cfg, params = qwen.from_pretrained(config.model.path, dtype=config.model.param_dtype, mesh=mesh,
                                             compute_dtype=config.model.dtype)
    updater = update_lib.Updater.create(config, model_cfg, params, mesh, pad_id=0)
    ckpt_dir = os.path.join(checkpoint, "checkpoints") if os.path.isdir(os.path.join(checkpoint, "checkpoints")) \
        else checkpoint
    restored = checkpointing.RunCheckpointer(ckpt_dir, max_to_keep=1000).restore_latest(updater.state)
    if restored is None:
        raise errors.UserError(f"no checkpoint found in {checkpoint}: {_CHECKPOINT_HINT}")
    return model_cfg, restored[0].params, mesh


_CHECKPOINT_HINT = "pass a training workdir, its checkpoints/ folder or an HF model directory"


def _check_checkpoint(checkpoint: str) -> None:
    # Checked before Orbax opens it: its CheckpointManager would create a missing directory.
    if not os.path.isdir(checkpoint):
        raise errors.UserError(f"--checkpoint {checkpoint} is not a directory: {_CHECKPOINT_HINT}")


def main(argv):
    """absl entry point: evaluates with the command-line flags (exit code 0 on success)."""
    from absl import flags
    del argv
    run_evaluation(flags.FLAGS)


def run_evaluation(F) -> dict:
    """Evaluates the model named by the parsed flags `F`; prints the table, writes and returns the JSON."""
    from masa_jax import config as config_lib
    from masa_jax.rewards import math as math_reward
    from masa_jax.sampling.generate import generate as sampling_generate
    from masa_jax.tokenization import load_codec

    # Every user error before the model is loaded (or anything is created).
    config = config_lib.resolve(errors.config_from_flags(F))
    _check_checkpoint(F.checkpoint)
    errors.check_model_dir(config, weights=not errors.is_hf_dir(F.checkpoint))
    errors.check_data_files(F.data.split(","), field="--data")
    out = F.output or os.path.join(F.checkpoint, "eval.json")
    if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        raise errors.UserError(f"--output {out}: its directory does not exist")
    model_cfg, params, mesh = load_policy(config, F.checkpoint)
    codec = load_codec(config.model.tokenizer_path)

    def generate(prompt_ids, budgets, max_new_tokens, rng):
        return sampling_generate(model_cfg, params, prompt_ids, rng=rng, max_new_tokens=max_new_tokens,
                                 temperature=F.temperature, top_p=F.top_p, eos_ids=codec.eos_ids,
                                 num_slots=config.rollout.num_slots, mesh=mesh)

    verifier = math_reward.MathVerifier(num_workers=config.reward.num_workers,
                                        per_item_timeout_s=config.reward.per_item_timeout_s,
                                        batch_budget_s=config.reward.batch_budget_s)
    ks = [int(k) for k in F.k.split(",") if k]
    results = {}
    try:
        with jax.set_mesh(mesh):
            for i, path in enumerate(F.data.split(",")):
                loaded = sources.load_problems(path, on_error="raise")
                problems = list(loaded.problems)[:F.limit or None]
                results[os.path.basename(path)] = evaluate_problems(
                    problems, generate, codec, verifier.verify, n=F.n, ks=ks, max_new_tokens=F.max_new_tokens,
                    rng=jax.random.key(F.seed + i), solution_template=config.prompts.solution_template)
    finally:
        verifier.close()
    print(format_table(results))
    if jax.process_index() == 0:
        with open(out, "w") as f:
            json.dump(results, f, indent=2)
    return results


def format_table(results: dict) -> str:
    keys = sorted({k for r in results.values() for k in r if k.startswith("pass@")},
                  key=lambda k: int(k.split("@")[1]))
    head = f"{'benchmark':<28}{'problems':>9}" + "".join(f"{k:>10}" for k in keys)
    rows = [head, "-" * len(head)]
    for name, r in results.items():
        rows.append(f"{name:<28}{r['problems']:>9}" + "".join(
            f"{100 * r[k]:>9.2f}%" if k in r else f"{'':>10}" for k in keys))
    return "\n".join(rows)


def _define_flags():
    from absl import flags
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", None, "ml_collections config file", lock_config=True)
    flags.DEFINE_string("checkpoint", None, "run workdir / checkpoint folder, or an HF model directory")
    flags.DEFINE_string("data", None, "benchmark files (verl parquet or JSONL), comma-separated")
    flags.DEFINE_integer("n", 32, "samples per problem (paper: 32)")
    flags.DEFINE_string("k", "1,8,32", "pass@k values, comma-separated")
    flags.DEFINE_float("temperature", 0.6, "sampling temperature (paper: 0.6)")
    flags.DEFINE_float("top_p", 1.0, "nucleus sampling")
    flags.DEFINE_integer("max_new_tokens", 16384, "max response tokens (paper: 16k)")
    flags.DEFINE_integer("limit", 0, "evaluate only the first N problems of each file (0 = all)")
    flags.DEFINE_integer("seed", 0, "sampling seed")
    flags.DEFINE_string("output", "", "JSON output path (default: <checkpoint>/eval.json)")
    flags.mark_flags_as_required(["config", "checkpoint", "data"])


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    errors.run_cli(main, _define_flags)
