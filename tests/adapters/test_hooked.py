"""The HookedTransformer adapter (TransformerLens 3.x) and its equivalence with the bridge.

Each tiny model of tests/factories.py is built twice from the same HF weights: as a
``HookedTransformer`` (TransformerLens's own config and weight converters, raw and with
``from_pretrained``'s processing) and as a ``TransformerBridge``. Skipped where TransformerLens
has no HookedTransformer (4.x): run in the second environment (docs/transformerlens.md).

Tolerances, fp32, relative Frobenius unless stated:
- identities inside one model (coefficients from keys, FFN output, readout): 1e-5;
- coefficients, value logits and contributions across backends and processing: 1e-5
  (the two backends run different kernels; errors seen are below 1e-6);
- trigger atlas: equal units and positions at every rank, coefficients within 1e-4 (the issue's
  bound; on the real models ties broken by float error are allowed, see test_hooked_real.py);
- value projection: equal top tokens, logits within 1e-5; agreement tables: equal counts, rates
  within 1e-6 absolute.
"""

import pytest
import torch

from ffkv_lens import MemoryLens
from ffkv_lens.analysis.agreement import value_agreement
from ffkv_lens.analysis.triggers import search_triggers
from ffkv_lens.analysis.values import project_values
from ffkv_lens.corpus import Corpus
from tests.adapters.checks import assert_atlases_equivalent, check_layer_identities, check_readout
from tests.conftest import has_hooked_transformer
from tests.factories import FAMILY_NAMES
from tests.helpers import assert_close

if not has_hooked_transformer():
    pytest.skip("HookedTransformer needs transformer-lens 3.x (the .venv-tl3 environment)", allow_module_level=True)

REL = 1e-5
HOOKED_FAMILIES = [family for family in FAMILY_NAMES if family != "bert"]  # BERT is HookedEncoder, not covered
TEXTS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Memories in feed-forward layers store patterns. They promote tokens!",
    "hello world. hello world. The quick brown fox jumps over the lazy dog.",
    "0123456789 is a number. Is it? Yes, it is.",
    "Paris is in France. Rome is in Italy. The fox is quick.",
]


@pytest.fixture(params=HOOKED_FAMILIES, ids=HOOKED_FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(params=[False, True], ids=["raw", "processed"])
def processed(request: pytest.FixtureRequest) -> bool:
    return request.param


@pytest.fixture
def lens(tiny_hooked, family: str, processed: bool) -> MemoryLens:
    return MemoryLens(tiny_hooked(family, processed))


@pytest.fixture
def bridge_lens(tiny_bridge, family: str) -> MemoryLens:
    return MemoryLens(tiny_bridge(family))


def _tokens(lens: MemoryLens) -> torch.Tensor:
    return lens.adapter.to_tokens(TEXTS[0])


def test_backend_family_and_shapes(lens: MemoryLens, family: str, processed: bool) -> None:
    assert type(lens.adapter).__name__ == "HookedAdapter"
    assert lens.architecture == family
    assert (lens.n_layers, lens.d_model, lens.d_mlp, lens.d_vocab) == (3, 32, 64, 320)
    assert lens.keys(0).shape == lens.values(0).shape == (64, 32)
    assert (lens.up_keys(0) is not None) == lens.gated
    assert lens.adapter.describe()["weight_processing"]["fold_ln"] is processed


@torch.no_grad()
def test_layer_identities_and_readout(lens: MemoryLens) -> None:
    tokens = _tokens(lens)
    for layer in range(lens.n_layers):
        check_layer_identities(lens, tokens, layer, REL)
    check_readout(lens, tokens, REL)


@torch.no_grad()
def test_every_relied_on_hook_fires(lens: MemoryLens) -> None:
    names = [name for layer in range(lens.n_layers) for name in lens.hook_names(layer).required()]
    names += lens.adapter.readout_hooks().required()
    assert set(lens.adapter.record(_tokens(lens), names)) == set(names)


@torch.no_grad()
def test_coefficients_equal_the_bridge(lens: MemoryLens, bridge_lens: MemoryLens) -> None:
    tokens = bridge_lens.adapter.to_tokens(TEXTS)
    assert torch.equal(lens.adapter.to_tokens(TEXTS), tokens)
    assert lens.adapter.bos_token_id == bridge_lens.adapter.bos_token_id
    mine, theirs = lens.coefficients(tokens), bridge_lens.coefficients(tokens)
    for layer in range(lens.n_layers):
        assert_close(mine[layer], theirs[layer], rel=REL, what=f"coefficients layer {layer}")


@torch.no_grad()
def test_value_logits_equal_the_bridge(lens: MemoryLens, bridge_lens: MemoryLens) -> None:
    assert lens.value_readout_mode == bridge_lens.value_readout_mode
    for layer in range(lens.n_layers):
        assert_close(lens.value_logits(layer), bridge_lens.value_logits(layer), rel=REL, what=f"layer {layer}")
    ids = [5, 17, 300]
    assert_close(lens.adapter.value_token_logits(2, ids), lens.value_logits(2)[:, ids], rel=REL, what="token logits")


@torch.no_grad()
def test_stop_after_skips_later_layers(lens: MemoryLens) -> None:
    later = []
    model = lens.adapter.model
    model.blocks[2].hook_mlp_out.add_hook(lambda t, hook: later.append(hook.name))
    try:
        got = lens.coefficients(_tokens(lens), layers=[1, 0])
    finally:
        model.blocks[2].hook_mlp_out.remove_hooks()
    assert sorted(got) == [0, 1] and later == []


def _search(lens: MemoryLens):
    kw = dict(unit="sentence", k=4, signed=True, max_len=16, batch_tokens=64, progress=False)
    with torch.no_grad():
        return search_triggers(lens.adapter, Corpus.from_texts(TEXTS), **kw)


def test_trigger_atlas_equals_the_bridge(lens: MemoryLens, bridge_lens: MemoryLens) -> None:
    # On these texts no two units tie, so the atlases are identical rank by rank (tie_rel=0).
    differing = assert_atlases_equivalent(_search(lens), _search(bridge_lens), rel=1e-4, tie_rel=0.0)
    assert differing == 0


def test_value_tables_equal_the_bridge(lens: MemoryLens, bridge_lens: MemoryLens) -> None:
    mine, theirs = project_values(lens, top_k=5), project_values(bridge_lens, top_k=5)
    for layer in mine.layers:
        assert torch.equal(mine.top_ids[layer], theirs.top_ids[layer])
        assert torch.equal(mine.bottom_ids[layer], theirs.bottom_ids[layer])
        assert_close(mine.top_logits[layer], theirs.top_logits[layer], rel=REL, what=f"top logits {layer}")
        assert_close(mine.max_prob[layer], theirs.max_prob[layer], rel=REL, what=f"max prob {layer}")
    atlas = _search(bridge_lens)
    mine_agree = value_agreement(lens, atlas, mine, n_bootstrap=50, n_permutations=3).per_layer
    theirs_agree = value_agreement(bridge_lens, atlas, theirs, n_bootstrap=50, n_permutations=3).per_layer
    assert list(mine_agree.columns) == list(theirs_agree.columns)
    numeric = mine_agree.select_dtypes("number").columns
    diff = (mine_agree[numeric] - theirs_agree[numeric]).abs().max().max()
    assert diff <= 1e-6, f"agreement tables differ by {diff:.2e}\n{mine_agree}\n{theirs_agree}"


@pytest.mark.parametrize("check_family", ["gpt2", "llama", "gemma2", "phi"])
@torch.no_grad()
def test_raw_and_processed_give_the_same_memories(tiny_hooked, check_family: str) -> None:
    raw, processed = MemoryLens(tiny_hooked(check_family, False)), MemoryLens(tiny_hooked(check_family, True))
    tokens = raw.adapter.to_tokens(TEXTS[1])
    for layer in range(raw.n_layers):
        assert_close(processed.value_logits(layer), raw.value_logits(layer), rel=REL, what=f"value logits {layer}")
        m_raw, m_proc = raw.coefficients(tokens, layers=layer), processed.coefficients(tokens, layers=layer)
        assert_close(m_proc[layer], m_raw[layer], rel=REL, what=f"coefficients {layer}")


def test_make_adapter_names_both_backends() -> None:
    from ffkv_lens.errors import ConfigError

    with pytest.raises(ConfigError, match="HookedTransformer.*TransformerBridge|TransformerBridge.*HookedTransformer"):
        MemoryLens(torch.nn.Linear(2, 2))


@torch.no_grad()
def test_gate_and_up_hooks_rebuild_the_coefficients(lens: MemoryLens) -> None:
    # m = act(gate pre-activation) * up projection on gated MLPs; no such hooks on the others.
    names = [lens.hook_names(layer) for layer in range(lens.n_layers)]
    if not lens.adapter.gated:
        assert all(n.gate_pre is None and n.up_pre is None for n in names)
        return
    acts = lens.adapter.record(_tokens(lens), [h for n in names for h in (n.gate_pre, n.up_pre, n.coefficients)])
    for layer, n in enumerate(names):
        rebuilt = lens.adapter.activation(acts[n.gate_pre]) * acts[n.up_pre]
        assert_close(rebuilt, acts[n.coefficients], rel=1e-5, what=f"act(gate) * up, layer {layer}")
