"""``compare`` / ``ffkv-lens compare``: the comparison folder, its report and its refusals."""

import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from ffkv_lens.cli import main
from ffkv_lens.comparison import MATCH_COLUMNS, Comparison, compare
from ffkv_lens.errors import ConfigError, RunFolderError
from ffkv_lens.pipeline import RunConfig, run_study
from tests.factories import TEXT


@pytest.fixture(scope="module")
def runs(tiny_folder, tmp_path_factory) -> list[Path]:
    """Finished tiny runs of two families on one corpus."""
    root = tmp_path_factory.mktemp("compare-runs")
    corpus = root / "corpus.txt"
    corpus.write_text((TEXT + "\nParis is the capital of France. Rome is the capital of Italy.\n") * 4)
    out = []
    for family in ("gpt2", "llama"):
        config = RunConfig(model=str(tiny_folder(family)), corpus=str(corpus), k=4, keys_per_layer=8, examples=4,
                           positions=16, max_tokens=2000)  # fmt: skip
        out.append(run_study(config, root / family, progress=False))
    return out


@pytest.fixture(scope="module")
def comparison(runs, tmp_path_factory) -> Comparison:
    return compare(runs, tmp_path_factory.mktemp("cmp") / "cmp", positions=150, documents=20, progress=False)


def test_folder_holds_curves_matches_figures_and_report(comparison, runs):
    labels = [r["label"] for r in comparison.manifest["runs"]]
    assert len(set(labels)) == 2
    curves = comparison.curves
    assert set(curves["run"]) == set(labels)
    agreement = curves[(curves["metric"] == "agreement_rate")]
    assert agreement["ci_low"].notna().all() and (agreement["ci_low"] <= agreement["value"] + 1e-12).all()
    # relative depth (layer + 1) / n_layers: 3 layers -> 1/3, 2/3, 1
    assert sorted(agreement["relative_depth"].unique()) == pytest.approx([1 / 3, 2 / 3, 1.0])
    matches = comparison.matches
    assert list(matches.columns) == MATCH_COLUMNS
    assert set(zip(matches["run_a"], matches["run_b"], strict=True)) == {tuple(labels), tuple(labels[::-1])}
    assert set(matches["kind"]) == {"value", "key"}
    # rank-1 rows carry q-values, other ranks none; both scores present for every pair
    assert matches.loc[matches["rank"] == 1, "q_value"].notna().all()
    assert matches.loc[matches["rank"] > 1, "q_value"].isna().all()
    assert matches[["value_similarity", "key_correlation"]].notna().all().all()
    figures = {p.name for p in (comparison.path / "figures").glob("*.svg")}
    assert "curve_agreement_rate.svg" in figures
    assert {f"density_{kind}_{labels[0]}__{labels[1]}.svg" for kind in ("value", "key")} <= figures
    pair = comparison.manifest["pairs"][0]
    assert pair["vocabulary"]["n_shared"] > 0 and set(pair["kinds"]) == {"value", "key"}


def test_report_is_self_contained(comparison):
    page = (comparison.path / "report.html").read_text()
    assert "<script" not in page.lower()
    assert not re.search(r"""(src|href)=["']?(https?:|//|file:)""", page)
    assert page.count("data:image/svg+xml;base64,") >= 5
    assert "Matching memories across models" in page


def test_report_escapes_run_text(comparison, tmp_path):
    """Labels come from model names (folder names here): markup in them is escaped."""
    copy = tmp_path / "cmp"
    shutil.copytree(comparison.path, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["runs"][0]["model"] = "<script>alert(1)</script>"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    from ffkv_lens.comparison.html import write_comparison_report

    page = write_comparison_report(copy).read_text()
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_different_corpora_are_refused_unless_allowed(runs, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(runs[1], other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["corpus"]["fingerprint"] = "0000000000000000"
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="different corpora.*--allow-different-corpora"):
        compare([runs[0], other], tmp_path / "refused", match=False, progress=False)
    result = compare([runs[0], other], tmp_path / "allowed", match=False, allow_different_corpora=True,
                     progress=False)  # fmt: skip
    assert result.manifest["corpora_differ"] is True
    assert result.matches.empty
    assert "different corpora" in (result.path / "report.html").read_text()
    assert "runs on different corpora" in (result.path / "figures" / "curve_agreement_rate.svg").read_text()


def test_bad_input_is_refused_with_a_message(runs, tmp_path):
    with pytest.raises(ConfigError, match="at least two run folders"):
        compare([runs[0]], tmp_path / "x")
    with pytest.raises(ConfigError, match="fdr=1.5"):
        compare(runs, tmp_path / "x", fdr=1.5)
    with pytest.raises(RunFolderError, match="does not exist"):
        compare([runs[0], tmp_path / "missing"], tmp_path / "x")
    with pytest.raises(RunFolderError, match="not a comparison folder"):
        Comparison.load(runs[0].parent / "nothing")


def test_cli_compare(runs, tmp_path, capsys):
    assert main(["compare", str(runs[0]), str(runs[1]), "--out", str(tmp_path / "c"), "--no-match"]) == 0
    assert "report:" in capsys.readouterr().out
    assert pd.read_csv(tmp_path / "c" / "tables" / "curves.csv").shape[0] > 0
    assert main(["compare", str(runs[0]), "--out", str(tmp_path / "d")]) == 2
    assert "at least two run folders" in capsys.readouterr().err
