"""Rewards: math answer verification (``math``), meta-prediction parsing and the self-alignment
reward (``meta``), and the rollout prompts / expert serialiser (``prompts``).

    from masa_jax.rewards import math as math_reward, meta, prompts
"""
from masa_jax.rewards import math, meta, prompts

__all__ = ["math", "meta", "prompts"]
