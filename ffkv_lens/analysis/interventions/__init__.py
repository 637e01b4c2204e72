"""Interventions: edit memory coefficients, trace a prompt through the memories, generate under edits.

- :mod:`.edits`: :class:`Edit`, validation, :func:`edit_hooks` and :func:`intervene` (hooks on ``mlp.hook_post``);
- :mod:`.trace`: :func:`trace` -> :class:`Trace`, :meth:`Trace.diff`;
- :mod:`.generation`: :func:`generate`, :func:`compare_generation`;
- :mod:`.weights`: :func:`edited_values`, the weight-level twin of ``zero``/``scale`` edits.

Every function takes the model's :class:`~ffkv_lens.adapters.MemoryAdapter` first; see docs/interventions.md.
"""

from ffkv_lens.analysis.interventions.edits import (
    OPERATIONS,
    Edit,
    edit_hooks,
    intervene,
    mean_coefficients,
    parse_edit,
    validate_edits,
)
from ffkv_lens.analysis.interventions.generation import GenerationComparison, compare_generation, generate
from ffkv_lens.analysis.interventions.trace import Trace, TraceDiff, trace
from ffkv_lens.analysis.interventions.weights import edited_values

__all__ = [
    "OPERATIONS",
    "Edit",
    "GenerationComparison",
    "Trace",
    "TraceDiff",
    "compare_generation",
    "edit_hooks",
    "edited_values",
    "generate",
    "intervene",
    "mean_coefficients",
    "parse_edit",
    "trace",
    "validate_edits",
]
