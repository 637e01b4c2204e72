"""Batched ablations against one ablation per forward pass, and the frozen direct effect against contributions().

Every decoder family of the tiny suite: pairs of several keys on prefixes of different lengths
(padding, several rows per prefix) must give the same coefficients, clean log p and total, direct
and frozen direct effects as the reference (one forward pass per pair, the ablation an ``Edit``
under ``intervene``, the frozen direct effect read from ``contributions``), within 1e-5 absolute.
"""

import pytest
import torch

from ffkv_lens import MemoryLens
from ffkv_lens.analysis.causal import ablate, ablate_one_by_one
from ffkv_lens.analysis.causal.ablation import clean_runs
from ffkv_lens.analysis.contributions import contributions
from ffkv_lens.errors import ConfigError
from tests.factories import FAMILY_NAMES

DECODERS = [f for f in FAMILY_NAMES if f != "bert"]
TEXTS = ["The capital of France is Paris.", "hello world, 0123456789", "the quick brown fox"]
TOL = 1e-5


def _pairs(lens: MemoryLens) -> tuple[list[tuple[int, ...]], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prefixes of three lengths, three keys each, two target tokens per pair."""
    prefixes = [tuple(lens.adapter.to_tokens(t)[0, :n].tolist()) for t, n in zip(TEXTS, (7, 3, 5), strict=True)]
    gen = torch.Generator().manual_seed(1)
    pair_prefix = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    pair_key = torch.randint(lens.d_mlp, (9,), generator=gen)
    targets = torch.randint(lens.d_vocab, (9, 2), generator=gen)
    return prefixes, pair_prefix, pair_key, targets


@pytest.mark.parametrize("family", DECODERS)
def test_batched_equals_one_by_one(tiny_bridge, family: str) -> None:
    lens = MemoryLens(tiny_bridge(family))
    prefixes, pair_prefix, pair_key, targets = _pairs(lens)
    for layer in (0, lens.n_layers - 1):
        batched = ablate(lens.adapter, layer, prefixes, pair_prefix, pair_key, targets, batch_tokens=12)
        reference = ablate_one_by_one(lens.adapter, layer, prefixes, pair_prefix, pair_key, targets)
        for name in ("coefficient", "clean_logp", "total", "direct", "direct_logit_frozen"):
            got, want = getattr(batched, name), getattr(reference, name)
            diff = float((got - want).abs().max())
            assert diff <= TOL * max(1.0, float(want.abs().max())), f"{family} layer {layer} {name}: {diff:.3e}"
        assert float(reference.total.abs().max()) > 1e-4, "the ablations changed nothing: the test would not see a bug"


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3", "phi"])
def test_direct_logit_frozen_is_the_contribution(tiny_bridge, family: str) -> None:
    """clean - ablated on the frozen-scale logit = contribution, i.e. ablated - clean = -contribution (1e-5)."""
    lens = MemoryLens(tiny_bridge(family))
    tokens = lens.adapter.to_tokens(TEXTS[0])
    layer, token = 1, 42
    table = contributions(lens, tokens, position=-1, token=token, top=None, layers=[layer], top_tokens=0)
    keys = torch.arange(lens.d_mlp)
    ab = ablate(
        lens.adapter,
        layer,
        [tuple(tokens[0].tolist())],
        torch.zeros_like(keys),
        keys,
        torch.full((lens.d_mlp, 1), token),
    )
    want = torch.tensor(table.sort_values("key")["contribution"].to_numpy())
    assert float((ab.direct_logit_frozen[:, 0] - want).abs().max()) <= TOL * max(1.0, float(want.abs().max()))
    assert float(want.abs().max()) > 1e-4, "every contribution is ~0: the comparison would be empty"


def test_clean_runs_read_each_prefix_at_its_last_real_position(tiny_bridge) -> None:
    lens = MemoryLens(tiny_bridge("llama"))
    prefixes = [tuple(lens.adapter.to_tokens(t)[0].tolist()) for t in TEXTS]
    clean = clean_runs(lens.adapter, 2, prefixes, batch_tokens=64)
    for i, prefix in enumerate(prefixes):
        m = lens.coefficients(torch.tensor([prefix]), layers=2)[2][0, -1].double()
        assert float((clean.coefficients[i] - m).abs().max()) <= TOL * max(1.0, float(m.abs().max()))


def test_errors_are_named(tiny_bridge) -> None:
    lens = MemoryLens(tiny_bridge("gpt2"))
    prefixes, pair_prefix, pair_key, targets = _pairs(lens)
    with pytest.raises(ConfigError, match="outside"):
        ablate(lens.adapter, 0, prefixes[:1], pair_prefix, pair_key, targets)
    with pytest.raises(ConfigError, match="keys outside"):
        ablate(lens.adapter, 0, prefixes, pair_prefix, pair_key + lens.d_mlp, targets)
    bert = MemoryLens(tiny_bridge("bert"))
    with pytest.raises(ConfigError, match="not a causal language model"):
        ablate(bert.adapter, 0, prefixes, pair_prefix, pair_key, targets)
