"""ffkv_lens: transformer feed-forward layers read as key-value memories (Geva et al. 2021).

Example:
    >>> import ffkv_lens as fk
    >>> "smollm2-135m" in fk.list_models()
    True

Importing the package is fast and has no side effects: heavy modules (torch models,
transformer_lens) load on first use.
"""

import importlib
from typing import Any

__all__ = [
    "Comparison",
    "Corpus",
    "Edit",
    "MemoryLens",
    "TriggerAtlas",
    "TriggerExample",
    "compare",
    "list_models",
    "load_model",
]
__version__ = "0.1.0"

_LAZY = {
    "Comparison": "ffkv_lens.comparison",
    "compare": "ffkv_lens.comparison",
    "Corpus": "ffkv_lens.corpus",
    "Edit": "ffkv_lens.analysis.interventions.edits",
    "TriggerAtlas": "ffkv_lens.analysis.atlas",
    "TriggerExample": "ffkv_lens.analysis.atlas",
    "MemoryLens": "ffkv_lens.lens",
    "list_models": "ffkv_lens.models",
    "load_model": "ffkv_lens.adapters",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ffkv_lens' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
