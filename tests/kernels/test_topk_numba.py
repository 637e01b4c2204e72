"""The Numba CPU kernels against the brute-force oracle and the torch reference.

Every comparison is exact (``torch.equal``: tolerance 0) on values, unit ids and positions. The
cases and the oracle are those of ``test_topk.py``; here they run through the Numba twin.
"""

import pytest
import torch

from ffkv_lens import kernels
from ffkv_lens.kernels import KERNELS_ENV, active_implementation
from ffkv_lens.kernels import topk as ref
from ffkv_lens.kernels.topk import TopKState
from tests.kernels.test_topk import (
    CASES,
    RUN_CASES,
    Batch,
    _run_stream_of,
    _stream_of,
    make_stream,
    oracle,
    run_stream,
    state_mismatch,
)

nb = pytest.importorskip("ffkv_lens.kernels.topk_numba")

# Many candidates per key in one batch (the merge's sort switches algorithm above 32), and a long run.
BIG_CASES = {
    "d9-k5-float32-ties-batch70": dict(d_mlp=9, k=5, dtype="float32", ties=True, sizes=[70, 3, 70], pos=7),
    "d9-k128-float64-ties-batch70": dict(d_mlp=9, k=128, dtype="float64", ties=True, sizes=[70, 70], pos=5),
    "d17-k4-float32-pos131": dict(d_mlp=17, k=4, dtype="float32", ties=True, sizes=[5, 9], pos=131),
}


def _stream(name: str) -> tuple[list[Batch], torch.dtype, dict]:
    if name in RUN_CASES:
        return (*_run_stream_of(RUN_CASES[name]), RUN_CASES[name])
    if name in BIG_CASES:
        case = BIG_CASES[name]
        dtype = getattr(torch, case["dtype"])
        stream = make_stream(3, case["d_mlp"], case["sizes"], case["pos"], dtype, case["ties"], holes=False)
        return stream, dtype, case
    return (*_stream_of(CASES[name]), CASES[name])


FAST = [*RUN_CASES, *BIG_CASES]


@pytest.fixture
def no_reference_update(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail if the Numba kernels fall back to the reference (the compiled path is the one tested)."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the Numba kernel fell back to the reference")

    for name in ("update_topk", "update_topk_signed", "batch_candidates"):
        monkeypatch.setattr(ref, name, forbidden)


@pytest.mark.parametrize("name", FAST)
def test_update_matches_oracle(name: str, no_reference_update: None) -> None:
    stream, dtype, case = _stream(name)
    actual = run_stream(nb.update_topk, stream, case["d_mlp"], case["k"], dtype)
    assert state_mismatch(actual, oracle(stream, case["d_mlp"], case["k"], dtype)) == ""


@pytest.mark.parametrize("name", list(CASES))
def test_units_with_holes_match_oracle(name: str) -> None:
    """Valid positions with holes take the reference inside the Numba module: still exact."""
    stream, dtype, case = _stream(name)
    actual = run_stream(nb.update_topk, stream, case["d_mlp"], case["k"], dtype)
    assert state_mismatch(actual, oracle(stream, case["d_mlp"], case["k"], dtype)) == ""


@pytest.mark.parametrize("name", FAST)
def test_signed_update_matches_oracle(name: str, no_reference_update: None) -> None:
    stream, dtype, case = _stream(name)
    d, k = case["d_mlp"], case["k"]
    top, bottom = TopKState.empty(d, k, dtype=dtype), TopKState.empty(d, k, dtype=dtype)
    for m, valid, unit_ids in stream:
        top, bottom = nb.update_topk_signed(top, bottom, m, valid, unit_ids)
    negated = [Batch(-b.m, b.valid, b.unit_ids) for b in stream]
    assert state_mismatch(top, oracle(stream, d, k, dtype)) == ""
    assert state_mismatch(bottom, oracle(negated, d, k, dtype)) == ""


@pytest.mark.parametrize("group", [1, 3, 64])
@pytest.mark.parametrize("name", FAST)
def test_grouped_candidates_match_oracle(name: str, group: int, no_reference_update: None) -> None:
    """Candidates of several batches merged at once (what the CPU search does) equal the oracle."""
    stream, dtype, case = _stream(name)
    d, k = case["d_mlp"], case["k"]
    states = {1: TopKState.empty(d, k, dtype=dtype), -1: TopKState.empty(d, k, dtype=dtype)}
    pending: dict[int, list] = {1: [], -1: []}

    def flush(sign: int) -> None:
        if pending[sign]:
            values, positions, units = (torch.cat(c) for c in zip(*pending[sign], strict=True))
            states[sign] = nb.merge_topk(states[sign], values, positions, units)
            pending[sign] = []

    for i, (m, valid, unit_ids) in enumerate(stream):
        found = nb.batch_candidates(states[1], m, valid, unit_ids, states[-1])
        for sign, candidates in zip((1, -1), found, strict=True):
            if candidates is not None:
                pending[sign].append((*candidates, unit_ids))
        if (i + 1) % group == 0:
            flush(1), flush(-1)
    flush(1), flush(-1)
    negated = [Batch(-b.m, b.valid, b.unit_ids) for b in stream]
    assert state_mismatch(states[1], oracle(stream, d, k, dtype)) == ""
    assert state_mismatch(states[-1], oracle(negated, d, k, dtype)) == ""


@pytest.mark.parametrize("name", ["d7-k5-float32-ties", "d100-k64-float64-ties", "d33-k5-float32-ties-pos70"])
def test_merge_matches_reference(name: str) -> None:
    """Arbitrary candidates (unordered unit ids, ties, -inf and NaN holes) merged into a filled state."""
    stream, dtype, case = _stream(name)
    d, k = case["d_mlp"], case["k"]
    start = run_stream(ref.update_topk, stream[:2], d, k, dtype)
    for m, valid, unit_ids in stream[2:]:
        if len(unit_ids) == 0:
            continue
        peaks = ref.reduce_units(m, valid)
        values = peaks.values.clone()
        values[0, 0] = float("nan")
        expected = ref.merge_topk(start.clone(), values, peaks.positions, unit_ids + 10_000)
        actual = nb.merge_topk(start.clone(), values, peaks.positions, unit_ids + 10_000)
        assert state_mismatch(actual, expected) == ""


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")], ids=["+inf", "-inf", "nan"])
@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_non_finite_coefficients_match_reference(value: float, signed: bool) -> None:
    stream, dtype, case = _stream("d64-k5-float32-ties-windows")
    d, k = case["d_mlp"], case["k"]
    poisoned = []
    for i, b in enumerate(stream):
        m = b.m.clone()
        m[i % len(b.unit_ids), 1 + i % 4, (7 * i) % d] = value
        poisoned.append(Batch(m, b.valid, b.unit_ids))
    states = {}
    for impl in (ref, nb):
        top, bottom = TopKState.empty(d, k, dtype=dtype), TopKState.empty(d, k, dtype=dtype)
        for m, valid, unit_ids in poisoned:
            if signed:
                top, bottom = impl.update_topk_signed(top, bottom, m, valid, unit_ids)
            else:
                top = impl.update_topk(top, m, valid, unit_ids)
        states[impl.__name__] = (top, bottom)
    for got, want in zip(states[nb.__name__], states[ref.__name__], strict=True):
        assert state_mismatch(got, want) == ""


def test_bf16_and_float64_coefficients_compare_in_the_state_dtype() -> None:
    stream, _, case = _stream("d64-k5-float32-ties-windows")
    for m_dtype in (torch.bfloat16, torch.float64):
        cast = [Batch(b.m.to(m_dtype), b.valid, b.unit_ids) for b in stream]
        want = run_stream(ref.update_topk, cast, case["d_mlp"], case["k"], torch.float32)
        assert state_mismatch(run_stream(nb.update_topk, cast, case["d_mlp"], case["k"], torch.float32), want) == ""


def test_dispatcher_picks_numba_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KERNELS_ENV, raising=False)
    assert active_implementation("cpu") == "numba"
    monkeypatch.setenv(KERNELS_ENV, "numba")
    assert active_implementation("cpu") == "numba"
    assert active_implementation("cuda") == "reference"  # numba is CPU-only; forced numba leaves CUDA to torch
    stream, dtype, case = _stream("d7-k5-float32-ties-long")
    want = oracle(stream, case["d_mlp"], case["k"], dtype)
    assert state_mismatch(run_stream(kernels.update_topk, stream, case["d_mlp"], case["k"], dtype), want) == ""
