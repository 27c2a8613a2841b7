"""Host side of the updates: rollouts / experts -> padded global batches -> the jitted steps.

Each JAX process packs its own sequences; `to_global` assembles the per-process blocks into one batch
sharded over the mesh (all processes agree on the padded shape first), so the same code runs on one
CPU and on a pod.

PPO mini-batching (verl's `ppo_mini_batch_size` / `ppo_epochs`): the old log-probs are computed once per
step with the pre-update params for every sequence; then, `rl.ppo_epochs` times, the step's problems are
shuffled and split into ceil(P / `rl.mini_batch_size`) mini-batches (P: problems with sequences, over
all processes), and each mini-batch (all solution and meta sequences of its problems: no group is
split) gets one optimizer update, gradient-accumulated over micro-batches and normalised by its own
token count. The first update is on-policy (ratio 1: plain REINFORCE with the group baseline); the
later ones see ratio != 1, where clip-higher and the dual clip act.

Prefix sharing (`rl.prefix_sharing`, on by default): the RL batches are packed in the shared-prefix
layout (`batching.pack_shared`: each prompt once per block of micro_batch_size / data-parallel rows), so
the old-log-prob pass and the update compute each prompt once per block instead of once per rollout,
with the same loss and gradients (tests/rl/test_shared_prefix.py) - whenever that computes fewer tokens
than the row layout (a step whose rows share no prompts keeps rows; `actor/prefix_shared` says which).
The BC batches (one row per expert, prompts distinct) keep the row layout.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from masa_jax.models.qwen.config import ModelConfig
from masa_jax.models.qwen.lora import LoraConfig
from masa_jax.rl import batching, bc, train_step
from masa_jax.rl.bc import BCConfig
from masa_jax.rl.expert_buffer import Expert
from masa_jax.rl.sequences import TrainingSequences


def _host_metrics(metrics: dict, prefix: str) -> dict[str, float]:
    return {f"{prefix}{k}": float(v) for k, v in jax.device_get(metrics).items()}


@dataclasses.dataclass(frozen=True)
class UpdaterConfig:
    """What the updates of a run need (built from the run config by `components.updater_config`)."""
    loss: train_step.LossConfig
    optim: train_step.OptimConfig
    micro_batch_size: int
    max_len: int              # the longest sequence (prompt + response): the largest length bucket
    max_prompt_len: int = 0   # the longest prompt: the shared-prefix layout's one prefix bucket (0: per batch)
    mini_batch_size: int = 0  # problems per PPO mini-batch (0 = the whole step)
    ppo_epochs: int = 1
    bc: BCConfig = BCConfig(steps=0)  # its steps and learning rate; the log-prob chunk is loss.chunk_size
    seed: int = 0             # the adapters' initial A (fold_in 1) and, with state.step, the mini-batch shuffle
    lora: LoraConfig | None = None
    prefix_sharing: bool = True  # each prompt's forward once per block of rows that continue it


@dataclasses.dataclass
class Updater:
    """The jitted RL step, BC step and old-log-prob pass of one run, plus the initial train state."""
    model_cfg: ModelConfig
    mesh: jax.sharding.Mesh
    pad_id: int
    micro_batch_size: int
    mini_batch_size: int      # problems per PPO mini-batch (0 = the whole step)
    ppo_epochs: int
    seed: int                 # with state.step, seeds the mini-batch shuffle
    bc_steps: int
    buckets: tuple[int, ...]
    train_step: object
    bc_step: object
    compute_logprobs: object
    state: train_step.TrainState | None
    lora_cfg: object = None   # LoraConfig of a LoRA run (state.params are then the adapters), else None
    abstract_state: object = None  # the train state's ShapeDtypeStructs with shardings (restore template)
    prefix_sharing: bool = False   # RL batches in the shared-prefix layout (module docstring)
    max_prompt_len: int = 0        # the shared layout's prefix bucket is at least this one's
    data_parallel: int = 1         # mesh data x fsdp: blocks per micro-batch in the shared layout

    @classmethod
    def create(cls, ucfg: UpdaterConfig, model_cfg: ModelConfig, params, mesh: jax.sharding.Mesh, *,
               pad_id: int) -> "Updater":
        """`params`: the initial weights (a LoRA run's base), or None when the caller restores the whole
        state from a checkpoint (`abstract_state` is its template): then no state is built."""
        lcfg, ocfg, mb, lora_cfg = ucfg.loss, ucfg.optim, ucfg.micro_batch_size, ucfg.lora
        dp = mesh.shape["data"] * mesh.shape["fsdp"]
        if mb % dp:
            raise ValueError(f"rl.micro_batch_size={mb} must be a multiple of the data-parallel size {dp}")
        if params is None and lora_cfg is not None:
            raise ValueError("a LoRA updater needs the base params: checkpoints hold the adapters only")
        # The adapters' initial A from the run seed (its own stream: fold_in 1).
        state = None if params is None else train_step.create_train_state(
            model_cfg, params, ocfg, mesh, keep_reference=lcfg.keep_reference, lora_cfg=lora_cfg,
            lora_rng=jax.random.fold_in(jax.random.key(ucfg.seed), 1))
        return cls(
            model_cfg=model_cfg, mesh=mesh, pad_id=pad_id, micro_batch_size=mb,
            mini_batch_size=ucfg.mini_batch_size, ppo_epochs=ucfg.ppo_epochs, seed=ucfg.seed,
            bc_steps=ucfg.bc.steps,
            buckets=batching.default_buckets(ucfg.max_len),
            train_step=train_step.make_train_step(model_cfg, lcfg, ocfg, mesh, mb, lora_cfg=lora_cfg),
            bc_step=bc.make_bc_step(model_cfg, ocfg, mesh, mb, lr=ucfg.bc.lr, keep_reference=lcfg.keep_reference,
                                    chunk_size=lcfg.chunk_size, lora_cfg=lora_cfg),
            compute_logprobs=train_step.make_compute_logprobs(model_cfg, mesh, mb,
                                                              temperature=lcfg.temperature,
                                                              chunk_size=lcfg.chunk_size, lora_cfg=lora_cfg),
            state=state, lora_cfg=lora_cfg,
            abstract_state=train_step.abstract_train_state(model_cfg, ocfg, mesh, lcfg.keep_reference, lora_cfg),
            prefix_sharing=ucfg.prefix_sharing, data_parallel=dp, max_prompt_len=ucfg.max_prompt_len)

    def restore_template(self):
        """What a checkpoint restores into: the abstract `checkpoint_view` of the train state."""
        return train_step.checkpoint_view(self.abstract_state)

    def restored_state(self, restored: train_step.CheckpointedState) -> train_step.TrainState:
        """The train state of a restored checkpoint view: a LoRA run's frozen base put back."""
        return train_step.with_base(restored, self.state.base_params if self.lora_cfg is not None else None)

    def policy_params(self, state: train_step.TrainState):
        """The policy of `state` (the base with the adapters attached under LoRA): what is sampled from."""
        return train_step.policy_params(state, self.lora_cfg)

    # ------------------------------------------------------------------------------------ batches
    def pack(self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], **kw) -> dict:
        """This process's padded numpy batch (rows a multiple of the micro-batch size)."""
        return batching.pack_sequences(prompt_ids, response_ids, pad_id=self.pad_id,
                                       row_multiple=self.micro_batch_size, buckets=self.buckets, **kw)

    def pack_shared(self, seqs: TrainingSequences, **per_row) -> tuple[dict, np.ndarray]:
        """This process's shared-prefix batch of `seqs` (blocks of micro_batch_size / data-parallel rows,
        a multiple of the data-parallel size of them) and each sequence's (block, slot)."""
        return batching.pack_shared(seqs.prompt_ids, seqs.response_ids, pad_id=self.pad_id,
                                    rows_per_block=self.micro_batch_size // self.data_parallel,
                                    block_multiple=self.data_parallel, buckets=self.buckets,
                                    min_prefix_len=self.max_prompt_len, advantages=seqs.advantages, **per_row)

    def to_global(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """One global batch from every process's local block, sharded over (data, fsdp). Processes pad
        every dimension of their arrays to the largest over processes (at the end: local indices into a
        block stay valid)."""
        sharding = train_step.batch_sharding(self.mesh)
        if jax.process_count() == 1:
            return jax.device_put(local, sharding)
        keys = sorted(local)
        dims = np.concatenate([np.asarray(local[k].shape, np.int64) for k in keys])
        top = np.max(np.asarray(multihost_utils.process_allgather(dims)).reshape(-1, len(dims)), axis=0)
        out, at = {}, 0
        for k in keys:
            v = local[k]
            shape = top[at:at + v.ndim]
            at += v.ndim
            out[k] = jax.make_array_from_process_local_data(
                sharding, np.pad(v, [(0, int(m) - d) for m, d in zip(shape, v.shape)]))
        return out

    # ------------------------------------------------------------------------------------ updates
    def policy_update(self, state: train_step.TrainState, seqs: TrainingSequences
                      ) -> tuple[train_step.TrainState, dict]:
        """Old log-probs of the step's solution and meta rollouts with the current params, then
        `ppo_epochs` passes of one clipped-surrogate update per PPO mini-batch (module docstring).

        Metrics: the old-log-prob pass's (entropy, logprob gap), the update metrics averaged over the
        step's updates (`_max` / `_min` keys: max / min), num_updates, num_minibatches."""
        n_seqs, n_problems, host_max_problems = _global_counts(seqs.problem)
        if n_seqs == 0:  # every problem gated: nothing to learn from this step
            return state, {"actor/empty_batch": 1.0}
        shared = False
        if self.prefix_sharing:
            local, place = self.pack_shared(seqs, sampler_logprobs=seqs.sampler_logprobs)
            rows, length = batching.rows_shape(seqs.prompt_ids, seqs.response_ids,
                                               row_multiple=self.micro_batch_size, buckets=self.buckets)
            shared = _fewer_forward_tokens(_batch_size(local)[2], rows * length)
        if not shared:
            local = self.pack(seqs.prompt_ids, seqs.response_ids, advantages=seqs.advantages,
                              sampler_logprobs=seqs.sampler_logprobs)
        batch = self.to_global(local)
        old_logprobs, lp_metrics = self.compute_logprobs(self.policy_params(state), batch)
        batch = {k: v for k, v in batch.items() if k != "sampler_logprobs"}
        batch["old_logprobs"] = old_logprobs
        # Mini-batches with no problem on any process are dropped (possible when hosts are unbalanced).
        num_mb = min(num_minibatches(n_problems, self.mini_batch_size), host_max_problems)
        if num_mb == 1:  # the whole step is one mini-batch: no shuffle, no repacking
            minibatches = [batch] * self.ppo_epochs
        elif shared:
            old_local = _local_part(old_logprobs)
            old_rows = [old_local[b, j, :len(r)] for (b, j), r in zip(place, seqs.response_ids)]
            minibatches = self._shared_minibatches(seqs, old_rows, num_mb, int(state.step))
        else:
            minibatches = self._minibatches(local, old_logprobs, seqs.problem, num_mb, int(state.step))
        per_update = []
        for i, mb in enumerate(minibatches):
            last = i == num_mb * self.ppo_epochs - 1  # state.step counts the RL step once, at its end
            state, m = self.train_step(state, mb, last)
            per_update.append(m)
        metrics = _host_metrics(lp_metrics, "actor/")
        metrics.update(_combine_updates(jax.device_get(per_update), "actor/"))
        metrics["actor/num_updates"] = float(len(per_update))
        metrics["actor/num_minibatches"] = float(num_mb)
        rows, length, forward_tokens = _batch_size(local)
        metrics["actor/batch_rows"] = float(rows)
        metrics["actor/batch_len"] = float(length)  # a row's padded prompt + response
        metrics["actor/forward_tokens"] = float(forward_tokens)  # one forward over this process's batch
        metrics["actor/prefix_shared"] = float(shared)
        return state, metrics

    def _shared_minibatches(self, seqs: TrainingSequences, old_rows: list[np.ndarray], num_mb: int, step: int):
        """`_minibatches` in the shared-prefix layout: each mini-batch's sequences packed afresh, with
        their old log-probs."""
        rng = np.random.default_rng([self.seed, step])
        for _ in range(self.ppo_epochs):
            for rows in shuffled_minibatches(seqs.problem, num_mb, rng):
                local, _ = self.pack_shared(seqs.take(rows), old_logprobs=[old_rows[i] for i in rows])
                yield self.to_global(local)

    def _minibatches(self, local: dict[str, np.ndarray], old_logprobs: jax.Array, problem_of_row: np.ndarray,
                     num_mb: int, step: int):
        """Yields the step's `ppo_epochs * num_mb` global mini-batches, epoch by epoch, each epoch a new
        shuffle of this process's problems, seeded by (seed, step) so a resumed run repeats it."""
        local = {k: v for k, v in local.items() if k != "sampler_logprobs"}
        local["old_logprobs"] = _local_rows(old_logprobs, *local["tokens"].shape)
        rng = np.random.default_rng([self.seed, step])
        for _ in range(self.ppo_epochs):
            for rows in shuffled_minibatches(problem_of_row, num_mb, rng):
                yield self.to_global(take_rows(local, rows, self.micro_batch_size, self.buckets))

    def bc_update(self, state: train_step.TrainState, experts: Sequence[Expert], codec) -> tuple[
            train_step.TrainState, dict]:
        """`bc_steps` behaviour-cloning steps on the expert meta-trajectories (prompt masked); the
        rewritten output ends with the chat end-of-turn token, so BC also teaches where to stop."""
        responses = [codec.encode(e.output) + [codec.end_of_turn] for e in experts]
        batch = self.to_global(self.pack([e.prompt_ids for e in experts], responses))
        first = last = None
        for _ in range(self.bc_steps):
            state, m = self.bc_step(state, batch)
            last = _host_metrics(m, "bc/")
            first = first or last
        metrics = {"bc/experts": float(len(experts)), "bc/loss_first": first["bc/loss"],
                   "bc/loss_last": last["bc/loss"], "bc/skipped": last["bc/skipped"]}
        return state, metrics


# ------------------------------------------------------------------------------------ mini-batches


def num_minibatches(num_problems: int, mini_batch_size: int) -> int:
    """ceil(num_problems / mini_batch_size); 1 when mini_batch_size is 0 or covers the step."""
    if mini_batch_size <= 0 or num_problems <= mini_batch_size:
        return 1
    return -(-num_problems // mini_batch_size)


def shuffled_minibatches(problem_of_row: np.ndarray, num: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Row indices of `num` mini-batches: this process's problems (the distinct values of
    `problem_of_row`) in a random order from `rng`, split into `num` near-equal chunks; a mini-batch
    holds every row of its problems, in row order. Chunks are empty when there are fewer problems."""
    order = rng.permutation(np.unique(problem_of_row))
    return [np.flatnonzero(np.isin(problem_of_row, chunk)) for chunk in np.array_split(order, num)]


def take_rows(local: dict[str, np.ndarray], rows: np.ndarray, row_multiple: int,
              buckets: Sequence[int]) -> dict[str, np.ndarray]:
    """`rows` of a packed batch, padded with all-masked rows to a multiple of `row_multiple` (at least
    one multiple) and trimmed to the length bucket of its longest sequence (sequences start at 0)."""
    n = max(row_multiple, -(-len(rows) // row_multiple) * row_multiple)
    longest = int(local["attention_mask"][rows].sum(axis=1).max(initial=1))
    t = batching.bucket_length(longest, buckets) if buckets else local["tokens"].shape[1]
    out = {}
    for k, v in local.items():
        x = v[rows] if v.ndim == 1 else v[rows, :t]
        out[k] = np.concatenate([x, np.zeros((n - len(rows),) + x.shape[1:], x.dtype)])
    return out


def _global_counts(problem_of_row: np.ndarray) -> tuple[int, int, int]:
    """(sequences, problems with sequences) summed over processes, and the most problems on one."""
    local = np.array([len(problem_of_row), len(np.unique(problem_of_row))])
    if jax.process_count() == 1:
        return int(local[0]), int(local[1]), int(local[1])
    every = np.asarray(multihost_utils.process_allgather(local)).reshape(-1, 2)
    return int(every[:, 0].sum()), int(every[:, 1].sum()), int(every[:, 1].max())


def _local_part(x: jax.Array) -> np.ndarray:
    """This process's block of a batch-sharded global array (the block `to_global` put there, padded)."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    shards = {s.index[0].start or 0: s.data for s in x.addressable_shards}  # replicas share a start
    return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)])


def _local_rows(x: jax.Array, n: int, t: int) -> np.ndarray:
    """The first n rows and t columns of this process's block of a batch-sharded global array."""
    return _local_part(x)[:n, :t]


def _fewer_forward_tokens(shared_tokens: int, row_tokens: int) -> bool:
    """Whether the shared-prefix layout computes fewer tokens than the row layout, over all processes
    (they must agree: the two layouts are different programs). Rows that share no prompt (every prompt
    distinct, e.g. one rollout per problem) pay the two layouts' separate length buckets for nothing."""
    counts = np.array([shared_tokens, row_tokens], np.int64)
    if jax.process_count() > 1:
        counts = np.asarray(multihost_utils.process_allgather(counts)).reshape(-1, 2).sum(axis=0)
    return bool(counts[0] < counts[1])


def _batch_size(local: dict[str, np.ndarray]) -> tuple[int, int, int]:
    """(rows, padded row length, tokens one forward over the batch computes) of a packed batch in either
    layout."""
    if batching.is_shared(local):
        blocks, n, S = local["tokens"].shape
        return blocks * n, local["prefix_tokens"].shape[2] + S, local["prefix_tokens"].size + blocks * n * S
    return local["tokens"].shape[0], local["tokens"].shape[1], local["tokens"].size


def _combine_updates(per_update: list[dict], prefix: str) -> dict[str, float]:
    """One value per metric over a step's updates: max / min for `_max` / `_min` keys, the last value of
    the running count num_skipped, the mean otherwise."""
    out = {}
    for k in per_update[0]:
        vals = np.array([float(m[k]) for m in per_update])
        agg = np.max if k.endswith("_max") else np.min if k.endswith("_min") else np.mean
        out[prefix + k] = float(vals[-1]) if k == "num_skipped" else float(agg(vals))
    return out

