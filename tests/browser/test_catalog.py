"""Several runs in one browser: run labels, matches across runs, the run-aware HTTP API and the CLI (no browser)."""

import json
import re

import pytest

from ffkv_lens.browser import BrowserIndex, BrowserServer, open_catalog
from ffkv_lens.browser.catalog import folder_kind
from ffkv_lens.cli import main
from ffkv_lens.errors import ConfigError, RunFolderError
from tests.browser.comparison import assert_same_matches, table_matches
from tests.browser.test_index import _get


@pytest.fixture(scope="module")
def catalog(comparison):
    return open_catalog([comparison])


def test_folders_resolve_to_labelled_runs(comparison, labels, tiny_run, tiny_run_b) -> None:
    a, b = labels
    assert (folder_kind(comparison), folder_kind(tiny_run)) == ("comparison", "run")
    from_comparison = open_catalog([comparison])
    assert list(from_comparison.runs) == [a, b] and from_comparison.default == a
    assert from_comparison.runs[b].folder == tiny_run_b.resolve()
    assert from_comparison.runs[b].index.resolve() == (tiny_run_b / "browser.sqlite").resolve()
    two_runs = open_catalog([tiny_run_b, tiny_run])  # both folders are named "run"
    assert list(two_runs.runs) == ["run", "run-2"] and two_runs.runs["run"].folder == tiny_run_b.resolve()
    assert two_runs.comparisons == ()
    both = open_catalog([tiny_run, comparison, comparison])  # each run once, under its first label
    assert list(both.runs) == ["run", b]
    assert [dict(c.labels) for c in both.comparisons] == [{a: "run", b: b}] * 2


@pytest.mark.parametrize("forward", [True, False], ids=["a-to-b", "b-to-a"])
def test_matches_of_a_memory_in_the_other_run(catalog, comparison, labels, tiny_atlas, forward) -> None:
    run_a, run_b = labels if forward else labels[::-1]
    layer, key = tiny_atlas.layers[1], 9
    found = catalog.matches(run_a, layer, key)
    assert (found["run"], found["layer"], found["key"], found["compared_with"]) == (run_a, layer, key, [run_b])
    assert found["matches"] and {m["run"] for m in found["matches"]} == {run_b}
    assert_same_matches(found["matches"], table_matches(comparison, run_a, layer, key))
    assert {m["comparison"] for m in found["matches"]} == {str(comparison)}
    with BrowserIndex(catalog.runs[run_b].index) as other:
        for m in found["matches"]:
            top = [t["token"] for t in other.memory(m["layer"], m["key"])["values"]["top"]]
            assert m["tokens"] == top[:5], m


def test_run_without_comparison_has_no_matches(tiny_run, tiny_run_b) -> None:
    found = open_catalog([tiny_run, tiny_run_b]).matches("run-2", 0, 1)
    assert found["compared_with"] == [] and found["matches"] == []


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda c, labels: c.matches("mistral", 0, 0),
         lambda labels: re.escape(f"run='mistral' is not served here; pass one of {list(labels)}")),
        (lambda c, labels: c.open("mistral"), lambda labels: "run='mistral' is not served here"),
        (lambda c, labels: c.matches(labels[1], 99, 0), lambda labels: "layer=99 is not in the index"),
        (lambda c, labels: c.matches(None, 0, 64), lambda labels: "key=64 is out of range"),
    ],
    ids=["matches-unknown-run", "open-unknown-run", "layer", "key"],
)  # fmt: skip
def test_bad_arguments_name_the_value(catalog, labels, call, message) -> None:
    with pytest.raises(ConfigError, match=message(labels)):
        call(catalog, labels)


def test_folders_of_neither_kind_are_reported(tmp_path) -> None:
    with pytest.raises(RunFolderError, match="run folder '.*missing' does not exist; pass the --out folder of"):
        open_catalog([tmp_path / "missing"])
    with pytest.raises(RunFolderError, match="not a run folder or a comparison folder .no manifest.json."):
        open_catalog([tmp_path])
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "ffkv_lens.report/1"}))
    with pytest.raises(RunFolderError, match="has format 'ffkv_lens.report/1', neither a run .* nor a comparison"):
        open_catalog([tmp_path])


# -- HTTP API -----------------------------------------------------------------------------------
def test_api_serves_every_run_and_the_matches(compare_server, labels, tiny_atlas) -> None:
    a, b = labels
    status, runs = _get(compare_server, "/api/runs")
    assert status == 200 and runs["default"] == a
    assert [(r["label"], r["layers"], r["d_mlp"]) for r in runs["runs"]] == [
        (label, tiny_atlas.layers, tiny_atlas.d_mlp) for label in labels
    ]
    assert "llama" in runs["runs"][1]["model"] and runs["comparisons"][0]["has_matches"]
    status, info = _get(compare_server, f"/api/info?run={b}")
    assert status == 200 and info["model"] == runs["runs"][1]["model"]
    status, default = _get(compare_server, "/api/info")
    assert default["model"] == runs["runs"][0]["model"]
    layer = tiny_atlas.layers[2]
    status, memory = _get(compare_server, f"/api/memory?run={b}&layer={layer}&key=4")
    with BrowserIndex(compare_server.catalog.runs[b].index) as index:
        assert status == 200 and memory == index.memory(layer, 4)
    status, found = _get(compare_server, f"/api/matches?run={b}&layer={layer}&key=4")
    assert status == 200 and found == json.loads(json.dumps(compare_server.catalog.matches(b, layer, 4)))
    assert found["matches"] and {m["run"] for m in found["matches"]} == {a}
    status, found = _get(compare_server, f"/api/matches?layer={layer}&key=4")
    assert status == 200 and found["run"] == a and {m["run"] for m in found["matches"]} == {b}
    status, search = _get(compare_server, f"/api/search/text?run={b}&q=capital")
    assert status == 200 and isinstance(search["results"], list)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/api/memory?run=mistral&layer=0&key=0", "run='mistral' is not served here"),
        ("/api/matches?run=&layer=0&key=0", "run='' is not served here"),
        ("/api/layers?run=a&run=b", "more than once"),
        ("/api/matches?layer=0", "key is missing"),
        ("/api/matches?layer=0&key=999", "key=999 is out of range"),
        ("/api/runs?run=a", "unknown parameters ['run']"),
    ],
    ids=["unknown-run", "empty-run", "repeated-run", "key-missing", "key-range", "runs-takes-nothing"],
)
def test_api_errors_name_the_value(compare_server, path, message) -> None:
    status, body = _get(compare_server, path)
    assert status == 400 and message in body["error"], body


def test_single_run_server_lists_one_run_without_comparisons(server, tiny_run) -> None:
    status, runs = _get(server, "/api/runs")
    assert status == 200 and [r["label"] for r in runs["runs"]] == [tiny_run.name] and runs["comparisons"] == []
    status, found = _get(server, "/api/matches?layer=0&key=0")
    assert status == 200 and found["compared_with"] == [] and found["matches"] == []


# -- command line ---------------------------------------------------------------------------------
@pytest.fixture()
def no_serving(monkeypatch) -> None:
    def interrupted(self, poll_interval=0.5):
        raise KeyboardInterrupt

    monkeypatch.setattr(BrowserServer, "serve_forever", interrupted)


def test_cli_browse_a_comparison_and_two_runs(no_serving, comparison, labels, tiny_run, tiny_run_b, capsys) -> None:
    assert main(["browse", str(comparison), "--port", "0", "--no-open"]) == 0
    out = capsys.readouterr().out
    assert f"run {labels[0]}: " in out and f"run {labels[1]}: " in out and f"comparison {comparison}: " in out
    assert "memory browser: http://127.0.0.1:" in out and "stopped" in out
    assert main(["browse", str(tiny_run), str(tiny_run_b), "--port", "0", "--no-open"]) == 0
    out = capsys.readouterr().out
    assert f"run run: {tiny_run / 'browser.sqlite'}" in out and f"run run-2: {tiny_run_b / 'browser.sqlite'}" in out


def test_cli_browse_reports_bad_folders_on_one_line(no_serving, comparison, labels, tiny_run, tmp_path, capsys) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"format": "something/2"}))
    assert main(["browse", str(tiny_run), str(other), "--no-open"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ffkv-lens: error: ") and "'something/2'" in err and err.count("\n") == 1
    broken = tmp_path / "cmp"
    broken.mkdir()
    manifest = json.loads((comparison / "manifest.json").read_text())
    manifest["runs"][1]["path"] = "no/such/run"
    (broken / "manifest.json").write_text(json.dumps(manifest))
    assert main(["browse", str(broken), "--no-open"]) == 2
    err = capsys.readouterr().err
    assert f"names run '{labels[1]}' at " in err and "no/such/run" in err and err.count("\n") == 1
