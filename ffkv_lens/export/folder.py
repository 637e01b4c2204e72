"""``export_run``: a run folder into an export folder of one format (``ffkv-lens export``).

The ``--out`` folder is claimed like a run folder (:func:`ffkv_lens.storage.layout.claim_folder`
with the kind :data:`~ffkv_lens.storage.layout.EXPORT`): a non-empty folder that is not an export
is refused untouched; a finished export is replaced only with ``force``, and then only the entries
an export writes are removed. Everything is checked (the run, its atlas and statistics, the
layers, the model) before the first write; each format's folders are written atomically, and
``manifest.json`` records the run, the format, the settings and the versions.
"""

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ffkv_lens.errors import ConfigError, RunFolderError
from ffkv_lens.export.source import ExportSource
from ffkv_lens.storage import atomic_write_json
from ffkv_lens.storage.layout import EXPORT, FolderPaths, claim_folder, remove_outputs
from ffkv_lens.storage.tables import library_versions

__all__ = ["FORMATS", "ExportResult", "export_run"]

# Format name -> whether it needs the per-memory statistics.
FORMATS = {"neuronpedia": True, "neuronrecord": True, "hf-dataset": False}


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_run` wrote.

    Attributes:
        path: The export folder.
        format: The format.
        manifest: Its ``manifest.json``.
    """

    path: Path
    format: str
    manifest: dict[str, Any]


def _writer(fmt: str) -> Callable[..., dict[str, Any]]:
    if fmt == "hf-dataset":
        from ffkv_lens.export.hf_dataset import write_hf_dataset

        return write_hf_dataset
    if fmt == "neuronrecord":
        from ffkv_lens.export.neuronrecord import write_neuron_records

        return write_neuron_records
    from ffkv_lens.export.neuronpedia import write_neuronpedia

    return write_neuronpedia


def export_run(
    run_dir: str | Path,
    out: str | Path,
    *,
    format: str,  # noqa: A002 - the CLI's --format
    layers: Sequence[int] | None = None,
    device: str | None = None,
    force: bool = False,
    progress: bool = True,
    options: dict[str, Any] | None = None,
) -> ExportResult:
    """Export a run folder in one format.

    Args:
        run_dir: The run folder (``--out`` of ``ffkv-lens run``).
        out: The export folder to write.
        format: One of :data:`FORMATS`.
        layers: Layers to export (default: all the run searched).
        device: Where the model recomputes the examples' coefficients (None: cuda if available).
        force: Replace a finished export in ``out``.
        progress: Show progress bars.
        options: Format options (``neuronpedia``: ``model_id``).

    Returns:
        An :class:`ExportResult`.

    Raises:
        ConfigError: An unknown format or layer.
        RunFolderError: ``out`` is not ours, holds a finished export without ``force``, or the run lacks what
            the format needs.
        AtlasMismatchError: The model's coefficients differ from the atlas's (other weights).
    """
    if format not in FORMATS:
        raise ConfigError(f"format {format!r} is not known; use one of {sorted(FORMATS)}.")
    out = Path(out)
    claim = claim_folder(out, EXPORT, force=force)
    if claim.state == "resume" and (claim.manifest or {}).get("status") == "finished":
        raise RunFolderError(
            f"--out {str(out)!r} holds a finished export ({claim.manifest.get('export_format')}); pass --force to "
            "replace it (only the entries `ffkv-lens export` writes are removed) or choose another --out."
        )
    source = ExportSource(run_dir, layers=layers, stats=FORMATS[format], device=device)
    source.lens  # noqa: B018 - load and check the model before anything is written
    if claim.state != "new":
        remove_outputs(out, EXPORT)
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {
        "format": EXPORT.format,
        "export_format": format,
        "status": "running",
        "run": str(source.run.path.resolve()),
        "model": source.model_name,
        "layers": source.layers,
        "options": options or {},
        "versions": library_versions(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    paths = FolderPaths(out)
    atomic_write_json(paths.manifest, manifest)
    result = _writer(format)(source, out, progress=progress, **(options or {}))
    manifest.update(status="finished", finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), result=result)
    atomic_write_json(paths.manifest, manifest)
    return ExportResult(out, format, manifest)
