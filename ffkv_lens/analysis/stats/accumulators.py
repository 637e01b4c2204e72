"""The search-side accumulators of every searched layer: update, checkpoint, merge over ranks, finish.

:class:`MemoryStats` holds one :class:`~ffkv_lens.kernels.memory_stats.MemoryStatsState` per layer and
is fed by the trigger search's coefficient hook (:meth:`MemoryStats.update`). Every part merges exactly
over processes: integer counts and the histogram by sums, minima and maxima by min/max, reservoirs by
keeping the lowest priorities of the union; the float64 sums add the ranks' partial sums.
"""

from typing import Any

import torch
from torch import Tensor

from ffkv_lens.analysis.stats.settings import StatsSettings
from ffkv_lens.analysis.stats.tables import LayerStats, finish_layer
from ffkv_lens.distributed import World
from ffkv_lens.errors import ConfigError
from ffkv_lens.kernels import update_memory_stats
from ffkv_lens.kernels.memory_stats import EMPTY, MemoryStatsState, layer_salt, merge_reservoirs

__all__ = ["MemoryStats"]

_SUMMED = ("count", "sums", "squares", "active", "hist", "outside")


class MemoryStats:
    """Accumulators of the searched layers.

    Args:
        settings: The statistics' settings.
        layers: The searched layers.
        d_mlp: Memories per layer.
        device: Where the coefficients are.
        dtype: The search's coefficient dtype (float32 or float64).
        adapter: The model's adapter; needed for ``settings.quadrants`` (gate and up hooks).
    """

    def __init__(
        self,
        settings: StatsSettings,
        layers: list[int],
        d_mlp: int,
        device: torch.device,
        dtype: torch.dtype,
        adapter: Any = None,
    ) -> None:
        self.settings, self.layers = settings, layers
        bins, samples = settings.histogram_bins, settings.quantile_samples
        self.states = {layer: MemoryStatsState.empty(d_mlp, bins, samples, device, dtype) for layer in layers}
        self.salts = {layer: layer_salt(settings.seed, layer) for layer in layers}
        self.ranges: dict[int, tuple[float, float]] | None = None  # set by calibration or a checkpoint
        self.quadrants = None
        if settings.quadrants:
            from ffkv_lens.analysis.stats.quadrants import QuadrantStats

            threshold = float(settings.density_threshold)
            self.quadrants = QuadrantStats(adapter, layers, settings.quadrant_examples, threshold, dtype)

    def hooks(self) -> list[tuple[str, Any]]:
        """Extra hooks of the search's forward (the gate and up projections, with quadrants), else none."""
        return [] if self.quadrants is None else self.quadrants.hooks()

    def update(self, layer: int, m: Tensor, valid: Tensor, unit_ids: Tensor) -> None:
        """Add one batch's candidate positions (``valid``) of ``m`` ``[batch, pos, d_mlp]``."""
        if self.ranges is None:
            raise ConfigError(
                "The statistics have no histogram ranges yet; call MemoryStats.calibrate(...) before the first batch "
                "(search_triggers does), or pass stats=StatsSettings(stats=False) to TriggerSearch."
            )
        rows, positions = valid.nonzero(as_tuple=True)
        lo, hi = self.ranges[layer]
        update_memory_stats(
            self.states[layer], m[rows, positions], unit_ids[rows], positions,
            lo=lo, hi=hi, threshold=float(self.settings.density_threshold), salt=self.salts[layer],
        )  # fmt: skip
        if self.quadrants is not None:
            self.quadrants.update(layer, m, valid, unit_ids)

    def calibrate(self, adapter: Any, corpus: Any, config: Any, here: World) -> None:
        """Set each layer's histogram range from the calibration slice (the same on every rank)."""
        from ffkv_lens.analysis.stats.calibration import calibrate
        from ffkv_lens.distributed import all_gather_varlen

        found = calibrate(adapter, corpus, config, self.settings, self.layers)
        pairs = torch.tensor([found[layer] for layer in self.layers], dtype=torch.float64)
        gathered = torch.stack([g.view(-1, 2) for g in all_gather_varlen(pairs.reshape(-1), here)])
        lows, highs = gathered[..., 0].amin(0), gathered[..., 1].amax(0)
        self.ranges = {layer: (float(lo), float(hi)) for layer, lo, hi in zip(self.layers, lows, highs, strict=True)}

    def referenced_units(self) -> Tensor:
        """Every unit id a reservoir holds (int64, with duplicates)."""
        parts = [state.units.reshape(-1) for state in self.states.values()]
        ids = torch.cat(parts).cpu() if parts else torch.zeros(0, dtype=torch.int64)
        if self.quadrants is not None:
            ids = torch.cat([ids, self.quadrants.referenced_units()])
        return ids[ids >= 0]

    def describe(self) -> dict[str, Any]:
        """The settings and each layer's range, for the manifest and the search identity."""
        ranges = {str(layer): list(pair) for layer, pair in sorted((self.ranges or {}).items())}
        return dict(self.settings.to_dict(), ranges=ranges)

    # -- checkpoints -------------------------------------------------------------------------
    def tensors(self) -> dict[str, Tensor]:
        """Every accumulator as ``stats.<layer>.<field>`` (for the checkpoint)."""
        out = {
            f"stats.{layer}.{name}": getattr(state, name).detach().contiguous().cpu()
            for layer, state in self.states.items()
            for name in MemoryStatsState._fields
        }
        return out if self.quadrants is None else {**out, **self.quadrants.tensors()}

    def restore(self, tensors: dict[str, Tensor], like: Any) -> None:
        """Take the accumulators from a checkpoint's ``tensors``; ``like(tensors, name, current)`` checks each."""
        for layer, state in self.states.items():
            parts = [like(tensors, f"stats.{layer}.{name}", getattr(state, name)) for name in state._fields]
            self.states[layer] = MemoryStatsState(
                *(p.to(device=c.device, dtype=c.dtype) for p, c in zip(parts, state, strict=True))
            )
        if self.quadrants is not None:
            self.quadrants.restore(tensors, like)

    # -- torchrun ----------------------------------------------------------------------------
    def merge_world(self, here: World) -> None:
        """Combine every rank's accumulators into those of the whole corpus, on every rank."""
        from ffkv_lens.distributed import all_gather_varlen, all_sum_

        if not here.distributed:
            return
        if self.quadrants is not None:
            self.quadrants.merge_world(here)
        for state in self.states.values():
            for name in _SUMMED:
                all_sum_(getattr(state, name), here)
            lows = all_gather_varlen(state.minimum, here)
            highs = all_gather_varlen(state.maximum, here)
            state.minimum.copy_(torch.stack(lows).amin(0))
            state.maximum.copy_(torch.stack(highs).amax(0))
            gathered = [all_gather_varlen(getattr(state, n).reshape(-1), here) for n in _RESERVOIR]
            cells = torch.arange(state.priority.numel(), device=state.priority.device) // state.priority.shape[-1]
            for rank in range(here.size):
                if rank == here.rank:
                    continue
                prio, units, positions, values = (g[rank] for g in gathered)
                keep = prio != EMPTY
                merge_reservoirs(state, cells[keep], prio[keep], units[keep], positions[keep], values[keep])

    def finish(self, shift: int) -> dict[int, LayerStats]:
        """The stored statistics of every layer (``shift``: 1 when rows start with a BOS)."""
        settings, ranges = self.settings, self.ranges or {}
        out = {}
        for layer, state in self.states.items():
            extra = {} if self.quadrants is None else self.quadrants.finish(layer, shift)
            out[layer] = finish_layer(state, ranges.get(layer, (0.0, 1.0)), settings.quantile_groups, shift, extra)
        return out


_RESERVOIR = ("priority", "units", "positions", "values")
