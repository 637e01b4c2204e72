"""``lens.trace`` and ``Trace.diff`` on tiny decoders of every family and backend.

The per-layer check is the one of tests/analysis/test_contributions.py: each layer's contributions
to the predicted token sum to the direct logit attribution of its FFN output without bias,
computed independently from the recorded ``hook_mlp_out`` through the model's readout
(``|sum - DLA| <= 1e-4 * (|DLA| + sum |c_i|)`` in fp32), without edits and under edits (then the
activations are recorded inside ``lens.intervene``).
"""

import json

import pytest
import torch

from ffkv_lens import Edit, MemoryLens
from ffkv_lens.errors import ConfigError
from tests.analysis.interventions.common import DECODER_CASES, TEXT, lens_fixture
from tests.analysis.test_contributions import independent_dla
from tests.helpers import assert_close

TOL = 1e-4
lens = lens_fixture(DECODER_CASES)


def _acts(lens: MemoryLens, tokens: torch.Tensor, edits: list[Edit]) -> dict[str, torch.Tensor]:
    hooks = [lens.hook_names(layer) for layer in range(lens.n_layers)]
    names = [n for h in hooks for n in (h.coefficients, h.ffn_output, h.post_ffn_scale) if n is not None]
    with lens.intervene(edits):
        return lens.adapter.record(tokens, names + lens.adapter.readout_hooks().required())


@pytest.mark.parametrize("edited", [False, True], ids=["plain", "edited"])
@torch.no_grad()
def test_layer_contributions_sum_to_the_ffn_attribution(lens: MemoryLens, edited: bool) -> None:
    tokens = lens.adapter.to_tokens(TEXT)
    edits = [Edit.zero(0, range(0, 64, 2)), Edit.scale(1, [3, 4, 5], 4.0, positions="last")] if edited else []
    acts = _acts(lens, tokens, edits)
    got = lens.trace(tokens, position=-1, top=5, edits=edits)
    for layer in range(lens.n_layers):
        dla = float(independent_dla(lens, acts, layer, -1)[got.prediction_id])
        total = float(got.layers.ffn_contribution[layer])
        full = lens.contributions(acts, position=-1, token=got.prediction_id, top=None, top_tokens=0)
        scale = float(full[full.layer == layer].contribution.abs().sum())
        assert abs(total - dla) <= TOL * (abs(dla) + scale), f"layer {layer}: {total} vs {dla}"
        mine = got.memories[got.memories.layer == layer]
        expected = full[full.layer == layer].head(5)
        assert mine.key.tolist() == expected.key.tolist(), f"layer {layer}: the top memories by contribution"
        assert mine.contribution.tolist() == expected.contribution.tolist(), "contributions() to the bit"
        assert total == pytest.approx(full.attrs["layer_totals"][layer], rel=1e-12, abs=1e-12)
        assert mine["rank"].tolist() == list(range(5)) and all(len(t) == 5 for t in mine.value_top_tokens)


@torch.no_grad()
def test_next_tokens_and_readouts_match_the_model(lens: MemoryLens) -> None:
    tokens = lens.adapter.to_tokens(TEXT)
    edits = [Edit.set(1, [7, 8], 2.0)]
    with lens.intervene(edits):
        logits = lens.adapter.model(tokens)[0, 3]
        names = [lens.hook_names(layer).resid_after_ffn for layer in range(lens.n_layers)]
        resid = lens.adapter.record(tokens, names)
    got = lens.trace(tokens, position=3, top=4, edits=edits)
    probs = logits.float().softmax(-1)
    assert got.position == 3 and got.next_tokens.token_id.tolist() == probs.topk(4).indices.tolist()
    assert_close(torch.tensor(got.next_tokens.prob.to_numpy()), probs.topk(4).values, rel=1e-6, what="probs")
    for layer, name in enumerate(names):
        after = lens.readout(resid[name][0, 3]).float().softmax(-1)
        assert_close(got.layer_probs[layer, 1], after, rel=1e-5, what=f"readout after FFN {layer}")
        assert got.layers.top_after_ffn[layer] == lens.adapter.tokenizer.decode([int(after.argmax())])
    last = got.layer_probs[-1, 1]
    assert_close(last, probs, rel=1e-4, what="the last layer's readout is the prediction")


@torch.no_grad()
def test_diff_and_json(lens: MemoryLens) -> None:
    base = lens.trace(TEXT, top=5)
    top = base.memories[base.memories.layer == lens.n_layers - 1].key.tolist()[:3]
    edited = lens.trace(TEXT, top=5, edits=[Edit.zero(lens.n_layers - 1, top)])
    same = base.diff(lens.trace(TEXT, top=5, edits=[Edit.scale(0, range(lens.d_mlp), 1.0)]))
    assert (same.next_tokens.change == 0).all() and (same.layers.change_after_ffn == 0).all()
    diff = base.diff(edited)
    pred = base.prediction_id
    row = diff.next_tokens[diff.next_tokens.token_id == pred].iloc[0]
    assert row.change == pytest.approx(edited.prob(pred) - base.prob(pred), abs=1e-12)
    assert row.change < 0, "zeroing the top memories of the last layer lowers p(prediction)"
    assert diff.next_tokens.change.abs().is_monotonic_decreasing
    assert (diff.layers.change_after_ffn[: lens.n_layers - 1] == 0).all(), "layers below the edit are unchanged"
    with lens.edited_values([Edit.scale(0, range(lens.d_mlp), -1.0)]):
        flipped = lens.trace(TEXT, top=5)  # W_out changed in place: the cached weight factors are recomputed
    layer0 = base.memories[base.memories.layer == 0]
    assert flipped.memories[flipped.memories.layer == 0].value_top_tokens.tolist() != layer0.value_top_tokens.tolist()
    for payload in (base.to_dict(), edited.to_dict(), diff.to_dict()):
        json.dumps(payload, allow_nan=False)
    assert edited.to_dict()["edits"] == [Edit.zero(lens.n_layers - 1, top).to_dict()]
    with pytest.raises(ConfigError, match="same prompt"):
        base.diff(lens.trace(TEXT + " fox"))


def test_bad_arguments_are_named(tiny_bridge) -> None:
    lens = MemoryLens(tiny_bridge("llama"))
    with pytest.raises(ConfigError, match="position=50"):
        lens.trace(TEXT, position=50)
    with pytest.raises(ConfigError, match="top=0"):
        lens.trace(TEXT, top=0)
    with pytest.raises(ConfigError, match="one non-empty prompt"):
        lens.trace(lens.adapter.to_tokens([TEXT, TEXT]))
    with pytest.raises(ConfigError, match="key 99"):
        lens.trace(TEXT, edits=[Edit.zero(0, 99)])
    with pytest.raises(ConfigError, match="decoder"):
        MemoryLens(tiny_bridge("bert")).trace(TEXT)
