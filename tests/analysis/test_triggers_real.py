"""Trigger search on SmolLM2-135M equals the brute force (slow: a real model).

Run in float64 with a rounding hook that forces exact ties (see test_triggers.py); units and
positions must be equal and coefficients within 1e-5 relative.
"""

import pytest
import torch

from ffkv_lens import MemoryLens
from ffkv_lens.analysis.triggers import search_triggers
from ffkv_lens.corpus import Corpus
from tests.analysis.test_triggers import _rounding_hook, assert_atlas_equals, brute_force

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2() -> MemoryLens:
    from ffkv_lens import load_model

    return MemoryLens(load_model("smollm2-135m", device="cpu", dtype=torch.float64))


@pytest.mark.parametrize("unit", ["sentence", "document", "window"])
@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_smollm2_search_equals_brute_force(smollm2: MemoryLens, unit: str, signed: bool) -> None:
    corpus = Corpus.default().take(3)
    hooks = _rounding_hook(smollm2, grid=0.25)
    try:
        with torch.no_grad():
            kw = dict(unit=unit, k=5, signed=signed, exclude_bos=True, max_len=48, layers=[0, 14, 29], max_tokens=400)
            expected = brute_force(smollm2, corpus, **kw)
            for batch_tokens in (100, 2048):
                atlas = search_triggers(smollm2.adapter, corpus, batch_tokens=batch_tokens, progress=False, **kw)
                assert_atlas_equals(atlas, expected, [0, 14, 29], signed)
    finally:
        for hp in hooks:
            hp.remove_hooks()
