"""``report.html`` of a facts folder: one self-contained page (no scripts, fonts or links to fetch).

The page shows the settings, one summary row per fact, the figure of attribution (estimate) against
ablation (measurement), and per fact: the located memories with their measured ablations, the joint ablation,
efficacy on prompts and paraphrases, specificity on unrelated facts, and the collateral audit (worst first).
The styling and cell formatting are the run report's (:mod:`ffkv_lens.report.html`); every piece of text is
HTML-escaped (prompts and trigger examples are arbitrary text).
"""

import time
from pathlib import Path
from typing import Any

import pandas as pd

from ffkv_lens.report.html import _CSS, _e, _frame_table, _kv, _not_run, figure_file
from ffkv_lens.storage import atomic_write_bytes
from ffkv_lens.storage.atomic import read_json
from ffkv_lens.storage.layout import FactsPaths

__all__ = ["render_facts_report", "write_facts_report"]

_SHOWN = {
    "memories": ["rank", "layer", "key", "coefficient", "attribution", "shared_by", "ablation_delta_p",
                 "ablation_delta_logp", "estimate_delta_logp"],
    "efficacy": ["kind", "text", "p_before", "p_after", "delta_p", "predicted_before", "predicted_after"],
    "specificity": ["fact", "text", "target_token", "p_before", "p_after", "delta_p"],
    "audit": ["layer", "key", "prefix", "next_token", "logp_before", "logp_after", "delta_logp"],
}  # fmt: skip
_ROWS = 10


def write_facts_report(path: str | Path) -> Path:
    """Write ``path/report.html`` (atomically) for a facts folder."""
    paths = FactsPaths(Path(path))
    atomic_write_bytes(paths.report, render_facts_report(paths).encode("utf-8"))
    return paths.report


def _table(paths: FactsPaths, name: str) -> pd.DataFrame:
    path = paths.table(name)
    return pd.read_csv(path, keep_default_na=False, na_values=[""]) if path.is_file() else pd.DataFrame()


def _part(tables: dict[str, pd.DataFrame], name: str, fact: str, title: str) -> str:
    table = tables[name]
    rows = table[table["fact"].astype(str) == fact] if len(table) else table
    if not len(rows):
        return f"<h4>{_e(title)}</h4>{_not_run('none')}"
    columns = [c for c in _SHOWN[name] if c in rows.columns]
    return f"<h4>{_e(title)}</h4>{_frame_table(rows[columns].head(_ROWS))}"


def _fact_section(fact: dict[str, Any], summary: dict[str, Any], tables: dict[str, pd.DataFrame]) -> str:
    fid = str(fact["id"])
    known = "the model predicts it" if summary.get("known") else "the model does NOT predict it on every prompt"
    head = _kv(
        {
            "prompts": fact["prompts"],
            "target": f"{fact['target']!r} (measured token {summary.get('target_token')!r}; {known})",
            "paraphrases (held out)": fact.get("paraphrases", []),
            "edits": summary.get("edited"),
            "joint ablation of the top memories: delta p": summary.get("joint_delta_p"),
        }
    )
    return (
        f'<section id="fact-{_e(fid)}"><h3>{_e(fid)}</h3>{head}'
        + _part(tables, "memories", fid, "Located memories (attribution = estimate; ablation = measurement)")
        + _part(tables, "efficacy", fid, "Efficacy of the edit")
        + _part(tables, "specificity", fid, "Specificity: unrelated facts under the edit")
        + _part(tables, "audit", fid, "Collateral audit: the edited memories' trigger examples, worst first")
        + "</section>"
    )


def render_facts_report(paths: FactsPaths) -> str:
    """The facts page as one HTML string."""
    manifest = read_json(paths.manifest)
    tables = {name: _table(paths, name) for name in ("facts", *_SHOWN)}
    summaries = {str(r["fact"]): r for r in tables["facts"].to_dict("records")} if len(tables["facts"]) else {}
    model = manifest.get("model", {})
    name = str(model.get("model_name", ""))
    settings = {**manifest.get("settings", {}), "model": model, **manifest.get("source", {})}
    shown = [c for c in tables["facts"].columns if c not in ("audit_worst_prefix", "edited")]
    overview = _frame_table(tables["facts"][shown]) if len(tables["facts"]) else _not_run("no facts")
    figure = figure_file(paths.figure("attribution_vs_ablation"), "Estimated vs measured change of log p(target)")
    facts = "".join(_fact_section(f, summaries.get(str(f["id"]), {}), tables) for f in manifest.get("facts", []))
    sections = [
        ("settings", "Settings", _kv(settings)),
        ("facts", "Facts", overview + figure),
        ("details", "Each fact", facts),
    ]
    nav = "".join(f'<a href="#{a}">{_e(t)}</a>' for a, t, _ in sections)
    body = "".join(f'<section id="{a}"><h2>{_e(t)}</h2>{c}</section>' for a, t, c in sections)
    version = manifest.get("versions", {}).get("ffkv-lens", "?")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>ffkv-lens facts: {_e(name)}</title><style>{_CSS}</style></head>"
        f'<body><header><h1>Located and edited facts</h1><p class="sub">{_e(name)}</p></header>'
        f"<nav>{nav}</nav><main>{body}</main><footer><p>ffkv-lens {_e(version)} · {_e(str(paths.root))} · "
        f"written {_e(time.strftime('%Y-%m-%d %H:%M:%S %z'))}</p></footer></body></html>\n"
    )
