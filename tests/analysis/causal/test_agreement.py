"""causal_agreement: a planted memory, every family, the controls' definition, the statistics.

The planted model (tests/analysis/causal/planted.py) has one memory whose key fires on the trigger
token and whose value writes the target token's unembedding direction: causal_agreement must find
its effect on that token and none on its controls. The tolerances: exact equality for seeded
choices, 1e-5 absolute for effects recomputed another way (float32 models, float64 sums).
"""

import math

import numpy as np
import pytest
import torch

from ffkv_lens import Corpus, MemoryLens
from ffkv_lens.analysis import causal_agreement, value_agreement
from ffkv_lens.analysis.causal import ablate
from ffkv_lens.analysis.causal.summary import EFFECTS, spearman
from ffkv_lens.analysis.contributions import contributions
from ffkv_lens.errors import ConfigError
from tests.analysis.causal.planted import planted_model
from tests.factories import FAMILY_NAMES, TEXT

TEXTS = [s.strip() + "." for s in TEXT.split(".") if s.strip()]
TOL = 1e-5


@pytest.fixture(scope="module")
def planted(tiny_folder):
    p = planted_model(tiny_folder, "llama")
    atlas = p.lens.search_triggers(Corpus.from_texts([*TEXTS, p.prompt]), k=4, progress=False, max_len=16, layers=[1])
    result = causal_agreement(p.lens, atlas, keys_per_layer=p.lens.d_mlp, examples=4, progress=False, n_bootstrap=200)
    return p, atlas, result


def test_planted_memory_is_found_on_its_token(planted) -> None:
    p, _, result = planted
    memories = result.per_memory.set_index("key")
    row = memories.loc[p.key]
    assert row["value_token_id"] == p.target_token_id
    others = memories.drop(index=p.key)
    # The planted memory moves log p(target) far more than any other memory of the layer moves its own token.
    assert row["total_value"] > 5 * others["total_value"].abs().max(), (row["total_value"], others["total_value"].max())
    assert row["direct_value"] > 5 * others["direct_value"].abs().max()
    ex = result.per_example[result.per_example["key"] == p.key]
    top = ex.iloc[0]
    assert top["total_value"] > 0.05, "log p(target) must fall by a clear margin when the planted memory is zeroed"


def test_controls_do_not_move_the_planted_token(planted) -> None:
    p, atlas, result = planted
    ex = result.per_example[result.per_example["key"] == p.key]
    head = (p.lens.adapter.bos_token_id,) if atlas.manifest["settings"]["has_bos"] else ()
    prefixes = [head + tuple(atlas.units.get(u)[1][: pos + 1]) for u, pos in zip(ex.unit_id, ex.position, strict=True)]
    index = torch.arange(len(prefixes))
    target = torch.full((len(prefixes), 1), p.target_token_id)
    own = ablate(p.lens.adapter, p.layer, prefixes, index, torch.full((len(prefixes),), p.key), target)
    controls = ablate(p.lens.adapter, p.layer, prefixes, index, torch.tensor(ex.control_key.to_numpy()), target)
    assert float(own.total[0, 0]) > 20 * float(controls.total[:, 0].abs().max())
    assert torch.allclose(own.total[:, 0], torch.tensor(ex.total_value.to_numpy()), atol=TOL, rtol=0)


def test_control_is_near_in_abs_coefficient_rank(planted) -> None:
    p, atlas, result = planted
    head = (p.lens.adapter.bos_token_id,) if atlas.manifest["settings"]["has_bos"] else ()
    window = result.settings["control_window"]
    for row in result.per_example.head(30).itertuples():
        prefix = head + tuple(atlas.units.get(row.unit_id)[1][: row.position + 1])
        m = p.lens.coefficients(torch.tensor([prefix]), layers=1)[1][0, -1].abs()
        order = torch.argsort(-m, stable=True).tolist()
        assert row.control_key != row.key
        assert abs(order.index(row.control_key) - order.index(row.key)) <= window
        assert abs(abs(row.control_coefficient) - float(m[row.control_key])) <= TOL * (1 + float(m.max()))


def test_frozen_direct_effect_is_the_contribution(planted) -> None:
    p, atlas, result = planted
    head = (p.lens.adapter.bos_token_id,) if atlas.manifest["settings"]["has_bos"] else ()
    for row in result.per_example.head(5).itertuples():
        tokens = torch.tensor([head + tuple(atlas.units.get(row.unit_id)[1][: row.position + 1])])
        table = contributions(p.lens, tokens, position=-1, token=int(row.next_token_id), top=None, layers=[1])
        want = float(table.loc[table.key == row.key, "contribution"].iloc[0])
        assert abs(row.direct_logit_frozen_next - want) <= TOL * max(1.0, abs(want))


def test_per_layer_statistics(planted) -> None:
    _, _, result = planted
    layer = result.per_layer.iloc[0]
    memories = result.per_memory
    assert layer["n_memories"] == len(memories) == len(result.settings["sampled_keys"][1])
    for name in EFFECTS:
        assert math.isclose(layer[name], memories[name].mean(), rel_tol=1e-12, abs_tol=1e-15)
        assert layer[f"{name}_ci_low"] <= layer[name] <= layer[f"{name}_ci_high"]
    assert math.isclose(layer["share_beats_control"], (memories["causal_score"] > 0).mean())
    expected = (memories["total_next"] - memories["control_total_next"]).to_numpy()
    assert np.allclose(memories["causal_score"].to_numpy(), expected, atol=0)


def test_seeded_and_joined_with_value_agreement(tiny_bridge) -> None:
    lens = MemoryLens(tiny_bridge("gpt2"))
    atlas = lens.search_triggers(Corpus.from_texts(TEXTS), k=4, progress=False, max_len=16)
    correlational = value_agreement(lens, atlas)
    kwargs = dict(keys_per_layer=6, examples=3, progress=False, n_bootstrap=50)
    a = causal_agreement(lens, atlas, seed=3, agreement=correlational, **kwargs)
    b = causal_agreement(lens, atlas, seed=3, agreement=correlational, **kwargs)
    c = causal_agreement(lens, atlas, seed=4, **kwargs)
    assert a.per_example.equals(b.per_example) and a.per_layer.equals(b.per_layer)
    assert a.settings["sampled_keys"] != c.settings["sampled_keys"]
    joined = a.per_memory.merge(correlational.per_memory, on=["layer", "key"], suffixes=("", "_va"))
    assert (joined["precision_at_k"] == joined["precision_at_k_va"]).all()
    assert a.settings["correlational_source"] == "value_agreement"
    assert c.settings["correlational_source"] == "measured examples"


def test_spearman_by_hand() -> None:
    assert spearman(np.array([1.0, 2.0, 3.0, 4.0]), np.array([10.0, 20.0, 30.0, 40.0])) == pytest.approx(1.0)
    assert spearman(np.array([1.0, 2.0, 3.0]), np.array([3.0, 2.0, 1.0])) == pytest.approx(-1.0)
    # ties get average ranks: x ranks (1, 2.5, 2.5, 4), y ranks (1, 2, 3, 4) -> r = 0.9487
    assert spearman(np.array([1.0, 2.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0, 4.0])) == pytest.approx(0.948683, abs=1e-6)
    assert math.isnan(spearman(np.array([1.0, 1.0, 1.0]), np.array([1.0, 2.0, 3.0])))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_family(tiny_bridge, family: str) -> None:
    lens = MemoryLens(tiny_bridge(family))
    atlas = lens.search_triggers(Corpus.from_texts(TEXTS), k=3, progress=False, max_len=12)
    if family == "bert":
        with pytest.raises(ConfigError, match="not a causal language model"):
            causal_agreement(lens, atlas, keys_per_layer=4, examples=2, progress=False)
        return
    result = causal_agreement(lens, atlas, keys_per_layer=4, examples=2, progress=False, n_bootstrap=50)
    assert result.per_layer["layer"].tolist() == atlas.layers
    assert (result.per_layer["n_memories"] == 4).all()
    effects = result.per_example[[c for c in result.per_example.columns if "total" in c or "direct" in c]]
    assert np.isfinite(effects.to_numpy(dtype=np.float64)).all()
    assert float(effects.abs().to_numpy().max()) > 0
    assert (result.per_example["control_key"] != result.per_example["key"]).all()


def test_errors_are_named(tiny_bridge) -> None:
    lens = MemoryLens(tiny_bridge("gpt2"))
    atlas = lens.search_triggers(Corpus.from_texts(TEXTS[:2]), k=2, progress=False, max_len=12, layers=[1])
    with pytest.raises(ConfigError, match="keys_per_layer=0"):
        causal_agreement(lens, atlas, keys_per_layer=0)
    with pytest.raises(ConfigError, match="not searched"):
        causal_agreement(lens, atlas, layers=[0])
    with pytest.raises(ConfigError, match="ci=1.5"):
        causal_agreement(lens, atlas, ci=1.5)
