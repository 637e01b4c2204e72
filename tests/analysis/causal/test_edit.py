"""edit_fact on the planted model: suppress lowers p(target), enhance raises it, the audit finds the planted triggers.

Tolerances: the edits equal hand-built Edit hooks bit for bit (same code path); KL is >= 0 up to 1e-9 and
reproducible with the seed exactly; p changes compared with pytest.approx at 1e-6 relative.
"""

import pytest
import torch

from ffkv_lens import Corpus, Edit
from ffkv_lens.analysis.causal import Fact, edit_fact, locate_fact
from ffkv_lens.errors import ConfigError
from tests.analysis.causal.planted import Planted, planted_model
from tests.factories import TEXT

SENTENCES = [s.strip() + "." for s in TEXT.split(".") if s.strip()]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def planted(request: pytest.FixtureRequest, tiny_folder) -> Planted:
    return planted_model(tiny_folder, request.param)


def _setup(planted: Planted):
    target = planted.lens.adapter.tokenizer.decode([planted.target_token_id])
    location = locate_fact(planted.lens, [planted.prompt], target, top=5)
    atlas = planted.lens.search_triggers(Corpus.from_texts(SENTENCES), k=4, progress=False)
    return location, atlas


def test_suppress_lowers_p_target_and_the_audit_lists_the_planted_triggers(planted: Planted) -> None:
    location, atlas = _setup(planted)
    unrelated = [Fact(("hello world, 0123",), "4", id="digits")]
    fixed = edit_fact(
        planted.lens,
        location,
        memories=1,
        paraphrases=["The capital of Italy is"],
        unrelated=unrelated,
        corpus=Corpus.from_texts(SENTENCES),
        atlas=atlas,
        kl_positions=20,
    )
    assert fixed.edits == (Edit.zero(planted.layer, [planted.key]),)
    prompt = fixed.efficacy.set_index("kind").loc["prompt"]
    assert prompt["p_after"] < prompt["p_before"]
    assert prompt["predicted_before"] == location.target_token
    assert prompt["predicted_after"] != location.target_token
    paraphrase = fixed.efficacy.set_index("kind").loc["paraphrase"]
    assert paraphrase["delta_p"] < 0  # the key fires on " is" there too
    assert list(fixed.specificity["fact"]) == ["digits"]
    assert fixed.kl["positions"] == 20 and fixed.kl["mean"] > 0
    planted_examples = atlas.examples(planted.layer, planted.key)
    trigger = planted.lens.adapter.tokenizer.decode([planted.trigger_token_id])
    assert planted_examples and all(e.prefix.endswith(trigger) for e in planted_examples[:2])
    audited = fixed.audit[(fixed.audit["layer"] == planted.layer) & (fixed.audit["key"] == planted.key)]
    assert set(audited["prefix"]) == {e.prefix for e in planted_examples if e.next_token_id is not None}
    assert fixed.audit["delta_logp"].is_monotonic_increasing  # worst first
    summary = fixed.summary()
    assert summary["efficacy_prompts_delta_p"] == pytest.approx(prompt["delta_p"], rel=1e-6)
    assert fixed.to_json().startswith("{")


def test_the_audit_numbers_are_the_measured_change_under_the_edit(planted: Planted) -> None:
    location, atlas = _setup(planted)
    fixed = edit_fact(planted.lens, location, memories=1, atlas=atlas)
    row = fixed.audit.iloc[0]
    example = atlas.examples(int(row["layer"]), int(row["key"]))[int(row["example"])]
    adapter = planted.lens.adapter
    _, unit = atlas.units.get(example.unit_id)
    tokens = torch.tensor([[adapter.bos_token_id, *unit[: example.position + 1]]])
    with torch.no_grad():
        before = torch.log_softmax(adapter.model(tokens)[0, -1].double(), -1)[example.next_token_id]
        with planted.lens.edited_values(list(fixed.edits)):  # the weight edit: an independent path
            after = torch.log_softmax(adapter.model(tokens)[0, -1].double(), -1)[example.next_token_id]
    assert row["logp_before"] == pytest.approx(float(before), abs=1e-6)
    assert row["logp_after"] == pytest.approx(float(after), abs=1e-5)


def test_enhance_raises_p_target_and_kl_is_seeded(planted: Planted) -> None:
    location, _ = _setup(planted)
    corpus = Corpus.from_texts(SENTENCES)
    up = edit_fact(planted.lens, location, operation="enhance", memories=1, corpus=corpus, kl_positions=15, seed=3)
    assert up.edits == (Edit.scale(planted.layer, [planted.key], 2.0),)
    assert up.efficacy["delta_p"].iloc[0] > 0
    again = edit_fact(planted.lens, location, operation="enhance", memories=1, corpus=corpus, kl_positions=15, seed=3)
    assert again.kl == up.kl
    assert up.kl["mean"] >= -1e-9


def test_bad_edit_arguments_are_config_errors(planted: Planted) -> None:
    location, _ = _setup(planted)
    with pytest.raises(ConfigError, match="operation='erase'"):
        edit_fact(planted.lens, location, operation="erase")
    with pytest.raises(ConfigError, match="does not suppress"):
        edit_fact(planted.lens, location, strength=1.5)
    with pytest.raises(ConfigError, match="does not enhance"):
        edit_fact(planted.lens, location, operation="enhance", strength=0.5)
    with pytest.raises(ConfigError, match="memories=0"):
        edit_fact(planted.lens, location, memories=0)
