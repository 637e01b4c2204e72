"""Reports: figures in the style of the paper (matplotlib, PNG + SVG) and the run folder's ``report.html``."""

from ffkv_lens.report.figures import (
    plot_agreement,
    plot_causal,
    plot_composition,
    plot_mutation,
    plot_rank,
    plot_residual,
    plot_residual_breakdown,
    save_figure,
)
from ffkv_lens.report.html import write_report
from ffkv_lens.report.memories import RunFolder

__all__ = [
    "RunFolder",
    "plot_agreement",
    "plot_causal",
    "plot_composition",
    "plot_mutation",
    "plot_rank",
    "plot_residual",
    "plot_residual_breakdown",
    "save_figure",
    "write_report",
]
