"""What one browser serves: one or more runs, and the comparisons that match their memories.

:func:`open_catalog` takes run folders and comparison folders (told apart by the ``format`` of
their ``manifest.json``: ``RUN`` or ``COMPARISON`` of :mod:`ffkv_lens.storage.layout`; a manifest
without a format is read as a run's). A comparison brings in all its runs. Each run keeps its own index
(``RUN_DIR/browser.sqlite``, :func:`ffkv_lens.browser.open_index`) and each comparison its matches
index (``CMP_DIR/browser.sqlite``, :func:`ffkv_lens.browser.matches.open_matches`).

Runs get a label each, unique in the catalog: a comparison's label for its runs, the folder name
for a run folder given alone; a taken label gets ``-2``, ``-3``... A run folder reached twice (given
alone and through a comparison, or through two comparisons) is served once, under its first label.
The first run is the default of every route that takes ``run=LABEL``.

Example:
    >>> from ffkv_lens.browser import BrowserServer, open_catalog  # doctest: +SKIP
    >>> catalog = open_catalog(["runs/cmp"], progress=True)  # doctest: +SKIP
    >>> catalog.matches("smollm2-135m", 18, 98)["matches"][:3]  # doctest: +SKIP
"""

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ffkv_lens.browser.index import open_index
from ffkv_lens.browser.matches import MatchIndex, open_matches, read_comparison
from ffkv_lens.browser.queries import BrowserIndex
from ffkv_lens.errors import ConfigError, RunFolderError
from ffkv_lens.storage import read_json
from ffkv_lens.storage.layout import COMPARISON, RUN, RunPaths

__all__ = ["BrowsedComparison", "BrowsedRun", "Catalog", "folder_kind", "open_catalog"]

log = logging.getLogger(__name__)
MATCH_TOKENS = 5  # top value tokens shown with each matched memory
_PASS = "pass the --out folder of `ffkv-lens run` or `ffkv-lens compare`"


@dataclass(frozen=True)
class BrowsedRun:
    """A run the browser serves: its label, folder and index."""

    label: str
    folder: Path
    index: Path


@dataclass(frozen=True)
class BrowsedComparison:
    """A comparison the browser reads matches from.

    Attributes:
        folder: The comparison folder.
        index: Its matches index, or None when it has no ``tables/matches.csv``.
        labels: The comparison's label of each of its runs -> that run's label in the catalog.
    """

    folder: Path
    index: Path | None
    labels: Mapping[str, str]


class Catalog:
    """The runs and comparisons one browser serves; the first run is the default.

    Args:
        runs: Runs with unique labels (at least one).
        comparisons: Comparisons whose runs are all among ``runs``.
    """

    def __init__(self, runs: Sequence[BrowsedRun], comparisons: Sequence[BrowsedComparison] = ()) -> None:
        if not runs:
            raise ConfigError(f"no run to browse; {_PASS}.")
        self.runs = {run.label: run for run in runs}
        if len(self.runs) != len(runs):
            raise ConfigError(f"run labels {[run.label for run in runs]} repeat; give each run its own label.")
        self.comparisons = tuple(comparisons)
        self.default = runs[0].label
        self.info: dict[str, dict[str, Any]] = {}
        for run in runs:
            with BrowserIndex(run.index) as index:  # fails early on a damaged index
                self.info[run.label] = index.info()

    @classmethod
    def from_index(cls, index: str | os.PathLike) -> "Catalog":
        """A catalog of one run, served from a built index; labelled by its run folder's name."""
        with BrowserIndex(index) as opened:
            folder = Path(opened.meta["run"])
        return cls([BrowsedRun(folder.name, folder, Path(index))])

    def run(self, label: str | None = None) -> BrowsedRun:
        """The run of that label (None: the default run); :class:`ConfigError` for an unknown label."""
        if label is None:
            return self.runs[self.default]
        if label not in self.runs:
            raise ConfigError(f"run={label!r} is not served here; pass one of {list(self.runs)} (see /api/runs).")
        return self.runs[label]

    def open(self, label: str | None = None) -> BrowserIndex:
        """A new read-only connection to the run's index (close it, e.g. with ``with``)."""
        return BrowserIndex(self.run(label).index)

    def describe(self) -> dict[str, Any]:
        """The runs (label, model, layers, d_mlp, k, folder) and comparisons (folder, runs, whether matched)."""
        runs = [
            {
                "label": label,
                "folder": str(run.folder),
                **{k: self.info[label][k] for k in ("model", "layers", "d_mlp", "k")},
            }
            for label, run in self.runs.items()
        ]
        comparisons = [
            {"folder": str(c.folder), "runs": list(c.labels.values()), "has_matches": c.index is not None}
            for c in self.comparisons
        ]
        return {"default": self.default, "runs": runs, "comparisons": comparisons}

    def matches(self, label: str | None, layer: int, key: int) -> dict[str, Any]:
        """Matches of memory (layer, key) of a run in the other runs, from every comparison that holds it.

        Returns:
            ``run``, ``layer``, ``key``; ``compared_with``: the labels of the runs it was matched against;
            ``matches``: per the other run (catalog order), value matches then key matches, by rank; each
            with the other run's ``run`` label, ``layer``, ``key``, ``kind``, ``rank``, ``score``,
            ``q_value``, ``significant``, ``value_similarity``, ``key_correlation``, the ``comparison``
            folder and the matched memory's first top value ``tokens`` (None when its index lacks it).

        Raises:
            ConfigError: An unknown run, or a layer or key that is not in the run's index.
        """
        run = self.run(label)
        with BrowserIndex(run.index) as index:
            index.memory_id(layer, key)  # ConfigError naming the layer or key when the run lacks the memory
        order = list(self.runs)
        found: list[dict[str, Any]] = []
        compared: set[str] = set()
        for comparison in self.comparisons:
            own = next((c for c, mine in comparison.labels.items() if mine == run.label), None)
            if own is None or comparison.index is None:
                continue
            compared.update(mine for mine in comparison.labels.values() if mine != run.label)
            with MatchIndex(comparison.index) as matches:
                for row in matches.matches(own, layer, key):
                    found.append({**row, "run": comparison.labels[row["run"]], "comparison": str(comparison.folder)})
        found.sort(key=lambda row: order.index(row["run"]))  # stable: each comparison's order within a run
        self._attach_tokens(found)
        return {
            "run": run.label, "layer": layer, "key": key,
            "compared_with": [name for name in order if name in compared], "matches": found,
        }  # fmt: skip

    def _attach_tokens(self, found: list[dict[str, Any]]) -> None:
        for label in {row["run"] for row in found}:
            rows = [row for row in found if row["run"] == label]
            with self.open(label) as index:
                tokens = index.top_tokens([(row["layer"], row["key"]) for row in rows], MATCH_TOKENS)
            for row in rows:
                row["tokens"] = tokens.get((row["layer"], row["key"]))


def folder_kind(folder: str | os.PathLike) -> Literal["run", "comparison"]:
    """Whether a folder is a run folder or a comparison folder, by its manifest's ``format``.

    A folder without a manifest is reported as a run folder, so :func:`ffkv_lens.browser.open_index`
    names what is missing.

    Raises:
        RunFolderError: The folder does not exist, or its manifest has another format.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise RunFolderError(f"run folder {str(folder)!r} does not exist; {_PASS}.")
    manifest_path = RunPaths(folder).manifest
    if not manifest_path.is_file():
        raise RunFolderError(f"{str(folder)!r} is not a run folder or a comparison folder (no manifest.json); {_PASS}.")
    manifest = read_json(manifest_path)
    found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
    if found is None or RUN.owns(manifest):
        return "run"
    if COMPARISON.owns(manifest):
        return "comparison"
    raise RunFolderError(
        f"{str(manifest_path)!r} has format {found!r}, neither a run ({RUN.prefix}...) nor a comparison "
        f"({COMPARISON.prefix}...); {_PASS}."
    )


def open_catalog(paths: Sequence[str | os.PathLike], *, rebuild: bool = False, progress: bool = False) -> Catalog:
    """Resolve run and comparison folders into a catalog, building every index that is missing or stale.

    Args:
        paths: Run folders and comparison folders (at least one); the first run found is the default.
        rebuild: Rebuild every index even when current.
        progress: Show progress bars while building.

    Returns:
        The catalog.

    Raises:
        RunFolderError: A folder is neither kind, a comparison's run folder is missing, an index cannot be built.
    """
    if not paths:
        raise ConfigError(f"no folder to browse; {_PASS}.")
    runs: dict[Path, BrowsedRun] = {}
    comparisons: list[BrowsedComparison] = []
    for path in paths:
        if folder_kind(path) == "run":
            _add_run(runs, Path(path), Path(path).resolve().name, rebuild=rebuild, progress=progress)
            continue
        comparison = read_comparison(path)
        labels = {
            r.label: _add_run(runs, r.folder, r.label, rebuild=rebuild, progress=progress).label
            for r in comparison.runs
        }
        comparisons.append(BrowsedComparison(comparison.folder, open_matches(comparison, rebuild=rebuild), labels))
    return Catalog(list(runs.values()), comparisons)


def _add_run(runs: dict[Path, BrowsedRun], folder: Path, label: str, *, rebuild: bool, progress: bool) -> BrowsedRun:
    resolved = folder.resolve()
    if resolved in runs:
        return runs[resolved]
    taken = {run.label for run in runs.values()}
    unique, n = label, 2
    while unique in taken:
        unique, n = f"{label}-{n}", n + 1
    if unique != label:
        log.info("run %s is labelled %r (%r is taken)", folder, unique, label)
    runs[resolved] = BrowsedRun(unique, resolved, open_index(folder, rebuild=rebuild, progress=progress))
    return runs[resolved]
