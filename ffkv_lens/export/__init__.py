"""Exports of a run folder in formats other tools read: Neuronpedia, OpenAI NeuronRecord, Hugging Face datasets.

:func:`export_run` (``ffkv-lens export RUN_DIR --format ... --out DIR``) reads the run through
:class:`ffkv_lens.report.memories.RunFolder`, recomputes the per-token coefficients of the exported
examples with the run's model (:mod:`ffkv_lens.export.coefficients`, checked against the atlas's
peaks) and writes one format: :mod:`~ffkv_lens.export.neuronpedia`, :mod:`~ffkv_lens.export.neuronrecord`
or :mod:`~ffkv_lens.export.hf_dataset`. See docs/exports.md for every format's fields, what is exact
and what is approximate.

Example:
    >>> from ffkv_lens.export import export_run  # doctest: +SKIP
    >>> export_run("runs/demo", "exports/demo-hf", format="hf-dataset")  # doctest: +SKIP
"""

from ffkv_lens.export.folder import FORMATS, ExportResult, export_run

__all__ = ["FORMATS", "ExportResult", "export_run"]
