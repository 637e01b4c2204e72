"""Load a model as a TransformerLens ``TransformerBridge``.

Accepts an embedded model name (converted once into a cached folder by
:mod:`ffkv_lens.models`), a local Hugging Face folder, or a hub id.

Example:
    >>> from ffkv_lens.adapters.loading import load_model
    >>> bridge = load_model("smollm2-135m", device="cpu")  # doctest: +SKIP
    >>> bridge.cfg.n_layers, bridge.cfg.d_mlp  # doctest: +SKIP
    (30, 1536)
"""

import logging
import os
import time

import torch
from transformer_lens.model_bridge import TransformerBridge

from ffkv_lens.errors import ConfigError, ModelNotAvailableError
from ffkv_lens.models import list_models, resolve_model

__all__ = ["load_model"]

logger = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        if name not in _DTYPES:
            raise ConfigError(f"dtype {dtype!r} is not supported; pass one of {sorted(_DTYPES)} (or the torch dtype).")
        return _DTYPES[name]
    if dtype not in _DTYPES.values():
        raise ConfigError(
            f"dtype {dtype} is not supported; pass one of {[str(d) for d in _DTYPES.values()]}: "
            "model weights must be floating point."
        )
    return dtype


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device {device!r} is not a torch device; pass 'cpu', 'cuda', 'cuda:0' or None.") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device {device!r} asks for CUDA, but torch {torch.__version__} sees no CUDA device. "
            "Pass device='cpu' (or None to pick automatically), or install a CUDA build of torch."
        )
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ConfigError(
            f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s) visible. "
            "Pass an index below that, or 'cuda'."
        )
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {device!r} asks for MPS, which is not available here; pass 'cpu' or None.")
    return resolved


def load_model(
    name_or_path: str | os.PathLike[str],
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str = torch.float32,
) -> TransformerBridge:
    """Load a causal language model as a ``TransformerBridge`` with raw HF weights.

    Args:
        name_or_path: An embedded model name (see :func:`ffkv_lens.models.list_models`;
            converted once into ``$FFKV_LENS_CACHE``), a local Hugging Face folder, or a hub id.
        device: Where to put the model; ``None`` picks CUDA when available, else the CPU.
        dtype: Floating dtype of the weights (a ``torch.dtype`` or its name, e.g. ``"bfloat16"``).

    Returns:
        The booted bridge (``TransformerBridge.boot_transformers``), in eval mode.

    Raises:
        ConfigError: If ``device`` or ``dtype`` is invalid, or a folder is not a model folder.
        ModelNotAvailableError: If an embedded model is not installed, a local path does not
            exist, or a hub id cannot be loaded (no hub reachable, or no such model).
        ModelConversionError: If converting an embedded model fails.
    """
    torch_dtype = _resolve_dtype(dtype)
    torch_device = _resolve_device(device)
    folder = resolve_model(name_or_path)
    start = time.perf_counter()
    try:
        bridge = TransformerBridge.boot_transformers(folder, device=torch_device, dtype=torch_dtype)
    except OSError as exc:
        if os.path.isdir(folder):
            raise
        raise ModelNotAvailableError(
            f"Could not load {folder!r}: it is neither an embedded model {list_models()} nor a local folder, "
            f"and loading it as a hub id failed ({exc}). Pass an embedded name or a local folder, "
            "or make a model hub reachable (unset HF_HUB_OFFLINE)."
        ) from exc
    # Recorded with results: the name the user gave (an embedded name, not its cache folder).
    bridge.cfg.model_name = str(name_or_path)
    logger.info("Loaded %s on %s (%s) in %.1f s", name_or_path, torch_device, torch_dtype, time.perf_counter() - start)
    return bridge
