"""Sampling and scoring evaluation problems: the one measurement the trainer's held-out evaluation,
`python -m masa_jax.evaluate` and the paper protocol share."""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import numpy as np

from masa_jax.data.problem import Problem
from masa_jax.rl import prompts
from masa_jax.rl.rollout_engine import GenerateFn


def sample_and_score(problems: Sequence[Problem], generate: GenerateFn, codec, verify: Callable, *,
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


def accuracy_by_level(accuracy: Sequence[float], levels: Sequence) -> dict[str, float]:
    """Held-out accuracy (mean of the per-problem accuracies) and, for problems with a difficulty level
    (toy world, MATH), per level: ``eval/accuracy``, ``eval/accuracy_level_<n>``."""
    acc = np.asarray(accuracy, np.float64)
    out = {"eval/accuracy": float(acc.mean())}
    for level in sorted({lv for lv in levels if lv is not None}):
        out[f"eval/accuracy_level_{level}"] = float(acc[[lv == level for lv in levels]].mean())
    return out
