"""tools/check_facts.py keeps the candidate facts a model predicts, and says how many of how many."""

import importlib.util
import json
from pathlib import Path

from ffkv_lens import MemoryLens
from ffkv_lens.analysis.causal import read_facts
from ffkv_lens.analysis.causal.facts import target_token_id
from tests.conftest import boot
from tests.factories import TEXT

ROOT = Path(__file__).resolve().parent.parent


def _tool():
    spec = importlib.util.spec_from_file_location("check_facts", ROOT / "tools" / "check_facts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _predicted_prompt(lens: MemoryLens) -> tuple[str, str]:
    """A prompt and the text of its greedy next token, which the fact format measures as that very token."""
    ends = [i for i, c in enumerate(TEXT) if c == " "]
    for prompt in (TEXT[: i + extra] for i in ends for extra in (0, 1)):
        predicted_id = int(lens.adapter.model(lens.adapter.to_tokens(prompt))[0, -1].argmax())
        text = lens.adapter.tokenizer.decode([predicted_id])
        if text.strip() and target_token_id(lens, prompt, text) == predicted_id:
            return prompt, text
    raise AssertionError("no prompt of the tiny model predicts a token that round-trips")


def test_keeps_the_predicted_prompts_and_counts(tiny_folder, tmp_path: Path, capsys) -> None:
    folder = tiny_folder("llama")
    lens = MemoryLens(boot(folder))
    prompt, predicted = _predicted_prompt(lens)
    wrong = next(t for t in (" Paris", " Rome", " fox") if t != predicted)
    candidates = tmp_path / "candidates.jsonl"
    lines = [
        {"id": "right", "prompts": [prompt, "hello world"], "target": predicted, "paraphrases": ["x y"]},
        {"id": "wrong", "prompts": [prompt], "target": wrong},
    ]
    candidates.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    out = tmp_path / "kept.jsonl"
    assert _tool().main(["--model", str(folder), "--candidates", str(candidates), "--out", str(out)]) == 0
    kept = read_facts(out)
    assert [f.id for f in kept] == ["right"]
    assert prompt in kept[0].prompts and kept[0].paraphrases == ("x y",)
    header = out.read_text(encoding="utf-8").splitlines()[0]
    assert header.startswith(f"# {folder}: 1 of 2 candidate facts predicted on at least one prompt")
    assert "drop wrong" in capsys.readouterr().out


def test_the_example_files_hold_only_checked_facts() -> None:
    for name in ("smollm2.jsonl", "gemma3.jsonl"):
        path = ROOT / "examples" / "facts" / name
        header = path.read_text(encoding="utf-8").splitlines()[0]
        assert header.startswith("# ") and " of 33 candidate facts predicted" in header, header
        assert len(read_facts(path)) >= 5
