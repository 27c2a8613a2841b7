"""Per-token log-probs without the [B, T, V] logits tensor.

With Qwen's 152k vocabulary a 10k-token rollout has 1.5G logits per sequence: the full tensor never fits.
We scan over sequence chunks; each chunk's logits [B, C, V] exist only inside a rematerialised scan
body (when the whole batch's would exceed REMAT_LOGITS_BYTES), so neither the forward nor the backward
pass stores more than one chunk of them.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from masa_jax.models.qwen.config import ModelConfig
from masa_jax.models.qwen.model import Params, hidden_states, shared_prefix_hidden_states, unembed


# Float32 logits of a whole batch above this size are recomputed chunk by chunk in the backward rather than
# kept for it; below it (small vocabularies, short sequences) keeping them costs little memory and saves
# a matmul.
REMAT_LOGITS_BYTES = 64 << 20


def logprobs_from_hidden(cfg: ModelConfig, params: Params, hidden: jax.Array, targets: jax.Array, *,
                         temperature: float = 1.0, chunk_size: int = 256,
                         return_entropy: bool = False):
    """log p(targets[b, t] | hidden[b, t]) as float32 [B, T] (and the entropy [B, T] if asked).

    hidden [B, T, D] are final-normed states; logits are divided by `temperature` (the sampler's
    temperature, so the trainer scores tokens under the distribution they were sampled from, as verl).
    """
    B, T, D = hidden.shape
    C = min(chunk_size, T)
    n = -(-T // C)
    pad = n * C - T
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    h_chunks = hidden.reshape(B, n, C, D).swapaxes(0, 1)
    t_chunks = targets.reshape(B, n, C).swapaxes(0, 1)

    def chunk_logprobs(h, t):
        logits = unembed(cfg, params, h) / temperature
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        if return_entropy:
            p = jnp.exp(logits - lse[..., None])
            ent = lse - jnp.sum(p * logits, axis=-1)
        else:
            ent = jnp.zeros_like(lse)
        return picked - lse, ent

    if B * n * C * cfg.vocab_size * 4 > REMAT_LOGITS_BYTES:
        # The backward pass recomputes each chunk's logits instead of saving them all.
        chunk_logprobs = jax.checkpoint(chunk_logprobs)

    def body(_, xs):
        return None, chunk_logprobs(*xs)

    _, (lp, ent) = jax.lax.scan(body, None, (h_chunks, t_chunks))
    lp = lp.swapaxes(0, 1).reshape(B, n * C)[:, :T]
    if return_entropy:
        return lp, ent.swapaxes(0, 1).reshape(B, n * C)[:, :T]
    return lp


def token_logprobs(cfg: ModelConfig, params: Params, tokens: jax.Array, attention_mask: jax.Array | None = None,
                   *, temperature: float = 1.0, chunk_size: int = 256, return_entropy: bool = False):
    """float32 [B, T]: out[b, t] = log p(tokens[b, t] | tokens[b, :t]) for t >= 1, and 0 at t = 0.

    Aligned with `tokens`, so a loss mask over response tokens applies to the output directly.
    """
    h = hidden_states(cfg, params, tokens, attention_mask)
    out = logprobs_from_hidden(cfg, params, h[:, :-1], tokens[:, 1:], temperature=temperature,
                               chunk_size=chunk_size, return_entropy=return_entropy)
    pad0 = lambda x: jnp.pad(x, ((0, 0), (1, 0)))
    if return_entropy:
        return pad0(out[0]), pad0(out[1])
    return pad0(out)


def shared_prefix_logprobs(cfg: ModelConfig, params: Params, prefix_tokens: jax.Array, prefix_mask: jax.Array,
                           tokens: jax.Array, attention_mask: jax.Array, prefix_index: jax.Array, *,
                           temperature: float = 1.0, chunk_size: int = 256, return_entropy: bool = False):
    """`token_logprobs` of the responses of a shared-prefix batch (`model.shared_prefix_hidden_states`):
    float32 [Bk, n, S], out[b, j, s] = log p(tokens[b, j, s] | prompt, tokens[b, j, :s]) (and the entropy).

    The first response token is scored from its prompt's last hidden state, the others from the
    response's own, so every response token gets the log-prob the unshared row gives it.
    """
    hp, hs = shared_prefix_hidden_states(cfg, params, prefix_tokens, prefix_mask, tokens, attention_mask,
                                         prefix_index)
    Bk, n, S, D = hs.shape
    last = jnp.maximum(jnp.sum(prefix_mask, axis=-1, dtype=jnp.int32) - 1, 0)         # [Bk, u]
    prefix_last = jnp.take_along_axis(hp, last[:, :, None, None], axis=2)[:, :, 0]      # [Bk, u, D]
    own_last = jnp.take_along_axis(prefix_last, prefix_index[..., None], axis=1)        # [Bk, n, D]
    h = jnp.concatenate([own_last[:, :, None], hs[:, :, :-1]], axis=2).reshape(Bk * n, S, D)
    out = logprobs_from_hidden(cfg, params, h, tokens.reshape(Bk * n, S), temperature=temperature,
                               chunk_size=chunk_size, return_entropy=return_entropy)
    shape = lambda x: x.reshape(Bk, n, S)
    return (shape(out[0]), shape(out[1])) if return_entropy else shape(out)
