"""Build a TransformerLens 3.x ``HookedTransformer`` offline from a Hugging Face model.

``HookedTransformer.from_pretrained`` needs a name from TransformerLens's list of official
models and reads the configuration of some families (Gemma) from tables keyed by that name.
:func:`build_hooked_model` builds the same object from any Hugging Face model of a supported
family, using TransformerLens's own pieces: its config converter (``convert_hf_model_config``)
where it has a generic branch, its weight converters (``get_pretrained_state_dict``) and
``HookedTransformer.load_and_process_state_dict`` (the weight processing of ``from_pretrained``).

Where transformer-lens 3.9 cannot convert a config by itself, the config is written here field by
field as TransformerLens's own branches write it: Gemma 2/3 (tables keyed by official names only)
and Phi (reads ``partial_rotary_factor``, which transformers 5 moved into ``rope_parameters``).
Two more transformers-5 gaps are bridged: GPT-2 configs without ``n_ctx`` and GPT-2/GPT-J
``n_inner`` (TransformerLens assumes ``d_mlp = 4 * d_model``).

Example:
    >>> from ffkv_lens.adapters.hooked_loading import load_hooked_model
    >>> model = load_hooked_model("smollm2-135m", processed=True)  # doctest: +SKIP
    >>> model.cfg.normalization_type  # doctest: +SKIP
    'RMSPre'
"""

import copy
import logging
import os
import tempfile
import time
import warnings
from typing import Any

import torch

from ffkv_lens.errors import ConfigError, ModelNotAvailableError, UnsupportedArchitectureError

__all__ = ["build_hooked_model", "hooked_config", "load_hooked_model", "require_hooked_transformer"]

logger = logging.getLogger(__name__)

# convert_hf_model_config reads a path containing these as a LLaMA or Gemma name (3.9.0).
_NAME_HEURISTICS = ("llama", "gemma")


def require_hooked_transformer() -> Any:
    """The ``HookedTransformer`` class, or a clear error on TransformerLens 4.x."""
    try:
        from transformer_lens import HookedTransformer
    except ImportError as exc:
        from importlib.metadata import version

        raise ModelNotAvailableError(
            f"HookedTransformer is not available in transformer-lens {version('transformer-lens')} "
            "(it was removed in 4.0). Install transformer-lens 3.x for the HookedTransformer backend "
            "(docs/transformerlens.md), or use a TransformerBridge: ffkv_lens.load_model(name)."
        ) from exc
    return HookedTransformer


def _gemma_config(hf: Any) -> dict[str, Any]:
    """HookedTransformer config of a Gemma 2/3 text model, as TransformerLens's Gemma tables write it."""
    arch = hf.architectures[0]
    layer_types = getattr(hf, "layer_types", None) or ["full_attention"] * hf.num_hidden_layers
    rope = getattr(hf, "rope_parameters", None) or {}
    full = rope.get("full_attention", rope)
    local = rope.get("sliding_attention", {})
    cfg = {
        "d_model": hf.hidden_size,
        "d_head": hf.head_dim,
        "n_heads": hf.num_attention_heads,
        "n_key_value_heads": hf.num_key_value_heads,
        "d_mlp": hf.intermediate_size,
        "n_layers": hf.num_hidden_layers,
        "n_ctx": min(hf.max_position_embeddings, 8192),
        "eps": hf.rms_norm_eps,
        "d_vocab": hf.vocab_size,
        "act_fn": hf.hidden_activation,
        "initializer_range": hf.initializer_range,
        "normalization_type": "RMS",
        "positional_embedding_type": "rotary",
        "rotary_base": full.get("rope_theta", getattr(hf, "rope_theta", 10000.0)),
        "use_attn_scale": True,
        "attn_scale": float(hf.query_pre_attn_scalar) ** 0.5,
        "gated_mlp": True,
        "final_rms": True,
        "use_normalization_before_and_after": True,
        "window_size": hf.sliding_window,
        "use_local_attn": True,
        "attn_types": ["local" if kind == "sliding_attention" else "global" for kind in layer_types],
        "original_architecture": arch,
        "tokenizer_name": None,
    }
    if getattr(hf, "attn_logit_softcapping", None):
        cfg["attn_scores_soft_cap"] = hf.attn_logit_softcapping
    if getattr(hf, "final_logit_softcapping", None):
        cfg["output_logits_soft_cap"] = hf.final_logit_softcapping
    if arch == "Gemma3ForCausalLM":
        cfg["use_qk_norm"] = True
        cfg["rotary_base_local"] = local.get("rope_theta", getattr(hf, "rope_local_base_freq", 10000.0))
    return cfg


def _phi_config(hf: Any) -> dict[str, Any]:
    """TransformerLens's Phi branch, which reads ``partial_rotary_factor`` where transformers 5 no longer has it."""
    rope = getattr(hf, "rope_parameters", None) or {}
    d_head = hf.hidden_size // hf.num_attention_heads
    factor = getattr(hf, "partial_rotary_factor", None) or rope.get("partial_rotary_factor", 1.0)
    return {
        "d_model": hf.hidden_size,
        "d_head": d_head,
        "n_heads": hf.num_attention_heads,
        "d_mlp": hf.intermediate_size,
        "n_layers": hf.num_hidden_layers,
        "n_ctx": hf.max_position_embeddings,
        "eps": hf.layer_norm_eps,
        "d_vocab": hf.vocab_size,
        "act_fn": hf.hidden_act,
        "initializer_range": hf.initializer_range,
        "normalization_type": "LN",
        "positional_embedding_type": "rotary",
        "rotary_base": rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0)),
        "rotary_dim": round(factor * d_head),
        "use_attn_scale": True,
        "parallel_attn_mlp": True,
        "default_prepend_bos": False,
        "original_architecture": "PhiForCausalLM",
        "tokenizer_name": None,
    }


def _converted_config(hf: Any) -> dict[str, Any]:
    """TransformerLens's own config conversion, from a copy of the config in a neutral folder.

    ``convert_hf_model_config`` picks hard-coded configs by substrings of the path it is given
    (a folder named ``tiny-llama`` would be read as LLaMA-7B), so it reads a copy.
    """
    from transformer_lens.loading_from_pretrained import convert_hf_model_config

    hf = copy.deepcopy(hf)
    # transformer-lens 3.9 reads attributes that transformers 5 configs no longer carry.
    if hf.model_type == "gpt2" and not hasattr(hf, "n_ctx"):
        hf.n_ctx = hf.n_positions
    with tempfile.TemporaryDirectory(prefix="ffkv-cfg-") as tmp:
        folder = os.path.join(tmp, "model")
        if any(word in folder.lower() for word in _NAME_HEURISTICS):
            raise ConfigError(
                f"The temporary folder {folder!r} contains a model-family name, which TransformerLens "
                "would misread; set TMPDIR to a folder whose path names no model family."
            )
        hf.save_pretrained(folder)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = convert_hf_model_config(folder)
    cfg["tokenizer_name"] = None  # the temporary folder is gone; the tokenizer is passed in
    if hf.model_type in ("gpt2", "gptj") and getattr(hf, "n_inner", None):
        cfg["d_mlp"] = hf.n_inner  # TransformerLens assumes 4 * d_model and ignores n_inner
    return cfg


# Architectures whose TransformerLens 3.9 config conversion needs an official model name or
# fails on transformers 5 configs: their configs are written here, field by field as TL's.
_OWN_CONFIGS = {"Gemma2ForCausalLM": _gemma_config, "Gemma3ForCausalLM": _gemma_config, "PhiForCausalLM": _phi_config}


def hooked_config(
    hf_config: Any,
    *,
    processed: bool = True,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    name: str | None = None,
) -> Any:
    """The ``HookedTransformerConfig`` of a Hugging Face config.

    Args:
        hf_config: A ``transformers.PretrainedConfig`` of a supported causal LM.
        processed: Whether the weights will be processed (``fold_ln``: the norms become ``*Pre``).
        device: Device of the model.
        dtype: Weight dtype.
        name: Model name recorded in ``cfg.model_name``.

    Returns:
        The config.

    Raises:
        UnsupportedArchitectureError: If TransformerLens has no HookedTransformer for the architecture.
    """
    from transformer_lens import HookedTransformerConfig

    arch = (getattr(hf_config, "architectures", None) or ["?"])[0]
    try:
        cfg = _OWN_CONFIGS.get(arch, _converted_config)(hf_config)
    except NotImplementedError as exc:
        raise UnsupportedArchitectureError(
            f"TransformerLens has no HookedTransformer for {arch!r} ({exc}); use a TransformerBridge."
        ) from None
    cfg.update(model_name=name or cfg.get("model_name") or arch, init_weights=False, dtype=dtype, device=str(device))
    cfg.setdefault("default_prepend_bos", True)
    cfg["from_checkpoint"] = False
    if processed and cfg["normalization_type"] in ("LN", "RMS"):
        cfg["normalization_type"] += "Pre"
    return HookedTransformerConfig.from_dict(cfg)


def build_hooked_model(
    hf_model: Any,
    tokenizer: Any,
    *,
    processed: bool = True,
    device: str | torch.device = "cpu",
    name: str | None = None,
) -> Any:
    """A ``HookedTransformer`` with the weights of ``hf_model``, built without the hub.

    Args:
        hf_model: A loaded Hugging Face causal LM of a family TransformerLens 3.x supports.
        tokenizer: Its tokenizer.
        processed: ``True``: fold norms, centre writing weights and the unembedding, fold value
            biases (``from_pretrained``'s default; ``center_unembed`` is skipped on soft-capped
            models, as ``from_pretrained`` does). ``False``: raw weights
            (``from_pretrained_no_processing``).
        device: Device of the model.
        name: Recorded as ``cfg.model_name``.

    Returns:
        The model, in eval mode.
    """
    hooked_cls = require_hooked_transformer()
    from transformer_lens.loading_from_pretrained import get_pretrained_state_dict

    dtype = next(hf_model.parameters()).dtype
    cfg = hooked_config(hf_model.config, processed=processed, device=device, dtype=dtype, name=name)
    with tempfile.TemporaryDirectory(prefix="ffkv-sd-") as tmp:  # a path that exists: no hub lookup
        state_dict = get_pretrained_state_dict(tmp, cfg, hf_model, dtype=dtype)
    model = hooked_cls(cfg, tokenizer, move_to_device=False)
    soft_capped = (cfg.output_logits_soft_cap or 0) > 0
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=processed,
        center_writing_weights=processed,
        center_unembed=processed and not soft_capped,
        fold_value_biases=processed,
    )
    return model.to(torch.device(device), print_details=False).eval()


def load_hooked_model(
    name_or_path: str | os.PathLike[str],
    *,
    processed: bool = True,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str = torch.float32,
) -> Any:
    """Load an embedded model, a local HF folder or a hub id as a ``HookedTransformer``.

    Args:
        name_or_path: As for :func:`ffkv_lens.load_model`.
        processed: See :func:`build_hooked_model`.
        device: ``None`` picks CUDA when available.
        dtype: Weight dtype.

    Returns:
        The model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ffkv_lens.adapters.loading import _resolve_device, _resolve_dtype
    from ffkv_lens.models import resolve_model

    require_hooked_transformer()
    torch_dtype, torch_device = _resolve_dtype(dtype), _resolve_device(device)
    folder = resolve_model(name_or_path)
    start = time.perf_counter()
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except OSError as exc:
        raise ModelNotAvailableError(
            f"Could not load {folder!r} as a Hugging Face model ({exc}); pass an embedded name or a local folder."
        ) from exc
    model = build_hooked_model(hf_model, tokenizer, processed=processed, device=torch_device, name=str(name_or_path))
    logger.info("Loaded %s as a HookedTransformer in %.1f s", name_or_path, time.perf_counter() - start)
    return model
