"""What an export reads: a run folder (atlas, value projection, statistics) and the run's model.

:class:`ExportSource` opens the run through :class:`ffkv_lens.report.memories.RunFolder`, checks
that it holds what the chosen format needs (the atlas, the value projection, the per-memory
statistics), and yields the examples of the exported layers group by group with their per-token
coefficients recomputed by the model (:mod:`ffkv_lens.export.coefficients`) and checked against
the peaks the atlas stored.
"""

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from ffkv_lens.errors import ConfigError, RunFolderError
from ffkv_lens.export.coefficients import check_peaks, recompute
from ffkv_lens.report.memories import RunFolder

__all__ = ["EXAMPLES_PER_PASS", "ExportSource", "LayerExamples"]

# Example rows recomputed per group of layers: bounds the memory of one pass (about 250 bytes a row), not its
# results. The demo run's 30 layers (4.6 million hf-dataset rows) share one forward pass.
EXAMPLES_PER_PASS = 8_388_608
_COLUMNS = ("key", "kind", "sign", "rank", "unit_id", "doc_id", "position", "coefficient", "group", "group_lo",
            "group_hi", "group_share")  # fmt: skip


@dataclass(frozen=True)
class LayerExamples:
    """The exported examples of one layer.

    Attributes:
        layer: The layer.
        frame: One row per example: ``key``, ``kind`` (``"top"``, ``"bottom"`` or ``"quantile"``), ``sign``,
            ``rank`` (within its kind, or within its quantile group), ``unit_id``, ``doc_id``, ``position``
            (the peak, among the unit's own tokens), ``coefficient`` (the atlas's), ``group``, ``group_lo``,
            ``group_hi``, ``group_share`` (quantile rows; -1 / NaN otherwise). Sorted by key, kind, group, rank.
        tokens: The unit's token ids, per row.
        coefficients: The memory's recomputed coefficient at each of the unit's tokens, per row (float32).
    """

    layer: int
    frame: Any
    tokens: list[list[int]]
    coefficients: list[np.ndarray]


class ExportSource:
    """A run folder opened for export.

    Args:
        run_dir: The run folder (``--out`` of ``ffkv-lens run``).
        layers: Layers to export (default: every searched layer).
        stats: Whether the format needs the per-memory statistics (refused without them).
        device: Where the model runs (None: cuda if available).

    Raises:
        RunFolderError: The folder is not a run, or lacks the atlas, the value projection or (``stats``) the
            statistics.
        ConfigError: A layer was not searched.
    """

    def __init__(
        self, run_dir: str | Path, *, layers: Sequence[int] | None = None, stats: bool, device: str | None = None
    ) -> None:
        self.run = RunFolder(run_dir)
        self.atlas = self.run.atlas
        self.device = device
        if stats and not getattr(self.atlas, "has_stats", False):
            raise RunFolderError(
                f"{self.run.path} has no per-memory statistics (its trigger search ran without them); this format "
                "needs them: re-run `ffkv-lens run` without --no-stats into a new --out, then export that run."
            )
        self.projection = self.run.projection
        if self.projection is None:
            raise RunFolderError(
                f"{self.run.path} has no value projection yet (the run's values step did not finish); finish the "
                "run by re-running the same `ffkv-lens run` command, then export."
            )
        self.layers = self._layers(layers)
        config = self.run.manifest.get("config") or {}
        self.model_name: str = str(config.get("model"))
        self.dtype: str = str(config.get("dtype", "float32"))
        self._decoded: dict[int, str] = {}
        self._units: dict[int, tuple[list[int], list[str]]] = {}

    def _layers(self, layers: Sequence[int] | None) -> list[int]:
        searched = self.atlas.layers
        projected = set(self.projection.top_ids)
        if layers is None:
            return [layer for layer in searched if layer in projected]
        wrong = [layer for layer in layers if layer not in searched or layer not in projected]
        if wrong:
            raise ConfigError(f"--layers {wrong}: not in this run; its layers are {searched}: pass some of them.")
        return sorted(set(layers))

    @cached_property
    def lens(self) -> Any:
        """The run's model (its manifest's ``config.model`` and dtype), checked against the atlas."""
        import torch

        from ffkv_lens.adapters import load_model
        from ffkv_lens.lens import MemoryLens

        lens = MemoryLens(load_model(self.model_name, device=self.device, dtype=getattr(torch, self.dtype)))
        self.atlas.check_matches(lens)
        return lens

    @property
    def d_mlp(self) -> int:
        """Memories per layer."""
        return self.atlas.d_mlp

    @cached_property
    def _table(self) -> Any:
        """Every token id of the vocabulary decoded alone, as a pyarrow string array (built once per export)."""
        import pyarrow as pa

        tokenizer = self.atlas.tokenizer
        size = max(len(tokenizer), int((self.atlas.manifest.get("model_layout") or {}).get("d_vocab") or 0))
        return pa.array(tokenizer.batch_decode([[t] for t in range(size)]), type=pa.string())

    def vocabulary(self, ids: Any) -> Any:
        """The strings of token ``ids`` (:meth:`decode`'s), as a pyarrow string array, without a Python loop."""
        import pyarrow as pa

        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) and int(ids.max()) >= len(self._table):
            return pa.array(self.decode(ids.tolist()), type=pa.string())
        return self._table.take(pa.array(ids))

    def decode(self, ids: Sequence[int]) -> list[str]:
        """Each token decoded alone (a multi-byte character split over tokens shows as U+FFFD pieces)."""
        missing = sorted({int(t) for t in ids if int(t) not in self._decoded})
        if missing:
            texts = self.atlas.tokenizer.batch_decode([[t] for t in missing])
            self._decoded.update(zip(missing, texts, strict=True))
        return [self._decoded[int(t)] for t in ids]

    def unit(self, unit_id: int) -> tuple[list[int], list[str]]:
        """A stored unit's token ids and their strings (:meth:`decode`), read once per unit."""
        if unit_id not in self._units:
            ids = self.atlas.units.get(unit_id)[1]
            self._units[unit_id] = (ids, self.decode(ids))
        return self._units[unit_id]

    def value_tokens(self, layer: int, key: int) -> dict[str, list[Any]]:
        """The value's top and bottom tokens (decoded) and logits from the run's value projection."""
        p = self.projection
        top_ids, bottom_ids = p.top_ids[layer][key].tolist(), p.bottom_ids[layer][key].tolist()
        return {
            "top_tokens": self.decode(top_ids),
            "top_logits": [float(x) for x in p.top_logits[layer][key].tolist()],
            "bottom_tokens": self.decode(bottom_ids),
            "bottom_logits": [float(x) for x in p.bottom_logits[layer][key].tolist()],
        }

    def frame(self, layer: int, *, kinds: Sequence[str]) -> Any:
        """The example rows of one layer (see :attr:`LayerExamples.frame`), without coefficients recomputed."""
        import pandas as pd

        parts = []
        if "top" in kinds or "bottom" in kinds:
            triggers = self.atlas.to_pandas(layers=[layer], text=False)
            triggers["kind"] = np.where(triggers["sign"] == 1, "top", "bottom")
            triggers = triggers[triggers["kind"].isin(list(kinds))]
            parts.append(triggers.assign(group=-1, group_lo=np.nan, group_hi=np.nan, group_share=np.nan))
        if "quantile" in kinds:
            parts.append(self._quantile_rows(layer))
        frame = pd.concat([p for p in parts if len(p)], ignore_index=True) if parts else pd.DataFrame()
        if frame.empty:
            return pd.DataFrame({c: pd.Series(dtype="float64") for c in _COLUMNS})
        order = {"top": 0, "bottom": 1, "quantile": 2}
        frame = frame.assign(_kind=frame["kind"].map(order)).sort_values(
            ["key", "_kind", "group", "rank"], kind="stable"
        )
        return frame[list(_COLUMNS)].reset_index(drop=True)

    def _quantile_rows(self, layer: int) -> Any:
        """Every quantile sample of a layer at once, read from the atlas's statistics tables.

        The rows and their order are those of ``atlas.quantile_examples(layer, key)`` for each key (tested),
        without decoding any text.
        """
        import pandas as pd

        table = self.atlas.memory_stats[layer]
        d_mlp, groups, per_group = table.sample_units.shape
        keys = np.repeat(np.arange(d_mlp), groups * per_group)
        group = np.tile(np.repeat(np.arange(groups), per_group), d_mlp)
        n = int(table.count[0])
        share = table.group_count.double().numpy() / n if n else np.zeros((d_mlp, groups))
        frame = pd.DataFrame(
            {
                "key": keys, "kind": "quantile", "sign": 1, "group": group,
                "unit_id": table.sample_units.reshape(-1).numpy(),
                "position": table.sample_positions.reshape(-1).numpy(),
                "coefficient": table.sample_values.double().reshape(-1).numpy(),
                "group_lo": table.group_lo.double().numpy()[keys, group],
                "group_hi": table.group_hi.double().numpy()[keys, group],
                "group_share": share[keys, group],
            }
        )  # fmt: skip
        frame = frame[frame["unit_id"] >= 0].reset_index(drop=True)
        frame["rank"] = frame.groupby(["key", "group"]).cumcount()
        docs = {int(u): self.atlas.units.get(int(u))[0] for u in np.unique(frame["unit_id"].to_numpy())}
        frame["doc_id"] = frame["unit_id"].map(docs)
        return frame

    def examples(self, *, kinds: Sequence[str], progress: bool = False) -> Iterator[LayerExamples]:
        """The examples of every exported layer, a group of layers per model pass, coefficients checked."""
        from tqdm.auto import tqdm

        group: dict[int, Any] = {}
        for i, layer in enumerate(self.layers):
            group[layer] = self.frame(layer, kinds=kinds)
            if sum(len(f) for f in group.values()) < EXAMPLES_PER_PASS and i + 1 < len(self.layers):
                continue
            units = len(np.unique(np.concatenate([f["unit_id"].to_numpy(dtype=np.int64) for f in group.values()])))
            span = f"layers {min(group)}-{max(group)}" if len(group) > 1 else f"layer {layer}"
            with tqdm(total=units, desc=f"{span}: coefficients", unit="unit", disable=not progress) as bar:
                got = recompute(self.lens.adapter, self.atlas, group, advance=bar.update)
            check_peaks(group, got, dtype=self.dtype, model=self.model_name)
            for name, frame in group.items():
                tokens = [self.unit(int(u))[0] for u in frame["unit_id"]]
                yield LayerExamples(name, frame, tokens, got[name].values)
            group = {}
