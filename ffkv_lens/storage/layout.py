"""The on-disk layouts the program writes: run folders, comparison folders and facts folders.

This module is the one place that names them: the ``format`` of each kind's ``manifest.json``
(:data:`RUN`, :data:`COMPARISON`, :data:`EXPORT`, :data:`FACTS`), the entries inside (:data:`MANIFEST`, :data:`TABLES`,
:data:`FIGURES`, :data:`ATLAS`, :data:`VALUES`, :data:`SEARCH`, :data:`REPORT`,
:data:`BROWSER_INDEX`; :class:`RunPaths`, :class:`ComparisonPaths` and :class:`FactsPaths` join them to
a folder) and the steps of a run in their one order (:data:`RUN_STEPS`). The writers (``ffkv_lens.pipeline``,
``ffkv_lens.comparison.folder``, ``ffkv_lens.facts``) and the readers (``ffkv_lens.report.RunFolder``,
``ffkv_lens.comparison.Comparison``, the browser) take them from here.

A folder is recognised by the ``format`` of its ``manifest.json`` alone. Writers open their
output folder through :func:`claim_folder`, which refuses any non-empty folder that is not of
their kind, so a run never adopts (or a comparison never overwrites) a folder of the user's.
``force`` removes only the entries the program itself writes (:func:`remove_outputs`); any other
file in the folder is kept and named.

Example:
    >>> import tempfile, pathlib
    >>> from ffkv_lens.storage.layout import RUN, claim_folder
    >>> folder = pathlib.Path(tempfile.mkdtemp()) / "run"
    >>> claim_folder(folder, RUN).state
    'new'
"""

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ffkv_lens.errors import RunFolderError
from ffkv_lens.storage.atomic import read_json

__all__ = [
    "ANALYSIS_STEPS",
    "ATLAS",
    "BROWSER_INDEX",
    "COMPARISON",
    "EXPORT",
    "FACTS",
    "FIGURES",
    "MANIFEST",
    "REPORT",
    "RUN",
    "RUN_STEPS",
    "SEARCH",
    "TABLES",
    "VALUES",
    "ComparisonPaths",
    "FactsPaths",
    "FolderClaim",
    "FolderKind",
    "FolderPaths",
    "RunPaths",
    "claim_folder",
    "manifest_format",
    "remove_outputs",
]

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"  # every folder's manifest: its format, settings, versions, progress
REPORT = "report.html"  # the folder's self-contained page
BROWSER_INDEX = "browser.sqlite"  # the memory browser's index of the folder
TABLES = "tables"  # NAME.csv (+ NAME.json when small) and NAME_settings.json
FIGURES = "figures"  # NAME.png + NAME.svg
ATLAS = "atlas"  # a run's trigger atlas (safetensors + JSON, with its tokenizer)
VALUES = "values"  # a run's value projection
SEARCH = "search"  # a run's trigger-search checkpoints (removed once the atlas is saved)

# The steps of a run, in the order the pipeline runs them; each is recorded in the manifest once done.
RUN_STEPS = ("triggers", "values", "dynamics", "agreement", "causal", "mutation", "figures", "report")
ANALYSIS_STEPS = RUN_STEPS[:-1]  # the steps before the report (a run whose analyses are all done is complete)


@dataclass(frozen=True)
class FolderKind:
    """One kind of folder the program writes.

    Attributes:
        name: ``"run"``, ``"comparison"`` or ``"facts"``.
        format: The ``format`` its writer puts in ``manifest.json`` (a prefix plus a version).
        files: Top-level files the writer creates (temporaries and SQLite side files included).
        folders: Top-level folders whose whole content the writer creates (written atomically).
        output_folders: Top-level folders that may hold files of others too: only files with
            the listed suffixes are the writer's.
        command: The command that writes such a folder, for messages.
    """

    name: str
    format: str
    files: tuple[str, ...]
    folders: tuple[str, ...]
    output_folders: dict[str, tuple[str, ...]]
    command: str

    @property
    def prefix(self) -> str:
        """The format without its version: ``ffkv_lens.run/``."""
        return self.format.rsplit("/", 1)[0] + "/"

    def owns(self, manifest: Any) -> bool:
        """Whether a parsed manifest is of this kind."""
        return isinstance(manifest, dict) and str(manifest.get("format", "")).startswith(self.prefix)


_SQLITE = tuple(f"{BROWSER_INDEX}{s}" for s in ("", "-journal", "-wal", "-shm"))
_OUTPUTS = {TABLES: (".csv", ".json"), FIGURES: (".png", ".svg")}
RUN = FolderKind(
    name="run",
    format="ffkv_lens.run/1",
    files=(MANIFEST, REPORT, *_SQLITE),
    folders=(SEARCH, ATLAS, VALUES),
    output_folders=_OUTPUTS,
    command="ffkv-lens run",
)
COMPARISON = FolderKind(
    name="comparison",
    format="ffkv_lens.compare/1",
    files=(MANIFEST, REPORT, *_SQLITE),
    folders=(),
    output_folders=_OUTPUTS,
    command="ffkv-lens compare",
)
# An export folder (`ffkv-lens export --out`): each format writes its own top-level folders, all listed here.
EXPORT_FOLDERS = ("v1", "neurons", "dataset", "parquet")
EXPORT = FolderKind(
    name="export",
    format="ffkv_lens.export/1",
    files=(MANIFEST,),
    folders=EXPORT_FOLDERS,
    output_folders={},
    command="ffkv-lens export",
)
FACTS = FolderKind(
    name="facts",
    format="ffkv_lens.facts/1",
    files=(MANIFEST, REPORT),
    folders=(),
    output_folders=_OUTPUTS,
    command="ffkv-lens locate",
)


@dataclass(frozen=True)
class FolderPaths:
    """The entries of a folder the program writes, joined to the folder.

    Attributes:
        root: The folder.
    """

    root: Path

    @property
    def manifest(self) -> Path:
        """``manifest.json``."""
        return self.root / MANIFEST

    @property
    def report(self) -> Path:
        """``report.html``."""
        return self.root / REPORT

    @property
    def index(self) -> Path:
        """``browser.sqlite``."""
        return self.root / BROWSER_INDEX

    @property
    def tables(self) -> Path:
        """``tables/``."""
        return self.root / TABLES

    @property
    def figures(self) -> Path:
        """``figures/``."""
        return self.root / FIGURES

    def table(self, name: str, suffix: str = ".csv") -> Path:
        """``tables/NAME.csv`` (``suffix=""``: the stem that :func:`~ffkv_lens.storage.tables.write_table` takes)."""
        return self.root / TABLES / f"{name}{suffix}"

    def settings(self, name: str) -> Path:
        """``tables/NAME_settings.json``: the settings of the step that wrote the tables ``NAME_*``."""
        return self.root / TABLES / f"{name}_settings.json"

    def figure(self, name: str, suffix: str = "") -> Path:
        """``figures/NAME`` plus ``suffix`` (the stem that ``save_figure`` writes ``.png`` and ``.svg`` to)."""
        return self.root / FIGURES / f"{name}{suffix}"


@dataclass(frozen=True)
class RunPaths(FolderPaths):
    """A run folder's entries (``--out`` of ``ffkv-lens run``)."""

    @property
    def atlas(self) -> Path:
        """``atlas/``: the trigger atlas."""
        return self.root / ATLAS

    @property
    def values(self) -> Path:
        """``values/``: the value projection."""
        return self.root / VALUES

    @property
    def search(self) -> Path:
        """``search/``: the trigger search's checkpoints."""
        return self.root / SEARCH


@dataclass(frozen=True)
class ComparisonPaths(FolderPaths):
    """A comparison folder's entries (``--out`` of ``ffkv-lens compare``)."""


@dataclass(frozen=True)
class FactsPaths(FolderPaths):
    """A facts folder's entries (``--out`` of ``ffkv-lens locate``)."""


@dataclass(frozen=True)
class FolderClaim:
    """What :func:`claim_folder` found.

    Attributes:
        folder: The folder.
        state: ``"new"`` (missing or empty), ``"resume"`` (a folder of this kind) or ``"force"``
            (a folder of this kind whose outputs ``force`` will replace).
        manifest: The manifest found (``None`` for a new folder).
    """

    folder: Path
    state: Literal["new", "resume", "force"]
    manifest: dict[str, Any] | None


def manifest_format(folder: str | os.PathLike) -> str | None:
    """The ``format`` of ``folder/manifest.json`` (None when there is none or it has no format)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    manifest = read_json(path)
    return str(manifest.get("format")) if isinstance(manifest, dict) and "format" in manifest else None


def claim_folder(folder: str | os.PathLike, kind: FolderKind, *, force: bool = False) -> FolderClaim:
    """Check, without writing anything, that ``folder`` may become (or is) a folder of ``kind``.

    Raises:
        RunFolderError: ``folder`` is a file, or a non-empty folder that is not of ``kind``.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"--out {str(folder)!r} is a file, not a folder; choose a new or empty folder.")
    if not folder.exists() or not any(folder.iterdir()):
        return FolderClaim(folder, "new", None)
    path = folder / MANIFEST
    manifest = read_json(path) if path.is_file() else None
    if not kind.owns(manifest):
        what = f"a manifest.json of format {_format_of(manifest)!r}" if path.is_file() else "no manifest.json"
        raise RunFolderError(
            f"--out {str(folder)!r} is not empty and is not a {kind.name} folder ({what}); nothing was changed. "
            f"Choose a new or empty folder for `{kind.command}`."
        )
    return FolderClaim(folder, "force" if force else "resume", manifest)


def _format_of(manifest: Any) -> Any:
    return manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__


def remove_outputs(folder: str | os.PathLike, kind: FolderKind) -> list[str]:
    """Remove the entries ``kind``'s writer creates in ``folder``; returns the names of entries kept.

    Only ever called on a folder :func:`claim_folder` accepted. Files of others (in the folder or in
    its output folders) are left where they are.
    """
    folder = Path(folder)
    for entry in sorted(folder.iterdir()):
        if entry.name in kind.files and (entry.is_file() or entry.is_symlink()):
            entry.unlink()
        elif entry.name in kind.folders and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        elif entry.name in kind.output_folders and entry.is_dir() and not entry.is_symlink():
            _remove_files(entry, kind.output_folders[entry.name])
        elif _is_temporary(entry.name, kind):
            _remove(entry)
    kept = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir())
    if kept:
        log.warning("%s: kept %d entries that %s did not write: %s", folder, len(kept), kind.command, kept[:10])
    return kept


def _remove_files(folder: Path, suffixes: tuple[str, ...]) -> None:
    for entry in folder.iterdir():
        if not entry.is_file() or entry.is_symlink():
            continue
        temporary = entry.name.startswith(".") and entry.name.endswith(".tmp")
        if entry.suffix in suffixes or (temporary and any(f"{s}." in entry.name for s in suffixes)):
            entry.unlink()
    if not any(folder.iterdir()):
        folder.rmdir()


def _is_temporary(name: str, kind: FolderKind) -> bool:
    """A temporary or lock file of an atomic write of one of ``kind``'s entries (``.NAME.<random>.tmp|.old|.lock``)."""
    owned = (*kind.files, *kind.folders)
    return (
        name.startswith(".")
        and name.endswith((".tmp", ".old", ".lock"))
        and any(name.startswith(f".{o}.") for o in owned)
    )


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry)
    else:
        entry.unlink()
