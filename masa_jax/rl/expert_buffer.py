"""Expert meta-trajectories for MASA's behaviour cloning (docs/method.md §4).

After each RL step, for every rolled-out problem the meta rollout with the highest notion reward is kept
if that reward is high enough; its JSON is rewritten with the step's *true* pass rate and solution
length, and (meta prompt, rewritten output) goes into the buffer. When the buffer holds `capacity`
trajectories the trainer runs the BC steps and empties it.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import numpy as np

from masa_jax.rl import prompts

_META_BLOCK = re.compile(r"<meta>(.*?)</meta>", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class Expert:
    """One behaviour-cloning target: the meta prompt's token ids and the rewritten output text."""
    prompt_ids: tuple[int, ...]
    output: str
    uid: str


def meta_reasoning(text: str) -> str:
    """The last `<meta>...</meta>` reasoning of a meta output ('' when there is none)."""
    blocks = _META_BLOCK.findall(text)
    return blocks[-1].strip() if blocks else ""


def true_targets(correct: np.ndarray, lengths: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(pass_rate int [P] in 0..k, solution_length int [P]) that the step's solution rollouts showed.

    correct bool [P, G], lengths int [P, G]. Pass rate: round(n_correct / G * k), halves rounded up,
    and kept inside 1..k-1 unless the group is all wrong / all right: a mixed group (the one with GRPO
    signal) must never teach 0 or k, the values the gate skips. Length: mean over correct rollouts,
    or over all rollouts when none is correct.
    """
    correct = correct.astype(bool)
    n_correct = correct.sum(axis=1)
    group = correct.shape[1]
    pass_int = (2 * n_correct * k + group) // (2 * group)  # exact integer round-half-up
    mixed = (n_correct > 0) & (n_correct < group)
    pass_int = np.where(mixed, np.clip(pass_int, 1, k - 1), pass_int).astype(np.int64)
    mean_correct = np.where(n_correct > 0, (lengths * correct).sum(axis=1) / np.maximum(n_correct, 1), 0.0)
    mean_all = lengths.mean(axis=1)
    length = np.where(n_correct > 0, mean_correct, mean_all)
    return pass_int, np.maximum(np.rint(length), 1).astype(np.int64)


def select_experts(meta_texts: Sequence[Sequence[str]], preds: Sequence[Sequence], notion_reward: np.ndarray,
                   correct: np.ndarray, lengths: np.ndarray, prompt_ids: Sequence[Sequence[int]],
                   uids: Sequence[str], rolled_out: np.ndarray, *, k: int,
                   min_notion_reward: float) -> list[Expert]:
    """Expert trajectories of one step.

    meta_texts / preds: [P][M]; notion_reward float [P, M]; correct bool [P, G]; lengths int [P, G];
    prompt_ids: P meta-prompt token lists; rolled_out bool [P] (gated problems have no solution
    statistics and yield no expert); a problem's best meta output becomes an expert only when its notion
    reward reaches `min_notion_reward` (config `bc.min_notion_reward`).
    """
    pass_int, true_len = true_targets(correct, lengths, k)
    experts = []
    for p in range(len(meta_texts)):
        if not rolled_out[p]:
            continue
        j = int(np.argmax(notion_reward[p]))
        if notion_reward[p, j] < min_notion_reward:
            continue
        notions = preds[p][j].notions or ()
        output = prompts.serialize_expert_meta(meta_reasoning(meta_texts[p][j]), list(notions),
                                               int(pass_int[p]), int(true_len[p]))
        experts.append(Expert(tuple(int(t) for t in prompt_ids[p]), output, uids[p]))
    return experts


@dataclasses.dataclass
class ExpertBuffer:
    """FIFO of expert trajectories; `full` once it holds `capacity`. JSON round-trips for checkpoints."""
    capacity: int
    items: list[Expert] = dataclasses.field(default_factory=list)

    def add(self, experts: Sequence[Expert]) -> None:
        self.items.extend(experts)

    @property
    def full(self) -> bool:
        return len(self.items) >= self.capacity

    def drain(self) -> list[Expert]:
        """All trajectories, emptying the buffer (stale trajectories are evicted after BC)."""
        items, self.items = self.items, []
        return items

    def to_json(self) -> dict:
        return {"capacity": self.capacity,
                "items": [{"prompt_ids": list(e.prompt_ids), "output": e.output, "uid": e.uid} for e in self.items]}

    @classmethod
    def from_json(cls, d: dict) -> "ExpertBuffer":
        return cls(int(d["capacity"]), [Expert(tuple(e["prompt_ids"]), e["output"], e["uid"]) for e in d["items"]])
