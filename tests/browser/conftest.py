"""A tiny finished run folder (tiny random GPT-2, run_study) shared by the browser tests."""

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ffkv_lens.browser import BrowserServer, open_index
from ffkv_lens.pipeline import RunConfig, run_study
from tests.factories import TEXT

# Accented letters and an emoji are split across byte-level tokens, so some units take the
# per-prefix decoding path of ffkv_lens.browser.text and others the offset path.
EXTRA = "A café in Zürich sells crème brûlée for 4 € ☕. Paris is the capital of France."


@pytest.fixture(scope="session")
def tiny_run(tiny_folder, tmp_path_factory) -> Path:
    corpus = tmp_path_factory.mktemp("browser-corpus") / "corpus.txt"
    corpus.write_text((TEXT + "\n" + EXTRA + "\n") * 3, encoding="utf-8")
    config = RunConfig(
        model=str(tiny_folder("gpt2")), corpus=str(corpus), k=4, keys_per_layer=8, examples=4, positions=16,
        max_tokens=2000,
    )  # fmt: skip
    return run_study(config, tmp_path_factory.mktemp("browser-run") / "run", progress=False)


@pytest.fixture(scope="session")
def tiny_index(tiny_run) -> Path:
    return open_index(tiny_run)


@pytest.fixture(scope="session")
def tiny_atlas(tiny_run):
    from ffkv_lens.analysis.atlas import TriggerAtlas

    return TriggerAtlas.load(tiny_run / "atlas")


@pytest.fixture()
def server(tiny_index) -> Iterator[BrowserServer]:
    """The browser server on a free port, serving in a thread."""
    srv = BrowserServer(tiny_index, port=0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)
