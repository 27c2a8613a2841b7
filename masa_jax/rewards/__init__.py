"""Rewards: math answer verification (``math``: the verifier pool and ``verify_batch``; ``answers``:
answer extraction and equivalence), meta-prediction parsing and the self-alignment reward (``meta``).
The prompts both paths are sampled with live next to the rollout (``masa_jax.rl.prompts``).

    from masa_jax.rewards import math as math_reward, meta
"""
from masa_jax.rewards import answers, math, meta

__all__ = ["answers", "math", "meta"]
