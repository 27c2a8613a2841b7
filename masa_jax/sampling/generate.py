"""`sampling.generate`: the host side of the rollout engine (queue, slots, refill, buckets).

The host never runs per token. It loops over *chunks*:

1. refill: take waiting requests for the free slots, group them by prompt-length bucket, run one
   jitted `engine.prefill` per group and write the prompts' keys / values into the slot rows of the
   shared cache (`kv_cache.insert`);
2. decode: one jitted `engine.decode` call, a device-side while loop that returns when enough slots
   have finished to be worth a refill (`refill_fraction` of the slots, or all that the queue can fill),
   when no slot is active, or when the cache's length bucket is full;
3. harvest: copy out the finished slots' tokens / log-probs, then resize the cache to the bucket the
   remaining slots need, and go back to 1.

With `refill=False` (static batches) step 1 only runs when every slot is empty, so a batch runs until
its longest member ends: the behaviour of samplers that share one step counter.

The loop is `_Rollout.run` (steps: `_refill`, `_decode_round`, `_harvest`). The knobs can be passed as
one validated `SamplerConfig` (`generate(..., sampler=...)`) instead of keywords.

Compiled shapes. For fixed (model config, num_slots, max_new_tokens, sampling mode, number of EOS ids
rounded up to 4) a run compiles at most:
  * decode: one executable per cache-length bucket reached (`cache_buckets`, default 64, 96, ..., 256
    in steps of 32, then two per octave: 384, 512, 768, 1024, ..., capped at max_cache_len);
  * prefill: one per (distinct prompts u, rows n, prompt bucket P) reached, P a power of two >= 16
    (capped at max_cache_len), u <= n each a power of four or nmax = min(num_slots, max_prefill_tokens
    / P) (rounded to powers of two). Requests with equal prompts (a GRPO group) share one forward row;
  * small scatter / pad programs (fast to compile): insert, one per (n, P, cache bucket) reached, and
    resize, one per (from, to) pair of cache buckets the run moves between;
and jax's cache reuses them across calls with the same static values. Pass `max_cache_len` and
`num_slots` explicitly to keep them fixed across calls. `GenerateOutput.stats.shapes` lists the
executables a call used. Example: 256 slots, prompts <= 32 tokens, budgets <= 1024 (cache <= 1056)
compile at most 12 decode + 15 prefill (u <= n among 1, 4, 16, 64, 256) model executables; in a
GRPO step u / n is about 1 / G, so few pairs occur (a refill of 256 slots with G = 16 is u = 16, n = 256).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from masa_jax.models.qwen.config import ModelConfig
from masa_jax.sampling import engine, kv_cache
from masa_jax.sampling.engine import BUDGET, FINISH_NAMES, MAX_NEW_TOKENS, RUNNING, EngineSpec, Knobs
from masa_jax.sampling.reshard import is_sampling_params, to_sampling_params
from masa_jax.sampling.sampling_fns import make_mode


@dataclasses.dataclass
class GenerateStats:
    """What a `generate` call did (for benchmarks and logs)."""

    num_slots: int = 0
    decode_calls: int = 0
    decode_steps: int = 0       # while-loop iterations; each advances every slot by one token
    prefill_calls: int = 0
    prefill_rows: int = 0       # prompt rows the prefill forwards ran (equal prompts share one row)
    resizes: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0        # whole call, compiles included
    prefill_seconds: float = 0.0   # host wall time of prefill + insert calls and their harvest (synced)
    decode_seconds: float = 0.0    # host wall time of decode calls and their harvest (synced)
    # executables used: ("decode", C), ("prefill", u, n, P), ("insert", n, P, C), ("resize", C_from, C_to)
    shapes: set = dataclasses.field(default_factory=set)

    @property
    def slot_utilization(self) -> float:
        """Fraction of decode slot-steps that produced a kept token (first tokens come from prefill)."""
        return self.generated_tokens / max(1, self.decode_steps * self.num_slots)


@dataclasses.dataclass
class GenerateOutput:
    """Per prompt, in input order: generated tokens (including the EOS token when the finish reason is
    "eos"), float32 log-probs of those tokens (see `generate`), and the finish reason."""

    tokens: list[list[int]]
    logprobs: list[np.ndarray]
    finish_reasons: list[str]
    stats: GenerateStats


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """The engine and sampling knobs of `generate` (see its docstring for each), validated once here.
    Pass as `generate(..., sampler=SamplerConfig(...))` instead of the individual keywords."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    eos_ids: Sequence[int] | int = ()            # stored as a sorted tuple of distinct ids
    num_slots: int | None = None
    refill: bool = True
    refill_fraction: float = 0.125
    max_cache_len: int | None = None
    cache_buckets: Sequence[int] | None = None   # stored as tuples
    prompt_buckets: Sequence[int] | None = None
    max_prefill_tokens: int = 8192
    schedule: str = "longest_first"
    cache_dtype: object = None
    share_prompts: bool = True                   # equal prompts in a refill share one prefill row

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen: normalise in place)
        set_("temperature", float(self.temperature))
        set_("top_p", float(self.top_p))
        set_("top_k", int(self.top_k))
        eos = [self.eos_ids] if isinstance(self.eos_ids, (int, np.integer)) else self.eos_ids
        set_("eos_ids", tuple(sorted({int(e) for e in eos})))
        for k in ("cache_buckets", "prompt_buckets"):
            if getattr(self, k) is not None:
                set_(k, tuple(getattr(self, k)))
        # Checks the vocab-independent settings; `generate` rebuilds the mode with the model's vocab.
        make_mode(self.temperature, self.top_p, self.top_k, vocab_size=1 << 62)
        if self.schedule not in ("longest_first", "fifo"):
            raise ValueError(f"schedule must be 'longest_first' or 'fifo', got {self.schedule!r}")
        if not 0.0 < self.refill_fraction <= 1.0:
            raise ValueError(f"refill_fraction must be in (0, 1], got {self.refill_fraction}")


def _resolve_sampler(sampler: SamplerConfig | None, knobs: dict) -> SamplerConfig:
    """`sampler`, or a SamplerConfig from `generate`'s individual keywords; not both."""
    loose = SamplerConfig(**knobs)
    if sampler is None:
        return loose
    if loose != SamplerConfig():
        changed = sorted(f.name for f in dataclasses.fields(SamplerConfig)
                         if getattr(loose, f.name) != getattr(SamplerConfig(), f.name))
        raise TypeError(f"generate got sampler= and the sampler keywords {changed}: pass one or the other")
    return sampler


# ------------------------------------------------------------------------------------------ buckets


def default_cache_buckets(max_len: int) -> tuple[int, ...]:
    """Cache lengths the decode loop compiles for: every multiple of 32 from 64 to 256 (short rollouts,
    where attention is a large share of a step), then two per octave (384, 512, 768, 1024, 1536, ...);
    the last one is replaced by max_len. Attention reads at most 1.5x the longest active sequence."""
    out, p = list(range(64, 257, 32)), 256
    while out[-1] < max_len:
        out += [p + p // 2, 2 * p]
        p *= 2
    return tuple(b for b in out if b < max_len) + (max_len,)


def _pick(buckets: Sequence[int], need: int) -> int:
    for b in buckets:
        if b >= need:
            return b
    raise ValueError(f"no bucket holds {need} (largest {buckets[-1]})")


def _prompt_bucket(n: int, max_len: int, buckets: Sequence[int] | None) -> int:
    if buckets is not None:
        return min(_pick(tuple(sorted(buckets)) + (max_len,), n), max_len)
    return min(max(16, 1 << (n - 1).bit_length()), max_len)


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _prefill_rows(k: int, nmax: int) -> int:
    """Rows of a prefill call for k prompts (k <= nmax): the next power of four, or nmax. Powers of four
    halve the number of prefill executables against powers of two, padding at most 4x rows."""
    n = 1
    while n < k:
        n *= 4
    return min(n, nmax)


# ------------------------------------------------------------------------------------------ generate


def _validate(cfg: ModelConfig, prompts, budgets, max_new_tokens):
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if budgets is not None and len(budgets) != len(prompts):
        raise ValueError(f"budgets has {len(budgets)} entries for {len(prompts)} prompts")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: the model needs at least one token to condition on "
                             "(prepend a BOS / chat-template token)")
        lo, hi = min(p), max(p)
        if lo < 0 or hi >= cfg.vocab_size:
            raise ValueError(f"prompt {i} has token ids outside [0, {cfg.vocab_size})")
    for i, b in enumerate(budgets or ()):
        if b is not None and (int(b) != b or b < 0):
            raise ValueError(f"budget {i} must be None or an int >= 0, got {b!r}")


def _limits(n: int, budgets, max_new_tokens: int):
    """Per request: tokens it may generate and the finish code when that stops it. Only a budget below
    max_new_tokens is the request's own cutoff ("budget"): a budget equal to the global cap cuts
    nothing, so the rollout stops for the same reason ("max_new_tokens") as one without a budget."""
    limits = np.full(n, max_new_tokens, np.int64)
    reasons = np.full(n, MAX_NEW_TOKENS, np.int64)
    for i, b in enumerate(budgets or ()):
        if b is not None and b < max_new_tokens:
            limits[i], reasons[i] = int(b), BUDGET
    return limits, reasons


def _prefill_batches(members, P: int, nmax: int, S: int, prompts, limits, reasons, share: bool = True):
    """Yields, per chunk of at most nmax (request, slot) pairs: the chunk's distinct prompts as right-padded
    int32 tokens [u, P] with their lengths int32 [u], and int32 [5, n] row metadata (prompt row, slot,
    request, limit, limit reason), u and n = `_prefill_rows` of the counts; padding rows point at slot S,
    so every write they make is dropped."""
    for c0 in range(0, len(members), nmax):
        chunk = members[c0:c0 + nmax]
        rows: dict[tuple, int] = {}  # prompt -> its row: requests with equal prompts share one forward
        for r, _ in chunk:
            rows.setdefault(tuple(prompts[r]) if share else r, len(rows))
        u, n = _prefill_rows(len(rows), nmax), _prefill_rows(len(chunk), nmax)
        toks = np.zeros((u, P), np.int32)
        lens = np.ones(u, np.int32)
        for key, row in rows.items():
            prompt = key if share else prompts[key]
            toks[row, :len(prompt)] = prompt
            lens[row] = len(prompt)
        meta = np.zeros((5, n), np.int32)
        meta[:, len(chunk):] = np.array([[0], [S], [0], [1], [MAX_NEW_TOKENS]])
        for j, (r, s) in enumerate(chunk):
            meta[:, j] = (rows[tuple(prompts[r]) if share else r], s, r, limits[r], reasons[r])
        yield toks, lens, meta


def _fetch(*arrays):
    # np.array copies: the device buffers are donated to the next call.
    return tuple(np.array(a) for a in jax.device_get(arrays))


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Per-request limits and the call's cache geometry, fixed before any device work."""

    limits: np.ndarray          # int64 [N]: tokens each request may generate
    reasons: np.ndarray         # int64 [N]: finish code when its limit stops it
    plen: np.ndarray            # int64 [N]: prompt lengths
    max_cache_len: int
    buckets: tuple[int, ...]    # cache-length buckets, ascending, ending at max_cache_len
    todo: list                  # requests with something to generate, in admission order


def _plan(cfg: ModelConfig, prompts, budgets, max_new_tokens, sc: SamplerConfig) -> _Plan:
    _validate(cfg, prompts, budgets, max_new_tokens)
    N = len(prompts)
    limits, reasons = _limits(N, budgets, int(max_new_tokens))
    plen = np.array([len(p) for p in prompts], np.int64)
    need = plen + np.maximum(limits - 1, 0)                 # cache entries each request fills
    max_cache_len = sc.max_cache_len
    if max_cache_len is None:
        # Rounded up to a standard bucket so that calls with similar lengths share executables.
        max_cache_len = _pick(default_cache_buckets(1 << 40), int(need.max()) if N else 1)
    for i in range(N):
        if need[i] > max_cache_len:
            raise ValueError(f"prompt {i} has {plen[i]} tokens and may generate {limits[i]}: it needs "
                             f"{need[i]} cache positions > max_cache_len={max_cache_len}")
    buckets = tuple(sorted(b for b in (sc.cache_buckets or default_cache_buckets(max_cache_len))
                           if b < max_cache_len)) + (max_cache_len,)
    todo = [i for i in range(N) if limits[i] > 0]
    if sc.schedule == "longest_first":
        todo.sort(key=lambda i: -limits[i])
    return _Plan(limits, reasons, plen, max_cache_len, buckets, todo)


def _knobs(sc: SamplerConfig, rng, mode) -> Knobs:
    if isinstance(rng, (int, np.integer)):
        rng = jax.random.key(int(rng))
    if rng is None:
        if not mode.greedy:
            raise ValueError("sampling (temperature > 0) needs an rng key")
        rng = jax.random.key(0)
    # Padded to a multiple of 4 so that the EOS count rarely changes the compiled shapes.
    eos_arr = np.full(max(4, -(-len(sc.eos_ids) // 4) * 4), -1, np.int32)
    eos_arr[:len(sc.eos_ids)] = sc.eos_ids
    return Knobs(rng=rng, temperature=jnp.float32(sc.temperature if sc.temperature > 0 else 1.0),
                 top_p=jnp.float32(sc.top_p), eos_ids=jnp.asarray(eos_arr))


class _Rollout:
    """Host state of one `generate` call (queue, slot table, cache, device slot state) and the chunk
    loop of the module doc: refill, decode round, harvest."""

    def __init__(self, spec: EngineSpec, sp, knobs: Knobs, sc: SamplerConfig, plan: _Plan, prompts,
                 out: GenerateOutput, cache_dtype, on_done: Callable[[int], None] | None = None):
        S = spec.num_slots
        self.on_done = on_done
        self.spec, self.sp, self.knobs, self.sc, self.plan, self.prompts = spec, sp, knobs, sc, plan, prompts
        self.out, self.stats, self.cache_dtype = out, out.stats, cache_dtype
        self.state = engine.init_state(S, spec.max_new_tokens)
        self.cache = None
        self.queue = collections.deque(plan.todo)
        self.slot_req = np.full(S, -1, np.int64)     # request held by each slot until harvested
        self.lengths = np.zeros(S, np.int64)
        self.active = np.zeros(S, bool)
        self.threshold = max(1, int(S * sc.refill_fraction))

    def run(self) -> None:
        S = self.spec.num_slots
        while self.queue or (self.slot_req >= 0).any():
            free = np.nonzero(self.slot_req < 0)[0]
            if self.queue and len(free) and (self.sc.refill or len(free) == S):
                self._refill(free)      # loops back: refills slots whose first token ended them
            elif self.active.any():
                self._decode_round()
        self.cache = None               # free the cache before leaving the mesh context

    def _resize(self, length: int) -> None:
        if self.cache is None:
            self.cache = kv_cache.init_cache(self.spec.cfg, self.spec.num_slots, length, self.cache_dtype)
        elif self.cache.length != length:
            self.stats.resizes += 1
            self.stats.shapes.add(("resize", self.cache.length, length))
            self.cache = kv_cache.resize(self.cache, length=length)

    def _refill(self, free: np.ndarray) -> None:
        """Admits queued requests into free slots, prefills them by prompt bucket, inserts their keys /
        values into the cache, then harvests (a first token can end a request)."""
        take = [self.queue.popleft() for _ in range(min(len(free), len(self.queue)))]
        slots = free[:len(take)]
        self.slot_req[slots] = take
        groups: dict = collections.defaultdict(list)
        for r, s in zip(take, slots):
            P = _prompt_bucket(int(self.plan.plen[r]), self.plan.max_cache_len, self.sc.prompt_buckets)
            groups[P].append((r, s))
        # The cache must hold the new prompts and the next token of every running slot.
        need_len = max([max(groups)] + [int(self.lengths[s]) + 1 for s in np.nonzero(self.active)[0]])
        if self.cache is None or self.cache.length < need_len:
            self._resize(_pick(self.plan.buckets, need_len))
        t0 = time.perf_counter()
        for P, members in sorted(groups.items()):
            self._prefill_group(P, members)
        self.active = self._harvest()
        self.stats.prefill_seconds += time.perf_counter() - t0

    def _prefill_group(self, P: int, members) -> None:
        S = self.spec.num_slots
        # Rows per call: a power of two, at most the slots and max_prefill_tokens / P.
        nmax = max(1, min(_pow2_ceil(S), 1 << int(math.log2(max(1, self.sc.max_prefill_tokens // P)))))
        for toks, lens, meta in _prefill_batches(members, P, nmax, S, self.prompts, self.plan.limits,
                                                 self.plan.reasons, share=self.sc.share_prompts):
            kv, self.state = engine.prefill(self.spec, self.sp, self.state, self.knobs, toks, lens, *meta)
            self.cache = kv_cache.insert(self.cache, kv, meta[1])
            del kv
            self.stats.prefill_calls += 1
            self.stats.prefill_rows += len(toks)
            self.stats.shapes.add(("prefill", len(toks), meta.shape[1], P))
            self.stats.shapes.add(("insert", meta.shape[1], P, self.cache.length))

    def _decode_round(self) -> None:
        """One device-side decode loop, on a cache resized to the bucket the active slots need (shrunk
        only when it would halve: resizes copy the cache)."""
        target = _pick(self.plan.buckets, int(self.lengths[self.active].max()) + 1)
        if target > self.cache.length or target <= self.cache.length // 2:
            self._resize(target)
        # Return once enough slots are free to refill from the queue; S + 1 = never (nothing to admit).
        if self.sc.refill and self.queue:
            free_target = int((~self.active).sum()) + min(self.threshold, len(self.queue))
        else:
            free_target = self.spec.num_slots + 1
        t0 = time.perf_counter()
        self.cache, self.state, steps = engine.decode(self.spec, self.sp, self.cache, self.state, self.knobs,
                                                      jnp.int32(free_target))
        self.stats.decode_calls += 1
        self.stats.decode_steps += int(steps)
        self.stats.shapes.add(("decode", self.cache.length))
        self.active = self._harvest()
        self.stats.decode_seconds += time.perf_counter() - t0

    def _harvest(self) -> np.ndarray:
        """Copies out finished slots' outputs and frees them; returns the active mask."""
        st = self.state
        act, fin, ngen, lens = _fetch(st.active, st.finish, st.num_generated, st.lengths)
        done = np.nonzero((self.slot_req >= 0) & (fin != RUNNING))[0]
        if len(done):
            toks, lps = _fetch(st.tokens, st.logprobs)
            for s in done:
                r, n = self.slot_req[s], int(ngen[s])
                self.out.tokens[r] = toks[s, :n].tolist()
                self.out.logprobs[r] = lps[s, :n].astype(np.float32)
                self.out.finish_reasons[r] = FINISH_NAMES[int(fin[s])]
                self.stats.generated_tokens += n
                self.slot_req[s] = -1
            if self.on_done is not None:
                self.on_done(len(done))
        self.lengths[:] = lens
        return act


def generate(model_cfg: ModelConfig, params, prompts: Sequence[Sequence[int]], *, rng, max_new_tokens: int,
             budgets: Sequence[int | None] | None = None, temperature: float = 1.0, top_p: float = 1.0,
             top_k: int = 0, eos_ids: Sequence[int] | int = (), num_slots: int | None = None,
             refill: bool = True, refill_fraction: float = 0.125, max_cache_len: int | None = None,
             cache_buckets: Sequence[int] | None = None, prompt_buckets: Sequence[int] | None = None,
             max_prefill_tokens: int = 8192, schedule: str = "longest_first",
             mesh: jax.sharding.Mesh | None = None, cache_dtype=None,
             sampler: SamplerConfig | None = None, on_done: Callable[[int], None] | None = None) -> GenerateOutput:
    """Samples continuations of `prompts` with a slot-refilling KV-cache engine.

    Args:
      model_cfg, params: the model; params stacked (training layout, converted here, a copy) or already
        converted with `sampling.to_sampling_params` (do that once per RL step: it is the reshard).
      prompts: token ids, any lengths >= 1.
      rng: PRNG key. Token t of prompt i is drawn with fold_in(fold_in(rng, i), t), so outputs do not
        depend on num_slots, refill, schedule or the other prompts.
      max_new_tokens: global cap on generated tokens. budgets: optional per-prompt caps (MASA's cutoff,
        e.g. ceil(2 x predicted length)); None entries mean max_new_tokens.
      temperature: 0.0 = greedy (argmax). top_p in (0, 1], top_k >= 0 (0 = off), applied after temperature,
        top-k first, as `transformers`.
      eos_ids: stop tokens; a sequence that samples one stops and keeps it as its last token.
      num_slots: decode slots (default min(256, next power of two >= #prompts)).
      refill: continuous batching (default); False runs static batches of num_slots prompts.
      refill_fraction: return to the host to refill once this fraction of slots is free.
      max_cache_len: cache positions per slot; a prompt needs len(prompt) + budget - 1 of them (default:
        the largest need of this call, rounded up to a cache bucket).
      cache_buckets / prompt_buckets: override the length buckets (see the module doc).
      max_prefill_tokens: rows x bucket length of one prefill call (bounds its activation memory).
      schedule: "longest_first" (admit the largest budgets first: shortens the tail) or "fifo".
      mesh: run under this mesh with params in the sampling layout (tensor-parallel, slots over data).
      cache_dtype: KV-cache dtype (default: the compute dtype, bfloat16 on accelerators).
      sampler: a `SamplerConfig` holding all of temperature ... cache_dtype above at once; then those
        keywords must stay at their defaults.
      on_done: progress hook, called with the number of prompts that just finished (e.g. a tqdm bar's
        `update`); over the call the counts sum to len(prompts).

    Returns a GenerateOutput. Finish reason per prompt: "eos" (stopped at an EOS id), "budget" (hit its
    own budget < max_new_tokens: a real cutoff) or "max_new_tokens". Log-probs are float32 log softmax(logits /
    temperature) of each generated token under the full distribution (top-k / top-p restrict sampling,
    not the scoring), which the trainer recomputes with the same temperature, as verl; with greedy
    decoding they are under the raw logits (temperature 1).
    """
    t_start = time.perf_counter()
    sc = _resolve_sampler(sampler, dict(
        temperature=temperature, top_p=top_p, top_k=top_k, eos_ids=eos_ids, num_slots=num_slots, refill=refill,
        refill_fraction=refill_fraction, max_cache_len=max_cache_len, cache_buckets=cache_buckets,
        prompt_buckets=prompt_buckets, max_prefill_tokens=max_prefill_tokens, schedule=schedule,
        cache_dtype=cache_dtype))
    cfg = model_cfg
    prompts = [list(map(int, p)) for p in prompts]
    plan = _plan(cfg, prompts, budgets, max_new_tokens, sc)
    mode = make_mode(sc.temperature, sc.top_p, sc.top_k, cfg.vocab_size)
    N = len(prompts)
    out = GenerateOutput([[] for _ in range(N)], [np.zeros((0,), np.float32) for _ in range(N)],
                         [FINISH_NAMES[int(r)] for r in plan.reasons], GenerateStats())
    if on_done is not None and N > len(plan.todo):
        on_done(N - len(plan.todo))  # finished without a decode step (no budget left)
    if plan.todo:
        S = int(sc.num_slots or min(256, _pow2_ceil(len(plan.todo))))
        spec = EngineSpec(cfg=cfg, num_slots=S, max_new_tokens=max(1, int(max_new_tokens)), mode=mode)
        out.stats.num_slots = S
        knobs = _knobs(sc, rng, mode)
        with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            sp = params if is_sampling_params(params) else to_sampling_params(cfg, params, mesh=mesh)
            _Rollout(spec, sp, knobs, sc, plan, prompts, out, jnp.dtype(sc.cache_dtype or cfg.dtype), on_done).run()
    out.stats.seconds = time.perf_counter() - t_start
    return out
