"""The policy update's input: one step's training sequences, flat (the host side of Tunix's
`TrainExample`). `Updater.policy_update` packs them into padded batches; the rollout builds them."""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class TrainingSequences:
    """N sequences: prompt and response token ids, the sampler's per-token log-probs of the response,
    the scalar group advantage, the kind (0 = solution rollout, 1 = meta rollout) and the index of the
    sequence's problem within its step (mini-batches keep a problem's sequences together)."""
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    sampler_logprobs: list[np.ndarray]
    advantages: np.ndarray  # float32 [N]
    kind: np.ndarray        # int32 [N]
    problem: np.ndarray     # int64 [N]

    def __len__(self) -> int:
        return len(self.response_ids)

    @classmethod
    def empty(cls) -> "TrainingSequences":
        return cls([], [], [], np.zeros(0, np.float32), np.zeros(0, np.int32), np.zeros(0, np.int64))

    def take(self, idx: Sequence[int] | np.ndarray, problem_map: np.ndarray | None = None) -> "TrainingSequences":
        """The sequences at `idx`, in that order; `problem_map[old problem] = new problem` renumbers."""
        idx = np.asarray(idx, np.int64)
        problem = self.problem[idx]
        return TrainingSequences([self.prompt_ids[i] for i in idx], [self.response_ids[i] for i in idx],
                                 [self.sampler_logprobs[i] for i in idx], self.advantages[idx], self.kind[idx],
                                 problem if problem_map is None else problem_map[problem])

    def concat(self, other: "TrainingSequences", problem_offset: int) -> "TrainingSequences":
        """self's sequences, then other's with their problem indices shifted by `problem_offset`."""
        return TrainingSequences(self.prompt_ids + other.prompt_ids, self.response_ids + other.response_ids,
                                 self.sampler_logprobs + other.sampler_logprobs,
                                 np.concatenate([self.advantages, other.advantages]),
                                 np.concatenate([self.kind, other.kind]),
                                 np.concatenate([self.problem, other.problem + problem_offset]))
