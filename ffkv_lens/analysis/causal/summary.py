"""Tables of :func:`~ffkv_lens.analysis.causal.causal_agreement`: per example, per memory, per layer.

Per memory, each effect is the mean over its measured examples; per layer, the mean over its
memories (each memory weighs the same) with a percentile bootstrap interval over memories.
"""

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ffkv_lens.adapters import MemoryAdapter

__all__ = ["DEFINITIONS", "EFFECTS", "CausalAgreementResult", "spearman", "summarise"]

BOOTSTRAP_STREAM = 2
# Per-memory means that the per-layer table reports with intervals.
EFFECTS = (
    "total_next",
    "total_value",
    "direct_next",
    "direct_value",
    "direct_logit_frozen_next",
    "direct_logit_frozen_value",
    "control_total_next",
    "control_total_value",
    "control_direct_next",
    "control_direct_value",
    "causal_score",
)
DEFINITIONS = {
    "sample": "keys_per_layer memories per layer drawn without replacement, numpy default_rng([seed, layer, 0]), "
    "among memories with a top-`examples` trigger example followed by a next token (settings.sampled_keys)",
    "prefix": "[BOS] + unit tokens[:position + 1] when the atlas was searched with BOS, else unit "
    "tokens[:position + 1]",
    "ablation": "the memory's coefficient (mlp.hook_post) set to 0 at the prefix's last position (the peak) only",
    "effect": "clean - ablated, read at the prefix's last position (positive: the memory promotes the token)",
    "next": "the example's next token (unit token at position + 1)",
    "value": "the value's top token (value_logits argmax), or its bottom token when the clean coefficient is < 0",
    "total": "effect on log p with the ablation flowing through every later layer",
    "direct": "effect on log p of removing only the memory's term (m / s_post) v from the final residual, the "
    "final norm recomputed (later layers unchanged)",
    "direct_logit_frozen": "effect on the logit centred over the vocabulary, final norm scale frozen, before any "
    "soft-cap: (m / s_post) value_logits[key, token] / s_final, the memory's contributions() entry",
    "control": "per example, a memory of the same layer drawn uniformly (default_rng([seed, layer, 1, key, rank])) "
    "among those whose |m| rank at the ablated position (largest first) is within control_window ranks of the "
    "memory's own, itself excluded; ablated the same way; its value token is its own",
    "causal_score": "per memory: mean total_next minus the mean total_next of its controls (same next tokens)",
    "beats_control": "per memory: causal_score > 0",
    "share_beats_control": "per layer: share of memories that beat their control (the causal agreement)",
    "correlational": "agrees / precision_at_k from value_agreement's per-memory table when passed (top-1 trigger, "
    "all k examples), else computed from the measured examples (first measured example; measured examples)",
    "spearman": "per layer: Spearman rank correlation (average ranks for ties) of total_next with precision_at_k "
    "over the sampled memories; NaN with fewer than 3 memories or a constant column",
    "ci": "percentile bootstrap over the layer's memories (n_bootstrap resamples, default_rng([seed, layer, 2]))",
}


@dataclass(frozen=True, eq=False)
class CausalAgreementResult:
    """Causal agreement of every tested layer.

    Attributes:
        per_layer: One row per layer: means and intervals of :data:`EFFECTS`, ``share_beats_control``,
            ``correlational_agreement``, ``spearman_total_next_precision`` and counts.
        per_memory: One row per sampled (layer, key): mean effects, control means, ``causal_score``,
            ``beats_control``, ``agrees``, ``precision_at_k``.
        per_example: One row per (memory, example): every effect of the memory and of its control.
        settings: Every setting and definition behind the numbers (the sampled keys included).
    """

    per_layer: Any
    per_memory: Any
    per_example: Any
    settings: dict[str, Any]

    def to_pandas(self) -> Any:
        """The per-layer table."""
        return self.per_layer


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation with average ranks for ties (NaN: fewer than 3 pairs or a constant side)."""
    keep = ~(np.isnan(x) | np.isnan(y))
    if keep.sum() < 3:
        return math.nan
    rx, ry = pd.Series(x[keep]).rank().to_numpy(), pd.Series(y[keep]).rank().to_numpy()
    if rx.std() == 0 or ry.std() == 0:
        return math.nan
    return float(np.corrcoef(rx, ry)[0, 1])


def _decode(adapter: MemoryAdapter, frame: pd.DataFrame, columns: list[str]) -> None:
    ids = sorted({int(t) for c in columns for t in frame[c]})
    text = dict(zip(ids, adapter.tokenizer.batch_decode([[t] for t in ids]), strict=True))
    for column in columns:
        frame[column.removesuffix("_id")] = [text[int(t)] for t in frame[column]]


def _per_memory(per_example: pd.DataFrame, agreement: Any) -> pd.DataFrame:
    means = [c for c in per_example.columns if c.startswith(("total_", "direct_", "control_total", "control_direct"))]
    groups = per_example.groupby(["layer", "key"], sort=True)
    out = groups[means].mean()
    out["n_examples"] = groups.size()
    first = groups.first()  # rows are in rank order: the first is the top measured example
    for column in ("value_token_id", "value_token"):
        out[column] = first[column]
    out["causal_score"] = out["total_next"] - out["control_total_next"]
    out["beats_control"] = out["causal_score"] > 0
    hit = per_example["value_token_id"] == per_example["next_token_id"]
    out["agrees"] = first["value_token_id"] == first["next_token_id"]
    out["precision_at_k"] = hit.groupby([per_example["layer"], per_example["key"]]).mean()
    out = out.reset_index()
    if agreement is None:
        return out
    table = getattr(agreement, "per_memory", agreement)
    joined = out.drop(columns=["agrees", "precision_at_k"]).merge(
        table[["layer", "key", "agrees", "precision_at_k"]], on=["layer", "key"], how="left"
    )
    return joined[out.columns]


def _interval(values: np.ndarray, picks: np.ndarray | None, level: float) -> tuple[float, float]:
    if picks is None or values.size == 0:
        return math.nan, math.nan
    tail = (1 - level) / 2
    low, high = np.quantile(values[picks].mean(axis=1), [tail, 1 - tail])
    return float(low), float(high)


def _per_layer(per_memory: pd.DataFrame, per_example: pd.DataFrame, layers: list[int], config: Any) -> pd.DataFrame:
    rows = []
    for layer in layers:
        memories = per_memory[per_memory["layer"] == layer]
        n = len(memories)
        rng = np.random.default_rng([config.seed, layer, BOOTSTRAP_STREAM])
        picks = rng.integers(0, n, size=(config.n_bootstrap, n)) if n and config.n_bootstrap else None
        row: dict[str, Any] = {
            "layer": layer,
            "n_memories": n,
            "n_examples": int((per_example["layer"] == layer).sum()),
        }
        for name in (*EFFECTS, "beats_control"):
            values = memories[name].to_numpy(dtype=np.float64)
            column = "share_beats_control" if name == "beats_control" else name
            row[column] = float(values.mean()) if n else math.nan
            row[f"{column}_ci_low"], row[f"{column}_ci_high"] = _interval(values, picks, config.ci)
        agrees = memories["agrees"].astype("float64")
        row["correlational_agreement"] = float(agrees.mean()) if agrees.notna().any() else math.nan
        precision = memories["precision_at_k"].to_numpy(dtype=np.float64, na_value=np.nan)
        row["spearman_total_next_precision"] = spearman(memories["total_next"].to_numpy(np.float64), precision)
        rows.append(row)
    return pd.DataFrame(rows)


def summarise(
    adapter: MemoryAdapter, parts: list[dict[str, Any]], agreement: Any, config: Any, settings: dict[str, Any]
) -> CausalAgreementResult:
    """The three tables from each layer's column lists (see :func:`causal_agreement`)."""
    frames = [pd.DataFrame({k: v for k, v in part.items() if k != "seconds"}) for part in parts]
    per_example = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["layer", "key"])
    if len(per_example):
        _decode(adapter, per_example, ["next_token_id", "value_token_id", "control_value_token_id"])
        per_example = per_example[["layer", *[c for c in per_example.columns if c != "layer"]]]
        per_memory = _per_memory(per_example, agreement)
    else:
        per_memory = pd.DataFrame(columns=["layer", "key", *EFFECTS, "beats_control", "agrees", "precision_at_k"])
    settings = dict(settings, correlational_source="value_agreement" if agreement is not None else "measured examples")
    per_layer = _per_layer(per_memory, per_example, settings["layers"], config)
    for frame in (per_layer, per_memory, per_example):
        frame.attrs["settings"] = settings
    return CausalAgreementResult(per_layer, per_memory, per_example, settings)
