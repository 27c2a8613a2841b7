"""Qwen3 / Qwen2 / Qwen2.5 in JAX: `qwen.forward`, `qwen.from_pretrained`, `qwen.save_pretrained`."""
from masa_jax.models.qwen.config import ModelConfig, UnsupportedConfigError
from masa_jax.models.qwen.logprobs import logprobs_from_hidden, token_logprobs
from masa_jax.models.qwen.model import (forward, hidden_states, init_params, param_logical_axes,
                                        param_shapes)
from masa_jax.models.qwen.checkpoint import CheckpointError, check_checkpoint, from_pretrained, save_pretrained
