"""Rewards: math answer verification (``math``: the verifier pool and ``verify_batch``; ``answers``:
answer extraction and equivalence), meta-prediction parsing and the self-alignment reward (``meta``),
and the rollout prompts / expert serialiser (``prompts``).

    from masa_jax.rewards import math as math_reward, meta, prompts
"""
from masa_jax.rewards import answers, math, meta, prompts

__all__ = ["answers", "math", "meta", "prompts"]
