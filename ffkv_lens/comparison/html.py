"""The comparison folder as one self-contained ``report.html`` (like a run's report: no scripts).

Sections: the runs compared (model, layout, corpus fingerprint; a warning on every figure
when the corpora differ), the overlaid curves with the run tables they come from, the
vocabulary alignment of each pair, and per pair and kind (value, key): the counts of matched
memories at the stated FDR, the calibration figure (real vs null best scores), the density
heatmap (which layers of one model match which of the other), and example matched memories
side by side (trigger examples and value tokens read from each run folder).

Example:
    >>> write_comparison_report("runs/cmp")  # doctest: +SKIP
"""

import time
from pathlib import Path
from typing import Any

import pandas as pd

from ffkv_lens.comparison.curves import CURVES
from ffkv_lens.comparison.reader import Comparison
from ffkv_lens.errors import FfkvLensError
from ffkv_lens.report.html import _CSS, _card, _e, _kv, _not_run, _number, figure_file
from ffkv_lens.storage import atomic_write_bytes
from ffkv_lens.storage.layout import ComparisonPaths

__all__ = ["render_comparison_report", "write_comparison_report"]

EXAMPLES = 6  # matched pairs shown per pair of runs, kind and direction

_EXTRA_CSS = """
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 10px; margin: 10px 0 18px; }
.pair .score { grid-column: 1 / span 2; font-size: 13px; color: var(--mute); margin: 0; }
.warn { background: #fff4e0; border: 1px solid #f0d3a0; padding: 6px 10px; border-radius: 4px; }
"""


def write_comparison_report(path: str | Path) -> Path:
    """Write ``path/report.html`` (atomically) for a comparison folder."""
    comparison = Comparison.load(path)
    target = ComparisonPaths(comparison.path).report
    atomic_write_bytes(target, render_comparison_report(comparison).encode("utf-8"))
    return target


def render_comparison_report(comparison: Comparison) -> str:
    """The comparison page as one HTML string."""
    m = comparison.manifest
    labels = [r["label"] for r in m["runs"]]
    sections = [
        ("runs", "Runs", "Runs compared", _runs(comparison)),
        ("curves", "Curves", "The analyses side by side (relative depth)", _curves(comparison)),
        ("matches", "Matches", "Matching memories across models", _matches(comparison)),
    ]
    nav = "".join(f'<a href="#{a}">{_e(label)}</a>' for a, label, _, _ in sections)
    body = "".join(f'<section id="{a}"><h2>{_e(t)}</h2>{c}</section>' for a, _, t, c in sections)
    version = m.get("versions", {}).get("ffkv-lens", "?")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>ffkv-lens comparison: {_e(' vs '.join(labels))}</title><style>{_CSS}{_EXTRA_CSS}</style></head>"
        f'<body><header><h1>FFN memories across models</h1><p class="sub">{_e(" · ".join(labels))}</p></header>'
        f"<nav>{nav}</nav><main>{body}</main><footer><p>ffkv-lens {_e(version)} · {_e(str(comparison.path))} · "
        f"written {_e(time.strftime('%Y-%m-%d %H:%M:%S %z'))}</p></footer></body></html>\n"
    )


def _runs(comparison: Comparison) -> str:
    m = comparison.manifest
    rows = "".join(
        f"<tr><td class=k>{_e(r['label'])}</td><td class=k><code>{_e(r['model'])}</code></td>"
        f"<td>{_e(r['n_layers'])}</td><td>{_e(_number(r['d_mlp']))}</td>"
        f"<td class=k><code>{_e(r['corpus_fingerprint'])}</code></td>"
        f"<td class=k><code>{_e(r['path'])}</code></td></tr>"
        for r in m["runs"]
    )
    warn = (
        '<p class="warn">These runs read <b>different corpora</b> (allowed with --allow-different-corpora): their '
        "curves are not measured on the same text, and every figure says so.</p>"
        if m.get("corpora_differ") else ""
    )  # fmt: skip
    return (
        warn + '<div class="scroll"><table><tr><th class=k>label</th><th class=k>model</th><th>layers</th>'
        f"<th>memories per layer</th><th class=k>corpus fingerprint</th><th class=k>run folder</th></tr>{rows}"
        "</table></div><h3>Settings</h3>"
        + _kv(m.get("settings", {}))
        + "<h3>Versions</h3>"
        + _kv(m.get("versions", {}))
    )


def _curves(comparison: Comparison) -> str:
    parts = [
        '<p class="caption">Each run\'s per-layer tables, one line per model against relative depth '
        "(layer + 1) / n_layers, with the bootstrap 95% band where the table has one. Every metric of every run "
        "is in <code>tables/curves.csv</code> (run, model, layer, relative_depth, analysis, metric, value, "
        "ci_low, ci_high).</p>"
    ]
    for curve in CURVES:
        path = ComparisonPaths(comparison.path).figure(f"curve_{curve.name}")
        if path.with_suffix(".svg").is_file():
            parts.append(figure_file(path, f"{curve.paper}: {curve.title}" if curve.paper else curve.title))
    return "".join(parts)


def _matches(comparison: Comparison) -> str:
    m = comparison.manifest
    if not m["settings"].get("match"):
        return _not_run("not run (compare was called without matching: --no-match)")
    fdr = m["settings"]["fdr"]
    parts = [
        '<p class="caption">For every memory of one model, its closest memories in the other by two scores: '
        "<b>value</b> (correlation of the two values' logits over the vocabulary both tokenizers share) and "
        "<b>key</b> (correlation of the two keys' coefficients over the same sentences, at positions where both "
        "models have read the same text). Each score's best match is calibrated against a permutation null "
        "(values: vocabulary shuffled within surface classes; keys: token types shuffled within frequency "
        f"blocks); a best match is <b>significant</b> when its q-value is at most {_e(fdr)}. See docs/compare.md.</p>"
    ]
    frame = comparison.matches
    for pair in m["pairs"]:
        a, b = pair["run_a"], pair["run_b"]
        vocab = pair["vocabulary"]
        parts.append(f"<h3>{_e(a)} vs {_e(b)}</h3>")
        parts.append(
            f'<p class="note">Vocabulary alignment: {vocab["n_shared"]:,} tokens spell the same bytes: '
            f"{vocab['share_a']:.1%} of {_e(a)}'s vocabulary ({_e(vocab['kind_a'])}), {vocab['share_b']:.1%} of "
            f"{_e(b)}'s ({_e(vocab['kind_b'])}).</p>"
        )
        for kind, summary in pair["kinds"].items():
            parts.append(f"<h4>{_e(kind)} matches</h4>")
            parts.append(_summary_table(kind, summary, a, b))
            parts.append(figure_file(ComparisonPaths(comparison.path).figure(f"calibration_{kind}_{a}__{b}"),
                              f"{kind}: real vs null best scores"))  # fmt: skip
            for src, dst in ((a, b), (b, a)):
                parts.append(figure_file(ComparisonPaths(comparison.path).figure(f"density_{kind}_{src}__{dst}"),
                                  f"{kind}: layers of {src} vs {dst}"))  # fmt: skip
                parts.append(_examples(comparison, frame, kind, src, dst))
    return "".join(parts)


def _summary_table(kind: str, summary: dict[str, Any], a: str, b: str) -> str:
    rows = []
    for direction, (src, dst) in (("ab", (a, b)), ("ba", (b, a))):
        s = summary[direction]
        rows.append(
            f"<tr><td class=k>{_e(src)} → {_e(dst)}</td><td>{_number(s['memories'])}</td>"
            f"<td>{_number(s['significant'])}</td><td>{_number(s['median_best'])}</td>"
            f"<td>{_number(s['median_null'])}</td></tr>"
        )
    return (
        "<table><tr><th class=k>direction</th><th>memories scored</th><th>significant best matches</th>"
        f"<th>median best score</th><th>median null best score</th></tr>{''.join(rows)}</table>"
        f'<p class="note">null: {_e(summary["settings"].get("null", "?"))}</p>'
    )


def _examples(comparison: Comparison, frame: pd.DataFrame, kind: str, src: str, dst: str) -> str:
    rows = frame[(frame["kind"] == kind) & (frame["run_a"] == src) & (frame["run_b"] == dst) & (frame["rank"] == 1)]
    if rows.empty:
        return '<p class="note">no matches</p>'
    significant = rows[rows["significant"].astype(str) == "True"]
    chosen, note = (significant, "significant") if len(significant) else (rows, "none significant: best scores shown")
    chosen = chosen.sort_values("score", ascending=False).head(EXAMPLES)
    run_a, run_b = comparison.run(src), comparison.run(dst)
    parts = [f'<details><summary>Top {len(chosen)} {_e(kind)} matches of {_e(src)} in {_e(dst)} ({_e(note)})'
             "</summary>"]  # fmt: skip
    for r in chosen.to_dict("records"):
        score = (
            f"{kind} score {r['score']:.3f} · q {_number(r['q_value'])} · value similarity "
            f"{_number(r['value_similarity'])} · key correlation {_number(r['key_correlation'])}"
        )
        parts.append(
            f'<div class="pair"><p class="score">{_e(score)}</p>'
            f"{_side(run_a, src, int(r['layer_a']), int(r['key_a']))}"
            f"{_side(run_b, dst, int(r['layer_b']), int(r['key_b']))}</div>"
        )
    parts.append("</details>")
    return "".join(parts)


def _side(run: Any, label: str, layer: int, key: int) -> str:
    try:
        card = run.card(layer, key, examples=3)
    except FfkvLensError as exc:  # a run without atlas: say so on the page
        return f'<div><p class="note">{_e(label)} L{layer} key {key}: {_e(exc)}</p></div>'
    return f'<div><p class="note">{_e(label)}</p>{_card(card)}</div>'
