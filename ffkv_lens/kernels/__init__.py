"""Fast kernels and their pure-torch twins, picked at every call: the only entry point of the analysis.

Each operation has a reference in torch (the definition) and twins with the same signatures, side by side:

- top-k state of the trigger search: :mod:`~ffkv_lens.kernels.topk` (reference),
  :mod:`~ffkv_lens.kernels.topk_numba` (CPU), :mod:`~ffkv_lens.kernels.topk_triton` (CUDA);
  :func:`reduce_units`, :func:`merge_topk`, :func:`batch_candidates`, :func:`update_topk`,
  :func:`update_topk_signed`, and the search's merge policy :func:`grouped_merge_units`;
- per-row statistics of value logits: :mod:`~ffkv_lens.kernels.value_stats` (reference),
  :mod:`~ffkv_lens.kernels.value_stats_numba` (CPU); :func:`value_row_stats`;
- per-memory statistics of the trigger search: :mod:`~ffkv_lens.kernels.memory_stats` (reference, also
  the CUDA path), :mod:`~ffkv_lens.kernels.memory_stats_numba` (CPU); :func:`update_memory_stats`;
- residual states read in the vocabulary: :mod:`~ffkv_lens.kernels.readouts` (reference),
  :mod:`~ffkv_lens.kernels.readouts_tiled` (any device); :func:`state_tops`, :func:`state_top`.

:mod:`ffkv_lens.kernels.dispatch` alone reads the environment variable ``FFKV_LENS_KERNELS`` (``auto``,
``reference``, ``numba``, ``triton``; its docstring says what each picks per operation) and validates it
at every call of every operation here: another value raises :class:`~ffkv_lens.errors.ConfigError`.

Example:
    >>> import torch
    >>> from ffkv_lens.kernels import TopKState, active_implementation, update_topk
    >>> active_implementation("cpu")
    'numba'
    >>> state = TopKState.empty(d_mlp=4, k=3)
    >>> m, valid = torch.randn(2, 5, 4), torch.ones(2, 5, dtype=torch.bool)
    >>> state = update_topk(state, m, valid, unit_ids=torch.tensor([10, 11]))
    >>> state.units[:, 2].tolist()
    [-1, -1, -1, -1]
"""

from types import ModuleType
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ffkv_lens.kernels import memory_stats, readouts, readouts_tiled, value_stats
from ffkv_lens.kernels import topk as _reference
from ffkv_lens.kernels.dispatch import (
    KERNELS_ENV,
    Implementation,
    active_implementation,
    grouped_merge_units,
    kernel_choice,
    numba_module,
    triton_module,
)
from ffkv_lens.kernels.readouts import StateTops
from ffkv_lens.kernels.readouts_tiled import VOCAB_TILE
from ffkv_lens.kernels.topk import TopKState, UnitPeaks, merge_states

__all__ = [
    "KERNELS_ENV",
    "Implementation",
    "StateTops",
    "TopKState",
    "UnitPeaks",
    "active_implementation",
    "batch_candidates",
    "grouped_merge_units",
    "kernel_choice",
    "merge_states",
    "merge_topk",
    "reduce_units",
    "state_top",
    "state_tops",
    "update_topk",
    "update_memory_stats",
    "update_topk_signed",
    "value_row_stats",
]


def reduce_units(m: Float[Tensor, "batch pos d_mlp"], valid: Bool[Tensor, "batch pos"]) -> UnitPeaks:
    """Each unit's peak per key; see :func:`ffkv_lens.kernels.topk.reduce_units`."""
    return _topk_backend(m.device).reduce_units(m, valid)


def merge_topk(
    state: TopKState,
    cand_values: Float[Tensor, "batch d_mlp"],
    cand_positions: Int[Tensor, "batch d_mlp"],
    unit_ids: Int[Tensor, " batch"],
) -> TopKState:
    """Merge candidates into the top-k; see :func:`ffkv_lens.kernels.topk.merge_topk`."""
    return _topk_backend(cand_values.device).merge_topk(state, cand_values, cand_positions, unit_ids)


def batch_candidates(
    state: TopKState,
    m: Float[Tensor, "batch pos d_mlp"],
    valid: Bool[Tensor, "batch pos"],
    unit_ids: Int[Tensor, " batch"],
    bottom: TopKState | None = None,
) -> tuple[tuple[Tensor, Tensor] | None, tuple[Tensor, Tensor] | None]:
    """One batch's candidates, to merge later; see :func:`ffkv_lens.kernels.topk.batch_candidates`.

    Triton has no version of its own: on CUDA this is the reference (the search merges every batch there,
    :func:`grouped_merge_units`).
    """
    return _topk_operation("batch_candidates", m.device)(state, m, valid, unit_ids, bottom)


def update_topk(
    state: TopKState,
    m: Float[Tensor, "batch pos d_mlp"],
    valid: Bool[Tensor, "batch pos"],
    unit_ids: Int[Tensor, " batch"],
) -> TopKState:
    """Stream a batch into the top-k; see :func:`ffkv_lens.kernels.topk.update_topk`."""
    return _topk_backend(m.device).update_topk(state, m, valid, unit_ids)


def update_topk_signed(
    top: TopKState,
    bottom: TopKState,
    m: Float[Tensor, "batch pos d_mlp"],
    valid: Bool[Tensor, "batch pos"],
    unit_ids: Int[Tensor, " batch"],
) -> tuple[TopKState, TopKState]:
    """Stream a batch into the top-k of ``m`` and of ``-m``; see :func:`ffkv_lens.kernels.topk.update_topk_signed`.

    A backend without a fused version runs its ``update_topk`` on ``m`` and on ``-m``.
    """
    backend = _topk_backend(m.device)
    if hasattr(backend, "update_topk_signed"):
        return backend.update_topk_signed(top, bottom, m, valid, unit_ids)
    return backend.update_topk(top, m, valid, unit_ids), backend.update_topk(bottom, m.neg(), valid, unit_ids)


def value_row_stats(
    logits: Float[Tensor, "n d_vocab"], k: int, targets: dict[int, Tensor]
) -> tuple[tuple[Tensor, ...], dict[int, Tensor]]:
    """Top/bottom ``k``, max probability, target ranks per row: :func:`~ffkv_lens.kernels.value_stats.value_row_stats`.

    The Numba twin runs on CPU float32/float64 logits when the top-k operations would run Numba there
    (``auto`` or ``numba``); otherwise the reference. Token ids and ranks are identical; ``max_prob``
    agrees within float32 rounding (summed in float64 by the twin).
    """
    kernel_choice()
    usable = logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.float64)
    if usable and active_implementation(logits.device) == "numba":
        twin = numba_module("value_stats")
        if twin is not None:
            return twin.value_row_stats(logits, k, targets)
    return value_stats.value_row_stats(logits, k, targets)


def update_memory_stats(
    state: memory_stats.MemoryStatsState,
    m: Float[Tensor, "n d_mlp"],
    units: Int[Tensor, " n"],
    positions: Int[Tensor, " n"],
    *,
    lo: float,
    hi: float,
    threshold: float,
    salt: int,
) -> None:
    """Add candidate positions to a layer's statistics: :func:`~ffkv_lens.kernels.memory_stats.update_memory_stats`.

    The Numba twin (one fused pass) runs on CPU float32/float64 coefficients when the top-k operations would
    run Numba there (``auto`` or ``numba``); otherwise the reference (CUDA included). Integers, reservoirs,
    minima and maxima are identical; the float64 sums agree to summation-order rounding.
    """
    kernel_choice()
    usable = m.device.type == "cpu" and m.dtype in (torch.float32, torch.float64)
    if usable and active_implementation(m.device) == "numba":
        twin = numba_module("memory_stats")
        if twin is not None:
            twin.update_memory_stats(state, m, units, positions, lo=lo, hi=hi, threshold=threshold, salt=salt)
            return
    memory_stats.update_memory_stats(state, m, units, positions, lo=lo, hi=hi, threshold=threshold, salt=salt)


def state_tops(
    model: Any,
    resid_before: Float[Tensor, "n d_model"],
    ffn_output: Float[Tensor, "n d_model"],
    resid_after: Float[Tensor, "n d_model"],
    targets: Int[Tensor, " n"],
) -> StateTops:
    """``top(r)``, ``p(target | r)``, ``top(y)``, ``top(o)`` of each row; see :mod:`ffkv_lens.kernels.readouts`.

    The tiled twin when the readout allows it (float32 ``readout_parts()``), unless ``reference`` is forced.
    """
    twin = readouts_tiled if _tiles(model) else readouts
    return twin.state_tops(model, resid_before, ffn_output, resid_after, targets)


def state_top(model: Any, states: Float[Tensor, "n d_model"], *, tile: int = VOCAB_TILE) -> Int[Tensor, " n"]:
    """``argmax readout(x)`` of each row: the tiled twin (``tile`` columns at a time) as :func:`state_tops` picks."""
    if _tiles(model):
        return readouts_tiled.state_top(model, states, tile=tile)
    return readouts.state_top(model, states)


def _tiles(model: Any) -> bool:
    """Whether the state readouts take their tiled twin (every choice but ``reference``, where the readout allows)."""
    return kernel_choice() != "reference" and readouts.tileable_parts(model) is not None


def _topk_backend(device: torch.device) -> ModuleType:
    chosen = active_implementation(device)
    backend = {"triton": triton_module, "numba": numba_module}.get(chosen, lambda _: None)("topk")
    return backend or _reference


def _topk_operation(name: str, device: torch.device) -> Any:
    """The chosen backend's ``name``, or the reference's where that backend has none."""
    return getattr(_topk_backend(device), name, getattr(_reference, name))
