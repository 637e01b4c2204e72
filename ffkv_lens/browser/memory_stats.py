"""Per-memory statistics in the browser index: tables, how they are filled, and the queries over them.

When the run's atlas holds statistics (``atlas.has_stats``; docs/triggers.md, "Per-memory
statistics"), :func:`fill_stats` stores per memory its count, mean, standard deviation, density,
range and histogram (the bin counts packed; the edges once per layer), its quantile groups with
their sampled positions (text decoded once per distinct (unit, position), as the trigger examples'
contexts are), and the gate/up quadrant shares when the atlas has them. Old run folders hold none:
the tables stay empty and the page says "not recorded".

:func:`memory_stats` answers the ``stats`` part of ``/api/memory``; :func:`list_memories` answers
``/api/memories`` (a layer's memories sorted and filtered by density, mean, std or count).
"""

import json
import sqlite3
from typing import Any

import numpy as np

from ffkv_lens.browser.text import context_keys, decode_contexts
from ffkv_lens.errors import ConfigError

__all__ = ["LIST_ORDERS", "LIST_SORTS", "STATS_SCHEMA", "fill_stats", "list_memories", "memory_stats"]

STATS_SCHEMA = """
CREATE TABLE memory_stats(
    memory INTEGER PRIMARY KEY,             -- memories.id
    count INTEGER NOT NULL, mean REAL, std REAL, density REAL, min REAL, max REAL,
    histogram BLOB NOT NULL);               -- positions per bin (<i8); the edges are in layer_bins
CREATE TABLE layer_bins(layer INTEGER PRIMARY KEY, edges BLOB NOT NULL);  -- <f8, bins + 1
CREATE TABLE quantile_groups(
    memory INTEGER NOT NULL, grp INTEGER NOT NULL, lo REAL NOT NULL, hi REAL NOT NULL, share REAL NOT NULL,
    PRIMARY KEY(memory, grp)) WITHOUT ROWID;
CREATE TABLE sample_contexts(
    id INTEGER PRIMARY KEY, unit_id INTEGER NOT NULL, doc_id INTEGER NOT NULL, position INTEGER NOT NULL,
    prefix TEXT NOT NULL, peak_start INTEGER NOT NULL);
CREATE TABLE quantile_samples(              -- in the atlas's order: by group, then as sampled
    memory INTEGER NOT NULL, grp INTEGER NOT NULL, ord INTEGER NOT NULL, context INTEGER NOT NULL,
    coefficient REAL NOT NULL, PRIMARY KEY(memory, grp, ord)) WITHOUT ROWID;
CREATE TABLE quadrants(
    memory INTEGER NOT NULL, ord INTEGER NOT NULL, quadrant TEXT NOT NULL, gate_sign TEXT, up_sign TEXT,
    count INTEGER NOT NULL, share REAL, PRIMARY KEY(memory, ord)) WITHOUT ROWID;
CREATE TABLE sample_units(                  -- tokens of the units the samples are in (browse --model recomputes)
    unit_id INTEGER PRIMARY KEY, doc_id INTEGER NOT NULL, tokens BLOB NOT NULL);  -- <i4, without BOS
CREATE INDEX memory_stats_density ON memory_stats(density);
"""
LIST_SORTS = ("density", "mean", "std", "count", "key")
LIST_ORDERS = ("desc", "asc")
LIST_LIMIT = 500
LISTED_TOKENS = 3  # value top tokens shown per listed memory
_STAT_COLUMNS = ("count", "mean", "std", "density", "min", "max")


def fill_stats(conn: sqlite3.Connection, atlas: Any) -> dict[str, bool]:
    """Insert the atlas's statistics (nothing when it has none); returns ``{"stats": ..., "quadrants": ...}``."""
    if not getattr(atlas, "has_stats", False):
        return {"stats": False, "quadrants": False}
    d_mlp, parts = atlas.d_mlp, []
    for layer in atlas.layers:
        edges = atlas.histogram_edges(layer).double().numpy()
        conn.execute("INSERT INTO layer_bins VALUES (?, ?)", (layer, edges.astype("<f8").tobytes()))
        counts = atlas.histograms(layer).numpy().astype("<i8")
        frame = atlas.stats(layer)
        rows = zip(
            (layer * d_mlp + frame["key"].to_numpy()).tolist(), frame["count"].astype(int).tolist(),
            *(frame[c].astype(float).tolist() for c in _STAT_COLUMNS[1:]),
            (counts[k].tobytes() for k in frame["key"].tolist()), strict=True,
        )  # fmt: skip
        conn.executemany("INSERT INTO memory_stats VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
        groups, samples = _layer_samples(atlas, layer)
        conn.executemany("INSERT INTO quantile_groups VALUES (?, ?, ?, ?, ?)", groups)
        parts.append(samples)
        if atlas.has_quadrants:
            _insert_quadrants(conn, atlas, layer)
    _insert_samples(conn, atlas, {name: np.concatenate([p[name] for p in parts]) for name in parts[0]})
    return {"stats": True, "quadrants": bool(atlas.has_quadrants)}


def _layer_samples(atlas: Any, layer: int) -> tuple[list[tuple], dict[str, np.ndarray]]:
    """A layer's quantile groups ``(memory, group, lo, hi, share)`` and samples, as ``quantile_examples`` gives them.

    Read in bulk from the layer's stored tables (``atlas.memory_stats[layer]``: one ``quantile_examples``
    call per memory would decode every sample's text twice); the index test checks every memory
    against ``atlas.quantile_examples``.
    """
    table = atlas.memory_stats[layer]
    n = int(table.count[0])
    memory = layer * atlas.d_mlp + np.arange(table.group_count.shape[0])
    count = table.group_count.numpy()
    keys, group = np.nonzero(count > 0)
    lo, hi = table.group_lo.numpy()[keys, group], table.group_hi.numpy()[keys, group]
    share = count[keys, group] / n if n else np.zeros(keys.size)
    groups = list(zip(memory[keys].tolist(), group.tolist(), lo.tolist(), hi.tolist(), share.tolist(), strict=True))
    units = table.sample_units.numpy()
    keys, group, order = np.nonzero(units >= 0)  # C order: by key, group, then as sampled
    samples = {
        "memory": memory[keys], "group": group, "order": order, "unit": units[keys, group, order],
        "position": table.sample_positions.numpy()[keys, group, order],
        "coefficient": table.sample_values.double().numpy()[keys, group, order],
    }  # fmt: skip
    return groups, samples


def _insert_quadrants(conn: sqlite3.Connection, atlas: Any, layer: int) -> None:
    """A layer's quadrant counts and shares, as ``atlas.quadrants`` gives them, read in bulk (``quadrant_counts``).

    The quadrant names and signs are those of ``atlas.quadrants`` (read once, from key 0).
    """
    names = atlas.quadrants(layer, 0)[["quadrant", "gate_sign", "up_sign"]].itertuples(index=False)
    names = [tuple(str(v) for v in row) for row in names]
    counts = atlas.memory_stats[layer].quadrant_counts.numpy()
    totals = counts.sum(1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    base = layer * atlas.d_mlp
    conn.executemany(
        "INSERT INTO quadrants VALUES (?, ?, ?, ?, ?, ?, ?)",
        ((base + k, q, *names[q], int(counts[k, q]), float(shares[k, q]))
         for k in range(counts.shape[0]) for q in range(len(names))),
    )  # fmt: skip


def _insert_samples(conn: sqlite3.Connection, atlas: Any, s: dict[str, np.ndarray]) -> None:
    """Quantile samples and their contexts, each distinct (unit, position) decoded once; their units' tokens."""
    if not s["unit"].size:
        return
    unique, inverse = np.unique(context_keys(atlas.units, s["unit"], s["position"]), return_inverse=True)
    c = decode_contexts(atlas.units, atlas.tokenizer, unique)
    conn.executemany(
        "INSERT INTO sample_contexts VALUES (?, ?, ?, ?, ?, ?)",
        zip(range(len(c.prefixes)), c.unit_ids.tolist(), c.doc_ids.tolist(), c.positions.tolist(), c.prefixes,
            c.peak_starts, strict=True),
    )  # fmt: skip
    conn.executemany(
        "INSERT INTO quantile_samples VALUES (?, ?, ?, ?, ?)",
        zip(s["memory"].tolist(), s["group"].tolist(), s["order"].tolist(), inverse.tolist(),
            s["coefficient"].tolist(), strict=True),
    )  # fmt: skip
    used = np.unique(c.unit_ids)
    conn.executemany(
        "INSERT INTO sample_units VALUES (?, ?, ?)",
        ((u, d, np.asarray(t, dtype="<i4").tobytes()) for u in used.tolist() for d, t in [atlas.units.get(u)]),
    )


def memory_stats(conn: sqlite3.Connection, memory: int, layer: int) -> dict[str, Any]:
    """The ``stats`` of ``/api/memory``: ``{"recorded": False}`` when the run has none (docs/browser.md)."""
    row = conn.execute("SELECT * FROM memory_stats WHERE memory = ?", (memory,)).fetchone()
    if row is None:
        return {"recorded": False}
    settings = conn.execute("SELECT value FROM meta WHERE name = 'stats_settings'").fetchone()
    threshold = (json.loads(settings[0]) or {}).get("density_threshold") if settings else None
    edges = conn.execute("SELECT edges FROM layer_bins WHERE layer = ?", (layer,)).fetchone()[0]
    out: dict[str, Any] = {"recorded": True, "density_threshold": threshold, **{c: row[c] for c in _STAT_COLUMNS}}
    out["histogram"] = {
        "edges": np.frombuffer(edges, dtype="<f8").tolist(),
        "counts": np.frombuffer(row["histogram"], dtype="<i8").tolist(),
    }
    groups = conn.execute("SELECT grp, lo, hi, share FROM quantile_groups WHERE memory = ? ORDER BY grp", (memory,))
    quantiles = {g["grp"]: {"group": g["grp"], "lo": g["lo"], "hi": g["hi"], "share": g["share"], "samples": []}
                 for g in groups}  # fmt: skip
    samples = conn.execute(
        """SELECT s.grp, s.coefficient, c.unit_id, c.doc_id, c.position, c.prefix, c.peak_start
        FROM quantile_samples s JOIN sample_contexts c ON c.id = s.context WHERE s.memory = ? ORDER BY s.grp, s.ord""",
        (memory,),
    )
    for s in samples:
        quantiles[s["grp"]]["samples"].append({
            "coefficient": s["coefficient"], "unit_id": s["unit_id"], "doc_id": s["doc_id"], "position": s["position"],
            "before": s["prefix"][: s["peak_start"]], "token": s["prefix"][s["peak_start"] :],
        })  # fmt: skip
    out["quantiles"] = list(quantiles.values())
    quads = conn.execute(
        "SELECT quadrant, gate_sign, up_sign, count, share FROM quadrants WHERE memory = ? ORDER BY ord", (memory,)
    ).fetchall()
    out["quadrants"] = [dict(q) for q in quads] or None
    return out


def list_memories(
    conn: sqlite3.Connection,
    layer: int,
    *,
    sort: str = "density",
    order: str = "desc",
    min_density: float | None = None,
    max_density: float | None = None,
    limit: int = 50,
) -> dict[str, Any]:
    """One layer's memories sorted by ``sort`` and kept where ``min_density <= density <= max_density``.

    Raises:
        ConfigError: An unknown sort or order, a limit out of range, or density bounds that are not in [0, 1].
    """
    if sort not in LIST_SORTS:
        raise ConfigError(f"sort={sort!r}; pass one of {', '.join(LIST_SORTS)}.")
    if order not in LIST_ORDERS:
        raise ConfigError(f"order={order!r}; pass desc or asc.")
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= LIST_LIMIT:
        raise ConfigError(f"limit={limit!r}; pass an integer from 1 to {LIST_LIMIT}.")
    for name, bound in (("min_density", min_density), ("max_density", max_density)):
        if bound is not None and not 0 <= bound <= 1:
            raise ConfigError(f"{name}={bound!r}; a density is a share: pass a number from 0 to 1.")
    recorded = conn.execute("SELECT 1 FROM memory_stats LIMIT 1").fetchone() is not None
    where = "m.layer = ? AND s.density >= ? AND s.density <= ?"
    args = (layer, 0.0 if min_density is None else min_density, 1.0 if max_density is None else max_density)
    ranking = f"m.key {order.upper()}" if sort == "key" else f"s.{sort} {order.upper()}, m.key"
    rows = conn.execute(
        f"""SELECT m.layer, m.key, s.count, s.mean, s.std, s.density, m.top_tokens FROM memories m
        JOIN memory_stats s ON s.memory = m.id WHERE {where} ORDER BY {ranking} LIMIT ?""",
        (*args, limit),
    ).fetchall()
    total = conn.execute(
        f"SELECT COUNT(*) FROM memories m JOIN memory_stats s ON s.memory = m.id WHERE {where}", args
    ).fetchone()[0]
    return {
        "layer": layer, "sort": sort, "order": order, "min_density": min_density, "max_density": max_density,
        "recorded": recorded, "total": total, "results": [_listed(r) for r in rows],
    }  # fmt: skip


def _listed(row: sqlite3.Row) -> dict[str, Any]:
    out = dict(row)
    out["top_tokens"] = json.loads(out["top_tokens"])[:LISTED_TOKENS] if out["top_tokens"] else []
    return out
