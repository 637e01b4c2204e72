"""The adapter identities on the two embedded real models (slow: each loads a real model).

Tolerance: 1e-5 relative (Frobenius) in fp32, the same as on the tiny models. Gemma 3's
post-FFN norm makes the naive sum of coefficient-weighted values wrong by orders of
magnitude; the per-token scale brings it back within tolerance.
"""

import pytest
import torch

from ffkv_lens import MemoryLens
from tests.adapters.checks import check_layer_identities, check_readout, final_residual_hook

pytestmark = pytest.mark.slow
REL = 1e-5
LAYOUT = {"smollm2-135m": (30, 576, 1536, 49152, True, "llama"), "gemma3-270m": (18, 640, 2048, 262144, True, "gemma3")}
PROMPT = "The capital of France is"
# Gemma 3 270M (base, 4-bit) ranks " Paris" third after "The capital of France is".
PREDICTION = {
    "smollm2-135m": ("The capital of France is", " Paris"),
    "gemma3-270m": ("The Eiffel Tower is located in the city of", " Paris"),
}


@pytest.fixture(scope="module", params=sorted(LAYOUT), ids=sorted(LAYOUT))
def real(request: pytest.FixtureRequest) -> tuple[str, MemoryLens]:
    from ffkv_lens import load_model

    return request.param, MemoryLens(load_model(request.param, device="cpu"))


def test_layout(real: tuple[str, MemoryLens]) -> None:
    name, lens = real
    got = (lens.n_layers, lens.d_model, lens.d_mlp, lens.d_vocab, lens.gated, lens.architecture)
    assert got == LAYOUT[name]


@torch.no_grad()
def test_identities_at_every_layer(real: tuple[str, MemoryLens]) -> None:
    _, lens = real
    tokens = lens.adapter.to_tokens(PROMPT)
    for layer in range(lens.n_layers):
        check_layer_identities(lens, tokens, layer, REL)
    check_readout(lens, tokens, REL)


@torch.no_grad()
def test_every_relied_on_hook_fires(real: tuple[str, MemoryLens]) -> None:
    _, lens = real
    names = [name for layer in range(lens.n_layers) for name in lens.hook_names(layer).required()]
    assert set(lens.adapter.record(lens.adapter.to_tokens(PROMPT), names)) == set(names)


@torch.no_grad()
def test_predicts_paris(real: tuple[str, MemoryLens]) -> None:
    name, lens = real
    prompt, expected = PREDICTION[name]
    logits = lens.readout(lens.adapter.record(lens.adapter.to_tokens(prompt), [final_residual_hook(lens)]).popitem()[1])
    assert lens.adapter.tokenizer.decode(int(logits[0, -1].argmax())) == expected
