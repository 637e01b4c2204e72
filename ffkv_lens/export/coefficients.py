"""Per-token coefficients of exported examples, recomputed from the atlas's stored units with the model.

The atlas keeps each example's unit (its token ids) and the peak coefficient, not the coefficients
of every token. :func:`recompute` runs the units again, in right-padded batches with the BOS the
search used, with one hook on ``mlp.hook_post`` per exported layer (the forward stops after the
last one), and keeps only the columns of the memories asked for. :func:`check_peaks` then compares
each recomputed peak with the coefficient the atlas stored: a model with other weights fails there.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ffkv_lens.analysis.search_config import BATCH_TOKENS
from ffkv_lens.corpus import Unit, iter_batches
from ffkv_lens.errors import AtlasMismatchError, HookNotFiredError

__all__ = ["PEAK_TOLERANCE", "Recomputed", "check_peaks", "recompute"]

# (absolute, relative) tolerance of a recomputed peak against the atlas's stored one, by model dtype:
# the same weights give the same coefficients up to float rounding (batch shapes differ from the search's).
PEAK_TOLERANCE = {"float32": (1e-4, 1e-3), "float64": (1e-8, 1e-6), "bfloat16": (2e-2, 5e-2), "float16": (1e-2, 2e-2)}


@dataclass(frozen=True)
class Recomputed:
    """Per-token coefficients of the examples of one layer, in the order of the rows asked for.

    Attributes:
        values: One float32 array per row: the memory's coefficient at each of the unit's own tokens
            (BOS not included).
        bos: The coefficient at the BOS per row (NaN when the atlas was searched without a BOS).
    """

    values: list[np.ndarray]
    bos: np.ndarray

    def at(self, row: int, position: int) -> float:
        """The recomputed coefficient of ``row`` at ``position`` (``-1``: the BOS)."""
        return float(self.bos[row] if position < 0 else self.values[row][position])


def _plan(frame: Any) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """``{unit_id: (row numbers, keys)}`` of a layer's example rows."""
    units = frame["unit_id"].to_numpy()
    keys = frame["key"].to_numpy()
    order = np.argsort(units, kind="stable")
    cuts = np.flatnonzero(np.diff(units[order])) + 1
    return {int(units[idx[0]]): (idx, keys[idx]) for idx in np.split(order, cuts) if len(idx)}


class _Collector:
    """Hooks of one layer group: keep the asked columns of ``mlp.hook_post`` for the current batch."""

    def __init__(self, adapter: Any, frames: dict[int, Any]) -> None:
        self.plans = {layer: _plan(frame) for layer, frame in frames.items()}
        self.values = {layer: [np.empty(0, np.float32)] * len(frame) for layer, frame in frames.items()}
        self.bos = {layer: np.full(len(frame), np.nan) for layer, frame in frames.items()}
        self.names = {adapter.hook_names(layer).coefficients: layer for layer in frames}
        self.fired: set[int] = set()
        self.units: list[int] = []
        self.lengths: list[int] = []
        self.extra = 0

    def start(self, batch: Any) -> None:
        self.fired, self.extra = set(), int(batch.has_bos)
        self.units, self.lengths = batch.unit_ids.tolist(), batch.lengths.tolist()

    def hook(self, tensor: torch.Tensor, hook: Any) -> None:
        layer = self.names[hook.name]
        self.fired.add(layer)
        plan = self.plans[layer]
        found = [(b, *plan[unit]) for b, unit in enumerate(self.units) if unit in plan]
        if not found:
            return
        b_rows = np.concatenate([np.full(len(idx), b) for b, idx, _ in found])
        b_keys = np.concatenate([keys for _, _, keys in found])
        where = np.concatenate([idx for _, idx, _ in found])
        got = tensor[torch.from_numpy(b_rows), :, torch.from_numpy(b_keys)].detach().float().cpu().numpy()
        for i, (row, b) in enumerate(zip(where, b_rows, strict=True)):
            self.values[layer][row] = got[i, self.extra : self.extra + self.lengths[b]].copy()
            if self.extra:
                self.bos[layer][row] = got[i, 0]


def recompute(
    adapter: Any,
    atlas: Any,
    frames: dict[int, Any],
    *,
    batch_tokens: int = BATCH_TOKENS,
    advance: Callable[[int], None] | None = None,
) -> dict[int, Recomputed]:
    """Recompute the per-token coefficients of every example row of ``frames``.

    Args:
        adapter: The model's :class:`~ffkv_lens.adapters.MemoryAdapter`.
        atlas: The run's :class:`~ffkv_lens.analysis.atlas.TriggerAtlas` (its units and BOS setting).
        frames: ``{layer: DataFrame}`` with columns ``key`` and ``unit_id`` (one row per example).
        batch_tokens: Padded tokens per forward pass.
        advance: Called with the number of units of each finished batch (a progress bar).

    Returns:
        ``{layer: Recomputed}``, rows in the order of each frame.
    """
    layers = sorted(frames)
    collector = _Collector(adapter, frames)
    unit_ids = sorted({u for plan in collector.plans.values() for u in plan})
    stored = [Unit(u, *_doc_and_tokens(atlas, u), "", None, None) for u in unit_ids]
    units = sorted(stored, key=lambda unit: (unit.n_tokens, unit.unit_id))  # similar lengths share a batch
    bos = adapter.bos_token_id if atlas.manifest["settings"].get("has_bos", False) else None
    tok = adapter.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    hooks = [(name, collector.hook) for name in collector.names]
    last = adapter.hook_names(layers[-1]).coefficients if layers else None
    for batch in iter_batches(units, batch_tokens=batch_tokens, bos_token_id=bos, pad_token_id=pad):
        collector.start(batch)
        tokens, mask = batch.tokens.to(adapter.device), batch.attention_mask.to(adapter.device)
        with torch.no_grad():
            adapter.run_with_hooks(tokens, hooks, attention_mask=mask, stop_after=last)
        if collector.fired != set(layers):
            missing = sorted(set(layers) - collector.fired)
            raise HookNotFiredError(f"mlp.hook_post of layers {missing} did not fire; this is a bug in the adapter.")
        if advance is not None:
            advance(len(collector.units))
    return {layer: Recomputed(collector.values[layer], collector.bos[layer]) for layer in layers}


def _doc_and_tokens(atlas: Any, unit_id: int) -> tuple[int, tuple[int, ...]]:
    doc_id, tokens = atlas.units.get(unit_id)
    return doc_id, tuple(tokens)


def check_peaks(frames: dict[int, Any], recomputed: dict[int, Recomputed], *, dtype: str, model: str) -> None:
    """Raise :class:`AtlasMismatchError` unless every recomputed peak matches the atlas's stored coefficient.

    Tolerance: :data:`PEAK_TOLERANCE` of the run's dtype, ``|recomputed - stored| <= atol + rtol * |stored|``.
    """
    atol, rtol = PEAK_TOLERANCE.get(dtype, PEAK_TOLERANCE["float32"])
    for layer, frame in frames.items():
        got = recomputed[layer]
        positions = frame["position"].to_numpy()
        stored = frame["coefficient"].to_numpy(dtype=np.float64)
        peaks = np.array([got.at(row, int(p)) for row, p in enumerate(positions)], dtype=np.float64)
        bad = np.flatnonzero(~(np.abs(peaks - stored) <= atol + rtol * np.abs(stored)))
        if len(bad):
            row = frame.iloc[int(bad[0])]
            raise AtlasMismatchError(
                f"model {model!r} gives coefficient {peaks[bad[0]]:.6g} for layer {layer}, key {int(row['key'])} at "
                f"position {int(row['position'])} of unit {int(row['unit_id'])}, but the run's atlas stored "
                f"{stored[bad[0]]:.6g} ({len(bad)} of {len(frame)} examples differ beyond atol {atol:g} + rtol "
                f"{rtol:g}): its weights differ from the run's; export with the model the run was made with."
            )
