import numpy as np
import pandas as pd
import pytest

from ffkv_lens.errors import ConfigError
from ffkv_lens.report import (
    plot_agreement,
    plot_composition,
    plot_mutation,
    plot_rank,
    plot_residual,
    plot_residual_breakdown,
)

LAYERS = np.arange(6)


def _frame(**columns) -> pd.DataFrame:
    return pd.DataFrame({"layer": LAYERS, **columns})


def _band(values: np.ndarray, name: str) -> dict:
    return {name: values, f"{name}_ci_low": values - 0.05, f"{name}_ci_high": values + 0.05}


rising = np.linspace(0.0, 0.5, 6)
FRAMES = {
    plot_agreement: _frame(
        **_band(rising / 10, "agreement"),
        agreement_rate=rising / 10,
        baseline_uniform=1e-5,
        baseline_unigram=0.01,
        baseline_permuted=0.002,
    ),
    plot_rank: _frame(**_band(np.linspace(20000, 100, 6), "median_rank")),
    plot_mutation: _frame(
        **_band(-rising, "change_last"), **_band(-rising / 3, "change_first"), **_band(-rising / 2, "change_random")
    ),
    plot_composition: _frame(**_band(rising, "active_fraction"), **_band(0.7 + rising / 2, "no_memory_agrees")),
    plot_residual: _frame(**_band(rising * 2, "resid_matches_final"), resid_prob_final_mean=rising),
    plot_residual_breakdown: _frame(
        frac_residual=0.5, frac_ffn=0.05, frac_agreement=0.2, frac_composition=0.2, frac_other=0.05
    ),
}


@pytest.mark.parametrize("plot", list(FRAMES), ids=lambda f: f.__name__)
@pytest.mark.parametrize("x", ["layer", "relative"])
def test_writes_png_and_svg(plot, x, tmp_path) -> None:
    plot(FRAMES[plot], n_layers=6, x=x, out=tmp_path / "fig")
    assert (tmp_path / "fig.png").stat().st_size > 5000
    assert (tmp_path / "fig.svg").read_text().lstrip().startswith("<?xml")


def test_missing_columns_and_bad_axis_are_named() -> None:
    with pytest.raises(ConfigError, match="change_first"):
        plot_mutation(pd.DataFrame({"layer": LAYERS}))
    # Under the test-time type checker the Literal is refused first; without it, our ConfigError.
    with pytest.raises(Exception, match="'depth'"):
        plot_rank(FRAMES[plot_rank], x="depth")
    with pytest.raises(ConfigError, match="needs n_layers"):
        plot_rank(FRAMES[plot_rank], x="relative")
