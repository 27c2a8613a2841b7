"""One step's rollouts: meta path, MASA-efficient controls, solution path, rewards and advantages.

Host-side orchestration only: generation is a rollout engine's `generate(prompts, budgets, max_new_tokens,
rng)` (`rl/rollout_engine.py`: its contract; the jitted refill sampler in training, a scripted policy in
tests), answers are checked by the verifier's worker pool, and every reward is computed over whole `[P, G]` / `[P, M]` arrays.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Protocol, Sequence

import jax
import numpy as np

from masa_jax import stats
from masa_jax.data.problem import Problem
from masa_jax.rewards import meta as meta_lib
from masa_jax.rl import prompts
from masa_jax.rl import controls as controls_lib
from masa_jax.rl import grpo
from masa_jax.rl.rollout_engine import GenerateFn
from masa_jax.rl.sequences import TrainingSequences


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    num_meta: int                   # M
    num_solutions: int              # G
    max_response_length: int
    meta_max_new_tokens: int
    use_meta: bool                  # masa / masa_efficient: run the meta path
    k: int = 8
    base: float = 0.01
    weights: tuple[float, ...] = dataclasses.field(default_factory=meta_lib.default_weights)  # per component
    min_solution_length: int = prompts.MIN_SOLUTION_LENGTH
    meta_template: str = ""
    solution_template: str = ""
    advantage: str = "grpo"
    adv_eps: float = 1e-6
    control: controls_lib.ControlConfig = controls_lib.ControlConfig()
    gating: bool = True
    cutoff: bool = True
    hints: bool = True


class TextCodec(Protocol):
    """What the rollout needs from a tokenizer: chat prompt -> ids, ids -> text."""
    def encode_chat(self, messages: list[dict]) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    eos_ids: tuple[int, ...]


@dataclasses.dataclass
class Rollouts:
    """Everything one step produced. P problems, M meta and G solution rollouts per problem: the
    per-problem fields (leading dimension P), the training `sequences` (solution rollouts of the
    rolled-out problems, then their meta rollouts) and the step's metrics."""
    problems: list[Problem]
    meta_prompt_ids: list[list[int]]
    meta_texts: list[list[str]] | None
    preds: list[list] | None
    meta_rewards: dict[str, np.ndarray] | None     # [P, M] each; nan rows for gated problems
    controls: controls_lib.Controls | None
    rolled_out: np.ndarray                          # bool [P]: got solution rollouts
    correct: np.ndarray                             # bool [P, G] (False for gated)
    lengths: np.ndarray                             # int [P, G] response tokens without the stop token
    finish_budget: np.ndarray                       # bool [P, G]: stopped by the cutoff budget
    sequences: TrainingSequences
    metrics: dict[str, float]
    solution_texts: list[list[str]] | None = None   # [P][G] decoded solution rollouts (empty rows for gated)


def _response_length(tokens: Sequence[int], reason: str) -> int:
    return len(tokens) - 1 if reason == "eos" and tokens else len(tokens)


def _strip_stop(tokens: Sequence[int], reason: str) -> list[int]:
    return list(tokens[:-1]) if reason == "eos" and tokens else list(tokens)


@dataclasses.dataclass(frozen=True)
class MetaPath:
    """The meta path of P problems: prompts [P], and with `use_meta` the M outputs per problem (texts,
    parsed predictions, and the sampler's flat [P * M] output for the training sequences)."""
    prompt_ids: list[list[int]]
    texts: list[list[str]] | None = None
    preds: list[list[meta_lib.MetaPrediction]] | None = None
    output: object | None = None


@dataclasses.dataclass(frozen=True)
class Decision:
    """What the controls decided: which problems get solution rollouts, with which budgets and hints.
    `controls` is None without a meta path; `applied` only after MASA-efficient's switch-over (before,
    the controls are computed for their would-be metrics only)."""
    controls: controls_lib.Controls | None
    applied: bool
    rolled_out: np.ndarray            # bool [P]
    budgets: np.ndarray               # int [P] max new tokens of each solution rollout


@dataclasses.dataclass(frozen=True)
class SolutionPath:
    """The G solution rollouts of each rolled-out problem (empty rows for gated ones)."""
    prompt_ids: dict[int, list[int]]  # problem index -> solution prompt (with its hint, if any)
    texts: list[list[str]]            # [P][G]
    lengths: np.ndarray               # int [P, G] response tokens without the stop token
    finish_budget: np.ndarray         # bool [P, G] stopped by a real cutoff (budget below the cap)
    output: object | None             # the sampler's flat output, rolled-out problems in order


@dataclasses.dataclass(frozen=True)
class Scores:
    correct: np.ndarray                         # bool [P, G]: r_sol (False for gated / cut-off rollouts)
    meta_rewards: dict[str, np.ndarray] | None  # [P, M] each; nan rows for gated problems


def meta_path(problems: Sequence[Problem], generate: GenerateFn, codec: TextCodec, cfg: RolloutConfig,
              rng: jax.Array) -> tuple[MetaPath, dict[str, float]]:
    """Meta prompts for every problem; with `use_meta`, M meta rollouts each, decoded and parsed."""
    P, M = len(problems), cfg.num_meta
    prompt_ids = [codec.encode_chat(prompts.meta_prompt(
        p.question, max_length=cfg.max_response_length, k=cfg.k, min_length=cfg.min_solution_length,
        template=cfg.meta_template or None)) for p in problems]
    if not cfg.use_meta:
        return MetaPath(prompt_ids), {}
    t0 = time.perf_counter()
    out = generate([ids for ids in prompt_ids for _ in range(M)], None, cfg.meta_max_new_tokens, rng)
    texts = [[codec.decode(_strip_stop(out.tokens[p * M + j], out.finish_reasons[p * M + j])) for j in range(M)]
             for p in range(P)]
    preds = [[meta_lib.parse(t, k=cfg.k) for t in row] for row in texts]
    # Meta rollouts cut off by meta_max_new_tokens lose their JSON (score 0): what a cap below the authors'
    # (the response length) costs.
    metrics = {"time/meta_rollout_s": time.perf_counter() - t0,
               "meta/truncated_rate": float(np.mean([r == "max_new_tokens" for r in out.finish_reasons]))}
    for field, name in (("pass_rate", "pass"), ("length", "length"), ("notions", "notion")):
        metrics[f"meta/parse_rate_{name}"] = float(np.mean([[getattr(q, field) is not None for q in r]
                                                            for r in preds]))
    return MetaPath(prompt_ids, texts, preds, out), metrics


def decide(meta: MetaPath, cfg: RolloutConfig, efficient_active: bool) -> Decision:
    """MASA-efficient's controls from the meta predictions: gating, cutoff budgets, hints."""
    P = len(meta.prompt_ids)
    ctrl = None
    if cfg.use_meta:
        ctrl = controls_lib.compute_controls(
            meta.preds, cfg.max_response_length, cfg.control, use_gating=cfg.gating, use_cutoff=cfg.cutoff,
            use_hints=cfg.hints and efficient_active)
    applied = bool(efficient_active and ctrl is not None)
    return Decision(ctrl, applied, ~ctrl.gated if applied else np.ones(P, bool),
                    ctrl.budgets if applied else np.full(P, cfg.max_response_length))


def solution_path(problems: Sequence[Problem], decision: Decision, generate: GenerateFn, codec: TextCodec,
                  cfg: RolloutConfig, rng: jax.Array) -> tuple[SolutionPath, dict[str, float]]:
    """G solution rollouts of every rolled-out problem, with its hint and cutoff budget once applied."""
    P, G = len(problems), cfg.num_solutions
    ctrl, applied = decision.controls, decision.applied
    sol_idx = np.flatnonzero(decision.rolled_out)
    prompt_ids = {int(p): codec.encode_chat(prompts.solution_prompt(
        problems[p].question, hint_notions=(ctrl.hints[p] if applied and ctrl.hints[p] else None),
        template=cfg.solution_template or None)) for p in sol_idx}
    texts: list[list[str]] = [[] for _ in range(P)]
    lengths = np.zeros((P, G), np.int64)
    finish_budget = np.zeros((P, G), bool)
    if not len(sol_idx):
        return SolutionPath(prompt_ids, texts, lengths, finish_budget, None), {}
    t0 = time.perf_counter()
    flat_prompts = [prompt_ids[int(p)] for p in sol_idx for _ in range(G)]
    flat_budgets = np.repeat(decision.budgets[sol_idx], G)
    out = generate(flat_prompts, flat_budgets if applied else None, cfg.max_response_length, rng)
    metrics = {"time/solution_rollout_s": time.perf_counter() - t0}
    for n, (toks, reason) in enumerate(zip(out.tokens, out.finish_reasons)):
        p, g = int(sol_idx[n // G]), n % G
        texts[p].append(codec.decode(_strip_stop(toks, reason)))
        lengths[p, g] = _response_length(toks, reason)
        # Only a real cutoff (a budget below the global cap) may zero a reward: a budget equal to the cap
        # cuts nothing, so the outcome scores as it would before the switch-over.
        finish_budget[p, g] = reason == "budget" and decision.budgets[p] < cfg.max_response_length
    return SolutionPath(prompt_ids, texts, lengths, finish_budget, out), metrics


def score(problems: Sequence[Problem], meta: MetaPath, sol: SolutionPath, decision: Decision, verify: Callable,
          cfg: RolloutConfig) -> tuple[Scores, dict[str, float]]:
    """r_sol of every solution rollout (verifier workers), then the meta rewards of every rolled-out
    problem's meta rollouts (they need its solution statistics)."""
    P, M, G = len(problems), cfg.num_meta, cfg.num_solutions
    sol_idx = np.flatnonzero(decision.rolled_out)
    correct = np.zeros((P, G), bool)
    metrics: dict[str, float] = {}
    if len(sol_idx):
        t0 = time.perf_counter()
        ok, vmetrics = verify([t for p in sol_idx for t in sol.texts[p]],
                              [problems[p].answer for p in sol_idx for _ in range(G)])
        metrics["time/verify_s"] = time.perf_counter() - t0
        # Counts (timeouts, restarts, ...) under verify/. Times go under time/, which deterministic
        # comparisons leave out: the wall-clock is time/verify_s above, the workers' CPU seconds
        # time/verify_worker_cpu_s.
        for k, v in vmetrics.items():
            if "second" not in k:
                metrics[f"time/verify_{k}" if k.endswith("_s") else f"verify/{k}"] = float(v)
        ok = np.asarray(ok, bool).reshape(len(sol_idx), G)
        correct[sol_idx] = ok & ~sol.finish_budget[sol_idx]  # a cut-off rollout has no final answer: 0
    meta_rewards = None
    if cfg.use_meta:
        meta_rewards = {k: np.full((P, M), np.nan, np.float32) for k in (*meta_lib.component_names(), "total")}
        if len(sol_idx):
            r = meta_lib.self_alignment([meta.preds[p] for p in sol_idx], [problems[p].question for p in sol_idx],
                                        [sol.texts[p] for p in sol_idx], correct[sol_idx], sol.lengths[sol_idx],
                                        base=cfg.base, k=cfg.k, weights=cfg.weights)
            for k in meta_rewards:
                meta_rewards[k][sol_idx] = r[k]
    return Scores(correct, meta_rewards), metrics


def training_sequences(meta: MetaPath, sol: SolutionPath, scores: Scores, decision: Decision,
                       cfg: RolloutConfig) -> TrainingSequences:
    """The sequences that enter the policy loss, with their group advantages: the solution rollouts of the
    rolled-out problems, then their meta rollouts."""
    M, G = cfg.num_meta, cfg.num_solutions
    sol_idx = np.flatnonzero(decision.rolled_out)
    adv_fn = grpo.get_advantage_estimator(cfg.advantage)
    prompt, resp, lp, adv, kind, prob = [], [], [], [], [], []
    if len(sol_idx):
        a_sol = np.asarray(adv_fn(scores.correct.astype(np.float32)[sol_idx], eps=cfg.adv_eps))
        for n, (toks, lps) in enumerate(zip(sol.output.tokens, sol.output.logprobs)):
            p = int(sol_idx[n // G])
            prompt.append(sol.prompt_ids[p])
            resp.append(list(toks))
            lp.append(np.asarray(lps, np.float32))
            adv.append(a_sol[n // G, n % G])
            kind.append(0)
            prob.append(p)
        if cfg.use_meta:
            a_meta = np.asarray(adv_fn(scores.meta_rewards["total"][sol_idx], eps=cfg.adv_eps))
            for i, p in enumerate(sol_idx):
                for j in range(M):
                    n = int(p) * M + j
                    prompt.append(meta.prompt_ids[p])
                    resp.append(list(meta.output.tokens[n]))
                    lp.append(np.asarray(meta.output.logprobs[n], np.float32))
                    adv.append(a_meta[i, j])
                    kind.append(1)
                    prob.append(int(p))
    return TrainingSequences(prompt, resp, lp, np.asarray(adv, np.float32), np.asarray(kind, np.int32),
                             np.asarray(prob, np.int64))


def dynamic_sampling(roll: Callable[[Sequence[Problem], jax.Array], Rollouts],
                     next_problems: Callable[[], Sequence[Problem]], max_rounds: int, rng: jax.Array) -> Rollouts:
    """DAPO's dynamic sampling: rolls out batches (``roll(problems, key)``, up to `max_rounds` after the
    first) until as many solution groups with reward variance as the first batch had problems are kept.
    Sequences are kept per path (`dapo_filter`); the problems after the one that completes the batch are
    dropped, both paths."""
    problems = next_problems()
    ro = roll(problems, rng)
    target = len(problems)
    first_signal = solution_signal(ro)
    kept = dapo_filter(ro)
    rounds = 0
    while solution_signal(kept).sum() < target and rounds < max_rounds:
        rounds += 1
        kept = concat(kept, dapo_filter(roll(next_problems(), jax.random.fold_in(rng, rounds))))
    groups_before = np.cumsum(solution_signal(kept)) - solution_signal(kept)
    kept = select(kept, groups_before < target)
    kept.metrics.update({"dapo/rounds": float(rounds),
                         "dapo/kept_groups": float(solution_signal(kept).sum()),
                         "dapo/kept_meta_groups": float(meta_signal(kept).sum()),
                         "dapo/first_round_kept_fraction": float(first_signal.mean())})
    return kept


def run_rollouts(problems: Sequence[Problem], *, generate: GenerateFn, codec: TextCodec, verify: Callable,
                 cfg: RolloutConfig, efficient_active: bool, rng: jax.Array) -> Rollouts:
    """One step's rollouts, as the paper's Algorithm 1: meta path -> controls -> solution path -> rewards ->
    training sequences with group advantages.

    verify(responses: list[str], answers: list[str]) -> (bool ndarray, metrics dict).
    efficient_active: MASA-efficient after the switch-over: gating, cutoff budgets and hints are applied.
    """
    rng_meta, rng_sol = jax.random.split(rng)
    meta, metrics = meta_path(problems, generate, codec, cfg, rng_meta)
    decision = decide(meta, cfg, efficient_active)
    sol, sol_metrics = solution_path(problems, decision, generate, codec, cfg, rng_sol)
    scores, score_metrics = score(problems, meta, sol, decision, verify, cfg)
    metrics.update(sol_metrics)
    metrics.update(score_metrics)
    metrics.update(_rollout_metrics(problems, meta.preds, scores.meta_rewards, decision.controls, decision.applied,
                                    decision.rolled_out, scores.correct, sol.lengths, sol.finish_budget, cfg,
                                    sol.output, meta.output))
    return Rollouts(
        problems=list(problems), meta_prompt_ids=meta.prompt_ids, meta_texts=meta.texts, preds=meta.preds,
        meta_rewards=scores.meta_rewards, controls=decision.controls, rolled_out=decision.rolled_out,
        correct=scores.correct, lengths=sol.lengths, finish_budget=sol.finish_budget,
        sequences=training_sequences(meta, sol, scores, decision, cfg), metrics=metrics, solution_texts=sol.texts)


# ------------------------------------------------------------------ DAPO dynamic sampling helpers
#
# Dynamic sampling decides per path. Solution path: a rolled-out problem whose G rollouts are all right or
# all wrong has zero advantages, so its solution sequences are dropped, and only problems with reward
# variance count towards the batch's `problems_per_step` groups (a gated problem has no solution group:
# it never counts). Meta path: the meta group is judged by its own rewards. A problem that every
# solution rollout solved (or failed) is exactly where the meta path must learn K/K (0/K), so its meta
# sequences stay whenever its meta rewards vary; a meta group with equal rewards is dropped.


def _has_variance(rewards: np.ndarray) -> np.ndarray:
    """bool [P]: rows of a [P, n] reward array that are not all equal (nan rows: False)."""
    finite = np.isfinite(rewards).all(axis=1)
    spread = np.nanmax(rewards, axis=1, initial=-np.inf) - np.nanmin(rewards, axis=1, initial=np.inf)
    return finite & (spread > 0)


def solution_signal(ro: Rollouts) -> np.ndarray:
    """bool [P]: rolled-out problems whose solution group has reward variance (GRPO signal)."""
    return ro.rolled_out & _has_variance(ro.correct.astype(np.float32))


def meta_signal(ro: Rollouts) -> np.ndarray:
    """bool [P]: rolled-out problems whose meta group's total rewards vary (False without a meta path)."""
    if ro.meta_rewards is None:
        return np.zeros(len(ro.problems), bool)
    return ro.rolled_out & _has_variance(ro.meta_rewards["total"])


def dapo_filter(ro: Rollouts) -> Rollouts:
    """The training sequences with signal, per path, and the problems that still bring any."""
    seqs = ro.sequences
    keep_seq = np.where(seqs.kind == 0, solution_signal(ro)[seqs.problem], meta_signal(ro)[seqs.problem]) \
        if len(seqs) else np.zeros(0, bool)
    keep = np.zeros(len(ro.problems), bool)
    keep[seqs.problem[keep_seq]] = True
    return select(ro, keep, keep_seq)


# Every Rollouts field but these two has a leading problem dimension (lists, arrays, dicts of arrays,
# Controls, or None): derived, so a new per-problem field cannot be dropped by select / concat.
_NOT_PER_PROBLEM = ("sequences", "metrics")
_PER_PROBLEM = tuple(f.name for f in dataclasses.fields(Rollouts) if f.name not in _NOT_PER_PROBLEM)


def _take(x, idx: np.ndarray):
    if x is None:
        return None
    if isinstance(x, dict):
        return {k: v[idx] for k, v in x.items()}
    if isinstance(x, controls_lib.Controls):
        return controls_lib.Controls(*(_take(getattr(x, f.name), idx) for f in dataclasses.fields(x)))
    return x[idx] if isinstance(x, np.ndarray) else type(x)(x[i] for i in idx)


def _cat(x, y):
    if x is None:
        return None
    if isinstance(x, dict):
        return {k: np.concatenate([x[k], y[k]]) for k in x}
    if isinstance(x, controls_lib.Controls):
        return controls_lib.Controls(*(_cat(getattr(x, f.name), getattr(y, f.name)) for f in dataclasses.fields(x)))
    return np.concatenate([x, y]) if isinstance(x, np.ndarray) else type(x)(x) + type(x)(y)


def select(ro: Rollouts, keep: np.ndarray, keep_sequences: np.ndarray | None = None) -> Rollouts:
    """The rollouts of the problems where `keep` (bool [P]) is set, with their training sequences (only
    those where `keep_sequences`, bool [N], is set, when given)."""
    idx = np.flatnonzero(keep)
    renumber = -np.ones(len(ro.problems), np.int64)
    renumber[idx] = np.arange(len(idx))
    seq_keep = keep[ro.sequences.problem] if len(ro.sequences) else np.zeros(0, bool)
    if keep_sequences is not None:
        seq_keep = seq_keep & keep_sequences
    return dataclasses.replace(ro, **{f: _take(getattr(ro, f), idx) for f in _PER_PROBLEM},
                               sequences=ro.sequences.take(np.flatnonzero(seq_keep), renumber),
                               metrics=dict(ro.metrics))


def concat(a: Rollouts, b: Rollouts) -> Rollouts:
    """a's problems followed by b's; metrics are a's (the first round describes the sampling) with the
    generated-token counts summed."""
    metrics = dict(a.metrics)
    for key in ("tokens/solution", "tokens/meta"):
        metrics[key] = a.metrics.get(key, 0.0) + b.metrics.get(key, 0.0)
    return dataclasses.replace(a, **{f: _cat(getattr(a, f), getattr(b, f)) for f in _PER_PROBLEM},
                               sequences=a.sequences.concat(b.sequences, len(a.problems)), metrics=metrics)


def _rollout_metrics(problems, preds, meta_rewards, ctrl, applied, rolled_out, correct, lengths, finish_budget,
                     cfg: RolloutConfig, sol_out, meta_out) -> dict[str, float]:
    m: dict[str, float] = {}
    P = len(problems)
    rolled = rolled_out.astype(bool)
    if rolled.any():
        acc = correct[rolled].mean(axis=1)
        m["acc/solution"] = float(acc.mean())
        m["reward/solution_mean"] = m["acc/solution"]
        m["length/solution_mean"] = float(lengths[rolled].mean())
        m["groups/zero_variance_fraction"] = float(np.mean((acc == 0) | (acc == 1)))
    m["tokens/solution"] = float(sum(len(t) for t in sol_out.tokens)) if sol_out is not None else 0.0
    m["tokens/meta"] = float(sum(len(t) for t in meta_out.tokens)) if meta_out is not None else 0.0
    m["problems"] = float(P)
    if preds is not None:
        for name in ("total", *meta_lib.component_names()):
            vals = meta_rewards[name][rolled]
            if vals.size:
                m[f"reward/meta_{name}"] = float(np.nanmean(vals))
        # Predicted vs actual pass rate and length, per rolled-out problem.
        pm = ctrl.pred_pass_mean
        actual = correct.mean(axis=1)
        ok = rolled & np.isfinite(pm)
        if ok.any():
            m["calib/pass_rate_mae"] = float(np.abs(pm[ok] - actual[ok]).mean())
            m["calib/pass_rate_corr"] = stats.pearson(pm[ok], actual[ok])
        lm = ctrl.pred_length_mean
        n_correct = correct.sum(axis=1)
        true_len = np.where(n_correct > 0, (lengths * correct).sum(axis=1) / np.maximum(n_correct, 1), np.nan)
        okl = rolled & np.isfinite(lm) & np.isfinite(true_len)
        if okl.any():
            m["calib/length_mae"] = float(np.abs(lm[okl] - true_len[okl]).mean())
            m["calib/length_corr"] = stats.pearson(lm[okl], true_len[okl])
        m.update(controls_lib.control_metrics(ctrl, correct, lengths, finish_budget, cfg.max_response_length,
                                              applied))
    return m




# ------------------------------------------------------------------ sample generations for the logs


def sample_records(ro: Rollouts, n: int) -> list[dict]:
    """Up to `n` meta and `n` solution generations of one step, with their rewards, for the logs
    (`MetricsWriter.write_samples`). Sample i is rollout i // P of problem i % P, so a step shows one
    rollout of each of the first problems before a second of any; solution samples come from the
    rolled-out problems only (a gated problem has none)."""
    out: list[dict] = []
    P = len(ro.problems)
    if ro.meta_texts is not None and P:
        M = len(ro.meta_texts[0])
        for i in range(min(n, P * M)):
            p, j = i % P, i // P
            pred = ro.preds[p][j]
            out.append({"path": "meta", "uid": ro.problems[p].uid, "question": ro.problems[p].question,
                        "text": ro.meta_texts[p][j], "reward": float(ro.meta_rewards["total"][p, j]),
                        **{f"reward_{k}": float(ro.meta_rewards[k][p, j]) for k in meta_lib.component_names()},
                        "pred_pass_rate": pred.pass_rate, "pred_length": pred.length,
                        "pred_notions": list(pred.notions) if pred.notions is not None else None})
    rolled = np.flatnonzero(ro.rolled_out)
    if ro.solution_texts is not None and len(rolled):
        G = ro.correct.shape[1]
        for i in range(min(n, len(rolled) * G)):
            p, g = int(rolled[i % len(rolled)]), i // len(rolled)
            out.append({"path": "solution", "uid": ro.problems[p].uid, "question": ro.problems[p].question,
                        "answer": ro.problems[p].answer, "text": ro.solution_texts[p][g],
                        "reward": float(ro.correct[p, g]), "length": int(ro.lengths[p, g])})
    return out
