"""The memory page's statistics in headless Chromium: histogram, quantile samples, density list, runs without them.

Skipped like tests/browser/test_browser.py when playwright or chromium is missing.
"""

import math
from collections.abc import Iterator

import pytest

from ffkv_lens.browser import BrowserIndex
from ffkv_lens.report import RunFolder
from tests.browser.test_browser import COEF_TOL, _settled, _title, _watched_tab, browser, expect, pytestmark  # noqa: F401

_BARS_JS = "bars => bars.map(b => ({count: Number(b.dataset.count), height: Number(b.getAttribute('height'))}))"
_SAMPLES_JS = """rows => rows.map(r => ({coef: Number(r.querySelector('.coef').textContent),
    text: r.querySelector('td.text').textContent, mark: r.querySelector('mark.sampled').textContent}))"""


@pytest.fixture()
def page(browser, server) -> Iterator[tuple[object, list[str]]]:  # noqa: F811
    yield from _watched_tab(browser)


@pytest.fixture()
def old_page(browser, old_server) -> Iterator[tuple[object, list[str]]]:  # noqa: F811
    yield from _watched_tab(browser)


@pytest.fixture()
def page_b(browser, server_b) -> Iterator[tuple[object, list[str]]]:  # noqa: F811
    yield from _watched_tab(browser)


@pytest.fixture()
def model_page(browser, prompt_server) -> Iterator[tuple[object, list[str]]]:  # noqa: F811
    yield from _watched_tab(browser)


def test_memory_page_draws_the_histogram_and_the_quantile_samples(page, server, tiny_index, tiny_atlas) -> None:
    tab, problems = page
    layer, key = tiny_atlas.layers[1], 3
    tab.goto(f"{server.url}#layer={layer}&key={key}")
    _title(tab, layer, key)
    with BrowserIndex(tiny_index) as index:
        stats = index.memory(layer, key)["stats"]
    counts = tiny_atlas.histograms(layer)[key].tolist()
    bars = tab.locator("#histogram svg.histogram rect.bar").evaluate_all(_BARS_JS)
    assert [b["count"] for b in bars] == counts
    tallest = max(b["height"] for b in bars)
    for b in bars:  # linear count scale, to 0.01 px
        assert abs(b["height"] - tallest * b["count"] / max(counts)) <= 0.01
    labels = tab.locator("#histogram svg text").all_text_contents()
    assert "coefficient" in labels and "count" in labels and f"{max(counts):,}" in labels
    tab.check("#hist-log")  # heights then grow with log(1 + count)
    expect(tab.locator("#histogram svg text.axis-label").last).to_have_text("count (log)")
    logged = tab.locator("#histogram svg.histogram rect.bar").evaluate_all(_BARS_JS)
    for b in logged:
        assert abs(b["height"] - tallest * math.log1p(b["count"]) / math.log1p(max(counts))) <= 0.01
    expect(tab.locator("#stats-line")).to_contain_text(f"n {stats['count']:,}")
    # Quantile groups, strongest first; each sample's text ends in its marked token, with its coefficient.
    groups = tab.locator("#quantiles .qgroup")
    assert [int(g) for g in groups.evaluate_all("gs => gs.map(g => g.dataset.group)")] == [
        g["group"] for g in reversed(stats["quantiles"])
    ]
    shown = tab.locator("#quantiles tr.qsample").evaluate_all(_SAMPLES_JS)
    expected = [s for g in reversed(stats["quantiles"]) for s in g["samples"]]
    assert len(shown) == len(expected) > 0
    for got, want in zip(shown, expected, strict=True):
        assert abs(got["coef"] - want["coefficient"]) <= COEF_TOL
        assert got["text"] == want["before"] + want["token"] and got["mark"] == want["token"]
    highlight = tab.locator("#quantiles mark.sampled").first.evaluate("m => getComputedStyle(m).backgroundColor")
    assert highlight not in ("rgba(0, 0, 0, 0)", "transparent"), "the sampled token is not highlighted"
    expect(tab.locator("#quadrants")).to_contain_text("not recorded")  # searched without quadrants
    assert problems == []


def test_memory_list_sorts_and_filters_by_density(page, server, tiny_atlas) -> None:
    tab, problems = page
    layer = tiny_atlas.layers[2]
    tab.goto(f"{server.url}#layer={layer}&key=0")
    _title(tab, layer, 0)
    frame = tiny_atlas.stats(layer)
    items = tab.locator("#density-list li.density-item")
    densities = [float(d) for d in items.evaluate_all("ls => ls.map(l => l.dataset.density)")]
    assert densities == sorted(frame["density"].tolist(), reverse=True)  # default: density, highest first
    low = float(frame["density"].median())
    tab.select_option("#density-order", "asc")
    tab.fill("#min-density", str(low))
    tab.click("#density-go")
    kept = frame[frame["density"] >= low].sort_values(["density", "key"])
    expect(items).to_have_count(len(kept))
    _settled(tab)
    keys = [int(k) for k in items.locator("a.memory-link").evaluate_all("ls => ls.map(l => l.dataset.key)")]
    assert keys == kept["key"].tolist()[:100]
    items.nth(0).locator("a.memory-link").click()  # opens that memory's page
    _title(tab, layer, keys[0])
    assert problems == []


def test_a_run_without_statistics_browses_with_sections_not_recorded(old_page, old_server, tiny_atlas) -> None:
    tab, problems = old_page
    layer = tiny_atlas.layers[0]
    tab.goto(f"{old_server.url}#layer={layer}&key=2")
    _title(tab, layer, 2)
    expect(tab.locator("#examples-top tr.example")).to_have_count(len(tiny_atlas.examples(layer, 2)))
    for section in ("#histogram", "#quantiles", "#quadrants"):
        expect(tab.locator(section)).to_contain_text("not recorded in this run")
    expect(tab.locator("#density-note")).to_contain_text("not recorded")
    assert problems == []


def test_with_the_model_every_sample_token_is_shaded_by_its_coefficient(model_page, prompt_server, tiny_atlas) -> None:
    tab, problems = model_page
    layer, key = tiny_atlas.layers[1], 3
    tab.goto(f"{prompt_server.url}#layer={layer}&key={key}")
    _title(tab, layer, key)
    expect(tab.locator("#quantile-note")).to_contain_text("recomputed with the model")
    rows = tab.locator("#quantiles tr.qsample")
    assert rows.count() > 0
    for i in range(rows.count()):
        row = rows.nth(i)
        tokens = [float(c) for c in row.locator(".ptok").evaluate_all("ts => ts.map(t => t.dataset.coefficient)")]
        assert tokens and abs(tokens[-1] - float(row.locator(".coef").text_content())) <= COEF_TOL + 1e-4
        assert row.locator("mark.sampled.ptok").count() == 1
    assert problems == []


def test_a_gated_run_shows_the_quadrant_shares(page_b, server_b, tiny_run_b) -> None:
    tab, problems = page_b
    atlas = RunFolder(tiny_run_b).atlas
    layer, key = atlas.layers[2], 9
    tab.goto(f"{server_b.url}#layer={layer}&key={key}")
    _title(tab, layer, key)
    rows = tab.locator("#quadrants tr.quadrant")
    expected = atlas.quadrants(layer, key)
    expect(rows).to_have_count(4)
    for i, q in enumerate(expected.itertuples(index=False)):
        cells = rows.nth(i).locator("td").all_text_contents()
        assert cells[0] == q.quadrant and cells[1] == f"{q.count:,}" and cells[2] == f"{100 * q.share:.1f}%"
    assert problems == []
