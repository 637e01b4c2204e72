"""The one place that reads ``FFKV_LENS_KERNELS`` and decides which implementation runs.

Every operation of :mod:`ffkv_lens.kernels` asks this module, at every call, which twin to run:
:func:`kernel_choice` reads and validates the variable (an unknown value raises
:class:`~ffkv_lens.errors.ConfigError` listing the allowed ones), :func:`active_implementation` turns it
into the implementation the compiled twins use on a device, and :func:`grouped_merge_units` is the
trigger search's merge policy. The values:

- ``auto`` (or unset): Triton on CUDA when ``triton`` imports, Numba on the CPU when ``numba``
  imports, the torch reference otherwise; the state readouts take their tiled pass.
- ``reference``: every operation runs its torch reference (the state readouts included).
- ``numba``: Numba on the CPU (CUDA tensors then take the reference); the state readouts, which have
  no Numba twin, take their tiled pass (plain torch) as under ``auto``.
- ``triton``: always Triton for the top-k operations; on the CPU this works only under
  ``TRITON_INTERPRET=1`` (set before ``triton`` is first imported), which is how the parity tests
  run without a GPU. The value statistics then take their reference, the state readouts their tiled pass.

Example:
    >>> from ffkv_lens.kernels.dispatch import active_implementation, kernel_choice
    >>> kernel_choice(), active_implementation("cpu")
    ('auto', 'numba')
"""

import functools
import importlib
import logging
import os
from types import ModuleType
from typing import Literal, get_args

import torch

from ffkv_lens.errors import ConfigError

__all__ = [
    "KERNELS_ENV",
    "MERGE_UNITS",
    "Choice",
    "Implementation",
    "active_implementation",
    "grouped_merge_units",
    "kernel_choice",
    "numba_module",
    "triton_module",
]

logger = logging.getLogger(__name__)

KERNELS_ENV = "FFKV_LENS_KERNELS"
"""Environment variable forcing an implementation: ``auto``, ``reference``, ``numba`` or ``triton``."""

Implementation = Literal["reference", "numba", "triton"]
Choice = Literal["auto", "reference", "numba", "triton"]

# On the CPU, a layer's candidates are merged into its state once this many units are pending: a
# merge costs about the same for 8 or 64 units (sorting k + batch entries per key), so grouping
# divides its cost while states fill (docs/performance.md). Gating still uses the current state.
MERGE_UNITS = 64


def kernel_choice() -> Choice:
    """The value of ``FFKV_LENS_KERNELS`` (``"auto"`` when unset or blank), read now.

    Raises:
        ConfigError: The variable holds another value; the message lists the allowed ones.
    """
    value = os.environ.get(KERNELS_ENV, "auto").strip().lower() or "auto"
    if value not in get_args(Choice):
        raise ConfigError(
            f"{KERNELS_ENV}={os.environ[KERNELS_ENV]!r} is not one of {list(get_args(Choice))}; "
            f"unset it or pick one of those."
        )
    return value  # type: ignore[return-value]


def active_implementation(device: torch.device | str) -> Implementation:
    """Which implementation the top-k operations use for tensors on ``device``.

    Args:
        device: A torch device or its name, e.g. ``"cpu"`` or ``"cuda:0"``.

    Returns:
        ``"triton"``, ``"numba"`` or ``"reference"``.

    Raises:
        ConfigError: ``FFKV_LENS_KERNELS`` has an unknown value, or forces Triton or Numba where it
            cannot run.
    """
    device = torch.device(device)
    choice = kernel_choice()
    if choice == "reference":
        return "reference"
    if choice == "triton":
        _require_triton(device)
        return "triton"
    if choice == "numba" and numba_module("topk") is None:
        raise ConfigError(
            f"{KERNELS_ENV}=numba but numba cannot be imported; install it (pip install numba) "
            f"or set {KERNELS_ENV}=reference."
        )
    if device.type == "cuda" and choice == "auto" and triton_module("topk") is not None:
        return "triton"
    if device.type == "cpu" and numba_module("topk") is not None:
        return "numba"
    return "reference"


def grouped_merge_units(device: torch.device | str) -> int | None:
    """How many units of candidates the trigger search collects per layer before merging them.

    On the CPU :data:`MERGE_UNITS` (the candidates of each batch come from ``batch_candidates``, merged
    with ``merge_topk`` in groups); on other devices None: every batch goes through ``update_topk`` at
    once. Both give the same states, under every implementation.

    Raises:
        ConfigError: ``FFKV_LENS_KERNELS`` has an unknown value.
    """
    kernel_choice()
    return MERGE_UNITS if torch.device(device).type == "cpu" else None


def _require_triton(device: torch.device) -> None:
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(
            f"{KERNELS_ENV}=triton with tensors on {device}: Triton runs on CUDA, or on the CPU only with "
            f"TRITON_INTERPRET=1 set before triton is imported; move the tensors to CUDA or unset {KERNELS_ENV}."
        )
    if triton_module("topk") is None:
        raise ConfigError(
            f"{KERNELS_ENV}=triton but triton cannot be imported; install it (pip install triton) "
            f"or set {KERNELS_ENV}=reference."
        )


@functools.cache
def triton_module(operation: str) -> ModuleType | None:
    """``ffkv_lens.kernels.<operation>_triton``, or None (logged once) if triton does not import."""
    try:
        return importlib.import_module(f"ffkv_lens.kernels.{operation}_triton")
    except ImportError as error:
        logger.info("Triton kernels of %s unavailable (%s); using the torch reference.", operation, error)
        return None


@functools.cache
def numba_module(operation: str) -> ModuleType | None:
    """``ffkv_lens.kernels.<operation>_numba``, or None (logged once) if numba does not import."""
    try:
        return importlib.import_module(f"ffkv_lens.kernels.{operation}_numba")
    except ImportError as error:
        logger.info("Numba kernels of %s unavailable (%s); using the torch reference on the CPU.", operation, error)
        return None
