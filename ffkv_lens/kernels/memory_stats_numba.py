"""Per-memory statistics on the CPU, compiled with Numba: one fused pass over the coefficients.

The twin of :func:`ffkv_lens.kernels.memory_stats.update_memory_stats` (the definition), with the same
signature. Keys run in blocks of 64 (a block's accumulators, histograms and reservoirs stay in cache;
each key's sums are added in row order), on one thread like the rest of the search's update (a
parallel region's spinning threads would take the core from the forward), and each coefficient is read
once: sums, active count, extremes, out-of-range counts, its bin, its priority (the same splitmix64
hash, in uint64 arithmetic) and, when the priority beats the
(memory, bin) reservoir's ``R``-th, an insertion into the sorted reservoir. Integers, bins, reservoirs,
minima and maxima are identical to the reference's; the float64 sums are added in another order, so
they agree to rounding (the parity tests allow 1e-12 relative). Coefficients must be finite (NaN has no
bin); a block holding a NaN is left to the reference.

Why: the reference runs about twenty full passes over each ``[n, d_mlp]`` block (the hash alone is a
dozen integer ops), a large share of a CPU forward; here it is one pass (docs/performance.md).
"""

from typing import no_type_check

import numba
import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from ffkv_lens.kernels import memory_stats as reference
from ffkv_lens.kernels.memory_stats import MemoryStatsState

__all__ = ["update_memory_stats"]

_JIT = {"cache": True, "nogil": True, "error_model": "numpy"}
_U64 = (1 << 64) - 1
_BLOCK = 64  # keys per block: their accumulators, histograms and reservoirs stay in cache


@numba.njit(inline="always", **_JIT)
@no_type_check  # the test-time jaxtyping import hook must not wrap what Numba compiles
def _mix(x):  # pragma: no cover - compiled
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@numba.njit(**_JIT)
@no_type_check  # the test-time jaxtyping import hook must not wrap what Numba compiles
def _bases(units, positions, salt):  # pragma: no cover - compiled
    """The per-position part of the priority hash (uint64)."""
    out = np.empty(units.shape[0], np.uint64)
    for i in range(units.shape[0]):
        out[i] = _mix(
            (np.uint64(units[i]) * np.uint64(0xD6E8FEB86659FD93))
            ^ (np.uint64(positions[i]) * np.uint64(0xA0761D6478BD642F))
            ^ salt
        )
    return out


@numba.njit(**_JIT)
@no_type_check  # the test-time jaxtyping import hook must not wrap what Numba compiles
def _all_finite(m):  # pragma: no cover - compiled
    for value in m.ravel():
        if not np.isfinite(value):
            return False
    return True


@numba.njit(**_JIT)
@no_type_check  # the test-time jaxtyping import hook must not wrap what Numba compiles
def _update(
    m,
    units,
    positions,
    base,
    keyhash,
    lo,
    hi,
    scale,
    threshold,
    sums,
    squares,
    active,
    low,
    high,
    hist,
    outside,
    prio,
    r_u,
    r_p,
    r_v,
):  # pragma: no cover - compiled
    """Blocks of ``_BLOCK`` keys; within a block, rows in order (each key's sums in row order)."""
    n, d = m.shape
    bins, samples = hist.shape[1], prio.shape[2]
    top, last = bins - 1, samples - 1
    for block in range((d + _BLOCK - 1) // _BLOCK):
        start = block * _BLOCK
        end = min(d, start + _BLOCK)
        for i in range(n):
            row, bi = m[i], base[i]
            for k in range(start, end):
                v = np.float64(row[k])
                sums[k] += v
                squares[k] += v * v
                active[k] += abs(v) > threshold
                low[k] = min(low[k], v)
                high[k] = max(high[k], v)
                if v < lo:
                    outside[k, 0] += 1
                elif v > hi:
                    outside[k, 1] += 1
                f = (v - lo) * scale
                b = 0 if f < 0.0 else (top if f >= bins else np.int64(f))  # truncation is floor for f >= 0
                hist[k, b] += 1
                p = np.int64(_mix(bi ^ keyhash[k]) >> np.uint64(1))
                if p < prio[k, b, last]:
                    j = last
                    while j > 0 and prio[k, b, j - 1] > p:
                        prio[k, b, j] = prio[k, b, j - 1]
                        r_u[k, b, j], r_p[k, b, j], r_v[k, b, j] = r_u[k, b, j - 1], r_p[k, b, j - 1], r_v[k, b, j - 1]
                        j -= 1
                    prio[k, b, j] = p
                    r_u[k, b, j], r_p[k, b, j], r_v[k, b, j] = units[i], positions[i], row[k]


def update_memory_stats(
    state: MemoryStatsState,
    m: Float[Tensor, "n d_mlp"],
    units: Int[Tensor, " n"],
    positions: Int[Tensor, " n"],
    *,
    lo: float,
    hi: float,
    threshold: float,
    salt: int,
) -> None:
    """:func:`ffkv_lens.kernels.memory_stats.update_memory_stats` of CPU float32/float64 ``m``, in one pass."""
    n, d_mlp = m.shape
    if n == 0:
        return
    values = m.detach().contiguous().numpy()
    if not _all_finite(values):
        reference.update_memory_stats(state, m, units, positions, lo=lo, hi=hi, threshold=threshold, salt=salt)
        return
    keyhash = reference.mix(torch.arange(d_mlp, dtype=torch.int64) * reference._GOLDEN + reference._GOLDEN)
    unit_ids, rows = units.long().contiguous().numpy(), positions.long().contiguous().numpy()
    _update(
        values, unit_ids, rows, _bases(unit_ids, rows, np.uint64(salt & _U64)),
        keyhash.numpy().view(np.uint64), float(lo), float(hi),
        state.hist.shape[1] / (hi - lo), float(threshold),
        *(t.numpy() for t in state[1:]),  # every accumulator but the count, updated in place
    )  # fmt: skip
    state.count.add_(n)
