"""The mutation test itself: examples -> coefficients -> relative changes -> per-key and per-layer tables."""

import logging
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd

from ffkv_lens.adapters import AdapterLike, MemoryAdapter, as_adapter
from ffkv_lens.analysis.atlas import TriggerAtlas
from ffkv_lens.analysis.mutation.config import (
    DEFINITIONS,
    MUTATIONS,
    STRATEGIES,
    MutationConfig,
    MutationResult,
    Strategy,
)
from ffkv_lens.analysis.mutation.examples import MEASURED, ROW_FIELDS, collect_examples
from ffkv_lens.analysis.mutation.runs import run_prefix, run_shared
from ffkv_lens.analysis.mutation.streams import bootstrap_rng
from ffkv_lens.errors import AtlasMismatchError, ConfigError

__all__ = ["mutation_test"]

log = logging.getLogger(__name__)


def mutation_test(
    model: AdapterLike,
    atlas: TriggerAtlas,
    *,
    keys_per_layer: int = 100,
    examples: int = 50,
    seed: int = 0,
    sign: Literal[1, -1] = 1,
    layers: int | Sequence[int] | None = None,
    shallow_threshold: float = 0.25,
    config: MutationConfig | None = None,
    batch_tokens: int = 4096,
    strategy: Strategy = "auto",
    dedupe: bool = True,
    progress: bool = True,
) -> MutationResult:
    """Run the mutation test of every (or the chosen) searched layer of ``atlas``.

    Args:
        model: The :class:`ffkv_lens.MemoryLens` (or its :class:`~ffkv_lens.adapters.MemoryAdapter`) of the
            model the atlas was made with.
        atlas: A :class:`ffkv_lens.TriggerAtlas`.
        keys_per_layer: Keys sampled per layer (seeded; all keys with examples if fewer).
        examples: Top trigger examples per key, best first.
        seed: Seed of key sampling, random-token choice and bootstrap.
        sign: 1: top-k examples; -1: bottom-k of a signed atlas.
        layers: Subset of the atlas's layers (default: all).
        shallow_threshold: ``shallow_score`` at or above which a key is labelled "shallow".
        config: A full :class:`MutationConfig` instead of the arguments above (not both).
        batch_tokens: Padded tokens per forward pass (speed and memory only).
        strategy: How prefixes are run (speed only; the numbers are the same): ``"shared"`` reads
            every prefix of a unit from a few variant sequences run once (causal models only),
            ``"prefix"`` runs each prefix alone per layer (the reference; any model), ``"auto"``
            picks ``"shared"`` when ``adapter.causal`` is true, else ``"prefix"``.
        dedupe: ``"prefix"`` strategy: run each distinct token sequence once per layer (speed only).
        progress: Show a progress bar (tokens x layers run).

    Returns:
        A :class:`MutationResult`.

    Raises:
        ConfigError: On invalid settings or layers the atlas did not search.
        AtlasMismatchError: If the atlas was made with another model, or (with
            ``on_atlas_mismatch="raise"``) recomputed coefficients deviate from it.
    """
    chosen = None if layers is None else tuple([layers] if isinstance(layers, int) else layers)
    direct = MutationConfig(keys_per_layer, examples, seed, sign, chosen, shallow_threshold)
    if config is not None and direct != MutationConfig():
        raise ConfigError(f"Pass either config={config!r} or the individual settings ({direct!r}), not both.")
    config = config or direct
    if isinstance(batch_tokens, bool) or not isinstance(batch_tokens, int) or batch_tokens < 1:
        raise ConfigError(f"batch_tokens={batch_tokens!r}; pass a positive integer (padded tokens per forward).")
    adapter = as_adapter(model)
    how = _choose_strategy(adapter, strategy)
    test_layers, bos = _check_inputs(adapter, atlas, config)
    examples_ = collect_examples(atlas, config, test_layers, bos)
    if how == "shared":
        values, stats = run_shared(adapter, examples_, batch_tokens, progress)
    else:
        values, stats = run_prefix(adapter, examples_, batch_tokens, dedupe, progress)
    per_example = _changes(examples_.rows, values, config)
    settings = _settings(adapter, atlas, config, test_layers, bos, per_example, stats, batch_tokens)
    _check_deviation(settings, config)
    per_key = _per_key(per_example, config)
    per_layer = _per_layer(per_example, per_key, examples_.skipped_short, config, test_layers, adapter.n_layers)
    for frame in (per_layer, per_key, per_example):
        frame.attrs.update(settings)
    return MutationResult(per_layer, per_key, per_example, settings)


def _choose_strategy(adapter: MemoryAdapter, strategy: str) -> str:
    """``"shared"`` or ``"prefix"``; the shared strategy is exact on causal models only."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy={strategy!r}; allowed: {STRATEGIES}.")
    causal = bool(adapter.causal)
    if strategy == "shared" and not causal:
        raise ConfigError(
            "strategy='shared' reads each prefix from a longer sequence, which is exact on causal models only; "
            f"this adapter is not causal ({adapter.describe().get('family', 'unknown family')}). "
            "Use strategy='prefix' or 'auto'."
        )
    return strategy if strategy != "auto" else ("shared" if causal else "prefix")


def _check_inputs(adapter: MemoryAdapter, atlas: TriggerAtlas, config: MutationConfig) -> tuple[list[int], int | None]:
    atlas.check_matches(adapter)
    if config.sign == -1 and not atlas.signed:
        raise ConfigError("sign=-1 needs an atlas searched with signed=True; search again or use sign=1.")
    layers = atlas.layers if config.layers is None else sorted(set(config.layers))
    missing = [layer for layer in layers if layer not in atlas.top]
    if missing or not layers:
        raise ConfigError(
            f"layers={config.layers!r}: not searched in this atlas ({missing}); searched: {atlas.layers}."
        )
    if not atlas.manifest["settings"].get("has_bos", False):
        return layers, None
    bos = adapter.bos_token_id
    if bos is None:
        raise AtlasMismatchError(
            "The atlas was searched with a BOS token but this model prepends none; load the model the "
            "atlas was made with (same default_prepend_bos)."
        )
    return layers, int(bos)


def _changes(rows: dict[str, list[Any]], values: np.ndarray, config: MutationConfig) -> pd.DataFrame:
    """One row per measured example: drop ``|m_orig|``-degenerate examples, add relative changes."""
    frame = pd.DataFrame(rows, columns=list(ROW_FIELDS))
    for i, name in enumerate(MEASURED):
        frame[name] = values[:, i]
    frame["degenerate"] = frame["m_orig"].abs() <= config.min_abs_coefficient
    denominator = frame["m_orig"].abs().where(~frame["degenerate"])
    for name in MUTATIONS:
        frame[f"change_{name}"] = config.sign * (frame[f"m_{name}"] - frame["m_orig"]) / denominator
    return frame


def _per_key(per_example: pd.DataFrame, config: MutationConfig) -> pd.DataFrame:
    measured = per_example[~per_example["degenerate"]]
    columns = [f"change_{name}" for name in MUTATIONS]
    per_key = measured.groupby(["layer", "key"], sort=True)[columns].mean()
    per_key["n_examples"] = measured.groupby(["layer", "key"], sort=True).size()
    per_key = per_key.reset_index()
    per_key["shallow_score"] = per_key["change_random"] - per_key["change_last"]
    per_key["kind"] = np.where(per_key["shallow_score"] >= config.shallow_threshold, "shallow", "semantic")
    return per_key


def _per_layer(
    per_example: pd.DataFrame,
    per_key: pd.DataFrame,
    skipped: dict[int, dict[int, int]],
    config: MutationConfig,
    layers: list[int],
    n_layers: int,
) -> pd.DataFrame:
    rows = []
    for layer in layers:
        frame = per_example[per_example["layer"] == layer]
        measured = frame[~frame["degenerate"]]
        row: dict[str, Any] = {"layer": layer, "relative_depth": (layer + 1) / n_layers}
        rng = bootstrap_rng(config.seed, layer)
        groups = measured.groupby("key", sort=True)
        picks = rng.integers(0, groups.ngroups, size=(config.n_bootstrap, groups.ngroups)) if groups.ngroups else None
        for name in MUTATIONS:
            column = f"change_{name}"
            row[column] = measured[column].mean()
            row[f"{column}_ci_low"], row[f"{column}_ci_high"] = _bootstrap_ci(
                groups[column].sum().to_numpy(), groups.size().to_numpy(), picks, config.ci_level
            )
            row[f"{column}_median"] = measured[column].median()
        keys = per_key[per_key["layer"] == layer]
        row["shallow_fraction"] = float((keys["kind"] == "shallow").mean()) if len(keys) else float("nan")
        short, zero = sum(skipped[layer].values()), int(frame["degenerate"].sum())
        row.update(n_keys=len(keys), n_keys_sampled=len(skipped[layer]), n_examples=len(measured))
        row.update(n_skipped=short + zero, n_skipped_short=short, n_skipped_zero=zero)
        rows.append(row)
    return pd.DataFrame(rows)


def _bootstrap_ci(sums: np.ndarray, counts: np.ndarray, picks: np.ndarray | None, level: float) -> tuple[float, float]:
    """Percentile interval of the pooled mean when whole keys are resampled with replacement."""
    if picks is None:
        return float("nan"), float("nan")
    means = sums[picks].sum(axis=1) / counts[picks].sum(axis=1)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


def _settings(
    adapter: MemoryAdapter,
    atlas: TriggerAtlas,
    config: MutationConfig,
    layers: list[int],
    bos: int | None,
    per_example: pd.DataFrame,
    stats: dict[str, Any],
    batch_tokens: int,
) -> dict[str, Any]:
    deviation = (per_example["m_orig"] - per_example["m_atlas"]).abs()
    scale = per_example.groupby("layer")["m_atlas"].transform(lambda s: s.abs().max())
    relative = (deviation / scale.where(scale > 0)).fillna(0.0)
    return dict(
        config.to_dict(),
        layers=layers,
        definitions=DEFINITIONS,
        has_bos=bos is not None,
        model=atlas.manifest.get("model"),
        adapter=adapter.describe(),
        atlas={
            "k": atlas.k,
            "signed": atlas.signed,
            "settings": atlas.manifest["settings"],
            "corpus_fingerprint": atlas.manifest.get("corpus", {}).get("fingerprint"),
            "corpus": atlas.manifest.get("corpus"),
        },
        atlas_max_abs_deviation=float(deviation.max()) if len(deviation) else 0.0,
        atlas_max_rel_deviation=float(relative.max()) if len(relative) else 0.0,
        run=dict(stats, batch_tokens=batch_tokens),
    )


def _check_deviation(settings: dict[str, Any], config: MutationConfig) -> None:
    worst = settings["atlas_max_rel_deviation"]
    if worst <= config.atlas_rtol or config.on_atlas_mismatch == "ignore":
        return
    message = (
        f"Recomputed prefix coefficients deviate from the atlas by up to {worst:.3g} of the layer's largest "
        f"coefficient (atlas_rtol={config.atlas_rtol}). Expected on bidirectional encoders (the atlas saw whole "
        "units) and in low precision; otherwise the atlas was made with other weights or settings."
    )
    if config.on_atlas_mismatch == "raise":
        raise AtlasMismatchError(message)
    log.warning(message)
