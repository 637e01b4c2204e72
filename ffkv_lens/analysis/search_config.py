"""The settings of a trigger search and their defaults, defined once.

:class:`SearchConfig` holds every setting that changes a search's result; :data:`BATCH_TOKENS`
and :data:`CHECKPOINT_EVERY` are the defaults of the two that change only speed and resume
granularity. :func:`ffkv_lens.analysis.triggers.search_triggers`,
:meth:`ffkv_lens.MemoryLens.search_triggers` and the pipeline take their defaults from here.

Example:
    >>> SearchConfig(k=10).to_dict()["unit"], SEARCH_DEFAULTS.k
    ('sentence', 50)
"""

from dataclasses import asdict, dataclass
from typing import Any

from ffkv_lens.corpus.units import UNIT_KINDS, UnitKind
from ffkv_lens.errors import ConfigError

__all__ = ["BATCH_TOKENS", "CHECKPOINT_EVERY", "SEARCH_DEFAULTS", "SearchConfig"]

# Padded tokens per forward pass (speed and memory only; the result does not depend on it).
BATCH_TOKENS = 2048
# Unit tokens between checkpoints of a search (resume granularity only).
CHECKPOINT_EVERY = 200_000


@dataclass(frozen=True)
class SearchConfig:
    """Every setting of a trigger search that changes its result.

    Attributes:
        k: Examples kept per key (and per sign).
        unit: ``"sentence"`` (the paper's), ``"document"`` or ``"window"``.
        max_len: Longest unit in tokens (without BOS); longer units are split or cut (docs/corpus.md).
        layers: Layers searched (sorted), or None for all.
        signed: Also keep the bottom-k (most negative coefficients).
        exclude_bos: Never take the BOS position as a peak.
        max_tokens: Stop after this many unit tokens (None: the whole corpus).
    """

    k: int = 50
    unit: UnitKind = "sentence"
    max_len: int = 128
    layers: tuple[int, ...] | None = None
    signed: bool = False
    exclude_bos: bool = True
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or self.k < 1:
            raise ConfigError(f"k={self.k!r}; pass a positive integer (the paper used 25 and 50).")
        if self.unit not in UNIT_KINDS:
            raise ConfigError(f"unit={self.unit!r}; allowed: {UNIT_KINDS}.")
        if not isinstance(self.max_len, int) or self.max_len < 2:
            raise ConfigError(f"max_len={self.max_len!r}; pass an integer >= 2.")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise ConfigError(f"max_tokens={self.max_tokens!r}; pass a positive integer or None.")

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable settings."""
        out = asdict(self)
        out["layers"] = None if self.layers is None else list(self.layers)
        return out


SEARCH_DEFAULTS = SearchConfig()
"""The default settings, read by every function that takes them as keywords."""
