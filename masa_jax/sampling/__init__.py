"""Rollout engine: `sampling.generate` (prefill + jitted decode loop over a KV cache, per-sequence
budgets, continuous batching by slot refill) and the training -> sampling params reshard."""
from masa_jax.sampling.engine import BUDGET, EOS, FINISH_NAMES, MAX_NEW_TOKENS, RUNNING, EngineSpec
from masa_jax.sampling.generate import GenerateOutput, GenerateStats, SamplerConfig, default_cache_buckets, generate
from masa_jax.sampling.reshard import is_sampling_params, measure_reshard, to_sampling_params
from masa_jax.sampling.sampling_fns import SamplingMode, make_mode, sample

__all__ = ["generate", "GenerateOutput", "GenerateStats", "SamplerConfig", "default_cache_buckets",
           "to_sampling_params", "measure_reshard", "is_sampling_params", "sample", "make_mode", "SamplingMode",
           "EngineSpec", "FINISH_NAMES", "RUNNING", "EOS", "BUDGET", "MAX_NEW_TOKENS"]
