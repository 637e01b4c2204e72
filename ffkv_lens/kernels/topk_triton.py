"""Triton twin of :mod:`ffkv_lens.kernels.topk`: same signatures, same results, no host synchronisation.

Importing this module imports ``triton``; :mod:`ffkv_lens.kernels` imports it only when it is chosen.

:func:`update_topk` is two kernel launches and one ``zeros``:

1. ``_reduce_kernel``, grid ``(ceil(d_mlp / BLOCK_D), batch)``: one program per (unit, block of keys)
   sweeps the unit's positions in ``[BLOCK_T, BLOCK_D]`` tiles, keeping the running maximum and its
   first position (``tl.max`` breaks ties to the left, a later tile must be strictly larger). With
   ``GATE`` it then tests each key's candidate against the state's k-th entry (value greater, or equal
   with a lower unit id) and appends the passing unit's batch index to that key's list with an
   ``atomic_add`` on the key's counter (list order does not matter: the merge ranks exactly).
2. ``_merge_kernel``, grid ``(d_mlp,)``: one program per key loops over its passing candidates in
   chunks of ``CHUNK``; a key with none (the usual case once warm) does no work. Per chunk the state
   row (``K_PAD`` slots) and the chunk are ranked by pairwise comparison under the ranking rule: a
   state entry's new rank is its slot plus the number of chunk candidates beating it, a candidate's is
   the number of state entries and chunk candidates beating it. Entries with rank < k are scattered to
   their rank, in place, between two barriers.

:func:`merge_topk` runs the gate alone (``_gate_kernel``) and then the merge kernel; :func:`reduce_units`
runs the reduce kernel without the gate.

Limits: ``k <= MAX_K`` (the ``[K_PAD, CHUNK]`` comparison tiles live in registers); larger states fall
back to the reference with a warning (logged once). Positions and unit ids are int64, the list of
passing candidates is int32 (``batch < 2**31``). The state must be contiguous (one from
``TopKState.empty`` is); otherwise a contiguous copy is updated and returned. NaN coefficients are
not supported (the reference drops them, these kernels may not).

Example:
    >>> from ffkv_lens.kernels import topk_triton  # doctest: +SKIP
    >>> state = topk_triton.update_topk(state, m, valid, unit_ids)  # doctest: +SKIP
"""

import logging
from typing import no_type_check

import torch
import triton
import triton.language as tl
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ffkv_lens.kernels import topk as reference
from ffkv_lens.kernels.topk import TopKState, UnitPeaks

__all__ = ["MAX_K", "merge_topk", "reduce_units", "supports", "update_topk"]

logger = logging.getLogger(__name__)

MAX_K = 256
"""Largest ``k`` the merge kernel handles; larger states use the reference."""
BLOCK_D = 64
"""Keys per program of the reduce and gate kernels."""
BLOCK_T = 32
"""Positions per tile of the reduce kernel."""
CHUNK = 32
"""Candidates ranked at once by the merge kernel."""

_warned: set[str] = set()


@triton.jit
@no_type_check  # keeps jaxtyping's test-time import hook off the kernels
def _gate(value, b, offs_d, dmask, state_v_ptr, state_u_ptr, units_ptr, count_ptr, idx_ptr, K, B):
    """Append batch index ``b`` to the list of every key whose k-th entry ``value`` beats."""
    unit = tl.load(units_ptr + b)
    kth = offs_d.to(tl.int64) * K + K - 1
    kth_v = tl.load(state_v_ptr + kth, mask=dmask, other=float("inf"))
    kth_u = tl.load(state_u_ptr + kth, mask=dmask, other=-1)
    passing = dmask & ((value > kth_v) | ((value == kth_v) & (unit < kth_u)))
    slot = tl.atomic_add(count_ptr + offs_d, 1, mask=passing)
    tl.store(idx_ptr + offs_d.to(tl.int64) * B + slot, b.to(tl.int32), mask=passing)


@triton.jit
@no_type_check  # keeps jaxtyping's test-time import hook off the kernels
def _reduce_kernel(
    m_ptr, valid_ptr, out_v_ptr, out_p_ptr, state_v_ptr, state_u_ptr, units_ptr, count_ptr, idx_ptr,
    T, D, K, B, stride_mb, stride_mt, stride_md, stride_vb, stride_vt,
    GATE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Peak value and first peak position of unit ``program_id(1)`` for a block of keys (+ gate)."""
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    out_dtype = out_v_ptr.dtype.element_ty
    best_v = tl.full([BLOCK_D], float("-inf"), out_dtype)
    best_p = tl.full([BLOCK_D], -1, tl.int64)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        ok = tl.load(valid_ptr + b * stride_vb + offs_t * stride_vt, mask=offs_t < T, other=0) != 0
        ptrs = m_ptr + b * stride_mb + offs_t[:, None].to(tl.int64) * stride_mt + offs_d[None, :] * stride_md
        tile = tl.load(ptrs, mask=ok[:, None] & dmask[None, :], other=float("-inf")).to(out_dtype)
        tile_v, tile_i = tl.max(tile, axis=0, return_indices=True, return_indices_tie_break_left=True)
        better = tile_v > best_v
        best_p = tl.where(better, t0 + tile_i.to(tl.int64), best_p)
        best_v = tl.where(better, tile_v, best_v)
    best_p = tl.where(best_v == float("-inf"), -1, best_p)
    tl.store(out_v_ptr + b * D + offs_d, best_v, mask=dmask)
    tl.store(out_p_ptr + b * D + offs_d, best_p, mask=dmask)
    if GATE:
        _gate(best_v, b, offs_d, dmask, state_v_ptr, state_u_ptr, units_ptr, count_ptr, idx_ptr, K, B)


@triton.jit
@no_type_check  # keeps jaxtyping's test-time import hook off the kernels
def _gate_kernel(cand_v_ptr, state_v_ptr, state_u_ptr, units_ptr, count_ptr, idx_ptr, D, K, B, BLOCK_D: tl.constexpr):
    """The gate of :func:`_reduce_kernel` on precomputed candidates ``[batch, d_mlp]``."""
    b = tl.program_id(1).to(tl.int64)
    offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    value = tl.load(cand_v_ptr + b * D + offs_d, mask=dmask, other=float("-inf"))
    value = value.to(state_v_ptr.dtype.element_ty)
    _gate(value, b, offs_d, dmask, state_v_ptr, state_u_ptr, units_ptr, count_ptr, idx_ptr, K, B)


@triton.jit
@no_type_check  # keeps jaxtyping's test-time import hook off the kernels
def _beats(va, ua, vb, ub):
    """The ranking rule: ``a`` before ``b`` if its value is larger, or equal with a lower unit id."""
    return (va > vb) | ((va == vb) & (ua < ub))


@triton.jit
@no_type_check  # keeps jaxtyping's test-time import hook off the kernels
def _merge_kernel(
    state_v_ptr, state_u_ptr, state_p_ptr, cand_v_ptr, cand_p_ptr, units_ptr, count_ptr, idx_ptr,
    D, K, B, K_PAD: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    """Merge key ``program_id(0)``'s passing candidates into its state row, ``CHUNK`` at a time."""
    d = tl.program_id(0).to(tl.int64)
    n = tl.load(count_ptr + d)
    row = d * K
    offs_k = tl.arange(0, K_PAD)
    kmask = offs_k < K
    for c0 in range(0, n, CHUNK):
        sv = tl.load(state_v_ptr + row + offs_k, mask=kmask, other=float("-inf"))
        su = tl.load(state_u_ptr + row + offs_k, mask=kmask, other=-1)
        sp = tl.load(state_p_ptr + row + offs_k, mask=kmask, other=-1)
        offs_c = c0 + tl.arange(0, CHUNK)
        cmask = offs_c < n
        cb = tl.load(idx_ptr + d * B + offs_c, mask=cmask, other=0).to(tl.int64)
        cv = tl.load(cand_v_ptr + cb * D + d, mask=cmask, other=float("-inf")).to(sv.dtype)
        cp = tl.load(cand_p_ptr + cb * D + d, mask=cmask, other=-1)
        cu = tl.load(units_ptr + cb, mask=cmask, other=-1)
        both = kmask[:, None] & cmask[None, :]
        c_over_s = _beats(cv[None, :], cu[None, :], sv[:, None], su[:, None]) & both  # [K_PAD, CHUNK]
        s_over_c = both & ~c_over_s  # a total order: distinct units never tie
        c_over_c = _beats(cv[:, None], cu[:, None], cv[None, :], cu[None, :]) & cmask[:, None]
        s_rank = offs_k + tl.sum(c_over_s.to(tl.int32), axis=1)
        c_rank = tl.sum(s_over_c.to(tl.int32), axis=0) + tl.sum(c_over_c.to(tl.int32), axis=0)
        tl.debug_barrier()  # every lane has read the row before any lane overwrites it
        s_keep = kmask & (s_rank < K)
        tl.store(state_v_ptr + row + s_rank, sv, mask=s_keep)
        tl.store(state_u_ptr + row + s_rank, su, mask=s_keep)
        tl.store(state_p_ptr + row + s_rank, sp, mask=s_keep)
        c_keep = cmask & (c_rank < K)
        tl.store(state_v_ptr + row + c_rank, cv, mask=c_keep)
        tl.store(state_u_ptr + row + c_rank, cu, mask=c_keep)
        tl.store(state_p_ptr + row + c_rank, cp, mask=c_keep)
        tl.debug_barrier()  # the row is complete before the next chunk reads it


def supports(state: TopKState) -> bool:
    """Whether the kernels handle this state (``k <= MAX_K``); logs once when they do not."""
    if state.k <= MAX_K:
        return True
    reason = f"k={state.k} > MAX_K={MAX_K}"
    if reason not in _warned:
        _warned.add(reason)
        logger.warning("Triton top-k kernels do not handle %s; using the torch reference instead.", reason)
    return False


def reduce_units(m: Float[Tensor, "batch pos d_mlp"], valid: Bool[Tensor, "batch pos"]) -> UnitPeaks:
    """Triton twin of :func:`ffkv_lens.kernels.topk.reduce_units`."""
    reference.check_reduce_args(m, valid)
    return _launch_reduce(m, valid, m.dtype, gate=None)


def merge_topk(
    state: TopKState,
    cand_values: Float[Tensor, "batch d_mlp"],
    cand_positions: Int[Tensor, "batch d_mlp"],
    unit_ids: Int[Tensor, " batch"],
) -> TopKState:
    """Triton twin of :func:`ffkv_lens.kernels.topk.merge_topk` (unit ids are not checked for sign)."""
    reference.check_merge_args(state, cand_values, cand_positions, unit_ids)
    if not supports(state):
        return reference.merge_topk(state, cand_values, cand_positions, unit_ids)
    batch, d_mlp = cand_values.shape
    if batch == 0 or d_mlp == 0:
        return state
    state = TopKState(*(t.contiguous() for t in state))
    cand_values, cand_positions, unit_ids = cand_values.contiguous(), cand_positions.contiguous(), unit_ids.contiguous()
    count, idx = _lists(d_mlp, batch, cand_values.device)
    grid = (triton.cdiv(d_mlp, BLOCK_D), batch)
    _gate_kernel[grid](cand_values, state.values, state.units, unit_ids, count, idx, d_mlp, state.k, batch, BLOCK_D)
    _launch_merge(state, cand_values, cand_positions, unit_ids, count, idx)
    return state


def update_topk(
    state: TopKState,
    m: Float[Tensor, "batch pos d_mlp"],
    valid: Bool[Tensor, "batch pos"],
    unit_ids: Int[Tensor, " batch"],
) -> TopKState:
    """Triton twin of :func:`ffkv_lens.kernels.topk.update_topk`: reduce + gate, then merge."""
    reference.check_update_args(state, m, valid, unit_ids)
    if not supports(state):
        return reference.update_topk(state, m, valid, unit_ids)
    batch, _, d_mlp = m.shape
    if batch == 0 or d_mlp == 0:
        return state
    state = TopKState(*(t.contiguous() for t in state))
    unit_ids = unit_ids.contiguous()
    count, idx = _lists(d_mlp, batch, m.device)
    dtype = reference.compare_dtype(m.dtype, state.values.dtype)
    peaks = _launch_reduce(m, valid, dtype, gate=(state, unit_ids, count, idx))
    _launch_merge(state, peaks.values, peaks.positions, unit_ids, count, idx)
    return state


def _lists(d_mlp: int, batch: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Per-key counters (zeroed) and candidate lists of the gate."""
    return torch.zeros(d_mlp, dtype=torch.int32, device=device), torch.empty(
        (d_mlp, batch), dtype=torch.int32, device=device
    )


def _launch_reduce(
    m: Tensor, valid: Tensor, dtype: torch.dtype, gate: tuple[TopKState, Tensor, Tensor, Tensor] | None
) -> UnitPeaks:
    """Run the reduce kernel, gated into ``(state, unit_ids, count, idx)`` when given."""
    batch, pos, d_mlp = m.shape
    values = torch.empty((batch, d_mlp), dtype=dtype, device=m.device)
    positions = torch.empty((batch, d_mlp), dtype=torch.int64, device=m.device)
    if batch == 0 or d_mlp == 0:
        return UnitPeaks(values, positions)
    valid8 = valid.view(torch.uint8)
    if gate is None:
        state_v = state_u = units = count = idx = positions  # unused when GATE is False
        k, is_gated = 1, False
    else:
        (state_v, state_u, _), units, count, idx = gate
        k, is_gated = state_v.shape[1], True
    grid = (triton.cdiv(d_mlp, BLOCK_D), batch)
    _reduce_kernel[grid](
        m, valid8, values, positions, state_v, state_u, units, count, idx,
        pos, d_mlp, k, batch, m.stride(0), m.stride(1), m.stride(2), valid8.stride(0), valid8.stride(1),
        GATE=is_gated, BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D,
    )  # fmt: skip
    return UnitPeaks(values, positions)


def _launch_merge(
    state: TopKState, cand_values: Tensor, cand_positions: Tensor, unit_ids: Tensor, count: Tensor, idx: Tensor
) -> None:
    """Run the merge kernel over every key (keys with no passing candidate return at once)."""
    d_mlp, k = state.values.shape
    k_pad = triton.next_power_of_2(k)
    _merge_kernel[(d_mlp,)](
        state.values, state.units, state.positions, cand_values, cand_positions, unit_ids, count, idx,
        d_mlp, k, cand_values.shape[0], K_PAD=k_pad, CHUNK=CHUNK, num_warps=4 if k_pad <= 64 else 8,
    )  # fmt: skip
