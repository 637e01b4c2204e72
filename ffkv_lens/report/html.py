"""``report.html``: a run folder as one self-contained page (no scripts, fonts or links to fetch).

The page shows the run's settings (config, model, corpus with its fingerprint, versions, step
timings), each analysis as the paper's figure (embedded as a ``data:`` SVG) with its per-layer
table and a caption naming the paper's figure, and a gallery of the most interesting memories of
each layer (:meth:`RunFolder.gallery`): their top trigger examples with the peak token
highlighted, the next token, and the value's top and bottom tokens. Steps that did not run are
shown as "not run". Every piece of text is HTML-escaped (trigger text is arbitrary corpus text).

Example:
    >>> from ffkv_lens.report import write_report  # doctest: +SKIP
    >>> write_report("runs/smollm2")  # doctest: +SKIP
    PosixPath('runs/smollm2/report.html')
"""

import base64
import html
import json
import math
import numbers
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ffkv_lens.report.memories import CATEGORIES, MemoryCard, RunFolder, printable
from ffkv_lens.report.memory_stats import card_histograms
from ffkv_lens.storage import atomic_write_bytes
from ffkv_lens.storage.layout import MANIFEST, RUN_STEPS

__all__ = ["render_report", "write_report"]

CONTEXT_CHARS = 200  # text shown before a peak token; longer prefixes are cut at the front


@dataclass(frozen=True)
class _Analysis:
    anchor: str
    nav: str
    title: str
    step: str
    caption: str
    figures: tuple[tuple[str, str], ...]  # (figure name, label)
    tables: tuple[tuple[str, str], ...]  # (table name, heading)
    settings: tuple[str, ...]


_ANALYSES = (
    _Analysis(
        "mutation", "Mutation (Fig 3)", "Shallow and semantic keys: the mutation test", "mutation",
        "Paper Fig 3. For a sample of keys per layer and their top trigger examples, the first, the last or a "
        "random token of the example's prefix is removed and the key's coefficient recomputed; the curves are "
        "the mean relative change per layer with a bootstrap 95% band. In the paper, removing the last token "
        "hurts most in the lower layers (shallow, n-gram keys) and much less in the upper layers (semantic keys).",
        (("mutation", "Fig 3: coefficient change"),), (("mutation_per_layer", "Per layer"),), ("mutation",),
    ),
    _Analysis(
        "agreement", "Agreement (Fig 4-6)", "Do values predict what follows their keys' triggers?", "agreement",
        "Paper Fig 4-6 and Table 2. Agreement (Fig 4): how often a value's top token is the token that follows "
        "its key's top-1 trigger example, with a bootstrap 95% band and three baselines (1/|V|, the corpus "
        "unigram, values permuted among the layer's keys). Rank (Fig 5): the median rank of that next token in "
        "the value's distribution, 0 = top. In the paper both improve sharply in the upper layers. The signed "
        "table reads the negative side (a value's bottom token against the key's most negative examples).",
        (("agreement", "Fig 4: agreement rate"), ("rank", "Fig 5: rank of the next token")),
        (("agreement_per_layer", "Per layer"), ("agreement_signed_per_layer", "Per layer, negative side (signed)")),
        ("agreement", "agreement_signed"),
    ),
    _Analysis(
        "causal", "Causal agreement", "Do memories cause what their values read as?", "causal",
        "Not in the paper (docs/causal.md). Sampled memories of each layer are zeroed at the peak of their top "
        "trigger examples, one ablation per row of a batch, beside a matched control (a memory of the same layer "
        "with a similar |m| at that position). Left: the share of memories whose ablation lowers log p of the "
        "example's next token more than their control's (causal agreement, bootstrap 95% band; 50% = no more "
        "causal than the control) beside the share whose value token is the top trigger's next token "
        "(correlational agreement, the same memories). Right: the mean effect (clean - ablated) of the memories "
        "and of their controls.",
        (("causal", "Correlational vs causal agreement"),), (("causal_per_layer", "Per layer"),), ("causal",),
    ),
    _Analysis(
        "composition", "Composition (Fig 7-8)", "Composition within a layer", "dynamics",
        "Paper Fig 7-8. At sampled positions: the share of a layer's memories that are active, and how often no "
        "active memory's own prediction (its value's top token) is the layer's prediction. In the paper hundreds "
        "of memories are active and most layer predictions match no single memory: the output is a composition.",
        (("composition", "Fig 7-8: active memories, no agreeing memory"),),
        (("composition_per_layer", "Per layer"),), ("dynamics",),
    ),
    _Analysis(
        "residual", "Residual (Fig 9-11)", "The residual stream and the FFN across layers", "dynamics",
        "Paper Fig 9-11. How often the residual entering a layer's FFN already has the model's final prediction "
        "as its top token, the probability it gives that token, and (Fig 11) what the FFN's update does to the "
        "residual's prediction: kept (residual), replaced by the FFN's (ffn), both agree (agreement), a third "
        "token (composition), or other. In the paper the residual's prediction mostly survives in upper layers.",
        (("residual", "Fig 9-10: residual vs final prediction"),
         ("residual_breakdown", "Fig 11: what the FFN update does")),
        (("residual_per_layer", "Per layer"),), ("dynamics",),
    ),
)  # fmt: skip

_CSS = """
:root { color-scheme: light; --ink: #1d2330; --mute: #5b6475; --line: #dde1e8; --bg: #f7f8fa; --acc: #1f5fa8; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
  color: var(--ink); background: #fff; }
header, main, footer { max-width: 1180px; margin: 0 auto; padding: 0 20px; }
header { padding-top: 24px; } h1 { margin: 0 0 4px; font-size: 26px; }
h2 { margin: 36px 0 8px; padding-top: 8px; border-top: 2px solid var(--line); font-size: 20px; }
h3 { margin: 22px 0 6px; font-size: 16px; } h4 { margin: 0 0 4px; font-size: 14px; }
.sub, .note, figcaption, footer { color: var(--mute); } .note { font-size: 13px; margin: 2px 0 8px; }
nav { position: sticky; top: 0; background: #fffe; border-bottom: 1px solid var(--line); padding: 6px 20px;
  text-align: center; z-index: 1; }
nav a { margin: 0 8px; color: var(--acc); text-decoration: none; font-size: 14px; }
code, .mono, pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, "Liberation Mono", monospace; }
.status { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 13px; background: #eef0f4; }
.status.missing { background: #fdecec; color: #9b1c1c; } .status.ok { background: #e8f5ec; color: #1f6b3a; }
.caption { max-width: 900px; }
figure { margin: 12px 0; display: inline-block; vertical-align: top; max-width: 100%; }
figure img { max-width: 100%; width: 640px; border: 1px solid var(--line); border-radius: 4px; }
.scroll { overflow-x: auto; }
.blocks { display: flex; flex-wrap: wrap; gap: 0 36px; align-items: flex-start; }
table { border-collapse: collapse; font-size: 13px; margin: 6px 0 10px; }
th, td { padding: 3px 9px; border-bottom: 1px solid var(--line); text-align: right; white-space: nowrap; }
th { background: var(--bg); font-weight: 600; } td.k, th.k { text-align: left; }
table.kv td { text-align: left; white-space: normal; } table.kv td:first-child { color: var(--mute); }
details > summary { cursor: pointer; color: var(--acc); font-size: 14px; }
pre { background: var(--bg); padding: 10px; border-radius: 4px; font-size: 12px; overflow-x: auto; }
.layer-index a { display: inline-block; margin: 0 6px 4px 0; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(340px, 1fr)); gap: 12px; }
.card { border: 1px solid var(--line); border-radius: 6px; padding: 10px 12px; background: #fff; }
.card .metrics { font-size: 12px; color: var(--mute); margin: 0 0 6px; }
.card ol { margin: 0 0 6px; padding-left: 20px; font-size: 13px; }
.card li { margin-bottom: 3px; }
.ctx { white-space: pre-wrap; word-break: break-word; }
mark.peak { background: #ffd54a; color: #000; padding: 0 1px; border-radius: 2px; font-weight: 600; }
.coef { color: var(--mute); font-size: 12px; margin-right: 4px; }
.next, .tok { white-space: pre; background: #eef3fb; border: 1px solid #d5e0f2; border-radius: 3px;
  padding: 0 3px; font-size: 12px; }
.tok.neg { background: #fbeeee; border-color: #f0d3d3; } .tok small { color: var(--mute); }
.hist { margin: 4px 0 0; } .hist svg { display: block; max-width: 100%; height: auto; }
.hist-note { font-size: 12px; color: var(--mute); margin: 0; }
.tokens { font-size: 12px; margin: 2px 0; line-height: 1.9; } .tokens .lbl { color: var(--mute); margin-right: 4px; }
"""


def write_report(run_dir: str | Path, *, per_category: int = 3, examples: int = 5) -> Path:
    """Write ``run_dir/report.html`` (atomically) from whatever the run folder holds.

    Args:
        run_dir: A run folder written by ``ffkv-lens run`` (finished or not).
        per_category: Memories per gallery category and layer.
        examples: Trigger examples per memory card.

    Returns:
        The path of the report.
    """
    run = RunFolder(run_dir)
    path = run.paths.report
    atomic_write_bytes(path, render_report(run, per_category=per_category, examples=examples).encode("utf-8"))
    return path


def render_report(run: RunFolder, *, per_category: int = 3, examples: int = 5) -> str:
    """The report page of ``run`` as one HTML string."""
    model = run.manifest.get("model", {}).get("model_name") or run.manifest.get("config", {}).get("model", "?")
    sections = [  # (anchor, navigation label, title, content)
        ("settings", "Settings", "Settings", _settings(run)),
        ("triggers", "Triggers", "Trigger search", _triggers(run)),
        *((a.anchor, a.nav, a.title, _analysis(run, a)) for a in _ANALYSES),
        ("gallery", "Memory gallery", "Memory gallery", _gallery(run, per_category, examples)),
    ]
    nav = "".join(f'<a href="#{anchor}">{_e(label)}</a>' for anchor, label, _, _ in sections)
    body = "".join(f'<section id="{a}"><h2>{_e(title)}</h2>{content}</section>' for a, _, title, content in sections)
    state = "finished" if run.complete else f"unfinished (status {run.manifest.get('status')!r})"
    corpus = run.manifest.get("corpus", {})
    sub = (
        f"model <code>{_e(model)}</code> · corpus <code>{_e(corpus.get('name', '?'))}</code> "
        f"(fingerprint <code>{_e(corpus.get('fingerprint', '?'))}</code>) · run {_e(state)}"
    )
    version = run.manifest.get("versions", {}).get("ffkv-lens", "?")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>ffkv-lens report: {_e(model)}</title><style>{_CSS}</style></head><body>"
        f'<header><h1>Feed-forward layers as key-value memories</h1><p class="sub">{sub}</p></header>'
        f"<nav>{nav}</nav><main>{body}</main>"
        f"<footer><p>ffkv-lens {_e(version)} · {_e(str(run.path))} · written "
        f"{_e(time.strftime('%Y-%m-%d %H:%M:%S %z'))} · after Geva et al. 2021, “Transformer Feed-Forward "
        "Layers Are Key-Value Memories”</p></footer></body></html>\n"
    )


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _status(text: str, ok: bool) -> str:
    return f'<span class="status {"ok" if ok else "missing"}">{_e(text)}</span>'


def _kv(rows: dict[str, Any]) -> str:
    cells = "".join(
        f"<tr><td>{_e(k)}</td><td><code>{_e(v if isinstance(v, str) else json.dumps(v, default=str))}</code></td></tr>"
        for k, v in rows.items()
    )
    return f'<table class="kv">{cells}</table>'


def _settings(run: RunFolder) -> str:
    m = run.manifest
    corpus = dict(m.get("corpus") or {})
    corpus = {"fingerprint": corpus.pop("fingerprint", None), **corpus} if corpus else {}
    parts = [
        f'<p class="note">started {_e(m.get("started", "?"))}, finished {_e(m.get("finished", "not yet"))}; '
        f"format {_e(m.get('format', '?'))}</p>",
        '<div class="blocks">',
        "<div><h3>Run configuration</h3>" + _kv(m.get("config", {})) + "</div>",
        "<div><h3>Model</h3>"
        + (_kv({**m.get("model", {}), **m.get("layout", {})}) if m.get("model") else _not_run())
        + "</div>",
        "<div><h3>Corpus</h3>" + (_kv(corpus) if corpus else _not_run()) + "</div>",
        "<div><h3>Versions</h3>" + _kv(m.get("versions", {})) + "</div>",
        "<div><h3>Steps</h3>" + _steps(run) + "</div></div>",
    ]
    return "".join(parts)


def _not_run(what: str = "not run") -> str:
    return f"<p>{_status(what, False)}</p>"


def _steps(run: RunFolder) -> str:
    rows = []
    for step in RUN_STEPS:
        info = dict(run.steps.get(step, {}))
        seconds = info.pop("seconds", None)
        info.pop("path", None)
        if step == "report":
            state, seconds = "this page", None
        else:
            state = "done" if run.done(step) else "not run"
        detail = ", ".join(f"{k}: {v if not isinstance(v, list) else ' '.join(map(str, v))}" for k, v in info.items())
        rows.append(
            f'<tr><td class="k">{_e(step)}</td><td class="k">{_status(state, state != "not run")}</td>'
            f'<td>{"" if seconds is None else _e(f"{seconds:.1f} s")}</td><td class="k">{_e(detail)}</td></tr>'
        )
    head = '<tr><th class="k">step</th><th class="k">status</th><th>time</th><th class="k">details</th></tr>'
    return f"<table>{head}{''.join(rows)}</table>"


def _triggers(run: RunFolder) -> str:
    path = run.paths.atlas / MANIFEST
    if not run.done("triggers") or not path.is_file():
        return _not_run()
    atlas = run.atlas.manifest  # checked on load: progress counts are integers, layers a list of integers
    progress = atlas.get("progress", {})
    summary = {
        "tokens searched": f"{progress.get('tokens', 0):,}",
        "units": f"{progress.get('units', 0):,}",
        **{k: v for k, v in atlas.get("settings", {}).items() if k != "layers"},
        "layers": len(atlas.get("layers", [])),
        "tokenizer fingerprint": atlas.get("tokenizer_fingerprint"),
    }
    return (
        '<p class="caption">Paper section 3: for every key, the units of the corpus where its coefficient '
        "is highest (its top-k trigger examples), each cut at the peak token. The gallery below shows them.</p>"
        + _kv(summary)
    )


def _analysis(run: RunFolder, spec: _Analysis) -> str:
    parts = [f'<p class="caption">{_e(spec.caption)}</p>']
    if not run.done(spec.step):
        return "".join(parts) + _not_run(f"not run (the {spec.step} step did not finish)")
    parts.append("".join(_figure(run, name, label) for name, label in spec.figures))
    for table, heading in spec.tables:
        frame = run.table(table)
        if frame is not None:
            parts.append(f"<h3>{_e(heading)}</h3>" + _frame_table(frame))
    for name in spec.settings:
        settings = run.settings(name)
        if settings is not None:
            text = json.dumps(settings, indent=1, sort_keys=True, default=str)
            parts.append(f"<details><summary>settings: {_e(name)}</summary><pre>{_e(text)}</pre></details>")
    return "".join(parts)


def _figure(run: RunFolder, name: str, label: str) -> str:
    path = run.figure(name)
    if path is None:
        return _not_run(f"figure {name} not drawn: run `ffkv-lens report {run.path}` to draw it")
    return _embed(path, name, f"figure {name}", label)


def _embed(path: Path, name: str, alt: str, label: str) -> str:
    """One figure file inlined as a data: URL (the page stays self-contained)."""
    mime = "image/svg+xml" if path.suffix == ".svg" else "image/png"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f'<figure id="figure-{_e(name)}"><img alt="{_e(alt)}" src="data:{mime};base64,{data}">'
        f"<figcaption>{_e(label)} <small>(figures/{_e(path.name)})</small></figcaption></figure>"
    )


def figure_file(stem: Path, label: str) -> str:
    """The figure ``stem`` (its .svg, else its .png) inlined, or a "not drawn" note (comparison and facts pages)."""
    for suffix in (".svg", ".png"):
        candidate = stem.with_suffix(suffix)
        if candidate.is_file():
            return _embed(candidate, stem.name, label, label)
    return _not_run(f"figure {stem.name} not drawn")


def _number(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return str(value)
    if float(value).is_integer() and abs(value) < 1e15:
        return f"{int(value):,}"
    size = abs(value)
    if size >= 100:
        return f"{value:,.1f}"
    if size >= 0.01:
        return f"{value:.3f}"
    return "0" if size < 1e-12 else f"{value:.3g}"  # 0.00196, 2.03e-05; float noise shown as 0


def _frame_table(frame: Any) -> str:
    """A per-layer DataFrame as an HTML table; ``x``, ``x_ci_low``, ``x_ci_high`` become one cell."""
    columns = [c for c in frame.columns if not c.endswith(("_ci_low", "_ci_high"))]
    head = "".join(
        f"<th>{_e(c)}{' <small>[95% CI]</small>' if f'{c}_ci_low' in frame.columns else ''}</th>" for c in columns
    )
    rows = []
    for record in frame.to_dict("records"):
        cells = []
        for c in columns:
            text = _number(record[c])
            if f"{c}_ci_low" in record:
                text += f" [{_number(record[f'{c}_ci_low'])}, {_number(record[f'{c}_ci_high'])}]"
            cells.append(f"<td>{_e(text)}</td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return f'<div class="scroll"><table><tr>{head}</tr>{"".join(rows)}</table></div>'


def _gallery(run: RunFolder, per_category: int, examples: int) -> str:
    if not run.done("triggers") or not (run.paths.atlas / MANIFEST).is_file():
        return _not_run()
    layers = run.atlas.layers
    parts = [
        '<p class="caption">Per layer, the memories that stand out in the agreement table (the value\'s top token '
        "is the next token of the key's top-1 trigger; precision@k over all its examples) and in the mutation test "
        "(only the keys it tested) and the causal agreement (only the memories it sampled). Each card: the key's "
        "top trigger examples with the peak token "
        '<mark class="peak">highlighted</mark> and the token that followed (→), the coefficient m, and the value\'s '
        "top and bottom tokens in the vocabulary (logit on hover).</p>",
        '<p class="layer-index">'
        + "".join(f'<a href="#layer-{_e(layer)}">layer {_e(layer)}</a>' for layer in layers)
        + "</p>",
    ]
    for layer in layers:
        parts.append(f'<details open id="layer-{_e(layer)}"><summary><b>Layer {_e(layer)}</b></summary>')
        for pick in run.gallery(layer, per_category):
            title = CATEGORIES[pick.category][0]
            parts.append(f"<h3>Layer {_e(layer)}: {_e(title)}</h3>")
            if pick.note == "not run":
                parts.append(_not_run(f"not run (the {CATEGORIES[pick.category][1]} step did not finish)"))
                continue
            parts.append(f'<p class="note">{_e(pick.note)}</p>')
            histograms = card_histograms(run.atlas, layer, pick.keys)
            cards = [_card(run.card(layer, key, examples=examples), histograms[key]) for key in pick.keys]
            parts.append(f'<div class="cards">{"".join(cards)}</div>')
        parts.append("</details>")
    return "".join(parts)


def _tok(text: str, logit: float | None = None, neg: bool = False) -> str:
    title = "" if logit is None else f' title="logit {logit:+.4g}"'
    return f'<code class="tok{" neg" if neg else ""}"{title}>{_e(printable(text) or "∅")}</code>'


def _card(card: MemoryCard, histogram: str = "") -> str:
    """One memory as an HTML card (every piece of text escaped); ``histogram``: its trusted HTML block."""
    metrics = []
    if card.agreement is not None and card.examples and card.examples[0].next_token is not None:
        a = card.agreement
        agrees = str(a.get("agrees")) == "True"
        metrics.append(f"agrees: {'yes' if agrees else 'no'}, next token at rank {_number(a.get('rank'))}")
        metrics.append(f"precision@k {_fraction(a.get('precision_at_k'))} over {_number(a.get('n_examples'))} examples")
    if card.mutation is not None:
        m = card.mutation
        metrics.append(f"{m['kind']} (shallow_score {m['shallow_score']:+.3f})")
    if card.causal is not None:
        metrics.append(f"causal score {card.causal['causal_score']:+.3g}")
    if card.max_prob is not None:
        metrics.append(f"max p {_number(card.max_prob)}")
    items = []
    for view in card.examples:
        before = view.before if len(view.before) <= CONTEXT_CHARS else "…" + view.before[-CONTEXT_CHARS:]
        nxt = '<span class="note">(unit end)</span>' if view.next_token is None else _tok(view.next_token)
        peak = "⟨BOS⟩" if view.position < 0 else printable(view.peak)
        items.append(
            f'<li><span class="coef">m={_e(f"{view.coefficient:+.4g}")}</span><span class="ctx">{_e(before)}'
            f'<mark class="peak">{_e(peak)}</mark></span> → {nxt}</li>'
        )
    if card.top_tokens is None:
        values = '<p class="tokens">value tokens: not run</p>'
    else:
        values = (
            '<p class="tokens"><span class="lbl">value top</span>'
            + " ".join(_tok(t, logit) for t, logit in card.top_tokens)
            + '</p><p class="tokens"><span class="lbl">value bottom</span>'
            + " ".join(_tok(t, logit, neg=True) for t, logit in card.bottom_tokens or ())
            + "</p>"
        )
    return (
        f'<article class="card"><h4>L{_e(card.layer)} · key {_e(card.key)}</h4>'
        f'<p class="metrics">{_e(" · ".join(metrics))}</p>'
        f"<ol>{''.join(items) or '<li>no trigger examples</li>'}</ol>{values}{histogram}</article>"
    )


def _fraction(value: Any) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"
