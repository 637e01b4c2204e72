"""The fact file format: a validated JSONL reader with one-line errors, and the "does the model know it" check."""

import json
from pathlib import Path

import pytest

from ffkv_lens.analysis.causal.facts import (
    Fact,
    answer_text,
    check_fact,
    check_facts,
    parse_fact,
    read_facts,
    target_token_id,
)
from ffkv_lens.errors import FactFileError
from tests.analysis.causal.planted import planted_model

GOOD = {"id": "fr", "prompts": ["The capital of France is"], "target": " Paris", "relation": "capital"}


def _write(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "facts.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_reads_facts_skipping_blank_and_comment_lines(tmp_path: Path) -> None:
    second = {"prompts": ["Rome is the capital of"], "target": "Italy", "paraphrases": ["Italy's capital is Rome, in"]}
    path = _write(tmp_path, "# capitals", json.dumps(GOOD), "", json.dumps(second))
    facts = read_facts(path)
    assert [f.id for f in facts] == ["fr", "line4"]
    assert facts[0] == Fact(("The capital of France is",), " Paris", (), "capital", None, "fr")
    assert facts[1].paraphrases == ("Italy's capital is Rome, in",)
    assert [parse_fact(f.to_dict(), where="round trip") for f in facts] == facts


BAD_LINES = {
    "not-json": ("{prompts: 1}", "facts.jsonl:2: not JSON"),
    "not-an-object": ("[1, 2]", "a fact must be a JSON object"),
    "no-prompts": (json.dumps({"target": " Paris"}), '"prompts" is None'),
    "empty-prompt": (json.dumps({"prompts": [""], "target": " Paris"}), "non-empty list of non-empty strings"),
    "prompts-a-string": (json.dumps({"prompts": "The capital", "target": " Paris"}), '"prompts" is'),
    "no-target": (json.dumps({"prompts": ["The capital of France is"]}), '"target" is None'),
    "number-target": (json.dumps({"prompts": ["a"], "target": 3}), '"target" is 3'),
    "unknown-field": (json.dumps({**GOOD, "id": "x", "answer": "Paris"}), "unknown field 'answer'"),
    "bad-relation": (json.dumps({**GOOD, "id": "y", "relation": 5}), '"relation" is 5'),
    "duplicate-id": (json.dumps(GOOD), "id 'fr' is used by facts.jsonl:1 too"),
}


@pytest.mark.parametrize("case", list(BAD_LINES), ids=list(BAD_LINES))
def test_every_bad_line_is_a_one_line_error_naming_file_line_and_fix(tmp_path: Path, case: str) -> None:
    line, expected = BAD_LINES[case]
    path = _write(tmp_path, json.dumps(GOOD), line)
    with pytest.raises(FactFileError) as info:
        read_facts(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("facts.jsonl:2: ")
    assert expected in message


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(FactFileError, match="does not exist"):
        read_facts(tmp_path / "missing.jsonl")
    with pytest.raises(FactFileError, match="is a folder"):
        read_facts(tmp_path)
    (tmp_path / "latin1.jsonl").write_bytes(b'{"prompts": ["caf\xe9"], "target": " x"}\n')
    with pytest.raises(FactFileError, match="is not UTF-8"):
        read_facts(tmp_path / "latin1.jsonl")
    with pytest.raises(FactFileError, match="holds no fact"):
        read_facts(_write(tmp_path, "# nothing", ""))


def test_answer_text_adds_the_space_a_word_after_a_word_needs() -> None:
    assert answer_text("The capital of France is", "Paris") == " Paris"
    assert answer_text("The capital of France is", " Paris") == " Paris"
    assert answer_text("The capital of France is ", "Paris") == "Paris"


def test_check_fact_says_whether_the_greedy_next_token_is_the_targets_first_token(tiny_folder) -> None:
    planted = planted_model(tiny_folder, "llama")
    tokenizer = planted.lens.adapter.tokenizer
    target = tokenizer.decode([planted.target_token_id])
    assert target_token_id(planted.lens, planted.prompt, target) == planted.target_token_id
    known = Fact((planted.prompt,), target + "ox and more", id="known")  # a multi-token target: its first token
    unknown = Fact((planted.prompt, "hello world"), target, id="half")
    table = check_fact(planted.lens, known)
    assert table["correct"].tolist() == [True]
    assert table["p_target"].iloc[0] == pytest.approx(planted.target_prob, rel=1e-5)
    summary = check_facts(planted.lens, [known, unknown])
    assert summary["correct"].tolist() == [True, False]
    assert summary["correct_prompts"].tolist() == [1, 1]
