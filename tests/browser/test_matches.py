"""A comparison folder's matches index: parity with matches.csv both ways, rebuild rules, bad folders."""

import json
import os
import shutil

import pandas as pd
import pytest

from ffkv_lens.browser.index import INDEX_NAME, stored_fingerprint
from ffkv_lens.browser.matches import MatchIndex, open_matches, read_comparison
from ffkv_lens.errors import RunFolderError
from tests.browser.comparison import assert_same_matches, table_matches, write_comparison


@pytest.fixture()
def comparison_copy(tiny_run, tiny_run_b, tiny_atlas, tmp_path):
    runs = {"gpt2": tiny_run, "llama": tiny_run_b}
    return write_comparison(runs, tmp_path / "cmp", tiny_atlas.layers, tiny_atlas.d_mlp, relative=False)


@pytest.mark.parametrize("forward", [True, False], ids=["a-to-b", "b-to-a"])
def test_matches_equal_the_table_in_both_directions(comparison, labels, tiny_atlas, forward) -> None:
    layers, d_mlp = tiny_atlas.layers, tiny_atlas.d_mlp
    run_a, run_b = labels if forward else labels[::-1]
    with MatchIndex(open_matches(comparison)) as index:
        assert index.labels == list(labels)
        for layer, key in ((layers[0], 0), (layers[1], 7), (layers[-1], d_mlp - 1)):
            got = index.matches(run_a, layer, key)
            assert got and {g["run"] for g in got} == {run_b}
            assert_same_matches(got, table_matches(comparison, run_a, layer, key))
            assert all(g["q_value"] is None and g["significant"] is False for g in got if g["rank"] > 1)
        assert index.matches(run_a, layers[0], d_mlp) == [] and index.matches("nobody", layers[0], 0) == []


def test_run_paths_resolve_against_the_comparison_folder(comparison, labels, tiny_run, tiny_run_b) -> None:
    manifest = json.loads((comparison / "manifest.json").read_text())
    assert not os.path.isabs(manifest["runs"][1]["path"]), "the fixture must store one relative path"
    found = read_comparison(comparison)
    assert [r.label for r in found.runs] == list(labels)
    assert [r.folder for r in found.runs] == [tiny_run.resolve(), tiny_run_b.resolve()]


def test_index_is_reused_then_rebuilt_when_matches_csv_changes(comparison_copy) -> None:
    path = open_matches(comparison_copy)
    first = (stored_fingerprint(path), path.stat().st_ino)
    assert open_matches(comparison_copy) == path
    assert (stored_fingerprint(path), path.stat().st_ino) == first, "rebuilt needlessly"
    table = comparison_copy / "tables" / "matches.csv"
    frame = pd.read_csv(table)
    frame.loc[0, "score"] = 0.125
    table.write_text(frame.to_csv(index=False))
    open_matches(comparison_copy)
    assert stored_fingerprint(path) != first[0] and path.stat().st_ino != first[1], "table change not noticed"
    row = frame.iloc[0]
    with MatchIndex(path) as index:
        got = index.matches(row["run_a"], int(row["layer_a"]), int(row["key_a"]))
    assert got[0]["score"] == 0.125
    assert not list(comparison_copy.glob(f".{INDEX_NAME}.*")), "temporary file left behind"


def test_comparison_without_matches_table_has_no_index(comparison_copy) -> None:
    (comparison_copy / "tables" / "matches.csv").unlink()
    assert open_matches(comparison_copy) is None


def _edit_manifest(folder, change) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _edit_table(folder, change) -> None:
    table = folder / "tables" / "matches.csv"
    table.write_text(change(pd.read_csv(table)).to_csv(index=False))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: _edit_manifest(f, lambda m: m["runs"][1].update(path=str(f / "gone"))),
         r"names run 'llama' at '.*gone', which does not exist; put the run folder back there, or fix runs\[1\]\.path"),
        (lambda f: _edit_manifest(f, lambda m: m["runs"][1].update(label="gpt2")), "repeats run labels"),
        (lambda f: _edit_manifest(f, lambda m: m.update(runs=[])), "lists no runs"),
        (lambda f: _edit_table(f, lambda t: t.assign(run_b=t["run_b"].replace("llama", "qwen"))),
         r"names runs \['qwen'\] that its manifest.json does not list \(\['gpt2', 'llama'\]\)"),
        (lambda f: _edit_table(f, lambda t: t.drop(columns=["q_value"])), r"lacks columns \['q_value'\]"),
        (lambda f: _edit_table(f, lambda t: t.assign(key_b="x")), "cannot be read as a matches table"),
    ],
    ids=["missing-run", "repeated-label", "no-runs", "unknown-label", "missing-column", "bad-key"],
)  # fmt: skip
def test_bad_comparison_folders_are_reported(comparison_copy, damage, message) -> None:
    damage(comparison_copy)
    with pytest.raises(RunFolderError, match=message):
        open_matches(comparison_copy)
    assert not (comparison_copy / INDEX_NAME).exists()
    assert not list(comparison_copy.glob(f".{INDEX_NAME}.*")), "temporary file left behind"


def test_moved_comparison_with_relative_paths_names_the_missing_run(comparison, labels, tmp_path) -> None:
    moved = shutil.copytree(comparison, tmp_path / "elsewhere" / "deeper" / "cmp")
    with pytest.raises(RunFolderError, match=f"names run '{labels[1]}' at .* which does not exist"):
        read_comparison(moved)
