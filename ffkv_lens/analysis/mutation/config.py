"""Settings, definitions and result of the mutation test (see :mod:`ffkv_lens.analysis.mutation`)."""

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd

from ffkv_lens.analysis.mutation.streams import TOKENS_STREAM
from ffkv_lens.errors import ConfigError

__all__ = ["DEFINITIONS", "MUTATIONS", "STRATEGIES", "MutationConfig", "MutationResult", "OnMismatch", "Strategy"]

MUTATIONS = ("first", "last", "random")
OnMismatch = Literal["warn", "raise", "ignore"]
_ON_MISMATCH = ("warn", "raise", "ignore")
Strategy = Literal["auto", "shared", "prefix"]
STRATEGIES = ("auto", "shared", "prefix")
DEFINITIONS = {
    "prefix": "[BOS] + unit tokens[:position + 1] when the atlas was searched with BOS, else unit "
    "tokens[:position + 1]; its own tokens exclude the BOS, which is never removed",
    "mutations": "first: drop own token 0; last: drop the last token; random: drop own token j (j may be 0 "
    "or n_own - 1)",
    "random_index": "j = the first entry below n_own of the unit's permutation of its own token indices, "
    f"numpy.random.default_rng([seed, unit_id, {TOKENS_STREAM}]).permutation(len(unit)); uniform on [0, n_own) "
    "for every "
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

    per_layer: pd.DataFrame
    per_key: pd.DataFrame
    per_example: pd.DataFrame
    settings: dict[str, Any] = field(default_factory=dict)
