"""The jitted halves of the rollout engine: bucketed prefill into cache slots, and a decode loop.

A fixed number S of decode slots share one KV cache (`kv_cache.KVCache`). Every slot carries its own
decode state (`SlotState`): cache length (= position of the next token), token budget, done flag and
finish reason, request index and its output buffer. Both functions run entirely on device:

* `prefill` runs a right-padded [n, P] batch of prompts through the model, samples each prompt's first
  token and (re)initialises the state of slots `slots` (padding rows carry slot index S and are
  dropped); `kv_cache.insert` then writes the prompts' keys / values into those cache rows. One model
  executable per (n, P) bucket pair (plus a small scatter-only insert per cache length): prefilling
  into any slots never recompiles.
* `decode` is a `lax.while_loop` of decode steps over all S slots. It returns to the host only when
  (a) no slot is active, (b) at least `free_target` slots are free (the host has requests waiting), or
  (c) an active slot reached the end of the cache's current length bucket. A finished slot stops
  writing its cache and outputs at once; its compute is wasted only until the host refills it.

Finish codes: `RUNNING` 0, `EOS` 1 (the EOS token is the last generated token), `BUDGET` 2 (the
per-request budget, MASA's cutoff), `MAX_NEW_TOKENS` 3.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from masa_jax.models.qwen import model as qm
from masa_jax.models.qwen.config import ModelConfig
from masa_jax.sampling import kv_cache
from masa_jax.sampling.kv_cache import KVCache
from masa_jax.sampling.sampling_fns import SamplingMode, sample, token_uniforms

RUNNING, EOS, BUDGET, MAX_NEW_TOKENS = 0, 1, 2, 3
FINISH_NAMES = {EOS: "eos", BUDGET: "budget", MAX_NEW_TOKENS: "max_new_tokens"}


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """Static shape / mode of an engine; one value per compiled family of executables."""

    cfg: ModelConfig
    num_slots: int
    max_new_tokens: int      # T: length of every slot's output buffer
    mode: SamplingMode


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SlotState:
    """Per-slot decode state; all arrays are [S] unless noted."""

    lengths: jax.Array        # int32: valid cache entries = position of the token fed next
    last_token: jax.Array     # int32: most recently sampled token (fed at the next step)
    num_generated: jax.Array  # int32: tokens generated so far
    limit: jax.Array          # int32: max tokens this request may generate (its budget, capped)
    limit_reason: jax.Array   # int32: finish code when `limit` stops it (BUDGET or MAX_NEW_TOKENS)
    active: jax.Array         # bool: still decoding
    finish: jax.Array         # int32: finish code (RUNNING while active)
    request: jax.Array        # int32: request index (-1: never used)
    tokens: jax.Array         # int32 [S, T]: generated tokens
    logprobs: jax.Array       # float32 [S, T]: their log-probs


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Knobs:
    """Traced sampling inputs (changing them never recompiles)."""

    rng: jax.Array            # PRNG key; token t of request r uses fold_in(fold_in(rng, r), t)
    temperature: jax.Array    # float32 []
    top_p: jax.Array          # float32 []
    eos_ids: jax.Array        # int32 [E], padded with -1


@functools.partial(jax.jit, static_argnums=(0, 1))
def init_state(num_slots: int, max_new_tokens: int) -> SlotState:
    """All slots empty."""
    S, T = num_slots, max(1, max_new_tokens)
    z = lambda: jnp.zeros((S,), jnp.int32)  # distinct buffers: the state is donated field by field
    return SlotState(lengths=z(), last_token=z(), num_generated=z(), limit=z(), limit_reason=z(),
                     active=jnp.zeros((S,), bool), finish=z(), request=jnp.full((S,), -1, jnp.int32),
                     tokens=jnp.zeros((S, T), jnp.int32), logprobs=jnp.zeros((S, T), jnp.float32))


def _finish_codes(tok, num_generated, limit, limit_reason, eos_ids):
    is_eos = jnp.any(tok[:, None] == eos_ids[None, :], axis=-1)
    # EOS wins over the budget when both happen at the same token: the sequence did end.
    return jnp.where(is_eos, EOS, jnp.where(num_generated >= limit, limit_reason, RUNNING))


def _sample(spec: EngineSpec, logits, knobs: Knobs, requests, steps):
    u = None if spec.mode.greedy else token_uniforms(knobs.rng, requests, steps)
    return sample(logits, u, knobs.temperature, knobs.top_p, spec.mode)


# ------------------------------------------------------------------------------------------ prefill


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnames=("state",))
def prefill(spec: EngineSpec, params, state: SlotState, knobs: Knobs, tokens: jax.Array, prompt_lens: jax.Array,
            source: jax.Array, slots: jax.Array, requests: jax.Array, limits: jax.Array, limit_reasons: jax.Array
            ) -> tuple[tuple, SlotState]:
    """Runs u distinct prompts through the model once each, samples the first token of each of the n
    requests that share them and initialises their slots (prefix sharing: GRPO's G rollouts of a problem,
    MASA's M meta rollouts, have one prompt, so a refill runs its forward once, not G times).

    params: sampling params (`reshard.to_sampling_params`); tokens int32 [u, P] right-padded and
    prompt_lens int32 [u]: the distinct prompts; source int32 [n]: the prompt row of each request;
    slots, requests, limits (>= 1), limit_reasons: int32 [n]. A row with slot index S is padding (its
    state writes are dropped). Each request draws its own first token (its own key), from the same
    logits. Returns (kv, state) where kv is a tuple over layers of (k, v) [n, P, KV, hd] (each request's
    copy of its prompt's) for `kv_cache.insert`: keeping the cache out of this program makes its
    executables depend on (u, n, P) only, not on the cache's current length bucket.
    """
    cfg = spec.cfg
    u, P = tokens.shape
    n = source.shape[0]
    valid = jnp.arange(P)[None, :] < prompt_lens[:, None]
    rope = qm.rope_cos_sin(jnp.broadcast_to(jnp.arange(P), (u, P)), cfg.head_dim, cfg.rope_theta)
    seq_attend = qm.sequence_attention(cfg, valid)

    def attend(q, k, v):  # the training forward's attention, handing back the prompt's keys / values
        return seq_attend(q, k, v)[0], (k, v)

    x = qm.embed(cfg, params, tokens)
    kv = []
    for lp in params["layers"]:
        x, layer_kv = qm.decoder_layer(cfg, x, lp, rope, attend)
        kv.append(layer_kv)
    last = jnp.take_along_axis(x, (prompt_lens - 1)[:, None, None], axis=1)[:, 0]     # [u, D]
    h = qm.rms_norm(last, params["final_norm"].astype(cfg.jnp_dtype), cfg.rms_norm_eps)
    logits = qm.unembed(cfg, params, h)[source]                                          # [n, V] f32
    prompt_lens = prompt_lens[source]
    kv = [(k[source], v[source]) for k, v in kv]
    tok, lp = _sample(spec, logits, knobs, requests, jnp.zeros_like(requests))
    finish = _finish_codes(tok, jnp.ones_like(limits), limits, limit_reasons, knobs.eos_ids)

    put = lambda a, val: a.at[slots].set(val.astype(a.dtype), mode="drop")
    state = SlotState(
        lengths=put(state.lengths, prompt_lens), last_token=put(state.last_token, tok),
        num_generated=put(state.num_generated, jnp.ones_like(limits)), limit=put(state.limit, limits),
        limit_reason=put(state.limit_reason, limit_reasons), active=put(state.active, finish == RUNNING),
        finish=put(state.finish, finish), request=put(state.request, requests),
        tokens=state.tokens.at[slots, 0].set(tok, mode="drop"),
        logprobs=state.logprobs.at[slots, 0].set(lp, mode="drop"))
    return tuple(kv), state


# ------------------------------------------------------------------------------------------- decode


def rope_table(cfg: ModelConfig, length: int) -> tuple[jax.Array, jax.Array]:
    """cos / sin [length, hd] for positions 0..length-1 (the same float32 math as `rope_cos_sin`)."""
    return qm.rope_cos_sin(jnp.arange(length), cfg.head_dim, cfg.rope_theta)


def decode_logits(cfg: ModelConfig, params, cache: KVCache, tokens: jax.Array, positions: jax.Array,
                  write: jax.Array, table: tuple[jax.Array, jax.Array] | None = None) -> tuple[KVCache, jax.Array]:
    """One decode step for every slot: feeds tokens [S] at positions [S] (= their cache lengths), writes
    their keys / values where `write` [S] is set, and returns (cache, float32 logits [S, V]).

    `table` (from `rope_table(cfg, cache.length)`, built once outside the decode loop) turns RoPE into a
    row lookup; otherwise XLA fuses cos / sin into every layer's q and k and recomputes them each step.
    """
    C = cache.length
    write_pos = jnp.where(write, positions, C)          # out of range: the write is dropped
    x = qm.embed(cfg, params, tokens[:, None])          # [S, 1, D]
    if table is None:
        table = rope_table(cfg, C)
    pos = jnp.minimum(positions, C - 1)[:, None]        # finished slots may sit at C: any row will do
    cos, sin = jnp.take(table[0], pos, axis=0), jnp.take(table[1], pos, axis=0)    # [S, 1, hd]
    lengths = positions + 1                             # each slot sees its entries and the new token
    ks, vs = [], []
    for l, lp in enumerate(params["layers"]):
        attend = kv_cache.token_attention(cfg, cache, l, write_pos, lengths)
        x, (k, v) = qm.decoder_layer(cfg, x, lp, (cos, sin), attend)
        ks.append(k)
        vs.append(v)
    h = qm.rms_norm(x[:, 0], params["final_norm"].astype(cfg.jnp_dtype), cfg.rms_norm_eps)
    return KVCache(k=tuple(ks), v=tuple(vs), paged=cache.paged), qm.unembed(cfg, params, h)


def _decode_step(spec: EngineSpec, params, cache: KVCache, st: SlotState, knobs: Knobs, table=None):
    act = st.active
    cache, logits = decode_logits(spec.cfg, params, cache, st.last_token, st.lengths, act, table)
    tok, lp = _sample(spec, logits, knobs, st.request, st.num_generated)
    rows = jnp.arange(act.shape[0])
    out_idx = jnp.where(act, st.num_generated, st.tokens.shape[1])   # inactive rows: dropped
    n = st.num_generated + act
    finish = jnp.where(act, _finish_codes(tok, n, st.limit, st.limit_reason, knobs.eos_ids), st.finish)
    st = dataclasses.replace(
        st, lengths=st.lengths + act, last_token=jnp.where(act, tok, st.last_token), num_generated=n,
        active=act & (finish == RUNNING), finish=finish,
        tokens=st.tokens.at[rows, out_idx].set(tok, mode="drop"),
        logprobs=st.logprobs.at[rows, out_idx].set(lp, mode="drop"))
    return cache, st


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnames=("cache", "state"))
def decode(spec: EngineSpec, params, cache: KVCache, state: SlotState, knobs: Knobs,
           free_target: jax.Array) -> tuple[KVCache, SlotState, jax.Array]:
    """Decode steps until no slot is active, or >= free_target (int32 []) slots are free, or an active
    slot has filled the cache's current length. Returns (cache, state, number of steps run)."""
    C = cache.length
    table = rope_table(spec.cfg, C)   # loop-invariant

    def cond(carry):
        _, st, _ = carry
        n_free = jnp.sum(~st.active)
        room = jnp.all(~st.active | (st.lengths < C))
        return jnp.any(st.active) & (n_free < free_target) & room

    def body(carry):
        cache, st, steps = carry
        cache, st = _decode_step(spec, params, cache, st, knobs, table)
        return cache, st, steps + 1

    return jax.lax.while_loop(cond, body, (cache, state, jnp.zeros((), jnp.int32)))
