"""The browser's SQLite index of a run folder: built once, rebuilt when the run changes.

``open_index(run_dir)`` returns the path of ``RUN_DIR/browser.sqlite``, building it first when it
is missing or stale. Staleness is decided by a fingerprint stored in the index: the SHA-256 of
``manifest.json``'s bytes plus the path, size and mtime of every file under ``atlas/`` and
``values/`` and of ``tables/*.csv``, plus :data:`SCHEMA_VERSION`. A build writes a temporary file
beside the index and renames it over the index only when complete (``os.replace``), so a killed
build never leaves a half index; :func:`build_atomically` does that for a comparison's matches
index too (:mod:`ffkv_lens.browser.matches`).

The schema is in ``docs/browser.md``; the token-search rule is :func:`normalize_token`.

Example:
    >>> from ffkv_lens.browser import open_index  # doctest: +SKIP
    >>> path = open_index("runs/smollm2", progress=True)  # doctest: +SKIP
"""

import contextlib
import hashlib
import json
import logging
import os
import sqlite3
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ffkv_lens.browser.memory_stats import STATS_SCHEMA
from ffkv_lens.browser.text import normalize_token
from ffkv_lens.errors import RunFolderError
from ffkv_lens.storage import read_json
from ffkv_lens.storage.layout import BROWSER_INDEX

__all__ = [
    "INDEX_NAME", "SCHEMA_VERSION", "build_atomically", "check_run_folder", "normalize_token", "open_index",
    "run_fingerprint", "stored_fingerprint",
]  # fmt: skip

log = logging.getLogger(__name__)
INDEX_NAME = BROWSER_INDEX  # RUN_DIR/browser.sqlite (ffkv_lens.storage.layout)
SCHEMA_VERSION = 3  # 2: packed examples per (memory, sign), context lookup; 3: per-memory statistics, causal_score
STALE_TEMP_SECONDS = 3600  # leftovers of killed builds older than this are removed on the next build
_TABLE_FILES = (
    "agreement_per_memory.csv", "mutation_per_key.csv", "agreement_per_layer.csv", "mutation_per_layer.csv",
    "causal_per_memory.csv",
)  # fmt: skip

SCHEMA = """
CREATE TABLE meta(name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE memories(
    id INTEGER PRIMARY KEY,                 -- layer * d_mlp + key
    layer INTEGER NOT NULL, key INTEGER NOT NULL,
    top_ids BLOB, top_tokens TEXT, top_logits BLOB,           -- best first; tokens a JSON list
    bottom_ids BLOB, bottom_tokens TEXT, bottom_logits BLOB,  -- lowest first; ids and logits packed (meta dtypes)
    max_prob REAL, precision_at_k REAL, agrees INTEGER, next_rank INTEGER, top1_next_token TEXT,
    shallow_score REAL, mutation_kind TEXT, causal_score REAL, n_top INTEGER NOT NULL, n_bottom INTEGER NOT NULL,
    UNIQUE(layer, key));
CREATE TABLE layers(
    layer INTEGER PRIMARY KEY, n_keys INTEGER, n_examples INTEGER, mean_max_prob REAL,
    mean_precision_at_k REAL, agreement_rate REAL, n_mutation_keys INTEGER, shallow_share REAL);
CREATE TABLE tokens(token_id INTEGER PRIMARY KEY, text TEXT NOT NULL, norm TEXT NOT NULL);
CREATE TABLE value_tokens(
    token_id INTEGER NOT NULL, side INTEGER NOT NULL, memory INTEGER NOT NULL,
    rank INTEGER NOT NULL, logit REAL NOT NULL,
    PRIMARY KEY(token_id, side, memory)) WITHOUT ROWID;
CREATE TABLE contexts(
    id INTEGER PRIMARY KEY, unit_id INTEGER NOT NULL, doc_id INTEGER NOT NULL, position INTEGER NOT NULL,
    prefix TEXT NOT NULL, peak_start INTEGER NOT NULL, next_token TEXT, next_token_id INTEGER);
CREATE TABLE examples(                      -- one row per (memory, sign) with examples, in rank order
    id INTEGER PRIMARY KEY,                 -- memory * 2 + (sign == -1)
    contexts BLOB NOT NULL,                 -- context ids (meta dtypes.context)
    coefficients BLOB NOT NULL,             -- the atlas's coefficients, exact (meta dtypes.coefficient)
    ranks BLOB);                            -- NULL: ranks 0, 1, ..., n - 1; else meta dtypes.rank
CREATE TABLE context_examples(              -- the reverse lookup: one row per context
    context INTEGER PRIMARY KEY,
    codes BLOB NOT NULL,                    -- memory * 2 + (sign == -1) of each example (meta dtypes.code)
    ranks BLOB NOT NULL);                   -- each example's rank (meta dtypes.rank)
CREATE VIRTUAL TABLE context_fts USING fts5(text, content='', tokenize='unicode61 remove_diacritics 2');
CREATE VIRTUAL TABLE value_fts USING fts5(top, bottom, content='', tokenize='unicode61 remove_diacritics 2');
"""
SCHEMA += STATS_SCHEMA  # per-memory statistics: ffkv_lens.browser.memory_stats
_INDEXES = """
CREATE INDEX tokens_norm ON tokens(norm);
INSERT INTO context_fts(context_fts) VALUES('optimize');
INSERT INTO value_fts(value_fts) VALUES('optimize');
"""


def check_run_folder(folder: str | os.PathLike) -> Path:
    """The run folder as a Path, or :class:`RunFolderError` naming what is missing.

    Raises:
        RunFolderError: The folder, its manifest or its atlas is missing.
        DamagedFileError: The manifest is not JSON or holds fields of the wrong type.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise RunFolderError(f"run folder {str(folder)!r} does not exist; pass the --out folder of `ffkv-lens run`.")
    if not (folder / "manifest.json").is_file():
        raise RunFolderError(
            f"{str(folder)!r} is not a run folder (no manifest.json); pass the --out folder of `ffkv-lens run`."
        )
    from ffkv_lens.report.memories import check_run_manifest

    manifest = read_json(folder / "manifest.json")
    check_run_manifest(manifest, folder / "manifest.json")
    if not (folder / "atlas" / "manifest.json").is_file():
        status = manifest.get("status", "unknown")
        raise RunFolderError(
            f"{str(folder)!r} has no trigger atlas yet (run status {status!r}); let `ffkv-lens run` finish its "
            "triggers step (re-run the same command to resume it), then browse."
        )
    return folder


def run_fingerprint(folder: str | os.PathLike) -> str:
    """A hash of what the index is built from (see the module docstring)."""
    folder = Path(folder)
    digest = hashlib.sha256(f"schema {SCHEMA_VERSION}\n".encode())
    digest.update(hashlib.sha256((folder / "manifest.json").read_bytes()).digest())
    files = [p for sub in ("atlas", "values") if (folder / sub).is_dir() for p in (folder / sub).rglob("*")]
    files += [folder / "tables" / name for name in _TABLE_FILES]
    for path in sorted(p for p in files if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(folder)}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def stored_fingerprint(path: Path) -> str | None:
    """The fingerprint an index was built for, or None when it is unreadable or of another schema."""
    if not path.is_file():
        return None
    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as conn:
            row = conn.execute("SELECT value FROM meta WHERE name = 'fingerprint'").fetchone()
    except sqlite3.Error:
        return None
    return json.loads(row[0]) if row else None


def open_index(
    folder: str | os.PathLike, *, rebuild: bool = False, progress: bool = False, path: str | os.PathLike | None = None
) -> Path:
    """Path of the run folder's index, built or rebuilt first when missing or stale.

    Args:
        folder: A run folder (its atlas must exist; values and tables are used when present).
        rebuild: Build even when the index is current.
        progress: Show a progress bar while building.
        path: Where the index lives (default ``folder/browser.sqlite``).

    Returns:
        The index path.
    """
    folder = check_run_folder(folder)
    path = Path(path) if path is not None else folder / INDEX_NAME
    fingerprint = run_fingerprint(folder)
    if not rebuild and stored_fingerprint(path) == fingerprint:
        log.info("index %s is current", path)
        return path
    return build_index(folder, path, fingerprint=fingerprint, progress=progress)


def build_index(folder: Path, path: Path, *, fingerprint: str, progress: bool = False) -> Path:
    """Build the index into a temporary file beside ``path`` and rename it over ``path``."""
    from ffkv_lens.browser.build import fill_index

    return build_atomically(
        path, SCHEMA, lambda conn: fill_index(conn, folder, progress=progress), indexes=_INDEXES,
        meta={"fingerprint": fingerprint, "schema": SCHEMA_VERSION},
        hint="copy the run folder somewhere writable, or pass open_index(path=...)",
    )  # fmt: skip


def build_atomically(
    path: Path,
    sql: str,
    fill: Callable[[sqlite3.Connection], dict[str, Any]],
    *,
    indexes: str,
    meta: dict[str, Any],
    hint: str,
) -> Path:
    """Create the tables of ``sql`` in a temporary file beside ``path``, ``fill`` them, rename it over ``path``.

    Args:
        path: Where the SQLite file ends up.
        sql: SQL creating the tables, a ``meta(name, value)`` table among them.
        fill: Inserts the rows (inside one transaction); returns ``meta`` entries.
        indexes: SQL run after ``fill`` (indexes build faster over full tables).
        meta: More ``meta`` entries (the fingerprint and schema version); ``build_seconds`` is added.
        hint: How to fix an unwritable folder, for the error message.

    Returns:
        ``path``.

    Raises:
        RunFolderError: The folder of ``path`` is not writable.
    """
    _remove_stale_temps(path)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise RunFolderError(f"cannot write the browser index beside {str(path)!r} ({err}); {hint}.") from None
    os.close(fd)
    tmp = Path(tmp_name)
    start = time.perf_counter()
    try:
        with contextlib.closing(sqlite3.connect(tmp)) as conn:
            _build_pragmas(conn)
            conn.executescript(sql)
            with conn:
                entries = {**fill(conn), **meta}
                conn.executescript(indexes)
                entries["build_seconds"] = time.perf_counter() - start
                conn.executemany("INSERT INTO meta VALUES (?, ?)", [(k, _json(v)) for k, v in entries.items()])
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    log.info("built %s in %.1f s", path, time.perf_counter() - start)
    return path


def _build_pragmas(conn: sqlite3.Connection) -> None:
    # A temporary file that is discarded on any failure needs no journal.
    for pragma in ("journal_mode = OFF", "synchronous = OFF", "cache_size = -131072", "temp_store = MEMORY"):
        conn.execute(f"PRAGMA {pragma}")


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _remove_stale_temps(path: Path) -> None:
    now = time.time()
    for old in path.parent.glob(f".{path.name}.*.tmp"):
        with contextlib.suppress(OSError):
            if now - old.stat().st_mtime > STALE_TEMP_SECONDS:
                old.unlink()
