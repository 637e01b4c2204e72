"""``lens.generate`` and ``lens.compare_generation`` on tiny decoders (bridge; HookedTransformers under TL 3)."""

import pytest
import torch

from ffkv_lens import Edit, MemoryLens
from ffkv_lens.analysis.interventions.generation import eos_token_id
from ffkv_lens.errors import ConfigError
from tests.analysis.interventions.common import DECODER_CASES, lens_fixture

lens = lens_fixture([c for c in DECODER_CASES if c[1] in ("gpt2", "llama", "gemma3")])
PROMPT = "The capital of France is"


def _greedy_by_hand(lens: MemoryLens, n: int) -> list[int]:
    tokens = lens.adapter.to_tokens(PROMPT)
    out = []
    for _ in range(n):
        token = int(lens.adapter.model(tokens)[0, -1].argmax())
        if token == eos_token_id(lens.adapter):
            break
        out.append(token)
        tokens = torch.cat([tokens, torch.tensor([[token]])], dim=1)
    return out


@torch.no_grad()
def test_greedy_generation_matches_a_hand_loop_and_sampling_is_seeded(lens: MemoryLens) -> None:
    text = lens.generate(PROMPT, max_new_tokens=8)
    assert text == lens.adapter.tokenizer.decode(_greedy_by_hand(lens, 8))
    assert lens.generate(PROMPT, max_new_tokens=8, edits=[Edit.scale(0, range(lens.d_mlp), 1.0)]) == text
    sampled = [lens.generate(PROMPT, max_new_tokens=8, temperature=1.0, seed=s) for s in (1, 1, 2)]
    assert sampled[0] == sampled[1]
    assert lens.generate(PROMPT, max_new_tokens=0) == ""


@torch.no_grad()
def test_compare_generation_shows_both(lens: MemoryLens) -> None:
    edits = [Edit.set(layer, range(lens.d_mlp), 5.0) for layer in range(lens.n_layers)]
    result = lens.compare_generation(PROMPT, edits, max_new_tokens=6)
    assert result.original == lens.generate(PROMPT, max_new_tokens=6)
    assert result.edited == lens.generate(PROMPT, max_new_tokens=6, edits=edits)
    with lens.intervene(edits):
        edited_logits = lens.adapter.model(lens.adapter.to_tokens(PROMPT))
    assert not torch.equal(edited_logits, lens.adapter.model(lens.adapter.to_tokens(PROMPT))), "the edits act"
    assert result.to_dict()["edits"][0] == edits[0].to_dict()
    assert "without:" in str(result) and "with:" in str(result)


@torch.no_grad()
def test_generation_stops_at_eos(lens: MemoryLens, monkeypatch: pytest.MonkeyPatch) -> None:
    first = _greedy_by_hand(lens, 1)[0]
    monkeypatch.setattr("ffkv_lens.analysis.interventions.generation.eos_token_id", lambda adapter: first)
    assert lens.generate(PROMPT, max_new_tokens=5) == ""


def test_bad_arguments(tiny_bridge) -> None:
    lens = MemoryLens(tiny_bridge("llama"))
    with pytest.raises(ConfigError, match="max_new_tokens=-1"):
        lens.generate(PROMPT, max_new_tokens=-1)
    with pytest.raises(ConfigError, match="temperature=-1"):
        lens.generate(PROMPT, temperature=-1.0)
    with pytest.raises(ConfigError, match="causal"):
        MemoryLens(tiny_bridge("bert")).generate(PROMPT)
