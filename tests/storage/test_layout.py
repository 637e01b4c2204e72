"""Folder kinds: which folders a writer may claim, and what --force may remove."""

import json

import pytest

from ffkv_lens.errors import RunFolderError
from ffkv_lens.storage.layout import COMPARISON, RUN, claim_folder, manifest_format, remove_outputs


def _write(path, text="x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_claim_new_resume_force_and_refusals(tmp_path) -> None:
    assert claim_folder(tmp_path / "missing", RUN).state == "new"
    (tmp_path / "empty").mkdir()
    assert claim_folder(tmp_path / "empty", RUN).state == "new"
    run = tmp_path / "run"
    _write(run / "manifest.json", json.dumps({"format": RUN.format}))
    assert claim_folder(run, RUN).state == "resume" and claim_folder(run, RUN, force=True).state == "force"
    assert manifest_format(run) == RUN.format
    with pytest.raises(RunFolderError, match="not a comparison folder"):
        claim_folder(run, COMPARISON)
    _write(tmp_path / "file")
    with pytest.raises(RunFolderError, match="is a file"):
        claim_folder(tmp_path / "file", RUN)
    _write(tmp_path / "user" / ".hidden")
    with pytest.raises(RunFolderError, match="no manifest.json"):
        claim_folder(tmp_path / "user", RUN, force=True)


def test_remove_outputs_keeps_everything_else(tmp_path) -> None:
    run = tmp_path / "run"
    ours = ["manifest.json", "report.html", "browser.sqlite", "atlas/atlas.safetensors", "search/checkpoint/x",
            "tables/agreement_per_layer.csv", "tables/agreement_settings.json", "figures/rank.svg",
            ".report.html.abc.tmp", ".atlas.k2j.old/previous/f", ".values.0123456789abcdef.lock",
            "tables/.t.csv.x1.tmp"]  # fmt: skip
    theirs = ["notes.md", "tables/README.txt", "mine/manifest.json", ".git/config", "atlas.bak/x", ".x.tmp"]
    for name in ours + theirs:
        _write(run / name)
    kept = remove_outputs(run, RUN)
    assert sorted(kept) == sorted(theirs)
    assert {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()} == set(theirs)
