"""Per-row statistics of value logits: the dispatcher (forced to each implementation) and the Numba twin
against the torch reference (the definition).

Token ids, top/bottom logits and rank counts must be equal exactly (tolerance 0). ``max_prob`` is summed
in float64 by the twin and in float32 by the reference: they must agree within 1e-6 relative, and the
twin must be within 1e-9 of a float64 ``torch.logsumexp`` (float64 inputs) or 1e-6 (float32 inputs).
"""

import pytest
import torch

from ffkv_lens.kernels import KERNELS_ENV
from ffkv_lens.kernels import value_row_stats as row_stats
from ffkv_lens.kernels.softmax import EXP_FLOOR
from ffkv_lens.kernels.value_stats import value_row_stats as row_stats_reference

nb = pytest.importorskip("ffkv_lens.kernels.value_stats_numba")


def _logits(n: int, v: int, dtype: torch.dtype, ties: bool, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, v, generator=g, dtype=torch.float64) * 4
    if ties:  # few distinct values: ties everywhere, also across the k-th place
        x = x.round()
    return x.to(dtype)


def _targets(n: int, v: int, seed: int) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, v, (2, n), generator=g)
    ids[:, ::5] = -1  # memories without a target
    return {1: ids[0], -1: ids[1]}


def _assert_same(fused: tuple, reference: tuple, rtol: float = 1e-6) -> None:
    (values, ranks), (ref_values, ref_ranks) = fused, reference
    for name, got, want in zip(("top_ids", "top", "bottom_ids", "bottom"), values[:4], ref_values[:4], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True, msg=name)  # exact, NaN == NaN
    torch.testing.assert_close(values[4], ref_values[4], rtol=rtol, atol=0, equal_nan=True)
    assert ranks.keys() == ref_ranks.keys()
    for sign in ranks:
        assert torch.equal(ranks[sign], ref_ranks[sign]), sign


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize(("n", "v", "k"), [(7, 1000, 10), (3, 37, 26), (5, 12, 12), (4, 9, 30), (2, 1, 1)])
@pytest.mark.parametrize("forced", ["numba", "reference"])
def test_fused_equals_reference(dtype, ties, n, v, k, forced, monkeypatch) -> None:
    monkeypatch.setenv(KERNELS_ENV, forced)
    logits = _logits(n, v, dtype, ties, seed=n * v + k)
    targets = _targets(n, v, seed=k)
    _assert_same(row_stats(logits, k, targets), row_stats_reference(logits, k, targets))


def test_max_prob_against_float64_logsumexp(monkeypatch) -> None:
    monkeypatch.setenv(KERNELS_ENV, "numba")
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-6)):
        logits = _logits(6, 50_000, dtype, ties=False, seed=3)
        (_, top, _, _, max_prob), _ = row_stats(logits, 5, {})
        exact = (top[:, 0].double() - logits.double().logsumexp(-1)).exp()
        torch.testing.assert_close(max_prob.double(), exact, rtol=tol, atol=0)


@pytest.mark.parametrize("forced", ["numba", "reference"])
def test_infinities_nan_rows_and_no_targets(forced, monkeypatch) -> None:
    monkeypatch.setenv(KERNELS_ENV, forced)
    logits = _logits(5, 40, torch.float32, ties=True, seed=9)
    logits[0, 3] = float("-inf")
    logits[1, :] = float("-inf")  # every logit -inf: NaN max probability, as in torch
    logits[2, 7] = float("nan")  # left to the reference (torch.topk puts NaN first)
    logits[3, 11] = float("inf")
    logits[4, [0, 39]] = float("nan")
    targets = {1: torch.tensor([3, 0, 7, 11, -1]), -1: torch.tensor([3, 5, 2, 0, 1])}
    for wanted in (targets, {}):
        fused = row_stats(logits, 4, wanted)
        _assert_same(fused, row_stats_reference(logits, 4, wanted))
    _, _, bad = nb.compiled_row_stats(logits, 4, {}, EXP_FLOOR)
    assert bad.tolist() == [False, False, True, False, True]


def test_reference_forced(monkeypatch) -> None:
    """Under FFKV_LENS_KERNELS=reference the dispatcher returns the reference's own tensors."""
    monkeypatch.setenv(KERNELS_ENV, "reference")
    logits = _logits(3, 100, torch.float32, ties=False, seed=1)
    (values, _), (ref_values, _) = row_stats(logits, 3, {}), row_stats_reference(logits, 3, {})
    assert all(torch.equal(a, b) for a, b in zip(values, ref_values, strict=True))
