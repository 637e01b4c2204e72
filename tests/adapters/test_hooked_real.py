"""HookedTransformer vs TransformerBridge on the two embedded real models (slow; transformer-lens 3.x).

Each model is loaded three times from the same cached HF folder: as a bridge
(``ffkv_lens.load_model``) and as a HookedTransformer with processed and with raw weights
(``load_hooked_model``: TransformerLens's converters and weight processing). Tolerances (fp32):
coefficients 1e-4 relative per layer (the issue's bound; what differs is kernels and, processed,
folded weights), value logits 1e-4, trigger atlas equal units/positions up to ties (ranks whose
coefficients agree within 1e-5 of the layer's largest) and values within 1e-4,
contribution sums within 1e-4 of the direct logit attribution (relative to its magnitude plus the
sum of absolute contributions).
"""

import pytest
import torch

from ffkv_lens import MemoryLens
from ffkv_lens.analysis.triggers import search_triggers
from ffkv_lens.corpus import Corpus
from tests.adapters.checks import assert_atlases_equivalent
from tests.analysis.test_contributions import independent_dla
from tests.conftest import has_hooked_transformer
from tests.helpers import assert_close, relative_error

pytestmark = pytest.mark.slow
if not has_hooked_transformer():
    pytest.skip("HookedTransformer needs transformer-lens 3.x (the .venv-tl3 environment)", allow_module_level=True)
PROMPT = "The capital of France is"
TEXTS = ["The capital of France is Paris. The Eiffel Tower is in Paris.", "Rome is the capital of Italy."]
MODELS = ["smollm2-135m", "gemma3-270m"]


@pytest.fixture(scope="module", params=MODELS, ids=MODELS)
def lenses(request: pytest.FixtureRequest) -> dict[str, MemoryLens]:
    from ffkv_lens import load_model
    from ffkv_lens.adapters.hooked_loading import load_hooked_model

    name = request.param
    return {
        "bridge": MemoryLens(load_model(name, device="cpu")),
        "hooked-processed": MemoryLens(load_hooked_model(name, processed=True, device="cpu")),
        "hooked-raw": MemoryLens(load_hooked_model(name, processed=False, device="cpu")),
    }


@torch.no_grad()
def test_coefficients_and_value_logits_agree(lenses: dict[str, MemoryLens]) -> None:
    bridge = lenses["bridge"]
    tokens = bridge.adapter.to_tokens(PROMPT)
    reference = bridge.coefficients(tokens)
    memories = list(range(0, bridge.d_mlp, bridge.d_mlp // 16))
    for backend in ("hooked-processed", "hooked-raw"):
        lens = lenses[backend]
        assert torch.equal(lens.adapter.to_tokens(PROMPT), tokens)
        got = lens.coefficients(tokens)
        errors = [relative_error(got[layer][:, 1:], reference[layer][:, 1:]) for layer in range(lens.n_layers)]
        assert max(errors) <= 1e-4, f"{backend}: coefficient errors per layer {errors}"
        for layer in (0, lens.n_layers - 1):
            assert_close(
                lens.value_logits(layer, memories),
                bridge.value_logits(layer, memories),
                rel=1e-4,
                what=f"{backend} value logits layer {layer}",
            )


def test_trigger_atlas_agrees(lenses: dict[str, MemoryLens]) -> None:
    def search(lens: MemoryLens):
        with torch.no_grad():
            layers = [0, lens.n_layers - 1]
            return search_triggers(lens.adapter, Corpus.from_texts(TEXTS), k=2, layers=layers, progress=False)

    reference = search(lenses["bridge"])
    for backend in ("hooked-processed", "hooked-raw"):
        # Both sentences of TEXTS[0] start with "The": exact ties on the bridge, one ulp apart on
        # the HookedTransformer, so some ranks swap units (allowed only as ties).
        assert_atlases_equivalent(search(lenses[backend]), reference, rel=1e-4, tie_rel=1e-5, what=backend)


@torch.no_grad()
def test_contributions_match_the_direct_logit_attribution_of_paris(lenses: dict[str, MemoryLens]) -> None:
    tables = {}
    for backend, lens in lenses.items():
        tokens = lens.adapter.to_tokens(PROMPT)
        hooks = [lens.hook_names(layer) for layer in range(lens.n_layers)]
        names = [n for h in hooks for n in (h.ffn_output, h.post_ffn_scale) if n is not None]
        acts = lens.adapter.record(tokens, names + lens.adapter.readout_hooks().required())
        table = lens.contributions(tokens, position=-1, token=" Paris", top=None, top_tokens=0)
        paris = table.attrs["settings"]["token_id"]
        dla = sum(float(independent_dla(lens, acts, layer, -1)[paris]) for layer in range(lens.n_layers))
        total, scale = float(table.contribution.sum()), float(table.contribution.abs().sum())
        assert abs(total - dla) <= 1e-4 * abs(dla), f"{backend}: contributions sum {total} vs FFN DLA {dla}"
        assert abs(total - dla) <= 1e-4 * scale
        tables[backend] = table.sort_values(["layer", "key"])
    reference = torch.tensor(tables["bridge"].contribution.to_numpy())
    for backend in ("hooked-processed", "hooked-raw"):
        got = torch.tensor(tables[backend].contribution.to_numpy())
        assert_close(got, reference, rel=1e-4, what=f"{backend} contributions")
