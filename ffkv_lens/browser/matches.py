"""A comparison folder for the browser: its runs and the SQLite index of its matches.

``ffkv-lens compare`` writes ``CMP_DIR/manifest.json`` (format ``COMPARISON.format`` of
:mod:`ffkv_lens.storage.layout`; its
``runs`` list names each run's label and folder, a relative folder being relative to ``CMP_DIR``)
and ``CMP_DIR/tables/matches.csv``: for a memory (``layer_a``, ``key_a``) of ``run_a``, its closest
memories (``rank`` 1 to 3) in ``run_b``, by value distribution similarity (``kind="value"``) or by
key coefficient correlation (``kind="key"``), both directions.

:func:`read_comparison` checks the manifest and that every run folder exists. :func:`open_matches`
returns ``CMP_DIR/browser.sqlite``, building it when missing or stale, exactly like a run's index
(:func:`ffkv_lens.browser.index.build_atomically`: a temporary file renamed over the index when
complete). The fingerprint is the SHA-256 of ``manifest.json``'s bytes plus the size and mtime of
``matches.csv``, plus :data:`MATCHES_SCHEMA_VERSION`. :class:`MatchIndex` answers "the matches of
this memory" with one indexed lookup.

Example:
    >>> from ffkv_lens.browser.matches import MatchIndex, open_matches  # doctest: +SKIP
    >>> with MatchIndex(open_matches("runs/cmp")) as index:  # doctest: +SKIP
    ...     index.matches("smollm2-135m", 18, 98)[:3]
"""

import hashlib
import logging
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ffkv_lens.browser.index import INDEX_NAME, build_atomically, stored_fingerprint
from ffkv_lens.browser.queries import ReadOnlyIndex
from ffkv_lens.errors import RunFolderError
from ffkv_lens.storage import read_json
from ffkv_lens.storage.layout import COMPARISON, TABLES, ComparisonPaths

__all__ = [
    "MATCHES_SCHEMA_VERSION", "MATCHES_TABLE", "ComparedRun", "ComparisonFolder", "MatchIndex",
    "open_matches", "read_comparison",
]  # fmt: skip

log = logging.getLogger(__name__)
MATCHES_SCHEMA_VERSION = 1
MATCHES_TABLE = Path(TABLES) / "matches.csv"
CHUNK_ROWS = 200_000  # rows of matches.csv read and inserted at a time
_INTS = ("layer_a", "key_a", "layer_b", "key_b", "rank")
_FLOATS = ("score", "q_value", "value_similarity", "key_correlation")
_COLUMNS = ("kind", "run_a", "layer_a", "key_a", "run_b", "layer_b", "key_b", "rank", *_FLOATS, "significant")

SCHEMA = """
CREATE TABLE meta(name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE runs(id INTEGER PRIMARY KEY, label TEXT NOT NULL UNIQUE);  -- the manifest's runs, in order
CREATE TABLE matches(
    run_a INTEGER NOT NULL, layer_a INTEGER NOT NULL, key_a INTEGER NOT NULL,
    run_b INTEGER NOT NULL, layer_b INTEGER NOT NULL, key_b INTEGER NOT NULL,
    kind TEXT NOT NULL, rank INTEGER NOT NULL, score REAL, q_value REAL,
    value_similarity REAL, key_correlation REAL, significant INTEGER);
"""
_INDEXES = "CREATE INDEX matches_a ON matches(run_a, layer_a, key_a);"
# value matches before key matches (kind DESC), then by rank.
_MATCHES = """SELECT b.label AS run, m.layer_b AS layer, m.key_b AS key, m.kind, m.rank, m.score, m.q_value,
    m.significant, m.value_similarity, m.key_correlation
    FROM runs a JOIN matches m ON m.run_a = a.id AND m.layer_a = ? AND m.key_a = ? JOIN runs b ON b.id = m.run_b
    WHERE a.label = ? ORDER BY m.run_b, m.kind DESC, m.rank, m.layer_b, m.key_b"""


@dataclass(frozen=True)
class ComparedRun:
    """One run of a comparison: its label in the comparison and its folder (resolved)."""

    label: str
    folder: Path


@dataclass(frozen=True)
class ComparisonFolder:
    """A comparison folder's runs, in the manifest's order."""

    folder: Path
    runs: tuple[ComparedRun, ...]

    @property
    def table(self) -> Path:
        """``CMP_DIR/tables/matches.csv`` (absent when the comparison ran without matching)."""
        return self.folder / MATCHES_TABLE


def read_comparison(folder: str | os.PathLike) -> ComparisonFolder:
    """Read a comparison folder's manifest; :class:`RunFolderError` when it or a run folder is wrong or missing."""
    folder = Path(folder)
    manifest_path = ComparisonPaths(folder).manifest
    manifest = read_json(manifest_path)
    fix = f"re-run `ffkv-lens compare ... --out {folder}`"
    if not COMPARISON.owns(manifest):
        raise RunFolderError(f"{str(manifest_path)!r} is not a comparison manifest ({COMPARISON.prefix}...); {fix}.")
    entries = manifest.get("runs")
    if not isinstance(entries, list) or not entries:
        raise RunFolderError(f"{str(manifest_path)!r} lists no runs (got runs={entries!r}); {fix}.")
    runs: list[ComparedRun] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("label"), str) or not entry.get("path"):
            raise RunFolderError(f"runs[{i}] of {str(manifest_path)!r} has no label and path (got {entry!r}); {fix}.")
        path = Path(entry["path"])
        run_folder = path if path.is_absolute() else folder / path
        if not run_folder.is_dir():
            raise RunFolderError(
                f"comparison {str(folder)!r} names run {entry['label']!r} at {str(run_folder)!r}, which does not "
                f"exist; put the run folder back there, or fix runs[{i}].path in {str(manifest_path)!r}."
            )
        runs.append(ComparedRun(entry["label"], run_folder.resolve()))
    labels = [run.label for run in runs]
    if len(set(labels)) != len(labels):
        raise RunFolderError(f"{str(manifest_path)!r} repeats run labels {labels}; {fix}.")
    return ComparisonFolder(folder, tuple(runs))


def matches_fingerprint(comparison: ComparisonFolder) -> str:
    """A hash of what the matches index is built from (see the module docstring)."""
    digest = hashlib.sha256(f"matches schema {MATCHES_SCHEMA_VERSION}\n".encode())
    digest.update(hashlib.sha256(ComparisonPaths(comparison.folder).manifest.read_bytes()).digest())
    stat = comparison.table.stat()
    digest.update(f"{MATCHES_TABLE}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def open_matches(
    comparison: ComparisonFolder | str | os.PathLike, *, rebuild: bool = False, path: str | os.PathLike | None = None
) -> Path | None:
    """Path of the comparison's matches index, built first when missing or stale.

    Args:
        comparison: A comparison folder (or what :func:`read_comparison` made of it).
        rebuild: Build even when the index is current.
        path: Where the index lives (default ``CMP_DIR/browser.sqlite``).

    Returns:
        The index path, or None when the comparison has no ``tables/matches.csv``.
    """
    if not isinstance(comparison, ComparisonFolder):
        comparison = read_comparison(comparison)
    if not comparison.table.is_file():
        log.warning("%s has no %s; its runs are shown without matches", comparison.folder, MATCHES_TABLE)
        return None
    path = Path(path) if path is not None else comparison.folder / INDEX_NAME
    fingerprint = matches_fingerprint(comparison)
    if not rebuild and stored_fingerprint(path) == fingerprint:
        log.info("matches index %s is current", path)
        return path
    labels = [run.label for run in comparison.runs]
    return build_atomically(
        path, SCHEMA, lambda conn: _fill(conn, comparison.table, labels), indexes=_INDEXES,
        meta={"fingerprint": fingerprint, "schema": MATCHES_SCHEMA_VERSION, "comparison": str(comparison.folder)},
        hint="copy the comparison folder somewhere writable, or pass open_matches(path=...)",
    )  # fmt: skip


def _fill(conn: sqlite3.Connection, table: Path, labels: list[str]) -> dict[str, Any]:
    import pandas as pd

    ids = {label: i for i, label in enumerate(labels)}
    conn.executemany("INSERT INTO runs VALUES (?, ?)", list(enumerate(labels)))
    n_rows = 0
    try:
        # Labels such as "NA" are text; only the score columns have missing values (written as "").
        chunks = pd.read_csv(
            table, keep_default_na=False, na_values={c: ["", "nan", "NaN"] for c in _FLOATS},
            dtype={"kind": str, "run_a": str, "run_b": str}, chunksize=CHUNK_ROWS,
        )  # fmt: skip
        for chunk in chunks:
            conn.executemany(
                f"INSERT INTO matches({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
                _rows(chunk, table, ids),
            )
            n_rows += len(chunk)
    except (ValueError, pd.errors.ParserError) as err:  # EmptyDataError is a ValueError
        raise RunFolderError(
            f"{str(table)!r} cannot be read as a matches table ({err}); re-run `ffkv-lens compare`."
        ) from None
    return {"runs": labels, "n_matches": n_rows}


def _rows(chunk: Any, table: Path, ids: dict[str, int]) -> list[tuple[Any, ...]]:
    missing = [c for c in _COLUMNS if c not in chunk.columns]
    if missing:
        raise RunFolderError(f"{str(table)!r} lacks columns {missing}; re-run `ffkv-lens compare`.")
    unknown = sorted((set(chunk["run_a"]) | set(chunk["run_b"])) - set(ids))
    if unknown:
        raise RunFolderError(
            f"{str(table)!r} names runs {unknown} that its manifest.json does not list ({list(ids)}); "
            "re-run `ffkv-lens compare`."
        )
    frame = chunk[list(_COLUMNS)].copy()
    frame["run_a"], frame["run_b"] = frame["run_a"].map(ids), frame["run_b"].map(ids)
    frame[list(_INTS)] = frame[list(_INTS)].astype("int64")  # ValueError on a blank or non-integer cell
    frame["significant"] = frame["significant"].map({True: 1, False: 0, "True": 1, "False": 0})
    frame = frame.astype(object).where(frame.notna(), None)  # NaN -> NULL
    return list(frame.itertuples(index=False, name=None))


class MatchIndex(ReadOnlyIndex):
    """Read-only queries over one matches index.

    Args:
        path: A built matches index (:func:`open_matches`).
    """

    def __init__(self, path: str | Path) -> None:
        super().__init__(path, "matches index", "rebuild it with `ffkv-lens browse CMP_DIR --rebuild`")
        self.labels: list[str] = self.meta["runs"]

    def matches(self, run: str, layer: int, key: int) -> list[dict[str, Any]]:
        """Matches of memory (layer, key) of ``run`` in the other runs: value matches first, then by rank.

        Each has ``run`` (the other run's label in this comparison), ``layer``, ``key``, ``kind``,
        ``rank``, ``score``, ``q_value``, ``significant`` (bool), ``value_similarity``,
        ``key_correlation`` (None where not computed). An unknown run or memory gives an empty list.
        """
        rows = [dict(row) for row in self.conn.execute(_MATCHES, (layer, key, run))]
        for row in rows:
            row["significant"] = None if row["significant"] is None else bool(row["significant"])
        return rows
