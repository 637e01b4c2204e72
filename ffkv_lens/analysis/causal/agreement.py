"""Causal agreement: does zeroing a memory on its trigger lower the next token its value reads as?

The causal counterpart of :func:`ffkv_lens.analysis.value_agreement` (Geva et al. 2021, section 4).
Per searched layer, ``keys_per_layer`` memories are sampled (seeded) among those with a top trigger
example followed by a next token; for each of their top ``examples`` examples the trigger prefix
(BOS first when the atlas was searched with one, the unit's tokens up to and including the peak)
runs with that memory zeroed at the peak only (:mod:`.ablation`). Effects are ``clean - ablated``
on log p of the example's next token and of the value's token (top token; bottom token when the
memory's clean coefficient there is negative), total (through later layers) and direct (the
memory's term removed from the final residual only). A matched control (same layer, same
example, a memory of similar ``|m|`` at that position, see :data:`DEFINITIONS`) is ablated the same
way. Tables and statistics: :mod:`.summary`.

Example:
    >>> atlas = lens.search_triggers(fk.Corpus.default(), max_tokens=20_000, k=10)  # doctest: +SKIP
    >>> result = causal_agreement(lens, atlas, keys_per_layer=20, examples=5)  # doctest: +SKIP
    >>> result.per_layer[["layer", "total_next", "control_total_next", "share_beats_control"]]  # doctest: +SKIP
"""

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from ffkv_lens.adapters import AdapterLike, MemoryAdapter, as_adapter
from ffkv_lens.analysis.agreement import next_token_ids
from ffkv_lens.analysis.atlas import TriggerAtlas
from ffkv_lens.analysis.causal.ablation import Ablations, ablate, check_causal, clean_runs
from ffkv_lens.analysis.causal.summary import DEFINITIONS, CausalAgreementResult, summarise
from ffkv_lens.errors import AtlasMismatchError, ConfigError

__all__ = ["CausalConfig", "causal_agreement"]

log = logging.getLogger(__name__)
KEYS_STREAM, CONTROL_STREAM = 0, 1


@dataclass(frozen=True)
class CausalConfig:
    """Every setting of :func:`causal_agreement` that changes its numbers.

    Attributes:
        keys_per_layer: Memories sampled per layer (all eligible ones if fewer).
        examples: Top trigger examples per memory (those followed by a next token).
        seed: Seeds the memory sample, the controls and the bootstrap.
        layers: Layers to test (default: every searched layer of the atlas).
        control_window: The control is drawn uniformly among the memories whose ``|m|`` rank at the
            ablated position is within this many ranks of the memory's own (itself excluded).
        n_bootstrap: Bootstrap resamples (over memories) of the per-layer intervals (0: none).
        ci: Confidence level of the intervals.
    """

    keys_per_layer: int = 100
    examples: int = 10
    seed: int = 0
    layers: tuple[int, ...] | None = None
    control_window: int = 5
    n_bootstrap: int = 1000
    ci: float = 0.95

    def __post_init__(self) -> None:
        for name in ("keys_per_layer", "examples", "control_window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r}; pass a positive integer.")
        for name in ("seed", "n_bootstrap"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name}={value!r}; pass a non-negative integer.")
        if not 0 < self.ci < 1:
            raise ConfigError(f"ci={self.ci!r}; pass a confidence level strictly between 0 and 1, e.g. 0.95.")
        if self.layers is not None and (not self.layers or not all(isinstance(x, int) for x in self.layers)):
            raise ConfigError(f"layers={self.layers!r}; pass None (every searched layer) or layer indices.")


@dataclass
class _Plan:
    """The sampled memories of one layer and their examples (one row per example)."""

    keys: list[int]
    rows: dict[str, list[int]]
    prefixes: list[tuple[int, ...]]


def _bos(adapter: MemoryAdapter, atlas: TriggerAtlas) -> tuple[int, ...]:
    if not atlas.manifest["settings"].get("has_bos", False):
        return ()
    if adapter.bos_token_id is None:
        raise AtlasMismatchError(
            "The atlas was searched with a BOS token but this model prepends none; load the model the "
            "atlas was made with (same default_prepend_bos)."
        )
    return (int(adapter.bos_token_id),)


def _layers(atlas: TriggerAtlas, config: CausalConfig) -> list[int]:
    layers = atlas.layers if config.layers is None else sorted(set(config.layers))
    missing = [layer for layer in layers if layer not in atlas.top]
    if missing:
        raise ConfigError(f"layers={list(config.layers or [])}: {missing} not searched; searched: {atlas.layers}.")
    return layers


def _plan(atlas: TriggerAtlas, layer: int, config: CausalConfig, head: tuple[int, ...]) -> _Plan:
    """Sample the layer's memories and cut each of their top examples at the peak."""
    table = atlas.top[layer]
    n_ex = min(config.examples, table.units.shape[1])
    nxt = next_token_ids(atlas, layer)[:, :n_ex]
    usable = (table.units[:, :n_ex] >= 0) & (nxt >= 0)
    eligible = torch.nonzero(usable.any(dim=1)).flatten().numpy()
    rng = np.random.default_rng([config.seed, layer, KEYS_STREAM])
    keys = np.sort(rng.choice(eligible, size=min(config.keys_per_layer, len(eligible)), replace=False)).tolist()
    rows: dict[str, list[int]] = {name: [] for name in ("key", "rank", "unit_id", "position", "next", "prefix")}
    index: dict[tuple[int, ...], int] = {}
    prefixes: list[tuple[int, ...]] = []
    for key in keys:
        for rank in torch.nonzero(usable[key]).flatten().tolist():
            unit, position = int(table.units[key, rank]), int(table.positions[key, rank])
            prefix = head + tuple(atlas.units.get(unit)[1][: position + 1])
            if prefix not in index:
                index[prefix] = len(prefixes)
                prefixes.append(prefix)
            for name, value in zip(rows, (key, rank, unit, position, int(nxt[key, rank]), index[prefix]), strict=True):
                rows[name].append(value)
    return _Plan(keys, rows, prefixes)


def _controls(m: torch.Tensor, keys: np.ndarray, ranks: np.ndarray, layer: int, config: CausalConfig) -> np.ndarray:
    """Per example, a memory of the same layer whose ``|m|`` rank at the position is near the memory's own."""
    order = torch.argsort(-m.abs(), dim=1, stable=True).numpy()  # [examples, d_mlp], largest |m| first
    out = np.zeros(len(keys), dtype=np.int64)
    w, d_mlp = config.control_window, m.shape[1]
    for i, (key, rank) in enumerate(zip(keys.tolist(), ranks.tolist(), strict=True)):
        own = int(np.nonzero(order[i] == key)[0][0])
        window = [int(k) for k in order[i, max(0, own - w) : min(d_mlp, own + w + 1)] if k != key]
        rng = np.random.default_rng([config.seed, layer, CONTROL_STREAM, key, rank])
        out[i] = window[int(rng.integers(len(window)))]
    return out


def _value_tokens(adapter: MemoryAdapter, layer: int, keys: np.ndarray, m: torch.Tensor) -> np.ndarray:
    """Each memory's value token where it is used: top token if its coefficient is >= 0, else bottom token."""
    uniq, inverse = np.unique(keys, return_inverse=True)
    with torch.no_grad():
        logits = adapter.value_logits(layer, torch.as_tensor(uniq)).double().cpu()
    top, bottom = logits.argmax(-1).numpy()[inverse], logits.argmin(-1).numpy()[inverse]
    return np.where(m.numpy() >= 0, top, bottom)


def _layer(adapter: MemoryAdapter, layer: int, plan: _Plan, config: CausalConfig, batch_tokens: int) -> dict:
    """Ablate the plan's memories and their controls; one column list per :mod:`.summary` field."""
    rows = {name: np.asarray(values, dtype=np.int64) for name, values in plan.rows.items()}
    keys, prefix = rows["key"], torch.as_tensor(rows["prefix"])
    clean = clean_runs(adapter, layer, plan.prefixes, batch_tokens=batch_tokens)
    m = clean.coefficients[prefix]  # [examples, d_mlp]
    own_m = m[torch.arange(len(keys)), torch.as_tensor(keys)]
    controls = _controls(m, keys, rows["rank"], layer, config)
    control_m = m[torch.arange(len(keys)), torch.as_tensor(controls)]
    value, control_value = (
        _value_tokens(adapter, layer, keys, own_m),
        _value_tokens(adapter, layer, controls, control_m),
    )
    nxt = rows["next"]
    targets = torch.as_tensor(np.stack([np.concatenate([nxt, nxt]), np.concatenate([value, control_value])], axis=1))
    pair_key = torch.as_tensor(np.concatenate([keys, controls]))
    both = ablate(adapter, layer, plan.prefixes, torch.cat([prefix, prefix]), pair_key, targets, clean=clean)
    n = len(keys)
    out: dict[str, Any] = {name: rows[name] for name in ("key", "rank", "unit_id", "position")}
    out.update(layer=np.full(n, layer), next_token_id=nxt, value_token_id=value, coefficient=own_m.numpy())
    out.update(control_key=controls, control_coefficient=control_m.numpy(), control_value_token_id=control_value)
    out.update(_effects(both, slice(0, n), ""), **_effects(both, slice(n, 2 * n), "control_"))
    out["seconds"] = both.seconds
    return out


def _effects(ab: Ablations, part: slice, prefix: str) -> dict[str, np.ndarray]:
    cols: dict[str, np.ndarray] = {}
    for j, token in enumerate(("next", "value")):
        cols[f"{prefix}clean_logp_{token}"] = ab.clean_logp[part, j].numpy()
        cols[f"{prefix}total_{token}"] = ab.total[part, j].numpy()
        cols[f"{prefix}direct_{token}"] = ab.direct[part, j].numpy()
        cols[f"{prefix}direct_logit_frozen_{token}"] = ab.direct_logit_frozen[part, j].numpy()
    return cols


def causal_agreement(
    model: AdapterLike,
    atlas: TriggerAtlas,
    *,
    keys_per_layer: int = 100,
    examples: int = 10,
    seed: int = 0,
    layers: int | Sequence[int] | None = None,
    agreement: Any = None,
    progress: bool = True,
    control_window: int = 5,
    n_bootstrap: int = 1000,
    ci: float = 0.95,
    batch_tokens: int = 2048,
) -> CausalAgreementResult:
    """Ablate sampled memories on their top triggers and measure what they cause (module docstring).

    Args:
        model: A :class:`ffkv_lens.MemoryLens` or its :class:`~ffkv_lens.adapters.MemoryAdapter` (a causal LM).
        atlas: A :class:`ffkv_lens.TriggerAtlas` made with the same model (checked).
        keys_per_layer: Memories sampled per layer (seeded; the sample is the per-memory table's keys).
        examples: Top trigger examples per memory.
        seed: Seeds the memory sample, the controls and the bootstrap.
        layers: Subset of the atlas's layers (default: all).
        agreement: The :class:`~ffkv_lens.analysis.AgreementResult` (or its ``per_memory`` table) of
            :func:`~ffkv_lens.analysis.value_agreement` on the same atlas: its per-memory agreement and
            precision@k are joined and correlated with the causal effect. Without it, both are computed
            from the examples measured here.
        progress: Show a progress bar over layers.
        control_window: See :class:`CausalConfig`.
        n_bootstrap: Bootstrap resamples of the per-layer intervals.
        ci: Confidence level of the intervals.
        batch_tokens: Padded tokens per forward pass (speed and memory only).

    Returns:
        A :class:`~ffkv_lens.analysis.causal.summary.CausalAgreementResult` (tables in docs/causal.md).

    Raises:
        ConfigError: On invalid settings, layers not searched, or a model that is not a causal LM.
        AtlasMismatchError: If the atlas was made with another model.
    """
    from tqdm.auto import tqdm

    chosen = None if layers is None else tuple([layers] if isinstance(layers, int) else layers)
    config = CausalConfig(keys_per_layer, examples, seed, chosen, control_window, n_bootstrap, ci)
    if isinstance(batch_tokens, bool) or not isinstance(batch_tokens, int) or batch_tokens < 1:
        raise ConfigError(f"batch_tokens={batch_tokens!r}; pass a positive integer (padded tokens per forward).")
    adapter = as_adapter(model)
    check_causal(adapter)
    atlas.check_matches(adapter)
    head = _bos(adapter, atlas)
    parts, sampled = [], {}
    for layer in tqdm(_layers(atlas, config), desc="causal agreement", unit="layer", disable=not progress):
        plan = _plan(atlas, layer, config, head)
        sampled[layer] = plan.keys
        if plan.keys:
            parts.append(_layer(adapter, layer, plan, config, batch_tokens))
            log.info("layer %d: %d memories, %d examples", layer, len(plan.keys), len(plan.rows["key"]))
    settings = dict(
        asdict(config),
        layers=_layers(atlas, config),
        sampled_keys=sampled,
        has_bos=bool(head),
        batch_tokens=batch_tokens,
        seconds=round(sum(float(p["seconds"]) for p in parts), 3),
        definitions=DEFINITIONS,
        value_readout_mode=adapter.value_readout_mode,
        atlas={"k": atlas.k, "settings": atlas.manifest["settings"], "corpus": atlas.manifest.get("corpus")},
        model=adapter.describe(),
    )
    return summarise(adapter, parts, agreement, config, settings)
