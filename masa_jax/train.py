"""`python -m masa_jax.train --config=configs/<name>.py [--config.<field>=<value>] [--workdir=DIR]`.

Runs GRPO / DAPO / MASA / MASA-efficient (config.algorithm). One step, as in the paper's Algorithm 1:

    problems -> meta rollouts (M each) -> [after the switch-over: gating, cutoff budgets, hints]
             -> solution rollouts (G each) -> verify answers, parse meta outputs, self-alignment rewards
             -> group advantages -> old log-probs -> policy update(s)
             -> expert meta-trajectories into the buffer -> BC steps when it is full
             -> metrics; every N steps an Orbax checkpoint

Starting again in the same workdir resumes from the newest checkpoint; SIGTERM saves and exits.
"""
from __future__ import annotations

import functools
import json
import logging
import time
from typing import Callable

import jax
import numpy as np

from masa_jax import checkpointing
from masa_jax import compile_cache
from masa_jax import config as config_lib
from masa_jax import errors
from masa_jax import fs
from masa_jax import metrics as metrics_lib
from masa_jax import perf
from masa_jax.evaluation import scoring
from masa_jax.loop_state import LoopState, efficient_active
from masa_jax.parallel import multihost
from masa_jax.rl import bc as bc_lib
from masa_jax.rl import expert_buffer as expert_lib
from masa_jax.rl import rollout as rollout_lib
from masa_jax.rl import train_step as train_step_lib
from masa_jax.run_setup import Run, build_run, check_inputs, default_workdir, first_missing_dir

log = logging.getLogger("masa_jax.train")

# Metrics that depend on wall-clock time; everything else is a deterministic function of (seed, step).
TIMING_PREFIXES = ("time/", "throughput/", "perf/")


def make_generate(run: Run, params, temperature: float | None = None) -> Callable:
    """The rollout policy for this step: the run's engine holding `params`, at the rollout temperature
    unless `temperature` is given."""
    run.engine.update_params(params)  # the per-step reshard into the sampling layout
    if temperature is None:
        return run.engine.generate
    return functools.partial(run.engine.generate, temperature=temperature)


def collect_rollouts(run: Run, generate: Callable, active: bool, rng: jax.Array) -> rollout_lib.Rollouts:
    """One step's rollouts of the next batch; with DAPO's dynamic sampling, of further batches until it
    has `problems_per_step` solution groups with reward variance (`rollout_lib.dynamic_sampling`)."""
    def roll(problems, key):
        return rollout_lib.run_rollouts(problems, generate=generate, codec=run.codec, verify=run.verifier.verify,
                                        cfg=run.rollout_cfg, efficient_active=active, rng=key)

    if not run.config.dapo.dynamic_sampling:
        return roll(next(run.data), rng)
    return rollout_lib.dynamic_sampling(roll, lambda: next(run.data), run.config.dapo.max_rounds, rng)


def sampling_key(step_key: jax.Array, process_index: int) -> jax.Array:
    """The rollout key of one host: each process samples its own problems, so it must draw its own
    random numbers (the step key alone is the same on every host)."""
    return jax.random.fold_in(step_key, process_index)


def train_one_step(run: Run, state, loop: LoopState, rng: jax.Array):
    """One RL step, the paper's Algorithm 1: rollouts of both paths with their rewards and advantages
    (`collect_rollouts`), the policy update, behaviour cloning. Returns (state, metrics, calibration,
    samples): calibration is the step's per-problem predicted and actual pass rates (None without a meta
    path), samples this host's `config.log.num_samples` meta and solution generations for the logs."""
    t_step = time.perf_counter()
    active = efficient_active(run.config, loop)
    generate = make_generate(run, run.updater.policy_params(state))
    ro = collect_rollouts(run, generate, active, sampling_key(rng, jax.process_index()))
    run.engine.update_params(None)  # the sampling copy is not resident during the update
    metrics = dict(ro.metrics)
    metrics["efficient/active"] = float(active)

    t0 = time.perf_counter()
    metrics["time/rollout_s"] = t0 - t_step  # sampling, rewards, advantages
    state, upd = run.updater.policy_update(state, ro.sequences)
    metrics.update(upd)
    metrics["time/update_s"] = time.perf_counter() - t0
    lengths = [len(p) + len(r) for p, r in zip(ro.sequences.prompt_ids, ro.sequences.response_ids)]
    metrics.update(perf.update_counts(run.model_cfg, lengths, ppo_epochs=run.config.rl.ppo_epochs,
                                      reference=run.config.rl.kl_coef > 0))

    if run.rollout_cfg.use_meta and run.config.bc.enabled:
        state, bc_metrics = bc_lib.clone_experts(state, ro, loop.buffer, run.updater.bc_update, run.codec,
                                                 k=run.config.meta.k, min_notion_reward=run.config.bc.min_notion_reward)
        metrics.update(bc_metrics)

    metrics = multihost.global_metrics(metrics)
    # The switch-over decision reads the host-combined value, so every host switches at the same step.
    if "reward/meta_total" in metrics:
        loop.meta_reward_history.append(metrics["reward/meta_total"])
    elapsed = time.perf_counter() - t_step
    tokens = metrics.get("tokens/solution", 0.0) + metrics.get("tokens/meta", 0.0)
    metrics["time/step_s"] = elapsed
    metrics["throughput/tokens_per_s"] = tokens / max(elapsed, 1e-9)
    metrics.update(perf.step_metrics(run.model_cfg, metrics, elapsed,
                                     peak_override=run.config.log.peak_flops_per_device))
    return state, metrics, calibration_record(ro), rollout_lib.sample_records(ro, run.config.log.num_samples)


def calibration_record(ro: rollout_lib.Rollouts) -> dict | None:
    """Predicted vs actual pass rate of the rolled-out problems with a parsed prediction (Figure 2)."""
    if ro.controls is None:
        return None
    rolled = ro.rolled_out & np.isfinite(ro.controls.pred_pass_mean)
    return {"pred": ro.controls.pred_pass_mean[rolled].tolist(), "true": ro.correct[rolled].mean(axis=1).tolist()}


def _extras(run: Run, loop: LoopState, history: list) -> dict:
    """The host-side run state, with one data-iterator state and expert buffer per process; for a LoRA
    run the adapters' config and the base model they adapt (its weights are not in the checkpoint)."""
    lora_cfg = run.updater.lora_cfg
    lora = {} if lora_cfg is None else {"lora": {"base_model": run.config.model.path, "rank": lora_cfg.rank,
                                                 "alpha": lora_cfg.alpha, "targets": list(lora_cfg.targets),
                                                 "base_quantization": lora_cfg.base_quantization}}
    return {**lora, "data": multihost.allgather_json(run.data.get_state()),
            "buffer": multihost.allgather_json(loop.buffer.to_json()),
            "loop": loop.to_json(),
            "history": history}


def train(config, workdir: str, *, generate_fn: Callable | None = None, stop_after: int | None = None,
          allow_config_change: bool = False) -> list[dict]:
    """Runs (or resumes) training in `workdir`; returns the metric history (one dict per step).

    stop_after: stop (with a checkpoint) after this many steps of *this* invocation — for tests that
    interrupt and resume. generate_fn: a scripted rollout policy (tests); None uses the sampler.
    allow_config_change: resume a workdir whose config.json differs from `config` (the old file is kept
    as config.<n>.json); without it that is a UserError naming the changed fields.
    Bad inputs (config values, model dir, data files, workdir) raise a UserError before anything is created.
    """
    config = config_lib.resolve(config)
    workdir = fs.absolute(workdir or default_workdir(config))
    check_inputs(config, workdir, allow_config_change)
    compile_cache.enable(config.compile_cache)  # before the first compilation
    created = first_missing_dir(workdir)
    try:
        run = build_run(config, workdir, generate_fn)
    except BaseException:
        if created:  # a failed start leaves no half-made workdir behind
            fs.rmtree(created)
        raise
    if jax.process_index() == 0:
        print(f"run directory: {workdir}", flush=True)  # after the checks: a user error stays one line
    state = run.updater.state
    loop = LoopState(buffer=expert_lib.ExpertBuffer(config.bc.buffer_size))
    history: list[dict] = []
    try:  # a LoRA run's checkpoints hold the adapters; the frozen base is the one loaded from model.path
        restored = run.checkpointer.restore_latest(run.updater.restore_template())
        if restored is None and state is None:
            raise checkpointing.CheckpointError(f"the checkpoints in {run.checkpointer.directory} disappeared "
                                                "while the run started")
    except BaseException:  # e.g. every checkpoint unreadable: release the workers and threads first
        run.checkpointer.close()
        run.writer.close()
        run.verifier.close()
        raise
    if restored is not None:
        state, extras, step = restored
        state = run.updater.restored_state(state)
        me = jax.process_index()
        run.data.set_state(extras["data"][me])
        loop = LoopState.from_json(extras["loop"], expert_lib.ExpertBuffer.from_json(extras["buffer"][me]))
        history = list(extras["history"])
        log.info("resumed from step %d", loop.step)
    run.writer.truncate_after(loop.step)  # also on a fresh run: a reused workdir must not keep old lines
    run.updater.state = None  # the loop owns the state from here on
    base_rng = jax.random.key(config.seed)
    bar = metrics_lib.ProgressBar(config.total_steps, initial=loop.step)
    guard = checkpointing.PreemptionGuard()
    steps_this_run = 0
    try:
        with guard:  # the jitted steps carry their own shardings; no global mesh context is needed
            if config.eval.files and not loop.evals:  # the starting point of the held-out accuracy curve
                run.writer.write_scalars(loop.step, _record_eval(run, loop, heldout_eval(run, run.updater.policy_params(state), loop.step)))
            while loop.step < config.total_steps:
                state, m, calibration, samples = train_one_step(run, state, loop,
                                                                jax.random.fold_in(base_rng, loop.step))
                loop.step += 1
                steps_this_run += 1
                loop.train_time_s += m["time/step_s"]
                m["step"] = loop.step
                m["time/train_elapsed_s"] = loop.train_time_s
                if config.eval.files and (loop.step == config.total_steps or (
                        config.eval.every and loop.step % config.eval.every == 0)):
                    m.update(_record_eval(run, loop, heldout_eval(run, run.updater.policy_params(state), loop.step)))
                history.append(m)
                run.writer.write(loop.step, m)
                run.writer.write_samples(loop.step, samples)
                _append_calibration(run, loop.step, calibration)
                bar.update(loop.step, m)
                stop = guard.should_stop_all() or (stop_after is not None and steps_this_run >= stop_after)
                if loop.step % config.checkpoint.every == 0 or loop.step == config.total_steps or stop:
                    run.checkpointer.save(loop.step, train_step_lib.checkpoint_view(state), _extras(run, loop, history),
                                          force=True)
                if stop:
                    log.info("stopping at step %d (%s)", loop.step, "SIGTERM" if guard.should_stop_all() else "stop_after")
                    break
    finally:
        bar.close()
        try:
            run.checkpointer.close()  # waits for the last save; its write error is raised once
        finally:
            run.writer.close()
            run.verifier.close()
    if jax.process_index() == 0:
        if config.log.figures:
            metrics_lib.write_figures(workdir, history, config.log.calibration_steps, meta=config_lib.uses_meta(config),
                          gating=config_lib.features(config).efficient)
        print(metrics_lib.summary_table(history, window=max(1, min(config.log.calibration_steps, len(history) // 2))))
        if loop.evals:
            print(metrics_lib.eval_table(loop.evals))
    return history


def heldout_eval(run: Run, params, step: int) -> dict[str, float]:
    """Accuracy of the current policy on the held-out problems (solution prompt, no hint), all hosts'
    shares pooled; with toy / MATH difficulty levels also per level. Keys `eval/...`."""
    c = run.config.eval
    t0 = time.perf_counter()
    generate = make_generate(run, params, temperature=c.temperature)
    # Its own key stream (the training rollouts' stays untouched), different on every host.
    rng = sampling_key(jax.random.fold_in(jax.random.key(run.config.seed + 1), step), jax.process_index())
    correct = np.zeros((0, c.num_samples), bool)  # a host with no share still joins the gather below
    if run.eval_problems:
        correct, _ = scoring.sample_and_score(  # evaluate's measurement
            run.eval_problems, generate, run.codec, run.verifier.verify, n=c.num_samples,
            max_new_tokens=run.config.rollout.max_response_length, rng=rng,
            solution_template=run.config.prompts.solution_template)
    run.engine.update_params(None)
    mine = {"acc": correct.mean(axis=1).tolist(), "level": [p.difficulty for p in run.eval_problems]}
    parts = multihost.allgather_json(mine)
    out = scoring.accuracy_by_level(sum((p["acc"] for p in parts), []), sum((p["level"] for p in parts), []))
    out["time/eval_s"] = time.perf_counter() - t0
    return out


def _record_eval(run: Run, loop: LoopState, result: dict[str, float]) -> dict[str, float]:
    """Keeps one evaluation in the loop state (checkpointed) and in eval.jsonl; returns it."""
    loop.evals.append({"step": loop.step, "train_time_s": loop.train_time_s, **result})
    if jax.process_index() == 0:
        # Rewritten whole: a resumed run drops an interrupted run's lines.
        fs.write_text(fs.join(run.workdir, "eval.jsonl"), "".join(json.dumps(r) + "\n" for r in loop.evals))
    log.info("held-out accuracy at step %d: %.4f", loop.step, result["eval/accuracy"])
    return result


def _append_calibration(run: Run, step: int, calibration: dict | None) -> None:
    """One JSON line per step in calibration.jsonl (all hosts' problems, written by process 0)."""
    if calibration is None:
        return
    parts = multihost.allgather_json(calibration)
    if jax.process_index() == 0:
        record = {"step": step, "pred": sum((p["pred"] for p in parts), []),
                  "true": sum((p["true"] for p in parts), [])}
        path = fs.join(run.workdir, "calibration.jsonl")
        kept = [r for r in metrics_lib.read_jsonl(path) if r["step"] < step]
        # Rewritten, so a resumed run drops the interrupted run's later lines.
        fs.write_text(path, "".join(json.dumps(r) + "\n" for r in kept + [record]))


def main(argv):
    from absl import flags
    del argv
    _quiet_library_logs()
    FLAGS = flags.FLAGS
    config = config_lib.resolve(errors.config_from_flags(FLAGS))  # before --dry_run too: it skips the checks
    if FLAGS.dry_run:
        import sys
        from masa_jax import compile_check
        print(compile_check.report(config, FLAGS.dry_run_devices or None, config.mesh.device_memory_gib or None,
                                   progress=lambda line: print(line, file=sys.stderr, flush=True)))
        return
    train(config, FLAGS.workdir, allow_config_change=FLAGS.allow_config_change)


def _define_flags():
    from absl import flags
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", None, "ml_collections config file (configs/*.py)", lock_config=True)
    flags.DEFINE_string("workdir", "", "run directory (checkpoints, metrics, figures); resumed when it exists")
    flags.DEFINE_boolean("dry_run", False, "compile every program of a step for config.mesh.topology (XLA's "
                         "per-device memory, needs the [tpu] extra) next to the rough formula; nothing is allocated")
    flags.DEFINE_boolean("allow_config_change", False, "resume a workdir whose config.json differs from --config "
                         "(the old one is kept as config.<n>.json)")
    flags.DEFINE_integer("dry_run_devices", 0, "device count for a mesh with -1 in --dry_run (0: this host's)")
    flags.mark_flags_as_required(["config"])


def _quiet_library_logs() -> None:
    """Our INFO lines on the console; Orbax's / JAX's per-save chatter only from WARNING up."""
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("masa_jax").setLevel(logging.INFO)


if __name__ == "__main__":
    errors.run_cli(main, _define_flags)
