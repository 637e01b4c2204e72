"""The TransformerBridge adapter on tiny random models of all thirteen registered families.

Tolerances: fp32 identities are checked to 1e-5 relative (Frobenius); what they compare
is computed by the same kernels up to summation order, so errors seen are <= 3e-7.
"""

import pytest
import torch

from ffkv_lens import MemoryLens
from ffkv_lens.errors import ConfigError, HookNotFiredError
from tests.adapters.checks import check_layer_identities, check_readout
from tests.conftest import boot
from tests.factories import FAMILY_NAMES
from tests.helpers import assert_close

REL = 1e-5
TEXTS = ["The capital of France is Paris.", "hello world, the quick brown fox"]


@pytest.fixture(params=FAMILY_NAMES, ids=FAMILY_NAMES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def lens(tiny_bridge, family: str) -> MemoryLens:
    return MemoryLens(tiny_bridge(family))


def _tokens(lens: MemoryLens) -> torch.Tensor:
    return lens.adapter.to_tokens(TEXTS[0])


def test_layout_and_shapes(lens: MemoryLens, family: str) -> None:
    assert lens.architecture == family
    assert (lens.n_layers, lens.d_model, lens.d_mlp, lens.d_vocab) == (3, 32, 64, 320)
    for layer in range(lens.n_layers):
        assert lens.keys(layer).shape == (64, 32)
        assert lens.values(layer).shape == (64, 32)
        assert (lens.up_keys(layer) is not None) == lens.gated
        if lens.gated:
            assert lens.up_keys(layer).shape == (64, 32)


@torch.no_grad()
def test_layer_identities(lens: MemoryLens) -> None:
    for layer in range(lens.n_layers):
        check_layer_identities(lens, _tokens(lens), layer, REL)


@torch.no_grad()
def test_readout_equals_logits(lens: MemoryLens) -> None:
    check_readout(lens, _tokens(lens), REL)


@torch.no_grad()
def test_every_relied_on_hook_fires(lens: MemoryLens) -> None:
    names = [name for layer in range(lens.n_layers) for name in lens.hook_names(layer).required()]
    acts = lens.adapter.record(_tokens(lens), names)
    assert set(acts) == set(names)


@torch.no_grad()
def test_record_raises_when_a_hook_does_not_fire(lens: MemoryLens) -> None:
    # blocks.1 never runs when the forward stops after block 0's coefficients.
    stop = lens.hook_names(0).coefficients
    with pytest.raises(HookNotFiredError, match="blocks.1"):
        lens.adapter.record(_tokens(lens), [lens.hook_names(1).coefficients], stop_after=stop)


@torch.no_grad()
def test_coefficients_match_recorded_and_stop_early(lens: MemoryLens) -> None:
    tokens = _tokens(lens)
    full = lens.adapter.record(tokens, [lens.hook_names(layer).coefficients for layer in range(3)])
    later_ran = []
    lens.adapter.model.blocks[2].mlp.hook_out.add_hook(lambda t, hook: later_ran.append(hook.name))
    try:
        got = lens.coefficients(tokens, layers=[1, 0])
    finally:
        lens.adapter.model.blocks[2].mlp.hook_out.remove_hooks()
    assert sorted(got) == [0, 1]
    assert later_ran == []
    for layer in (0, 1):
        assert torch.equal(got[layer], full[lens.hook_names(layer).coefficients])


@torch.no_grad()
def test_right_padding_keeps_real_positions(lens: MemoryLens) -> None:
    tok = lens.adapter.tokenizer
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    padded = lens.coefficients(batch["input_ids"], attention_mask=batch["attention_mask"], layers=2)[2]
    for row, text in enumerate(TEXTS):
        ids = tok(text, return_tensors="pt")["input_ids"]
        alone = lens.coefficients(ids, layers=2)[2][0]
        assert_close(padded[row, : ids.shape[1]], alone, rel=REL, what=f"padded row {row}")


# BERT's value readout is the MLM head itself (nonlinear) and Gemma 2's soft-cap is monotone but not
# linear: the identity below holds on the other families only, so only they are cases of this test.
LINEAR_READOUT = [name for name in FAMILY_NAMES if name not in ("bert", "gemma2")]


@torch.no_grad()
@pytest.mark.parametrize("readout_family", LINEAR_READOUT)
def test_value_logits_is_the_readout_direction(tiny_bridge, readout_family: str) -> None:
    """value_logits(v) == centred (readout(v) - readout(0)) * norm_scale(v), computed independently."""
    lens = MemoryLens(tiny_bridge(readout_family))
    assert (lens.adapter.model.cfg.output_logits_soft_cap or 0) <= 0 and lens.adapter.spec.readout != "mlm_head"
    vals = lens.values(1)[:8]
    eps = lens.adapter.model.cfg.eps
    if lens.adapter.model.cfg.normalization_type == "LN":
        scale = (vals.var(dim=-1, unbiased=False, keepdim=True) + eps).sqrt()
    else:
        scale = (vals.pow(2).mean(dim=-1, keepdim=True) + eps).sqrt()
    expected = (lens.readout(vals) - lens.readout(torch.zeros_like(vals))) * scale
    expected = expected - expected.mean(dim=-1, keepdim=True)
    assert_close(lens.value_logits(1, range(8)), expected, rel=1e-4, what="value_logits")


@pytest.mark.parametrize("processed_family", ["gpt2", "llama", "gemma3", "phi"])
@torch.no_grad()
def test_value_logits_identical_with_processed_weights(tiny_folder, processed_family: str) -> None:
    bridge = boot(tiny_folder(processed_family))
    raw = MemoryLens(bridge).value_logits(2)
    bridge.enable_compatibility_mode(disable_warnings=True)
    processed = MemoryLens(bridge).value_logits(2)
    assert_close(processed, raw, rel=1e-5, what="value_logits raw vs processed")


def _hook_registry(model) -> dict[str, list[int]]:
    # Some bridges (OPT) keep permanent internal hooks: compare snapshots, not emptiness.
    return {name: list(hp._forward_hooks) for name, hp in model.hook_dict.items()}


def test_hooks_removed_after_an_exception(lens: MemoryLens) -> None:
    model = lens.adapter.model
    before = _hook_registry(model)

    def boom(tensor, hook):
        raise RuntimeError("user hook failed")

    with pytest.raises(RuntimeError, match="user hook failed"):
        lens.adapter.run_with_hooks(_tokens(lens), [(lens.hook_names(0).coefficients, boom)])
    assert _hook_registry(model) == before


def test_bad_layer_selection_is_named(lens: MemoryLens) -> None:
    with pytest.raises(ConfigError, match="layers=7"):
        lens.coefficients(_tokens(lens), layers=7)


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
