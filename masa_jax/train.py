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

import collections
import dataclasses
import json
import logging
import os
import time
from typing import Callable

import jax
import numpy as np

from masa_jax import checkpointing
from masa_jax import components
from masa_jax import config as config_lib
from masa_jax import errors
from masa_jax import fs
from masa_jax import metrics as metrics_lib
from masa_jax import perf
from masa_jax.data import pipeline, sources
from masa_jax.data.problem import question_key
from masa_jax.evaluation import scoring
from masa_jax.models.qwen.presets import model_config_for
from masa_jax.models import qwen
from masa_jax.parallel import mesh as mesh_lib
from masa_jax.parallel import multihost
from masa_jax.rewards import math as math_reward
from masa_jax.rl import prompts
from masa_jax.rl import bc as bc_lib
from masa_jax.rl import expert_buffer as expert_lib
from masa_jax.rl import rollout as rollout_lib
from masa_jax.rl import train_step as train_step_lib
from masa_jax.rl import update as update_lib
from masa_jax.sampling.generate import generate as sampling_generate
from masa_jax.sampling.reshard import to_sampling_params
from masa_jax.tokenization import ChatCodec, load_codec

log = logging.getLogger("masa_jax.train")

# Metrics that depend on wall-clock time; everything else is a deterministic function of (seed, step).
TIMING_PREFIXES = ("time/", "throughput/", "perf/")


@dataclasses.dataclass
class Run:
    """The components of one training run (built once by `build_run`, then only read by the loop)."""
    config: object
    workdir: str
    mesh: jax.sharding.Mesh
    model_cfg: qwen.ModelConfig
    codec: ChatCodec
    data: pipeline.BatchIterator
    verifier: math_reward.MathVerifier
    updater: update_lib.Updater
    rollout_cfg: rollout_lib.RolloutConfig
    checkpointer: checkpointing.RunCheckpointer
    writer: metrics_lib.MetricsWriter
    eval_problems: list                  # this host's share of the held-out problems (config.eval.files)
    generate_fn: Callable | None = None  # injected policy for tests; None = the sampler


SKIP_HINT = ", or skip malformed rows with --config.data.on_error=skip"


def tfds_data_dir(config) -> str | None:
    """config.data.tfds_data_dir for the tfds: specs (None: TFDS's own default, $TFDS_DATA_DIR)."""
    return fs.absolute(config.data.tfds_data_dir) or None


def load_eval_problems(config, process_index: int | None = None, process_count: int | None = None
                       ) -> tuple[list, frozenset[str]]:
    """This host's share of the held-out problems (config.eval.files) and the questions of all of them.

    Every host reads the held-out files whole (they are small: MATH's test set is 5000 rows) because
    every host must drop all held-out questions from its training share."""
    h = jax.process_index() if process_index is None else process_index
    p = jax.process_count() if process_count is None else process_count
    share, questions = [], set()
    for spec in config.eval.files:
        with errors.data_file_errors(spec, field="config.eval.files"):
            every = sources.load_problems(spec, data_dir=tfds_data_dir(config)).problems
        if not every:
            raise errors.no_problems(spec, "config.eval.files")
        questions.update(question_key(q.question) for q in every)
        block = sources.host_block(len(every), h, p)
        share += every[block.start:block.stop]
    return share, frozenset(questions)


def load_training_problems(config, codec: ChatCodec, rcfg: rollout_lib.RolloutConfig, process_index: int | None = None,
                           process_count: int | None = None, exclude_questions: frozenset[str] = frozenset()
                           ) -> tuple[list, dict]:
    """This host's share of the training problems, overlong prompts filtered (counted): each host parses
    only its block of rows of every file (`pipeline.load_host_problems`; the whole set on one host).
    Problems whose question is in `exclude_questions` (the held-out questions, `question_key`) are
    dropped and counted, so held-out accuracy is measured on problems the run never trains on.
    process_index / process_count default to jax's. An empty share is an error only on a single host
    (build_run checks all hosts' shares together)."""
    h = jax.process_index() if process_index is None else process_index
    p = jax.process_count() if process_count is None else process_count
    problems, stats = [], collections.Counter()
    for spec in config.data.train_files:
        with errors.data_file_errors(spec, skip_hint=SKIP_HINT):  # a malformed row: one line naming it
            loaded = pipeline.load_host_problems(spec, process_index=h, process_count=p, on_error=config.data.on_error,
                                                 data_dir=tfds_data_dir(config))
        if p == 1 and not loaded.problems:  # on a pod a host's share of a small file may be empty
            raise errors.no_problems(spec)
        stats["skipped_malformed"] += loaded.num_skipped
        for msg in loaded.skipped[:5]:
            log.warning("skipped malformed row: %s", msg)
        fresh = [q for q in loaded.problems if question_key(q.question) not in exclude_questions]
        stats["dropped_held_out"] += len(loaded.problems) - len(fresh)
        problems.extend(fresh)
    if stats["dropped_held_out"]:
        log.info("dropped %d training problems whose question is held out (config.eval.files)",
                 stats["dropped_held_out"])

    def prompt_len(p):
        meta = codec.encode_chat(prompts.meta_prompt(
            p.question, max_length=rcfg.max_response_length, k=rcfg.k, min_length=rcfg.min_solution_length,
            template=rcfg.meta_template or None))
        sol = codec.encode_chat(prompts.solution_prompt(p.question, template=rcfg.solution_template or None))
        return max(len(meta), len(sol))

    kept, dropped = sources.filter_overlong(problems, prompt_len, config.data.max_prompt_length)
    stats["dropped_overlong"] = dropped
    if dropped:
        log.warning("dropped %d problems whose prompt exceeds %d tokens", dropped, config.data.max_prompt_length)
    if not kept and p == 1:
        raise errors.UserError(f"no training problems left from {list(config.data.train_files)}: every prompt is "
                               f"held out (config.eval.files) or longer than data.max_prompt_length="
                               f"{config.data.max_prompt_length}")
    return kept, dict(stats)


def build_run(config, workdir: str, generate_fn: Callable | None = None) -> Run:
    """Everything the loop needs: mesh, model, tokenizer, data, verifier, train step, checkpoints, logs."""
    m = config.mesh
    mesh_lib.initialize_distributed(m.coordinator_address or None, m.num_processes, m.process_id, auto=m.tpu_pod)
    mesh = mesh_lib.make_mesh(m.shape)
    fs.makedirs(workdir)
    if jax.process_index() == 0:
        write_config(config, workdir)
    codec = load_codec(config.model.tokenizer_path)
    rcfg = components.rollout_config(config)
    try:  # data before the model: a bad file stops the start in seconds, not after loading the weights
        eval_problems, eval_questions = load_eval_problems(config)
        problems, data_stats = load_training_problems(config, codec, rcfg, exclude_questions=eval_questions)
        failure = None
    except errors.UserError as e:  # a malformed row in one host's share: every host must stop, not hang
        problems, data_stats, failure = [], {}, str(e)
    shares = multihost.allgather_json({"n": len(problems), "error": failure})
    if any(sh["error"] for sh in shares):
        raise errors.UserError(next(sh["error"] for sh in shares if sh["error"]))
    shard_sizes = [sh["n"] for sh in shares]
    if not min(shard_sizes):
        raise errors.UserError(f"no training problems left for host(s) {[i for i, n in enumerate(shard_sizes) if not n]} "
                               f"of {len(shard_sizes)} from {list(config.data.train_files)} (after data.max_prompt_length="
                               f"{config.data.max_prompt_length}): each host trains on its own block of rows")
    per_host = pipeline.per_host_batch_size(config.data.problems_per_step, jax.process_count())
    data = pipeline.batches(problems, batch_size=per_host, seed=config.seed, shuffle=config.data.shuffle,
                            sharded=True, shard_sizes=shard_sizes)
    log.info("training problems: %d on this host of %d (%s)", len(problems), sum(shard_sizes), data_stats)
    model_cfg = model_config_for(config)
    model_cfg, params = qwen.from_pretrained(fs.local_copy(config.model.path), dtype=model_cfg.param_dtype,
                                             mesh=mesh, compute_dtype=model_cfg.dtype, remat=model_cfg.remat,
                                             attention_impl=model_cfg.attention_impl)
    verifier = math_reward.MathVerifier(components.verifier_config(config))
    updater = update_lib.Updater.create(config, model_cfg, params, mesh, pad_id=codec.pad_id)
    checkpointer = checkpointing.RunCheckpointer(fs.join(workdir, "checkpoints"),
                                                 max_to_keep=config.checkpoint.max_to_keep)
    run_config = json.loads(json.dumps(config.to_dict(), default=str))  # as config.json holds it
    writer = metrics_lib.MetricsWriter(workdir, use_tensorboard=config.log.tensorboard, use_wandb=config.log.wandb,
                                       wandb_project=config.log.wandb_project, is_primary=jax.process_index() == 0,
                                       wandb_config=run_config, hparams=run_config)
    return Run(config, workdir, mesh, model_cfg, codec, data, verifier, updater, rcfg, checkpointer, writer,
               eval_problems, generate_fn)


def make_generate(run: Run, params, temperature: float | None = None) -> Callable:
    """The rollout policy for this step: the refill sampler over the sampling-layout weights, at the
    rollout temperature unless `temperature` is given."""
    if run.generate_fn is not None:
        return run.generate_fn
    sampler = components.sampler_config(run.config, run.codec.eos_ids, temperature=temperature)
    sampling_params = to_sampling_params(run.model_cfg, params, mesh=run.mesh)  # the per-step reshard
    mesh = run.mesh
    if jax.process_count() > 1:  # each host samples its own problems on its own devices
        mesh = multihost.local_sampling_mesh(run.mesh)
        sampling_params = multihost.to_local(sampling_params, mesh)

    def generate(prompt_ids, budgets, max_new_tokens, rng):
        return sampling_generate(run.model_cfg, sampling_params, prompt_ids, rng=rng, max_new_tokens=max_new_tokens,
                                 budgets=None if budgets is None else [int(b) for b in budgets], mesh=mesh,
                                 sampler=sampler)
    return generate


@dataclasses.dataclass
class LoopState:
    """Host-side state that checkpoints carry next to the train state."""
    step: int = 0
    switched_at: int = -1                      # step of the MASA-efficient switch-over (-1: not yet)
    meta_reward_history: list = dataclasses.field(default_factory=list)
    buffer: expert_lib.ExpertBuffer | None = None
    train_time_s: float = 0.0                  # wall-clock of the RL steps so far (evaluations excluded)
    evals: list = dataclasses.field(default_factory=list)  # held-out evaluations: {"step", "train_time_s", ...}


def efficient_active(config, loop: LoopState) -> bool:
    """MASA-efficient's switch-over: at step k, or earlier once the meta-reward moving average passes
    the configured threshold (when one is set)."""
    if config.algorithm != "masa_efficient":
        return False
    if loop.switched_at >= 0:
        return True
    e = config.efficient
    hist = loop.meta_reward_history[-e.auto_switch_window:]
    auto = (e.auto_switch_threshold > 0 and len(hist) >= e.auto_switch_window
            and float(np.mean(hist)) >= e.auto_switch_threshold)
    if loop.step >= e.switch_step or auto:
        loop.switched_at = loop.step
        return True
    return False


def collect_rollouts(run: Run, generate: Callable, active: bool, rng: jax.Array) -> rollout_lib.Rollouts:
    """One step's rollouts; with DAPO's dynamic sampling, more problems are rolled out (up to
    `dapo.max_rounds` extra rounds) until the batch has `problems_per_step` solution groups with reward
    variance. Sequences are kept per path (`rollout_lib.dapo_filter`); the problems after the one that
    completes the batch are dropped, both paths."""
    verify = run.verifier.verify
    problems = next(run.data)
    ro = rollout_lib.run_rollouts(problems, generate=generate, codec=run.codec, verify=verify, cfg=run.rollout_cfg,
                                  efficient_active=active, rng=rng)
    if not run.config.dapo.dynamic_sampling:
        return ro
    target = len(problems)
    first_signal = rollout_lib.solution_signal(ro)
    kept = rollout_lib.dapo_filter(ro)
    rounds = 0
    while rollout_lib.solution_signal(kept).sum() < target and rounds < run.config.dapo.max_rounds:
        rounds += 1
        more = rollout_lib.run_rollouts(next(run.data), generate=generate, codec=run.codec, verify=verify,
                                        cfg=run.rollout_cfg, efficient_active=active,
                                        rng=jax.random.fold_in(rng, rounds))
        kept = rollout_lib.concat(kept, rollout_lib.dapo_filter(more))
    groups_before = np.cumsum(rollout_lib.solution_signal(kept)) - rollout_lib.solution_signal(kept)
    kept = rollout_lib.select(kept, groups_before < target)
    kept.metrics.update({"dapo/rounds": float(rounds),
                         "dapo/kept_groups": float(rollout_lib.solution_signal(kept).sum()),
                         "dapo/kept_meta_groups": float(rollout_lib.meta_signal(kept).sum()),
                         "dapo/first_round_kept_fraction": float(first_signal.mean())})
    return kept


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
                                                 "alpha": lora_cfg.alpha, "targets": list(lora_cfg.targets)}}
    return {**lora,"data": multihost.allgather_json(run.data.get_state()),
            "buffer": multihost.allgather_json(loop.buffer.to_json()),
            "loop": {"step": loop.step, "switched_at": loop.switched_at,
                     "meta_reward_history": loop.meta_reward_history, "train_time_s": loop.train_time_s,
                     "evals": loop.evals},
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
    created = _first_missing_dir(workdir)
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
        restored = run.checkpointer.restore_latest(train_step_lib.checkpoint_view(state))
    except BaseException:  # e.g. every checkpoint unreadable: release the workers and threads first
        run.checkpointer.close()
        run.writer.close()
        run.verifier.close()
        raise
    if restored is not None:
        state, extras, step = restored
        state = train_step_lib.with_base(state, run.updater.state.base_params)
        me = jax.process_index()
        run.data.set_state(extras["data"][me])
        loop = LoopState(step=int(extras["loop"]["step"]), switched_at=int(extras["loop"]["switched_at"]),
                         meta_reward_history=list(extras["loop"]["meta_reward_history"]),
                         buffer=expert_lib.ExpertBuffer.from_json(extras["buffer"][me]),
                         train_time_s=float(extras["loop"].get("train_time_s", 0.0)),
                         evals=list(extras["loop"].get("evals", [])))
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
            write_figures(workdir, history, config.log.calibration_steps, meta=config_lib.uses_meta(config),
                          gating=config.algorithm == "masa_efficient")
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
    mine = {"acc": correct.mean(axis=1).tolist(), "level": [p.difficulty for p in run.eval_problems]}
    parts = multihost.allgather_json(mine)
    acc = np.array(sum((p["acc"] for p in parts), []), np.float64)
    levels = sum((p["level"] for p in parts), [])
    out = {"eval/accuracy": float(acc.mean())}
    for level in sorted({lv for lv in levels if lv is not None}):
        out[f"eval/accuracy_level_{level}"] = float(acc[[lv == level for lv in levels]].mean())
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


def check_inputs(config, workdir: str, allow_config_change: bool = False) -> None:
    """UserErrors a run would otherwise meet only after building the model (or mid-way through its start)."""
    errors.check_workdir(workdir)
    check_config_change(config, workdir, allow_config_change)
    errors.check_model_dir(config)
    errors.check_data_file_names(config.data.train_files)
    errors.check_data_file_names(config.eval.files, field="config.eval.files")


def _first_missing_dir(path: str) -> str | None:
    """The outermost directory that creating `path` would create (None: it exists). An object store has
    no directories: there it is `path` itself unless something is stored under it."""
    if fs.is_remote(path):
        return None if fs.exists(path) else path
    path, missing = os.path.abspath(path), None
    while not os.path.exists(path):
        path, missing = os.path.dirname(path), path
    return missing


# Where a run's processes meet, not what they train: may differ between invocations and between hosts.
_PLACEMENT_FIELDS = ("mesh.coordinator_address", "mesh.process_id")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def config_changes(stored: dict, config) -> list[str]:
    """'field: old -> new' for each field of `config` that differs from a stored config.json. A field the
    file lacks (added to the code since) counts only when it is set away from its default."""
    as_json = lambda c: _flat(json.loads(json.dumps(c.to_dict(), default=str)))
    old, default = _flat(stored), as_json(config_lib.base_config())
    return [f"{k}: {old.get(k, default.get(k))!r} -> {v!r}" for k, v in as_json(config).items()
            if k not in _PLACEMENT_FIELDS and v != old.get(k, default.get(k))]


def _stored_config(path: str) -> dict | None:
    """The config.json at `path`, None when it does not exist; an unreadable one is a UserError."""
    if not fs.exists(path):
        return None
    try:
        return json.loads(fs.read_text(path))
    except (OSError, ValueError) as e:
        raise errors.UserError(f"{path} cannot be read ({e}): delete it, or pass --allow_config_change") from e


def check_config_change(config, workdir: str, allow: bool) -> None:
    """A workdir resumes the run its config.json describes: another config is an error unless allowed."""
    stored = None if allow else _stored_config(fs.join(workdir, "config.json"))
    changes = config_changes(stored, config) if stored is not None else []
    if changes:
        raise errors.UserError(f"{workdir} holds a run with another config: {', '.join(changes)}; pass "
                               "--allow_config_change to resume it with the new one, or use another --workdir")


def write_config(config, workdir: str) -> None:
    """Writes config.json; a differing one from an earlier invocation is kept as config.<n>.json."""
    path = fs.join(workdir, "config.json")
    try:
        keep = (stored := _stored_config(path)) is not None and bool(config_changes(stored, config))
    except errors.UserError:  # unreadable: keep it too
        keep = True
    if keep:
        n = 1
        while fs.exists(fs.join(workdir, f"config.{n}.json")):
            n += 1
        fs.replace(path, fs.join(workdir, f"config.{n}.json"))
    # Atomic: other hosts may be reading it in check_config_change.
    fs.write_text(path, json.dumps(config.to_dict(), indent=2, default=str))


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


def write_figures(workdir: str, history: list[dict], calibration_steps: int, *, meta: bool = True,
                  gating: bool = True) -> None:
    """End-of-run PNGs: predicted vs actual pass rate at the start and the end (the paper's Figure 2),
    the meta reward and its parts over steps (`meta`: the algorithm trains a meta path), and the gated
    fraction over steps (`gating`: MASA-efficient)."""
    fig_dir = fs.join(workdir, "figures")
    fs.makedirs(fig_dir)
    path = fs.join(workdir, "calibration.jsonl")
    if fs.exists(path):
        records = metrics_lib.read_jsonl(path)
        if records:
            n = max(1, min(calibration_steps, len(records) // 2 or 1))
            pool = lambda rs: (sum((r["pred"] for r in rs), []), sum((r["true"] for r in rs), []))
            (p0, t0), (p1, t1) = pool(records[:n]), pool(records[-n:])
            metrics_lib.plot_calibration(
                [p0, p1], [t0, t1], fs.join(fig_dir, "calibration.png"), "predicted vs actual pass rate",
                panel_titles=[f"steps {records[0]['step']}-{records[n - 1]['step']}",
                              f"steps {records[-n]['step']}-{records[-1]['step']}"])
    if meta:
        metrics_lib.plot_meta_rewards(history, fs.join(fig_dir, "meta_rewards.png"))
    if gating:
        metrics_lib.plot_gating(history, fs.join(fig_dir, "gating.png"))


def default_workdir(config) -> str:
    """runs/<algorithm> under the cwd: where a run without --workdir (or `train(config, "")`) writes."""
    return os.path.join("runs", config.algorithm)


def main(argv):
    from absl import flags
    del argv
    _quiet_library_logs()
    FLAGS = flags.FLAGS
    config = config_lib.resolve(errors.config_from_flags(FLAGS))  # before --dry_run too: it skips the checks
    if FLAGS.dry_run:
        from masa_jax import dry_run
        print(dry_run.report(config, FLAGS.dry_run_devices or None, config.mesh.device_memory_gib or None))
        return
    train(config, FLAGS.workdir, allow_config_change=FLAGS.allow_config_change)


def _define_flags():
    from absl import flags
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", None, "ml_collections config file (configs/*.py)", lock_config=True)
    flags.DEFINE_string("workdir", "", "run directory (checkpoints, metrics, figures); resumed when it exists")
    flags.DEFINE_boolean("dry_run", False, "build the model abstractly and print the per-device memory estimate")
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
