"""Edits as hooks on ``mlp.hook_post``, on tiny models of every family and on every backend.

Independent checks: a hand-written hook that writes the coefficients itself (``set``/``mean`` at
positions) and the weight-level edit (``zero``/``scale``, rows of ``W_out``). Tolerances: bitwise
where the maths is the same operation (``scale(1)``, hand-written hook, activations below the
edited layer, the set value itself); 1e-5 relative in fp32 between hook and weight edits (different
rounding order).
"""

import pytest
import torch

from ffkv_lens import Edit, MemoryLens
from ffkv_lens.errors import ConfigError
from tests.adapters.test_hooks import registry
from tests.analysis.interventions.common import CASES, TEXT, lens_fixture
from tests.helpers import assert_close

lens = lens_fixture(CASES)


def _logits(lens: MemoryLens, tokens: torch.Tensor) -> torch.Tensor:
    return lens.adapter.model(tokens)


@torch.no_grad()
def test_scale_one_is_the_identity_bit_for_bit(lens: MemoryLens) -> None:
    tokens = lens.adapter.to_tokens(TEXT)
    base = _logits(lens, tokens)
    edits = [Edit.scale(layer, range(lens.d_mlp), 1.0) for layer in range(lens.n_layers)]
    with lens.intervene(edits):
        edited = _logits(lens, tokens)
    assert torch.equal(edited, base)


@torch.no_grad()
def test_zero_and_scale_hooks_equal_the_weight_edit(lens: MemoryLens) -> None:
    tokens = lens.adapter.to_tokens(TEXT)
    edits = [Edit.zero(0, [1, 5, 9]), Edit.scale(1, [2, 3], 2.5), Edit.zero(lens.n_layers - 1, list(range(0, 64, 3)))]
    weights = {layer: lens.adapter.value_weight(layer).clone() for layer in range(lens.n_layers)}
    base = _logits(lens, tokens)
    with lens.intervene(edits):
        by_hooks = _logits(lens, tokens)
    with lens.edited_values(edits):
        by_weights = _logits(lens, tokens)
    assert (by_hooks - base).abs().max() > 1e-4, "the edits must change the logits"
    assert_close(by_weights, by_hooks, rel=1e-5, what="weight edit vs hook edit")
    for layer, weight in weights.items():
        assert torch.equal(lens.adapter.value_weight(layer), weight), f"W_out of layer {layer} restored exactly"
    with pytest.raises(RuntimeError, match="inside"), lens.edited_values(edits):
        raise RuntimeError("inside")
    assert all(torch.equal(lens.adapter.value_weight(layer), w) for layer, w in weights.items())


def _coefficients_under(lens: MemoryLens, tokens: torch.Tensor, edits: list[Edit], layer: int) -> torch.Tensor:
    with lens.intervene(edits):
        return lens.coefficients(tokens, layers=layer)[layer]


@pytest.mark.parametrize("op", ["set", "mean"])
@torch.no_grad()
def test_set_and_mean_put_the_value_at_the_positions_and_nowhere_else(lens: MemoryLens, op: str) -> None:
    tokens = lens.adapter.to_tokens(TEXT)
    layer, keys, positions, values = 1, [4, 17], [1, -1], [3.25, -0.5]
    n_pos = tokens.shape[1]
    edit = Edit(layer, keys, op, values, positions)
    base = lens.coefficients(tokens, layers=layer)[layer]
    got = _coefficients_under(lens, tokens, [edit], layer)
    where = torch.zeros_like(base, dtype=torch.bool)
    for p in positions:
        where[:, p % n_pos, keys] = True
    expected = base.clone()
    expected[:, [p % n_pos for p in positions][0], keys] = torch.tensor(values)
    expected[:, n_pos - 1, keys] = torch.tensor(values)
    assert torch.equal(got[where], expected[where]), "exactly the requested coefficients"
    assert torch.equal(got[~where], base[~where]), "every other coefficient of the layer unchanged"

    def by_hand(m: torch.Tensor, hook) -> torch.Tensor:
        m = m.clone()
        for p in (1, n_pos - 1):
            m[:, p, keys] = torch.tensor(values, dtype=m.dtype)
        return m

    name = lens.hook_names(layer).coefficients
    with lens.adapter.hooks([(name, by_hand)]):
        reference = _logits(lens, tokens)
    with lens.intervene([edit]):
        edited = _logits(lens, tokens)
    assert torch.equal(edited, reference), "the same logits as a hand-written hook"


@torch.no_grad()
def test_last_and_slice_positions(lens: MemoryLens) -> None:
    tokens = lens.adapter.to_tokens(TEXT)
    base = lens.coefficients(tokens, layers=0)[0]
    last = _coefficients_under(lens, tokens, [Edit.set(0, 3, 7.0, positions="last")], 0)
    assert torch.equal(last[:, -1, 3], torch.full_like(last[:, -1, 3], 7.0))
    assert torch.equal(last[:, :-1], base[:, :-1])
    sliced = _coefficients_under(lens, tokens, [Edit.add(0, [3, 8], 1.5, positions=slice(2, None, 2))], 0)
    changed = (sliced != base).any(dim=-1)[0].nonzero().flatten().tolist()
    assert changed == list(range(2, tokens.shape[1], 2))
    assert torch.equal(sliced[:, 2::2, [3, 8]], base[:, 2::2, [3, 8]] + 1.5)


@torch.no_grad()
def test_an_edit_leaves_every_activation_below_its_layer_unchanged(lens: MemoryLens) -> None:
    tokens = lens.adapter.to_tokens(TEXT)
    model = lens.adapter.model

    def cached(edits: list[Edit]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with lens.intervene(edits):
            logits, cache = model.run_with_cache(tokens)
        return logits, {name: cache[name] for name in cache.keys()}

    base_logits, base = cached([])
    for layer in range(1, lens.n_layers):
        below = [
            n
            for n in base
            if n.startswith(("embed", "hook_embed", "pos_embed", "hook_pos_embed"))
            or any(n.startswith(f"blocks.{low}.") for low in range(layer))
        ]
        logits, edited = cached([Edit.scale(layer, range(lens.d_mlp), 3.0)])
        assert len(below) >= 4 * layer and base.keys() == edited.keys()
        for name in below:
            assert torch.equal(base[name], edited[name]), f"{name} changed by an edit of layer {layer}"
        assert not torch.equal(base_logits, logits), "the edit must reach the logits"


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt], ids=["exception", "interrupt"])
def test_no_hook_left_after_an_error(lens: MemoryLens, error: type[BaseException]) -> None:
    model, tokens = lens.adapter.model, lens.adapter.to_tokens(TEXT)
    user_point = lens.hook_names(0).coefficients
    model.add_hook(user_point, lambda t, hook: None)  # the user's hook, which must survive
    try:
        before = registry(model)
        with pytest.raises(error, match="stop"), lens.intervene([Edit.zero(1, [1, 2])]):
            assert registry(model) != before
            raise error("stop")
        assert registry(model) == before

        def boom(t: torch.Tensor, hook) -> None:
            raise error("stop in the forward")

        with pytest.raises(error, match="stop in the forward"):
            lens.adapter.run_with_hooks(
                tokens, [*lens.edit_hooks([Edit.zero(0, 3)]), (lens.hook_names(1).coefficients, boom)]
            )
        assert registry(model) == before
        with pytest.raises(ConfigError, match="position 99"), lens.intervene([Edit.zero(0, 3, positions=[99])]):
            model(tokens)
        assert registry(model) == before
    finally:
        model.reset_hooks()


@torch.no_grad()
def test_edits_compose_with_user_hooks_and_model_hooks(lens: MemoryLens) -> None:
    model, tokens = lens.adapter.model, lens.adapter.to_tokens(TEXT)
    name = lens.hook_names(1).coefficients
    original = registry(model)
    base = lens.coefficients(tokens, layers=1)[1]

    def double(t: torch.Tensor, hook) -> torch.Tensor:
        return t * 2

    with model.hooks(fwd_hooks=[(name, double)]):
        inside = registry(model)
        with lens.intervene([Edit.add(1, [0, 1], 1.0)]):
            got = lens.coefficients(tokens, layers=1)[1]
        assert registry(model) == inside
        hooked = model.run_with_hooks(tokens, fwd_hooks=lens.edit_hooks([Edit.add(1, [0, 1], 1.0)]))
        assert registry(model) == inside
    assert registry(model) == original
    expected = 2 * base
    expected[..., [0, 1]] += 1.0
    assert_close(got, expected, rel=1e-6, what="the user's hook fires first, the edit after it")
    with model.hooks(fwd_hooks=[(name, double)]), lens.intervene([Edit.add(1, [0, 1], 1.0)]):
        assert torch.equal(model(tokens), hooked), "run_with_hooks(edit_hooks) equals intervene()"


def test_bad_edits_are_named(tiny_bridge) -> None:
    lens = MemoryLens(tiny_bridge("llama"))
    tokens = lens.adapter.to_tokens(TEXT)
    with pytest.raises(ConfigError, match="layer 3 is out of range"):
        lens.edit_hooks([Edit.zero(3, 1)])
    with pytest.raises(ConfigError, match="key 64 is out of range"):
        lens.edit_hooks([Edit.zero(0, [1, 64])])
    with pytest.raises(ConfigError, match="op='boost' is not an operation"):
        Edit(0, 1, "boost", 2.0)
    with pytest.raises(ConfigError, match=r"contradictory edits of memory 0:2"):
        lens.edit_hooks([Edit.zero(0, [1, 2]), Edit.scale(0, 2, 2.0, positions="last")])
    with pytest.raises(ConfigError, match="needs a value"):
        Edit(0, 1, "scale")
    with pytest.raises(ConfigError, match="2 values for 3 keys"):
        Edit.set(0, [1, 2, 3], [1.0, 2.0])
    with pytest.raises(ConfigError, match="finite"):
        Edit.set(0, 1, float("nan"))
    with pytest.raises(ConfigError, match="edited_values"):
        lens.edited_values([Edit.set(0, 1, 2.0)]).__enter__()
    assert len(lens.edit_hooks([Edit.zero(0, 1), Edit.zero(0, 1)])) == 1, "an exact duplicate is dropped"
    lens.edit_hooks([Edit.zero(0, 2, positions=[0]), Edit.scale(0, 2, 2.0, positions=[1, 2])])  # disjoint: allowed
    assert tokens.shape[1] > 2


def test_edits_round_trip_through_json() -> None:
    import json

    edits = [
        Edit.zero(1, [2, 3]),
        Edit.scale(0, 1, 2.0, positions="last"),
        Edit.set(2, [4, 5], [1.0, 2.0], positions=slice(1, None)),
    ]
    for edit in edits:
        assert Edit.from_dict(json.loads(json.dumps(edit.to_dict()))) == edit
    with pytest.raises(ConfigError, match="layer, keys"):
        Edit.from_dict({"op": "zero"})


@torch.no_grad()
def test_mean_coefficients_average_real_tokens_only(tiny_bridge) -> None:
    from ffkv_lens.analysis.interventions import mean_coefficients

    lens = MemoryLens(tiny_bridge("llama"))
    texts = ["The capital of France is Paris.", "hello world"]
    tokens = lens.adapter.to_tokens(texts)  # right-padded to the longer text
    lengths = [lens.adapter.to_tokens(t).shape[1] for t in texts]
    mask = torch.tensor([[1] * n + [0] * (tokens.shape[1] - n) for n in lengths])
    got = mean_coefficients(lens.adapter, tokens, layers=1, attention_mask=mask)[1]
    rows = [lens.coefficients(lens.adapter.to_tokens(t), layers=1)[1][0, 1:] for t in texts]  # BOS left out
    assert_close(got, torch.cat(rows).double().mean(0).float(), rel=1e-5, what="mean over real tokens")
    edit = Edit.mean(1, [3, 4], got[[3, 4]])
    assert edit.value == (float(got[3]), float(got[4]))
