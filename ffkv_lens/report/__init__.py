"""Reports: figures in the style of the paper (matplotlib, PNG + SVG)."""

from ffkv_lens.report.figures import (
    plot_agreement,
    plot_composition,
    plot_mutation,
    plot_rank,
    plot_residual,
    plot_residual_breakdown,
    save_figure,
)

__all__ = [
    "plot_agreement",
    "plot_composition",
    "plot_mutation",
    "plot_rank",
    "plot_residual",
    "plot_residual_breakdown",
    "save_figure",
]
