"""Markdown tables of docs/reproduction.md from a finished ``ffkv-lens run`` folder.

Reads the run's ``tables/*.csv`` and ``manifest.json`` (nothing is recomputed) and prints one table
per paper figure, in the layout of docs/reproduction.md, plus the step times.

Usage:
    python docs/tools/reproduction_tables.py runs/smollm2-135m-default > tables.md
"""

import argparse
import json
import sys
from pathlib import Path

import pandas as pd


def pct(x: float) -> str:
    """A fraction as a percentage with one decimal."""
    return f"{100 * x:.1f}"


def ci(low: float, high: float) -> str:
    """A 95% interval in percent."""
    return f"[{pct(low)}, {pct(high)}]"


def table(header: list[str], rows: list[list[str]]) -> str:
    """A right-aligned markdown table."""
    align = ["---:"] * len(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def mutation(tables: Path) -> str:
    """Fig 3."""
    frame = pd.read_csv(tables / "mutation_per_layer.csv")
    rows = [
        [str(r.layer), pct(r.change_first), pct(r.change_last), ci(r.change_last_ci_low, r.change_last_ci_high),
         pct(r.change_random), pct(r.shallow_fraction), f"{r.n_keys} x {r.n_examples / max(r.n_keys, 1):.0f}"]
        for r in frame.itertuples()
    ]  # fmt: skip
    header = ["layer", "first", "last", "last 95% CI", "random", "shallow keys %", "keys x examples/key"]
    return "**Fig 3: mean relative change of the coefficient, % (mutation)**\n\n" + table(header, rows)


def agreement(tables: Path) -> str:
    """Fig 4-5, with the signed variant's rate when the run has it."""
    frame = pd.read_csv(tables / "agreement_per_layer.csv")
    signed_path = tables / "agreement_signed_per_layer.csv"
    signed = pd.read_csv(signed_path).set_index("layer") if signed_path.exists() else None
    rows = []
    for r in frame.itertuples():
        row = [str(r.layer), pct(r.agreement_rate), ci(r.agreement_ci_low, r.agreement_ci_high),
               f"{r.median_rank:,.0f}", pct(r.mean_precision_at_k), pct(r.baseline_unigram),
               pct(r.baseline_permuted)]  # fmt: skip
        if signed is not None:
            row.append(pct(signed.loc[r.layer, "agreement_rate"]))
        rows.append(row)
    header = ["layer", "agreement", "95% CI", "median rank", "precision@k", "unigram", "permuted"]
    if signed is not None:
        header.append("signed variant")
    uniform = frame.baseline_uniform.iloc[0]
    title = f"**Fig 4-5: agreement % and median rank** (uniform baseline 1/|V| = {100 * uniform:.4f}%)"
    return title + "\n\n" + table(header, rows)


def composition(tables: Path) -> str:
    """Fig 7-8."""
    frame = pd.read_csv(tables / "composition_per_layer.csv")
    rows = [
        [str(r.layer), f"{r.active_mean:,.0f}", pct(r.active_fraction), pct(r.no_memory_agrees),
         pct(r.agree_stopword_share), pct(r.agree_short_prefix_share)]
        for r in frame.itertuples()
    ]  # fmt: skip
    header = ["layer", "active mean", "active %", "no memory agrees %", "stop-word share %", "short-prefix share %"]
    return "**Fig 7-8: composition**\n\n" + table(header, rows)


def residual(tables: Path) -> str:
    """Fig 9-11."""
    frame = pd.read_csv(tables / "residual_per_layer.csv")
    rows = [
        [str(r.layer), pct(r.resid_matches_final), f"{r.resid_prob_final_median:.3f}", f"{r.resid_prob_final_mean:.3f}",
         pct(r.frac_residual), pct(r.frac_ffn), pct(r.frac_agreement), pct(r.frac_composition), pct(r.frac_other)]
        for r in frame.itertuples()
    ]  # fmt: skip
    header = ["layer", "top(r)=final %", "p(final\\|r) median", "mean", "residual %", "ffn %", "agreement %",
              "composition %", "other %"]  # fmt: skip
    return "**Fig 9-11: residual vs FFN**\n\n" + table(header, rows)


def step_times(folder: Path) -> str:
    """Each step's wall time from the run's manifest."""
    steps = json.loads((folder / "manifest.json").read_text())["steps"]
    return ", ".join(f"{name} {info['seconds']:.0f} s" for name, info in steps.items() if "seconds" in info)


def main(argv: list[str] | None = None) -> int:
    """Print the tables of one run folder."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a finished ffkv-lens run folder")
    args = parser.parse_args(argv)
    tables = args.run / "tables"
    parts = [f"Step times: {step_times(args.run)}.", mutation(tables), agreement(tables), composition(tables),
             residual(tables)]  # fmt: skip
    sys.stdout.write("\n\n".join(parts) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
