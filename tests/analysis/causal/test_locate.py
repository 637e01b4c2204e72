"""locate_fact on the planted model: the planted memory ranks first, IG is complete, verification is a real ablation.

Tolerances: integrated-gradient completeness (sum of a layer's attributions vs the change of log p(target)
between alpha = 0 and alpha = 1) within 0.02 absolute at steps=32 on the planted model, and the error at
steps=4 is larger than at steps=32 on every layer whose objective changes (a right Riemann sum converges
as 1/steps). Verification against an independent hand-written hook on the FFN output: p(target) with the memory
removed agrees to 1e-5 relative in fp32 (different rounding order, and the verification reads out only the last
position).
"""

import pytest
import torch

from ffkv_lens import MemoryLens
from ffkv_lens.analysis.causal import locate_fact
from ffkv_lens.errors import ConfigError
from tests.analysis.causal.planted import Planted, planted_model
from tests.factories import FAMILY_NAMES

PLANTED_FAMILIES = ["llama", "gpt2"]
# gemma2/gemma3: a post-FFN norm caps the FFN output, so no single value can make the target the prediction
# (see planted_model); bert is a masked LM, and locate_fact attributes a next-token prediction.


def _target(planted: Planted) -> str:
    return planted.lens.adapter.tokenizer.decode([planted.target_token_id])


@pytest.fixture(scope="module", params=PLANTED_FAMILIES)
def planted(request: pytest.FixtureRequest, tiny_folder) -> Planted:
    return planted_model(tiny_folder, request.param)


@pytest.mark.parametrize("method", ["attribution", "integrated_gradients"])
def test_the_planted_memory_ranks_first_and_its_ablation_is_measured(planted: Planted, method: str) -> None:
    location = locate_fact(planted.lens, [planted.prompt], _target(planted), method=method, top=5)
    first = location.memories.iloc[0]
    assert (first["layer"], first["key"]) == (planted.layer, planted.key)
    assert first["coefficient"] == pytest.approx(planted.coefficient, rel=1e-5)
    assert first["ablation_delta_p"] < 0
    assert first["ablation_delta_logp"] < 0
    assert location.memories["ablation_delta_logp"].iloc[0] == location.memories["ablation_delta_logp"].min()
    assert location.target_token_id == planted.target_token_id
    assert location.settings["method"] == method
    assert location.verification["joint_delta_logp"] <= first["ablation_delta_logp"] + 0.05


def test_integrated_gradients_are_complete_and_tighten_with_steps(planted: Planted) -> None:
    errors = {}
    for steps in (4, 32):
        location = locate_fact(
            planted.lens, [planted.prompt], _target(planted), method="integrated_gradients", steps=steps, verify=False
        )
        errors[steps] = location.completeness.set_index("layer")
        assert location.settings["steps"] == steps
    assert errors[32]["error"].abs().max() <= 0.02
    moved = errors[32]["objective_change"].abs() > 1e-3
    assert moved.any()
    assert (errors[4]["error"].abs()[moved] > errors[32]["error"].abs()[moved]).all()
    planted_row = errors[32].loc[planted.layer]
    assert planted_row["objective_change"] > 0.1  # the planted memory's layer carries the prediction


def test_verified_single_ablation_equals_a_hand_written_hook_on_the_ffn_output(planted: Planted) -> None:
    location = locate_fact(planted.lens, [planted.prompt], _target(planted), top=3)
    adapter = planted.lens.adapter
    tokens, target = planted.tokens, planted.target_token_id
    with torch.no_grad():
        base = torch.softmax(adapter.model(tokens)[0, -1].double(), -1)[target]
    for row in location.memories.itertuples():
        removed = _remove_term_at_last_position(planted.lens, tokens, row.layer, row.key, target)
        measured = location.verification["base_p"][0] + row.ablation_delta_p  # p(target) with the memory zeroed
        assert location.verification["base_p"][0] == pytest.approx(float(base), rel=1e-5)
        assert measured == pytest.approx(float(removed), rel=1e-5)


@torch.no_grad()
def _remove_term_at_last_position(lens: MemoryLens, tokens: torch.Tensor, layer: int, key: int, target: int):
    """p(target) with ``m * v`` of memory (layer, key) subtracted from the FFN output at the last position.

    Independent of the Edit machinery: a different hook point (``hook_mlp_out``), the term rebuilt from the
    recorded coefficient and the value row (families without a post-FFN norm only).
    """
    m = lens.coefficients(tokens, layers=layer)[layer][0, -1, key]
    term = m * lens.values(layer)[key]

    def subtract(out: torch.Tensor, hook) -> torch.Tensor:
        out = out.clone()
        out[:, -1] -= term
        return out

    logits = lens.adapter.run_with_hooks(tokens, [(lens.hook_names(layer).ffn_output, subtract)])
    return torch.softmax(logits[0, -1].double(), -1)[target]


def test_several_paraphrases_mark_shared_memories_and_record_thresholds(planted: Planted) -> None:
    prompts = [planted.prompt, "The capital of Italy is", "hello world"]
    location = locate_fact(
        planted.lens, prompts, _target(planted), top=10, share_threshold=0.6, attribution_threshold=0.3
    )
    first = location.memories.iloc[0]
    assert (first["layer"], first["key"]) == (planted.layer, planted.key)
    assert first["shared_by"] == 2  # fires on the two prompts ending in the trigger " is", not on "hello world"
    assert bool(first["shared"])  # 2 of 3 >= 0.6
    assert location.settings["share_threshold"] == 0.6
    assert location.settings["attribution_threshold"] == 0.3
    assert len(location.per_prompt) == 3 * len(location.memories)
    assert len(location.verification["base_p"]) == 3
    data = location.to_dict()
    assert data["memories"][0]["key"] == planted.key
    assert location.to_json().startswith("{")


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_family_runs_locate_fact(family: str, tiny_bridge) -> None:
    lens = MemoryLens(tiny_bridge(family))
    if family == "bert":
        with pytest.raises(ConfigError, match="not a causal LM"):
            locate_fact(lens, ["The capital of France is"], " Paris")
        return
    for method in ("attribution", "integrated_gradients"):
        location = locate_fact(lens, ["The capital of France is"], " Paris", method=method, top=4, steps=8)
        assert len(location.memories) == 4
        assert location.memories["attribution"].is_monotonic_decreasing
        assert torch.isfinite(torch.tensor(location.memories["ablation_delta_logp"].to_numpy())).all()
    # attribution is a first-order estimate of the measured ablation; on random tiny models both are small
    assert (location.memories["estimate_delta_logp"].abs() < 5).all()


def test_bad_arguments_are_config_errors(planted: Planted) -> None:
    target = _target(planted)
    with pytest.raises(ConfigError, match="method='ig'"):
        locate_fact(planted.lens, [planted.prompt], target, method="ig")
    with pytest.raises(ConfigError, match="top=0"):
        locate_fact(planted.lens, [planted.prompt], target, top=0)
    with pytest.raises(ConfigError, match="steps=0"):
        locate_fact(planted.lens, [planted.prompt], target, method="integrated_gradients", steps=0)
    with pytest.raises(ConfigError, match="prompts=\\[\\]"):
        locate_fact(planted.lens, [], target)
    with pytest.raises(ConfigError, match="different tokens"):
        locate_fact(planted.lens, ["The capital of France is", "The capital of France is "], "Paris")
