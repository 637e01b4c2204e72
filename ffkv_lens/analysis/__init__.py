"""The analysis core: everything here sees models only through ``MemoryAdapter``.

Every public analysis function takes the model as its first argument, typed
:data:`~ffkv_lens.adapters.AdapterLike` (a :class:`~ffkv_lens.adapters.MemoryAdapter` or anything
carrying one as ``.adapter``, such as a :class:`~ffkv_lens.MemoryLens`), and unwraps it once with
:func:`~ffkv_lens.adapters.as_adapter`.

- :mod:`ffkv_lens.analysis.triggers`: streaming top-k trigger search (paper section 3);
  :mod:`ffkv_lens.analysis.search_config` holds its settings and defaults.
- :mod:`ffkv_lens.analysis.atlas`: the trigger atlas and its storage.
- :mod:`ffkv_lens.analysis.checkpoint`: resumable search state.
- :mod:`ffkv_lens.analysis.agreement`: value/trigger agreement (section 4).
- :mod:`ffkv_lens.analysis.mutation`: the mutation test (section 3.2).
- :mod:`ffkv_lens.analysis.causal`: causal agreement (ablations on triggers); :func:`locate_fact` and
  :func:`edit_fact` (docs/causal.md).
- :mod:`ffkv_lens.analysis.dynamics` and :mod:`ffkv_lens.analysis.sampling`: section 5.

The names below load their modules on first use, so importing one module of the core does not
import the others.
"""

import importlib
from typing import Any

__all__ = [
    "AgreementResult",
    "CausalAgreementResult",
    "MutationConfig",
    "MutationResult",
    "causal_agreement",
    "composition",
    "edit_fact",
    "layer_dynamics",
    "locate_fact",
    "mutation_test",
    "residual_agreement",
    "value_agreement",
]

_LAZY = {
    "AgreementResult": "ffkv_lens.analysis.agreement",
    "value_agreement": "ffkv_lens.analysis.agreement",
    "CausalAgreementResult": "ffkv_lens.analysis.causal.summary",
    "causal_agreement": "ffkv_lens.analysis.causal.agreement",
    "composition": "ffkv_lens.analysis.dynamics",
    "layer_dynamics": "ffkv_lens.analysis.dynamics",
    "residual_agreement": "ffkv_lens.analysis.dynamics",
    "MutationConfig": "ffkv_lens.analysis.mutation",
    "MutationResult": "ffkv_lens.analysis.mutation",
    "mutation_test": "ffkv_lens.analysis.mutation",
    "locate_fact": "ffkv_lens.analysis.causal.locate",
    "edit_fact": "ffkv_lens.analysis.causal.edit",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ffkv_lens.analysis' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
