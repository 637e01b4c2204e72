"""One memory's statistics (histogram, density, quantile samples, quadrants) read back and rendered.

:func:`memory_stats` gathers what the trigger atlas recorded about one memory in the search's corpus
pass (``atlas.stats``, ``atlas.histogram``, ``atlas.quantile_examples``, ``atlas.quadrants``; see
docs/triggers.md, "Per-memory statistics") into a :class:`MemoryStats`, or ``None`` when the atlas
was searched without statistics (an older run folder, or ``--no-stats``). :func:`format_stats`
renders it for the terminal (``ffkv-lens show``): the histogram as a sparkline of unicode blocks on
a log scale, then the quantile samples. :func:`histogram_svg` draws a histogram as inline SVG (the
report's gallery cards). Every renderer takes plain numbers, so it needs no atlas.

Example:
    >>> print(sparkline([0, 1, 10, 100, 1000]))
     ▁▃▆█
    >>> stats = memory_stats(run.atlas, 3, 7)  # doctest: +SKIP
    >>> print(format_stats(stats, color=False))  # doctest: +SKIP
"""

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ffkv_lens.errors import ConfigError
from ffkv_lens.report.memories import printable

__all__ = [
    "BLOCKS",
    "NO_STATS",
    "MemoryStats",
    "QuantileSample",
    "format_stats",
    "histogram_svg",
    "memory_stats",
    "sparkline",
]

BLOCKS = "▁▂▃▄▅▆▇█"  # a sparkline's eight heights; an empty bin is a space
NO_STATS = (
    "statistics: not recorded (this run's trigger search kept no per-memory statistics; re-run "
    "`ffkv-lens run` into a new --out without --no-stats to record them)"
)
SAMPLES_PER_GROUP = 3  # quantile examples printed per group by default
CONTEXT_CHARS = 80  # text printed before a sampled token; longer prefixes are cut at the front


@dataclass(frozen=True)
class QuantileSample:
    """One sampled position of a quantile group, its text split around the sampled token.

    Attributes:
        group: The group (0 = the weakest interval).
        unit_id: The unit.
        doc_id: Its document.
        position: The token's index among the unit's own tokens (BOS not counted).
        coefficient: The memory's coefficient at that token.
        before: Decoded text of the unit before the token.
        token: The token's text (``before + token`` is the decoded prefix where decoding allows).
    """

    group: int
    unit_id: int
    doc_id: int
    position: int
    coefficient: float
    before: str
    token: str


@dataclass(frozen=True)
class QuantileGroup:
    """One activation interval ``[low, high)`` of a memory and the positions sampled from it."""

    group: int
    low: float
    high: float
    share: float
    samples: tuple[QuantileSample, ...]


@dataclass(frozen=True)
class MemoryStats:
    """What the search's corpus pass recorded about one memory.

    Attributes:
        layer: The layer.
        key: The key.
        count: Candidate positions seen.
        mean: Mean coefficient over them.
        std: Its standard deviation.
        density: Share of positions with ``|m|`` above ``threshold``.
        threshold: The density threshold (``atlas.stats_settings["density_threshold"]``), or None.
        minimum: Smallest coefficient seen.
        maximum: Largest coefficient seen.
        edges: The layer's bin edges (``len(counts) + 1``).
        counts: Positions per bin.
        groups: The quantile groups, weakest first.
        quadrants: ``(quadrant, count, share)`` of the four gate/up sign combinations, or None.
    """

    layer: int
    key: int
    count: int
    mean: float
    std: float
    density: float
    threshold: float | None
    minimum: float
    maximum: float
    edges: tuple[float, ...]
    counts: tuple[int, ...]
    groups: tuple[QuantileGroup, ...]
    quadrants: tuple[tuple[str, int, float], ...] | None


def memory_stats(atlas: Any, layer: int, key: int) -> MemoryStats | None:
    """One memory's statistics from a :class:`~ffkv_lens.analysis.atlas.TriggerAtlas`, or None without any.

    The sampled text is split around the sampled token with :meth:`TriggerAtlas.prefix_parts`,
    as the trigger examples are.
    """
    if not getattr(atlas, "has_stats", False):
        return None
    from ffkv_lens.analysis.atlas import TriggerExample

    row = atlas.stats(layer, key).iloc[0]
    bins = atlas.histogram(layer, key)
    edges = (*bins["bin_lo"].tolist(), float(bins["bin_hi"].iloc[-1])) if len(bins) else ()
    groups: dict[int, dict[str, Any]] = {}
    for q in atlas.quantile_examples(layer, key).itertuples(index=False):
        group = groups.setdefault(int(q.group), {"low": q.group_lo, "high": q.group_hi, "share": q.group_share})
        unit, doc, position, coefficient = int(q.unit_id), int(q.doc_id), int(q.position), float(q.coefficient)
        before, token = atlas.prefix_parts(TriggerExample(unit, doc, position, coefficient, q.text, None, None))
        sample = QuantileSample(int(q.group), unit, doc, position, coefficient, before, token)
        group.setdefault("samples", []).append(sample)
    quadrants = None
    if getattr(atlas, "has_quadrants", False):
        frame = atlas.quadrants(layer, key)
        quadrants = tuple((str(r.quadrant), int(r.count), float(r.share)) for r in frame.itertuples(index=False))
    return MemoryStats(
        layer=layer, key=key, count=int(row["count"]), mean=float(row["mean"]), std=float(row["std"]),
        density=float(row["density"]), threshold=atlas.stats_settings.get("density_threshold"),
        minimum=float(row["min"]), maximum=float(row["max"]), edges=tuple(float(e) for e in edges),
        counts=tuple(int(c) for c in bins["count"].tolist()),
        groups=tuple(QuantileGroup(g, float(v["low"]), float(v["high"]), float(v["share"]), tuple(v["samples"]))
                     for g, v in sorted(groups.items())),
        quadrants=quadrants,
    )  # fmt: skip


def sparkline(counts: Sequence[int]) -> str:
    """One character per bin: a space when empty, else a block whose height grows with ``log(1 + count)``.

    The highest bin is a full block and every non-empty bin at least the lowest one, so a single
    position in the tail stays visible next to a peak of millions.
    """
    top = math.log1p(max(counts, default=0))
    if top == 0:
        return " " * len(counts)
    steps = len(BLOCKS)
    return "".join(" " if c <= 0 else BLOCKS[max(1, math.ceil(steps * math.log1p(c) / top)) - 1] for c in counts)


def format_stats(stats: MemoryStats | None, *, color: bool, samples: int = SAMPLES_PER_GROUP) -> str:
    """The terminal lines of ``ffkv-lens show``: histogram line, quadrants, then ``samples`` per quantile group."""
    if stats is None:
        return NO_STATS
    mark = ("\x1b[1;7m", "\x1b[0m") if color else ("[[", "]]")
    above = "" if stats.threshold is None else f" (|m| > {stats.threshold:g})"
    span = f"[{stats.edges[0]:+.3g}, {stats.edges[-1]:+.3g}]" if stats.edges else "[]"
    lines = [
        f"histogram {span} {sparkline(stats.counts)} ({len(stats.counts)} bins, log count) · "
        f"density {stats.density:.4g}{above} · mean {stats.mean:+.4g} · std {stats.std:.4g} · "
        f"range [{stats.minimum:+.4g}, {stats.maximum:+.4g}] · n {stats.count:,}"
    ]
    if stats.quadrants is not None:
        shares = " · ".join(f"{name} {share:.3f}" for name, _, share in stats.quadrants)
        lines.append(f"gate/up quadrants (share of active positions): {shares}")
    where = "reverse video" if color else "[[...]]"
    lines.append(f"quantile samples (up to {samples} per activation interval, the sampled token in {where}):")
    for group in stats.groups:
        lines.append(
            f"  group {group.group} [{group.low:+.4g}, {group.high:+.4g}): {100 * group.share:.3g}% of positions, "
            f"{len(group.samples)} sampled"
        )
        for s in group.samples[:samples]:
            before = s.before if len(s.before) <= CONTEXT_CHARS else "…" + s.before[-CONTEXT_CHARS:]
            lines.append(f"     m={s.coefficient:+.4g}  {printable(before)}{mark[0]}{printable(s.token)}{mark[1]}")
    if not stats.groups:
        lines.append("  (none: the search saw no position of this memory)")
    return "\n".join(lines)


def histogram_svg(
    edges: Sequence[float], counts: Sequence[int], *, width: int = 320, height: int = 120, title: str = ""
) -> str:
    """A histogram as a self-contained inline ``<svg>``: one bar per non-empty bin, axes labelled coefficient and count.

    Bars are drawn to a linear count scale over the bins' coefficient range, inside ``<g class="bars">``;
    each carries a ``<title>`` (bin range and count) for hover; ``title`` labels the whole figure.
    """
    if len(edges) != len(counts) + 1:
        raise ConfigError(f"{len(edges)} histogram edges for {len(counts)} bins; pass one edge more than bins.")
    left, right, top, bottom = 38, 6, 6, 30
    plot_w, plot_h = width - left - right, height - top - bottom
    lo, hi = (float(edges[0]), float(edges[-1])) if len(edges) else (0.0, 1.0)
    span = hi - lo if hi > lo else 1.0
    peak = max(counts, default=0) or 1
    e = html.escape
    bars = []
    for a, b, c in zip(edges[:-1], edges[1:], counts, strict=True):
        if c <= 0:  # an empty bin draws nothing (a report holds hundreds of these)
            continue
        x0 = left + plot_w * (float(a) - lo) / span
        w = max(plot_w * (float(b) - float(a)) / span, 0.5)
        h = plot_h * c / peak
        tip = f"[{float(a):+.4g}, {float(b):+.4g}): {int(c):,}"
        bars.append(
            f'<rect x="{x0:.2f}" y="{top + plot_h - h:.2f}" width="{w:.2f}" height="{h:.2f}">'
            f"<title>{e(tip)}</title></rect>"
        )
    base = top + plot_h
    axes = (
        f'<line x1="{left}" y1="{base}" x2="{left + plot_w}" y2="{base}" stroke="#5b6475"/>'
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{base}" stroke="#5b6475"/>'
        f'<text x="{left}" y="{base + 11}" font-size="9" text-anchor="start">{e(f"{lo:+.3g}")}</text>'
        f'<text x="{left + plot_w}" y="{base + 11}" font-size="9" text-anchor="end">{e(f"{hi:+.3g}")}</text>'
        f'<text x="{left + plot_w / 2:.1f}" y="{height - 4}" font-size="10" text-anchor="middle">coefficient</text>'
        f'<text x="{left - 3}" y="{top + 8}" font-size="9" text-anchor="end">{e(f"{peak:,}")}</text>'
        f'<text x="{left - 3}" y="{base}" font-size="9" text-anchor="end">0</text>'
        f'<text x="10" y="{top + plot_h / 2:.1f}" font-size="10" text-anchor="middle" '
        f'transform="rotate(-90 10 {top + plot_h / 2:.1f})">count</text>'
    )
    label = f"<title>{e(title)}</title>" if title else ""
    return (
        f'<svg class="histogram" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" font-family="sans-serif" fill="#1d2330">{label}'
        f'<g class="bars" fill="#1f5fa8">{"".join(bars)}</g>{axes}</svg>'
    )


def card_histograms(atlas: Any, layer: int, keys: Sequence[int]) -> dict[int, str]:
    """Per key, an HTML block for a report card: the histogram (small inline SVG) and its density line.

    The layer's histograms are read once (``atlas.histograms``). An atlas without statistics gives
    each key a "not recorded" note instead.
    """
    if not getattr(atlas, "has_stats", False):
        return {k: '<p class="hist-note">histogram: not recorded in this run</p>' for k in keys}
    edges = atlas.histogram_edges(layer).tolist()
    counts = atlas.histograms(layer)
    frame = atlas.stats(layer).set_index("key")
    threshold = atlas.stats_settings.get("density_threshold")
    above = "" if threshold is None else f" (|m| > {threshold:g})"
    out = {}
    for k in keys:
        row = frame.loc[k]
        svg = histogram_svg(edges, counts[k].tolist(), width=300, height=96, title=f"layer {layer}, key {k}")
        note = f"density {row['density']:.3g}{above} · mean {row['mean']:+.3g} · std {row['std']:.3g}"
        out[k] = f'<div class="hist">{svg}<p class="hist-note">{html.escape(note)}</p></div>'
    return out
