"""`--dry_run` against XLA: compile every program of one training step for the config's TPU slice.

libtpu's compile-only client describes a Cloud TPU slice without a TPU
(`jax.experimental.topologies.get_topology_desc`), so a CPU host with the `[tpu]` extra installed can
lower and compile the trainer's own jitted programs for it, with the shardings of a mesh over the
slice's devices, and read XLA's buffer sizes (`compiled.memory_analysis()`). Nothing is allocated and
no weights are read. The programs of one step, at the largest shapes the trainer can send:

* rollout (`sampling.generate` on `engine` / `kv_cache`): the reshard to sampling params, prefill of
  the largest prompt bucket at the most rows one prefill call takes, insert of its keys / values into
  the cache, the cache resize into the largest cache bucket, and the decode loop over `num_slots`
  slots at that bucket. On a slice of several hosts each host samples on its own chips
  (`multihost.local_sampling_mesh`): those programs are compiled for one host's mesh;
* update (`rl.update.Updater`): the old-log-prob pass over the step's whole batch, the RL train step
  on the largest PPO mini-batch (gradient accumulation over `rl.micro_batch_size`), the BC step on
  the largest expert batch; all at the largest length bucket (`batching.default_buckets`).

Per program XLA reports argument / output / alias / temp / generated-code bytes per device and its
peak; what else is resident on the device while it runs (the train state during rollout; during the
update only the step's batch: `train.train_one_step` releases the engine's sampling copy of the
weights, `update_params(None)`, before it) is added from the inputs' shardings. The binding figure is docs/benchmarks.md's rule (`program_peak`).
A program XLA refuses (RESOURCE_EXHAUSTED) is a "does not fit" verdict naming it.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from masa_jax import components
from masa_jax import config as config_lib
from masa_jax.errors import UserError

GiB = 1024 ** 3
HEADROOM = 0.10  # the verdict needs >= 10 % of a chip's HBM free at every program's peak


@dataclasses.dataclass(frozen=True)
class Slice:
    """A Cloud TPU slice: its name as Google sells it, libtpu's topology string, chips, HBM per chip."""
    name: str
    topology: str                 # get_topology_desc(topology_name=...)
    chips: int                    # JAX devices (one per chip; v5p chips are megacore: one device)
    hbm_gib: float                # per chip
    chips_per_host: tuple[int, int, int] | None = None  # libtpu's chips_per_host_bounds, when not 2x2x1


# HBM per chip and chips per slice name: Cloud TPU docs, "TPU versions" (cloud.google.com/tpu/docs/v5e,
# /v5p, /v6e; checked 2026-12): v5e 16 GiB, v5p 95 GiB, v6e 32 GiB per chip. v5e-N and v6e-N count
# chips, v5p-N counts TensorCores (2 per chip): v5p-64 is 32 chips. v4 is left out: libtpu's
# compile-only client (0.0.42) exposes v4 TensorCores as separate devices (8 for a v4-8), not the
# megacore chips a v4 runtime shows JAX, so its compiles would not be the trainer's programs.
SLICES = {s.name: s for s in (
    Slice("v5e-1", "v5e:1x1", 1, 16.0, (1, 1, 1)),
    Slice("v5e-4", "v5e:2x2", 4, 16.0),
    Slice("v5e-8", "v5e:2x4", 8, 16.0),
    Slice("v5e-16", "v5e:4x4", 16, 16.0),
    Slice("v5p-8", "v5p:2x2x1", 4, 95.0),
    Slice("v5p-16", "v5p:2x2x2", 8, 95.0),
    Slice("v5p-32", "v5p:2x2x4", 16, 95.0),
    Slice("v5p-64", "v5p:2x4x4", 32, 95.0),
    Slice("v5p-128", "v5p:4x4x4", 64, 95.0),
    Slice("v6e-1", "v6e:1x1", 1, 32.0, (1, 1, 1)),
    Slice("v6e-4", "v6e:2x2", 4, 32.0),
    Slice("v6e-8", "v6e:2x4", 8, 32.0),
)}


def slice_info(name: str) -> Slice:
    if name not in SLICES:
        raise UserError(f"config.mesh.topology {name!r} is not a known TPU slice; known: {sorted(SLICES)} "
                        "(v4 is not modelled by libtpu's compile-only client)")
    return SLICES[name]


def libtpu_missing() -> str | None:
    """Why the compile check cannot run here (None: it can)."""
    try:
        import libtpu  # noqa: F401
    except ImportError:
        return "libtpu is not installed (pip install -e '.[tpu]')"
    return None


@functools.lru_cache(maxsize=None)
def topology_devices(name: str) -> tuple:
    """The compile-only devices of slice `name` (no TPU needed)."""
    import os

    from jax.experimental import topologies
    s = slice_info(name)
    kw = {"chips_per_host_bounds": s.chips_per_host} if s.chips_per_host else {}
    # The compile-only client touches no TPU, so it may share libtpu with another process (a training run
    # on this TPU VM, a second dry run); without this libtpu refuses at its lockfile (/tmp/libtpu_lockfile).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        devices = tuple(topologies.get_topology_desc(topology_name=s.topology, platform="tpu", **kw).devices)
    except jax.errors.JaxRuntimeError as e:
        raise UserError(f"libtpu could not describe TPU {s.name} ({s.topology}): {str(e).splitlines()[0]}") from e
    if len(devices) != s.chips:
        raise RuntimeError(f"libtpu's topology {s.topology} has {len(devices)} devices, the table says {s.chips}")
    return devices


# ------------------------------------------------------------------------------------------- shapes


@dataclasses.dataclass(frozen=True)
class StepShapes:
    """The largest shapes one training step sends to each program (module docstring)."""
    seq_len: int            # largest length bucket of the updater
    step_rows: int          # old-log-prob pass: every sequence of the step
    minibatch_rows: int     # train step: the largest PPO mini-batch
    num_minibatches: int
    bc_rows: int            # BC step: buffer just below capacity plus one step's experts
    num_slots: int
    max_new_tokens: int     # the slot output buffers (the larger of the two paths' caps)
    cache_len: int          # largest cache bucket
    prompt_bucket: int      # largest prefill bucket
    prefill_rows: int       # rows of one prefill call at that bucket


def step_shapes(config) -> StepShapes:
    from masa_jax.rl import batching
    from masa_jax.rl.update import num_minibatches
    import importlib
    gen = importlib.import_module("masa_jax.sampling.generate")  # the package exports generate()

    r, d, mb = config.rollout, config.data, config.rl.micro_batch_size
    up = lambda n: max(mb, -(-n // mb) * mb)  # noqa: E731  rows padded to a multiple of the micro-batch
    meta = config_lib.uses_meta(config)
    per_problem = r.num_solutions + (r.num_meta if meta else 0)
    problems = d.problems_per_step
    num_mb = num_minibatches(problems, config.rl.mini_batch_size)
    max_new = max(r.max_response_length, r.meta_max_new_tokens if meta else 0)
    seq_len = max(batching.default_buckets(d.max_prompt_length + max_new))
    cache_len = gen._pick(gen.default_cache_buckets(1 << 40), d.max_prompt_length + max_new - 1)
    prompt_bucket = gen._prompt_bucket(d.max_prompt_length, cache_len, None)
    max_prefill = gen.SamplerConfig().max_prefill_tokens
    nmax = max(1, min(gen._pow2_ceil(r.num_slots), 1 << int(math.log2(max(1, max_prefill // prompt_bucket)))))
    bc_rows = up(config.bc.buffer_size - 1 + problems) if meta and config.bc.enabled else 0
    return StepShapes(seq_len=seq_len, step_rows=up(problems * per_problem),
                      minibatch_rows=up(-(-problems // num_mb) * per_problem), num_minibatches=num_mb,
                      bc_rows=bc_rows, num_slots=r.num_slots, max_new_tokens=max_new, cache_len=cache_len,
                      prompt_bucket=prompt_bucket, prefill_rows=nmax)


# ------------------------------------------------------------------------------------------ results


@dataclasses.dataclass
class ProgramMemory:
    """XLA's sizes of one compiled program, bytes per device; `error` when XLA refused it."""
    name: str
    shapes: str
    resident: int = 0             # other buffers on the device while it runs (not its arguments)
    resident_what: str = ""
    argument: int = 0
    output: int = 0
    alias: int = 0
    temp: int = 0
    code: int = 0
    peak: int = 0                 # XLA's peak_memory_in_bytes
    seconds: float = 0.0
    error: str | None = None

    @property
    def total(self) -> int:
        """arguments + outputs - donated (aliased) + temporaries: every buffer of the program at once."""
        return self.argument + self.output - self.alias + self.temp

    @property
    def device_peak(self) -> int:
        """The binding figure (docs/benchmarks.md, "Which XLA figure binds"): XLA's own peak of the
        program's buffers plus what else is resident."""
        return program_peak(self) + self.resident


def program_peak(p: ProgramMemory) -> int:
    """XLA's peak of the program's buffers: peak_memory_in_bytes (arguments, outputs and the heap
    simulator's peak of live temporaries; never below arguments + outputs - aliased), plus the
    generated code, which also lives in HBM."""
    return max(p.peak, p.argument + p.output - p.alias) + p.code


@dataclasses.dataclass
class CheckResult:
    slice: Slice
    mesh: dict
    sampling_mesh: dict
    shapes: StepShapes
    programs: list[ProgramMemory]
    seconds: float

    @property
    def limit(self) -> float:
        return (1 - HEADROOM) * self.slice.hbm_gib * GiB

    @property
    def refused(self) -> list[ProgramMemory]:
        return [p for p in self.programs if p.error]

    @property
    def worst(self) -> ProgramMemory:
        return max((p for p in self.programs if not p.error), key=lambda p: p.device_peak)

    @property
    def fits(self) -> bool:
        return not self.refused and self.worst.device_peak <= self.limit


# ------------------------------------------------------------------------------------------ helpers


def _per_device(tree) -> int:
    """Bytes on one device of a tree of sharded ShapeDtypeStructs (a replicated leaf counts whole)."""
    total = 0
    for s in jax.tree.leaves(tree):
        shape = s.sharding.shard_shape(s.shape) if getattr(s, "sharding", None) is not None else s.shape
        total += math.prod(shape) * jax.dtypes.itemsize_bits(s.dtype) // 8 if not jnp.issubdtype(s.dtype, jax.dtypes.prng_key) \
            else math.prod(shape) * 8
    return total


def _with_shardings(shapes, shardings):
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def _outputs(compiled, lowered):
    """The program's outputs as sharded ShapeDtypeStructs (the next program's inputs)."""
    return _with_shardings(lowered.out_info, compiled.output_shardings)


_OOM = re.compile(r"RESOURCE_EXHAUSTED[^\n]*")


def _compile(name: str, shapes: str, lower: Callable, resident: int = 0, resident_what: str = ""):
    """Lowers and compiles one program; returns (ProgramMemory, (compiled, lowered) or None)."""
    t0 = time.perf_counter()
    p = ProgramMemory(name, shapes, resident=resident, resident_what=resident_what)
    try:
        lowered = lower()
        compiled = lowered.compile()
    except Exception as e:  # XLA's refusal is a verdict; anything else is a bug and propagates
        m = _OOM.search(str(e))
        if not m:
            raise
        p.error, p.seconds = m.group(0).strip(), time.perf_counter() - t0
        return p, None
    m = compiled.memory_analysis()
    p.argument, p.output, p.alias = m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes
    p.temp, p.code, p.peak = m.temp_size_in_bytes, m.generated_code_size_in_bytes, m.peak_memory_in_bytes
    p.seconds = time.perf_counter() - t0
    return p, (compiled, lowered)


@dataclasses.dataclass(frozen=True)
class SharedShapes:
    """The train step's largest mini-batch in the shared-prefix layout (`batching.pack_shared`)."""
    blocks: int         # Bk: the mini-batch's rows / rows per block
    rows: int           # n = micro_batch_size / data-parallel size
    prompts: int        # u: prompts per block when groups are cut into blocks in order (see below)
    prefix_len: int     # P: the bucket of data.max_prompt_length (the updater's fixed prefix bucket)
    response_len: int   # S: the bucket of the longest response


def shared_shapes(config, dp: int) -> SharedShapes:
    """Groups of G solution / M meta rollouts cut in order into blocks of n rows: a block holds whole
    groups and at most one cut at each end, so ceil((n - 1) / min group) + 1 prompts (1 when n divides
    every group size), rounded up to a power of two as the packer does."""
    from masa_jax.rl import batching
    r, d, mb = config.rollout, config.data, config.rl.micro_batch_size
    shp = step_shapes(config)
    n = mb // dp
    groups = [r.num_solutions] + ([r.num_meta] if config_lib.uses_meta(config) else [])
    need = 1 if all(g % n == 0 for g in groups) else -(-(n - 1) // min(groups)) + 1
    buckets = batching.default_buckets(shp.seq_len)
    return SharedShapes(blocks=shp.minibatch_rows // n, rows=n, prompts=batching.pow2_bucket(min(need, n), n),
                        prefix_len=batching.bucket_length(d.max_prompt_length, buckets),
                        response_len=batching.bucket_length(shp.max_new_tokens, buckets))


def _shared_batch(sb: SharedShapes, extra: tuple[str, ...], sharding) -> dict:
    spec = {"prefix_tokens": ((sb.blocks, sb.prompts, sb.prefix_len), jnp.int32),
            "prefix_mask": ((sb.blocks, sb.prompts, sb.prefix_len), jnp.bool_),
            "prefix_index": ((sb.blocks, sb.rows), jnp.int32),
            "tokens": ((sb.blocks, sb.rows, sb.response_len), jnp.int32),
            "attention_mask": ((sb.blocks, sb.rows, sb.response_len), jnp.bool_),
            "loss_mask": ((sb.blocks, sb.rows, sb.response_len), jnp.bool_),
            "advantages": ((sb.blocks, sb.rows), jnp.float32),
            "old_logprobs": ((sb.blocks, sb.rows, sb.response_len), jnp.float32)}
    keys = ("prefix_tokens", "prefix_mask", "prefix_index", "tokens", "attention_mask", "loss_mask") + extra
    return {k: jax.ShapeDtypeStruct(spec[k][0], spec[k][1], sharding=sharding) for k in keys}


def _batch(rows: int, T: int, keys: tuple[str, ...], sharding) -> dict:
    dtypes = {"tokens": jnp.int32, "attention_mask": jnp.bool_, "loss_mask": jnp.bool_, "advantages": jnp.float32,
              "old_logprobs": jnp.float32, "sampler_logprobs": jnp.float32}
    return {k: jax.ShapeDtypeStruct((rows,) if k == "advantages" else (rows, T), dtypes[k], sharding=sharding)
            for k in keys}


def sampling_mesh_for(mesh: jax.sharding.Mesh) -> jax.sharding.Mesh:
    """The mesh the sampler runs on: the whole mesh on one host, one host's devices on several
    (`multihost.local_sampling_mesh` as process 0 sees it)."""
    from masa_jax.parallel.mesh import MESH_AXES
    hosts = {d.process_index for d in mesh.devices.flat}
    if len(hosts) == 1:
        return mesh
    devices = [d for d in mesh.devices.flat if d.process_index == min(hosts)]
    tensor = mesh.shape["tensor"]
    if len(devices) % tensor:
        raise UserError(f"config.mesh.shape: tensor axis {tensor} does not fit the {len(devices)} chips of one host")
    grid = np.array(devices, dtype=object).reshape(1, len(devices) // tensor, tensor)
    return jax.sharding.Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


# ------------------------------------------------------------------------------------------- check


def check(config, topology: str | None = None, programs: tuple[str, ...] | None = None,
          on_program: Callable[[ProgramMemory], None] | None = None) -> CheckResult:
    """Compiles the programs of one training step of `config` for TPU slice `topology` (default
    `config.mesh.topology`) and returns XLA's sizes. `programs` restricts the names compiled (tests,
    experiments); `on_program` is called as each finishes (progress)."""
    # A compile-only executable must not reach the persistent compilation cache (when one is set): read
    # back later it fails ("PjRtCompiler must be constructed with a Client"). Writes are skipped below a
    # minimum compile time, so none is written while the check runs.
    min_time = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float("inf"))
    try:
        return _check(config, topology, programs, on_program)
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_time)


def _check(config, topology, programs, on_program) -> CheckResult:
    from masa_jax.models.qwen import attention
    from masa_jax.models.qwen.presets import model_config_for
    from masa_jax.parallel import mesh as mesh_lib
    from masa_jax.rl import bc, train_step as ts
    from masa_jax.sampling import engine, kv_cache
    from masa_jax.sampling import reshard
    from masa_jax.sampling.generate import _knobs
    from masa_jax.sampling.sampling_fns import make_mode

    t_start = time.perf_counter()
    sl = slice_info(topology or config.mesh.topology)
    mesh = mesh_lib.make_mesh(config.mesh.shape, devices=topology_devices(sl.name))
    smesh = sampling_mesh_for(mesh)
    cfg = dataclasses.replace(model_config_for(config), target_platform="tpu")
    shp = step_shapes(config)
    lcfg, ocfg = components.loss_config(config), components.optim_config(config)
    mb = config.rl.micro_batch_size
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    if mb % dp:
        raise UserError(f"config.rl.micro_batch_size={mb} must be a multiple of the data-parallel size {dp} "
                        f"(mesh data x fsdp on {sl.name})")
    want = lambda name: programs is None or name in programs  # noqa: E731
    if attention.use_pallas(cfg):  # splash kernels for every length and per-shard head count used below
        heads = {cfg.num_heads // t for t in (1, mesh.shape["tensor"]) if cfg.num_heads % t == 0}
        attention.prebuild_splash_kernels(cfg, (shp.prompt_bucket, shp.seq_len), sorted(heads))
        if config.rl.prefix_sharing and want("train_step_shared"):
            sb = shared_shapes(config, dp)
            attention.prebuild_splash_kernels(cfg, (sb.prefix_len,), sorted(heads))
            attention.prebuild_shared_prefix_kernels(cfg, sb.prefix_len, sb.response_len, sorted(heads))
    out: list[ProgramMemory] = []

    def record(p):
        out.append(p)
        if on_program is not None:
            on_program(p)

    # The train state, as create_train_state lays it out (LoRA: adapters train, the base is frozen).
    lora_cfg = components.lora_config(config)
    state = ts.abstract_train_state(cfg, ocfg, mesh, lcfg.keep_reference, lora_cfg)
    quantized = lora_cfg.base_quantization if lora_cfg is not None else ""
    # What the old-log-prob pass and the reshard read: the params, or the base with the adapters attached.
    policy = _with_shardings(jax.eval_shape(lambda st: ts.policy_params(st, lora_cfg), state),
                             ts.policy_shardings(cfg, mesh, lora_cfg))
    state_b, policy_b = _per_device(state), _per_device(policy)
    repl = NamedSharding(smesh, P())

    # ---- rollout: reshard, prefill, insert, resize, decode (a quantized base: adapters unmerged)
    dtype = jnp.dtype(cfg.dtype)
    unmerged = reshard._attached_lora(policy) if quantized else None
    converter = reshard._converter(cfg, dtype.name, mesh, unmerged, quantized)
    sp = _with_shardings(jax.eval_shape(converter, policy),
                         reshard.sampling_shardings(cfg, smesh, dtype, unmerged, quantized))
    sp_b = _per_device(sp)
    if want("reshard"):
        p, _ = _compile("reshard", "train params -> sampling params",
                        lambda: converter.lower(policy),  # on the whole mesh
                        state_b - policy_b, "optimizer state")
        record(p)
    S, C, Pb, n = shp.num_slots, shp.cache_len, shp.prompt_bucket, shp.prefill_rows
    sampler = components.sampler_config(config, (0,))
    spec = engine.EngineSpec(cfg=cfg, num_slots=S, max_new_tokens=shp.max_new_tokens,
                             mode=make_mode(sampler.temperature, sampler.top_p, sampler.top_k, cfg.vocab_size))
    with jax.set_mesh(smesh):
        knobs = jax.eval_shape(lambda: _knobs(sampler, 0, spec.mode))
        knobs = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=repl), knobs)
        slot_state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=repl),
                                  jax.eval_shape(lambda: engine.init_state.__wrapped__(S, shp.max_new_tokens)))
        slot_b = _per_device(slot_state)
        p_cache, res = _compile("kv_cache", f"{S} slots x cache {C}",
                                lambda: kv_cache.init_cache.lower(cfg, S, C, dtype), state_b, "train state")
        if res is None:  # the cache alone is refused: no sampler program can run (the verdict names it)
            record(p_cache)
            cache, cache_b = None, 0
        else:
            cache = _outputs(*res)
            cache_b = _per_device(cache)
        rows = lambda dt=jnp.int32: jax.ShapeDtypeStruct((n,), dt, sharding=repl)  # noqa: E731
        kv = None
        if cache is not None and (want("prefill") or want("insert")):
            toks = jax.ShapeDtypeStruct((n, Pb), jnp.int32, sharding=repl)
            p, res = _compile("prefill", f"{n} prompts x {Pb} tokens",
                              # every prompt distinct (u = n rows): prefix sharing only shrinks this
                              lambda: engine.prefill.lower(spec, sp, slot_state, knobs, toks, rows(), rows(), rows(),
                                                           rows(), rows(), rows()),
                              state_b + cache_b, "train state, KV cache")
            if want("prefill"):
                record(p)
            if res is not None:
                kv = _outputs(*res)[0]
        if want("insert") and kv is not None:
            p, _ = _compile("insert", f"{n} x {Pb} into cache {S} x {C}",
                            lambda: kv_cache.insert.lower(cache, kv, rows()), state_b + sp_b + slot_b,
                            "train state, sampling params, slot state")
            record(p)
        if cache is not None and want("resize"):
            from masa_jax.sampling.generate import default_cache_buckets
            below = [b for b in default_cache_buckets(C) if b < C]
            if below:
                small_lowered = kv_cache.init_cache.lower(cfg, S, below[-1], dtype)
                small = _outputs(small_lowered.compile(), small_lowered)
                p, _ = _compile("resize", f"cache {S} x {below[-1]} -> {C}",
                                lambda: kv_cache.resize.lower(small, length=C), state_b + sp_b + slot_b,
                                "train state, sampling params, slot state")
                record(p)
        if cache is not None and want("decode"):
            free = jax.ShapeDtypeStruct((), jnp.int32, sharding=repl)
            p, _ = _compile("decode", f"{S} slots, cache {C}, {shp.max_new_tokens} new tokens",
                            lambda: engine.decode.lower(spec, sp, cache, slot_state, knobs, free), state_b,
                            "train state")
            record(p)

    # ---- update: old log-probs, train step, BC step (the sampling copy of the weights is released first)
    bsh = ts.batch_sharding(mesh)
    T = shp.seq_len
    if want("old_logprobs"):
        batch = _batch(shp.step_rows, T, ("tokens", "attention_mask", "loss_mask", "advantages", "sampler_logprobs"),
                       bsh)
        fn = ts.make_compute_logprobs(cfg, mesh, mb, temperature=lcfg.temperature, chunk_size=lcfg.chunk_size,
                                      lora_cfg=lora_cfg)
        p, _ = _compile("old_logprobs", f"{shp.step_rows} x {T}, micro-batch {mb}",
                        lambda: fn.jitted.lower(policy, batch), state_b - policy_b, "optimizer state")
        record(p)
    flag = jax.ShapeDtypeStruct((), jnp.bool_, sharding=NamedSharding(mesh, P()))
    resident, what = 0, ""
    if shp.num_minibatches > 1:  # the step's whole batch and its old log-probs stay while mini-batches run
        resident += _per_device(_batch(shp.step_rows, T, ("tokens", "attention_mask", "loss_mask", "advantages",
                                                          "old_logprobs"), bsh))
        what = "the step's batch"
    if want("train_step"):
        batch = _batch(shp.minibatch_rows, T, ("tokens", "attention_mask", "loss_mask", "advantages", "old_logprobs"),
                       bsh)
        fn = ts.make_train_step(cfg, lcfg, ocfg, mesh, mb, lora_cfg=lora_cfg)
        p, _ = _compile("train_step", f"{shp.minibatch_rows} x {T}, micro-batch {mb}",
                        lambda: fn.jitted.lower(state, batch, flag), resident, what)
        record(p)
    if want("train_step_shared") and config.rl.prefix_sharing:
        sb = shared_shapes(config, dp)
        batch = _shared_batch(sb, ("advantages", "old_logprobs"), bsh)
        fn = ts.make_train_step(cfg, lcfg, ocfg, mesh, mb, lora_cfg=lora_cfg)
        p, _ = _compile("train_step_shared", f"{sb.blocks} blocks x ({sb.prompts} x {sb.prefix_len} prompt + "
                        f"{sb.rows} x {sb.response_len} response), micro-batch {mb}",
                        lambda: fn.jitted.lower(state, batch, flag), resident, what)
        record(p)
    if want("bc_step") and shp.bc_rows:
        batch = _batch(shp.bc_rows, T, ("tokens", "attention_mask", "loss_mask"), bsh)
        fn = bc.make_bc_step(cfg, ocfg, mesh, mb, lr=config.bc.lr, keep_reference=lcfg.keep_reference,
                             chunk_size=lcfg.chunk_size,
                             lora_cfg=lora_cfg)
        p, _ = _compile("bc_step", f"{shp.bc_rows} x {T}, micro-batch {mb}",
                        lambda: fn.jitted.lower(state, batch, flag))
        record(p)
    return CheckResult(slice=sl, mesh=dict(mesh.shape), sampling_mesh=dict(smesh.shape), shapes=shp, programs=out,
                       seconds=time.perf_counter() - t_start)


# ------------------------------------------------------------------------------------------- report


def _g(b: int) -> str:
    return f"{b / GiB:7.2f}"


def format_result(r: CheckResult) -> list[str]:
    s = r.slice
    lines = [f"XLA compile for TPU {s.name} (libtpu topology {s.topology}: {s.chips} chips of {s.hbm_gib:g} GiB HBM); "
             f"mesh {r.mesh}" + ("" if r.sampling_mesh == r.mesh else f", sampler per host on {r.sampling_mesh}"),
             f"per-device GiB       {'args':>7} {'output':>7} {'alias':>7} {'temp':>7} {'code':>7} {'peak':>7} "
             f"{'+resid.':>7} {'= device':>8}  {'compile':>7}  shapes"]
    for p in r.programs:
        if p.error:
            lines.append(f"  {p.name:<18} does not fit: {p.error}  ({p.seconds:.0f} s)  {p.shapes}")
            continue
        lines.append(f"  {p.name:<18} {_g(p.argument)} {_g(p.output)} {_g(p.alias)} {_g(p.temp)} {_g(p.code)} "
                     f"{_g(program_peak(p))} {_g(p.resident)} {_g(p.device_peak):>8}  {p.seconds:6.0f}s  {p.shapes}"
                     + (f"; resident: {p.resident_what}" if p.resident_what else ""))
    lim = r.limit / GiB
    if r.refused:
        lines.append(f"verdict: does not fit: {', '.join(p.name for p in r.refused)} (XLA: RESOURCE_EXHAUSTED on "
                     f"{s.name})")
    elif r.fits:
        w = r.worst
        lines.append(f"verdict: fits: largest {w.name} {w.device_peak / GiB:.2f} GiB of {s.hbm_gib:g} GiB per chip "
                     f"(limit {lim:.2f} GiB: {HEADROOM:.0%} headroom); compiled in {r.seconds:.0f} s")
    else:
        over = ", ".join(f"{p.name} {p.device_peak / GiB:.2f} GiB" for p in r.programs
                         if not p.error and p.device_peak > r.limit)
        lines.append(f"verdict: does not fit: {over} of {s.hbm_gib:g} GiB per chip (limit {lim:.2f} GiB: "
                     f"{HEADROOM:.0%} headroom); compiled in {r.seconds:.0f} s")
    return lines


def report(config, num_devices: int | None = None, device_memory_gib: float | None = None,
           progress: Callable[[str], None] | None = None) -> str:
    """`--dry_run`'s text: XLA's per-program sizes for `config.mesh.topology` when libtpu is here, next to
    the formula (`dry_run.report`); the formula alone, saying why, otherwise."""
    from masa_jax import dry_run
    name = config.mesh.topology
    if not name:
        return "\n".join(["no XLA compile: config.mesh.topology is empty (name a TPU slice, e.g. v5e-1)",
                          dry_run.report(config, num_devices, device_memory_gib)])
    sl = slice_info(name)
    missing = libtpu_missing()
    formula = dry_run.report(config, num_devices or sl.chips, device_memory_gib or sl.hbm_gib)
    if missing:
        return "\n".join([f"no XLA compile for {name}: {missing}; the rough formula only:", formula])
    on_program = None
    if progress is not None:
        on_program = lambda p: progress(f"compiled {p.name} ({p.seconds:.0f} s)")  # noqa: E731
    result = check(config, on_program=on_program)
    return "\n".join(format_result(result) + ["", formula])
