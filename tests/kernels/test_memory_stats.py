"""The per-memory statistics kernels: the Numba twin against the torch reference, and the dispatcher.

A stream of blocks goes through both twins from empty states. Integers (counts, histograms, out-of-range
counts), reservoirs (priorities, unit ids, positions, sampled coefficients), minima and maxima must be
equal (tolerance 0); the float64 sums within 1e-12 relative (another summation order). Cases: sizes that
are powers of two and not, ties (coefficients on a coarse grid, many exactly on bin edges), reservoirs
that overflow, empty blocks, float32 and float64.
"""

import pytest
import torch

from ffkv_lens import kernels
from ffkv_lens.kernels import KERNELS_ENV
from ffkv_lens.kernels import memory_stats as ref
from ffkv_lens.kernels.memory_stats import MemoryStatsState

nb = pytest.importorskip("ffkv_lens.kernels.memory_stats_numba")

CASES = {
    "d7-n13-float32": dict(d_mlp=7, sizes=[13, 0, 5], bins=5, samples=3, dtype=torch.float32, grid=None),
    "d64-n256-float64-ties": dict(d_mlp=64, sizes=[256, 256], bins=8, samples=2, dtype=torch.float64, grid=0.25),
    "d33-n1000-float32-ties": dict(d_mlp=33, sizes=[1000, 1, 999], bins=16, samples=4, dtype=torch.float32, grid=0.5),
    "d1-n0-float64-empty": dict(d_mlp=1, sizes=[0, 0], bins=4, samples=1, dtype=torch.float64, grid=None),
}
LO, HI, THRESHOLD = -2.0, 4.0, 0.5


def _blocks(case: dict) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)
    out, unit = [], 0
    for n in case["sizes"]:
        m = torch.randn(n, case["d_mlp"], generator=gen, dtype=torch.float64) * 2 + 0.5  # some outside [LO, HI]
        if case["grid"]:
            m = torch.round(m / case["grid"]) * case["grid"]
        units = unit + torch.randint(0, max(n // 3, 1), (n,), generator=gen)
        positions = torch.randint(1, 40, (n,), generator=gen)
        out.append((m.to(case["dtype"]), units, positions))
        unit += n
    return out


def _run(module, case: dict) -> MemoryStatsState:
    state = MemoryStatsState.empty(case["d_mlp"], case["bins"], case["samples"], dtype=case["dtype"])
    for m, units, positions in _blocks(case):
        module.update_memory_stats(state, m, units, positions, lo=LO, hi=HI, threshold=THRESHOLD, salt=12345)
    return state


def assert_states_equal(got: MemoryStatsState, want: MemoryStatsState) -> None:
    for name in MemoryStatsState._fields:
        a, b = getattr(got, name), getattr(want, name)
        if name in ("sums", "squares"):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
        else:
            assert torch.equal(a, b), f"{name} differs"


@pytest.mark.parametrize("name", list(CASES))
def test_numba_equals_reference(name: str) -> None:
    case = CASES[name]
    want = _run(ref, case)
    assert_states_equal(_run(nb, case), want)
    total = sum(case["sizes"])
    assert int(want.count[0]) == total and bool((want.hist.sum(1) == total).all())
    filled = want.priority != ref.EMPTY
    assert bool((filled == (want.units >= 0)).all())


def test_reservoir_is_the_lowest_priorities_of_each_bin() -> None:
    case = CASES["d33-n1000-float32-ties"]
    state = _run(ref, case)
    m, units, positions = (torch.cat(parts) for parts in zip(*_blocks(case), strict=True))
    prio = ref.priorities(12345, units, positions, case["d_mlp"])
    bins = ref.bin_index(m, LO, HI, case["bins"])
    for key in (0, 5, 32):
        for b in range(case["bins"]):
            rows = (bins[:, key] == b).nonzero().squeeze(1)
            want = prio[rows, key].sort().values[: case["samples"]]
            got = state.priority[key, b]
            assert torch.equal(got[got != ref.EMPTY], want), f"key {key} bin {b}"


def test_dispatch_follows_the_kernel_choice(monkeypatch) -> None:
    case = CASES["d7-n13-float32"]
    calls = []
    monkeypatch.setattr(nb, "update_memory_stats", lambda *a, **k: calls.append("numba"))
    state = MemoryStatsState.empty(7, 5, 3)
    m, units, positions = _blocks(case)[0]
    kernels.update_memory_stats(state, m, units, positions, lo=LO, hi=HI, threshold=THRESHOLD, salt=1)
    assert calls == ["numba"]
    monkeypatch.setenv(KERNELS_ENV, "reference")
    kernels.update_memory_stats(state, m, units, positions, lo=LO, hi=HI, threshold=THRESHOLD, salt=1)
    assert calls == ["numba"] and int(state.count[0]) == 13
