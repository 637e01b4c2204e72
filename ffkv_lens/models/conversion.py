"""Dequantising an embedded GGUF file into a plain Hugging Face model (used by ffkv_lens.models.cache).

``transformers`` loads a GGUF into a model that refuses ``save_pretrained``; this rebuilds a
plain float32 copy, checks that it predicts the registry's check token, and saves it.
"""

import copy
import logging
import time
from pathlib import Path
from typing import Any

from ffkv_lens.errors import ModelConversionError
from ffkv_lens.storage.diskfull import disk_full_error, free_bytes, is_disk_full

__all__ = ["convert_into"]

logger = logging.getLogger(__name__)
_TESTED_TRANSFORMERS = "5.24"


def convert_into(entry: Any, gguf_path: Path, out: Path) -> None:
    """Dequantise ``gguf_path``, rebuild a plain model, check it, and save it into ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    folder, file_name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file_name)
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file_name, dtype=torch.float32)
    logger.info("Dequantised %s in %.1f s", file_name, time.perf_counter() - start)
    model = _rebuild_plain(quantised)
    del quantised
    _check_prediction(entry, model, tokenizer)
    _save(model, tokenizer, out, slot=out.parent / entry.name)


def _rebuild_plain(quantised: Any) -> Any:
    """A plain float32 copy of a GGUF-loaded model (those refuse ``save_pretrained``)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(quantised.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    embed, head = quantised.get_input_embeddings(), quantised.get_output_embeddings()
    if getattr(config, "tie_word_embeddings", False) and not torch.equal(embed.weight, head.weight):
        logger.warning("The GGUF has an output matrix distinct from the embeddings: saving it untied")
        config.tie_word_embeddings = False
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict(), strict=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval()


def _check_prediction(entry: Any, model: Any, tokenizer: Any) -> None:
    """Fail unless the converted model greedily predicts ``entry.check_token``."""
    import torch

    ids = tokenizer(entry.check_prompt, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    got = tokenizer.decode([int(logits.argmax())])
    if got != entry.check_token:
        raise ModelConversionError(
            f"The converted {entry.name!r} predicts {got!r} after {entry.check_prompt!r}, expected "
            f"{entry.check_token!r}: the GGUF conversion of this transformers version is broken for it. "
            f"Conversion is tested with transformers {_TESTED_TRANSFORMERS}; install that version or report yours."
        )
    logger.info("Check passed: %r -> %r", entry.check_prompt, got)


def _save(model: Any, tokenizer: Any, out: Path, slot: Path) -> None:
    """Save model (safetensors) and tokenizer into ``out``, refusing early when they cannot fit.

    Args:
        model: The plain float32 model.
        tokenizer: Its tokenizer.
        out: The (temporary) folder to save into.
        slot: The cache folder ``out`` becomes, named in a disk-full error.

    Raises:
        DiskFullError: If the filesystem holding ``out`` has less free space than the weights
            need, or fills up while saving.
    """
    needed = sum(tensor.numel() * tensor.element_size() for tensor in model.state_dict().values())
    free = free_bytes(out)
    if free is not None and free < needed:
        raise disk_full_error(slot, needed)
    try:
        model.save_pretrained(out)  # safetensors
        tokenizer.save_pretrained(out)
    except Exception as exc:
        if is_disk_full(exc):
            raise disk_full_error(slot, needed, at_least=True) from exc
        raise
