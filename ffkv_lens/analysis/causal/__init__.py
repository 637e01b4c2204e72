"""Causal tests of memories: does a memory cause what its value reads as, and which memories carry a fact.

By concern:

- :mod:`.ablation`: batched ablations, each row of a forward pass zeroing its own memory at its own position;
- :mod:`.agreement`: :func:`causal_agreement`, the causal counterpart of the paper's value/trigger agreement
  (total and direct effects, matched controls, bootstrap CIs);
- :mod:`.facts`: the fact file format (JSONL) and its reader;
- :mod:`.locate`: :func:`locate_fact` (attribution, integrated gradients, verification by ablation);
- :mod:`.edit`: :func:`edit_fact` (suppress or enhance located memories; efficacy, specificity, collateral audit).

Every function takes the model first (:data:`~ffkv_lens.adapters.AdapterLike`); see docs/causal.md.
The names below load their modules on first use.
"""

import importlib
from typing import Any

__all__: list[str] = [
    "Ablations",
    "CausalAgreementResult",
    "CausalConfig",
    "Fact",
    "FactEdit",
    "FactLocation",
    "ablate",
    "ablate_one_by_one",
    "causal_agreement",
    "check_fact",
    "check_facts",
    "edit_fact",
    "locate_fact",
    "read_facts",
]

_LAZY: dict[str, str] = {
    "Ablations": "ffkv_lens.analysis.causal.ablation",
    "ablate": "ffkv_lens.analysis.causal.ablation",
    "ablate_one_by_one": "ffkv_lens.analysis.causal.ablation",
    "CausalAgreementResult": "ffkv_lens.analysis.causal.summary",
    "CausalConfig": "ffkv_lens.analysis.causal.agreement",
    "causal_agreement": "ffkv_lens.analysis.causal.agreement",
    "Fact": "ffkv_lens.analysis.causal.facts",
    "check_fact": "ffkv_lens.analysis.causal.facts",
    "check_facts": "ffkv_lens.analysis.causal.facts",
    "read_facts": "ffkv_lens.analysis.causal.facts",
    "FactLocation": "ffkv_lens.analysis.causal.locate",
    "locate_fact": "ffkv_lens.analysis.causal.locate",
    "FactEdit": "ffkv_lens.analysis.causal.edit",
    "edit_fact": "ffkv_lens.analysis.causal.edit",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ffkv_lens.analysis.causal' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
