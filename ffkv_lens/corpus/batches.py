"""Padded batches of units: :func:`iter_batches` groups a unit stream into right-padded tensors.

Example:
    >>> from ffkv_lens.corpus import Unit, iter_batches
    >>> units = [Unit(i, 0, tuple(range(1, n + 1)), "", None, None) for i, n in enumerate([2, 3, 1])]
    >>> [b.tokens.tolist() for b in iter_batches(units, batch_tokens=8, bos_token_id=9)]
    [[[9, 1, 2, 0], [9, 1, 2, 3]], [[9, 1]]]
"""

import dataclasses
from collections.abc import Iterable, Iterator

from jaxtyping import Int
from torch import Tensor

from ffkv_lens.corpus.units import Unit, _check_int
from ffkv_lens.errors import ConfigError
from ffkv_lens.types import Tokens

__all__ = ["UnitBatch", "iter_batches"]


def _length_sorted(units: Iterable[Unit], window: int) -> Iterator[Unit]:
    """The stream, each run of ``window`` units sorted by (token count, unit id)."""
    group: list[Unit] = []
    for unit in units:
        group.append(unit)
        if len(group) == window:
            yield from sorted(group, key=lambda u: (u.n_tokens, u.unit_id))
            group = []
    yield from sorted(group, key=lambda u: (u.n_tokens, u.unit_id))


@dataclasses.dataclass(frozen=True)
class UnitBatch:
    """Units, right-padded into one tensor.

    Attributes:
        tokens: Token ids, BOS first when ``has_bos``; padding on the right.
        attention_mask: 1 for real tokens (BOS included), 0 for padding.
        unit_ids: The units' ``unit_id``.
        lengths: The units' token counts, without BOS.
        has_bos: Whether column 0 holds a BOS token.
        units: The units themselves (texts, spans).
    """

    tokens: Tokens
    attention_mask: Int[Tensor, "batch pos"]
    unit_ids: Int[Tensor, " batch"]
    lengths: Int[Tensor, " batch"]
    has_bos: bool
    units: tuple[Unit, ...]


def _check_batching(batch_units: int | None, batch_tokens: int | None) -> None:
    if batch_units is None and batch_tokens is None:
        raise ConfigError("iter_batches needs batch_units or batch_tokens (or both); got neither.")
    _check_int("batch_units", batch_units, minimum=1, optional=True)
    _check_int("batch_tokens", batch_tokens, minimum=1, optional=True)


def _make_batch(units: list[Unit], bos_token_id: int | None, pad_token_id: int) -> UnitBatch:
    import torch

    extra = 0 if bos_token_id is None else 1
    width = extra + max(u.n_tokens for u in units)
    tokens = torch.full((len(units), width), pad_token_id, dtype=torch.int64)
    mask = torch.zeros((len(units), width), dtype=torch.int64)
    for row, unit in enumerate(units):
        if bos_token_id is not None:
            tokens[row, 0] = bos_token_id
        tokens[row, extra : extra + unit.n_tokens] = torch.tensor(unit.token_ids, dtype=torch.int64)
        mask[row, : extra + unit.n_tokens] = 1
    unit_ids = torch.tensor([u.unit_id for u in units], dtype=torch.int64)
    lengths = torch.tensor([u.n_tokens for u in units], dtype=torch.int64)
    return UnitBatch(tokens, mask, unit_ids, lengths, bos_token_id is not None, tuple(units))


def iter_batches(
    units: Iterable[Unit],
    *,
    batch_units: int | None = None,
    batch_tokens: int | None = None,
    bos_token_id: int | None = None,
    pad_token_id: int = 0,
    sort_window: int | None = None,
) -> Iterator[UnitBatch]:
    """Group units into right-padded batches, streaming.

    A batch grows while it has at most ``batch_units`` units and its padded size
    ``B x T`` (``T``: longest unit, BOS included) stays within ``batch_tokens``. A unit
    that alone exceeds ``batch_tokens`` gets a batch of its own. Without ``sort_window``
    the order is kept. With it, units are read ``sort_window`` at a time and each group
    is sorted by (token count, unit id) before batching, so that units of similar length
    share a batch and little padding is computed (sentences vary from a few tokens to
    ``max_len``); the batches are still the same for the same stream (deterministic), and
    memory holds one group of units.

    Args:
        units: The units (e.g. from :func:`iter_units`).
        batch_units: Most units per batch (``None``: no limit).
        batch_tokens: Most padded tokens per batch (``None``: no limit).
        bos_token_id: Prepended to every row when not ``None``.
        pad_token_id: Fills the padding (masked out).
        sort_window: Units sorted by length per group of this many (``None``: keep the order).

    Yields:
        :class:`UnitBatch` objects.

    Example:
        >>> units = [Unit(i, 0, tuple(range(1, n + 1)), "", None, None) for i, n in enumerate([2, 3, 1])]
        >>> [b.tokens.tolist() for b in iter_batches(units, batch_tokens=8, bos_token_id=9)]
        [[[9, 1, 2, 0], [9, 1, 2, 3]], [[9, 1]]]
    """
    _check_batching(batch_units, batch_tokens)
    _check_int("sort_window", sort_window, minimum=1, optional=True)
    if sort_window is not None:
        units = _length_sorted(units, sort_window)
    extra = 0 if bos_token_id is None else 1
    pending: list[Unit] = []
    width = 0
    for unit in units:
        new_width = max(width, extra + unit.n_tokens)
        too_many = batch_units is not None and len(pending) + 1 > batch_units
        too_big = batch_tokens is not None and (len(pending) + 1) * new_width > batch_tokens
        if pending and (too_many or too_big):
            yield _make_batch(pending, bos_token_id, pad_token_id)
            pending, new_width = [], extra + unit.n_tokens
        pending.append(unit)
        width = new_width
    if pending:
        yield _make_batch(pending, bos_token_id, pad_token_id)
