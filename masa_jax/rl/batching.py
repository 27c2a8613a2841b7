"""Flat (prompt, response) sequences -> the padded arrays the jitted train step consumes.

Two layouts (train_step's module docstring has the arrays):

* rows (`pack_sequences`; N rows, T positions, right padding): tokens = prompt ++ response ++ pad;
  attention_mask marks real tokens; loss_mask marks response tokens (aligned with `token_logprobs`,
  whose out[t] scores tokens[t]). N is padded to a multiple of `row_multiple` (micro-batch x
  data-parallel size) with all-masked rows, and T to a bucket, so the step compiles for few shapes.
* shared prefix (`pack_shared`): GRPO's G rollouts (and MASA's meta rollouts) of a problem share one
  prompt; the batch holds each prompt once per block and only the responses per row, so the update's
  forward computes each prompt once (`model.shared_prefix_hidden_states`). Blocks of `rows_per_block`
  rows are the unit of micro-batching and sharding; rows with the same prompt are put in the same
  block where they fit.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def bucket_length(n: int, buckets: Sequence[int]) -> int:
    """Smallest bucket >= n; beyond the largest, the next multiple of it."""
    for b in sorted(buckets):
        if n <= b:
            return int(b)
    top = max(buckets)
    return int(-(-n // top) * top)


def default_buckets(max_len: int, smallest: int = 64) -> tuple[int, ...]:
    """Powers of two from `smallest` up to the first one >= max_len."""
    out, b = [], smallest
    while b < max_len:
        out.append(b)
        b *= 2
    out.append(b)
    return tuple(out)


def rows_shape(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], *, row_multiple: int = 1,
               buckets: Sequence[int] = ()) -> tuple[int, int]:
    """(N, T) of the batch `pack_sequences` builds, without building it."""
    n = len(prompt_ids)
    longest = max([len(p) + len(r) for p, r in zip(prompt_ids, response_ids)] + [1])
    return (max(row_multiple, -(-n // row_multiple) * row_multiple),
            bucket_length(longest, buckets) if buckets else longest)


def pack_sequences(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], *, pad_id: int,
                   row_multiple: int = 1, buckets: Sequence[int] = (), advantages: np.ndarray | None = None,
                   sampler_logprobs: Sequence[np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Padded numpy batch: tokens int32 [N, T], attention_mask / loss_mask bool [N, T],
    advantages float32 [N] (if given), sampler_logprobs float32 [N, T] aligned with tokens (if given)."""
    rows, T = rows_shape(prompt_ids, response_ids, row_multiple=row_multiple, buckets=buckets)
    tokens = np.full((rows, T), pad_id, np.int32)
    attn = np.zeros((rows, T), bool)
    loss = np.zeros((rows, T), bool)
    slp = np.zeros((rows, T), np.float32)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        lp, lr = len(p), len(r)
        tokens[i, :lp] = p
        tokens[i, lp:lp + lr] = r
        attn[i, :lp + lr] = True
        loss[i, lp:lp + lr] = True
        if sampler_logprobs is not None:
            slp[i, lp:lp + lr] = sampler_logprobs[i][:lr]
    batch = {"tokens": tokens, "attention_mask": attn, "loss_mask": loss}
    if advantages is not None:
        adv = np.zeros(rows, np.float32)
        adv[:len(prompt_ids)] = advantages
        batch["advantages"] = adv
    if sampler_logprobs is not None:
        batch["sampler_logprobs"] = slp
    return batch


def pow2_bucket(n: int, cap: int) -> int:
    """The smallest power of two >= n, at most cap."""
    b = 1
    while b < n:
        b *= 2
    return min(b, cap)


def pack_shared(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], *, pad_id: int,
                rows_per_block: int, block_multiple: int = 1, buckets: Sequence[int] = (), min_prefix_len: int = 0,
                advantages: np.ndarray | None = None, sampler_logprobs: Sequence[np.ndarray] | None = None,
                old_logprobs: Sequence[np.ndarray] | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The shared-prefix batch of the sequences, and where each landed: (batch, place int64 [N, 2] =
    (block, slot)).

    Rows are ordered by prompt (prompts in order of first appearance, identical token lists grouped),
    then cut into blocks of `rows_per_block` rows; each block holds its distinct prompts once (a group cut
    by a block boundary has its prompt in both blocks). Shapes (Bk blocks, u prompts, n rows per block):
    prefix_tokens int32 / prefix_mask bool [Bk, u, P]; tokens int32 / attention_mask / loss_mask bool
    [Bk, n, S] (the responses; both masks True on real response tokens); prefix_index int32 [Bk, n];
    advantages float32 [Bk, n], sampler_logprobs / old_logprobs float32 [Bk, n, S] (response-aligned: the
    per-row arrays hold one value per response token). Bk is a multiple of `block_multiple` (the
    data-parallel size: one block per device per micro-batch); u is the next power of two of the most
    prompts one block needs (at most n); P and S are `buckets` lengths, P at least `min_prefix_len`'s
    bucket (the run's longest prompt: one prefix length for the whole run, so the step compiles for few
    shapes). Padding rows and blocks are all-False and change no loss, gradient or metric.
    """
    N, n = len(prompt_ids), rows_per_block
    keys = [tuple(int(t) for t in p) for p in prompt_ids]
    first: dict[tuple, int] = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    order = sorted(range(N), key=lambda i: (first[keys[i]], i))
    blocks = [order[b:b + n] for b in range(0, N, n)] or [[]]
    num_blocks = -(-len(blocks) // block_multiple) * block_multiple
    block_prompts = [list(dict.fromkeys(keys[i] for i in rows)) for rows in blocks]
    u = pow2_bucket(max(len(p) for p in block_prompts), n)
    longest_p = max([len(k) for k in keys] + [1, min_prefix_len])
    longest_s = max([len(r) for r in response_ids] + [1])
    P = bucket_length(longest_p, buckets) if buckets else longest_p
    S = bucket_length(longest_s, buckets) if buckets else longest_s
    out = {"prefix_tokens": np.full((num_blocks, u, P), pad_id, np.int32),
           "prefix_mask": np.zeros((num_blocks, u, P), bool),
           "tokens": np.full((num_blocks, n, S), pad_id, np.int32),
           "attention_mask": np.zeros((num_blocks, n, S), bool),
           "prefix_index": np.zeros((num_blocks, n), np.int32)}
    per_row = {"sampler_logprobs": sampler_logprobs, "old_logprobs": old_logprobs}
    for name, vals in per_row.items():
        if vals is not None:
            out[name] = np.zeros((num_blocks, n, S), np.float32)
    if advantages is not None:
        out["advantages"] = np.zeros((num_blocks, n), np.float32)
    place = np.zeros((N, 2), np.int64)
    for b, (rows, prompts) in enumerate(zip(blocks, block_prompts)):
        local = {k: j for j, k in enumerate(prompts)}
        for j, k in enumerate(prompts):
            out["prefix_tokens"][b, j, :len(k)] = k
            out["prefix_mask"][b, j, :len(k)] = True
        for slot, i in enumerate(rows):
            r = response_ids[i]
            out["tokens"][b, slot, :len(r)] = r
            out["attention_mask"][b, slot, :len(r)] = True
            out["prefix_index"][b, slot] = local[keys[i]]
            for name, vals in per_row.items():
                if vals is not None:
                    out[name][b, slot, :len(r)] = np.asarray(vals[i], np.float32)[:len(r)]
            if advantages is not None:
                out["advantages"][b, slot] = advantages[i]
            place[i] = (b, slot)
    out["loss_mask"] = out["attention_mask"].copy()
    return out, place


def is_shared(batch) -> bool:
    """Whether a batch is in the shared-prefix layout (`pack_shared`)."""
    return "prefix_tokens" in batch
