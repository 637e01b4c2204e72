"""Fast kernels and their pure-torch twins, picked by device.

Every kernel has a reference in torch (:mod:`ffkv_lens.kernels.topk`) and twins with the same
signatures: Triton for CUDA (:mod:`ffkv_lens.kernels.topk_triton`) and Numba for the CPU
(:mod:`ffkv_lens.kernels.topk_numba`). The functions here dispatch on the device of their tensors:
Triton on CUDA when ``triton`` imports, Numba on the CPU when ``numba`` imports, the reference
otherwise. The environment variable ``FFKV_LENS_KERNELS`` overrides the choice (read at every call):

- ``auto`` (or unset): the rule above.
- ``reference``: always the torch reference.
- ``numba``: Numba on the CPU (CUDA tensors then take the reference).
- ``triton``: always Triton; on the CPU this works only under ``TRITON_INTERPRET=1`` (set before
  ``triton`` is first imported), which is how the parity tests run without a GPU.

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

import functools
import importlib
import logging
import os
from types import ModuleType
from typing import Literal, get_args

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ffkv_lens.errors import ConfigError
from ffkv_lens.kernels import topk as _reference
from ffkv_lens.kernels.topk import TopKState, UnitPeaks, merge_states

__all__ = [
    "KERNELS_ENV",
    "Implementation",
    "TopKState",
    "UnitPeaks",
    "active_implementation",
    "batch_candidates",
    "merge_states",
    "merge_topk",
    "reduce_units",
    "update_topk",
    "update_topk_signed",
]

logger = logging.getLogger(__name__)

KERNELS_ENV = "FFKV_LENS_KERNELS"
"""Environment variable forcing an implementation: ``auto``, ``reference``, ``numba`` or ``triton``."""

Implementation = Literal["reference", "numba", "triton"]
_Choice = Literal["auto", "reference", "numba", "triton"]


def active_implementation(device: torch.device | str) -> Implementation:
    """Which implementation the dispatcher uses for tensors on ``device``.

    Args:
        device: A torch device or its name, e.g. ``"cpu"`` or ``"cuda:0"``.

    Returns:
        ``"triton"``, ``"numba"`` or ``"reference"``.

    Raises:
        ConfigError: ``FFKV_LENS_KERNELS`` has an unknown value, or forces Triton or Numba where it
            cannot run.
    """
    device = torch.device(device)
    choice = _env_choice()
    if choice == "reference":
        return "reference"
    if choice == "triton":
        _require_triton(device)
        return "triton"
    if choice == "numba" and _numba_backend() is None:
        raise ConfigError(
            f"{KERNELS_ENV}=numba but numba cannot be imported; install it (pip install numba) "
            f"or set {KERNELS_ENV}=reference."
        )
    if device.type == "cuda" and choice == "auto" and _triton_backend() is not None:
        return "triton"
    if device.type == "cpu" and _numba_backend() is not None:
        return "numba"
    return "reference"


def reduce_units(m: Float[Tensor, "batch pos d_mlp"], valid: Bool[Tensor, "batch pos"]) -> UnitPeaks:
    """Each unit's peak per key; see :func:`ffkv_lens.kernels.topk.reduce_units`."""
    return _backend(m.device).reduce_units(m, valid)


def merge_topk(
    state: TopKState,
    cand_values: Float[Tensor, "batch d_mlp"],
    cand_positions: Int[Tensor, "batch d_mlp"],
    unit_ids: Int[Tensor, " batch"],
) -> TopKState:
    """Merge candidates into the top-k; see :func:`ffkv_lens.kernels.topk.merge_topk`."""
    return _backend(cand_values.device).merge_topk(state, cand_values, cand_positions, unit_ids)


def batch_candidates(
    state: TopKState,
    m: Float[Tensor, "batch pos d_mlp"],
    valid: Bool[Tensor, "batch pos"],
    unit_ids: Int[Tensor, " batch"],
    bottom: TopKState | None = None,
) -> tuple[tuple[Tensor, Tensor] | None, tuple[Tensor, Tensor] | None]:
    """One batch's candidates, to merge later; see :func:`ffkv_lens.kernels.topk.batch_candidates`.

    Triton has no version of its own: on CUDA this is the reference (the search merges every batch there).
    """
    backend = _backend(m.device)
    return getattr(backend, "batch_candidates", _reference.batch_candidates)(state, m, valid, unit_ids, bottom)


def update_topk(
    state: TopKState,
    m: Float[Tensor, "batch pos d_mlp"],
    valid: Bool[Tensor, "batch pos"],
    unit_ids: Int[Tensor, " batch"],
) -> TopKState:
    """Stream a batch into the top-k; see :func:`ffkv_lens.kernels.topk.update_topk`."""
    return _backend(m.device).update_topk(state, m, valid, unit_ids)


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
    backend = _backend(m.device)
    if hasattr(backend, "update_topk_signed"):
        return backend.update_topk_signed(top, bottom, m, valid, unit_ids)
    return backend.update_topk(top, m, valid, unit_ids), backend.update_topk(bottom, m.neg(), valid, unit_ids)


def _backend(device: torch.device) -> ModuleType:
    chosen = active_implementation(device)
    backend = {"triton": _triton_backend, "numba": _numba_backend}.get(chosen, lambda: None)()
    return backend or _reference


def _env_choice() -> _Choice:
    value = os.environ.get(KERNELS_ENV, "auto").strip().lower() or "auto"
    if value not in get_args(_Choice):
        raise ConfigError(
            f"{KERNELS_ENV}={os.environ[KERNELS_ENV]!r} is not one of {list(get_args(_Choice))}; "
            f"unset it or pick one of those."
        )
    return value  # type: ignore[return-value]


def _require_triton(device: torch.device) -> None:
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(
            f"{KERNELS_ENV}=triton with tensors on {device}: Triton runs on CUDA, or on the CPU only with "
            f"TRITON_INTERPRET=1 set before triton is imported; move the tensors to CUDA or unset {KERNELS_ENV}."
        )
    if _triton_backend() is None:
        raise ConfigError(
            f"{KERNELS_ENV}=triton but triton cannot be imported; install it (pip install triton) "
            f"or set {KERNELS_ENV}=reference."
        )


@functools.cache
def _triton_backend() -> ModuleType | None:
    """The Triton implementation module, or None (logged once) if triton does not import."""
    try:
        return importlib.import_module("ffkv_lens.kernels.topk_triton")
    except ImportError as error:
        logger.info("Triton kernels unavailable (%s); using the torch reference.", error)
        return None


@functools.cache
def _numba_backend() -> ModuleType | None:
    """The Numba implementation module, or None (logged once) if numba does not import."""
    try:
        return importlib.import_module("ffkv_lens.kernels.topk_numba")
    except ImportError as error:
        logger.info("Numba kernels unavailable (%s); using the torch reference on the CPU.", error)
        return None
