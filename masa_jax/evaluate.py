"""`python -m masa_jax.evaluate --config=configs/eval_paper.py[:BASE] --checkpoint=DIR --data=FILE[,FILE...] [--meta]`.

The paper's evaluation protocol (`masa_jax.evaluation.paper`): n = 32 solutions per problem at
temperature 0.6 / top-p 1.0 with at most 16384 new tokens (the raw problem text as the authors evaluate, or
with --config.evaluate.prompt=solution the training solution prompt; never a notion hint),
pass@1 = mean accuracy over the samples, pass@k = unbiased estimator 1 - C(n-c, k) / C(n, k). The
model is a training checkpoint (a workdir or its checkpoints/ folder) or an HF model directory; the
benchmarks are verl parquet, flat parquet or JSONL files (`problem`/`question` + `answer`). Each
setting is the flag when given, else the config's `evaluate` section (configs/eval_paper.py), else the
paper's value. Prints a table (a row per benchmark and their average) and writes it as JSON (--output,
default <workdir>/eval.json for a training run, runs/eval/<model dir name>/eval.json for an HF model
directory, which is never written to: {benchmark: numbers, "average": ..., "settings": ...}) and Markdown
(same stem, .md).

`--meta` also runs the meta path (the run's meta prompt, num_meta answers per problem) and reports its
calibration against the measured pass rate and length (MAE, Pearson r, <stem>_calibration.png: the
paper's Figure 2 for any checkpoint) and what gating at config.efficient's thresholds would have skipped
(`masa_jax.evaluation.meta_eval`); per-problem predictions go to <stem>_meta.jsonl.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Sequence

import jax

from masa_jax import compile_cache
from masa_jax import errors
from masa_jax import fs
from masa_jax.data import sources
from masa_jax.evaluation import policy
from masa_jax.evaluation.scoring import sample_and_score
from masa_jax.rl.rollout_engine import GenerateFn

log = logging.getLogger("masa_jax.evaluate")


def evaluate_problems(problems: Sequence[sources.Problem], generate: GenerateFn, codec, verify: Callable, *,
                      n: int, ks: Sequence[int], max_new_tokens: int, rng: jax.Array,
                      solution_template: str = "") -> dict:
    """Samples n solutions per problem and scores them. Returns pass@1, pass@k for k <= n, the number
    of problems and mean response length (`evaluation.paper.score`)."""
    from masa_jax.evaluation import paper
    correct, lengths = sample_and_score(problems, generate, codec, verify, n=n, max_new_tokens=max_new_tokens,
                                        rng=rng, solution_template=solution_template)
    return paper.score(correct, lengths, ks, max_new_tokens)


def main(argv):
    """absl entry point: evaluates with the command-line flags (exit code 0 on success)."""
    from absl import flags
    del argv
    run_evaluation(flags.FLAGS)


def run_evaluation(F) -> dict:
    """Evaluates the model named by the parsed flags `F`; prints the table, writes and returns the results."""
    from masa_jax import config as config_lib
    from masa_jax.evaluation import paper
    from masa_jax.rewards import math as math_reward
    from masa_jax.components import rollout_engine_for, verifier_config
    from masa_jax.tokenization import load_codec

    # Every user error before the model is loaded (or anything is created).
    config = config_lib.resolve(errors.config_from_flags(F))
    compile_cache.enable(config.compile_cache)  # before the first compilation
    settings = paper.resolve_settings(config, {
        "n": F.n, "ks": F.k, "temperature": F.temperature, "top_p": F.top_p, "top_k": F.top_k,
        "max_new_tokens": F.max_new_tokens, "seed": F.seed, "limit": F.limit, "meta": F.meta,
        "num_meta": F.num_meta, "data": F.data})
    policy.check_checkpoint(F.checkpoint)
    errors.check_model_dir(config, weights=not errors.is_hf_dir(F.checkpoint))
    ood = settings.suite == "ood"
    if ood:
        from masa_jax.evaluation.ood import protocol as ood_protocol
        if settings.meta:
            raise errors.UserError("--meta: the out-of-domain suite has no meta path (the meta prompt is the "
                                   "math one); leave --meta out")
        benchmarks = ood_protocol.load_all(settings.data, settings.limit, localize=fs.local_copy)
    elif not settings.data:
        raise errors.UserError("--data: name the benchmark files (verl parquet, parquet or JSONL with problem/answer "
                               "or question/answer), comma-separated, or set config.evaluate.data")
    else:
        benchmarks = {}
        for path in settings.data:
            name = paper.benchmark_name(path)
            problems = paper.load_benchmark(fs.local_copy(path))  # a gs:// file is read from a local copy
            benchmarks[name if name not in benchmarks else path] = problems[:settings.limit or None]
    out = fs.absolute(F.output or default_output(F.checkpoint))
    if F.output and not fs.is_remote(out) and not os.path.isdir(os.path.dirname(out)):  # gs:// has no dirs
        raise errors.UserError(f"--output {out}: its directory does not exist")
    model_cfg, params, mesh = policy.load_policy(config, F.checkpoint)
    codec = load_codec(config.model.tokenizer_path)
    # The trainer's engine and sampler at the protocol's settings; the weights resharded once: every call
    # samples the same model.
    engine = rollout_engine_for(config, model_cfg, codec.eos_ids, mesh, params, temperature=settings.temperature,
                                top_p=settings.top_p, top_k=settings.top_k)
    del params
    generate = engine.generate

    def rng_fn(i, kind):
        key = jax.random.key(settings.seed + i)
        return key if kind == "solution" else jax.random.fold_in(key, 1)

    if ood:
        with jax.set_mesh(mesh):
            results = ood_protocol.run(benchmarks, generate, codec, settings, rng_fn=rng_fn,
                                       workers=config.reward.num_workers)
        print(ood_protocol.format_table(results))
        if jax.process_index() == 0:
            with fs.local_dir_for(fs.parent(out)) as d:
                paths = ood_protocol.write_outputs(results, os.path.join(d, os.path.basename(out)),
                                                   title=f"Out-of-domain evaluation of {F.checkpoint}")
            print("wrote " + ", ".join(fs.join(fs.parent(out), os.path.basename(p)) for p in paths.values()))
        return results

    verifier = math_reward.MathVerifier(verifier_config(config))  # the trainer's: same fallback, limits
    try:
        with jax.set_mesh(mesh):
            results, reports = paper.run_protocol(benchmarks, generate, codec, verifier.verify, settings,
                                                  config=config, rng_fn=rng_fn)
    finally:
        verifier.close()
    print(format_table(results))
    if reports:
        m = results[paper.AVERAGE]["meta"]
        print(f"meta ({settings.num_meta} per problem, all problems): pass-rate MAE {m['pass_mae']:.3f}, "
              f"r {m['pass_pearson']:.3f}; length MAE {m['length_mae']:.1f}, r {m['length_pearson']:.3f}; "
              f"gated {m['gated']} of {m['problems']}, precision {m['gate_precision']:.2f}")
    if jax.process_index() == 0:
        if not F.output and not fs.is_remote(out):
            os.makedirs(os.path.dirname(out), exist_ok=True)  # the default place, made once there are results
        with fs.local_dir_for(fs.parent(out)) as d:  # local files, copied to a remote --output's folder
            paths = paper.write_outputs(results, reports, os.path.join(d, os.path.basename(out)),
                                        title=f"Evaluation of {F.checkpoint}")
        print("wrote " + ", ".join(fs.join(fs.parent(out), os.path.basename(p)) for p in paths.values()))
    return results


def default_output(checkpoint: str) -> str:
    """Where results go without --output: a training run keeps them next to its checkpoints
    (<workdir>/eval.json); an HF model directory is an input and is never written to, so its results
    go to runs/eval/<model dir name>/eval.json under the working directory."""
    if errors.is_hf_dir(checkpoint):
        name = os.path.basename(checkpoint.rstrip("/")) or "model"
        return os.path.join("runs", "eval", name, "eval.json")
    return fs.join(checkpoint, "eval.json")


def format_table(results: dict) -> str:
    from masa_jax.evaluation import paper
    return paper.format_table(results)


def _define_flags():
    from absl import flags
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", None, "ml_collections config file (configs/eval_paper.py[:BASE] "
                                    "sets the paper's protocol)", lock_config=True)
    flags.DEFINE_string("checkpoint", None, "run workdir / checkpoint folder, or an HF model directory")
    flags.DEFINE_string("data", None, "benchmark files (verl parquet, parquet or JSONL), comma-separated "
                        "(default: config.evaluate.data); with configs/eval_paper_ood.py NAME=PATH or paths naming "
                        "the benchmarks (masa_jax.evaluation.ood.benchmarks)")
    # Unset flags fall back to config.evaluate.<name>, then to the paper's value (in brackets).
    flags.DEFINE_integer("n", None, "samples per problem [32]")
    flags.DEFINE_string("k", None, "pass@k values, comma-separated [1,8,32]")
    flags.DEFINE_float("temperature", None, "sampling temperature [0.6]")
    flags.DEFINE_float("top_p", None, "nucleus sampling [1.0]")
    flags.DEFINE_integer("top_k", None, "top-k sampling, 0 = off [0]")
    flags.DEFINE_integer("max_new_tokens", None, "max response tokens [16384]")
    flags.DEFINE_integer("limit", None, "evaluate only the first N problems of each file, 0 = all [0]")
    flags.DEFINE_integer("seed", None, "sampling seed [0]")
    flags.DEFINE_boolean("meta", None, "also evaluate the meta path: calibration and would-be gating [false]")
    flags.DEFINE_integer("num_meta", None, "meta answers per problem with --meta [config.rollout.num_meta]")
    flags.DEFINE_string("output", "", "JSON output path (default: <workdir>/eval.json of a run, runs/eval/<name>/eval.json for an HF dir); the Markdown "
                        "table and --meta's files go next to it")
    flags.mark_flags_as_required(["config", "checkpoint"])


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    errors.run_cli(main, _define_flags)
