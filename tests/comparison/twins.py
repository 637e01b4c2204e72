"""A tiny model's twin: the same model with its memories permuted and its vocabulary re-indexed."""

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

SPECIALS = 5  # ids 0-4 are the tiny tokenizer's special tokens (tests.factories.train_tokenizer)


def build_twin(folder: Path, out: Path, seed: int = 7) -> tuple[Path, list[torch.Tensor], torch.Tensor]:
    """Copy a tiny Llama folder, permuting each layer's memories and the non-special token ids.

    Returns:
        ``(out, memory_perms, token_perm)``: memory ``k`` of layer ``l`` of the original is memory
        ``memory_perms[l][k]`` of the twin; token id ``t`` is ``token_perm[t]``.
    """
    shutil.copytree(folder, out)
    generator = torch.Generator().manual_seed(seed)
    tokenizer = json.loads((out / "tokenizer.json").read_text())
    vocab: dict[str, int] = tokenizer["model"]["vocab"]
    size = max(vocab.values()) + 1
    weights = load_file(str(out / "model.safetensors"))
    d_vocab = weights["model.embed_tokens.weight"].shape[0]
    token_perm = torch.arange(d_vocab)
    token_perm[SPECIALS:size] = SPECIALS + torch.randperm(size - SPECIALS, generator=generator)
    tokenizer["model"]["vocab"] = {piece: int(token_perm[i]) for piece, i in vocab.items()}
    (out / "tokenizer.json").write_text(json.dumps(tokenizer))
    inverse = torch.argsort(token_perm)  # new id -> old id
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in weights:
            weights[name] = weights[name][inverse].contiguous()
    memory_perms = []
    layer = 0
    while f"model.layers.{layer}.mlp.gate_proj.weight" in weights:
        prefix = f"model.layers.{layer}.mlp."
        perm = torch.randperm(weights[prefix + "gate_proj.weight"].shape[0], generator=generator)
        inverse_m = torch.argsort(perm)  # new memory -> old memory
        for name in ("gate_proj.weight", "up_proj.weight"):
            weights[prefix + name] = weights[prefix + name][inverse_m].contiguous()
        weights[prefix + "down_proj.weight"] = weights[prefix + "down_proj.weight"][:, inverse_m].contiguous()
        memory_perms.append(perm)
        layer += 1
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out, memory_perms, token_perm
