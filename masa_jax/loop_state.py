"""The loop's host-side state (checkpointed next to the train state) and MASA-efficient's switch-over."""
from __future__ import annotations

import dataclasses

import numpy as np

from masa_jax import config as config_lib
from masa_jax.rl import expert_buffer as expert_lib


@dataclasses.dataclass
class LoopState:
    """Host-side state that checkpoints carry next to the train state."""
    step: int = 0
    switched_at: int = -1                      # step of the MASA-efficient switch-over (-1: not yet)
    meta_reward_history: list = dataclasses.field(default_factory=list)
    buffer: expert_lib.ExpertBuffer | None = None
    train_time_s: float = 0.0                  # wall-clock of the RL steps so far (evaluations excluded)
    evals: list = dataclasses.field(default_factory=list)  # held-out evaluations: {"step", "train_time_s", ...}

    def to_json(self) -> dict:
        """Every field but the expert buffer (one per host: the checkpoint stores those apart)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "buffer"}

    @classmethod
    def from_json(cls, fields: dict, buffer: expert_lib.ExpertBuffer) -> LoopState:
        """`to_json`'s dict back; a field an older checkpoint lacks keeps its default."""
        names = {f.name for f in dataclasses.fields(cls)} - {"buffer"}
        return cls(buffer=buffer, **{k: v for k, v in fields.items() if k in names})


def efficient_active(config, loop: LoopState) -> bool:
    """MASA-efficient's switch-over: at step k, or earlier once the meta-reward moving average passes
    the configured threshold (when one is set)."""
    if not config_lib.features(config).efficient:
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
