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
from pathlib import Path
from typing import Any

from ffkv_lens.browser.index import normalize_token
from ffkv_lens.errors import ConfigError, RunFolderError

__all__ = ["MAX_LIMIT", "MAX_QUERY_CHARS", "TEXT_SEARCH_CONTEXTS", "BrowserIndex"]

MAX_QUERY_CHARS = 200
MAX_LIMIT = 500
DEFAULT_LIMIT = 50
NEIGHBOURS = 20  # memories listed as promoting the same top token
TEXT_SEARCH_CONTEXTS = 500  # best-matching contexts a text search ranks memories over

_EXAMPLES = """SELECT e.sign, e.rank, e.coefficient, c.unit_id, c.doc_id, c.position, c.prefix, c.peak_start,
    c.next_token, c.next_token_id FROM examples e JOIN contexts c ON c.id = e.context
    WHERE e.memory = ? ORDER BY e.sign DESC, e.rank"""
# One row per memory: its best-ranked matching token (SQLite takes the bare columns from the {best}() row).
_TOKEN_EXACT = """SELECT m.layer, m.key, t.token_id, t.text AS token, v.rank, {best}(v.logit) AS logit,
    COUNT(*) AS n_tokens FROM tokens t JOIN value_tokens v ON v.token_id = t.token_id AND v.side = ?
    JOIN memories m ON m.id = v.memory WHERE t.norm = ? GROUP BY v.memory ORDER BY logit {order}, m.id LIMIT ?"""
_TOKEN_COUNT = """SELECT COUNT(DISTINCT v.memory) FROM tokens t
    JOIN value_tokens v ON v.token_id = t.token_id AND v.side = ? WHERE t.norm = ?"""
_TOKEN_WORDS = """SELECT m.layer, m.key, m.{side}_tokens AS tokens FROM value_fts f JOIN memories m ON m.id = f.rowid
    WHERE value_fts MATCH ? ORDER BY f.rank, m.id LIMIT ?"""
_TEXT = """WITH hits AS (SELECT rowid AS context FROM context_fts WHERE context_fts MATCH ? ORDER BY rank LIMIT ?),
    grouped AS MATERIALIZED (  -- only columns of the covering index examples_context: no table lookups
        SELECT e.memory, e.sign, COUNT(*) AS n_matches, MIN(e.rank) AS best_rank, e.context
        FROM hits JOIN examples e ON e.context = hits.context GROUP BY e.memory, e.sign
        ORDER BY n_matches DESC, best_rank, e.memory, e.sign DESC LIMIT ?)
    SELECT m.layer, m.key, g.sign, g.n_matches, g.best_rank, best.coefficient, c.prefix, c.peak_start, c.next_token
    FROM grouped g JOIN memories m ON m.id = g.memory JOIN contexts c ON c.id = g.context
    JOIN examples best ON best.memory = g.memory AND best.sign = g.sign AND best.rank = g.best_rank
    ORDER BY g.n_matches DESC, g.best_rank, g.memory, g.sign DESC"""


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
        examples: dict[str, list[dict[str, Any]]] = {"top": [], "bottom": []}
        for ex in self.conn.execute(_EXAMPLES, (memory_id,)):
            examples["top" if ex["sign"] == 1 else "bottom"].append(_example(ex))
        scores = ("max_prob", "precision_at_k", "agrees", "next_rank", "top1_next_token", "shallow_score")
        return {
            "layer": layer,
            "key": key,
            "values": {side: _value_tokens(row, side) for side in ("top", "bottom")},
            "scores": {name: row[name] for name in (*scores, "mutation_kind")},
            "examples": examples,
            "neighbours": self._neighbours(layer, key, memory_id, row),
        }

    def top_tokens(self, memories: list[tuple[int, int]], n: int) -> dict[tuple[int, int], list[str]]:
        """The first ``n`` top value tokens of each (layer, key) in the index (others are left out)."""
        ids = {lay * self.d_mlp + k: (lay, k) for lay, k in memories if lay in self.layers and 0 <= k < self.d_mlp}
        if not ids:
            return {}
        marks = ", ".join("?" * len(ids))
        rows = self.conn.execute(f"SELECT id, top_tokens FROM memories WHERE id IN ({marks})", list(ids))
        return {ids[i]: json.loads(tokens)[:n] if tokens else [] for i, tokens in rows}

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
        if row["top_ids"]:
            token_id = json.loads(row["top_ids"])[0]
            rows = self.conn.execute(
                """SELECT m.layer, m.key, v.rank, v.logit FROM value_tokens v JOIN memories m ON m.id = v.memory
                WHERE v.token_id = ? AND v.side = 1 AND v.memory != ? ORDER BY v.logit DESC, m.id LIMIT ?""",
                (token_id, memory_id, NEIGHBOURS),
            )
            out["same_top_token"] = [dict(r) for r in rows]
            out["top_token"] = json.loads(row["top_tokens"])[0]
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
            rows = self.conn.execute(_TEXT, (match, TEXT_SEARCH_CONTEXTS, limit)).fetchall()
        except sqlite3.OperationalError as err:
            raise ConfigError(f"q={query!r} cannot be searched as text ({err}); use words and spaces.") from None
        results = []
        for r in rows:
            hit = dict(r)
            hit["example"] = _text_parts(hit.pop("prefix"), hit.pop("peak_start"), hit.pop("next_token"))
            results.append(hit)
        return {
            "query": query, "match": match, "contexts_matched": total,
            "contexts_ranked": min(total, TEXT_SEARCH_CONTEXTS), "results": results,
        }  # fmt: skip


def _example(row: sqlite3.Row) -> dict[str, Any]:
    out = {name: row[name] for name in ("rank", "coefficient", "unit_id", "doc_id", "position", "next_token_id")}
    out.update(_text_parts(row["prefix"], row["peak_start"], row["next_token"]))
    return out


def _text_parts(prefix: str, peak_start: int, next_token: str | None) -> dict[str, Any]:
    # Split here: the client's string offsets count UTF-16 units, Python's count code points.
    return {"prefix": prefix, "before": prefix[:peak_start], "peak": prefix[peak_start:], "next_token": next_token}


def _value_tokens(row: dict[str, Any], side: str) -> list[dict[str, Any]]:
    if row[f"{side}_ids"] is None:
        return []
    ids, tokens, logits = (json.loads(row[f"{side}_{name}"]) for name in ("ids", "tokens", "logits"))
    return [{"token_id": i, "token": t, "logit": v} for i, t, v in zip(ids, tokens, logits, strict=True)]


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
