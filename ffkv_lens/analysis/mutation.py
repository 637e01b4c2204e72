"""The mutation test: shallow versus semantic keys (Geva et al. 2021, section 3.2, Fig 3).

For a seeded sample of keys per layer and each key's top trigger examples (best first), the
example's prefix (the tokens the model saw up to and including the peak, BOS included when the
atlas was searched with one) is mutated three ways: remove its first own token, its last token,
or a random own token (never the BOS). The key's coefficient at the last position of each
mutated prefix is compared with the coefficient at the last position of the original prefix,
recomputed in the same run: ``change = (m_mut - m_orig) / |m_orig|``. Removing the last token
hurts shallow (n-gram, last-token) keys most; the paper finds this in its lower layers.

Cost (:mod:`ffkv_lens.analysis.mutation_runs`): on causal models every prefix is read from one of
a few *variant sequences* per unit (the unit, without its first token, without its random token),
each run once for every key and layer; bidirectional models run each prefix alone, per layer.
See docs/mutation.md for the exact definitions and measured numbers.

Example:
    >>> import ffkv_lens as fk  # doctest: +SKIP
    >>> lens = fk.MemoryLens(fk.load_model("smollm2-135m"))  # doctest: +SKIP
    >>> atlas = lens.search_triggers(fk.Corpus.default(), max_tokens=20_000)  # doctest: +SKIP
    >>> result = mutation_test(lens, atlas, keys_per_layer=100, examples=50)  # doctest: +SKIP
    >>> result.per_layer[["layer", "change_first", "change_last", "change_random"]]  # doctest: +SKIP
"""

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from ffkv_lens.analysis.mutation_runs import MEASURED, ROW_FIELDS, collect_examples, run_prefix, run_shared
from ffkv_lens.errors import AtlasMismatchError, ConfigError

__all__ = ["DEFINITIONS", "MUTATIONS", "STRATEGIES", "MutationConfig", "MutationResult", "mutation_test"]

log = logging.getLogger(__name__)

MUTATIONS = ("first", "last", "random")
OnMismatch = Literal["warn", "raise", "ignore"]
_ON_MISMATCH = ("warn", "raise", "ignore")
Strategy = Literal["auto", "shared", "prefix"]
STRATEGIES = ("auto", "shared", "prefix")
# Bootstrap stream per (seed, layer); the key and random-token streams are in mutation_runs.
_BOOTSTRAP = 2

DEFINITIONS = {
    "prefix": "[BOS] + unit tokens[:position + 1] when the atlas was searched with BOS, else unit "
    "tokens[:position + 1]; its own tokens exclude the BOS, which is never removed",
    "mutations": "first: drop own token 0; last: drop the last token; random: drop own token j (j may be 0 "
    "or n_own - 1)",
    "random_index": "j = the first entry below n_own of the unit's permutation of its own token indices, "
    "numpy.random.default_rng([seed, unit_id, 1]).permutation(len(unit)); uniform on [0, n_own) for every "
    "example; examples on the same unit share the permutation (same n_own, same j; independent of layer, key "
    "and the layers tested)",
    "coefficient": "the key's coefficient (mlp.hook_post) at the last position of the (mutated) prefix "
    "as if run alone (right padding masked); on causal models read from a longer sequence that starts with "
    "the prefix (strategy 'shared', the same number), else computed on the prefix alone ('prefix')",
    "change": "sign * (m_mut - m_orig) / |m_orig|, m_orig recomputed on the original prefix in the same run "
    "(sign = 1 for top-k examples, -1 for bottom-k); |m_orig| keeps the direction meaningful for signed "
    "(gated) coefficients: a negative change is always a weakening in the example's direction",
    "skip_short": "prefixes with fewer than 2 own tokens (a removal would leave nothing or only BOS)",
    "skip_zero": "examples with |m_orig| <= min_abs_coefficient (relative change undefined)",
    "per_layer_mean": "mean over all measured (key, example) pairs of the layer",
    "ci": "percentile bootstrap over keys (examples of a key resampled together), ci_level, n_bootstrap",
    "shallow_score": "change_random - change_last of a key (means over its examples): how much more of "
    "|m_orig| removing the last token costs than removing a random token",
    "kind": "'shallow' if shallow_score >= shallow_threshold else 'semantic'",
    "atlas_deviation": "max |m_orig - m_atlas| over examples, divided by max |m_atlas| of the layer "
    "(nonzero by design on bidirectional encoders, whose atlas saw the whole unit)",
}


@dataclass(frozen=True)
class MutationConfig:
    """Every setting of the mutation test that changes its numbers.

    Attributes:
        keys_per_layer: Keys sampled per layer (all keys with examples if fewer); the paper used 100.
        examples: Top trigger examples per key (at most the atlas's k); the paper used 50.
        seed: Seeds key sampling, random-token choice and the bootstrap.
        sign: 1 uses top-k examples; -1 the bottom-k of a signed atlas (most negative coefficients).
        layers: Layers to test (default: every searched layer of the atlas).
        shallow_threshold: A key is "shallow" when ``shallow_score`` is at least this.
        min_abs_coefficient: Examples with ``|m_orig|`` at most this are skipped (division by ~0).
        ci_level: Confidence level of the per-layer intervals.
        n_bootstrap: Bootstrap resamples (over keys) for the intervals.
        atlas_rtol: Largest allowed atlas deviation (see ``DEFINITIONS``) before ``on_atlas_mismatch``.
        on_atlas_mismatch: ``"warn"`` (log), ``"raise"`` (AtlasMismatchError) or ``"ignore"``.
    """

    keys_per_layer: int = 100
    examples: int = 50
    seed: int = 0
    sign: Literal[1, -1] = 1
    layers: tuple[int, ...] | None = None
    shallow_threshold: float = 0.25
    min_abs_coefficient: float = 1e-6
    ci_level: float = 0.95
    n_bootstrap: int = 1000
    atlas_rtol: float = 1e-3
    on_atlas_mismatch: OnMismatch = "warn"

    def __post_init__(self) -> None:
        for name in ("keys_per_layer", "examples", "n_bootstrap"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r}; pass a positive integer.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed={self.seed!r}; pass a non-negative integer.")
        if self.sign not in (1, -1) or isinstance(self.sign, bool):
            raise ConfigError(f"sign={self.sign!r}; allowed: 1 (top-k examples) or -1 (bottom-k, signed atlas).")
        if not 0.0 < self.ci_level < 1.0:
            raise ConfigError(f"ci_level={self.ci_level!r}; pass a number strictly between 0 and 1, e.g. 0.95.")
        for name in ("min_abs_coefficient", "atlas_rtol"):
            if not getattr(self, name) >= 0.0:
                raise ConfigError(f"{name}={getattr(self, name)!r}; pass a non-negative number.")
        if not np.isfinite(self.shallow_threshold):
            raise ConfigError(f"shallow_threshold={self.shallow_threshold!r}; pass a finite number, e.g. 0.25.")
        if self.on_atlas_mismatch not in _ON_MISMATCH:
            raise ConfigError(f"on_atlas_mismatch={self.on_atlas_mismatch!r}; allowed: {_ON_MISMATCH}.")

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable settings."""
        out = asdict(self)
        out["layers"] = None if self.layers is None else list(self.layers)
        return out


@dataclass(frozen=True)
class MutationResult:
    """The mutation test's tables (each DataFrame's ``.attrs`` holds ``settings``).

    Attributes:
        per_layer: One row per layer: ``change_{first,last,random}`` means with ``*_ci_low``,
            ``*_ci_high`` and ``*_median``, ``shallow_fraction``, ``n_keys`` (keys measured),
            ``n_keys_sampled``, ``n_examples`` (measured pairs), ``n_skipped`` (=
            ``n_skipped_short + n_skipped_zero``), ``relative_depth`` = (layer + 1) / n_layers.
        per_key: One row per measured key: means of the three changes, ``n_examples``,
            ``shallow_score`` and ``kind``.
        per_example: One row per measured (layer, key, rank): ``m_atlas``, ``m_orig``,
            ``m_first``, ``m_last``, ``m_random``, the changes, ``random_index``, unit and position.
        settings: Every setting that changes the numbers, the definitions, model and atlas
            description, the atlas deviation and run statistics.
    """

    per_layer: Any
    per_key: Any
    per_example: Any
    settings: dict[str, Any] = field(default_factory=dict)


def mutation_test(
    lens: Any,
    atlas: Any,
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
        lens: The :class:`ffkv_lens.MemoryLens` of the model the atlas was made with.
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
            picks ``"shared"`` when ``lens.adapter.causal`` is true, else ``"prefix"``.
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
    how = _choose_strategy(lens, strategy)
    test_layers, bos = _check_inputs(lens, atlas, config)
    examples_ = collect_examples(atlas, config, test_layers, bos)
    if how == "shared":
        values, stats = run_shared(lens, examples_, batch_tokens, progress)
    else:
        values, stats = run_prefix(lens, examples_, batch_tokens, dedupe, progress)
    per_example = _changes(examples_.rows, values, config)
    settings = _settings(lens, atlas, config, test_layers, bos, per_example, stats, batch_tokens)
    _check_deviation(settings, config)
    per_key = _per_key(per_example, config)
    per_layer = _per_layer(per_example, per_key, examples_.skipped_short, config, test_layers, lens.n_layers)
    for frame in (per_layer, per_key, per_example):
        frame.attrs.update(settings)
    return MutationResult(per_layer, per_key, per_example, settings)


def _choose_strategy(lens: Any, strategy: str) -> str:
    """``"shared"`` or ``"prefix"``; the shared strategy is exact on causal models only."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy={strategy!r}; allowed: {STRATEGIES}.")
    causal = bool(getattr(lens.adapter, "causal", False))
    if strategy == "shared" and not causal:
        raise ConfigError(
            "strategy='shared' reads each prefix from a longer sequence, which is exact on causal models only; "
            f"this adapter is not causal ({lens.adapter.describe().get('family', 'unknown family')}). "
            "Use strategy='prefix' or 'auto'."
        )
    return strategy if strategy != "auto" else ("shared" if causal else "prefix")


def _check_inputs(lens: Any, atlas: Any, config: MutationConfig) -> tuple[list[int], int | None]:
    atlas.check_matches(lens)
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
    bos = lens.adapter.bos_token_id
    if bos is None:
        raise AtlasMismatchError(
            "The atlas was searched with a BOS token but this model prepends none; load the model the "
            "atlas was made with (same default_prepend_bos)."
        )
    return layers, int(bos)


def _changes(rows: dict[str, list[Any]], values: np.ndarray, config: MutationConfig) -> Any:
    """One row per measured example: drop ``|m_orig|``-degenerate examples, add relative changes."""
    import pandas as pd

    frame = pd.DataFrame(rows, columns=list(ROW_FIELDS))
    for i, name in enumerate(MEASURED):
        frame[name] = values[:, i]
    frame["degenerate"] = frame["m_orig"].abs() <= config.min_abs_coefficient
    denominator = frame["m_orig"].abs().where(~frame["degenerate"])
    for name in MUTATIONS:
        frame[f"change_{name}"] = config.sign * (frame[f"m_{name}"] - frame["m_orig"]) / denominator
    return frame


def _per_key(per_example: Any, config: MutationConfig) -> Any:
    measured = per_example[~per_example["degenerate"]]
    columns = [f"change_{name}" for name in MUTATIONS]
    per_key = measured.groupby(["layer", "key"], sort=True)[columns].mean()
    per_key["n_examples"] = measured.groupby(["layer", "key"], sort=True).size()
    per_key = per_key.reset_index()
    per_key["shallow_score"] = per_key["change_random"] - per_key["change_last"]
    per_key["kind"] = np.where(per_key["shallow_score"] >= config.shallow_threshold, "shallow", "semantic")
    return per_key


def _per_layer(
    per_example: Any,
    per_key: Any,
    skipped: dict[int, dict[int, int]],
    config: MutationConfig,
    layers: list[int],
    n_layers: int,
) -> Any:
    import pandas as pd

    rows = []
    for layer in layers:
        frame = per_example[per_example["layer"] == layer]
        measured = frame[~frame["degenerate"]]
        row: dict[str, Any] = {"layer": layer, "relative_depth": (layer + 1) / n_layers}
        rng = np.random.default_rng([config.seed, layer, _BOOTSTRAP])
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
    lens: Any,
    atlas: Any,
    config: MutationConfig,
    layers: list[int],
    bos: int | None,
    per_example: Any,
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
        adapter=lens.adapter.describe(),
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
