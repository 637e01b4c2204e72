"""Batching of the mutation test's sequences: right padding and the split into forward passes."""

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from ffkv_lens.adapters import MemoryAdapter

__all__ = ["FORWARD_OVERHEAD_TOKENS", "batch_bounds", "cheapest_bounds", "pad_token", "padded"]


def pad_token(adapter: MemoryAdapter) -> int:
    """The id right padding uses: the tokenizer's pad token, else its EOS, else 0."""
    tok = adapter.tokenizer
    return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)


def padded(rows: list[tuple[int, ...]], pad: int) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Right-padded token ids and the attention mask (1 on real tokens)."""
    lengths = torch.tensor([len(r) for r in rows])
    width = int(lengths.max())
    tokens = torch.full((len(rows), width), pad, dtype=torch.int64)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row)
    return tokens, (torch.arange(width) < lengths[:, None]).long()


def batch_bounds(lengths: list[int], batch_tokens: int) -> list[tuple[int, int]]:
    """Split ascending ``lengths`` into runs whose padded size (rows x longest) fits ``batch_tokens``."""
    bounds, start = [], 0
    for i, length in enumerate(lengths):
        if i > start and (i - start + 1) * length > batch_tokens:
            bounds.append((start, i))
            start = i
    if lengths:
        bounds.append((start, len(lengths)))
    return bounds


# Fixed cost of one forward pass in padded tokens per layer run (hook and module-call overhead,
# about this many tokens' worth on SmolLM2-135M on the CPU; docs/mutation.md).
FORWARD_OVERHEAD_TOKENS = 64


def cheapest_bounds(lengths: np.ndarray, depths: np.ndarray, batch_tokens: int) -> list[tuple[int, int]]:
    """Split rows, in the given order, into consecutive batches of least modelled cost.

    A batch of rows ``s .. e - 1`` costs ``(max depth + 1) * (rows * max length + FORWARD_OVERHEAD_TOKENS)``
    (padded tokens times layers run, plus a fixed overhead per forward) and holds at most
    ``batch_tokens`` padded tokens unless it is a single row. Exact minimum by dynamic programming
    over the split points; rows sorted by length pad least.
    """
    n = len(lengths)
    window = max(1, batch_tokens // max(1, int(lengths.min()))) if n else 1
    best, start = np.zeros(n + 1), np.zeros(n + 1, dtype=np.int64)
    for end in range(1, n + 1):
        first = max(0, end - window)
        starts = np.arange(first, end)
        depth = np.maximum.accumulate(depths[first:end][::-1])[::-1]
        width = np.maximum.accumulate(lengths[first:end][::-1])[::-1]
        rows = end - starts
        cost = best[first:end] + (depth + 1) * (rows * width + FORWARD_OVERHEAD_TOKENS)
        cost[(rows * width > batch_tokens) & (rows > 1)] = np.inf
        pick = int(np.argmin(cost))
        best[end], start[end] = cost[pick], starts[pick]
    bounds, end = [], n
    while end > 0:
        bounds.append((int(start[end]), end))
        end = int(start[end])
    return bounds[::-1]
