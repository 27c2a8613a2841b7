"""The jitted RL update: `(train_state, batch) -> (train_state, metrics)`, and the old-log-prob pass.

Batch layout (a dict of arrays; N sequences of T tokens):

    tokens            int32 [N, T]   prompt + response; left-padded prompts and right padding are fine
    attention_mask    bool  [N, T]   True on real tokens (prompt and response)
    loss_mask         bool  [N, T]   True on response tokens only. Aligned with `token_logprobs`:
                                     entry t scores tokens[t] given tokens[:t], so it is never True at t=0
    advantages        f32   [N] or [N, T]   (`grpo.group_advantages`, one value per rollout)
    old_logprobs      f32   [N, T]   from `make_compute_logprobs` with the pre-update params
    sampler_logprobs  f32   [N, T]   optional, read by `make_compute_logprobs` only (gap metric)

Shared-prefix layout (`batching.pack_shared`, `rl.prefix_sharing`; the RL step and the old-log-prob
pass take either): blocks of n rows whose responses continue prompts stored once per block,

    prefix_tokens     int32 [Bk, u, P]   a block's distinct prompts, right-padded
    prefix_mask       bool  [Bk, u, P]
    prefix_index      int32 [Bk, n]      which of the block's prompts row j continues
    tokens            int32 [Bk, n, S]   the responses only, right-padded; attention_mask / loss_mask
                                         bool [Bk, n, S] True on response tokens
    advantages        f32   [Bk, n];     old_logprobs / sampler_logprobs f32 [Bk, n, S], response-aligned

A micro-batch is micro_batch_size / n blocks (one per data-parallel device); the forward computes each
prompt once per block (`model.shared_prefix_hidden_states`) with the unshared rows' log-probs and
gradients, so the loss is the same function of the same sequences in either layout.

The BC step (`masa_jax.rl.bc.make_bc_step`) reads tokens, attention_mask and loss_mask only.
N must be a multiple of `micro_batch_size`, and `micro_batch_size` a multiple of the data-parallel size
(mesh data x fsdp). Fill a batch up with `pad_batch`: all-False rows change no loss, gradient or metric.

Design:
- Mixed precision: float32 master params and AdamW state; the model computes in `ModelConfig.dtype`
  (bfloat16 on accelerators); log-probs, losses and gradient sums are float32. Log-probs come from the
  chunked `token_logprobs`, so no [B, T, V] logits tensor exists.
- Gradient accumulation: a `lax.scan` over micro-batches inside the jitted step (a plain gradient when
  the batch is one micro-batch). Every loss is divided by the token / sequence counts of the WHOLE
  batch (computed before the scan), so the summed micro-batch gradients equal the one-batch gradient
  exactly, for every loss aggregation.
- Micro-batch m takes the rows m, m + M, m + 2M, ... (M micro-batches): with the batch sharded in
  contiguous blocks over the data-parallel devices, each micro-batch is then spread evenly over all of
  them and splitting needs no communication.
- Optimiser: optax `clip_by_global_norm -> scale_by_adam -> add_decayed_weights` (exactly optax.adamw
  after global-norm clipping), with the learning rate applied by the step itself. RL uses the warm-up
  schedule of `state.step`, which counts RL steps (rollout batches), not optimizer updates: the step
  takes an `advance` flag, and `Updater.policy_update` sets it on the last of a step's PPO mini-batch
  updates only, so every update of a step has the same learning rate (verl steps its scheduler once per
  training step). BC uses its own constant learning rate (`bc.BCConfig.lr`) on the SAME optimizer state.
  Why shared: a second AdamW state costs two more float32 copies of the params (64 GB for 8B), the
  gradients Adam sees are global-norm clipped to the same bound in both cases, and BC steps do not
  advance `state.step`, so they leave the RL warm-up untouched.
- A non-finite loss or gradient norm keeps params, optimizer state and step; `num_skipped` counts it.
- The reference policy (for kl_coef > 0) lives in `state.ref_params` in the compute dtype; with
  kl_coef = 0 it is None and no reference forward is traced.
- LoRA (`lora_cfg`, masa_jax/models/qwen/lora.py): `state.params` are the adapters (the only trainable
  params: gradients, AdamW moments and weight decay cover them alone) and `state.base_params` the frozen
  base weights. The loss runs on `lora.attach(base, adapters)` (the low-rank path added to each target
  projection, no merged weight), so autodiff gives dL/dA = scale dL/dW B^T, dL/dB = scale A^T dL/dW.
  With kl_coef > 0 the base IS the reference policy: no reference copy is kept. `policy_params(state,
  lora_cfg)` is what the old-log-prob pass and the sampler read; `checkpoint_view(state)` drops the
  base (checkpoints hold the adapters; the base is reloaded from model.path).
- The step and `make_compute_logprobs` return a `PlacedBatchFn`: it puts the batch on the mesh, then
  calls the jax.jit object (`.jitted`, for `.lower()` / cache inspection).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from masa_jax.models.qwen import lora, quantize
from masa_jax.models.qwen.config import ModelConfig
from masa_jax.models.qwen.logprobs import shared_prefix_logprobs, token_logprobs
from masa_jax.models.qwen.model import param_logical_axes, param_shapes
from masa_jax.parallel.rules import constrain, logical_to_spec, tree_shardings
from masa_jax.rl import batching, grpo

Params = Any
Batch = dict[str, jax.Array]
# loss_fn(params, ref_params, micro_batch, num_tokens, num_seqs) -> (loss, metrics)
LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The RL loss (docs/method.md §3). Each field is the setting of the same name in the run config's `rl`
    section (masa_jax/config.py), except `temperature` (the rollout's) and `entropy_metric` (benchmarks)."""

    clip_low: float = 0.2
    clip_high: float = 0.28
    clip_c: float | None = 10.0        # dual clip for A < 0; None disables it
    loss_agg: str = "token-mean"       # a key of grpo.LOSS_AGGREGATIONS
    kl_coef: float = 0.0               # > 0 keeps a frozen reference policy in the train state
    kl_estimator: str = "low_var_kl"   # a key of grpo.KL_ESTIMATORS
    temperature: float = 1.0           # the sampler's temperature: score tokens where they were drawn
    chunk_size: int = 512              # sequence chunk of the log-prob scan
    entropy_metric: bool = False       # report the policy entropy from inside the update forward

    @property
    def keep_reference(self) -> bool:
        return self.kl_coef > 0


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up and global-norm clipping (paper: 1e-6, 20 steps, wd 0.1, clip 1.0): the
    settings of the same names in the run config's `rl` section."""

    lr: float = 1e-6
    warmup_steps: int = 20
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8


@flax.struct.dataclass
class TrainState:
    step: jax.Array              # int32 []: RL steps applied (drives the warm-up); see make_update_step
    params: Params               # float32 master weights, training layout
    opt_state: optax.OptState    # AdamW moments, sharded like params
    num_skipped: jax.Array       # int32 []: updates (RL or BC) skipped for a non-finite loss / gradient
    ref_params: Params | None = None  # frozen reference policy in compute dtype; only when kl_coef > 0
    base_params: Params | None = None  # LoRA: the frozen base weights (params are then the adapters)


# ----------------------------------------------------------------------------------------- optimiser


def make_optimizer(optim_cfg: OptimConfig) -> optax.GradientTransformation:
    """Clip -> Adam -> decoupled weight decay; the step multiplies the result by -lr.

    Weight decay applies to every parameter, as torch AdamW in verl does.
    """
    return optax.chain(
        optax.clip_by_global_norm(optim_cfg.clip_norm),
        optax.scale_by_adam(b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps),
        optax.add_decayed_weights(optim_cfg.weight_decay),
    )


def learning_rate(optim_cfg: OptimConfig, step: jax.Array) -> jax.Array:
    """RL learning rate at update `step` (0-based): lr * min(1, (step + 1) / warmup_steps).

    (step + 1) so the first update already moves; with warmup_steps=20 update 19 is the first at full lr.
    """
    lr = jnp.float32(optim_cfg.lr)
    if optim_cfg.warmup_steps <= 0:
        return lr
    frac = (jnp.asarray(step, jnp.float32) + 1.0) / optim_cfg.warmup_steps
    return lr * jnp.minimum(frac, 1.0)


# ----------------------------------------------------------------------------------------- shardings


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Sharding of every batch array: leading (sequence) dim over the data-parallel mesh axes."""
    return NamedSharding(mesh, logical_to_spec(("batch",), mesh=mesh))


def param_shardings(model_cfg: ModelConfig, mesh: jax.sharding.Mesh) -> Params:
    """NamedShardings of the params in the training layout (TRAIN_RULES)."""
    return tree_shardings(param_logical_axes(model_cfg), param_shapes(model_cfg), mesh)


def adapter_shardings(model_cfg: ModelConfig, lora_cfg: lora.LoraConfig, mesh: jax.sharding.Mesh) -> Params:
    """NamedShardings of the LoRA adapters: A like its weight's input axes, B like its output axes."""
    return tree_shardings(lora.adapter_logical_axes(model_cfg, lora_cfg), lora.adapter_shapes(model_cfg, lora_cfg),
                          mesh)


def base_shardings(model_cfg: ModelConfig, mesh: jax.sharding.Mesh, lora_cfg: lora.LoraConfig) -> Params:
    """NamedShardings of a LoRA run's frozen base: the params', or the quantized base's (QLoRA)."""
    if lora_cfg.base_quantization:
        return quantize.quantized_shardings(model_cfg, lora_cfg.base_quantization, mesh)
    return param_shardings(model_cfg, mesh)


def policy_shardings(model_cfg: ModelConfig, mesh: jax.sharding.Mesh,
                     lora_cfg: lora.LoraConfig | None = None) -> Params:
    """Shardings of what `policy_params` returns: the params, with the attached adapters under LoRA."""
    if lora_cfg is None:
        return param_shardings(model_cfg, mesh)
    psh = base_shardings(model_cfg, mesh, lora_cfg)
    return dict(psh, layers=dict(psh["layers"], **{lora.ATTACHED_KEY: adapter_shardings(model_cfg, lora_cfg,
                                                                                         mesh)["layers"]}))


def state_shardings(model_cfg: ModelConfig, optim_cfg: OptimConfig, mesh: jax.sharding.Mesh,
                    keep_reference: bool = False, lora_cfg: lora.LoraConfig | None = None) -> TrainState:
    """A TrainState of NamedShardings: optimizer moments (and reference params) sharded like the params,
    counters replicated. With LoRA the params (and moments) are the adapters and the base is frozen
    (no reference copy: the base is the reference)."""
    psh = param_shardings(model_cfg, mesh)
    repl = NamedSharding(mesh, P())
    tx = make_optimizer(optim_cfg)
    if lora_cfg is None:
        trainable_sh, trainable_shapes = psh, param_shapes(model_cfg)
    else:
        trainable_sh = adapter_shardings(model_cfg, lora_cfg, mesh)
        trainable_shapes = lora.adapter_shapes(model_cfg, lora_cfg)
    opt_shapes = jax.eval_shape(tx.init, trainable_shapes)
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt_shapes, trainable_sh,
                                   transform_non_params=lambda _: repl,
                                   is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
    return TrainState(step=repl, params=trainable_sh, opt_state=opt_sh, num_skipped=repl,
                      ref_params=psh if keep_reference and lora_cfg is None else None,
                      base_params=base_shardings(model_cfg, mesh, lora_cfg) if lora_cfg is not None else None)


def abstract_train_state(model_cfg: ModelConfig, optim_cfg: OptimConfig, mesh: jax.sharding.Mesh,
                         keep_reference: bool = False, lora_cfg: lora.LoraConfig | None = None) -> TrainState:
    """The TrainState `create_train_state` builds, as ShapeDtypeStructs with its shardings (nothing is
    allocated): the restore template of a resume, and what the XLA compile check lowers against."""
    sh = state_shardings(model_cfg, optim_cfg, mesh, keep_reference, lora_cfg)
    dense = param_shapes(model_cfg)  # in the param dtype
    if lora_cfg is None:
        trainable, base = dense, None
    else:
        trainable = lora.adapter_shapes(model_cfg, lora_cfg)
        base = (quantize.quantized_shapes(model_cfg, lora_cfg.base_quantization) if lora_cfg.base_quantization
                else dense)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    ref = (jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, model_cfg.jnp_dtype), dense)
           if keep_reference and lora_cfg is None else None)
    shapes = TrainState(step=scalar, params=trainable, opt_state=jax.eval_shape(make_optimizer(optim_cfg).init,
                                                                                 trainable),
                        num_skipped=scalar, ref_params=ref, base_params=base)
    return jax.tree.map(lambda s, shd: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=shd), shapes, sh)


def policy_params(state: TrainState, lora_cfg: lora.LoraConfig | None = None) -> Params:
    """The policy's params: `state.params`, or under LoRA the frozen base with the adapters attached
    (`lora.attach`, unmerged; the sampler merges them)."""
    if lora_cfg is None:
        return state.params
    return lora.attach(state.base_params, state.params, lora_cfg)


@flax.struct.dataclass
class CheckpointedState:
    """What a checkpoint holds: a TrainState without the frozen LoRA base (reloaded from model.path).
    The fields (names and order) of TrainState before LoRA, so checkpoints of earlier runs restore."""
    step: jax.Array
    params: Params
    opt_state: optax.OptState
    num_skipped: jax.Array
    ref_params: Params | None = None


def checkpoint_view(state: TrainState) -> CheckpointedState:
    """The part of `state` a checkpoint stores (everything but `base_params`)."""
    return CheckpointedState(step=state.step, params=state.params, opt_state=state.opt_state,
                             num_skipped=state.num_skipped, ref_params=state.ref_params)


def with_base(restored: CheckpointedState, base_params: Params | None) -> TrainState:
    """The TrainState of a restored `checkpoint_view`, with the frozen base put back."""
    return TrainState(step=restored.step, params=restored.params, opt_state=restored.opt_state,
                      num_skipped=restored.num_skipped, ref_params=restored.ref_params, base_params=base_params)


def _init_opt_state(optim_cfg: OptimConfig, params: Params) -> optax.OptState:
    return make_optimizer(optim_cfg).init(params)


def _reference_copy(model_cfg: ModelConfig, params: Params) -> Params:
    # jnp.copy so the reference never aliases the (donated) master params, even in float32.
    return jax.tree.map(lambda x: jnp.copy(x.astype(model_cfg.jnp_dtype)), params)


def create_train_state(model_cfg: ModelConfig, params: Params, optim_cfg: OptimConfig,
                       mesh: jax.sharding.Mesh, *, keep_reference: bool = False,
                       lora_cfg: lora.LoraConfig | None = None, lora_rng: jax.Array | None = None) -> TrainState:
    """Places `params` (float32 master weights; host or device arrays) in the training layout and builds
    a fresh AdamW state sharded like them. With `keep_reference` (kl_coef > 0) a copy in the compute
    dtype becomes the frozen reference policy. The train step donates the state: device arrays passed
    in that already have the right sharding are taken over, not copied.

    With `lora_cfg`, `params` become the frozen `base_params` and fresh adapters (`lora.init_adapters`
    from `lora_rng`) the trainable params, with AdamW state for them alone.
    """
    sh = state_shardings(model_cfg, optim_cfg, mesh, keep_reference, lora_cfg)
    base = None
    if lora_cfg is not None and lora_cfg.base_quantization:  # QLoRA: quantized once, weight by weight
        base = quantize.place_quantized(model_cfg, params, lora_cfg.base_quantization, mesh)
    elif lora_cfg is not None:
        base = jax.device_put(params, sh.base_params)
    if lora_cfg is not None:
        rng = jax.random.key(0) if lora_rng is None else lora_rng
        params = jax.jit(lora.init_adapters, static_argnums=(0, 1), out_shardings=sh.params)(model_cfg, lora_cfg,
                                                                                             rng)
    params = jax.device_put(params, sh.params)
    # Module-level functions with static configs, so repeated calls reuse one compilation.
    opt_state = jax.jit(_init_opt_state, static_argnums=0, out_shardings=sh.opt_state)(optim_cfg, params)
    ref = None
    if keep_reference and lora_cfg is None:
        ref = jax.jit(_reference_copy, static_argnums=0, out_shardings=sh.ref_params)(model_cfg, params)
    # Two separate buffers: the step donates the state, and one buffer cannot be donated twice.
    zero = lambda: jax.device_put(jnp.zeros((), jnp.int32), sh.step)
    return TrainState(step=zero(), params=params, opt_state=opt_state, num_skipped=zero(), ref_params=ref,
                      base_params=base)


# ------------------------------------------------------------------------------------ micro-batching


def split_microbatches(batch: Batch, num_micro: int) -> Batch:
    """[N, ...] -> [num_micro, N / num_micro, ...]; micro-batch m holds rows m, m + M, m + 2M, ..."""
    def split(x):
        x = x.reshape((x.shape[0] // num_micro, num_micro) + x.shape[1:]).swapaxes(0, 1)
        return constrain(x, (None, "batch") + (None,) * (x.ndim - 2))
    return jax.tree.map(split, batch)


def merge_microbatches(x: jax.Array) -> jax.Array:
    """Inverse of `split_microbatches` for one array: [M, N / M, ...] -> [N, ...]."""
    return x.swapaxes(0, 1).reshape((-1,) + x.shape[2:])


def _num_micro(batch: Batch, micro_batch_size: int) -> int:
    if batching.is_shared(batch):
        blocks, rows = batch["tokens"].shape[:2]
        if micro_batch_size <= 0 or micro_batch_size % rows or (blocks * rows) % micro_batch_size:
            raise ValueError(f"shared-prefix batch of {blocks} blocks x {rows} rows does not split into "
                             f"micro-batches of {micro_batch_size} rows (whole blocks): pack it with "
                             "rows_per_block = micro_batch_size / data-parallel size")
        return blocks * rows // micro_batch_size
    n = batch["tokens"].shape[0]
    if micro_batch_size <= 0 or n % micro_batch_size:
        raise ValueError(f"batch of {n} sequences is not a multiple of micro_batch_size={micro_batch_size}; "
                         "fill it up with pad_batch")
    return n // micro_batch_size


SHARED_KEYS = ("prefix_tokens", "prefix_mask", "prefix_index")


def batch_logprobs(model_cfg: ModelConfig, params: Params, mb: Batch, *, temperature: float, chunk_size: int,
                   return_entropy: bool = False):
    """Log-probs (and entropy) of a micro-batch in either layout, shaped like its loss_mask."""
    if batching.is_shared(mb):
        return shared_prefix_logprobs(model_cfg, params, mb["prefix_tokens"], mb["prefix_mask"], mb["tokens"],
                                      mb["attention_mask"], mb["prefix_index"], temperature=temperature,
                                      chunk_size=chunk_size, return_entropy=return_entropy)
    return token_logprobs(model_cfg, params, mb["tokens"], mb["attention_mask"], temperature=temperature,
                          chunk_size=chunk_size, return_entropy=return_entropy)


def _combine(acc: dict, new: dict) -> dict:
    out = {}
    for k, v in new.items():
        op = jnp.maximum if k.endswith("_max") else jnp.minimum if k.endswith("_min") else jnp.add
        out[k] = op(acc[k], v.astype(jnp.float32))
    return out


def _metric_init(shape: jax.ShapeDtypeStruct, key: str) -> jax.Array:
    fill = -jnp.inf if key.endswith("_max") else jnp.inf if key.endswith("_min") else 0.0
    return jnp.full(shape.shape, fill, jnp.float32)


def accumulate_gradients(loss_fn: LossFn, params: Params, batch: Batch, micro_batch_size: int, *,
                         ref_params: Params | None = None, grad_shardings: Params | None = None):
    """Sum of the micro-batch gradients of `loss_fn` and its metrics, via `lax.scan` (a plain gradient
    when there is one micro-batch).

    loss_fn(params, ref_params, micro_batch, num_tokens, num_seqs) -> (loss, metrics) must normalise by
    the given counts, which are those of the whole batch (`grpo.batch_counts(batch["loss_mask"])`), so
    the result equals the gradient of the one-batch loss. Returns (grads: float32 tree like params,
    metrics: dict of float32 scalars including "loss"); metrics sum over micro-batches, `_max` / `_min`
    keys take the max / min.
    """
    num_micro = _num_micro(batch, micro_batch_size)
    num_tokens, num_seqs = grpo.batch_counts(batch["loss_mask"])

    def loss_and_metrics(p, mb):
        loss, metrics = loss_fn(p, ref_params, mb, num_tokens, num_seqs)
        return loss, dict(metrics, loss=loss)

    grad_fn = jax.value_and_grad(loss_and_metrics, has_aux=True)

    def shard_grads(g):
        return g if grad_shardings is None else jax.lax.with_sharding_constraint(g, grad_shardings)

    if num_micro == 1:  # no accumulator: saves a float32 copy of the params and a pass over it
        (_, metrics), grads = grad_fn(params, batch)
        grads = shard_grads(jax.tree.map(lambda g: g.astype(jnp.float32), grads))
        return grads, {k: v.astype(jnp.float32) for k, v in metrics.items()}

    micro = split_microbatches(batch, num_micro)
    _, metric_shapes = jax.eval_shape(loss_and_metrics, params, jax.tree.map(lambda x: x[0], micro))

    def body(carry, mb):
        g_acc, m_acc = carry
        mb = jax.tree.map(lambda x: constrain(x, ("batch",) + (None,) * (x.ndim - 1)), mb)
        (_, metrics), g = grad_fn(params, mb)
        g_acc = shard_grads(jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g))
        return (g_acc, _combine(m_acc, metrics)), None

    g0 = shard_grads(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))
    m0 = {k: _metric_init(s, k) for k, s in metric_shapes.items()}
    (grads, metrics), _ = jax.lax.scan(body, (g0, m0), micro)
    return grads, metrics


# -------------------------------------------------------------------------------------- update steps


class PlacedBatchFn:
    """A jitted `(state_or_params, batch)` function that first places the batch on the mesh.

    Why: a host NumPy array and a device array with the same sharding have different abstract types
    (only the latter carries the mesh), so mixing them (say NumPy tokens with `old_logprobs` from
    `make_compute_logprobs`) would compile the step a second time. `jitted` is the jax.jit object.
    """

    def __init__(self, jitted, batch_sharding: NamedSharding):
        self.jitted = jitted
        self.batch_sharding = batch_sharding

    def __call__(self, first, batch: Batch):
        return self.jitted(first, jax.device_put(batch, self.batch_sharding))


class UpdateStepFn(PlacedBatchFn):
    """The jitted `(state, batch, advance)` update of `make_update_step`, called as
    `(state, batch, advance=True)`. `advance` (a replicated bool, so both values share one compilation)
    says whether an applied update counts as an RL step for `state.step`."""

    def __init__(self, jitted, batch_sharding: NamedSharding, flag_sharding: NamedSharding):
        super().__init__(jitted, batch_sharding)
        self.flag_sharding = flag_sharding

    def __call__(self, state, batch: Batch, advance: bool = True):
        flag = jax.device_put(np.asarray(advance, bool), self.flag_sharding)
        return self.jitted(state, jax.device_put(batch, self.batch_sharding), flag)


def make_update_step(model_cfg: ModelConfig, optim_cfg: OptimConfig, mesh: jax.sharding.Mesh,
                     micro_batch_size: int, loss_fn: LossFn, *, lr_fn: Callable[[jax.Array], jax.Array],
                     advance_step: bool, keep_reference: bool = False,
                     lora_cfg: lora.LoraConfig | None = None):
    """The shared machinery of the RL and BC steps: a jitted `(state, batch, advance=True) -> (state,
    metrics)` (an `UpdateStepFn`) that accumulates `loss_fn`'s gradient over micro-batches, applies AdamW
    with learning rate `lr_fn(state.step)`, and skips non-finite updates. The state is donated; state,
    batch and metrics have explicit shardings on `mesh`, so one compilation serves every call with the
    same shapes.

    `state.step` grows by one when the update is applied (finite), `advance_step` (static: True for RL,
    False for BC) and the call's `advance` (traced: False for all but the last PPO mini-batch update of
    an RL step) all hold.

    Metrics: those of `loss_fn` plus loss, grad_norm (before clipping), lr, skipped (0/1),
    num_skipped, num_tokens, num_seqs.

    With `lora_cfg` the state's params are the adapters: `loss_fn` sees the frozen base with them
    attached (and the base as the reference policy when `keep_reference`); only the adapters move.
    """
    tx = make_optimizer(optim_cfg)
    sh = state_shardings(model_cfg, optim_cfg, mesh, keep_reference, lora_cfg)
    repl = NamedSharding(mesh, P())

    def step(state: TrainState, batch: Batch, advance: jax.Array):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            if lora_cfg is None:
                loss, ref_params = loss_fn, state.ref_params
            else:
                base = jax.lax.stop_gradient(state.base_params)
                loss = lambda adapters, *rest: loss_fn(lora.attach(base, adapters, lora_cfg), *rest)  # noqa: E731
                ref_params = base if keep_reference else None
            grads, metrics = accumulate_gradients(loss, state.params, batch, micro_batch_size,
                                                  ref_params=ref_params, grad_shardings=sh.params)
            grad_norm = optax.tree.norm(grads)
            ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            lr = lr_fn(state.step)
            params = jax.tree.map(lambda p, u: (p - lr * u).astype(p.dtype), state.params, updates)
            # jnp.where rather than lax.cond: it fuses into the update and never holds two states.
            keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
            new_state = state.replace(
                step=state.step + (ok & advance & advance_step).astype(jnp.int32),
                params=keep(params, state.params),
                opt_state=keep(opt_state, state.opt_state),
                num_skipped=state.num_skipped + (~ok).astype(jnp.int32))
            num_tokens, num_seqs = grpo.batch_counts(batch["loss_mask"])
        metrics.update(grad_norm=grad_norm, lr=lr, skipped=(~ok).astype(jnp.float32),
                       num_skipped=new_state.num_skipped.astype(jnp.float32), num_tokens=num_tokens,
                       num_seqs=num_seqs)
        return new_state, metrics

    bsh = batch_sharding(mesh)
    jitted = jax.jit(step, in_shardings=(sh, bsh, repl), out_shardings=(sh, repl), donate_argnums=0)
    return UpdateStepFn(jitted, bsh, repl)


def rl_loss(model_cfg: ModelConfig, loss_cfg: LossConfig, params: Params, ref_params: Params | None,
            mb: Batch, num_tokens: jax.Array, num_seqs: jax.Array):
    """Policy loss (+ kl_coef * KL to the reference) of one micro-batch, normalised by whole-batch
    counts. Returns (loss, metrics)."""
    logprobs = functools.partial(batch_logprobs, model_cfg, mb=mb, temperature=loss_cfg.temperature,
                                 chunk_size=loss_cfg.chunk_size)
    out = logprobs(params, return_entropy=loss_cfg.entropy_metric)
    logp, entropy = out if loss_cfg.entropy_metric else (out, None)
    # The losses see rows [N, T] in either layout (shared: the blocks' rows, response-aligned).
    rows = lambda x: None if x is None else x.reshape((-1,) + x.shape[-1:])  # noqa: E731
    mask, old = rows(mb["loss_mask"]), rows(mb["old_logprobs"])
    adv = mb["advantages"].reshape(-1) if batching.is_shared(mb) else mb["advantages"]
    logp, entropy = rows(logp), rows(entropy)
    loss, metrics = grpo.policy_loss(logp, old, adv, mask, loss_cfg.clip_low, loss_cfg.clip_high, loss_cfg.clip_c,
                                     loss_cfg.loss_agg, num_tokens=num_tokens, num_seqs=num_seqs, entropy=entropy)
    if loss_cfg.keep_reference:
        ref_logp = rows(jax.lax.stop_gradient(logprobs(ref_params)))
        kl = grpo.aggregate_loss(grpo.kl_penalty(logp, ref_logp, loss_cfg.kl_estimator), mask,
                                 loss_cfg.loss_agg, num_tokens=num_tokens, num_seqs=num_seqs)
        loss = loss + loss_cfg.kl_coef * kl
        metrics["kl_loss"] = jax.lax.stop_gradient(kl)
    return loss, metrics


def make_train_step(model_cfg: ModelConfig, loss_cfg: LossConfig, optim_cfg: OptimConfig,
                    mesh: jax.sharding.Mesh, micro_batch_size: int, lora_cfg: lora.LoraConfig | None = None):
    """The jitted RL step `(state, batch, advance=True) -> (state, metrics)` (batch layout: module
    docstring; `advance`: `make_update_step`).

    One AdamW update on the clipped policy loss over the whole batch (one PPO mini-batch), accumulated
    over micro-batches of `micro_batch_size` sequences and normalised by the batch's own token / sequence
    counts; the state must come from `create_train_state(...,
    keep_reference=loss_cfg.keep_reference)`. Metrics: `grpo.policy_loss`'s, kl_loss when kl_coef > 0,
    and those of `make_update_step`.
    """
    for name, table in (("loss_agg", grpo.LOSS_AGGREGATIONS), ("kl_estimator", grpo.KL_ESTIMATORS)):
        if getattr(loss_cfg, name) not in table:
            raise ValueError(f"LossConfig.{name}={getattr(loss_cfg, name)!r} unknown; known: {sorted(table)}")
    return make_update_step(model_cfg, optim_cfg, mesh, micro_batch_size,
                            functools.partial(rl_loss, model_cfg, loss_cfg),
                            lr_fn=functools.partial(learning_rate, optim_cfg), advance_step=True,
                            keep_reference=loss_cfg.keep_reference, lora_cfg=lora_cfg)


# --------------------------------------------------------------------------------- old log-probs


def make_compute_logprobs(model_cfg: ModelConfig, mesh: jax.sharding.Mesh, micro_batch_size: int, *,
                          temperature: float = 1.0, chunk_size: int = 512,
                          lora_cfg: lora.LoraConfig | None = None):
    """Jitted `(params, batch) -> (logprobs f32 like loss_mask, metrics)`: the old log-probs for the update
    (either layout: [N, T], or [Bk, n, S] response-aligned for a shared-prefix batch).

    Runs the chunked forward micro-batch by micro-batch (no gradient) with the same shardings as the
    train step; `params` may be the master params or the reference params. logprobs are 0 off
    `loss_mask`. Metrics: entropy (token mean over the loss mask), and when the batch has
    `sampler_logprobs`, logprob_gap_mean / logprob_gap_max = mean / max |logprobs - sampler_logprobs|
    over the loss mask (sampler vs trainer numerics; large values mean the update is off-policy).
    With `lora_cfg`, `params` is `policy_params(state, lora_cfg)` (base with the adapters attached).
    """
    repl = NamedSharding(mesh, P())
    bsh = batch_sharding(mesh)

    def fn(params, batch):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            micro = split_microbatches({k: batch[k] for k in ("tokens", "attention_mask") + SHARED_KEYS
                                        if k in batch}, _num_micro(batch, micro_batch_size))

            def body(_, mb):
                return None, batch_logprobs(model_cfg, params, mb, temperature=temperature,
                                            chunk_size=chunk_size, return_entropy=True)

            _, (logp, ent) = jax.lax.scan(body, None, micro)
            mask = batch["loss_mask"].astype(bool)
            logp = jnp.where(mask, merge_microbatches(logp), 0.0)
            ent = merge_microbatches(ent)
            num_tokens, _ = grpo.batch_counts(mask)
            metrics = {"entropy": jnp.sum(jnp.where(mask, ent, 0.0)) / num_tokens}
            if "sampler_logprobs" in batch:
                gap = jnp.where(mask, jnp.abs(logp - batch["sampler_logprobs"]), 0.0)
                metrics["logprob_gap_mean"] = jnp.sum(gap) / num_tokens
                metrics["logprob_gap_max"] = jnp.max(gap)
        return logp, metrics

    return PlacedBatchFn(jax.jit(fn, in_shardings=(policy_shardings(model_cfg, mesh, lora_cfg), bsh),
                                 out_shardings=(bsh, repl)), bsh)


# --------------------------------------------------------------------------------------- host helpers


def pad_batch(batch: dict[str, np.ndarray], multiple: int) -> dict[str, np.ndarray]:
    """Host-side: appends all-zero rows (False masks, token 0, advantage 0) so N is a multiple of
    `multiple`. Padding rows contribute nothing to any loss, gradient, normaliser or metric."""
    n = next(iter(batch.values())).shape[0]
    extra = -n % multiple
    if not extra:
        return dict(batch)
    return {k: np.concatenate([np.asarray(v), np.zeros((extra,) + np.shape(v)[1:], np.asarray(v).dtype)])
            for k, v in batch.items()}
