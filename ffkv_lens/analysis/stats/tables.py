"""What the atlas stores per layer (:class:`LayerStats`), built at the end of the search (:func:`finish_layer`).

Quantile groups: a memory's bins, in ascending order of coefficient, are assigned to ``G`` groups by the
middle of each bin's share of the memory's positions (bin ``b`` with ``c_b`` of ``n`` positions, ``C_b``
before it, goes to group ``floor(G * (2 C_b + c_b) / (2 n))``), so each group is a union of consecutive
bins holding about ``1/G`` of the positions (exactly so at bin resolution). A group's sample is the
``R`` lowest priorities among its bins' reservoirs: a uniform sample without replacement of the group's
positions, since each bin's reservoir holds its ``R`` lowest.
"""

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from ffkv_lens.analysis.stats.settings import bin_edges
from ffkv_lens.kernels.memory_stats import EMPTY, MemoryStatsState

__all__ = ["LayerStats", "finish_layer"]


@dataclass(frozen=True)
class LayerStats:
    """One layer's statistics, as stored in ``stats.safetensors`` (``<layer>.<field>``).

    Attributes:
        count: ``[1]`` int64 candidate positions (the same for every memory of the layer).
        sums, squares: ``[d_mlp]`` float64 sums of m and m**2.
        active: ``[d_mlp]`` int64 positions with ``|m| > density_threshold``.
        minimum, maximum: ``[d_mlp]`` float64 (``+inf``/``-inf`` when no position was seen).
        hist: ``[d_mlp, bins]`` int64.
        outside: ``[d_mlp, 2]`` int64 values below and above the layer's range (counted in the end bins).
        group_lo, group_hi: ``[d_mlp, G]`` float64 interval of each quantile group (NaN when empty).
        group_count: ``[d_mlp, G]`` int64 positions in each group.
        sample_units: ``[d_mlp, G, R]`` int64 unit ids of the sampled examples (-1: none).
        sample_positions: ``[d_mlp, G, R]`` int64 positions among the unit's own tokens (-1: BOS or none).
        sample_values: ``[d_mlp, G, R]`` float32/float64 coefficients.
        quadrant_counts: ``[d_mlp, 4]`` int64 active positions per gate/up sign combination (quadrants only).
        quadrant_units, quadrant_positions: ``[d_mlp, 4, K]`` int64 top examples per combination (-1: none).
        quadrant_values: ``[d_mlp, 4, K]`` their coefficients m.
    """

    count: Tensor
    sums: Tensor
    squares: Tensor
    active: Tensor
    minimum: Tensor
    maximum: Tensor
    hist: Tensor
    outside: Tensor
    group_lo: Tensor
    group_hi: Tensor
    group_count: Tensor
    sample_units: Tensor
    sample_positions: Tensor
    sample_values: Tensor
    quadrant_counts: Tensor | None = None
    quadrant_units: Tensor | None = None
    quadrant_positions: Tensor | None = None
    quadrant_values: Tensor | None = None

    def tensors(self, layer: int) -> dict[str, Tensor]:
        """``{"<layer>.<field>": tensor}`` for safetensors."""
        parts = {f.name: getattr(self, f.name) for f in fields(self)}
        return {f"{layer}.{name}": t.contiguous().cpu() for name, t in parts.items() if t is not None}


def group_of_bins(hist: Tensor, groups: int) -> Tensor:
    """``[d_mlp, bins]`` the quantile group of each bin (integer arithmetic, see the module docstring)."""
    total = hist.sum(1, keepdim=True)
    before = torch.cumsum(hist, 1) - hist
    group = torch.div(groups * (2 * before + hist), (2 * total).clamp_min(1), rounding_mode="floor")
    return group.clamp_(0, groups - 1)


def finish_layer(
    state: MemoryStatsState,
    bin_range: tuple[float, float],
    groups: int,
    shift: int,
    quadrants: dict[str, Tensor] | None = None,
) -> LayerStats:
    """Turn one layer's accumulators into its stored statistics (quantile groups and their samples)."""
    hist = state.hist.cpu()
    d_mlp, bins = hist.shape
    samples = state.priority.shape[-1]
    group = group_of_bins(hist, groups)
    count = torch.zeros(d_mlp, groups, dtype=torch.int64).scatter_add_(1, group, hist)
    edges = bin_edges(*bin_range, bins)
    filled = hist > 0
    lows = torch.where(filled, edges[:-1].expand(d_mlp, bins), float("inf"))
    highs = torch.where(filled, edges[1:].expand(d_mlp, bins), float("-inf"))
    group_lo = torch.full((d_mlp, groups), float("inf"), dtype=torch.float64).scatter_reduce_(1, group, lows, "amin")
    group_hi = torch.full((d_mlp, groups), float("-inf"), dtype=torch.float64).scatter_reduce_(1, group, highs, "amax")
    group_lo[count == 0], group_hi[count == 0] = float("nan"), float("nan")
    units, positions, values = _group_samples(state, group, groups, samples)
    positions = torch.where(units >= 0, positions - shift, -1)
    return LayerStats(
        state.count.cpu(), state.sums.cpu(), state.squares.cpu(), state.active.cpu(), state.minimum.cpu(),
        state.maximum.cpu(), hist, state.outside.cpu(), group_lo, group_hi, count, units, positions, values,
        **(quadrants or {}),
    )  # fmt: skip


def _group_samples(state: MemoryStatsState, group: Tensor, groups: int, samples: int) -> tuple[Tensor, ...]:
    """Per memory and group, the ``R`` entries of lowest priority among the group's bins' reservoirs."""
    d_mlp, bins = group.shape
    prio = state.priority.cpu().reshape(d_mlp, bins * samples)
    entry_group = group.repeat_interleave(samples, dim=1)
    entry_group = torch.where(prio == EMPTY, groups, entry_group)  # empty slots go to a discarded group
    order = torch.argsort(prio, dim=1, stable=True)
    order = order.gather(1, torch.argsort(entry_group.gather(1, order), dim=1, stable=True))
    sorted_group = entry_group.gather(1, order)
    first = torch.searchsorted(sorted_group, sorted_group)
    rank = torch.arange(bins * samples).expand(d_mlp, -1) - first
    keep = (rank < samples) & (sorted_group < groups)
    slot = torch.where(keep, sorted_group * samples + rank, groups * samples)
    out = []
    for part, fill in ((state.units, -1), (state.positions, -1), (state.values, 0)):
        flat = part.cpu().reshape(d_mlp, bins * samples).gather(1, order)
        dtype = torch.int64 if fill == -1 else flat.dtype
        target = torch.full((d_mlp, groups * samples + 1), fill, dtype=dtype)
        target.scatter_(1, slot, flat.to(dtype))
        out.append(target[:, :-1].reshape(d_mlp, groups, samples))
    return tuple(out)
