"""One step's rollouts: meta path, MASA-efficient controls, solution path, rewards and advantages.

Host-side orchestration only: generation is an injected `generate(prompts, budgets, max_new_tokens, rng)`
callable (the jitted refill sampler in training, a scripted policy in tests), answers are checked by the
verifier's worker pool, and every reward is computed over whole `[P, G]` / `[P, M]` arrays.
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
from masa_jax.rewards import prompts
from masa_jax.rl import controls as controls_lib
from masa_jax.rl import grpo


class GenerateFn(Protocol):
    def __call__(self, prompts: list[list[int]], budgets: np.ndarray | None, max_new_tokens: int,
                 rng: jax.Array):  # -> object with .tokens, .logprobs, .finish_reasons
        ...


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    num_meta: int                   # M
    num_solutions: int              # G
    max_response_length: int
    meta_max_new_tokens: int
    use_meta: bool                  # masa / masa_efficient: run the meta path
    k: int = 8
    base: float = 0.01
    weights: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)
    min_solution_length: int = 128
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
    """Everything one step produced. P problems, M meta and G solution rollouts per problem.

    `train_*` are the flat sequences that enter the policy loss (solution rollouts of rolled-out
    problems, then meta rollouts of rolled-out problems): prompt ids, response ids, the sampler's
    per-token log-probs, the scalar advantage and the kind (0 = solution, 1 = meta).
    """
    problems: list[Problem]
    meta_prompt_ids: list[list[int]]
    meta_texts: list[list[str]] | None
    preds: list[list] | None
    meta_rewards: dict[str, np.ndarray] | None     # [P, M] each; nan rows for gated problems
    controls: controls_lib.Controls | None
    controls_applied: bool
    rolled_out: np.ndarray                          # bool [P]: got solution rollouts
    solution_texts: list[list[str]]                 # [P][G]; empty lists for gated problems
    correct: np.ndarray                             # bool [P, G] (False for gated)
    lengths: np.ndarray                             # int [P, G] response tokens without the stop token
    finish_budget: np.ndarray                       # bool [P, G]: stopped by the cutoff budget
    train_prompt_ids: list[list[int]]
    train_response_ids: list[list[int]]
    train_sampler_logprobs: list[np.ndarray]
    train_advantages: np.ndarray
    train_kind: np.ndarray
    train_problem: np.ndarray                       # int [N]: index of the sequence's problem
    metrics: dict[str, float]


def _response_length(tokens: Sequence[int], reason: str) -> int:
    return len(tokens) - 1 if reason == "eos" and tokens else len(tokens)


def _strip_stop(tokens: Sequence[int], reason: str) -> list[int]:
    return list(tokens[:-1]) if reason == "eos" and tokens else list(tokens)


def run_rollouts(problems: Sequence[Problem], *, generate: GenerateFn, codec: TextCodec, verify: Callable,
                 cfg: RolloutConfig, efficient_active: bool, rng: jax.Array) -> Rollouts:
    """Runs the meta path (if enabled), decides controls, runs the solution path, scores everything.

    verify(responses: list[str], answers: list[str]) -> (bool ndarray, metrics dict).
    efficient_active: MASA-efficient after the switch-over: gating, cutoff budgets and hints are applied.
    """
    P, M, G = len(problems), cfg.num_meta, cfg.num_solutions
    metrics: dict[str, float] = {}
    rng_meta, rng_sol = jax.random.split(rng)

    # ---- meta path
    meta_prompt_ids = [codec.encode_chat(prompts.meta_prompt(
        p.question, max_length=cfg.max_response_length, k=cfg.k, min_length=cfg.min_solution_length,
        template=cfg.meta_template or None)) for p in problems]
    meta_texts = preds = meta_out = None
    t0 = time.perf_counter()
    if cfg.use_meta:
        meta_out = generate([ids for ids in meta_prompt_ids for _ in range(M)], None, cfg.meta_max_new_tokens,
                            rng_meta)
        meta_texts = [[codec.decode(_strip_stop(meta_out.tokens[p * M + j], meta_out.finish_reasons[p * M + j]))
                       for j in range(M)] for p in range(P)]
        preds = [[meta_lib.parse(t, k=cfg.k) for t in row] for row in meta_texts]
        metrics["time/meta_rollout_s"] = time.perf_counter() - t0
        metrics["meta/parse_rate_pass"] = float(np.mean([[q.pass_rate is not None for q in r] for r in preds]))
        metrics["meta/parse_rate_length"] = float(np.mean([[q.length is not None for q in r] for r in preds]))
        metrics["meta/parse_rate_notion"] = float(np.mean([[q.notions is not None for q in r] for r in preds]))

    # ---- controls (applied after the switch-over; only evaluated before it, for the metrics)
    ctrl = None
    if cfg.use_meta:
        ctrl = controls_lib.compute_controls(
            preds, cfg.max_response_length, cfg.control, use_gating=cfg.gating, use_cutoff=cfg.cutoff,
            use_hints=cfg.hints and efficient_active)
    applied = bool(efficient_active and ctrl is not None)
    rolled_out = ~ctrl.gated if applied else np.ones(P, bool)
    budgets_per_problem = ctrl.budgets if applied else np.full(P, cfg.max_response_length)

    # ---- solution path
    sol_idx = np.flatnonzero(rolled_out)
    sol_prompt_ids = {int(p): codec.encode_chat(prompts.solution_prompt(
        problems[p].question, hint_notions=(ctrl.hints[p] if applied and ctrl.hints[p] else None),
        template=cfg.solution_template or None)) for p in sol_idx}
    t0 = time.perf_counter()
    solution_texts: list[list[str]] = [[] for _ in range(P)]
    correct = np.zeros((P, G), bool)
    lengths = np.zeros((P, G), np.int64)
    finish_budget = np.zeros((P, G), bool)
    sol_out = None
    if len(sol_idx):
        flat_prompts = [sol_prompt_ids[int(p)] for p in sol_idx for _ in range(G)]
        flat_budgets = np.repeat(budgets_per_problem[sol_idx], G)
        sol_out = generate(flat_prompts, flat_budgets if applied else None, cfg.max_response_length, rng_sol)
        metrics["time/solution_rollout_s"] = time.perf_counter() - t0
        texts, answers = [], []
        for n, (toks, reason) in enumerate(zip(sol_out.tokens, sol_out.finish_reasons)):
            p, g = int(sol_idx[n // G]), n % G
            text = codec.decode(_strip_stop(toks, reason))
            solution_texts[p].append(text)
            lengths[p, g] = _response_length(toks, reason)
            # Only a real cutoff (a budget below the global cap) may zero a reward: a budget equal to
            # the cap cuts nothing, so the outcome scores as it would before the switch-over.
            finish_budget[p, g] = reason == "budget" and budgets_per_problem[p] < cfg.max_response_length
            texts.append(text)
            answers.append(problems[p].answer)
        t0 = time.perf_counter()
        ok, vmetrics = verify(texts, answers)
        metrics["time/verify_s"] = time.perf_counter() - t0
        # Counts (timeouts, restarts, ...) only: the verifier's wall-clock is time/verify_s above.
        metrics.update({f"verify/{k}": float(v) for k, v in vmetrics.items() if "second" not in k})
        ok = np.asarray(ok, bool).reshape(len(sol_idx), G)
        correct[sol_idx] = ok & ~finish_budget[sol_idx]  # a cut-off rollout has no final answer: 0
    r_sol = correct.astype(np.float32)

    # ---- meta rewards (only where the problem was rolled out: they need its solution statistics)
    meta_rewards = None
    if cfg.use_meta:
        meta_rewards = {k: np.full((P, M), np.nan, np.float32) for k in ("length", "difficulty", "notion", "total")}
        if len(sol_idx):
            r = meta_lib.self_alignment([preds[p] for p in sol_idx], [problems[p].question for p in sol_idx],
                                        [solution_texts[p] for p in sol_idx], correct[sol_idx], lengths[sol_idx],
                                        base=cfg.base, k=cfg.k, weights=cfg.weights)
            for k in meta_rewards:
                meta_rewards[k][sol_idx] = r[k]

    # ---- advantages and the flat training sequences
    adv_fn = grpo.get_advantage_estimator(cfg.advantage)
    train_prompt, train_resp, train_lp, train_adv, train_kind, train_prob = [], [], [], [], [], []
    if len(sol_idx):
        a_sol = np.asarray(adv_fn(r_sol[sol_idx], eps=cfg.adv_eps))
        for n, (toks, lps) in enumerate(zip(sol_out.tokens, sol_out.logprobs)):
            p, g = int(sol_idx[n // G]), n % G
            train_prompt.append(sol_prompt_ids[p])
            train_resp.append(list(toks))
            train_lp.append(np.asarray(lps, np.float32))
            train_adv.append(a_sol[n // G, g])
            train_kind.append(0)
            train_prob.append(p)
        if cfg.use_meta:
            a_meta = np.asarray(adv_fn(meta_rewards["total"][sol_idx], eps=cfg.adv_eps))
            for i, p in enumerate(sol_idx):
                for j in range(M):
                    n = int(p) * M + j
                    train_prompt.append(meta_prompt_ids[p])
                    train_resp.append(list(meta_out.tokens[n]))
                    train_lp.append(np.asarray(meta_out.logprobs[n], np.float32))
                    train_adv.append(a_meta[i, j])
                    train_kind.append(1)
                    train_prob.append(int(p))

    metrics.update(_rollout_metrics(problems, preds, meta_rewards, ctrl, applied, rolled_out, correct, lengths,
                                    finish_budget, cfg, sol_out, meta_out))
    return Rollouts(
        problems=list(problems), meta_prompt_ids=meta_prompt_ids, meta_texts=meta_texts, preds=preds,
        meta_rewards=meta_rewards, controls=ctrl, controls_applied=applied, rolled_out=rolled_out,
        solution_texts=solution_texts, correct=correct, lengths=lengths, finish_budget=finish_budget,
        train_prompt_ids=train_prompt, train_response_ids=train_resp, train_sampler_logprobs=train_lp,
        train_advantages=np.asarray(train_adv, np.float32), train_kind=np.asarray(train_kind, np.int32),
        train_problem=np.asarray(train_prob, np.int64), metrics=metrics)


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
    keep_seq = np.where(ro.train_kind == 0, solution_signal(ro)[ro.train_problem],
                        meta_signal(ro)[ro.train_problem]) if len(ro.train_problem) else np.zeros(0, bool)
    keep = np.zeros(len(ro.problems), bool)
    keep[ro.train_problem[keep_seq]] = True
    return select(ro, keep, keep_seq)


def select(ro: Rollouts, keep: np.ndarray, keep_sequences: np.ndarray | None = None) -> Rollouts:
    """The rollouts of the problems where `keep` (bool [P]) is set, with their training sequences (only
    those where `keep_sequences`, bool [N], is set, when given)."""
    idx = np.flatnonzero(keep)
    remap = -np.ones(len(ro.problems), np.int64)
    remap[idx] = np.arange(len(idx))
    seq_keep = keep[ro.train_problem] if len(ro.train_problem) else np.zeros(0, bool)
    if keep_sequences is not None:
        seq_keep = seq_keep & keep_sequences
    seq = np.flatnonzero(seq_keep)
    pick = lambda xs: None if xs is None else [xs[i] for i in idx]
    ctrl = ro.controls
    if ctrl is not None:
        ctrl = controls_lib.Controls(ctrl.gated[idx], ctrl.budgets[idx], tuple(ctrl.hints[i] for i in idx),
                                     ctrl.pred_pass_mean[idx], ctrl.pred_length_mean[idx])
    return dataclasses.replace(
        ro, problems=pick(ro.problems), meta_prompt_ids=pick(ro.meta_prompt_ids), meta_texts=pick(ro.meta_texts),
        preds=pick(ro.preds), meta_rewards=None if ro.meta_rewards is None else
        {k: v[idx] for k, v in ro.meta_rewards.items()}, controls=ctrl, rolled_out=ro.rolled_out[idx],
        solution_texts=pick(ro.solution_texts), correct=ro.correct[idx], lengths=ro.lengths[idx],
        finish_budget=ro.finish_budget[idx], train_prompt_ids=[ro.train_prompt_ids[i] for i in seq],
        train_response_ids=[ro.train_response_ids[i] for i in seq],
        train_sampler_logprobs=[ro.train_sampler_logprobs[i] for i in seq],
        train_advantages=ro.train_advantages[seq], train_kind=ro.train_kind[seq],
        train_problem=remap[ro.train_problem[seq]], metrics=dict(ro.metrics))


def concat(a: Rollouts, b: Rollouts) -> Rollouts:
    """a's problems followed by b's; metrics are a's (the first round describes the sampling) with the
    generated-token counts summed."""
    cat_list = lambda x, y: None if x is None else list(x) + list(y)
    ctrl = a.controls
    if ctrl is not None:
        ctrl = controls_lib.Controls(*(np.concatenate([getattr(a.controls, f), getattr(b.controls, f)])
                                       if f != "hints" else a.controls.hints + b.controls.hints
                                       for f in ("gated", "budgets", "hints", "pred_pass_mean", "pred_length_mean")))
    metrics = dict(a.metrics)
    for key in ("tokens/solution", "tokens/meta"):
        metrics[key] = a.metrics.get(key, 0.0) + b.metrics.get(key, 0.0)
    return dataclasses.replace(
        a, problems=a.problems + b.problems, meta_prompt_ids=a.meta_prompt_ids + b.meta_prompt_ids,
        meta_texts=cat_list(a.meta_texts, b.meta_texts), preds=cat_list(a.preds, b.preds),
        meta_rewards=None if a.meta_rewards is None else
        {k: np.concatenate([a.meta_rewards[k], b.meta_rewards[k]]) for k in a.meta_rewards}, controls=ctrl,
        rolled_out=np.concatenate([a.rolled_out, b.rolled_out]), solution_texts=a.solution_texts + b.solution_texts,
        correct=np.concatenate([a.correct, b.correct]), lengths=np.concatenate([a.lengths, b.lengths]),
        finish_budget=np.concatenate([a.finish_budget, b.finish_budget]),
        train_prompt_ids=a.train_prompt_ids + b.train_prompt_ids,
        train_response_ids=a.train_response_ids + b.train_response_ids,
        train_sampler_logprobs=a.train_sampler_logprobs + b.train_sampler_logprobs,
        train_advantages=np.concatenate([a.train_advantages, b.train_advantages]),
        train_kind=np.concatenate([a.train_kind, b.train_kind]),
        train_problem=np.concatenate([a.train_problem, b.train_problem + len(a.problems)]), metrics=metrics)


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
        for name in ("total", "length", "difficulty", "notion"):
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


