"""The streaming top-k on the CPU, compiled with Numba: one pass over the coefficients, a merge of sorted rows.

Same signatures and exactly the same results as the torch reference (:mod:`ffkv_lens.kernels.topk`),
which remains the definition; the parity tests compare both (and an oracle) bit for bit.

Why a compiled CPU kernel: on the CPU the reference spends its time in many small torch ops per layer
(maxima, a multi-pass trick for the first peak position, a sort-based merge), while the search is to
keep the forward's speed (docs/performance.md). Here one loop reads
each coefficient once, keeping each unit's running maximum (and minimum) and its first position, and
each candidate that beats its row's k-th entry is inserted into the sorted row in place (a row holds
``k`` entries; most candidates are rejected by one comparison once the row is full). Numba is a
maintained JIT compiler for numeric Python (no C toolchain needed at install or run time); compiled
functions are cached on disk after their first call (a few seconds).

Ranking rule, NaN and infinities as in the reference: value descending, then unit id ascending; the
first valid position attaining a unit's extreme; a unit-key pair with any NaN among its valid
coefficients, or with no valid position, never enters.
"""

from typing import no_type_check

import numba
import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ffkv_lens.errors import ConfigError
from ffkv_lens.kernels import topk as _ref
from ffkv_lens.kernels.topk import (
    TopKState,
    UnitPeaks,
    _check_unit_ids_nonnegative,
    _spans,
    check_merge_args,
    check_update_args,
)

__all__ = ["batch_candidates", "merge_topk", "reduce_units", "update_topk", "update_topk_signed"]


# Compiled code is cached on disk beside the module (or in numba's user cache) after the first call.
_JIT = {"cache": True, "nogil": True, "error_model": "numpy"}


@numba.njit(**_JIT)
@no_type_check  # the test-time jaxtyping import hook must not wrap what Numba compiles
def _peaks(m, starts, ends, hi, hi_pos, lo, lo_pos, signed):  # pragma: no cover - compiled
    """Per unit (row) and key: maximum (and minimum) over the run ``[starts[b], ends[b])``, first position of each.

    Positions are read two at a time (select-based, so the loop vectorises). Returns False when
    some coefficient in a run is not finite (NaN or infinite): the caller then uses the reference,
    which defines those cases. A row with an empty run gets ``(-inf, -1)`` and ``(+inf, -1)``.
    """
    batch, _, d_mlp = m.shape
    h, q = np.empty(d_mlp, m.dtype), np.empty(d_mlp, np.int32)
    lw, lq = np.empty(d_mlp, m.dtype), np.empty(d_mlp, np.int32)
    finite = np.empty(d_mlp, m.dtype)
    for b in range(batch):
        h[:], q[:], lw[:], lq[:], finite[:] = -np.inf, -1, np.inf, -1, 0
        p, end = starts[b], ends[b]
        while p + 1 < end:
            r0, r1, p0, p1 = m[b, p], m[b, p + 1], np.int32(p), np.int32(p + 1)
            if signed:
                for d in range(d_mlp):
                    a0, a1 = r0[d], r1[d]
                    second = a1 > a0
                    c = a1 if second else a0
                    g = c > h[d]
                    q[d] = (p1 if second else p0) if g else q[d]
                    h[d] = c if g else h[d]
                    second = a1 < a0  # ties keep the first position for the minimum too
                    c = a1 if second else a0
                    g = c < lw[d]
                    lq[d] = (p1 if second else p0) if g else lq[d]
                    lw[d] = c if g else lw[d]
                    finite[d] += (a0 - a0) + (a1 - a1)
            else:
                for d in range(d_mlp):
                    a0, a1 = r0[d], r1[d]
                    second = a1 > a0
                    c = a1 if second else a0
                    g = c > h[d]
                    q[d] = (p1 if second else p0) if g else q[d]
                    h[d] = c if g else h[d]
                    finite[d] += (a0 - a0) + (a1 - a1)  # 0 unless a value is NaN or infinite
            p += 2
        if p < end:
            r0, p0 = m[b, p], np.int32(p)
            for d in range(d_mlp):
                a0 = r0[d]
                g = a0 > h[d]
                q[d] = p0 if g else q[d]
                h[d] = a0 if g else h[d]
                finite[d] += a0 - a0
                if signed:
                    g = a0 < lw[d]
                    lq[d] = p0 if g else lq[d]
                    lw[d] = a0 if g else lw[d]
        for d in range(d_mlp):
            if finite[d] != 0:
                return False
            hi[b, d], hi_pos[b, d] = h[d], q[d]
            if signed:
                lo[b, d], lo_pos[b, d] = lw[d], lq[d]
    return True


@numba.njit(**_JIT)
@no_type_check  # the test-time jaxtyping import hook must not wrap what Numba compiles
def _before(v1, u1, v2, u2):  # pragma: no cover - compiled
    """Whether (v1, u1) ranks before (v2, u2): value descending, then unit ascending."""
    return v1 > v2 or (v1 == v2 and u1 < u2)


@numba.njit(**_JIT)
@no_type_check  # the test-time jaxtyping import hook must not wrap what Numba compiles
def _sort_candidates(cv, cu, cp, n):  # pragma: no cover - compiled
    """Sort the first ``n`` candidates by value descending, stably (equal values keep their unit order)."""
    if n > 32:  # a merge sort beats insertion for many candidates (sentence batches of a cold state)
        order = np.argsort(-cv[:n], kind="mergesort")
        cv[:n], cu[:n], cp[:n] = cv[:n][order], cu[:n][order], cp[:n][order]
        return
    for j in range(1, n):
        v, u, q, i = cv[j], cu[j], cp[j], j
        while i > 0 and cv[i - 1] < v:
            cv[i], cu[i], cp[i] = cv[i - 1], cu[i - 1], cp[i - 1]
            i -= 1
        cv[i], cu[i], cp[i] = v, u, q


@numba.njit(**_JIT)
@no_type_check  # the test-time jaxtyping import hook must not wrap what Numba compiles
def _merge(values, units, positions, cand, cand_pos, unit_ids, negate):  # pragma: no cover - compiled
    """Merge the candidates that beat each row's k-th entry into the sorted rows, in place.

    Per row: the passing candidates (``-cand`` if ``negate``: the bottom-k state) are sorted by the
    ranking rule, then merged with the row in one sweep. NaN never passes.
    """
    batch, d_mlp = cand.shape
    k = values.shape[1]
    by_unit = np.argsort(unit_ids, kind="mergesort")  # candidates in unit order: stable sorts keep ties by unit
    cv, cu, cp = np.empty(batch, values.dtype), np.empty(batch, np.int64), np.empty(batch, np.int64)
    tv, tu, tp = np.empty(k, values.dtype), np.empty(k, np.int64), np.empty(k, np.int64)
    for d in range(d_mlp):
        kv, ku, n = values[d, k - 1], units[d, k - 1], 0
        for j in range(batch):
            b = by_unit[j]
            v = -cand[b, d] if negate else cand[b, d]
            if v >= kv and _before(v, unit_ids[b], kv, ku):
                cv[n], cu[n], cp[n] = v, unit_ids[b], cand_pos[b, d]
                n += 1
        if n == 0:
            continue
        _sort_candidates(cv, cu, cp, n)
        i = j = 0
        for out in range(k):
            if j < n and (i >= k or _before(cv[j], cu[j], values[d, i], units[d, i])):
                tv[out], tu[out], tp[out] = cv[j], cu[j], cp[j]
                j += 1
            else:
                tv[out], tu[out], tp[out] = values[d, i], units[d, i], positions[d, i]
                i += 1
        values[d], units[d], positions[d] = tv, tu, tp


def _numpy_state(state: TopKState) -> tuple[TopKState, tuple[np.ndarray, ...]]:
    """``state`` with contiguous tensors, and numpy views of them (updates write through)."""
    if not all(t.is_contiguous() for t in state):
        state = TopKState(*(t.contiguous() for t in state))
    return state, tuple(t.numpy() for t in state)


def _check_cpu(state: TopKState) -> None:
    if state.values.device.type != "cpu":
        raise ConfigError(
            f"The Numba kernels run on the CPU, but the state is on {state.values.device}; unset "
            "FFKV_LENS_KERNELS (the dispatcher picks Triton on CUDA) or move the tensors to the CPU."
        )


# The search passes one ``valid`` mask to every layer of a batch: its runs are found once (about ten small
# torch ops), keyed by the tensor itself and its version counter (bumped by any in-place change).
# One tuple, replaced whole (so threads never see a mixed entry).
_last_runs: list[tuple] = [(None, -1, None)]


def _runs(valid: Tensor) -> tuple[np.ndarray, np.ndarray] | None:
    """Each row's valid positions as one run ``[start, end)``, or None if some row has holes."""
    tensor, version, runs = _last_runs[0]
    if tensor is valid and version == valid._version:
        return runs
    spans = _spans(valid)
    runs = None if spans is None else (spans.starts.numpy(), spans.ends.numpy())
    _last_runs[0] = (valid, valid._version, runs)
    return runs


def _extremes(m: Tensor, runs: tuple[np.ndarray, np.ndarray], dtype: torch.dtype, signed: bool) -> tuple | None:
    """:func:`_peaks` of ``m`` in the state's dtype (the reference's comparison dtype), or None if not finite."""
    x = m.detach().to(dtype).contiguous().numpy()  # widening is exact; narrowing rounds as the reference
    batch, _, d_mlp = x.shape
    hi, lo = np.empty((batch, d_mlp), x.dtype), np.empty((batch, d_mlp), x.dtype)
    hi_pos, lo_pos = np.empty(hi.shape, np.int64), np.empty(lo.shape, np.int64)
    if not _peaks(x, runs[0], runs[1], hi, hi_pos, lo, lo_pos, signed):
        return None
    return hi, hi_pos, lo, lo_pos


def reduce_units(m: Float[Tensor, "batch pos d_mlp"], valid: Bool[Tensor, "batch pos"]) -> UnitPeaks:
    """Each unit's peak per key: the reference (not on the hot path)."""
    return _ref.reduce_units(m, valid)


def merge_topk(
    state: TopKState,
    cand_values: Float[Tensor, "batch d_mlp"],
    cand_positions: Int[Tensor, "batch d_mlp"],
    unit_ids: Int[Tensor, " batch"],
) -> TopKState:
    """Merge one candidate per (unit, key) into the top-k, in place; see the reference's ``merge_topk``."""
    check_merge_args(state, cand_values, cand_positions, unit_ids)
    _check_unit_ids_nonnegative(unit_ids)
    _check_cpu(state)
    if cand_values.shape[0] == 0:
        return state
    state, arrays = _numpy_state(state)
    cand = cand_values.to(state.values.dtype).contiguous().numpy()
    _merge(*arrays, cand, cand_positions.contiguous().numpy(), unit_ids.contiguous().numpy(), False)
    return state


def update_topk(
    state: TopKState,
    m: Float[Tensor, "batch pos d_mlp"],
    valid: Bool[Tensor, "batch pos"],
    unit_ids: Int[Tensor, " batch"],
) -> TopKState:
    """Stream one batch of units into the top-k, in place; see the reference's ``update_topk``.

    Units whose valid positions have holes, and batches with a non-finite coefficient, take the reference.
    """
    check_update_args(state, m, valid, unit_ids)
    _check_unit_ids_nonnegative(unit_ids)
    _check_cpu(state)
    if m.shape[0] == 0:
        return state
    runs = _runs(valid)
    found = None if runs is None else _extremes(m, runs, state.values.dtype, signed=False)
    if found is None:
        return _ref.update_topk(state, m, valid, unit_ids)
    state, arrays = _numpy_state(state)
    _merge(*arrays, found[0], found[1], unit_ids.contiguous().numpy(), False)
    return state


def update_topk_signed(
    top: TopKState,
    bottom: TopKState,
    m: Float[Tensor, "batch pos d_mlp"],
    valid: Bool[Tensor, "batch pos"],
    unit_ids: Int[Tensor, " batch"],
) -> tuple[TopKState, TopKState]:
    """Update the top-k of ``m`` and of ``-m`` in one pass; see the reference's ``update_topk_signed``."""
    check_update_args(top, m, valid, unit_ids)
    check_update_args(bottom, m, valid, unit_ids)
    _check_unit_ids_nonnegative(unit_ids)
    _check_cpu(top)
    if m.shape[0] == 0:
        return top, bottom
    runs = _runs(valid) if top.values.dtype == bottom.values.dtype else None
    found = None if runs is None else _extremes(m, runs, top.values.dtype, signed=True)
    if found is None:
        return _ref.update_topk_signed(top, bottom, m, valid, unit_ids)
    (top, top_arrays), (bottom, bottom_arrays) = _numpy_state(top), _numpy_state(bottom)
    hi, hi_pos, lo, lo_pos = found
    ids = unit_ids.contiguous().numpy()
    _merge(*top_arrays, hi, hi_pos, ids, False)
    _merge(*bottom_arrays, lo, lo_pos, ids, True)
    return top, bottom


def batch_candidates(
    state: TopKState, m: Tensor, valid: Tensor, unit_ids: Tensor, bottom: TopKState | None = None
) -> tuple[tuple[Tensor, Tensor] | None, tuple[Tensor, Tensor] | None]:
    """Candidates of one batch, to merge later; see the reference's ``batch_candidates``.

    Every unit's extreme and its first position, for every key (the one pass computes them all);
    the bottom candidates are negated, as the bottom state ranks them. ``merge_topk`` of several
    batches' candidates at once equals one ``update_topk`` per batch.
    """
    check_update_args(state, m, valid, unit_ids)
    if bottom is not None:
        check_update_args(bottom, m, valid, unit_ids)
    _check_unit_ids_nonnegative(unit_ids)
    _check_cpu(state)
    if m.shape[0] == 0:
        return None, None
    same = bottom is None or bottom.values.dtype == state.values.dtype
    runs = _runs(valid) if same else None
    found = None if runs is None else _extremes(m, runs, state.values.dtype, signed=bottom is not None)
    if found is None:
        return _ref.batch_candidates(state, m, valid, unit_ids, bottom)
    hi, hi_pos, lo, lo_pos = (torch.from_numpy(a) for a in found)
    return (hi, hi_pos), None if bottom is None else (lo.neg_(), lo_pos)
