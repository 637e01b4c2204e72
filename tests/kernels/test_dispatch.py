"""One decision point: every operation of ``ffkv_lens.kernels`` validates FFKV_LENS_KERNELS and honours it.

No numbers are compared here (the parity tests of each operation do that): these tests record which
twin ran, and check that an invalid value raises on every operation and that no other part of the
package reads the variable.
"""

from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

from ffkv_lens import kernels
from ffkv_lens.adapters.tl_model import ReadoutParts
from ffkv_lens.errors import ConfigError
from ffkv_lens.kernels import KERNELS_ENV, TopKState, readouts, readouts_tiled, topk, value_stats

PACKAGE = Path(kernels.__file__).resolve().parents[1]
needs_numba = pytest.mark.skipif(find_spec("numba") is None, reason="needs numba")


class TinyReadout:
    """A model with a plain matrix readout (``with_parts``: tiled twin applies; else reference only)."""

    final_norm_centres = False

    def __init__(self, with_parts: bool) -> None:
        self.w_u = torch.randn(4, 9, generator=torch.Generator().manual_seed(0))
        self.d_model, self.d_vocab = self.w_u.shape
        self.with_parts = with_parts

    def readout_parts(self) -> ReadoutParts | None:
        return ReadoutParts(lambda x: x, self.w_u, None, None) if self.with_parts else None

    def final_norm_gain(self) -> None:
        return None

    def readout(self, resid: torch.Tensor) -> torch.Tensor:
        return resid @ self.w_u


def _topk_args() -> tuple[TopKState, torch.Tensor, torch.Tensor, torch.Tensor]:
    m = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1))
    return TopKState.empty(4, 2), m, torch.ones(2, 3, dtype=torch.bool), torch.tensor([0, 1])


def _states() -> tuple[torch.Tensor, ...]:
    r, y = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(2))
    return r, y, r + y, torch.tensor([0, 8, 3, 1, 2])


OPERATIONS: dict[str, Callable[[], object]] = {
    "reduce_units": lambda: kernels.reduce_units(*_topk_args()[1:3]),
    "merge_topk": lambda: kernels.merge_topk(
        TopKState.empty(4, 2), torch.ones(1, 4), torch.zeros(1, 4).long(), torch.tensor([0])
    ),  # fmt: skip
    "batch_candidates": lambda: kernels.batch_candidates(*_topk_args()),
    "update_topk": lambda: kernels.update_topk(*_topk_args()),
    "update_topk_signed": lambda: kernels.update_topk_signed(TopKState.empty(4, 2), *_topk_args()),
    "grouped_merge_units": lambda: kernels.grouped_merge_units("cpu"),
    "value_row_stats": lambda: kernels.value_row_stats(torch.randn(3, 20), 4, {1: torch.tensor([0, 1, -1])}),
    "state_tops": lambda: kernels.state_tops(TinyReadout(True), *_states()),
    "state_tops_no_parts": lambda: kernels.state_tops(TinyReadout(False), *_states()),
    "state_top": lambda: kernels.state_top(TinyReadout(True), _states()[0]),
    "state_top_no_parts": lambda: kernels.state_top(TinyReadout(False), _states()[0]),
}


@pytest.mark.parametrize("operation", list(OPERATIONS))
def test_an_invalid_value_raises_on_every_operation(operation: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KERNELS_ENV, "fastest")
    with pytest.raises(ConfigError, match=r"'fastest' is not one of \['auto', 'reference', 'numba', 'triton'\]"):
        OPERATIONS[operation]()
    monkeypatch.setenv(KERNELS_ENV, " Reference ")  # case and blanks are forgiven
    OPERATIONS[operation]()


def _record(monkeypatch: pytest.MonkeyPatch, module: object, name: str, label: str, calls: list[str]) -> None:
    original = getattr(module, name)

    def recorded(*args: object, **kwargs: object) -> object:
        calls.append(label)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, recorded)


# operation -> (module and function of each implementation it may run, keyed by label)
TWINS = {
    "reduce_units": {"reference": (topk, "reduce_units"), "numba": ("topk_numba", "reduce_units")},
    "merge_topk": {"reference": (topk, "merge_topk"), "numba": ("topk_numba", "merge_topk")},
    "batch_candidates": {"reference": (topk, "batch_candidates"), "numba": ("topk_numba", "batch_candidates")},
    "update_topk": {"reference": (topk, "update_topk"), "numba": ("topk_numba", "update_topk")},
    "update_topk_signed": {"reference": (topk, "update_topk_signed"), "numba": ("topk_numba", "update_topk_signed")},
    "value_row_stats": {
        "reference": (value_stats, "value_row_stats"),
        "numba": ("value_stats_numba", "value_row_stats"),
    },
    "state_tops": {"reference": (readouts, "state_tops"), "tiled": (readouts_tiled, "state_tops")},
    "state_top": {"reference": (readouts, "state_top"), "tiled": (readouts_tiled, "state_top")},
}
# What each forced value runs on the CPU (the readouts have no Numba twin: numba keeps their tiled pass).
EXPECTED = {
    "reference": {op: "reference" for op in TWINS},
    "numba": {**{op: "numba" for op in TWINS}, "state_tops": "tiled", "state_top": "tiled"},
}


@needs_numba
@pytest.mark.parametrize("forced", list(EXPECTED))
@pytest.mark.parametrize("operation", list(TWINS))
def test_each_operation_honours_the_forced_value(operation: str, forced: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    for label, (module, name) in TWINS[operation].items():
        if isinstance(module, str):
            module = kernels.numba_module(module.removesuffix("_numba"))
        _record(monkeypatch, module, name, label, calls)
    monkeypatch.setenv(KERNELS_ENV, forced)
    OPERATIONS[operation]()
    assert calls[:1] == [EXPECTED[forced][operation]], calls  # the first call is the twin chosen


def test_the_merge_policy_groups_on_the_cpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    for forced in ("auto", "reference", "numba"):
        monkeypatch.setenv(KERNELS_ENV, forced)
        assert kernels.grouped_merge_units("cpu") == 64
        assert kernels.grouped_merge_units("cuda") is None


def test_only_kernels_read_the_variable() -> None:
    """The string FFKV_LENS_KERNELS appears in the package only under ffkv_lens/kernels/."""
    holders = sorted(
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*")
        if path.is_file() and path.suffix in (".py", ".html", ".md", ".txt", ".toml", ".json")
        and "FFKV_LENS_KERNELS" in path.read_text(encoding="utf-8", errors="replace")
    )  # fmt: skip
    assert holders and all(name.startswith("kernels/") for name in holders), holders
