"""Per-memory statistics on the CPU, compiled with Numba: one fused pass over the coefficients.

The twin of :func:`ffkv_lens.kernels.memory_stats.update_memory_stats` (the definition), with the same
signature. Each coefficient is read once: sums, active count, extremes, out-of-range counts, its bin,
its priority (the same splitmix64 hash, in uint64 arithmetic) and, when the priority beats the
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
def _update(
    m,
    units,
    positions,
    keyhash,
    salt,
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
    n, d = m.shape
    bins, samples = hist.shape[1], prio.shape[2]
    top = bins - 1
    for i in range(n):
        base = _mix(
            (np.uint64(units[i]) * np.uint64(0xD6E8FEB86659FD93))
            ^ (np.uint64(positions[i]) * np.uint64(0xA0761D6478BD642F))
            ^ salt
        )
        row = m[i]
        for k in range(d):
            v = np.float64(row[k])
            sums[k] += v
            squares[k] += v * v
            if abs(v) > threshold:
                active[k] += 1
            if v < low[k]:
                low[k] = v
            if v > high[k]:
                high[k] = v
            if v < lo:
                outside[k, 0] += 1
            elif v > hi:
                outside[k, 1] += 1
            f = np.floor((v - lo) * scale)
            b = 0 if f < 0 else (top if f > top else np.int64(f))
            hist[k, b] += 1
            p = np.int64(_mix(base ^ keyhash[k]) >> np.uint64(1))
            cell = prio[k, b]
            if p < cell[samples - 1]:
                j = samples - 1
                while j > 0 and cell[j - 1] > p:
                    cell[j] = cell[j - 1]
                    r_u[k, b, j], r_p[k, b, j], r_v[k, b, j] = r_u[k, b, j - 1], r_p[k, b, j - 1], r_v[k, b, j - 1]
                    j -= 1
                cell[j] = p
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
    if not bool(torch.isfinite(m).all()):
        reference.update_memory_stats(state, m, units, positions, lo=lo, hi=hi, threshold=threshold, salt=salt)
        return
    values = m.detach().contiguous().numpy()
    keyhash = reference.mix(torch.arange(d_mlp, dtype=torch.int64) * reference._GOLDEN + reference._GOLDEN)
    _update(
        values, units.long().contiguous().numpy(), positions.long().contiguous().numpy(),
        keyhash.numpy().view(np.uint64), np.uint64(salt & _U64), float(lo), float(hi),
        state.hist.shape[1] / (hi - lo), float(threshold),
        *(t.numpy() for t in state[1:]),  # every accumulator but the count, updated in place
    )  # fmt: skip
    state.count.add_(n)
