"""The atlas's views of the per-memory statistics as pandas DataFrames (mixed into ``TriggerAtlas``).

Column names are fixed by the statistics contract (docs/triggers.md, "Per-memory statistics").
"""

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ffkv_lens.analysis.stats.settings import bin_edges
from ffkv_lens.analysis.stats.tables import LayerStats
from ffkv_lens.errors import ConfigError

__all__ = ["QUADRANTS", "StatsViews"]

QUADRANTS = ("gate+ up+", "gate+ up-", "gate- up+", "gate- up-")


class StatsViews:
    """Statistics methods of :class:`~ffkv_lens.analysis.atlas.TriggerAtlas`.

    The class using it provides ``manifest``, ``memory_stats``, ``units`` and ``_decode``.
    """

    manifest: dict[str, Any]
    memory_stats: dict[int, LayerStats] | None
    units: Any

    _decode: Callable[[list[int]], str]  # TriggerAtlas._decode

    @property
    def has_stats(self) -> bool:
        """Whether the search gathered per-memory statistics (``stats=True``)."""
        return self.memory_stats is not None

    @property
    def has_quadrants(self) -> bool:
        """Whether the search counted gate/up sign combinations (``quadrants=True`` on a gated model)."""
        return self.has_stats and bool(self.manifest.get("stats", {}).get("quadrants"))

    @property
    def stats_settings(self) -> dict[str, Any]:
        """The statistics' settings and each layer's histogram range, as recorded (``manifest["stats"]``)."""
        return dict(self.manifest.get("stats") or {"stats": False})

    def _layer_stats(self, layer: int, key: int | None = None) -> LayerStats:
        if self.memory_stats is None:
            raise ConfigError(
                "This atlas has no per-memory statistics (searched with stats=False); search again with stats=True "
                "(ffkv-lens run without --no-stats)."
            )
        if layer not in self.memory_stats:
            raise ConfigError(f"layer={layer!r} was not searched; searched layers: {sorted(self.memory_stats)}.")
        table = self.memory_stats[layer]
        if key is not None and not (isinstance(key, int) and 0 <= key < table.sums.shape[0]):
            raise ConfigError(f"key={key!r} is out of range for d_mlp={table.sums.shape[0]}.")
        return table

    def stats(self, layer: int, key: int | None = None) -> Any:
        """Columns ``layer, key, count, mean, std, density, min, max``; ``key=None``: every memory, by key.

        ``std`` is the population standard deviation; with no position, mean, std, density, min and
        max are NaN.
        """
        import pandas as pd

        table = self._layer_stats(layer, key)
        keys = torch.arange(table.sums.shape[0]) if key is None else torch.tensor([key])
        n = int(table.count[0])
        mean = table.sums[keys] / n if n else torch.full((len(keys),), float("nan"), dtype=torch.float64)
        var = (table.squares[keys] / n - mean * mean).clamp_min(0) if n else mean
        seen = n > 0
        return pd.DataFrame(
            {
                "layer": layer,
                "key": keys.numpy(),
                "count": n,
                "mean": mean.numpy(),
                "std": var.sqrt().numpy(),
                "density": (table.active[keys].double() / n).numpy() if seen else mean.numpy(),
                "min": table.minimum[keys].numpy() if seen else mean.numpy(),
                "max": table.maximum[keys].numpy() if seen else mean.numpy(),
            }
        )

    def histogram_edges(self, layer: int) -> Tensor:
        """The layer's ``bins + 1`` float64 bin edges (the same for every memory of the layer)."""
        self._layer_stats(layer)
        lo, hi = self.manifest["stats"]["ranges"][str(layer)]
        return bin_edges(float(lo), float(hi), int(self.manifest["stats"]["histogram_bins"]))

    def histograms(self, layer: int) -> Tensor:
        """``[d_mlp, bins]`` int64 counts of every memory of the layer (values outside the range in the end bins)."""
        return self._layer_stats(layer).hist

    def histogram(self, layer: int, key: int) -> Any:
        """Columns ``bin_lo, bin_hi, count``: one row per bin of the memory's histogram."""
        import pandas as pd

        counts = self._layer_stats(layer, key).hist[key]
        edges = self.histogram_edges(layer)
        return pd.DataFrame({"bin_lo": edges[:-1].numpy(), "bin_hi": edges[1:].numpy(), "count": counts.numpy()})

    def quantile_examples(self, layer: int, key: int) -> Any:
        """Sampled examples of each quantile group (columns in docs/triggers.md), group 0 the lowest interval."""
        import pandas as pd

        table = self._layer_stats(layer, key)
        n = int(table.count[0])
        rows = []
        for group in range(table.group_count.shape[1]):
            share = int(table.group_count[key, group]) / n if n else 0.0
            lo, hi = float(table.group_lo[key, group]), float(table.group_hi[key, group])
            picks = zip(table.sample_units[key, group].tolist(), table.sample_positions[key, group].tolist(),
                        table.sample_values[key, group].double().tolist(), strict=True)  # fmt: skip
            for unit, position, value in picks:
                if unit >= 0:
                    rows.append((group, lo, hi, share, unit, *self._sample_row(unit, position), value))
        columns = ["group", "group_lo", "group_hi", "group_share", "unit_id", "doc_id", "position", "text", "token",
                   "coefficient"]  # fmt: skip
        frame = pd.DataFrame(rows, columns=columns)
        return frame[columns[:7] + ["coefficient", "text", "token"]]

    def _sample_row(self, unit: int, position: int) -> tuple[int, int, str, str]:
        """``(doc_id, position, text, token)`` of a stored example (position -1: the BOS, text '')."""
        doc, tokens = self.units.get(unit)
        if position < 0:
            return doc, position, "", ""
        return doc, position, self._decode(tokens[: position + 1]), self._decode([tokens[position]])

    def _no_quadrants(self) -> ConfigError:
        return ConfigError(
            "This atlas has no gate/up quadrants; search with quadrants=True (CLI --quadrants) on a gated model "
            "(e.g. smollm2-135m, gemma3-270m)."
        )

    def _quadrant_table(self, layer: int, key: int) -> LayerStats:
        if not self.has_quadrants:
            raise self._no_quadrants()
        return self._layer_stats(layer, key)

    def quadrants(self, layer: int, key: int) -> Any:
        """Columns ``quadrant, gate_sign, up_sign, count, share``: the memory's active positions per sign pair.

        ``+`` is a value ``> 0``, ``-`` one ``<= 0``; shares sum to 1 when the memory has an active position.
        """
        import pandas as pd

        counts = self._quadrant_table(layer, key).quadrant_counts[key]  # type: ignore[index]
        total = int(counts.sum())
        return pd.DataFrame(
            {
                "quadrant": list(QUADRANTS),
                "gate_sign": ["+", "+", "-", "-"],
                "up_sign": ["+", "-", "+", "-"],
                "count": counts.numpy(),
                "share": (counts.double() / total).numpy() if total else [0.0] * 4,
            }
        )

    def quadrant_examples(self, layer: int, key: int) -> Any:
        """Columns ``quadrant, rank, unit_id, doc_id, position, coefficient, text, token``: top examples by ``|m|``."""
        import pandas as pd

        table = self._quadrant_table(layer, key)
        rows = []
        for q, name in enumerate(QUADRANTS):
            picks = zip(table.quadrant_units[key, q].tolist(), table.quadrant_positions[key, q].tolist(),  # type: ignore[index]
                        table.quadrant_values[key, q].double().tolist(), strict=True)  # type: ignore[index]  # fmt: skip
            for rank, (unit, position, value) in enumerate(p for p in picks if p[0] >= 0):
                doc, position, text, token = self._sample_row(unit, position)
                rows.append((name, rank, unit, doc, position, value, text, token))
        columns = ["quadrant", "rank", "unit_id", "doc_id", "position", "coefficient", "text", "token"]
        return pd.DataFrame(rows, columns=columns)
