"""``locate``: every fact of a fact file located, verified and edited, into one facts folder.

Layout of the folder (``--out`` of ``ffkv-lens locate``)::

    manifest.json            format ``FACTS.format`` (ffkv_lens.storage.layout), model, fact file, the facts,
                             settings, versions, timings
    tables/facts.csv         one row per fact: known or not, top memory, its attribution and measured ablation,
                             joint ablation, efficacy, specificity, KL, worst audited example
    tables/memories.csv      each fact's top memories (locate_fact's table, with a ``fact`` column)
    tables/per_prompt.csv    their attribution on each prompt
    tables/completeness.csv  integrated gradients only: sum of attributions vs change of the objective
    tables/efficacy.csv, tables/specificity.csv, tables/audit.csv   edit_fact's tables, with a ``fact`` column
    figures/attribution_vs_ablation.png|svg   estimated vs measured change of log p(target), every top memory
    report.html              the facts as one self-contained page

Example:
    >>> write_facts_folder(lens, read_facts("examples/facts/smollm2.jsonl"), "runs/facts")  # doctest: +SKIP
"""

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ffkv_lens.adapters import AdapterLike, as_adapter
from ffkv_lens.analysis.atlas import TriggerAtlas
from ffkv_lens.analysis.causal.edit import FactEdit, edit_fact
from ffkv_lens.analysis.causal.facts import Fact, check_fact
from ffkv_lens.analysis.causal.locate import FactLocation, locate_fact
from ffkv_lens.corpus import Corpus
from ffkv_lens.errors import ConfigError, RunFolderError
from ffkv_lens.report.figures import save_figure
from ffkv_lens.storage import atomic_write_json
from ffkv_lens.storage.layout import FACTS, FactsPaths, claim_folder, remove_outputs
from ffkv_lens.storage.tables import library_versions, write_table

__all__ = ["FACTS_FORMAT", "LocateSettings", "write_facts_folder"]

log = logging.getLogger(__name__)

FACTS_FORMAT = FACTS.format


@dataclass(frozen=True)
class LocateSettings:
    """Settings of ``ffkv-lens locate`` (each recorded in the manifest).

    Attributes:
        method: ``attribution`` or ``integrated_gradients``.
        top: Memories located (and verified) per fact.
        steps: Integration steps of ``integrated_gradients``.
        edit_memories: Top memories (positive attribution) edited per fact.
        operation: ``suppress`` or ``enhance``.
        strength: Factor of the edit (None: 0 for suppress, 2 for enhance).
        unrelated: Other facts of the file measured for specificity, per fact.
        kl_positions: Corpus positions of the KL divergence (0: none).
        audit_examples: Trigger examples audited per edited memory.
        seed: Seed of the KL position sample.
    """

    method: str = "attribution"
    top: int = 20
    steps: int = 20
    edit_memories: int = 5
    operation: str = "suppress"
    strength: float | None = None
    unrelated: int = 5
    kl_positions: int = 256
    audit_examples: int = 10
    seed: int = 0


def _claim(out: Path, force: bool) -> None:
    claim = claim_folder(out, FACTS, force=force)
    if claim.state == "resume":
        raise RunFolderError(
            f"--out {str(out)!r} already holds a `ffkv-lens locate` result; nothing was changed. Pass --force to "
            "replace its outputs (files of others in it are kept), or choose a new folder."
        )
    if claim.state == "force":
        remove_outputs(out, FACTS)


def _one_fact(
    lens: AdapterLike, fact: Fact, others: Sequence[Fact], settings: LocateSettings, context: dict[str, Any]
) -> tuple[pd.DataFrame, FactLocation, FactEdit]:
    known = check_fact(lens, fact)
    location = locate_fact(lens, fact.prompts, fact.target, method=settings.method, top=settings.top,
                           steps=settings.steps)  # fmt: skip
    edited = edit_fact(
        lens, location, operation=settings.operation, strength=settings.strength, memories=settings.edit_memories,
        paraphrases=fact.paraphrases, unrelated=others, corpus=context["corpus"], atlas=context["atlas"],
        kl_positions=settings.kl_positions, audit_examples=settings.audit_examples, seed=settings.seed,
    )  # fmt: skip
    return known, location, edited


def _summary_row(fact: Fact, known: pd.DataFrame, location: FactLocation, edited: FactEdit) -> dict[str, Any]:
    first = location.memories.iloc[0]
    summary = edited.summary()
    worst = summary["audit_worst"] or {}
    return {
        "fact": fact.id,
        "target": fact.target,
        "target_token": location.target_token,
        "prompts": len(fact.prompts),
        "known": bool(known["correct"].all()),
        "p_target": float(known["p_target"].mean()),
        "top_memory": f"{int(first['layer'])}:{int(first['key'])}",
        "top_attribution": float(first["attribution"]),
        "top_ablation_delta_p": float(first["ablation_delta_p"]),
        "joint_delta_p": location.verification["joint_delta_p"],
        "edited": "; ".join(summary["edits"]),
        "efficacy_prompts_delta_p": summary["efficacy_prompts_delta_p"],
        "efficacy_paraphrases_delta_p": summary["efficacy_paraphrases_delta_p"],
        "specificity_mean_abs_delta_p": summary["specificity_mean_abs_delta_p"],
        "kl_mean": summary["kl_mean"],
        "audit_worst_delta_logp": worst.get("delta_logp"),
        "audit_worst_prefix": worst.get("prefix"),
    }


def _tagged(frames: list[tuple[str, pd.DataFrame | None]]) -> pd.DataFrame:
    parts = [frame.assign(fact=fact_id) for fact_id, frame in frames if frame is not None and len(frame)]
    if not parts:
        return pd.DataFrame()
    table = pd.concat(parts, ignore_index=True)
    return table[["fact", *[c for c in table.columns if c != "fact"]]]


def plot_attribution_vs_ablation(memories: pd.DataFrame, out: str | Path | None = None) -> Any:
    """Estimated (``-attribution``) vs measured change of log p(target) when one memory is zeroed, every top memory."""
    from ffkv_lens.report.figures import _figure

    fig, ax = _figure("Attribution (estimate) vs ablation (measurement)")
    if len(memories):
        x, y = memories["estimate_delta_logp"], memories["ablation_delta_logp"]
        ax.scatter(x, y, s=12, color="#1f5fa8", alpha=0.7, label="top memories of every fact")
        low, high = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
        ax.plot([low, high], [low, high], color="#555555", lw=1, ls="--", label="estimate = measurement")
        ax.legend(fontsize=8)
    ax.set_xlabel("estimated change of log p(target): -attribution")
    ax.set_ylabel("measured change of log p(target)")
    return save_figure(fig, out)


def write_facts_folder(
    model: AdapterLike,
    facts: Sequence[Fact],
    out: str | Path,
    *,
    settings: LocateSettings = LocateSettings(),
    atlas: TriggerAtlas | None = None,
    corpus: Corpus | None = None,
    source: dict[str, Any] | None = None,
    force: bool = False,
    progress: bool = True,
    say: Callable[[str], None] = log.info,
) -> Path:
    """Locate, verify and edit every fact, and write the facts folder ``out`` (see the module docstring).

    Args:
        model: The model (a lens or adapter).
        facts: The facts (:func:`~ffkv_lens.analysis.causal.facts.read_facts`).
        out: The folder to write: new or empty, or a facts folder with ``force``.
        settings: The locate and edit settings.
        atlas: The model's trigger atlas for the collateral audit (None: no audit).
        corpus: Corpus for the KL divergence (None: no KL).
        source: Where the facts, the model and the atlas came from, recorded in the manifest.
        force: Replace the outputs of an earlier ``locate`` in ``out`` (files of others are kept).
        progress: Show a progress bar over the facts.
        say: Receives one line per fact.

    Returns:
        ``out``.

    Raises:
        RunFolderError: ``out`` is a file, a non-empty folder that is not a facts folder, or one without ``force``.
        ConfigError: No facts, or a bad setting.
    """
    from tqdm.auto import tqdm

    from ffkv_lens.facts.html import write_facts_report

    if not facts:
        raise ConfigError("no facts to locate; pass a fact file with at least one fact.")
    out = Path(out)
    _claim(out, force)
    paths = FactsPaths(out)
    started = time.perf_counter()
    context = {"atlas": atlas, "corpus": corpus}
    rows, parts = (
        [],
        {name: [] for name in ("memories", "per_prompt", "completeness", "efficacy", "specificity", "audit")},
    )
    for fact in tqdm(facts, desc="facts", unit="fact", disable=not progress):
        others = [f for f in facts if f.id != fact.id][: settings.unrelated]
        known, location, edited = _one_fact(model, fact, others, settings, context)
        rows.append(_summary_row(fact, known, location, edited))
        for name, frame in (("memories", location.memories), ("per_prompt", location.per_prompt),
                            ("completeness", location.completeness), ("efficacy", edited.efficacy),
                            ("specificity", edited.specificity), ("audit", edited.audit)):  # fmt: skip
            parts[name].append((fact.id, frame))
        say(f"{fact.id}: top memory {rows[-1]['top_memory']}, efficacy {rows[-1]['efficacy_prompts_delta_p']:+.3g}")
    paths.tables.mkdir(parents=True, exist_ok=True)
    write_table(pd.DataFrame(rows), paths.table("facts", suffix=""))
    tables = {name: _tagged(frames) for name, frames in parts.items()}
    for name, table in tables.items():
        if len(table):
            write_table(table, paths.table(name, suffix=""))
    _close(plot_attribution_vs_ablation(tables["memories"], out=paths.figure("attribution_vs_ablation")))
    adapter = as_adapter(model)
    manifest = {
        "format": FACTS_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": adapter.describe(),
        "source": source or {},
        "facts": [fact.to_dict() for fact in facts],
        "settings": {**vars(settings), "corpus": None if corpus is None else corpus.name, "audit": atlas is not None},
        "location_settings": location.settings,
        "edit_settings": {k: v for k, v in edited.settings.items() if k != "location"},
        "timings": {"total_s": round(time.perf_counter() - started, 2)},
        "versions": library_versions(),
    }
    atomic_write_json(paths.manifest, manifest)
    write_facts_report(out)
    return out


def _close(fig: Any) -> None:
    import matplotlib.pyplot as plt

    plt.close(fig)
