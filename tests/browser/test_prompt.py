"""The Prompt page's API over real requests on 127.0.0.1: traces and generations under edits, and every bound."""

import argparse
import http.client
import json
import threading

import pytest

from ffkv_lens.browser import BrowserServer
from ffkv_lens.browser.catalog import Catalog
from ffkv_lens.browser.prompt import PromptLimits
from ffkv_lens.browser.server import MAX_BODY
from ffkv_lens.errors import ConfigError

TEXT = "Paris is the capital of"


def _post(
    server: BrowserServer, path: str, body: object, *, raw: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        data = raw if raw is not None else json.dumps(body).encode()
        conn.request("POST", path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def _get(server: BrowserServer, path: str) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_trace_without_and_with_an_edit(prompt_server, tiny_prompt) -> None:
    status, base = _post(prompt_server, "/api/prompt/trace", {"text": TEXT})
    assert status == 200, base
    assert base["edited"] is None and base["diff"] is None
    assert base["n_tokens"] == tiny_prompt.lens.adapter.to_tokens(TEXT).shape[1]
    assert len(base["base"]["next_tokens"]) == tiny_prompt.limits.default_top
    top = base["base"]["memories"][0]
    edit = {"layer": top["layer"], "keys": [top["key"]], "op": "zero"}
    status, answer = _post(prompt_server, "/api/prompt/trace", {"text": TEXT, "edits": [edit], "top": 3})
    assert status == 200, answer
    expected = tiny_prompt.lens.trace(TEXT, top=3, edits=[tiny_prompt_edit(edit)])
    assert answer["edited"]["edits"] == [{**edit, "value": None, "positions": "all"}]
    for got, want in zip(answer["edited"]["next_tokens"], expected.to_dict()["next_tokens"], strict=True):
        assert got["token_id"] == want["token_id"] and got["prob"] == pytest.approx(want["prob"], rel=1e-6)
    assert {row["token_id"] for row in answer["diff"]["next_tokens"]} >= {
        t["token_id"] for t in answer["base"]["next_tokens"]
    }
    edited_memory = [m for m in answer["edited"]["memories"] if (m["layer"], m["key"]) == (top["layer"], top["key"])]
    assert all(m["coefficient"] == 0 for m in edited_memory)


def tiny_prompt_edit(edit: dict):
    from ffkv_lens import Edit

    return Edit.from_dict(edit)


def test_generate_without_and_with_edits(prompt_server, tiny_prompt) -> None:
    edit = {"layer": 2, "keys": [5], "op": "scale", "value": 50.0}
    status, answer = _post(prompt_server, "/api/prompt/generate", {"text": TEXT, "edits": [edit], "max_new_tokens": 3})
    assert status == 200, answer
    assert answer["original"] == tiny_prompt.lens.generate(TEXT, max_new_tokens=3)
    assert answer["edited"] == tiny_prompt.lens.generate(TEXT, max_new_tokens=3, edits=[tiny_prompt_edit(edit)])
    status, plain = _post(prompt_server, "/api/prompt/generate", {"text": TEXT, "max_new_tokens": 2})
    assert status == 200 and plain["edited"] is None and plain["max_new_tokens"] == 2


@pytest.mark.parametrize(
    ("path", "body", "needle"),
    [
        ("/api/prompt/trace", {"text": " word" * 300}, "at most 128 (max_prompt_tokens)"),  # the model's n_ctx
        ("/api/prompt/generate", {"text": TEXT, "max_new_tokens": 65}, "pass an integer from 1 to 64"),
        ("/api/prompt/generate", {"text": TEXT, "max_new_tokens": 0}, "max_new_tokens=0"),
        ("/api/prompt/generate", {"text": " word" * 300}, "max_prompt_tokens"),
        ("/api/prompt/generate", {"text": " word" * 20, "max_new_tokens": 64}, "exceed the model's context of 128"),
        ("/api/prompt/trace", {"text": TEXT, "top": 21}, "top=21; pass an integer from 1 to 20"),
        ("/api/prompt/trace", {"text": TEXT, "top": True}, "top=True"),
        ("/api/prompt/trace", {"text": ""}, "type a prompt"),
        ("/api/prompt/trace", {"text": 3}, "type a prompt"),
        ("/api/prompt/trace", {"text": TEXT, "extra": 1}, "unknown fields ['extra']"),
        ("/api/prompt/trace", [TEXT], "JSON list"),
        ("/api/prompt/trace", {"text": TEXT, "edits": [{"layer": 9, "keys": [0]}]}, "layer 9 is out of range"),
        ("/api/prompt/trace", {"text": TEXT, "edits": [{"layer": 0, "keys": [64]}]}, "key 64 is out of range"),
        ("/api/prompt/trace", {"text": TEXT, "edits": [{"layer": 0, "keys": [1], "op": "boom"}]}, "op='boom'"),
        ("/api/prompt/trace", {"text": TEXT, "edits": {"layer": 0}}, "pass a list of edits"),
        ("/api/prompt/trace", {"text": TEXT, "edits": [{"layer": 0, "keys": [k]} for k in range(65)]}, "max_edits"),
    ],
    ids=[
        "long-prompt", "long-generation", "no-generation", "long-prompt-generate", "past-context", "top-high",
        "top-bool", "empty-text", "text-not-string", "unknown-field", "not-object", "layer-range", "key-range",
        "unknown-op", "edits-not-list", "too-many-edits",
    ],
)  # fmt: skip
def test_bad_requests_are_a_400_naming_the_value(prompt_server, path, body, needle) -> None:
    status, answer = _post(prompt_server, path, body)
    assert status == 400 and needle in answer["error"], answer
    assert "\n" not in answer["error"]


def test_http_edges_of_the_post_routes(prompt_server) -> None:
    status, answer = _post(prompt_server, "/api/prompt/trace", None, raw=b"{not json")
    assert status == 400 and "not JSON" in answer["error"]
    status, answer = _post(prompt_server, "/api/prompt/trace", None, raw=b" " * (MAX_BODY + 1))
    assert status == 413 and str(MAX_BODY) in answer["error"]
    status, answer = _post(prompt_server, "/api/prompt/trace", {"text": TEXT}, headers={"Content-Type": "text/plain"})
    assert status == 415, answer
    status, answer = _post(
        prompt_server, "/api/prompt/trace", {"text": TEXT}, headers={"Origin": "http://evil.example"}
    )
    assert status == 403 and "Origin" in answer["error"]
    status, answer = _post(
        prompt_server, "/api/prompt/trace", {"text": TEXT}, headers={"Origin": prompt_server.url[:-1]}
    )
    assert status == 200, answer
    status, answer = _post(prompt_server, "/api/elsewhere", {})
    assert status == 404
    status, answer = _get(prompt_server, "/api/prompt/trace")
    assert status == 405 and "POST" in answer["error"]
    status, runs = _get(prompt_server, "/api/runs")
    assert status == 200 and runs["prompt"]["run"] == "run" and runs["prompt"]["limits"]["max_prompt_tokens"] == 128


def test_concurrent_requests_are_served_one_at_a_time(prompt_server) -> None:
    results: list[int] = []
    bodies = [{"text": TEXT, "edits": [{"layer": 1, "keys": [k]}]} for k in range(4)]
    threads = [
        threading.Thread(target=lambda b=b: results.append(_post(prompt_server, "/api/prompt/trace", b)[0]))
        for b in bodies
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert results == [200] * 4


def test_without_a_model_the_prompt_api_says_so(server) -> None:
    for path in ("/api/prompt/trace", "/api/prompt/generate"):
        status, answer = _post(server, path, {"text": TEXT})
        assert status == 404 and "started without a model" in answer["error"] and "--model" in answer["error"]
    status, runs = _get(server, "/api/runs")
    assert status == 200 and runs["prompt"] is None


def test_limits_are_validated() -> None:
    with pytest.raises(ConfigError, match="max_new_tokens=0"):
        PromptLimits(max_new_tokens=0)
    with pytest.raises(ConfigError, match="default_top=9 exceeds max_top=4"):
        PromptLimits(max_top=4, default_top=9)


def test_browse_model_flag_without_a_value_loads_the_runs_model(tiny_index, tiny_run) -> None:
    from ffkv_lens.cli import _RUN_MODEL, _browse_model

    catalog = Catalog.from_index(tiny_index)
    prompt = _browse_model(argparse.Namespace(model=_RUN_MODEL, device="cpu"), catalog)
    assert prompt.name == json.loads((tiny_run / "manifest.json").read_text())["config"]["model"]
    assert prompt.run == catalog.default and prompt.lens.n_layers == 3
    assert _browse_model(argparse.Namespace(model=None, device="cpu"), catalog) is None
