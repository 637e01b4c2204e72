"""The browser index (parity with the atlas, rebuild rules, searches) and the HTTP API (no browser)."""

import json
import os
import shutil
import socket
import sqlite3
import urllib.error
import urllib.request

import numpy as np
import pytest

from ffkv_lens.analysis.atlas import UnitStore
from ffkv_lens.browser import BrowserIndex, BrowserServer, normalize_token, open_index
from ffkv_lens.browser.index import INDEX_NAME, stored_fingerprint
from ffkv_lens.browser.queries import TEXT_SEARCH_CONTEXTS
from ffkv_lens.browser.text import context_keys, decode_contexts
from ffkv_lens.cli import main
from ffkv_lens.errors import ConfigError, RunFolderError
from tests.browser.conftest import EXTRA

COEF_TOL = 1e-6  # coefficients go float32 -> float64 -> SQLite REAL; exact up to float32 rounding


def _top_token_memory(index: BrowserIndex, *, leading_space: bool) -> tuple[int, int, str]:
    """A memory whose top-1 value token is alphabetic (with or without a leading space)."""
    rows = index.conn.execute("SELECT layer, key, top_tokens FROM memories ORDER BY id").fetchall()
    for row in rows:
        token = json.loads(row["top_tokens"])[0]
        if token.strip().isalpha() and token.startswith(" ") == leading_space and token.strip() == token.lstrip():
            return row["layer"], row["key"], token
    pytest.skip(f"no memory of the tiny run has an alphabetic top token (leading space: {leading_space})")


# -- parity with the atlas -------------------------------------------------------------------
def test_every_example_matches_the_atlas(tiny_index, tiny_atlas) -> None:
    tokenizer = tiny_atlas.tokenizer
    with BrowserIndex(tiny_index) as index:
        assert index.meta["n_examples"] == len(tiny_atlas.to_pandas(text=False))
        for layer in tiny_atlas.layers:
            for key in range(tiny_atlas.d_mlp):
                shown = index.memory(layer, key)["examples"]
                for sign, side in ((1, "top"), (-1, "bottom")):
                    expected = tiny_atlas.examples(layer, key, sign=sign)
                    got = shown[side]
                    assert [g["rank"] for g in got] == list(range(len(expected)))
                    for g, e in zip(got, expected, strict=True):
                        where = f"L{layer} K{key} sign {sign} rank {g['rank']}"
                        assert (g["unit_id"], g["position"], g["doc_id"]) == (e.unit_id, e.position, e.doc_id), where
                        assert g["prefix"] == e.prefix and g["before"] + g["peak"] == e.prefix, where
                        assert (g["next_token"], g["next_token_id"]) == (e.next_token, e.next_token_id), where
                        assert abs(g["coefficient"] - e.coefficient) <= COEF_TOL * max(1.0, abs(e.coefficient)), where
                        tokens = tiny_atlas.units.get(e.unit_id)[1]
                        shorter = tokenizer.decode(tokens[: max(e.position, 0)])
                        assert g["before"] == os.path.commonprefix([shorter, e.prefix]), where


@pytest.mark.parametrize("text", [EXTRA, "plain ascii, no splits", "☕☕ é"], ids=["mixed", "ascii", "split-chars"])
def test_decode_contexts_equals_decoding_each_prefix(tiny_atlas, text) -> None:
    tokenizer = tiny_atlas.tokenizer
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    store = UnitStore.from_units({7: (0, ids), 9: (1, ids[::-1])})
    units = np.array([7] * (len(ids) + 1) + [9] * len(ids))
    positions = np.array([*range(-1, len(ids)), *range(len(ids))])
    keys = context_keys(store, units, positions)
    assert np.all(np.diff(keys) > 0), "keys must be sorted and unique for this test"
    contexts = decode_contexts(store, tokenizer, keys)
    for i, (unit, pos) in enumerate(zip(units.tolist(), positions.tolist(), strict=True)):
        toks = store.get(unit)[1]
        assert contexts.prefixes[i] == tokenizer.decode(toks[: pos + 1]), (unit, pos)
        # The peak is what the peak token adds: text after the longest common prefix with the shorter prefix
        # (a character split across tokens is shown whole on the token that completes it).
        shorter = tokenizer.decode(toks[: max(pos, 0)])
        expected_start = len(os.path.commonprefix([shorter, contexts.prefixes[i]]))
        assert contexts.peak_starts[i] == expected_start, (unit, pos)
        nxt = toks[pos + 1] if pos + 1 < len(toks) else None
        assert contexts.next_tokens[i] == (None if nxt is None else tokenizer.decode([nxt])), (unit, pos)


# -- building and rebuilding -----------------------------------------------------------------
@pytest.fixture()
def run_copy(tiny_run, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(tiny_run, folder, ignore=shutil.ignore_patterns(INDEX_NAME))
    return folder


def test_index_is_reused_then_rebuilt_when_the_run_changes(run_copy) -> None:
    path = open_index(run_copy)
    first = (stored_fingerprint(path), path.stat().st_mtime_ns, path.stat().st_ino)
    assert open_index(run_copy) == path
    assert (stored_fingerprint(path), path.stat().st_mtime_ns, path.stat().st_ino) == first, "rebuilt needlessly"
    manifest = json.loads((run_copy / "manifest.json").read_text())
    (run_copy / "manifest.json").write_text(json.dumps({**manifest, "note": "resumed"}))
    open_index(run_copy)
    assert stored_fingerprint(path) != first[0] and path.stat().st_ino != first[2], "manifest change not noticed"
    second = stored_fingerprint(path)
    table = run_copy / "tables" / "mutation_per_key.csv"
    os.utime(table, ns=(table.stat().st_atime_ns, table.stat().st_mtime_ns + 10**9))
    open_index(run_copy)
    assert stored_fingerprint(path) != second, "table change not noticed"


def test_run_without_the_causal_step_is_indexed_as_not_run(run_copy) -> None:
    for path in (run_copy / "tables").glob("causal_*"):
        path.unlink()
    manifest = json.loads((run_copy / "manifest.json").read_text())
    manifest["steps"].pop("causal")
    (run_copy / "manifest.json").write_text(json.dumps(manifest))
    with BrowserIndex(open_index(run_copy)) as index:
        assert index.info()["has"]["causal"] is False
        assert index.memory(index.layers[0], 0)["scores"]["causal_score"] is None


def test_failed_build_keeps_the_old_index_and_leaves_no_temp_file(run_copy, monkeypatch) -> None:
    path = open_index(run_copy)
    before = stored_fingerprint(path)

    def killed(conn, folder, progress=False):
        conn.execute("INSERT INTO meta VALUES ('half', '1')")
        raise KeyboardInterrupt

    monkeypatch.setattr("ffkv_lens.browser.build.fill_index", killed)
    with pytest.raises(KeyboardInterrupt):
        open_index(run_copy, rebuild=True)
    assert stored_fingerprint(path) == before
    assert not list(run_copy.glob(f".{INDEX_NAME}.*")), "temporary file left behind"
    with BrowserIndex(path) as index:
        assert "half" not in index.meta


def test_tables_with_odd_tokens_are_read_whole(run_copy) -> None:
    import pandas as pd

    table = run_copy / "tables" / "agreement_per_memory.csv"
    frame = pd.read_csv(table)
    frame["top1_next_token"] = frame["top1_next_token"].astype(object)
    frame.loc[0, "top1_next_token"], frame.loc[1, "top1_next_token"] = "\r", "null"
    table.write_text(frame.to_csv(index=False))  # as pipeline.write_table writes it: "\r" unquoted
    with BrowserIndex(open_index(run_copy)) as index:
        rows = index.conn.execute("SELECT top1_next_token, agrees FROM memories ORDER BY id").fetchall()
    assert len(rows) == len(frame)
    assert [rows[0][0], rows[1][0]] == ["\r", "null"]
    assert {r[1] for r in rows} <= {0, 1, None}


def test_run_folder_errors(tmp_path) -> None:
    with pytest.raises(RunFolderError, match="does not exist"):
        open_index(tmp_path / "missing")
    with pytest.raises(RunFolderError, match="not a run folder"):
        open_index(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"status": "running"}))
    with pytest.raises(RunFolderError, match="no trigger atlas yet .*'running'"):
        open_index(tmp_path)


# -- searches ---------------------------------------------------------------------------------
@pytest.mark.parametrize("leading_space", [True, False], ids=["token-with-space", "token-without-space"])
def test_token_search_ignores_leading_space_and_case(tiny_index, leading_space) -> None:
    with BrowserIndex(tiny_index) as index:
        layer, key, token = _top_token_memory(index, leading_space=leading_space)
        bare = token.strip()
        for query in (bare, " " + bare, bare.upper(), f"  {bare}\n"):
            found = index.search_token(query, limit=500)
            assert found["normalized"] == normalize_token(token), query
            assert token in found["tokens"], query
            assert {"layer": layer, "key": key} in [{"layer": r["layer"], "key": r["key"]} for r in found["results"]]
            assert all(normalize_token(r["token"]) == normalize_token(bare) for r in found["results"])
            logits = [r["logit"] for r in found["results"]]
            assert logits == sorted(logits, reverse=True), "not ranked by logit"
            memories = [(r["layer"], r["key"]) for r in found["results"]]
            assert len(set(memories)) == len(memories), "a memory is listed twice"
            assert found["total"] >= len(found["results"])


def test_token_search_bottom_tokens_and_several_words(tiny_index) -> None:
    with BrowserIndex(tiny_index) as index:
        row = index.conn.execute("SELECT layer, key, bottom_tokens, top_tokens FROM memories LIMIT 1").fetchone()
        bottom = json.loads(row["bottom_tokens"])[0]
        found = index.search_token(bottom, sign=-1, limit=500)
        assert (row["layer"], row["key"]) in [(r["layer"], r["key"]) for r in found["results"]]
        logits = [r["logit"] for r in found["results"]]
        assert logits == sorted(logits), "bottom tokens: most negative first"
        words = [t.strip() for t in json.loads(row["top_tokens"]) if t.strip().isalnum()][:2]
        if len(words) == 2:
            found = index.search_token(" ".join(words), limit=500)
            assert found["mode"] == "words"
            assert (row["layer"], row["key"]) in [(r["layer"], r["key"]) for r in found["results"]]


def test_text_search_finds_the_memories_of_an_example(tiny_index, tiny_atlas) -> None:
    layer, key = tiny_atlas.layers[-1], 5
    example = tiny_atlas.examples(layer, key)[0]
    words = [w for w in example.prefix.split() if w.isalpha()][-2:]
    assert words, example.prefix
    with BrowserIndex(tiny_index) as index:
        found = index.search_text(" ".join(words), limit=500)
        assert found["contexts_matched"] <= TEXT_SEARCH_CONTEXTS, "the tiny run must not hit the cap"
        hits = {(r["layer"], r["key"], r["sign"]) for r in found["results"]}
        assert (layer, key, 1) in hits
        counts = [r["n_matches"] for r in found["results"]]
        assert counts == sorted(counts, reverse=True)
        prefix = index.search_text(words[-1][:3] + "*", limit=500)
        assert prefix["contexts_matched"] >= found["contexts_matched"]
        for odd in ('"', "AND (", "NEAR(", "*", "::"):
            assert isinstance(index.search_text(odd)["results"], list), odd  # answered, not an SQL error


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda i: i.memory(99, 0), "layer=99 is not in the index"),
        (lambda i: i.memory(0, 10**6), "key=1000000 is out of range"),
        (lambda i: i.search_token(""), "q is empty"),
        (lambda i: i.search_token("x" * 201), "at most 200"),
        (lambda i: i.search_token("a", sign=0), "sign=0"),
        (lambda i: i.search_text("a", limit=0), "limit=0"),
    ],
    ids=["layer", "key", "empty", "long", "sign", "limit"],
)
def test_bad_arguments_raise_config_error(tiny_index, call, message) -> None:
    with BrowserIndex(tiny_index) as index, pytest.raises(ConfigError, match=message):
        call(index)


# -- HTTP API -----------------------------------------------------------------------------------
def _get(server: BrowserServer, path: str, headers: dict | None = None) -> tuple[int, dict | str]:
    request = urllib.request.Request(server.url.rstrip("/") + path, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, body, kind = response.status, response.read().decode(), response.headers["Content-Type"]
    except urllib.error.HTTPError as err:
        status, body, kind = err.code, err.read().decode(), err.headers["Content-Type"]
    return status, json.loads(body) if kind.startswith("application/json") else body


@pytest.mark.parametrize(
    ("path", "status", "message"),
    [
        ("/api/memory?layer=x&key=1", 400, "layer='x' is not an integer"),
        ("/api/memory?layer=0", 400, "key is missing"),
        ("/api/memory?layer=7&key=0", 400, "layer=7 is not in the index"),
        ("/api/memory?layer=0&key=-1", 400, "key=-1 is out of range"),
        ("/api/memory?layer=0&key=1&key=2", 400, "more than once"),
        ("/api/memory?layer=0&key=1&sql=1", 400, "unknown parameters"),
        ("/api/search/token?q=", 400, "q is empty"),
        ("/api/search/token?q=a&sign=2", 400, "sign=2"),
        ("/api/search/text?q=a&limit=abc", 400, "limit='abc' is not an integer"),
        ("/api/search/text?q=%ff", 400, "malformed"),
        ("/api/nothing", 404, "no such page"),
    ],
    ids=["layer-int", "key-missing", "layer-range", "key-range", "repeated", "unknown", "empty-q", "sign",
         "limit", "bad-utf8", "404"],
)  # fmt: skip
def test_api_errors_are_json(server, path, status, message) -> None:
    got_status, body = _get(server, path)
    assert got_status == status and message in body["error"], body


def test_api_answers_and_page_is_self_contained(server, tiny_atlas) -> None:
    status, memory = _get(server, f"/api/memory?layer={tiny_atlas.layers[1]}&key=3")
    assert status == 200 and memory["key"] == 3 and len(memory["examples"]["top"]) == tiny_atlas.k
    assert memory["neighbours"]["previous_key"] == {"layer": tiny_atlas.layers[1], "key": 2}
    assert memory["neighbours"]["layer_below"] == {"layer": tiny_atlas.layers[0], "key": 3}
    status, layers = _get(server, "/api/layers")
    assert status == 200 and [r["layer"] for r in layers["layers"]] == tiny_atlas.layers
    assert all(r["n_keys"] == tiny_atlas.d_mlp for r in layers["layers"])
    status, info = _get(server, "/api/info")
    found = {"values": True, "agreement": True, "mutation": True, "causal": True, "stats": True, "quadrants": False}
    assert status == 200 and info["has"] == found
    status, page = _get(server, "/")
    assert status == 200
    for banned in ("<script src", "<link rel=\"stylesheet", "http://", "https://", "innerHTML", "outerHTML",
                   "insertAdjacentHTML", "document.write", "eval("):  # fmt: skip
        assert banned not in page, f"the page contains {banned!r}"
    status, body = _get(server, "/api/info", headers={"Host": "evil.example:80"})
    assert status == 403, body


def test_server_refuses_busy_port_and_non_loopback_host(tiny_index) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match=f"port {port} on 127.0.0.1 is in use; pass --port 0"):
            BrowserServer(tiny_index, port=port)
    with pytest.raises(ConfigError, match="not a loopback address"):
        BrowserServer(tiny_index, host="0.0.0.0")


def test_damaged_index_is_reported(tmp_path) -> None:
    bad = tmp_path / INDEX_NAME
    bad.write_bytes(b"not sqlite")
    with pytest.raises(RunFolderError, match="not a readable browser index"):
        BrowserIndex(bad)
    sqlite3.connect(tmp_path / "empty.sqlite").close()
    with pytest.raises(RunFolderError, match="not a readable browser index"):
        BrowserIndex(tmp_path / "empty.sqlite")


# -- command line ---------------------------------------------------------------------------------
def test_cli_browse_serves_and_reports_errors(tiny_run, tiny_index, tmp_path, capsys, monkeypatch) -> None:
    def interrupted(self, poll_interval=0.5):
        raise KeyboardInterrupt

    monkeypatch.setattr(BrowserServer, "serve_forever", interrupted)
    assert main(["browse", str(tiny_run), "--port", "0", "--no-open"]) == 0
    out = capsys.readouterr().out
    assert "memory browser: http://127.0.0.1:" in out and "stopped" in out
    assert main(["browse", str(tmp_path / "missing"), "--no-open"]) == 2
    assert capsys.readouterr().err.startswith("ffkv-lens: error: run folder")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["browse", str(tiny_run), "--port", str(port), "--no-open"]) == 2
    err = capsys.readouterr().err
    assert f"port {port}" in err and "--port 0" in err and err.count("\n") == 1
