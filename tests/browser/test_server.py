"""The HTTP server's edges over real requests on 127.0.0.1: strict parameters, HEAD, timeouts, non-finite numbers."""

import http.client
import json
import shutil
import socket
import sqlite3
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest

from ffkv_lens.browser import BrowserServer
from ffkv_lens.cli import main
from ffkv_lens.errors import ConfigError
from tests.browser.conftest import _serve

SHORT_TIMEOUT = 1.0  # the test server's request timeout, seconds
CLOSE_WITHIN = 15.0  # generous bound for the server to close a silent connection after SHORT_TIMEOUT


def _request(server: BrowserServer, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def _strict_json(data: bytes) -> dict:
    """Parse JSON as a strict client does: NaN, Infinity and -Infinity are refused."""
    return json.loads(data, parse_constant=lambda name: pytest.fail(f"non-JSON constant {name} in the answer"))


@pytest.fixture()
def quick_server(tiny_index) -> Iterator[BrowserServer]:
    """The server of ``tiny_run`` with a short request timeout."""
    yield from _serve(tiny_index, request_timeout=SHORT_TIMEOUT)


@pytest.mark.parametrize(
    "path",
    [
        "/api/search/token?q=" + urllib.parse.quote("capital a\x00b"),
        "/api/search/text?q=" + urllib.parse.quote("a\x00b"),
    ],
    ids=["token-words", "text"],
)
def test_nul_in_full_text_search_is_a_400(server, path) -> None:
    status, _, data = _request(server, path)
    body = _strict_json(data)
    assert status == 400 and "NUL character" in body["error"] and "remove it" in body["error"], body
    assert "\n" not in body["error"]


def test_nul_in_one_token_search_is_matched_exactly(server) -> None:
    status, _, data = _request(server, "/api/search/token?q=" + urllib.parse.quote("a\x00b"))
    body = _strict_json(data)
    assert status == 200 and body["mode"] == "token" and body["normalized"] == "a\x00b", body


@pytest.mark.parametrize(
    "text",
    [" 1 ", "\u0661", "1_0", "+1", "0x1", "1.0", "", "\uff11", "1" * 5000],
    ids=["spaces", "arabic-indic", "underscore", "plus", "hex", "float", "empty", "fullwidth", "huge"],
)
def test_integer_parameters_are_ascii_digits_only(server, text) -> None:
    status, _, data = _request(server, "/api/memory?key=1&layer=" + urllib.parse.quote(text))
    body = _strict_json(data)
    assert status == 400 and body["error"].startswith(f"layer={text!r} is not an integer"), body
    assert "ASCII digits" in body["error"]


def test_negative_and_plain_integers_are_parsed(server, tiny_atlas) -> None:
    status, _, data = _request(server, "/api/memory?layer=0&key=-1")
    assert status == 400 and "key=-1 is out of range" in _strict_json(data)["error"]
    status, _, data = _request(server, f"/api/memory?layer={tiny_atlas.layers[-1]}&key=07")
    assert status == 200 and _strict_json(data)["key"] == 7


@pytest.mark.parametrize(
    ("path", "status"),
    [("/", 200), ("/api/info", 200), ("/api/memory?layer=0&key=3", 200), ("/api/memory?layer=x&key=1", 400),
     ("/nothing", 404)],
    ids=["page", "info", "memory", "bad-parameter", "404"],
)  # fmt: skip
def test_head_answers_like_get_without_a_body(server, path, status) -> None:
    got_status, got_headers, body = _request(server, path)
    head_status, head_headers, head_body = _request(server, path, method="HEAD")
    assert got_status == head_status == status and body and head_body == b""
    got_headers.pop("Date"), head_headers.pop("Date")
    assert head_headers == got_headers and int(head_headers["Content-Length"]) == len(body)


def test_half_sent_request_is_closed_after_the_timeout(quick_server) -> None:
    with socket.create_connection(("127.0.0.1", quick_server.port), timeout=CLOSE_WITHIN) as stalled:
        stalled.sendall(f"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1:{quick_server.port}\r\n".encode())  # no blank line
        status, _, data = _request(quick_server, "/api/info")  # another request is answered meanwhile
        assert status == 200 and _strict_json(data)["layers"]
        start = time.monotonic()
        try:
            got = stalled.recv(4096)  # b"" once the server closes the connection
        except TimeoutError:
            pytest.fail(f"the server kept a half-sent request open for more than {CLOSE_WITHIN} s")
        assert got == b"" and time.monotonic() - start < CLOSE_WITHIN
    status, _, _ = _request(quick_server, "/api/layers")
    assert status == 200


def test_non_finite_numbers_are_null(tiny_index, tmp_path, tiny_atlas) -> None:
    copy = tmp_path / "browser.sqlite"
    shutil.copyfile(tiny_index, copy)
    layer, key = tiny_atlas.layers[1], 5
    with sqlite3.connect(copy) as conn:  # the index packs ids, logits and coefficients (meta "dtypes")
        memory_id = layer * tiny_atlas.d_mlp + key
        dtypes = json.loads(conn.execute("SELECT value FROM meta WHERE name = 'dtypes'").fetchone()[0])
        packed = conn.execute("SELECT top_logits FROM memories WHERE id = ?", (memory_id,)).fetchone()[0]
        logits = np.frombuffer(packed, dtype=dtypes["logit"]).copy()
        logits[:2] = [float("nan"), float("-inf")]
        conn.execute("UPDATE memories SET top_logits = ? WHERE id = ?", (logits.tobytes(), memory_id))
        row = conn.execute("SELECT coefficients FROM examples WHERE id = ?", (memory_id * 2,)).fetchone()[0]
        coefficients = np.frombuffer(row, dtype=dtypes["coefficient"]).copy()
        coefficients[0] = float("inf")
        conn.execute("UPDATE examples SET coefficients = ? WHERE id = ?", (coefficients.tobytes(), memory_id * 2))
        logits = logits.tolist()
    conn.close()
    with contextmanager(_serve)(copy) as srv:
        status, _, data = _request(srv, f"/api/memory?layer={layer}&key={key}")
        body = _strict_json(data)
        assert status == 200 and body["examples"]["top"][0]["coefficient"] is None
        assert [t["logit"] for t in body["values"]["top"][:2]] == [None, None]
        assert body["values"]["top"][2]["logit"] == logits[2]
        assert isinstance(body["examples"]["top"][1]["coefficient"], float)
        status, _, data = _request(srv, f"/api/memory?layer={layer}&key={key}", method="HEAD")
        assert status == 200 and data == b""


@pytest.mark.parametrize(
    "port", ["70000", "-1", "65536", "\u0668\u0660", "http"], ids=["big", "negative", "65536", "arabic-indic", "word"]
)
def test_cli_refuses_a_bad_port_before_indexing(tmp_path, capsys, port) -> None:
    with pytest.raises(SystemExit) as exited:  # argparse: before any folder is read or indexed
        main(["browse", str(tmp_path / "missing"), "--port", port, "--no-open"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        f"ffkv-lens browse: error: argument --port: {port!r} is not a TCP port; pass 0 (any free port) to 65535"
    )
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(("options", "message"), [({"port": 70000}, "port=70000 is not a TCP port"),
                                                  ({"port": -1}, "port=-1 is not a TCP port"),
                                                  ({"request_timeout": 0.0}, "request_timeout=0.0")],
                         ids=["port-big", "port-negative", "timeout"])  # fmt: skip
def test_server_refuses_bad_port_and_timeout(tiny_index, options, message) -> None:
    with pytest.raises(ConfigError, match=message):
        BrowserServer(tiny_index, **options)
