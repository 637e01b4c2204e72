"""Fill a fresh browser index from a run folder (called by :func:`ffkv_lens.browser.index.build_index`).

Everything is inserted with ``executemany`` inside the caller's single transaction. Example text is
made once per distinct context (:mod:`ffkv_lens.browser.text`), never once per example.
"""

import json
import logging
import sqlite3
import time
from pathlib import Path
from typing import Any

import numpy as np

from ffkv_lens.browser.memory_stats import fill_stats
from ffkv_lens.browser.text import context_keys, decode_contexts, decode_tokens, normalize_token
from ffkv_lens.errors import RunFolderError
from ffkv_lens.storage import read_json
from ffkv_lens.storage.layout import MANIFEST, RunPaths
from ffkv_lens.storage.reading import check_columns, read_table

__all__ = ["fill_index"]

log = logging.getLogger(__name__)
_SIGNS = ((1, "top"), (-1, "bottom"))


def fill_index(conn: sqlite3.Connection, folder: Path, *, progress: bool = False) -> dict[str, Any]:
    """Insert every table's rows; returns the ``meta`` entries describing the run and the index."""
    from tqdm.auto import tqdm

    from ffkv_lens.analysis.atlas import TriggerAtlas

    atlas = TriggerAtlas.load(RunPaths(folder).atlas)
    if atlas.tokenizer is None:
        raise RunFolderError(f"{folder / 'atlas'} was saved without its tokenizer; the browser needs it to show text.")
    stages = 4 + 2 * len(atlas.layers)
    with tqdm(total=stages, desc="browser index", unit="step", disable=not progress) as bar:
        parts = _example_parts(atlas)
        keys = np.concatenate([p["keys"] for p in parts]) if parts else np.zeros(0, dtype=np.int64)
        unique, inverse = np.unique(keys, return_inverse=True)
        bar.update()
        contexts = decode_contexts(atlas.units, atlas.tokenizer, unique)
        _insert_contexts(conn, contexts)
        bar.update()
        dtypes = _insert_examples(conn, parts, inverse, n_contexts=len(contexts.prefixes), k=atlas.k)
        bar.update(2 * len(atlas.layers))
        found = _insert_memories(conn, folder, atlas, parts, dtypes)
        bar.update()
        _insert_layers(conn)
        found.update(fill_stats(conn, atlas))
        bar.update()
    meta = _meta(folder, atlas, found, n_examples=int(keys.size), contexts=contexts)
    return {**meta, "dtypes": dtypes, "stats_settings": atlas.stats_settings if found["stats"] else None}


def _example_parts(atlas: Any) -> list[dict[str, Any]]:
    """Per (layer, sign): memory ids, ranks, coefficients and context keys of the valid examples."""
    parts = []
    for sign, _ in _SIGNS:
        tables = atlas.top if sign == 1 else atlas.bottom
        for layer in atlas.layers if tables is not None else []:
            table = tables[layer]
            units, positions = table.units.numpy(), table.positions.numpy()
            key, rank = np.nonzero(units >= 0)
            parts.append(
                {
                    "layer": layer,
                    "sign": sign,
                    "memory": layer * atlas.d_mlp + key,
                    "key": key,
                    "rank": rank,
                    "coefficient": table.values.numpy()[key, rank],
                    "keys": context_keys(atlas.units, units[key, rank], positions[key, rank]),
                }
            )
    return parts


def _insert_contexts(conn: sqlite3.Connection, c: Any) -> None:
    rows = zip(
        range(len(c.prefixes)), c.unit_ids.tolist(), c.doc_ids.tolist(), c.positions.tolist(), c.prefixes,
        c.peak_starts, c.next_tokens, [None if t < 0 else t for t in c.next_token_ids.tolist()], strict=True,
    )  # fmt: skip
    conn.executemany("INSERT INTO contexts VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
    texts = ((i, p + (n or "")) for i, (p, n) in enumerate(zip(c.prefixes, c.next_tokens, strict=True)))
    conn.executemany("INSERT INTO context_fts(rowid, text) VALUES (?, ?)", texts)


def _insert_examples(
    conn: sqlite3.Connection, parts: list[dict[str, Any]], context: np.ndarray, *, n_contexts: int, k: int
) -> dict[str, str]:
    """Examples packed per (memory, sign), and per context for the text search; returns the BLOB dtypes.

    A (memory, sign) is coded ``memory * 2 + (sign == -1)``. Ranks are stored only when they are not
    ``0..n-1``; the coefficients keep the atlas's precision (float32 when that is exact).
    """
    coefficients = np.concatenate([p["coefficient"] for p in parts]) if parts else np.zeros(0)
    dtypes = {
        "context": "<u2" if n_contexts <= 2**16 else "<u4",
        "rank": "<u1" if k <= 2**8 else "<u4",
        "code": "<u4",
        "coefficient": _exact_float_dtype(coefficients),
        "token_id": "<i4",
        "logit": "<f8",  # set by _insert_tokens
    }
    codes = np.concatenate([p["memory"] * 2 + (p["sign"] == -1) for p in parts]) if parts else np.zeros(0, np.int64)
    ranks = np.concatenate([p["rank"] for p in parts]) if parts else np.zeros(0, np.int64)
    conn.executemany(
        "INSERT INTO examples VALUES (?, ?, ?, ?)", _packed_rows(codes, ranks, context, coefficients, dtypes)
    )
    order = np.lexsort((ranks, codes, context))
    starts, ends = _runs(context[order])
    by_context, by_code, by_rank = (
        context[order],
        codes[order].astype(dtypes["code"]),
        ranks[order].astype(dtypes["rank"]),
    )
    rows = (
        (int(by_context[a]), by_code[a:b].tobytes(), by_rank[a:b].tobytes()) for a, b in zip(starts, ends, strict=True)
    )
    conn.executemany("INSERT INTO context_examples VALUES (?, ?, ?)", rows)
    return dtypes


def _packed_rows(
    codes: np.ndarray, ranks: np.ndarray, context: np.ndarray, coefficients: np.ndarray, dtypes: dict[str, str]
) -> Any:
    """``(id, contexts, coefficients, ranks)`` per (memory, sign), in rank order; ranks None when ``0..n-1``."""
    order = np.lexsort((ranks, codes))
    codes, ranks = codes[order], ranks[order]
    context, coefficients = context[order].astype(dtypes["context"]), coefficients[order].astype(dtypes["coefficient"])
    for a, b in zip(*_runs(codes), strict=True):
        rank = ranks[a:b]
        contiguous = bool(np.array_equal(rank, np.arange(b - a)))
        packed_ranks = None if contiguous else rank.astype(dtypes["rank"]).tobytes()
        yield int(codes[a]), context[a:b].tobytes(), coefficients[a:b].tobytes(), packed_ranks


def _runs(sorted_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and end offsets of the runs of equal values in a sorted array."""
    if sorted_values.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    return starts, np.r_[starts[1:], sorted_values.size]


def _exact_float_dtype(values: np.ndarray) -> str:
    """``"<f4"`` when float32 holds every value exactly (the atlas and projection store float32), else ``"<f8"``."""
    values = np.asarray(values, dtype=np.float64)
    with np.errstate(over="ignore"):
        exact = np.array_equal(values.astype(np.float32).astype(np.float64), values, equal_nan=True)
    return "<f4" if exact else "<f8"


def _insert_memories(
    conn: sqlite3.Connection, folder: Path, atlas: Any, parts: list[dict[str, Any]], dtypes: dict[str, str]
) -> dict:
    """Memories (with value tokens and scores where the run has them), tokens and value_tokens."""
    import pandas as pd

    d_mlp, layers = atlas.d_mlp, atlas.layers
    frame = pd.DataFrame({"layer": np.repeat(layers, d_mlp), "key": np.tile(np.arange(d_mlp), len(layers))})
    for sign, name in _SIGNS:
        counts = {(p["layer"], k): n for p in parts if p["sign"] == sign for k, n in _counts(p["key"])}
        frame[f"n_{name}"] = [counts.get(lk, 0) for lk in zip(frame.layer, frame.key, strict=True)]
    found = {"values": False, "agreement": False, "mutation": False, "causal": False}
    values = _values_frame(folder, layers)
    if values is not None:
        values = _insert_tokens(conn, atlas.tokenizer, values, d_mlp, dtypes)
        frame = frame.merge(values, on=["layer", "key"], how="left")
        found["values"] = True
    agreement = _read_table(folder, "agreement_per_memory", ["precision_at_k", "agrees", "rank", "top1_next_token"])
    if agreement is not None:
        frame = frame.merge(agreement.rename(columns={"rank": "next_rank"}), on=["layer", "key"], how="left")
        found["agreement"] = True
    mutation = _read_table(folder, "mutation_per_key", ["shallow_score", "kind"])
    if mutation is not None:
        frame = frame.merge(mutation.rename(columns={"kind": "mutation_kind"}), on=["layer", "key"], how="left")
        found["mutation"] = True
    causal = _read_table(folder, "causal_per_memory", ["causal_score"])
    if causal is not None:
        frame = frame.merge(causal, on=["layer", "key"], how="left")
        found["causal"] = True
    frame["id"] = frame.layer * d_mlp + frame.key
    columns = [
        "id", "layer", "key", "top_ids", "top_tokens", "top_logits", "bottom_ids", "bottom_tokens", "bottom_logits",
        "max_prob", "precision_at_k", "agrees", "next_rank", "top1_next_token", "shallow_score", "mutation_kind",
        "causal_score", "n_top", "n_bottom",
    ]  # fmt: skip
    frame = frame.reindex(columns=columns)
    frame = frame.astype(object).where(frame.notna(), None)
    conn.executemany(f"INSERT INTO memories VALUES ({', '.join('?' * len(columns))})", frame.itertuples(index=False))
    return found


def _counts(keys: np.ndarray) -> list[tuple[int, int]]:
    uniq, counts = np.unique(keys, return_counts=True)
    return list(zip(uniq.tolist(), counts.tolist(), strict=True))


def _values_frame(folder: Path, layers: list[int]) -> Any:
    """Value tokens per memory as JSON columns (decoded later), or None when the run has no values."""
    from ffkv_lens.analysis.values import ValueProjection

    if not (RunPaths(folder).values / MANIFEST).is_file():
        return None
    projection = ValueProjection.load(RunPaths(folder).values)
    frame = projection.to_pandas(layers=[lay for lay in layers if lay in projection.layers], text=False)
    return frame if len(frame) else None


def _insert_tokens(conn: sqlite3.Connection, tokenizer: Any, values: Any, d_mlp: int, dtypes: dict[str, str]) -> Any:
    """Decode every value token once; fill tokens, value_tokens, value_fts; returns values with packed columns.

    Token texts become JSON lists, ids and logits packed BLOBs (``dtypes["logit"]`` is set here).
    """
    values = values.copy()
    ids = np.array([t for col in ("top_ids", "bottom_ids") for row in values[col] for t in row], dtype=np.int64)
    text = decode_tokens(tokenizer, ids)
    conn.executemany("INSERT INTO tokens VALUES (?, ?, ?)", ((t, s, normalize_token(s)) for t, s in text.items()))
    memory = (values.layer * d_mlp + values.key).tolist()
    for side, name in _SIGNS:
        rows = (
            (t, side, m, rank, logit)
            for m, row, logits in zip(memory, values[f"{name}_ids"], values[f"{name}_logits"], strict=True)
            for rank, (t, logit) in enumerate(zip(row, logits, strict=True))
        )
        conn.executemany("INSERT INTO value_tokens VALUES (?, ?, ?, ?, ?)", rows)
        values[f"{name}_tokens"] = [
            json.dumps([text[t] for t in row], ensure_ascii=False) for row in values[f"{name}_ids"]
        ]
    fts = (
        (m, " ".join(text[t] for t in top), " ".join(text[t] for t in bottom))
        for m, top, bottom in zip(memory, values["top_ids"], values["bottom_ids"], strict=True)
    )
    conn.executemany("INSERT INTO value_fts(rowid, top, bottom) VALUES (?, ?, ?)", fts)
    logits = [v for column in ("top_logits", "bottom_logits") for row in values[column] for v in row]
    dtypes["logit"] = _exact_float_dtype(np.array(logits, dtype=np.float64))
    for column, dtype in (("ids", dtypes["token_id"]), ("logits", dtypes["logit"])):
        for side in ("top", "bottom"):
            values[f"{side}_{column}"] = [np.asarray(row, dtype=dtype).tobytes() for row in values[f"{side}_{column}"]]
    return values


def _read_table(folder: Path, name: str, columns: list[str]) -> Any:
    from ffkv_lens.report.memories import RUN_FIX

    path = RunPaths(folder).table(name)
    if not path.is_file():
        return None
    # Tokens such as "null", "NA" or "None" are text, not missing values; a "\r" token is written unquoted
    # (pandas quotes only the "\n" line terminator), so only "\n" may end a row.
    frame = read_table(path, keep_default_na=False, na_values=[""], lineterminator="\n", fix=RUN_FIX)
    if "agrees" in frame:
        frame["agrees"] = frame["agrees"].map({True: 1, False: 0, "True": 1, "False": 0})
    missing = [c for c in ("layer", "key", *columns) if c not in frame.columns]
    if missing:
        log.warning("%s lacks columns %s; its scores are not shown", path, missing)
        return None
    numbers = tuple(c for c in ("precision_at_k", "rank", "shallow_score", "causal_score") if c in columns)
    frame = check_columns(frame, path, ints=("layer", "key"), numbers=numbers, fix=RUN_FIX)
    return frame[["layer", "key", *columns]]


def _insert_layers(conn: sqlite3.Connection) -> None:
    conn.execute(
        """INSERT INTO layers SELECT layer, COUNT(*), SUM(n_top + n_bottom), AVG(max_prob), AVG(precision_at_k),
           AVG(agrees), COUNT(shallow_score),
           AVG(CASE mutation_kind WHEN 'shallow' THEN 1.0 WHEN 'semantic' THEN 0.0 END)
           FROM memories GROUP BY layer"""
    )


def _meta(folder: Path, atlas: Any, found: dict[str, bool], *, n_examples: int, contexts: Any) -> dict[str, Any]:
    manifest = read_json(RunPaths(folder).manifest)
    model = manifest.get("model") or {}
    return {
        "run": str(folder.resolve()),
        "model": manifest.get("config", {}).get("model") or model.get("model_name"),
        "status": manifest.get("status"),
        "layers": atlas.layers,
        "d_mlp": atlas.d_mlp,
        "k": atlas.k,
        "signed": atlas.signed,
        "n_examples": n_examples,
        "n_contexts": len(contexts.prefixes),
        "n_units": int(np.unique(contexts.unit_ids).size),
        "units_by_offsets": contexts.exact_units,
        "has": found,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
