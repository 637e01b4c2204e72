"""Streaming top-k: the torch reference and the Triton twin against a brute-force oracle.

Every comparison is exact (``torch.equal``: tolerance 0) on values, unit ids and positions.

The Triton checks run in one subprocess with ``TRITON_INTERPRET=1`` (Triton reads it at import, and
this pytest process must keep a normal Triton for other tests); each case reports back by name.
"""

import json
import os
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch

from ffkv_lens import kernels
from ffkv_lens.errors import ConfigError
from ffkv_lens.kernels import KERNELS_ENV, active_implementation
from ffkv_lens.kernels import topk as ref
from ffkv_lens.kernels.topk import TopKState, merge_states

REPO = Path(__file__).resolve().parents[2]


class Batch(NamedTuple):
    m: torch.Tensor
    valid: torch.Tensor
    unit_ids: torch.Tensor


def make_stream(
    seed: int,
    d_mlp: int,
    sizes: list[int],
    pos: int = 6,
    dtype=torch.float32,
    ties: bool = False,
    holes: bool = True,
    windows: bool = False,
) -> list[Batch]:
    """Batches of right-padded units (BOS excluded, some rows all invalid) in random unit order.

    With ``holes`` some valid positions are knocked out at random (the general masked path); without,
    each unit's valid positions are one run, as in real batches (the span fast path). With
    ``windows`` every unit fills the batch (one run shared by all units: fixed-length windows).
    """
    g = torch.Generator().manual_seed(seed)
    n_units = sum(sizes)
    ids = torch.randperm(3 * n_units + 1, generator=g)[:n_units]  # unique, unordered, with gaps
    stream, start = [], 0
    for size in sizes:
        m = torch.randn(size, pos, d_mlp, generator=g, dtype=torch.float64)
        if ties:
            m = (m * 1.5).round() / 2  # a handful of levels: many equal values within and across units
        lengths = torch.full((size,), pos) if windows else torch.randint(0, pos + 1, (size,), generator=g)
        valid = torch.arange(pos) < lengths[:, None]
        if holes:
            valid &= torch.rand(size, pos, generator=g) > 0.15
        valid[:, 0] = False
        if size >= 3 and not windows:
            valid[1] = False  # a unit with no valid position is no candidate
        stream.append(Batch(m.to(dtype), valid, ids[start : start + size].clone()))
        start += size
    return stream


def oracle(stream: list[Batch], d_mlp: int, k: int, dtype: torch.dtype) -> TopKState:
    """Materialise every (unit, key) candidate, sort by (-value, unit), keep k; no shared code with the kernels."""
    cands: list[list[tuple[float, int, int]]] = [[] for _ in range(d_mlp)]
    for m, valid, unit_ids in stream:
        x = m.to(dtype).numpy()
        for b, unit in enumerate(unit_ids.tolist()):
            where = np.flatnonzero(valid[b].numpy())
            if where.size == 0:
                continue
            sub = x[b, where, :]
            best, first = sub.max(axis=0), where[sub.argmax(axis=0)]  # argmax: first occurrence
            for d in range(d_mlp):
                if best[d] > -np.inf:
                    cands[d].append((best[d], unit, int(first[d])))
    state = TopKState.empty(d_mlp, k, dtype=dtype)
    for d, row in enumerate(cands):
        row.sort(key=lambda c: (-c[0], c[1]))
        for j, (value, unit, position) in enumerate(row[:k]):
            state.values[d, j], state.units[d, j], state.positions[d, j] = float(value), unit, position
    return state


def state_mismatch(actual: TopKState, expected: TopKState) -> str:
    """'' if the states are equal exactly, else a description of the first difference."""
    for name, a, e in zip(TopKState._fields, actual, expected, strict=True):
        a = a.cpu()
        if a.dtype != e.dtype or a.shape != e.shape:
            return f"{name}: {a.dtype} {tuple(a.shape)} != {e.dtype} {tuple(e.shape)}"
        if not torch.equal(a, e):
            row = int((a != e).any(dim=1).nonzero()[0])
            return f"{name} row {row}: {a[row].tolist()} != {e[row].tolist()}"
    return ""


def run_stream(update, stream: list[Batch], d_mlp: int, k: int, dtype, device="cpu") -> TopKState:
    state = TopKState.empty(d_mlp, k, device=device, dtype=dtype)
    for m, valid, unit_ids in stream:
        state = update(state, m.to(device), valid.to(device), unit_ids.to(device))
    return state


# Cases shared by the reference tests and the Triton parity runs: name -> settings.
def _cases() -> dict[str, dict]:
    cases = {}
    for d_mlp in (1, 7, 64, 100):
        for k in (1, 5, 64):  # k=64 >= the 28 candidates per key: the state never fills
            for dtype in ("float32", "float64"):
                for ties in (False, True):
                    name = f"d{d_mlp}-k{k}-{dtype}-{'ties' if ties else 'distinct'}"
                    cases[name] = dict(d_mlp=d_mlp, k=k, dtype=dtype, ties=ties, sizes=[1, 13, 0, 13, 1])
    cases["d33-k5-float32-ties-pos70"] = dict(d_mlp=33, k=5, dtype="float32", ties=True, sizes=[13, 1, 8], pos=70)
    return cases


CASES = _cases()
# A smaller set for the (slow) Triton interpreter, plus big-k and many-candidate chunks.
TRITON_CASES = {
    name: CASES[name]
    for name in (
        "d1-k1-float32-ties",
        "d7-k5-float32-ties",
        "d7-k64-float64-ties",
        "d64-k5-float32-distinct",
        "d100-k1-float64-ties",
        "d100-k5-float32-ties",
    )
}
TRITON_CASES["d7-k128-float32-ties-batch70"] = dict(d_mlp=7, k=128, dtype="float32", ties=True, sizes=[70, 5, 70])
TRITON_CASES["d9-k5-float32-ties-pos70"] = dict(d_mlp=9, k=5, dtype="float32", ties=True, sizes=[13, 1], pos=70)
TRITON_CASES["d3-k300-float32-fallback"] = dict(d_mlp=3, k=300, dtype="float32", ties=True, sizes=[13, 13])


def _stream_of(case: dict, seed: int = 0) -> tuple[list[Batch], torch.dtype]:
    dtype = getattr(torch, case["dtype"])
    stream = make_stream(seed, case["d_mlp"], case["sizes"], pos=case.get("pos", 6), dtype=dtype, ties=case["ties"])
    return stream, dtype


# -- reference vs oracle ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_reference_matches_oracle(name: str) -> None:
    case = CASES[name]
    stream, dtype = _stream_of(case)
    actual = run_stream(ref.update_topk, stream, case["d_mlp"], case["k"], dtype)
    assert state_mismatch(actual, oracle(stream, case["d_mlp"], case["k"], dtype)) == ""


# Runs without holes take the span fast path; long streams warm the state so gating skips work.
RUN_CASES = {
    "d7-k5-float32-ties-long": dict(d_mlp=7, k=5, dtype="float32", ties=True, sizes=[8] * 30, pos=12),
    "d64-k5-float32-distinct-long": dict(d_mlp=64, k=5, dtype="float32", ties=False, sizes=[8] * 30, pos=12),
    "d100-k3-float64-ties-long": dict(d_mlp=100, k=3, dtype="float64", ties=True, sizes=[1, 8, 0, 13] * 6, pos=9),
    "d33-k64-float32-ties-unfilled": dict(d_mlp=33, k=64, dtype="float32", ties=True, sizes=[13, 8, 1], pos=7),
    "d64-k5-float32-ties-windows": dict(d_mlp=64, k=5, dtype="float32", ties=True, sizes=[8] * 20, pos=9, windows=True),
    "d48-k9-float64-windows": dict(d_mlp=48, k=9, dtype="float64", ties=False, sizes=[8] * 12, pos=5, windows=True),
}


def _run_stream_of(case: dict, seed: int = 0) -> tuple[list[Batch], torch.dtype]:
    dtype = getattr(torch, case["dtype"])
    stream = make_stream(
        seed,
        case["d_mlp"],
        case["sizes"],
        case["pos"],
        dtype,
        case["ties"],
        holes=False,
        windows=case.get("windows", False),
    )
    return stream, dtype


@pytest.mark.parametrize("name", list(RUN_CASES))
def test_span_fast_path_matches_oracle(name: str) -> None:
    case = RUN_CASES[name]
    stream, dtype = _run_stream_of(case)
    assert all(ref._spans(b.valid) is not None for b in stream)  # the fast path is the one tested
    actual = run_stream(ref.update_topk, stream, case["d_mlp"], case["k"], dtype)
    assert state_mismatch(actual, oracle(stream, case["d_mlp"], case["k"], dtype)) == ""


def test_windows_never_need_the_masked_reduction(monkeypatch: pytest.MonkeyPatch) -> None:
    case = RUN_CASES["d64-k5-float32-ties-windows"]
    stream, dtype = _run_stream_of(case)
    expected = oracle(stream, case["d_mlp"], case["k"], dtype)

    def forbidden(*args, **kwargs):
        raise AssertionError("reduce_units called: the unmasked window path was not taken")

    monkeypatch.setattr(ref, "reduce_units", forbidden)
    top, bottom = (
        TopKState.empty(case["d_mlp"], case["k"], dtype=dtype),
        TopKState.empty(case["d_mlp"], case["k"], dtype=dtype),
    )
    for m, valid, unit_ids in stream:
        top, bottom = ref.update_topk_signed(top, bottom, m, valid, unit_ids)
    assert state_mismatch(top, expected) == ""


FORCED = ["reference", pytest.param("numba", marks=pytest.mark.skipif(not find_spec("numba"), reason="needs numba"))]


@pytest.mark.parametrize("forced", FORCED)
@pytest.mark.parametrize("name", [*RUN_CASES, "d7-k5-float32-ties", "d100-k1-float64-ties"])
def test_signed_update_equals_top_of_m_and_of_minus_m(name: str, forced: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The dispatcher, forced to each CPU implementation, against the oracle."""
    monkeypatch.setenv(KERNELS_ENV, forced)
    case = RUN_CASES.get(name) or CASES[name]
    stream, dtype = _run_stream_of(case) if name in RUN_CASES else _stream_of(case)
    d, k = case["d_mlp"], case["k"]
    top, bottom = TopKState.empty(d, k, dtype=dtype), TopKState.empty(d, k, dtype=dtype)
    for m, valid, unit_ids in stream:
        top, bottom = kernels.update_topk_signed(top, bottom, m, valid, unit_ids)
    negated = [Batch(-b.m, b.valid, b.unit_ids) for b in stream]
    assert state_mismatch(top, oracle(stream, d, k, dtype)) == ""
    assert state_mismatch(bottom, oracle(negated, d, k, dtype)) == ""


@pytest.mark.parametrize("group", [1, 3, 64])
@pytest.mark.parametrize("name", [*RUN_CASES, "d7-k5-float32-ties", "d100-k1-float64-ties"])
def test_grouped_candidates_equal_the_oracle(name: str, group: int) -> None:
    """batch_candidates gated by a stale state, merged every ``group`` batches: top and bottom exact."""
    case = RUN_CASES.get(name) or CASES[name]
    stream, dtype = _run_stream_of(case) if name in RUN_CASES else _stream_of(case)
    d, k = case["d_mlp"], case["k"]
    states = {1: TopKState.empty(d, k, dtype=dtype), -1: TopKState.empty(d, k, dtype=dtype)}
    pending: dict[int, list] = {1: [], -1: []}

    def flush(sign: int) -> None:
        if pending[sign]:
            values, positions, units = (torch.cat(c) for c in zip(*pending[sign], strict=True))
            states[sign] = ref.merge_topk(states[sign], values, positions, units)
            pending[sign] = []

    for i, (m, valid, unit_ids) in enumerate(stream):
        found = ref.batch_candidates(states[1], m, valid, unit_ids, states[-1])
        for sign, candidates in zip((1, -1), found, strict=True):
            if candidates is not None:
                pending[sign].append((*candidates, unit_ids))
        if (i + 1) % group == 0:
            flush(1), flush(-1)
    flush(1), flush(-1)
    negated = [Batch(-b.m, b.valid, b.unit_ids) for b in stream]
    assert state_mismatch(states[1], oracle(stream, d, k, dtype)) == ""
    assert state_mismatch(states[-1], oracle(negated, d, k, dtype)) == ""


@pytest.mark.parametrize("name", ["d7-k5-float32-ties", "d100-k5-float64-distinct"])
def test_reference_is_independent_of_batching(name: str) -> None:
    case = CASES[name]
    stream, dtype = _stream_of(case)
    one_by_one = [
        Batch(b.m[i : i + 1], b.valid[i : i + 1], b.unit_ids[i : i + 1]) for b in stream for i in range(len(b.unit_ids))
    ]
    a = run_stream(ref.update_topk, stream, case["d_mlp"], case["k"], dtype)
    b = run_stream(ref.update_topk, one_by_one[::-1], case["d_mlp"], case["k"], dtype)
    assert state_mismatch(a, b) == ""


@pytest.mark.parametrize("m_dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_reference_compares_in_the_state_dtype(m_dtype: torch.dtype) -> None:
    stream = [Batch(b.m.to(m_dtype), b.valid, b.unit_ids) for b in make_stream(3, 9, [13, 13], ties=False)]
    actual = run_stream(ref.update_topk, stream, 9, 5, torch.float32)
    assert state_mismatch(actual, oracle(stream, 9, 5, torch.float32)) == ""


def test_reduce_units_fast_path_matches_exact_path() -> None:
    (m, valid, _), *_ = make_stream(4, 33, [13], pos=40, ties=True)
    fast, exact = ref.reduce_units(m, valid), ref._reduce_units_exact(m, valid)
    assert torch.equal(fast.values, exact.values) and torch.equal(fast.positions, exact.positions)


def test_reduce_units_infinities_and_nan_at_padding() -> None:
    m = torch.tensor([[[1.0, 2.0], [float("inf"), 2.0], [float("inf"), float("nan")]]])  # [1, 3, 2]
    valid = torch.tensor([[True, True, False]])
    peaks = ref.reduce_units(m, valid)
    assert peaks.values.tolist() == [[float("inf"), 2.0]] and peaks.positions.tolist() == [[1, 0]]
    m_neg = torch.full((1, 3, 2), float("-inf"))
    peaks = ref.reduce_units(m_neg, valid)
    assert peaks.positions.tolist() == [[-1, -1]]


@pytest.mark.parametrize("shape", [(0, 5, 4), (3, 0, 4), (3, 5, 0)], ids=["no-units", "no-positions", "no-keys"])
def test_reduce_units_empty_dims(shape: tuple[int, int, int]) -> None:
    m, valid = torch.randn(shape), torch.ones(shape[:2], dtype=torch.bool)
    peaks = ref.reduce_units(m, valid)
    assert peaks.values.shape == (shape[0], shape[2])
    assert bool((peaks.values == float("-inf")).all()) and bool((peaks.positions == -1).all())


def test_merge_skips_when_nothing_passes_and_breaks_ties_by_unit() -> None:
    state = TopKState.empty(2, 2)
    state = ref.merge_topk(state, torch.tensor([[1.0, 1.0]]), torch.tensor([[3, 4]]), torch.tensor([5]))
    state = ref.merge_topk(state, torch.tensor([[1.0, 1.0]]), torch.tensor([[0, 0]]), torch.tensor([9]))
    before = state.clone()
    state = ref.merge_topk(state, torch.tensor([[1.0, 0.5]]), torch.tensor([[7, 7]]), torch.tensor([12]))
    assert state_mismatch(state, before) == ""  # equal value, higher unit: does not beat the k-th
    state = ref.merge_topk(state, torch.tensor([[1.0, 1.0]]), torch.tensor([[8, 8]]), torch.tensor([2]))
    assert state.units.tolist() == [[2, 5], [2, 5]] and state.positions.tolist() == [[8, 3], [8, 4]]


# -- merge_states ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["d7-k5-float32-ties", "d64-k1-float64-ties", "d100-k64-float32-distinct"])
def test_merge_states_matches_oracle_and_is_associative(name: str) -> None:
    case = CASES[name]
    stream, dtype = _stream_of(case, seed=1)
    d, k = case["d_mlp"], case["k"]
    a, b, c = (run_stream(ref.update_topk, part, d, k, dtype) for part in (stream[:1], stream[1:3], stream[3:]))
    expected = oracle(stream, d, k, dtype)
    assert state_mismatch(merge_states(merge_states(a, b), c), expected) == ""
    assert state_mismatch(merge_states(a, merge_states(b, c)), expected) == ""
    assert state_mismatch(merge_states(c, merge_states(b, a)), expected) == ""
    empty = TopKState.empty(d, k, dtype=dtype)
    assert state_mismatch(merge_states(empty, expected), expected) == ""


# -- errors and dispatch ---------------------------------------------------------------------------
def test_errors_name_the_value_received() -> None:
    with pytest.raises(ConfigError, match="k must be an int >= 1, got 0"):
        TopKState.empty(4, 0)
    state = TopKState.empty(4, 2)
    m, valid = torch.randn(2, 3, 5), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ConfigError, match="m has d_mlp=5 but the state has d_mlp=4"):
        ref.update_topk(state, m, valid, torch.tensor([0, 1]))
    with pytest.raises(ConfigError, match="got minimum -3"):
        ref.update_topk(state, m[..., :4], valid, torch.tensor([0, -3]))
    with pytest.raises(ConfigError, match=r"got a \(4, 2\).*b \(4, 3\)"):
        merge_states(state, TopKState.empty(4, 3))


def test_dispatcher_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KERNELS_ENV, raising=False)
    assert active_implementation("cpu") == ("numba" if find_spec("numba") else "reference")
    monkeypatch.setenv(KERNELS_ENV, "reference")
    assert active_implementation("cuda") == "reference"
    assert active_implementation("cpu") == "reference"
    monkeypatch.setenv(KERNELS_ENV, "fast")
    with pytest.raises(ConfigError, match="'fast' is not one of"):
        active_implementation("cpu")
    monkeypatch.setenv(KERNELS_ENV, "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match="TRITON_INTERPRET=1"):
        active_implementation("cpu")


# -- Triton parity (interpreter in a subprocess; CUDA in process) ----------------------------------
def triton_case_errors(device: str) -> dict[str, str]:
    """Run every Triton case through the dispatcher forced to Triton: name -> '' or the mismatch."""
    from ffkv_lens import kernels

    errors = {}
    for name, case in TRITON_CASES.items():
        stream, dtype = _stream_of(case)
        d, k = case["d_mlp"], case["k"]
        try:
            expected = oracle(stream, d, k, dtype)
            errors[name] = "update: " + state_mismatch(
                run_stream(kernels.update_topk, stream, d, k, dtype, device), expected
            )

            def two_step(state, m, valid, ids):
                peaks = kernels.reduce_units(m, valid)
                return kernels.merge_topk(state, peaks.values, peaks.positions, ids)

            errors[name] += "; two-step: " + state_mismatch(run_stream(two_step, stream, d, k, dtype, device), expected)
            if errors[name] == "update: ; two-step: ":
                errors[name] = ""
        except Exception as error:  # reported to the parent test with its case name
            errors[name] = f"{type(error).__name__}: {error}"
    return errors


def _interpreter_main() -> None:
    """Entry point of the subprocess: print the case errors as JSON."""
    assert os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get(KERNELS_ENV) == "triton"
    assert active_implementation("cpu") == "triton"
    sys.stdout.write("\nRESULT " + json.dumps(triton_case_errors("cpu")) + "\n")


@pytest.fixture(scope="module")
def interpreter_results() -> dict[str, str]:
    if find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1", KERNELS_ENV: "triton", "PYTHONPATH": str(REPO)}
    code = "from tests.kernels.test_topk import _interpreter_main; _interpreter_main()"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, f"interpreter run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return json.loads(lines[-1].removeprefix("RESULT "))


@pytest.mark.parametrize("name", list(TRITON_CASES))
def test_triton_interpreter_matches_oracle(name: str, interpreter_results: dict[str, str]) -> None:
    assert interpreter_results[name] == ""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_cuda_matches_oracle(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    monkeypatch.setenv(KERNELS_ENV, "auto")
    assert active_implementation("cuda") == "triton"
    assert triton_case_errors("cuda") == {name: "" for name in TRITON_CASES}
