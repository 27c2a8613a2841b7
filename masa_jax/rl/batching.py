"""Flat (prompt, response) sequences -> the padded arrays the jitted train step consumes.

Layout (N rows, T positions, right padding): tokens = prompt ++ response ++ pad; attention_mask marks
real tokens; loss_mask marks response tokens (aligned with `token_logprobs`, whose out[t] scores
tokens[t]). N is padded to a multiple of `row_multiple` (micro-batch x data-parallel size) with
all-masked rows, and T to a bucket, so the step compiles for few shapes.
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


def pack_sequences(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], *, pad_id: int,
                   row_multiple: int = 1, buckets: Sequence[int] = (), advantages: np.ndarray | None = None,
                   sampler_logprobs: Sequence[np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Padded numpy batch: tokens int32 [N, T], attention_mask / loss_mask bool [N, T],
    advantages float32 [N] (if given), sampler_logprobs float32 [N, T] aligned with tokens (if given)."""
    n = len(prompt_ids)
    rows = max(row_multiple, -(-n // row_multiple) * row_multiple)
    longest = max([len(p) + len(r) for p, r in zip(prompt_ids, response_ids)] + [1])
    T = bucket_length(longest, buckets) if buckets else longest
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
        adv[:n] = advantages
        batch["advantages"] = adv
    if sampler_logprobs is not None:
        batch["sampler_logprobs"] = slp
    return batch
