"""The export folder (claimed like run folders) and the one-line errors of `ffkv-lens export`."""

import json
import re
import shutil
from pathlib import Path

import pytest

from ffkv_lens.cli import main
from ffkv_lens.errors import AtlasMismatchError, RunFolderError
from ffkv_lens.export import export_run
from tests.factories import build_tiny_model
from tests.report.runs import copy_run


def _with_model(run: Path, dest: Path, model: str) -> Path:
    copy = copy_run(run, dest)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["config"]["model"] = model
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def test_foreign_folder_is_refused_and_a_finished_export_needs_force(export_run_dir, tmp_path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(RunFolderError, match="not empty and is not a export folder"):
        export_run(export_run_dir, mine, format="hf-dataset", progress=False)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    out = tmp_path / "out"
    export_run(export_run_dir, out, format="hf-dataset", progress=False, layers=[1])
    (out / "notes.txt").write_text("mine too")
    with pytest.raises(RunFolderError, match="holds a finished export .*pass --force"):
        export_run(export_run_dir, out, format="hf-dataset", progress=False)
    result = export_run(export_run_dir, out, format="hf-dataset", progress=False, force=True)
    assert (out / "notes.txt").read_text() == "mine too" and result.manifest["layers"] == [0, 1, 2]
    assert sorted(p.name for p in (out / "parquet").iterdir()) == [f"layer-{i}.parquet" for i in range(3)]
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "status": "running"}))  # an export that was killed
    again = export_run(export_run_dir, out, format="hf-dataset", progress=False, layers=[0])  # redone, no --force
    assert again.manifest["status"] == "finished" and (out / "notes.txt").is_file()
    assert sorted(p.name for p in (out / "parquet").iterdir()) == ["layer-0.parquet"]


def test_other_weights_fail_on_the_peak_check(export_run_dir, tmp_path) -> None:
    other = build_tiny_model("llama", tmp_path / "other-llama", seed=7)  # same tokenizer and shape, other weights
    run = _with_model(export_run_dir, tmp_path / "run", str(other))
    with pytest.raises(AtlasMismatchError, match="its weights differ from the run's"):
        export_run(run, tmp_path / "out", format="hf-dataset", progress=False, layers=[0])
    assert not (tmp_path / "out" / "dataset").exists()


def test_cli_export_and_its_errors(export_run_dir, tmp_path, capsys) -> None:
    out = tmp_path / "cli"
    assert main(["export", str(export_run_dir), "--format", "hf-dataset", "--out", str(out), "--layers", "2"]) == 0
    assert "exported hf-dataset" in capsys.readouterr().out and (out / "parquet" / "layer-2.parquet").is_file()
    no_atlas = copy_run(export_run_dir, tmp_path / "no-atlas", drop_steps=tuple(), drop=("atlas",))
    no_stats = copy_run(export_run_dir, tmp_path / "no-stats", drop=("atlas/stats.safetensors",))
    atlas_manifest = json.loads((no_stats / "atlas" / "manifest.json").read_text())
    atlas_manifest["stats"] = {"stats": False}  # what a search with stats=False records
    (no_stats / "atlas" / "manifest.json").write_text(json.dumps(atlas_manifest))
    missing = _with_model(export_run_dir, tmp_path / "no-model", str(tmp_path / "no-such-model"))
    cases = [
        (no_atlas, "hf-dataset", "has no trigger atlas yet"),
        (missing, "hf-dataset", "no-such-model"),
        (no_stats, "neuronpedia", "has no per-memory statistics .*re-run `ffkv-lens run` without --no-stats"),
        (no_stats, "neuronrecord", "has no per-memory statistics"),
        (export_run_dir, "hf-dataset --layers 9", "--layers \\[9\\]: not in this run"),
    ]
    for run, fmt, message in cases:
        code = main(["export", str(run), "--format", *fmt.split(), "--out", str(tmp_path / "x")])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and re.search(message, err), err
    assert not (tmp_path / "x").exists()
    assert main(["export", str(no_stats), "--format", "hf-dataset", "--out", str(tmp_path / "y"), "--layers", "0"]) == 0
    shutil.rmtree(out)
