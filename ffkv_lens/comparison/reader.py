"""A comparison folder read back: :class:`Comparison` (the writer is :func:`ffkv_lens.comparison.compare`).

The folder's format and entries are those of :data:`ffkv_lens.storage.layout.COMPARISON`
(``manifest.json``, ``tables/curves.csv``, ``tables/matches.csv``); every field and column the
report reads is checked (:mod:`ffkv_lens.comparison.checks`), so a damaged folder is a one-line error.

Example:
    >>> comparison = Comparison.load("runs/cmp")  # doctest: +SKIP
    >>> comparison.run("smollm2-135m").manifest["status"]  # doctest: +SKIP
    'finished'
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ffkv_lens.comparison.checks import COMPARE_FIX, check_comparison_manifest, check_curves, check_matches
from ffkv_lens.errors import ConfigError, RunFolderError
from ffkv_lens.report.memories import RunFolder
from ffkv_lens.storage import read_json
from ffkv_lens.storage.layout import COMPARISON, ComparisonPaths
from ffkv_lens.storage.reading import read_table, short

__all__ = ["COMPARE_FORMAT", "MATCH_COLUMNS", "Comparison"]

COMPARE_FORMAT = COMPARISON.format  # the format compare() writes (kept as ffkv_lens.comparison.COMPARE_FORMAT)
MATCH_COLUMNS = [
    "kind", "run_a", "layer_a", "key_a", "run_b", "layer_b", "key_b", "rank", "score", "q_value", "significant",
    "value_similarity", "key_correlation",
]  # fmt: skip


@dataclass
class Comparison:
    """A comparison folder read back.

    Attributes:
        path: The folder.
        manifest: ``manifest.json``.
        curves: ``tables/curves.csv`` (tidy per-layer metrics).
        matches: ``tables/matches.csv`` (empty when matching was skipped).
    """

    path: Path
    manifest: dict[str, Any]
    curves: pd.DataFrame
    matches: pd.DataFrame

    @classmethod
    def load(cls, path: str | Path) -> "Comparison":
        """Open a comparison folder written by :func:`compare`.

        Raises:
            RunFolderError: The folder is missing or is not a comparison folder.
            DamagedFileError: Its manifest or a table is damaged (wrong types, missing columns).
        """
        path = Path(path)
        paths = ComparisonPaths(path)
        manifest_path = paths.manifest
        if not manifest_path.is_file():
            raise RunFolderError(f"{str(path)!r} is not a comparison folder (no manifest.json); pass --out of "
                                 "`ffkv-lens compare`.")  # fmt: skip
        manifest = read_json(manifest_path)
        if not COMPARISON.owns(manifest):
            found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
            raise RunFolderError(f"{str(path)!r} holds a manifest of format {short(found)}, not {COMPARE_FORMAT!r}.")
        check_comparison_manifest(manifest, manifest_path)
        curves_path, matches_path = paths.table("curves"), paths.table("matches")
        curves = check_curves(read_table(curves_path, lineterminator="\n", fix=COMPARE_FIX), curves_path)
        matches = (
            check_matches(read_table(matches_path, lineterminator="\n", fix=COMPARE_FIX), matches_path)
            if matches_path.is_file() else pd.DataFrame(columns=MATCH_COLUMNS)
        )  # fmt: skip
        return cls(path, manifest, curves, matches)

    def run(self, label: str) -> RunFolder:
        """The run folder of a label."""
        for entry in self.manifest["runs"]:
            if entry["label"] == label:
                return RunFolder(_resolve(self.path, entry["path"]))
        raise ConfigError(f"no run labelled {label!r}; labels: {[r['label'] for r in self.manifest['runs']]}.")


def _resolve(root: Path, path: str) -> Path:
    candidate = Path(path)
    return candidate if candidate.is_absolute() else root / candidate
