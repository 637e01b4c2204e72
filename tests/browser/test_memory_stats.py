"""Per-memory statistics in the browser index: equal to the atlas's, the density list, runs without them."""

import math
import os

import numpy as np
import pytest

from ffkv_lens.browser import BrowserIndex
from ffkv_lens.errors import ConfigError
from ffkv_lens.report import RunFolder
from ffkv_lens.report.memory_stats import format_stats, memory_stats


def test_every_memory_s_stats_equal_the_atlas(tiny_index, tiny_atlas) -> None:
    threshold = tiny_atlas.stats_settings["density_threshold"]
    with BrowserIndex(tiny_index) as index:
        assert index.info()["has"]["stats"] is True and index.info()["stats_settings"] == tiny_atlas.stats_settings
        for layer in tiny_atlas.layers:
            edges = tiny_atlas.histogram_edges(layer).tolist()
            counts = tiny_atlas.histograms(layer)
            frame = tiny_atlas.stats(layer)
            for key in range(tiny_atlas.d_mlp):
                got = index.memory(layer, key)["stats"]
                row = frame.iloc[key]
                assert got["recorded"] and got["density_threshold"] == threshold
                for name in ("count", "mean", "std", "density", "min", "max"):  # stored as float64: exact
                    assert got[name] == row[name] or (math.isnan(row[name]) and got[name] is None), (layer, key, name)
                assert got["histogram"] == {"edges": edges, "counts": counts[key].tolist()}
                _check_quantiles(got["quantiles"], tiny_atlas, layer, key)
                assert got["quadrants"] is None  # searched without quadrants


def _check_quantiles(groups: list, atlas, layer: int, key: int) -> None:
    expected = atlas.quantile_examples(layer, key)
    assert [g["group"] for g in groups] == sorted(expected["group"].unique().tolist())
    flat = [(g, s) for g in groups for s in g["samples"]]
    assert len(flat) == len(expected)
    for (g, s), e in zip(flat, expected.itertuples(index=False), strict=True):
        assert (g["group"], g["lo"], g["hi"], g["share"]) == (e.group, e.group_lo, e.group_hi, e.group_share)
        assert (s["unit_id"], s["doc_id"], s["position"]) == (e.unit_id, e.doc_id, e.position)
        assert s["coefficient"] == e.coefficient  # float32 in the atlas, float64 in the index: exact
        # As for trigger examples: the token is what it adds to the decoded prefix (a character split
        # across byte-level tokens is shown whole on the token that completes it).
        shorter = atlas.tokenizer.decode(atlas.units.get(e.unit_id)[1][: max(e.position, 0)])
        assert s["before"] + s["token"] == e.text
        assert s["token"] == e.text[len(os.path.commonprefix([shorter, e.text])) :]


@pytest.mark.parametrize(
    ("sort", "order"),
    [("density", "desc"), ("density", "asc"), ("std", "desc"), ("key", "asc")],
    ids=["density-desc", "density-asc", "std", "key"],
)
def test_memory_list_is_sorted_and_filtered_by_density(tiny_index, tiny_atlas, sort, order) -> None:
    layer = tiny_atlas.layers[1]
    frame = tiny_atlas.stats(layer)
    low, high = (float(q) for q in np.quantile(frame["density"], [0.25, 0.75]))
    with BrowserIndex(tiny_index) as index:
        got = index.memories(layer, sort=sort, order=order, min_density=low, max_density=high, limit=500)
    kept = frame[(frame["density"] >= low) & (frame["density"] <= high)]
    columns, ascending = (["key"], [order == "asc"]) if sort == "key" else ([sort, "key"], [order == "asc", True])
    ranked = kept.sort_values(columns, ascending=ascending)
    assert got["recorded"] and got["total"] == len(kept) > 0
    assert [r["key"] for r in got["results"]] == ranked["key"].tolist()
    assert [r["density"] for r in got["results"]] == ranked["density"].tolist()
    assert all(isinstance(r["top_tokens"], list) and len(r["top_tokens"]) <= 3 for r in got["results"])


@pytest.mark.parametrize(
    ("options", "message"),
    [({"sort": "logit"}, "sort='logit'"), ({"order": "up"}, "order='up'"), ({"min_density": 1.5}, "min_density=1.5"),
     ({"limit": 0}, "limit=0"), ({"max_density": -0.1}, "max_density=-0.1")],
    ids=["sort", "order", "min", "limit", "max"],
)  # fmt: skip
def test_memory_list_refuses_bad_options(tiny_index, tiny_atlas, options, message) -> None:
    with BrowserIndex(tiny_index) as index, pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        index.memories(tiny_atlas.layers[0], **options)


def test_a_run_without_statistics_indexes_and_answers_not_recorded(old_index, tiny_atlas) -> None:
    with BrowserIndex(old_index) as index:
        assert index.info()["has"]["stats"] is False and index.info()["stats_settings"] is None
        memory = index.memory(tiny_atlas.layers[0], 5)
        assert memory["stats"] == {"recorded": False} and len(memory["examples"]["top"]) == tiny_atlas.k
        listed = index.memories(tiny_atlas.layers[0])
        assert listed["recorded"] is False and listed["results"] == [] and listed["total"] == 0


def test_quadrant_shares_in_the_index_and_in_show_equal_the_atlas(tiny_index_b, tiny_run_b) -> None:
    atlas = RunFolder(tiny_run_b).atlas
    assert atlas.has_quadrants
    with BrowserIndex(tiny_index_b) as index:
        assert index.info()["has"]["quadrants"] is True
        for layer in atlas.layers:
            for key in range(atlas.d_mlp):
                expected = atlas.quadrants(layer, key).to_dict("records")
                got = index.memory(layer, key)["stats"]["quadrants"]
                assert got == expected, (layer, key)  # counts exact; shares the same float64 division
                active = sum(q["count"] for q in got)
                assert active == 0 or sum(q["share"] for q in got) == pytest.approx(1.0, abs=1e-12)
    stats = memory_stats(atlas, atlas.layers[1], 5)
    shares = " · ".join(f"{q} {s:.3f}" for q, _, s in stats.quadrants)
    assert f"gate/up quadrants (share of active positions): {shares}" in format_stats(stats, color=False)
