"""The settings of the per-memory statistics and the per-layer bin rule.

Example:
    >>> StatsSettings().to_dict()["histogram_bins"], bin_range(-0.3, 2.5)
    (32, (-0.5, 4.0))
"""

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from ffkv_lens.errors import ConfigError

__all__ = ["CALIBRATION_BATCH_TOKENS", "MARGIN", "STATS_DEFAULTS", "StatsSettings", "bin_edges", "bin_range"]

MARGIN = 1.25
"""The calibration slice's extremes are widened by this factor before rounding up to a power of two."""
CALIBRATION_BATCH_TOKENS = 2048
"""Padded tokens per forward of the calibration pass (fixed, so the edges do not depend on the search's batching)."""


@dataclass(frozen=True)
class StatsSettings:
    """Every setting of the per-memory statistics (recorded in ``atlas.manifest["stats"]``).

    Attributes:
        stats: Gather the statistics in the search's pass.
        density_threshold: A position counts as active for a memory when ``|m| > density_threshold``.
        histogram_bins: Uniform bins per layer (same edges for every memory of the layer).
        quantile_groups: Activation intervals per memory, each about an equal share of its positions.
        quantile_samples: Examples sampled per quantile group (and kept per bin during the search).
        quadrants: Count the gate/up sign combinations of active positions (gated MLPs only).
        quadrant_examples: Top examples (by ``|m|``) kept per memory and sign combination.
        calibration_units: Units at the start of the corpus whose coefficients set each layer's bin range.
        seed: Seed of the sampling priorities.
    """

    stats: bool = True
    density_threshold: float = 0.1
    histogram_bins: int = 32
    quantile_groups: int = 8
    quantile_samples: int = 4
    quadrants: bool = False
    quadrant_examples: int = 5
    calibration_units: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.density_threshold, (int, float)) or not self.density_threshold >= 0:
            raise ConfigError(f"density_threshold={self.density_threshold!r}; pass a number >= 0 (e.g. 0.1).")
        for name in ("histogram_bins", "quantile_groups", "quantile_samples", "quadrant_examples", "calibration_units"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}={value!r}; pass a positive integer.")
        if self.quantile_groups > self.histogram_bins:
            raise ConfigError(
                f"quantile_groups={self.quantile_groups} exceeds histogram_bins={self.histogram_bins}; groups are "
                "unions of bins: pass quantile_groups <= histogram_bins."
            )
        if self.quadrants and not self.stats:
            raise ConfigError("quadrants=True needs stats=True; pass stats=True or quadrants=False.")

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable settings."""
        out = asdict(self)
        out["density_threshold"] = float(self.density_threshold)
        return out


STATS_DEFAULTS = StatsSettings()


def _pow2_ceil(value: float) -> float:
    return 2.0 ** math.ceil(math.log2(value))


def bin_range(minimum: float, maximum: float) -> tuple[float, float]:
    """A layer's histogram range from the extremes of its calibration slice: the rule of docs/triggers.md.

    Each side is ``MARGIN`` times the extreme rounded up to a power of two (0 where no value has that
    sign), so tiny float differences in the calibration forward do not move the edges.
    """
    hi = _pow2_ceil(MARGIN * maximum) if maximum > 0 else 0.0
    lo = -_pow2_ceil(-MARGIN * minimum) if minimum < 0 else 0.0
    if hi == lo:
        hi = lo + 1.0
    return lo, hi


def bin_edges(lo: float, hi: float, bins: int) -> Tensor:
    """The ``bins + 1`` float64 edges ``lo + (hi - lo) * i / bins``."""
    return lo + (hi - lo) * torch.arange(bins + 1, dtype=torch.float64) / bins
