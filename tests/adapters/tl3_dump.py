"""Run in the transformer-lens 3.x environment by test_cross_world.py: results of HookedTransformers.

``python -m tests.adapters.tl3_dump OUT FAMILY=FOLDER ...`` builds each tiny model as a
HookedTransformer (raw and processed) and writes, under ``OUT/FAMILY-{raw,processed}/``:
``tensors.safetensors`` (tokens, coefficients and value logits of every layer, contributions of
every memory) and ``atlas/`` (a trigger atlas). The TransformerLens 4.x side compares them with
its bridge on the same folders.
"""

import sys
from pathlib import Path

import torch

TEXTS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Memories in feed-forward layers store patterns. They promote tokens!",
    "hello world. hello world. The quick brown fox jumps over the lazy dog.",
]
TOKEN = 42
SEARCH = dict(unit="sentence", k=4, signed=True, max_len=16, batch_tokens=64, progress=False)


def compute(lens) -> tuple[dict[str, torch.Tensor], object]:
    """The tensors and the atlas both worlds compute, in one place so they compute the same."""
    from ffkv_lens.analysis.triggers import search_triggers
    from ffkv_lens.corpus import Corpus

    tokens = lens.adapter.to_tokens(TEXTS[0])
    with torch.no_grad():
        out = {"tokens": tokens}
        for layer, m in lens.coefficients(tokens).items():
            out[f"coefficients.{layer}"] = m
            out[f"value_logits.{layer}"] = lens.value_logits(layer)
        table = lens.contributions(tokens, position=-1, token=TOKEN, top=None, top_tokens=0)
        out["contributions"] = torch.tensor(table.sort_values(["layer", "key"]).contribution.to_numpy())
        atlas = search_triggers(lens.adapter, Corpus.from_texts(TEXTS), **SEARCH)
    return {name: tensor.contiguous().cpu() for name, tensor in out.items()}, atlas


def main(argv: list[str]) -> None:
    from safetensors.torch import save_file

    from ffkv_lens import MemoryLens
    from tests.conftest import build_hooked

    out = Path(argv[0])
    for item in argv[1:]:
        family, folder = item.split("=", 1)
        for processed in (False, True):
            target = out / f"{family}-{'processed' if processed else 'raw'}"
            target.mkdir(parents=True, exist_ok=True)
            tensors, atlas = compute(MemoryLens(build_hooked(Path(folder), processed)))
            save_file(tensors, str(target / "tensors.safetensors"))
            atlas.save(target / "atlas")


if __name__ == "__main__":
    main(sys.argv[1:])
