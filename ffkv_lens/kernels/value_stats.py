"""Per-row statistics of a block of value logits: the torch reference (the definition).

For each row of a ``[n, d_vocab]`` block of logits (values read in the vocabulary, see
:mod:`ffkv_lens.analysis.values`): the ``k`` highest and ``k`` lowest logits with their token ids,
the max probability of ``softmax(row)`` and, for given target tokens, their ranks.

Ties: tokens are ordered by logit, then by token id (lower first), exactly, also at the k-th
place. Ranks count the tokens with a strictly greater logit (sign -1: strictly lower; rank 0 = top).

The Numba twin :mod:`ffkv_lens.kernels.value_stats_numba` has the same signature;
:func:`ffkv_lens.kernels.value_row_stats` picks one.

Example:
    >>> import torch
    >>> logits = torch.tensor([[0.0, 2.0, 2.0, -1.0]])
    >>> (top_ids, _, bottom_ids, _, _), ranks = value_row_stats(logits, 2, {1: torch.tensor([3])})
    >>> top_ids.tolist(), bottom_ids.tolist(), ranks[1].tolist()
    ([[1, 2]], [[3, 0]], [3])
"""

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ffkv_lens.kernels.softmax import logsumexp_rows

__all__ = ["count_beats", "topk_by_logit", "value_row_stats"]

_TIE_SLACK = 16  # extra candidates fetched so that a tie at the k-th place is resolved exactly


def topk_by_logit(
    logits: Float[Tensor, "memories d_vocab"], k: int, *, largest: bool = True
) -> tuple[Float[Tensor, "memories k"], Int[Tensor, "memories k"]]:
    """Top-k (``largest=False``: bottom-k) per row, ties broken by lower token id, exactly.

    ``torch.topk`` picks arbitrarily among ties; this fetches ``k + 16`` candidates, orders them
    by (logit, token id) and falls back to a full stable sort for the rare rows whose tie at the
    k-th place runs past the candidates.
    """
    n_vocab = logits.shape[-1]
    k = min(k, n_vocab)
    fetch = min(k + _TIE_SLACK, n_vocab)
    vals, ids = logits.topk(fetch, dim=-1, largest=largest, sorted=True)
    by_id = ids.argsort(dim=-1)
    vals, ids = vals.gather(-1, by_id), ids.gather(-1, by_id)
    by_val = vals.argsort(dim=-1, descending=largest, stable=True)
    vals, ids = vals.gather(-1, by_val), ids.gather(-1, by_val)
    if fetch < n_vocab:
        unsure = (vals[:, k - 1] == vals[:, fetch - 1]).nonzero().squeeze(1)
        if unsure.numel():
            full = logits[unsure].sort(dim=-1, descending=largest, stable=True)
            vals[unsure], ids[unsure] = full.values[:, :fetch], full.indices[:, :fetch]
    return vals[:, :k].contiguous(), ids[:, :k].contiguous()


def count_beats(logits: Float[Tensor, "n d_vocab"], token_ids: Int[Tensor, " n"], sign: int) -> Int[Tensor, " n"]:
    """Per row: tokens with a strictly greater (``sign=-1``: lower) logit than ``token_ids``; -1 where id < 0."""
    token_ids = token_ids.to(logits.device)
    target = logits.gather(1, token_ids.clamp_min(0)[:, None])
    beats = (logits > target) if sign == 1 else (logits < target)
    return torch.where(token_ids >= 0, beats.sum(dim=1), -1).cpu()


def value_row_stats(
    logits: Float[Tensor, "n d_vocab"], k: int, targets: dict[int, Tensor]
) -> tuple[tuple[Tensor, ...], dict[int, Tensor]]:
    """Top/bottom ``k``, max probability and target ranks of each row: the definition.

    Args:
        logits: ``[n, d_vocab]`` value logits.
        k: Entries per row in each direction (capped at ``d_vocab``).
        targets: ``{sign: [n] token ids}`` (``-1``: none) whose ranks to count.

    Returns:
        ``(top_ids, top_logits, bottom_ids, bottom_logits, max_prob)`` and ``{sign: [n] ranks}``.
    """
    top_vals, top_ids = topk_by_logit(logits, k, largest=True)
    bottom_vals, bottom_ids = topk_by_logit(logits, k, largest=False)
    max_prob = logsumexp_rows(logits, top_vals[:, 0]).reciprocal()  # exp(max - logsumexp)
    ranks = {sign: count_beats(logits, wanted, sign) for sign, wanted in targets.items()}
    return (top_ids, top_vals, bottom_ids, bottom_vals, max_prob), ranks
