"""Rendering of one memory's statistics: the terminal sparkline and lines, the inline SVG histogram."""

import re
from xml.etree import ElementTree

import pytest

from ffkv_lens.errors import ConfigError
from ffkv_lens.report.memory_stats import (
    BLOCKS,
    NO_STATS,
    MemoryStats,
    QuantileGroup,
    QuantileSample,
    format_stats,
    histogram_svg,
    sparkline,
)

SVG = "{http://www.w3.org/2000/svg}"


def _stats(**changes) -> MemoryStats:
    samples = (
        QuantileSample(0, 3, 1, 2, 0.05, "The cat", " sat"),
        QuantileSample(1, 4, 1, 0, 1.5, "", "Paris\x1b[31m"),
    )
    groups = (
        QuantileGroup(0, -0.5, 0.5, 0.9, samples[:1]),
        QuantileGroup(1, 0.5, 2.0, 0.1, samples[1:]),
    )
    fields = dict(
        layer=2, key=7, count=1000, mean=0.125, std=0.5, density=0.25, threshold=0.1, minimum=-0.5, maximum=2.0,
        edges=(-0.5, 0.0, 0.5, 1.0, 1.5, 2.0), counts=(10, 600, 300, 0, 90), groups=groups, quadrants=None,
    )  # fmt: skip
    return MemoryStats(**{**fields, **changes})


@pytest.mark.parametrize(
    ("counts", "expected"),
    [((), ""), ((0, 0), "  "), ((5,), "█"), ((0, 1, 10, 100, 1000), " ▁▃▆█"), ((1, 1_000_000), "▁█")],
    ids=["empty", "all-zero", "one-bin", "decades", "tail-visible"],
)
def test_sparkline_is_log_scaled_and_keeps_every_nonempty_bin_visible(counts, expected) -> None:
    line = sparkline(counts)
    assert line == expected
    assert len(line) == len(counts)
    assert all((ch == " ") == (c == 0) for ch, c in zip(line, counts, strict=True))
    assert set(line) <= set(BLOCKS) | {" "}


def test_format_stats_prints_the_histogram_line_and_quantile_samples() -> None:
    text = format_stats(_stats(), color=False)
    first, *rest = text.splitlines()
    assert first.startswith("histogram [-0.5, +2] ") and sparkline((10, 600, 300, 0, 90)) in first
    for part in ("(5 bins, log count)", "density 0.25 (|m| > 0.1)", "mean +0.125", "std 0.5", "n 1,000"):
        assert part in first, part
    assert "gate/up quadrants" not in text  # none recorded
    groups = [i for i, line in enumerate(rest) if line.startswith("  group ")]
    assert rest[groups[0]].startswith("  group 0 [-0.5, +0.5): 90% of positions, 1 sampled")
    assert rest[groups[0] + 1] == "     m=+0.05  The cat[[ sat]]"
    assert rest[groups[1]].startswith("  group 1 [+0.5, +2): 10% of positions")
    assert "\x1b" not in text and "Paris\\x1b[31m" in text  # corpus text cannot drive the terminal


def test_format_stats_colour_quadrants_sample_limit_and_no_stats() -> None:
    quadrants = (("gate+ up+", 6, 0.6), ("gate+ up-", 2, 0.2), ("gate- up+", 2, 0.2), ("gate- up-", 0, 0.0))
    many = tuple(QuantileSample(0, u, 0, 0, 0.1, "", f"t{u}") for u in range(5))
    text = format_stats(
        _stats(quadrants=quadrants, groups=(QuantileGroup(0, 0.0, 1.0, 1.0, many),)), color=True, samples=2
    )
    assert "gate/up quadrants (share of active positions): gate+ up+ 0.600 · gate+ up- 0.200" in text
    assert text.count("\x1b[1;7m") == 2 and "t1" in text and "t2" not in text
    assert format_stats(None, color=False) == NO_STATS and "\n" not in NO_STATS


def test_histogram_svg_is_well_formed_with_one_bar_per_nonempty_bin_and_labelled_axes() -> None:
    edges, counts = [-1.0, -0.5, 0.0, 0.5, 1.0, 1.5], [1, 4, 0, 2, 0]
    root = ElementTree.fromstring(histogram_svg(edges, counts, title="L<1> & K2"))
    bars = root.findall(f"{SVG}g/{SVG}rect")
    assert len(bars) == sum(c > 0 for c in counts)  # empty bins draw nothing
    width = float(bars[0].get("width"))
    left = float(bars[0].get("x"))
    tallest = max(float(b.get("height")) for b in bars)
    base = float(bars[0].get("y")) + float(bars[0].get("height"))
    for bar in bars:  # each bar at its bin's place, to a linear scale (the drawing's 0.01 px)
        assert abs(float(bar.get("width")) - width) <= 0.01
        c = counts[round((float(bar.get("x")) - left) / width)]
        assert c > 0 and abs(float(bar.get("height")) - tallest * c / max(counts)) <= 0.01
        assert abs(float(bar.get("y")) + float(bar.get("height")) - base) <= 0.02  # bars stand on one axis
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert "coefficient" in texts and "count" in texts and "-1" in texts and "+1.5" in texts and "4" in texts
    assert root.find(f"{SVG}title").text == "L<1> & K2"
    assert [b.find(f"{SVG}title").text for b in bars] == ["[-1, -0.5): 1", "[-0.5, +0): 4", "[+0.5, +1): 2"]
    assert not re.search(r"(href|src)=", histogram_svg(edges, counts))  # nothing to fetch
    with pytest.raises(ConfigError, match="6 histogram edges for 6 bins"):
        histogram_svg(edges, [1, 2, 3, 4, 5, 6])
