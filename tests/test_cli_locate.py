"""`ffkv-lens locate`: a fact file into a facts folder (tables, figure, report), refusing a foreign --out."""

import json
from pathlib import Path

import pandas as pd
import pytest

from ffkv_lens import Corpus, MemoryLens
from ffkv_lens.cli import main
from ffkv_lens.storage.layout import FACTS
from tests.conftest import boot
from tests.factories import TEXT

SENTENCES = [s.strip() + "." for s in TEXT.split(".") if s.strip()]
FACTS_LINES = [
    {"id": "france", "prompts": ["The capital of France is", "The capital of France is the city"], "target": " Paris",
     "paraphrases": ["The capital of Italy is"], "relation": "capital"},
    {"id": "fox", "prompts": ["the quick brown"], "target": " fox"},
]  # fmt: skip


@pytest.fixture(scope="module")
def inputs(tiny_folder, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("locate-inputs")
    folder = tiny_folder("llama")
    facts = root / "facts.jsonl"
    facts.write_text("".join(json.dumps(line) + "\n" for line in FACTS_LINES), encoding="utf-8")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    atlas = MemoryLens(boot(folder)).search_triggers(Corpus.from_texts(SENTENCES), k=3, progress=False)
    atlas.save(root / "atlas")
    return {"model": folder, "facts": facts, "corpus": corpus, "atlas": root / "atlas"}


def _argv(inputs: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["locate", "--model", str(inputs["model"]), "--facts", str(inputs["facts"]), "--out", str(out),
            "--corpus", str(inputs["corpus"]), "--atlas", str(inputs["atlas"]), "--top", "4", "--kl-positions", "10",
            "--device", "cpu", *extra]  # fmt: skip


def test_locate_writes_the_facts_folder(inputs: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "facts"
    assert main(_argv(inputs, out, "--method", "integrated_gradients", "--steps", "4")) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == FACTS.format
    assert manifest["settings"]["method"] == "integrated_gradients" and manifest["settings"]["top"] == 4
    assert [f["id"] for f in manifest["facts"]] == ["france", "fox"]
    summary = pd.read_csv(out / "tables" / "facts.csv")
    assert summary["fact"].tolist() == ["france", "fox"]
    memories = pd.read_csv(out / "tables" / "memories.csv")
    assert len(memories) == 8 and set(memories["fact"]) == {"france", "fox"}
    assert {"ablation_delta_p", "estimate_delta_logp"} <= set(memories.columns)
    for name in ("per_prompt", "completeness", "efficacy", "specificity", "audit"):
        assert (out / "tables" / f"{name}.csv").is_file(), name
        assert (out / "tables" / f"{name}.json").is_file(), name
    efficacy = pd.read_csv(out / "tables" / "efficacy.csv")
    assert (efficacy.query("fact == 'france'")["kind"] == "paraphrase").sum() == 1
    audit = pd.read_csv(out / "tables" / "audit.csv")
    assert len(audit) > 0 and audit.groupby("fact")["delta_logp"].apply(lambda s: s.is_monotonic_increasing).all()
    for suffix in (".png", ".svg"):
        assert (out / "figures" / f"attribution_vs_ablation{suffix}").is_file()
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "Collateral audit" in page and "data:image/svg+xml;base64," in page and 'id="fact-france"' in page
    assert "<script" not in page
    assert "report:" in capsys.readouterr().out


def test_locate_refuses_a_foreign_out_and_an_earlier_result_without_force(
    inputs: dict[str, Path], tmp_path: Path, capsys
) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("my notes")
    assert main(_argv(inputs, foreign)) == 2
    err = capsys.readouterr().err
    assert "is not empty and is not a facts folder" in err and len(err.strip().splitlines()) == 1
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    out = tmp_path / "facts"
    assert main(_argv(inputs, out, "--kl-positions", "0")) == 0
    (out / "tables" / "mine.txt").write_text("kept")
    assert main(_argv(inputs, out)) == 2
    assert "already holds a `ffkv-lens locate` result" in capsys.readouterr().err
    assert main(_argv(inputs, out, "--force")) == 0
    assert (out / "tables" / "mine.txt").read_text() == "kept"


def test_locate_errors_are_one_line(inputs: dict[str, Path], tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompts": ["a"]}\n')
    argv = _argv(inputs, tmp_path / "out")
    argv[argv.index("--facts") + 1] = str(bad)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ffkv-lens: error: bad.jsonl:1: ") and len(err.splitlines()) == 1
    argv = _argv(inputs, tmp_path / "out2")
    argv[argv.index("--atlas") + 1] = str(tmp_path)
    assert main(argv) == 2
    assert "holds no trigger atlas" in capsys.readouterr().err


def test_locate_help_shows_defaults(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["locate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--method {attribution,integrated_gradients}" in text and "(default: attribution)" in text
    assert "(default: 20)" in text and "(default: suppress)" in text
