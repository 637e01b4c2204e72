"""Read-only queries over a browser index: what the JSON API answers.

One :class:`BrowserIndex` holds one read-only SQLite connection; make one per thread (the server
makes one per request). Every query is parameterised; bad arguments raise :class:`ConfigError`
with the value received and the allowed range.

Search rules (also in ``docs/browser.md``):

- **Token search** (``search_token``): one word finds the memories whose value's top tokens (or
  bottom tokens, ``sign=-1``) include a token equal to the query after :func:`normalize_token`
  (surrounding whitespace removed, case folded), so ``Paris``, `` Paris`` and ``paris`` all find
  the value token `` Paris``. One row per memory (its best matching token; ``n_tokens`` counts its
  matching tokens, e.g. `` Paris`` and ``Paris``), ranked by logit (``sign=-1``: most negative
  first). Several words find the memories whose top (bottom) tokens contain all of them as words (full-text, FTS5).
- **Text search** (``search_text``): the query is one phrase (FTS5, case- and accent-insensitive,
  punctuation ignored; a trailing ``*`` makes the last word a prefix) matched against each trigger
  example's text (prefix + next token). The best :data:`TEXT_SEARCH_CONTEXTS` matching contexts
  (by BM25) are kept; memories are ranked by how many of their examples use those contexts, then by
  the best example rank.

Example:
    >>> with BrowserIndex("runs/smollm2/browser.sqlite") as index:  # doctest: +SKIP
    ...     index.search_token(" Paris")["results"][:3]
"""

import json
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ffkv_lens.browser.index import normalize_token
from ffkv_lens.browser.memory_stats import list_memories, memory_stats
from ffkv_lens.errors import ConfigError, RunFolderError

__all__ = ["MAX_LIMIT", "MAX_QUERY_CHARS", "TEXT_SEARCH_CONTEXTS", "BrowserIndex"]

MAX_QUERY_CHARS = 200
MAX_LIMIT = 500
DEFAULT_LIMIT = 50
NEIGHBOURS = 20  # memories listed as promoting the same top token
TEXT_SEARCH_CONTEXTS = 500  # best-matching contexts a text search ranks memories over

_CONTEXT = "SELECT id, unit_id, doc_id, position, prefix, peak_start, next_token, next_token_id FROM contexts"
# One row per memory: its best-ranked matching token (SQLite takes the bare columns from the {best}() row).
_TOKEN_EXACT = """SELECT m.layer, m.key, t.token_id, t.text AS token, v.rank, {best}(v.logit) AS logit,
    COUNT(*) AS n_tokens FROM tokens t JOIN value_tokens v ON v.token_id = t.token_id AND v.side = ?
    JOIN memories m ON m.id = v.memory WHERE t.norm = ? GROUP BY v.memory ORDER BY logit {order}, m.id LIMIT ?"""
_TOKEN_COUNT = """SELECT COUNT(DISTINCT v.memory) FROM tokens t
    JOIN value_tokens v ON v.token_id = t.token_id AND v.side = ? WHERE t.norm = ?"""
_TOKEN_WORDS = """SELECT m.layer, m.key, m.{side}_tokens AS tokens FROM value_fts f JOIN memories m ON m.id = f.rowid
    WHERE value_fts MATCH ? ORDER BY f.rank, m.id LIMIT ?"""
_TEXT_HITS = """SELECT h.context, ce.codes, ce.ranks FROM (SELECT rowid AS context FROM context_fts
    WHERE context_fts MATCH ? ORDER BY rank LIMIT ?) h JOIN context_examples ce ON ce.context = h.context"""


class ReadOnlyIndex:
    """A SQLite index opened read-only, with its ``meta`` table read (a context manager).

    Args:
        path: The index file.
        what: What it is, for the error message (e.g. ``"browser index"``).
        fix: How to make a readable one, for the error message.

    Raises:
        RunFolderError: The file is missing or not a readable index.
    """

    def __init__(self, path: str | Path, what: str, fix: str) -> None:
        self.path = Path(path)
        try:
            self.conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True)
            self.conn.row_factory = sqlite3.Row
            self.meta = {row["name"]: json.loads(row["value"]) for row in self.conn.execute("SELECT * FROM meta")}
        except sqlite3.Error as err:
            raise RunFolderError(f"{str(self.path)!r} is not a readable {what} ({err}); {fix}.") from None

    def __enter__(self) -> "ReadOnlyIndex":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()


class BrowserIndex(ReadOnlyIndex):
    """Read-only queries over one index file.

    Args:
        path: A built index (see :func:`ffkv_lens.browser.open_index`).
    """

    def __init__(self, path: str | Path) -> None:
        super().__init__(path, "browser index", "build it with `ffkv-lens browse RUN_DIR`")
        self.layers: list[int] = self.meta["layers"]
        self.d_mlp: int = self.meta["d_mlp"]
        self.dtypes: dict[str, np.dtype] = {name: np.dtype(d) for name, d in self.meta["dtypes"].items()}

    def info(self) -> dict[str, Any]:
        """What the index covers: model, layers, d_mlp, k, counts, which run outputs were found."""
        return {k: v for k, v in self.meta.items() if k != "fingerprint"}

    def layer_summary(self) -> list[dict[str, Any]]:
        """One row per layer: keys, examples, mean max probability, precision@k, agreement, shallow share."""
        return [dict(row) for row in self.conn.execute("SELECT * FROM layers ORDER BY layer")]

    def memory_id(self, layer: int, key: int) -> int:
        """The memory's row id (``layer * d_mlp + key``); :class:`ConfigError` when it is not in the index."""
        if layer not in self.layers:
            raise ConfigError(f"layer={layer!r} is not in the index; layers: {_ranges(self.layers)}.")
        if not 0 <= key < self.d_mlp:
            raise ConfigError(f"key={key!r} is out of range; keys run from 0 to {self.d_mlp - 1}.")
        return layer * self.d_mlp + key

    def memory(self, layer: int, key: int) -> dict[str, Any]:
        """One memory: value tokens, scores, trigger examples of both signs, links to neighbours."""
        memory_id = self.memory_id(layer, key)
        row = dict(self.conn.execute("SELECT * FROM memories WHERE id = ?", (memory_id,)).fetchone())
        examples = {"top": self._examples(memory_id * 2), "bottom": self._examples(memory_id * 2 + 1)}
        scores = ("max_prob", "precision_at_k", "agrees", "next_rank", "top1_next_token", "shallow_score")
        return {
            "layer": layer,
            "key": key,
            "values": {side: self._value_tokens(row, side) for side in ("top", "bottom")},
            "scores": {name: row[name] for name in (*scores, "mutation_kind", "causal_score")},
            "examples": examples,
            "neighbours": self._neighbours(layer, key, memory_id, row),
            "stats": memory_stats(self.conn, memory_id, layer),
        }

    def memories(self, layer: int, **options: Any) -> dict[str, Any]:
        """One layer's memories sorted and filtered by density (options: :func:`.memory_stats.list_memories`)."""
        self.memory_id(layer, 0)  # the layer is in the index
        return list_memories(self.conn, layer, **options)

    def top_tokens(self, memories: list[tuple[int, int]], n: int) -> dict[tuple[int, int], list[str]]:
        """The first ``n`` top value tokens of each (layer, key) in the index (others are left out)."""
        ids = {lay * self.d_mlp + k: (lay, k) for lay, k in memories if lay in self.layers and 0 <= k < self.d_mlp}
        if not ids:
            return {}
        marks = ", ".join("?" * len(ids))
        rows = self.conn.execute(f"SELECT id, top_tokens FROM memories WHERE id IN ({marks})", list(ids))
        return {ids[i]: json.loads(tokens)[:n] if tokens else [] for i, tokens in rows}

    def _examples(self, code: int) -> list[dict[str, Any]]:
        """The trigger examples of one (memory, sign) (``code = memory * 2 + (sign == -1)``), by rank."""
        row = self.conn.execute("SELECT contexts, coefficients, ranks FROM examples WHERE id = ?", (code,)).fetchone()
        if row is None:
            return []
        context_ids = np.frombuffer(row["contexts"], dtype=self.dtypes["context"]).tolist()
        coefficients = np.frombuffer(row["coefficients"], dtype=self.dtypes["coefficient"]).tolist()
        ranks = self._ranks(row["ranks"], len(context_ids))
        contexts = self._contexts(context_ids)
        return [
            {"rank": rank, "coefficient": coefficient, **_context_fields(contexts[c])}
            for rank, c, coefficient in zip(ranks, context_ids, coefficients, strict=True)
        ]

    def _ranks(self, packed: bytes | None, n: int) -> list[int]:
        return list(range(n)) if packed is None else np.frombuffer(packed, dtype=self.dtypes["rank"]).tolist()

    def _contexts(self, ids: Iterable[int]) -> dict[int, sqlite3.Row]:
        ids = sorted(set(ids))
        rows = self.conn.execute(f"{_CONTEXT} WHERE id IN (SELECT value FROM json_each(?))", (json.dumps(ids),))
        return {row["id"]: row for row in rows}

    def _value_tokens(self, row: dict[str, Any], side: str) -> list[dict[str, Any]]:
        if row[f"{side}_ids"] is None:
            return []
        ids = np.frombuffer(row[f"{side}_ids"], dtype=self.dtypes["token_id"]).tolist()
        logits = np.frombuffer(row[f"{side}_logits"], dtype=self.dtypes["logit"]).tolist()
        tokens = json.loads(row[f"{side}_tokens"])
        return [{"token_id": i, "token": t, "logit": v} for i, t, v in zip(ids, tokens, logits, strict=True)]

    def _neighbours(self, layer: int, key: int, memory_id: int, row: dict[str, Any]) -> dict[str, Any]:
        at = self.layers.index(layer)
        link = lambda lay, k: {"layer": lay, "key": k}  # noqa: E731
        out = {
            "previous_key": link(layer, key - 1) if key > 0 else None,
            "next_key": link(layer, key + 1) if key + 1 < self.d_mlp else None,
            "layer_below": link(self.layers[at - 1], key) if at > 0 else None,
            "layer_above": link(self.layers[at + 1], key) if at + 1 < len(self.layers) else None,
            "same_top_token": [],
        }
        top = self._value_tokens(row, "top")
        if top:
            rows = self.conn.execute(
                """SELECT m.layer, m.key, v.rank, v.logit FROM value_tokens v JOIN memories m ON m.id = v.memory
                WHERE v.token_id = ? AND v.side = 1 AND v.memory != ? ORDER BY v.logit DESC, m.id LIMIT ?""",
                (top[0]["token_id"], memory_id, NEIGHBOURS),
            )
            out["same_top_token"] = [dict(r) for r in rows]
            out["top_token"] = top[0]["token"]
        return out

    def search_token(self, query: str, *, sign: int = 1, limit: int = DEFAULT_LIMIT) -> dict[str, Any]:
        """Memories whose value promotes (``sign=-1``: suppresses) the token; rules in the module docstring."""
        _check_query(query)
        limit, side = _check_limit(limit), _check_sign(sign)
        words = query.split()
        if len(words) > 1:
            _check_full_text(query)
            match = f"{{{side}}} : ({' '.join(_quote(w) for w in words)})"
            rows = [dict(r) for r in self.conn.execute(_TOKEN_WORDS.format(side=side), (match, limit))]
            for r in rows:
                r["tokens"] = json.loads(r["tokens"]) if r["tokens"] else []
            return {"query": query, "mode": "words", "sign": sign, "results": rows, "total": None}
        norm = normalize_token(query)
        order = "DESC" if sign == 1 else "ASC"
        exact = _TOKEN_EXACT.format(order=order, best="MAX" if sign == 1 else "MIN")
        rows = [dict(r) for r in self.conn.execute(exact, (sign, norm, limit))]
        total = self.conn.execute(_TOKEN_COUNT, (sign, norm)).fetchone()[0]
        tokens = [r[0] for r in self.conn.execute("SELECT text FROM tokens WHERE norm = ? ORDER BY token_id", (norm,))]
        return {
            "query": query, "mode": "token", "normalized": norm, "sign": sign, "tokens": tokens,
            "results": rows, "total": total,
        }  # fmt: skip

    def search_text(self, query: str, *, limit: int = DEFAULT_LIMIT) -> dict[str, Any]:
        """Memories whose trigger examples contain the phrase; rules in the module docstring."""
        _check_query(query)
        _check_full_text(query)
        limit = _check_limit(limit)
        match = _phrase(query)
        try:
            n_contexts = self.conn.execute("SELECT COUNT(*) FROM context_fts WHERE context_fts MATCH ?", (match,))
            total = n_contexts.fetchone()[0]
            hits = self.conn.execute(_TEXT_HITS, (match, TEXT_SEARCH_CONTEXTS)).fetchall()
        except sqlite3.OperationalError as err:
            raise ConfigError(f"q={query!r} cannot be searched as text ({err}); use words and spaces.") from None
        results = self._rank_text_hits(hits, limit)
        return {
            "query": query, "match": match, "contexts_matched": total,
            "contexts_ranked": min(total, TEXT_SEARCH_CONTEXTS), "results": results,
        }  # fmt: skip

    def _rank_text_hits(self, hits: list[sqlite3.Row], limit: int) -> list[dict[str, Any]]:
        """Memories by examples in the hit contexts, then best rank, memory, top before bottom; one example each."""
        if not hits:
            return []
        codes = np.concatenate([np.frombuffer(h["codes"], dtype=self.dtypes["code"]) for h in hits]).astype(np.int64)
        ranks = np.concatenate([np.frombuffer(h["ranks"], dtype=self.dtypes["rank"]) for h in hits]).astype(np.int64)
        context = np.repeat(
            [h["context"] for h in hits], [len(h["ranks"]) // self.dtypes["rank"].itemsize for h in hits]
        )
        counts = np.bincount(codes)
        present = np.flatnonzero(counts)
        # Only memories with at least the limit-th largest count can be ranked: group just their examples.
        threshold = np.partition(counts[present], -min(limit, present.size))[-min(limit, present.size)]
        keep = counts[codes] >= threshold
        codes, ranks, context = codes[keep], ranks[keep], context[keep]
        order = np.lexsort((ranks, codes))
        first = order[_run_starts(codes[order])]
        best = first[np.lexsort((codes[first], ranks[first], -counts[codes[first]]))][:limit]
        contexts = self._contexts(context[best].tolist())
        results = []
        for i in best.tolist():
            code, rank = int(codes[i]), int(ranks[i])
            memory, sign = code // 2, -1 if code % 2 else 1
            c = contexts[int(context[i])]
            results.append({
                "layer": memory // self.d_mlp, "key": memory % self.d_mlp, "sign": sign,
                "n_matches": int(counts[code]), "best_rank": rank, "coefficient": self._coefficient(code, rank),
                "example": _text_parts(c["prefix"], c["peak_start"], c["next_token"]),
            })  # fmt: skip
        return results

    def _coefficient(self, code: int, rank: int) -> float:
        row = self.conn.execute("SELECT coefficients, ranks FROM examples WHERE id = ?", (code,)).fetchone()
        coefficients = np.frombuffer(row["coefficients"], dtype=self.dtypes["coefficient"])
        return float(coefficients[self._ranks(row["ranks"], coefficients.size).index(rank)])


def _run_starts(sorted_values: np.ndarray) -> np.ndarray:
    return np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])


def _context_fields(row: sqlite3.Row) -> dict[str, Any]:
    out = {name: row[name] for name in ("unit_id", "doc_id", "position", "next_token_id")}
    out.update(_text_parts(row["prefix"], row["peak_start"], row["next_token"]))
    return out


def _text_parts(prefix: str, peak_start: int, next_token: str | None) -> dict[str, Any]:
    # Split here: the client's string offsets count UTF-16 units, Python's count code points.
    return {"prefix": prefix, "before": prefix[:peak_start], "peak": prefix[peak_start:], "next_token": next_token}


def _check_query(query: str) -> None:
    if not isinstance(query, str) or not query:
        raise ConfigError("q is empty; pass the token or text to search for, e.g. q=Paris.")
    if len(query) > MAX_QUERY_CHARS:
        raise ConfigError(f"q has {len(query)} characters; pass at most {MAX_QUERY_CHARS}.")


def _check_full_text(query: str) -> None:
    # FTS5 reads its query as a C string: a NUL byte ends it mid-word ("unterminated string").
    if "\x00" in query:
        raise ConfigError(
            f"q={query!r} contains a NUL character (\\x00), which full-text search cannot match; remove it "
            "(a single-word token search matches it exactly)."
        )


def _check_limit(limit: int) -> int:
    if not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise ConfigError(f"limit={limit!r}; pass an integer from 1 to {MAX_LIMIT}.")
    return limit


def _check_sign(sign: int) -> str:
    if sign not in (1, -1):
        raise ConfigError(f"sign={sign!r}; pass 1 (top tokens, promoted) or -1 (bottom tokens, suppressed).")
    return "top" if sign == 1 else "bottom"


def _quote(word: str) -> str:
    return '"' + word.replace('"', '""') + '"'


def _phrase(query: str) -> str:
    text = query.strip()
    prefix = text.endswith("*")
    return _quote(text.rstrip("*").strip()) + (" *" if prefix else "")


def _ranges(values: list[int]) -> str:
    if values and values == list(range(values[0], values[-1] + 1)):
        return f"{values[0]}..{values[-1]}"
    return ", ".join(map(str, values))
