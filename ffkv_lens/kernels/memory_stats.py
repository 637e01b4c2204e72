"""Per-memory statistics of a block of coefficients: the torch reference (the definition; also the CUDA path).

One layer's accumulators (:class:`MemoryStatsState`) take the coefficients ``m`` of a block of candidate
positions (``[n, d_mlp]``, one row per position, with the position's unit id and raw position):

- ``count`` (positions seen), ``sums`` and ``squares`` (float64), ``active`` (``|m| > threshold``),
  ``minimum`` and ``maximum`` (float64), per memory;
- ``hist``: per memory, counts over ``bins`` uniform bins of ``[lo, hi]`` (bin of ``m``:
  ``clamp(floor((m - lo) * (bins / (hi - lo))), 0, bins - 1)`` in float64); ``outside`` counts the values
  below ``lo`` and above ``hi`` (they are in the end bins too);
- a reservoir per (memory, bin): the ``R`` positions with the lowest priority, where the priority is a
  seeded 63-bit hash of ``(layer salt, key, unit id, position)`` (:func:`priorities`), sorted ascending.
  Keeping the lowest priorities is a set function of the positions seen: the result does not depend
  on the order, the batching or the split over processes, and merges exactly (:func:`merge_reservoirs`).

The Numba twin :mod:`ffkv_lens.kernels.memory_stats_numba` has the same signature and gives identical
integers, reservoirs, minima and maxima; the float64 sums agree to rounding (summation order).
"""

from typing import NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

__all__ = [
    "EMPTY",
    "MemoryStatsState",
    "bin_index",
    "layer_salt",
    "merge_reservoirs",
    "mix",
    "priorities",
    "update_memory_stats",
]

EMPTY = (1 << 63) - 1
"""Priority of an empty reservoir slot (above every 63-bit priority)."""


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


_M1, _M2 = _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)
_GOLDEN = _signed(0x9E3779B97F4A7C15)
_UNIT, _POSITION = _signed(0xD6E8FEB86659FD93), _signed(0xA0761D6478BD642F)


def _srl(x: Tensor, shift: int) -> Tensor:
    """Logical right shift of int64 bits."""
    return (x >> shift) & ((1 << (64 - shift)) - 1)


def mix(x: Tensor) -> Tensor:
    """The splitmix64 finaliser on int64 tensors (the bits as uint64, wrapping multiplication)."""
    x = x ^ _srl(x, 30)
    x = x * _M1
    x = x ^ _srl(x, 27)
    x = x * _M2
    return x ^ _srl(x, 31)


def layer_salt(seed: int, layer: int) -> int:
    """The hash salt of one layer of a search seeded ``seed`` (a Python int, int64 bits)."""
    x = torch.tensor([_signed((seed * 0x100000001B3 + layer + 1) % (1 << 64))], dtype=torch.int64)
    return int(mix(mix(x) + _GOLDEN)[0])


def priorities(salt: int, units: Int[Tensor, " n"], positions: Int[Tensor, " n"], d_mlp: int) -> Int[Tensor, "n d_mlp"]:
    """Reservoir priorities ``[n, d_mlp]`` in ``[0, 2**63 - 1)`` of positions ``(unit, position)`` for every key."""
    base = mix((units.long() * _UNIT) ^ (positions.long() * _POSITION) ^ salt)
    keys = mix(torch.arange(d_mlp, dtype=torch.int64, device=units.device) * _GOLDEN + _GOLDEN)
    return _srl(mix(base[:, None] ^ keys[None, :]), 1)


def bin_index(m: Tensor, lo: float, hi: float, bins: int) -> Int[Tensor, "..."]:
    """The histogram bin of each coefficient (float64 arithmetic, out-of-range values in the end bins)."""
    scale = bins / (hi - lo)
    return torch.floor((m.double() - lo) * scale).clamp_(0, bins - 1).long()


class MemoryStatsState(NamedTuple):
    """One layer's accumulators; every tensor is updated in place.

    Attributes:
        count: ``[1]`` int64 candidate positions seen.
        sums: ``[d_mlp]`` float64 sum of coefficients.
        squares: ``[d_mlp]`` float64 sum of squared coefficients.
        active: ``[d_mlp]`` int64 positions with ``|m| > threshold``.
        minimum: ``[d_mlp]`` float64 (``+inf`` before any position).
        maximum: ``[d_mlp]`` float64 (``-inf`` before any position).
        hist: ``[d_mlp, bins]`` int64.
        outside: ``[d_mlp, 2]`` int64 values below ``lo`` and above ``hi``.
        priority: ``[d_mlp, bins, R]`` int64 reservoir priorities, ascending (:data:`EMPTY`: no entry).
        units: ``[d_mlp, bins, R]`` int64 unit ids (-1: no entry).
        positions: ``[d_mlp, bins, R]`` int32 raw positions in the batch row (-1: no entry).
        values: ``[d_mlp, bins, R]`` coefficients (the search's dtype).
    """

    count: Tensor
    sums: Tensor
    squares: Tensor
    active: Tensor
    minimum: Tensor
    maximum: Tensor
    hist: Tensor
    outside: Tensor
    priority: Tensor
    units: Tensor
    positions: Tensor
    values: Tensor

    @classmethod
    def empty(
        cls, d_mlp: int, bins: int, samples: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> "MemoryStatsState":
        """Accumulators before any position."""
        f64, i64 = {"dtype": torch.float64, "device": device}, {"dtype": torch.int64, "device": device}
        shape = (d_mlp, bins, samples)
        return cls(
            torch.zeros(1, **i64),
            torch.zeros(d_mlp, **f64),
            torch.zeros(d_mlp, **f64),
            torch.zeros(d_mlp, **i64),
            torch.full((d_mlp,), float("inf"), **f64),
            torch.full((d_mlp,), float("-inf"), **f64),
            torch.zeros(d_mlp, bins, **i64),
            torch.zeros(d_mlp, 2, **i64),
            torch.full(shape, EMPTY, **i64),
            torch.full(shape, -1, **i64),
            torch.full(shape, -1, dtype=torch.int32, device=device),
            torch.zeros(shape, dtype=dtype, device=device),
        )


def update_memory_stats(
    state: MemoryStatsState,
    m: Float[Tensor, "n d_mlp"],
    units: Int[Tensor, " n"],
    positions: Int[Tensor, " n"],
    *,
    lo: float,
    hi: float,
    threshold: float,
    salt: int,
) -> None:
    """Add ``n`` candidate positions (rows of ``m``) to ``state``, in place."""
    n, d_mlp = m.shape
    if n == 0:
        return
    bins = state.hist.shape[1]
    wide = m.double()
    state.count.add_(n)
    state.sums.add_(wide.sum(0))
    state.squares.add_((wide * wide).sum(0))
    state.active.add_((wide.abs() > threshold).sum(0))
    torch.minimum(state.minimum, wide.amin(0), out=state.minimum)
    torch.maximum(state.maximum, wide.amax(0), out=state.maximum)
    state.outside[:, 0] += (wide < lo).sum(0)
    state.outside[:, 1] += (wide > hi).sum(0)
    keys = torch.arange(d_mlp, device=m.device)
    cells = keys[None, :] * bins + bin_index(wide, lo, hi, bins)  # [n, d_mlp]
    state.hist.view(-1).add_(torch.bincount(cells.reshape(-1), minlength=d_mlp * bins))
    prio = priorities(salt, units, positions, d_mlp)
    threshold_of = state.priority[:, :, -1].reshape(-1)  # the R-th lowest priority of each cell
    row, key = (prio < threshold_of[cells]).nonzero(as_tuple=True)
    if row.numel():
        found = (cells[row, key], prio[row, key], units[row].long(), positions[row].int(), m[row, key])
        merge_reservoirs(state, *found)


def merge_reservoirs(
    state: MemoryStatsState,
    cells: Int[Tensor, " c"],
    priority: Int[Tensor, " c"],
    units: Int[Tensor, " c"],
    positions: Int[Tensor, " c"],
    values: Tensor,
) -> None:
    """Merge candidate entries (cell = ``key * bins + bin``) into the reservoirs: keep the ``R`` lowest priorities."""
    samples = state.priority.shape[-1]
    flat = [t.view(-1, samples) for t in (state.priority, state.units, state.positions, state.values)]
    order = torch.argsort(priority, stable=True)
    order = order[torch.argsort(cells[order], stable=True)]  # by cell, then priority
    cells, priority, units, positions, values = (t[order] for t in (cells, priority, units, positions, values))
    touched, first, counts = torch.unique_consecutive(cells, return_inverse=True, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(cells.numel(), device=cells.device) - starts[first]
    keep = rank < samples  # at most R new entries per cell can enter
    slot, rank = first[keep], rank[keep] + samples
    table = [torch.cat([part[touched], torch.empty_like(part[touched])], 1) for part in flat]
    table[0][:, samples:] = EMPTY
    for column, entries in zip(table, (priority, units, positions, values), strict=True):
        column[slot, rank] = entries[keep].to(column.dtype)
    best = torch.argsort(table[0], dim=1, stable=True)[:, :samples]
    for part, column in zip(flat, table, strict=True):
        part[touched] = column.gather(1, best)
    empty = flat[0][touched] == EMPTY
    flat[1][touched] = torch.where(empty, -1, flat[1][touched])
    flat[2][touched] = torch.where(empty, -1, flat[2][touched])
    flat[3][touched] = torch.where(empty, 0, flat[3][touched])
