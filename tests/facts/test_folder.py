"""write_facts_folder on the planted model: the planted memory tops the planted fact, and text is escaped."""

import json
from pathlib import Path

import pandas as pd
import pytest

from ffkv_lens.analysis.causal import Fact
from ffkv_lens.errors import ConfigError
from ffkv_lens.facts import FACTS_FORMAT, LocateSettings, write_facts_folder
from tests.analysis.causal.planted import planted_model


def test_the_folder_holds_the_planted_memory_and_escapes_text(tiny_folder, tmp_path: Path) -> None:
    planted = planted_model(tiny_folder, "gpt2")
    target = planted.lens.adapter.tokenizer.decode([planted.target_token_id])
    facts = [
        Fact((planted.prompt,), target, paraphrases=("The capital of Italy is",), id="planted"),
        Fact(("<script>alert(1)</script> is",), target, id="markup"),
    ]
    out = write_facts_folder(planted.lens, facts, tmp_path / "facts", settings=LocateSettings(top=3), progress=False)
    summary = pd.read_csv(out / "tables" / "facts.csv")
    assert summary["fact"].tolist() == ["planted", "markup"]
    assert summary["top_memory"].iloc[0] == f"{planted.layer}:{planted.key}"
    assert summary["known"].tolist()[0]
    assert json.loads((out / "manifest.json").read_text())["format"] == FACTS_FORMAT
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert not (out / "tables" / "audit.csv").exists()  # no atlas: no audit table
    with pytest.raises(ConfigError, match="no facts"):
        write_facts_folder(planted.lens, [], tmp_path / "empty")
