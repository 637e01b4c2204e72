"""Per-layer figures in the style of Geva et al. 2021, with confidence bands and baselines.

Every function takes the per-layer DataFrame of one analysis, returns a matplotlib ``Figure``
and, with ``out``, writes ``<out>.png`` and ``<out>.svg``. ``x="relative"`` puts relative depth
``(layer + 1) / n_layers`` on the x-axis so models of different depth overlay. :data:`FIGURES`
names a run folder's figures and the tables they are drawn from; :func:`write_figures` draws them
(the run's ``figures`` step, and ``ffkv-lens report`` for those :func:`missing_figures` finds).

Example:
    >>> from ffkv_lens.report import plot_agreement  # doctest: +SKIP
    >>> plot_agreement(result.per_layer, n_layers=30, out="runs/fig_agreement")  # doctest: +SKIP
"""

import math
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ffkv_lens.errors import ConfigError
from ffkv_lens.storage.layout import RunPaths

__all__ = [
    "FIGURES",
    "missing_figures",
    "plot_agreement",
    "plot_causal",
    "plot_composition",
    "plot_mutation",
    "plot_rank",
    "plot_residual",
    "plot_residual_breakdown",
    "save_figure",
    "write_figures",
]

XAxis = Literal["layer", "relative"]
_PALETTE = ("#1f5fa8", "#d1495b", "#2e8b57", "#8a5cc2", "#e08e0b", "#555555")


def _figure(title: str) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    return fig, ax


def _x(ax: Any, frame: Any, n_layers: int | None, x: XAxis) -> Any:
    """The x values of ``frame``'s layers, with the axis labelled (integer ticks for layers)."""
    if x not in ("layer", "relative"):
        raise ConfigError(f"x={x!r}; allowed: 'layer', 'relative'.")
    layers = frame["layer"].to_numpy()
    if x == "layer":
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer")
        return layers
    if not n_layers:
        raise ConfigError("x='relative' needs n_layers (the model's number of layers).")
    ax.set_xlabel("relative depth (layer + 1) / n_layers")
    return (layers + 1) / n_layers


def _require(frame: Any, columns: list[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ConfigError(f"{what} needs columns {missing}; got {list(frame.columns)}.")


def _line(ax: Any, xs: Any, frame: Any, column: str, label: str, color: str, band: bool = True) -> None:
    ax.plot(xs, frame[column], marker="o", ms=3, lw=1.5, label=label, color=color)
    low, high = f"{column}_ci_low", f"{column}_ci_high"
    if band and low in frame.columns and high in frame.columns:
        ax.fill_between(xs, frame[low], frame[high], color=color, alpha=0.2, lw=0)


def save_figure(fig: Any, out: str | Path | None) -> Any:
    """Write ``fig`` as ``out.png`` and ``out.svg`` (when ``out`` is given) and return it."""
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        for suffix in (".png", ".svg"):
            fig.savefig(out.with_suffix(suffix))
    return fig


def plot_agreement(frame: Any, *, n_layers: int | None = None, x: XAxis = "layer", out: Any = None) -> Any:
    """Fig 4: agreement rate per layer (top token of value == next token of top trigger), with baselines."""
    _require(frame, ["layer", "agreement_rate"], "plot_agreement")
    fig, ax = _figure("Value top token = next token of the key's top trigger example")
    xs = _x(ax, frame, n_layers, x)
    ax.plot(xs, frame["agreement_rate"] * 100, marker="o", ms=3, color=_PALETTE[0], label="agreement")
    if "agreement_ci_low" in frame.columns:
        ax.fill_between(
            xs, frame["agreement_ci_low"] * 100, frame["agreement_ci_high"] * 100, color=_PALETTE[0], alpha=0.2
        )
    for i, (column, name) in enumerate(
        [("baseline_permuted", "keys/values permuted"), ("baseline_unigram", "unigram"), ("baseline_uniform", "1/|V|")]
    ):
        if column in frame.columns:
            ax.plot(xs, frame[column] * 100, ls="--", lw=1, color=_PALETTE[i + 1], label=name)
    ax.set_ylabel("agreement rate (%)")
    ax.legend(fontsize=8)
    return save_figure(fig, out)


def plot_causal(frame: Any, *, n_layers: int | None = None, x: XAxis = "layer", out: Any = None) -> Any:
    """Correlational vs causal agreement per layer (left) and the mean effect of memories vs controls (right).

    Left: the share of sampled memories whose value token is their top trigger's next token
    (correlational) and the share whose ablation lowers log p(next token) more than their matched
    control's (causal, 95% band); 50% is what a memory no more causal than its control scores.
    Right: mean total effect on log p(next token) of the memories and of their controls, 95% bands.
    """
    _require(frame, ["layer", "share_beats_control", "correlational_agreement", "total_next"], "plot_causal")
    fig, (left, right) = _figure_pair("Correlational vs causal agreement", "Effect of zeroing a memory on its trigger")
    xs = _x(left, frame, n_layers, x)
    _x(right, frame, n_layers, x)
    percent = frame.assign(**{c: frame[c] * 100 for c in frame.columns if c.startswith("share_beats_control")})
    _line(left, xs, percent, "share_beats_control", "causal: beats its control", _PALETTE[0])
    left.plot(xs, frame["correlational_agreement"] * 100, marker="s", ms=3, lw=1.5, color=_PALETTE[1],
              label="correlational: value token = next token")  # fmt: skip
    left.axhline(50, color="grey", ls="--", lw=1, label="no more causal than the control (50%)")
    left.set_ylim(-2, 102)
    left.set_ylabel("share of sampled memories (%)")
    left.legend(fontsize=7)
    _line(right, xs, frame, "total_next", "memory", _PALETTE[0])
    if "control_total_next" in frame.columns:
        _line(right, xs, frame, "control_total_next", "matched control", _PALETTE[5])
    right.axhline(0, color="black", lw=0.8)
    right.set_ylabel("log p(next) clean - ablated")
    right.legend(fontsize=7)
    return save_figure(fig, out)


def _figure_pair(left_title: str, right_title: str) -> tuple[Any, tuple[Any, Any]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.6), dpi=110)
    for ax, title in zip(axes, (left_title, right_title), strict=True):
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    return fig, (axes[0], axes[1])


def plot_rank(frame: Any, *, n_layers: int | None = None, x: XAxis = "layer", out: Any = None) -> Any:
    """Fig 5: median rank of the top trigger's next token in the value's distribution."""
    _require(frame, ["layer", "median_rank"], "plot_rank")
    fig, ax = _figure("Rank of the trigger's next token in the value's distribution")
    xs = _x(ax, frame, n_layers, x)
    _line(ax, xs, frame, "median_rank", "median rank", _PALETTE[0])
    top = float(np.nanmax(frame["median_rank"].to_numpy(dtype=float), initial=1.0))
    if "baseline_uniform" in frame and frame["baseline_uniform"].notna().any():
        middle = 0.5 / float(frame["baseline_uniform"].dropna().iloc[0])  # |V| / 2: a value unrelated to the token
        ax.axhline(middle, color="grey", ls="--", lw=1, label="random (|V| / 2)")
        top = max(top, middle)
        ax.legend(fontsize=8)
    ax.set_yscale("symlog")
    # Whole decades, from 0: a range inside one decade would otherwise get no tick labels.
    ax.set_ylim(0, 10 ** math.ceil(math.log10(max(top, 1.0) + 1)))
    ax.set_ylabel("median rank (0 = top)")
    return save_figure(fig, out)


def plot_mutation(frame: Any, *, n_layers: int | None = None, x: XAxis = "layer", out: Any = None) -> Any:
    """Fig 3: relative change of the key's coefficient after removing the first, last or a random token."""
    _require(frame, ["layer", "change_first", "change_last", "change_random"], "plot_mutation")
    fig, ax = _figure("Coefficient change after removing one token of the trigger prefix")
    xs = _x(ax, frame, n_layers, x)
    for i, (column, name) in enumerate(
        [("change_first", "first token"), ("change_last", "last token"), ("change_random", "random token")]
    ):
        _line(ax, xs, frame, column, name, _PALETTE[i])
    ax.axhline(0, color="black", lw=0.8)
    ax.set_ylabel("mean relative change")
    ax.legend(fontsize=8)
    return save_figure(fig, out)


def plot_composition(frame: Any, *, n_layers: int | None = None, x: XAxis = "layer", out: Any = None) -> Any:
    """Fig 7-8: share of active memories, and how often no active memory agrees with the layer."""
    _require(frame, ["layer", "active_fraction", "no_memory_agrees"], "plot_composition")
    fig, ax = _figure("Composition within a layer")
    xs = _x(ax, frame, n_layers, x)
    _line(ax, xs, frame, "active_fraction", "active memories (share of d_mlp)", _PALETTE[0])
    _line(ax, xs, frame, "no_memory_agrees", "no active memory agrees with the layer", _PALETTE[1])
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("fraction")
    ax.legend(fontsize=8)
    return save_figure(fig, out)


def plot_residual(frame: Any, *, n_layers: int | None = None, x: XAxis = "layer", out: Any = None) -> Any:
    """Fig 9-10: how often the residual's top token is the final prediction, and its probability."""
    _require(frame, ["layer", "resid_matches_final"], "plot_residual")
    fig, ax = _figure("Residual entering the FFN vs the model's final prediction")
    xs = _x(ax, frame, n_layers, x)
    _line(ax, xs, frame, "resid_matches_final", "top(r) = final prediction", _PALETTE[0])
    for i, column in enumerate(["resid_prob_final_mean", "resid_prob_final_median"]):
        if column in frame.columns:
            _line(ax, xs, frame, column, column.replace("resid_prob_final_", "p(final | r), "), _PALETTE[i + 1])
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("fraction / probability")
    ax.legend(fontsize=8)
    return save_figure(fig, out)


def plot_residual_breakdown(frame: Any, *, n_layers: int | None = None, x: XAxis = "layer", out: Any = None) -> Any:
    """Fig 11: what each layer's update does to the residual's prediction (stacked shares)."""
    buckets = ["frac_residual", "frac_ffn", "frac_agreement", "frac_composition", "frac_other"]
    _require(frame, ["layer", *buckets], "plot_residual_breakdown")
    fig, ax = _figure("top(o) vs top(r) and top(y), o = r + y")
    xs = _x(ax, frame, n_layers, x)
    ax.stackplot(xs, *[frame[b] for b in buckets], labels=[b[5:] for b in buckets], colors=_PALETTE[:5], alpha=0.85)
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of positions")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return save_figure(fig, out)


# A run folder's figures: figure name -> (plot function, the table of ``tables/`` it is drawn from).
FIGURES = {
    "agreement": (plot_agreement, "agreement_per_layer"),
    "rank": (plot_rank, "agreement_per_layer"),
    "causal": (plot_causal, "causal_per_layer"),
    "mutation": (plot_mutation, "mutation_per_layer"),
    "composition": (plot_composition, "composition_per_layer"),
    "residual": (plot_residual, "residual_per_layer"),
    "residual_breakdown": (plot_residual_breakdown, "residual_per_layer"),
}


def missing_figures(folder: str | Path) -> list[str]:
    """Figures of a run folder whose table exists but whose PNG or SVG does not."""
    paths = RunPaths(Path(folder))
    return [
        name
        for name, (_, table) in FIGURES.items()
        if paths.table(table).exists() and not all(paths.figure(name, s).exists() for s in (".png", ".svg"))
    ]


def write_figures(folder: str | Path, n_layers: int | None) -> dict[str, Any]:
    """Draw every figure of a run folder from its tables (layer and relative-depth x-axes).

    Returns:
        ``{"figures": [names drawn]}`` (the run step's record in the manifest).
    """
    import pandas as pd

    paths = RunPaths(Path(folder))
    written = []
    for name, (plot, table) in FIGURES.items():
        path = paths.table(table)
        if not path.exists():
            continue
        plot(pd.read_csv(path), n_layers=n_layers, out=paths.figure(name))
        written.append(name)
        import matplotlib.pyplot as plt

        plt.close("all")
    return {"figures": written}
