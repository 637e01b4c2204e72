"""Per-layer analyses of several runs as one tidy table, overlaid by relative depth.

:func:`tidy_curves` reads each run folder's per-layer tables (agreement, mutation,
composition, residual) into rows ``(run, model, layer, relative_depth, analysis, metric,
value, ci_low, ci_high)``; relative depth is ``(layer + 1) / n_layers`` (layers counted from 1,
as in the run tables), so the last layer of every model sits at 1. :func:`plot_overlay` draws
one metric of every run on that axis with its 95% band.

Example:
    >>> frame = tidy_curves({"smollm2": RunFolder("runs/a"), "gemma3": RunFolder("runs/b")})  # doctest: +SKIP
    >>> plot_overlay(frame, "agreement", "agreement_rate", out="cmp/figures/agreement_rate")  # doctest: +SKIP
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ffkv_lens.report.figures import _PALETTE, _figure, save_figure
from ffkv_lens.report.memories import RunFolder

__all__ = ["CURVES", "Curve", "plot_overlay", "tidy_curves"]

TIDY_COLUMNS = ["run", "model", "layer", "relative_depth", "analysis", "metric", "value", "ci_low", "ci_high"]


@dataclass(frozen=True)
class Curve:
    """One overlaid figure: a metric of a run table.

    Attributes:
        name: Figure file name (without suffix).
        table: The run table it reads (``tables/<table>.csv``).
        metric: The column.
        title: Figure title.
        ylabel: y-axis label.
        log: Log-scaled y-axis.
        paper: The paper's figure it corresponds to.
    """

    name: str
    table: str
    metric: str
    title: str
    ylabel: str
    log: bool = False
    paper: str = ""


CURVES = (
    Curve("agreement_rate", "agreement_per_layer", "agreement_rate", "Value top token = next token of top trigger",
          "agreement rate", paper="Fig 4"),
    Curve("median_rank", "agreement_per_layer", "median_rank", "Rank of the next token in the value's distribution",
          "median rank (0 = top)", log=True, paper="Fig 5"),
    Curve("precision_at_k", "agreement_per_layer", "mean_precision_at_k", "Mean precision@k of values",
          "mean precision@k", paper="Table 2"),
    Curve("change_last", "mutation_per_layer", "change_last", "Coefficient change when the last token is removed",
          "mean relative change", paper="Fig 3"),
    Curve("change_first", "mutation_per_layer", "change_first", "Coefficient change when the first token is removed",
          "mean relative change", paper="Fig 3"),
    Curve("shallow_fraction", "mutation_per_layer", "shallow_fraction", "Share of shallow keys (mutation test)",
          "shallow fraction", paper="Fig 3"),
    Curve("active_fraction", "composition_per_layer", "active_fraction", "Share of memories active at a position",
          "active fraction", paper="Fig 7"),
    Curve("no_memory_agrees", "composition_per_layer", "no_memory_agrees",
          "Layer prediction matches no active memory", "fraction of positions", paper="Fig 8"),
    Curve("resid_matches_final", "residual_per_layer", "resid_matches_final",
          "Residual's top token = final prediction", "fraction of positions", paper="Fig 9"),
    Curve("frac_residual", "residual_per_layer", "frac_residual", "FFN update keeps the residual's prediction",
          "fraction of positions", paper="Fig 11"),
    Curve("frac_composition", "residual_per_layer", "frac_composition",
          "FFN update yields a third token (composition)", "fraction of positions", paper="Fig 11"),
)  # fmt: skip


def tidy_curves(runs: dict[str, RunFolder]) -> pd.DataFrame:
    """Every numeric column of every run's per-layer tables, one row per (run, layer, metric).

    A metric with ``<metric>_ci_low`` / ``_ci_high`` columns carries them (``agreement_rate``:
    ``agreement_ci_*``); counts and settings
    columns (``n_*``, ``depth``) are left out. Tables a run does not have are skipped.

    Args:
        runs: Run label -> run folder.

    Returns:
        A DataFrame with columns :data:`TIDY_COLUMNS`.
    """
    frames = []
    tables = dict.fromkeys(c.table for c in CURVES)
    for label, run in runs.items():
        n_layers = int(run.manifest["layout"]["n_layers"])
        model = str(run.manifest["config"]["model"])
        for table in tables:
            frame = run.table(table)
            if frame is None:  # the step did not run
                continue
            metrics = [
                c for c in frame.columns
                if c not in ("layer", "depth", "relative_depth") and not c.startswith("n_")
                and not c.endswith(("_ci_low", "_ci_high")) and pd.api.types.is_numeric_dtype(frame[c])
            ]  # fmt: skip
            for metric in metrics:
                stem = _ci_stem(frame, metric)
                low = frame[f"{stem}_ci_low"] if stem else pd.Series(np.nan, index=frame.index)
                high = frame[f"{stem}_ci_high"] if stem else pd.Series(np.nan, index=frame.index)
                frames.append(
                    pd.DataFrame(
                        {
                            "run": label,
                            "model": model,
                            "layer": frame["layer"].astype(int),
                            "relative_depth": (frame["layer"].astype(int) + 1) / n_layers,
                            "analysis": table.removesuffix("_per_layer"),
                            "metric": metric,
                            "value": frame[metric].astype(float),
                            "ci_low": low.astype(float),
                            "ci_high": high.astype(float),
                        }
                    )  # fmt: skip
                )
    if not frames:
        return pd.DataFrame(columns=TIDY_COLUMNS)
    return pd.concat(frames, ignore_index=True)[TIDY_COLUMNS]


def _ci_stem(frame: pd.DataFrame, metric: str) -> str | None:
    """The prefix of a metric's CI columns (``agreement_rate`` has ``agreement_ci_*``), or None."""
    for stem in (metric, metric.removesuffix("_rate")):
        if f"{stem}_ci_low" in frame.columns and f"{stem}_ci_high" in frame.columns:
            return stem
    return None


def plot_overlay(frame: pd.DataFrame, curve: Curve, *, note: str | None = None, out: str | Path | None = None) -> Any:
    """One metric of every run against relative depth, with 95% bands where the table has them.

    Args:
        frame: :func:`tidy_curves` output.
        curve: What to draw.
        note: A line under the title (e.g. that the runs used different corpora).
        out: Write ``<out>.png`` and ``<out>.svg``.

    Returns:
        The matplotlib figure, or None when no run has the metric.
    """
    rows = frame[(frame["analysis"] == curve.table.removesuffix("_per_layer")) & (frame["metric"] == curve.metric)]
    if rows.empty:
        return None
    title = f"{curve.title} ({curve.paper})" if curve.paper else curve.title
    fig, ax = _figure(title if note is None else f"{title}\n{note}")
    for color, (label, group) in zip(_PALETTE * 4, rows.groupby("run", sort=False), strict=False):
        group = group.sort_values("relative_depth")
        xs = group["relative_depth"].to_numpy()
        ax.plot(xs, group["value"].to_numpy(), marker="o", ms=3, lw=1.5, color=color, label=label)
        if group["ci_low"].notna().any():
            ax.fill_between(xs, group["ci_low"].to_numpy(), group["ci_high"].to_numpy(), color=color, alpha=0.18,
                            lw=0)  # fmt: skip
    if curve.log:
        ax.set_yscale("symlog", linthresh=1.0)
    ax.set_xlabel("relative depth (layer + 1) / n_layers")
    ax.set_ylabel(curve.ylabel)
    ax.set_xlim(0, 1.02)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, out)
