"""The packed example layout of the browser index (schema 2 and later) against the atlas, by brute force; scores."""

import math
import sqlite3

import pytest

from ffkv_lens.browser import BrowserIndex
from ffkv_lens.browser.index import SCHEMA_VERSION
from ffkv_lens.browser.queries import TEXT_SEARCH_CONTEXTS

SIGNS = ((1, "top"), (-1, "bottom"))
# Worst-case SQLite record overhead of one packed row with BLOBs under 8 KB and ids under 2**21: cell
# pointer 2, payload length varint 2, rowid varint 3, record header (its size, 4 serial types) 8; rounded up.
ROW_OVERHEAD = 16
PAGE_FILL = 0.9  # rows are inserted in key order, so leaf pages end nearly full


def test_memory_query_returns_every_atlas_example_with_its_exact_coefficient(tiny_index, tiny_atlas) -> None:
    with BrowserIndex(tiny_index) as index:
        assert index.meta["schema"] == SCHEMA_VERSION == 3
        checked = 0
        for layer in tiny_atlas.layers:
            for key in range(tiny_atlas.d_mlp):
                shown = index.memory(layer, key)["examples"]
                for sign, side in SIGNS:
                    expected = tiny_atlas.examples(layer, key, sign=sign)
                    got = [(g["rank"], g["unit_id"], g["position"], g["coefficient"]) for g in shown[side]]
                    want = [(rank, e.unit_id, e.position, e.coefficient) for rank, e in enumerate(expected)]
                    assert got == want, (layer, key, sign)  # tolerance 0: coefficients are exact
                    checked += len(want)
        assert checked == index.meta["n_examples"] > 0


def test_memory_scores_carry_the_causal_score_of_sampled_memories(tiny_index, tiny_run) -> None:
    import pandas as pd

    table = pd.read_csv(tiny_run / "tables" / "causal_per_memory.csv")
    with BrowserIndex(tiny_index) as index:
        assert index.info()["has"]["causal"] is True
        sampled = {(int(r.layer), int(r.key)): r.causal_score for r in table.itertuples()}
        for layer in index.layers:
            for key in range(index.d_mlp):
                got = index.memory(layer, key)["scores"]["causal_score"]
                want = sampled.get((layer, key))
                assert got == want if want is None else got == pytest.approx(want, rel=1e-12), (layer, key)


def _brute_force_text_ranking(index: BrowserIndex, atlas, match: str) -> list[tuple]:
    """Rank (memory, sign) by examples in the hit contexts, walking every example of the atlas in Python."""
    hits = [r[0] for r in index.conn.execute(
        "SELECT rowid FROM context_fts WHERE context_fts MATCH ? ORDER BY rank LIMIT ?", (match, TEXT_SEARCH_CONTEXTS)
    )]  # fmt: skip
    marks = ", ".join("?" * len(hits))
    rows = index.conn.execute(f"SELECT unit_id, position FROM contexts WHERE id IN ({marks})", hits).fetchall()
    hit_contexts = {(unit, position) for unit, position in rows}
    ranked = []
    for layer in atlas.layers:
        for key in range(atlas.d_mlp):
            for sign, _ in SIGNS:
                found = [
                    (rank, e) for rank, e in enumerate(atlas.examples(layer, key, sign=sign))
                    if (e.unit_id, e.position) in hit_contexts
                ]  # fmt: skip
                if found:
                    rank, best = found[0]
                    memory = layer * atlas.d_mlp + key
                    ranked.append((-len(found), rank, memory, -sign, layer, key, sign, best.coefficient, best.prefix))
    ranked.sort()
    return [(layer, key, sign, -n, rank, coefficient, prefix) for n, rank, _, _, layer, key, sign, coefficient, prefix
            in ranked]  # fmt: skip


@pytest.mark.parametrize("query", ["the", "Paris is", "capital of Fr*", "caf*", "of"], ids=lambda q: q.strip("*"))
def test_text_search_ranks_memories_as_a_brute_force_count(tiny_index, tiny_atlas, query) -> None:
    with BrowserIndex(tiny_index) as index:
        found = index.search_text(query, limit=500)
        assert found["results"], query
        want = _brute_force_text_ranking(index, tiny_atlas, found["match"])
        got = [
            (r["layer"], r["key"], r["sign"], r["n_matches"], r["best_rank"], r["coefficient"], r["example"]["prefix"])
            for r in found["results"]
        ]
        assert got == want[:500]
        assert [tuple(r.values())[:5] for r in index.search_text(query, limit=7)["results"]] == [
            w[:5] for w in want[:7]
        ]


def test_example_tables_stay_within_the_packed_layout_bound(tiny_index) -> None:
    with BrowserIndex(tiny_index) as index:
        dtypes = index.meta["dtypes"]
        # The tiny run: at most 65,536 contexts, k <= 256 and float32 coefficients (the atlas's dtype).
        assert (dtypes["context"], dtypes["rank"], dtypes["code"], dtypes["coefficient"]) == (
            "<u2",
            "<u1",
            "<u4",
            "<f4",
        )
        n_examples = index.meta["n_examples"]
        n_rows = sum(
            index.conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("examples", "context_examples")
        )
        page = index.conn.execute("PRAGMA page_size").fetchone()[0]
        try:
            used = index.conn.execute(
                "SELECT SUM(pgsize) FROM dbstat WHERE name IN ('examples', 'context_examples')"
            ).fetchone()[0]
        except sqlite3.OperationalError as err:
            pytest.skip(f"this SQLite has no dbstat table ({err})")
    per_example = 2 + 4 + 4 + 1  # forward: context id, coefficient; reverse: code, rank
    payload = per_example * n_examples + ROW_OVERHEAD * n_rows
    bound = (math.ceil(payload / (page * PAGE_FILL)) + 2) * page  # plus one (root or interior) page per table
    assert used <= bound, f"{used / n_examples:.1f} bytes per example, bound {bound / n_examples:.1f}"
