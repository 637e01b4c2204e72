"""Adapters: the only package of ffkv_lens that imports transformer_lens.

:func:`make_adapter` picks a backend by the model's class (``TransformerBridge``, TransformerLens
3.9 and 4.3+; ``HookedTransformer``, TransformerLens 3.x) and a family by its architecture
(:mod:`ffkv_lens.adapters.families`). Backends are imported lazily so that ``import ffkv_lens``
stays fast.
"""

import importlib
from typing import Any

from ffkv_lens.adapters.base import AdapterLike, LayerHooks, MemoryAdapter, ReadoutHooks, SupportsAdapter
from ffkv_lens.adapters.families import FAMILIES, FamilySpec, register_family, supported_architectures
from ffkv_lens.errors import ConfigError

__all__ = [
    "FAMILIES",
    "AdapterLike",
    "FamilySpec",
    "LayerHooks",
    "MemoryAdapter",
    "ReadoutHooks",
    "SupportsAdapter",
    "as_adapter",
    "load_hooked_model",
    "load_model",
    "make_adapter",
    "register_family",
    "supported_architectures",
]

# model class name -> "module:factory"; the factory takes the model and returns an adapter.
_BACKENDS = {
    "TransformerBridge": "ffkv_lens.adapters.bridge:make_bridge_adapter",
    "HookedTransformer": "ffkv_lens.adapters.hooked:make_hooked_adapter",
}


def make_adapter(model: Any) -> MemoryAdapter:
    """Wrap a TransformerLens model in the adapter of its backend and family.

    Args:
        model: A ``TransformerBridge``, a ``HookedTransformer`` (or an existing
            :class:`MemoryAdapter`, returned as is).

    Returns:
        The adapter.

    Raises:
        ConfigError: If ``model`` is not a supported TransformerLens model class.
        UnsupportedArchitectureError: If its architecture has no registered family.
    """
    if isinstance(model, MemoryAdapter):
        return model
    for cls in type(model).__mro__:
        target = _BACKENDS.get(cls.__name__)
        if target is not None and cls.__module__.startswith("transformer_lens"):
            module, factory = target.split(":")
            return getattr(importlib.import_module(module), factory)(model)
    raise ConfigError(
        f"MemoryLens needs a TransformerLens model; got {type(model).__module__}.{type(model).__name__}. "
        f"Supported model classes: {sorted(_BACKENDS)}. Load one with ffkv_lens.load_model(name)."
    )


def as_adapter(model: object) -> MemoryAdapter:
    """The :class:`MemoryAdapter` behind what a user passed to an analysis function.

    Accepts a :class:`MemoryAdapter` (returned as is), anything whose ``.adapter`` is one (a
    :class:`ffkv_lens.MemoryLens`; see :class:`SupportsAdapter`) or a TransformerLens model
    (wrapped by :func:`make_adapter`). This is the one place where the analysis core unwraps its
    argument, so the core never imports the ``MemoryLens`` facade.

    Raises:
        ConfigError: If ``model`` is none of these.
    """
    if isinstance(model, MemoryAdapter):
        return model
    inner = getattr(model, "adapter", None)
    if isinstance(inner, MemoryAdapter):
        return inner
    try:
        return make_adapter(model)
    except ConfigError:
        raise ConfigError(
            f"Got a {type(model).__module__}.{type(model).__name__}; pass a ffkv_lens.MemoryLens, a "
            "MemoryAdapter or a TransformerLens model (TransformerBridge or HookedTransformer)."
        ) from None


def load_model(*args: Any, **kwargs: Any) -> Any:
    """Load a model as a ``TransformerBridge``; see :func:`ffkv_lens.adapters.loading.load_model`."""
    from ffkv_lens.adapters.loading import load_model as _load

    return _load(*args, **kwargs)


def load_hooked_model(*args: Any, **kwargs: Any) -> Any:
    """Load a model as a ``HookedTransformer`` (transformer-lens 3.x); see :mod:`ffkv_lens.adapters.hooked_loading`."""
    from ffkv_lens.adapters.hooked_loading import load_hooked_model as _load

    return _load(*args, **kwargs)
