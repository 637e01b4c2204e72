"""The examples the mutation test measures: sampled keys, their trigger examples cut at the peak.

:func:`collect_examples` samples the keys of each tested layer, cuts each trigger example at its
peak and draws the own token its ``random`` mutation removes (:mod:`.streams`).
"""

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ffkv_lens.analysis.atlas import TriggerAtlas
from ffkv_lens.analysis.mutation.config import MutationConfig
from ffkv_lens.analysis.mutation.streams import key_rng, random_token_index, unit_order

__all__ = ["MEASURED", "ROW_FIELDS", "Examples", "collect_examples"]

ROW_FIELDS = ("layer", "key", "rank", "unit_id", "position", "m_atlas", "random_index", "n_own_tokens")
# Order of the four measured coefficients of an example.
MEASURED = ("m_orig", "m_first", "m_last", "m_random")


@dataclass
class Examples:
    """Every measured example of the tested layers, in layer, key, rank order.

    Attributes:
        rows: Column lists named by :data:`ROW_FIELDS`.
        skipped_short: ``{layer: {key: examples skipped for fewer than 2 own tokens}}``.
        units: Own tokens (no BOS) of every unit an example uses.
        head: ``(bos,)`` when the atlas was searched with BOS, else ``()``.
    """

    rows: dict[str, list[Any]]
    skipped_short: dict[int, dict[int, int]]
    units: dict[int, tuple[int, ...]]
    head: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.rows["key"])


def collect_examples(atlas: TriggerAtlas, config: MutationConfig, layers: list[int], bos: int | None) -> Examples:
    """Sample keys per layer, cut each example at its peak and draw its random token."""
    head = () if bos is None else (bos,)
    out = Examples({name: [] for name in ROW_FIELDS}, {}, {}, head)
    orders: dict[int, np.ndarray] = {}
    for layer in layers:
        table = (atlas.top if config.sign == 1 else atlas.bottom)[layer]
        rng_keys = key_rng(config.seed, layer)
        with_examples = torch.nonzero(table.units[:, 0] >= 0).flatten().numpy()
        n_keys = min(config.keys_per_layer, len(with_examples))
        keys = np.sort(rng_keys.choice(with_examples, size=n_keys, replace=False)).tolist()
        n_ex = min(config.examples, table.units.shape[1])
        skipped = out.skipped_short.setdefault(layer, {key: 0 for key in keys})
        fields = (table.units[keys, :n_ex], table.positions[keys, :n_ex], table.values[keys, :n_ex])
        for key, units, positions, values in zip(keys, *(f.tolist() for f in fields), strict=True):
            for rank, (unit, position, m_atlas) in enumerate(zip(units, positions, values, strict=True)):
                if unit < 0:
                    break
                if position < 1:  # fewer than 2 own tokens (position -1: the peak is the BOS)
                    skipped[key] += 1
                    continue
                if unit not in out.units:
                    out.units[unit] = tuple(atlas.units.get(unit)[1])
                    orders[unit] = unit_order(config.seed, unit, len(out.units[unit]))
                j = random_token_index(orders[unit], position + 1)
                row = (layer, key, rank, unit, position, m_atlas, j, position + 1)
                for name, value in zip(ROW_FIELDS, row, strict=True):
                    out.rows[name].append(value)
    return out
