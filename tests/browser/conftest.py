"""Tiny run folders (random GPT-2 and Llama, run_study) and a comparison of them, shared by the browser tests."""

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ffkv_lens.browser import BrowserServer, open_catalog, open_index
from ffkv_lens.comparison import compare
from ffkv_lens.pipeline import RunConfig, run_study
from tests.factories import TEXT
from tests.report.runs import without_stats

# Accented letters and an emoji are split across byte-level tokens, so some units take the
# per-prefix decoding path of ffkv_lens.browser.text and others the offset path.
EXTRA = "A café in Zürich sells crème brûlée for 4 € ☕. Paris is the capital of France."


def _tiny_run(family: str, tiny_folder, tmp_path_factory) -> Path:
    corpus = tmp_path_factory.mktemp(f"browser-corpus-{family}") / "corpus.txt"
    corpus.write_text((TEXT + "\n" + EXTRA + "\n") * 3, encoding="utf-8")
    config = RunConfig(
        model=str(tiny_folder(family)), corpus=str(corpus), k=4, keys_per_layer=8, examples=4, positions=16,
        max_tokens=2000, quadrants=family == "llama",
    )  # fmt: skip
    # Both run folders are named "run": browsing them side by side labels them "run" and "run-2".
    return run_study(config, tmp_path_factory.mktemp(f"browser-run-{family}") / "run", progress=False)


@pytest.fixture(scope="session")
def tiny_run(tiny_folder, tmp_path_factory) -> Path:
    return _tiny_run("gpt2", tiny_folder, tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_run_b(tiny_folder, tmp_path_factory) -> Path:
    """A second run, of another family (Llama, gated: searched with quadrants); 3 layers x 64 keys as ``tiny_run``."""
    return _tiny_run("llama", tiny_folder, tmp_path_factory)


@pytest.fixture(scope="session")
def comparison(tiny_run, tiny_run_b, tmp_path_factory) -> Path:
    """``ffkv_lens.compare`` of ``tiny_run`` and ``tiny_run_b``; the second run's path is then made relative."""
    out = tmp_path_factory.mktemp("browser-compare") / "cmp"
    compare([tiny_run, tiny_run_b], out, positions=150, documents=20, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["runs"][1]["path"] = os.path.relpath(manifest["runs"][1]["path"], out)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.fixture(scope="session")
def labels(comparison) -> tuple[str, str]:
    """The comparison's labels of ``tiny_run`` and ``tiny_run_b``, from its manifest."""
    first, second = (entry["label"] for entry in json.loads((comparison / "manifest.json").read_text())["runs"])
    return first, second


@pytest.fixture(scope="session")
def tiny_index(tiny_run) -> Path:
    return open_index(tiny_run)


@pytest.fixture(scope="session")
def tiny_index_b(tiny_run_b) -> Path:
    return open_index(tiny_run_b)


@pytest.fixture(scope="session")
def old_index(tiny_run, tmp_path_factory) -> Path:
    """The index of ``tiny_run`` copied as a run folder from before per-memory statistics."""
    return open_index(without_stats(tiny_run, tmp_path_factory.mktemp("browser-old") / "run"))


@pytest.fixture(scope="session")
def tiny_atlas(tiny_run):
    from ffkv_lens.analysis.atlas import TriggerAtlas

    return TriggerAtlas.load(tiny_run / "atlas")


def _serve(source, **options) -> Iterator[BrowserServer]:
    srv = BrowserServer(source, port=0, **options)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


@pytest.fixture()
def server(tiny_index) -> Iterator[BrowserServer]:
    """The browser server of ``tiny_run`` on a free port, serving in a thread."""
    yield from _serve(tiny_index)


@pytest.fixture()
def server_b(tiny_index_b) -> Iterator[BrowserServer]:
    """The browser server of ``tiny_run_b`` (gated, with quadrants)."""
    yield from _serve(tiny_index_b)


@pytest.fixture()
def old_server(old_index) -> Iterator[BrowserServer]:
    """The browser server of ``old_index`` (a run without statistics)."""
    yield from _serve(old_index)


@pytest.fixture()
def compare_server(comparison) -> Iterator[BrowserServer]:
    """The browser server of ``comparison`` (both runs and their matches) on a free port."""
    yield from _serve(open_catalog([comparison]))


@pytest.fixture(scope="session")
def tiny_prompt(tiny_run):
    """The Prompt page's model: ``tiny_run``'s own model (its manifest's config.model), loaded once."""
    from ffkv_lens.browser.prompt import PromptModel

    model = json.loads((tiny_run / "manifest.json").read_text())["config"]["model"]
    return PromptModel.load(model, device="cpu", run="run")


@pytest.fixture()
def prompt_server(tiny_index, tiny_prompt) -> Iterator[BrowserServer]:
    """The browser server of ``tiny_run`` with the Prompt page (its model loaded)."""
    yield from _serve(tiny_index, prompt=tiny_prompt)
