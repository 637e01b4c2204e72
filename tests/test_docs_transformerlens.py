"""Run every ``python`` block of docs/transformerlens.md on a tiny random LLaMA.

The two loading sections (TransformerBridge, HookedTransformer) each define ``model``, ``lens``,
``tokens`` and ``m``; every later section runs once after each of them, so the page's claims hold
on both backends. Blocks of a section share a namespace and run in order; a block whose first
line is ``# not run`` is skipped (it needs the hub). The embedded name ``"smollm2-135m"`` is
replaced by the folder of the tiny model, so the examples run offline in seconds. The
HookedTransformer runs need TransformerLens 3.x.
"""

import re
from pathlib import Path

import pytest

from tests.conftest import has_hooked_transformer

DOC = Path(__file__).resolve().parents[1] / "docs" / "transformerlens.md"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
LOADERS = {"bridge": "From a TransformerBridge workflow", "hooked": "From a HookedTransformer workflow"}


def sections() -> dict[str, list[str]]:
    """``{section title: [code blocks]}`` of the page, in order, without the skipped blocks."""
    out: dict[str, list[str]] = {}
    for part in re.split(r"^## ", DOC.read_text(encoding="utf-8"), flags=re.M)[1:]:
        title = part.splitlines()[0].strip()
        blocks = [b for b in _BLOCK.findall(part) if not b.startswith("# not run")]
        if blocks:
            out[title] = blocks
    return out


SECTIONS = sections()
CASES = [(backend, title) for backend in LOADERS for title in SECTIONS if title not in LOADERS.values()]


def _run(title: str, namespace: dict, folder: str) -> None:
    for block in SECTIONS[title]:
        exec(compile(block.replace('"smollm2-135m"', folder), f"{DOC.name}: {title}", "exec"), namespace)


def test_the_page_has_its_sections() -> None:
    assert set(LOADERS.values()) <= set(SECTIONS), list(SECTIONS)
    assert len(CASES) >= 6, CASES


@pytest.mark.parametrize("backend", list(LOADERS))
def test_loading_examples_run(backend: str, tiny_folder, capsys: pytest.CaptureFixture[str]) -> None:
    if backend == "hooked" and not has_hooked_transformer():
        pytest.skip("the HookedTransformer examples need transformer-lens 3.x")
    _run(LOADERS[backend], {}, repr(str(tiny_folder("llama"))))
    capsys.readouterr()


@pytest.mark.parametrize(("backend", "title"), CASES, ids=[f"{b}-{t}" for b, t in CASES])
def test_examples_run(backend: str, title: str, tiny_folder, capsys: pytest.CaptureFixture[str]) -> None:
    if backend == "hooked" and not has_hooked_transformer():
        pytest.skip("the HookedTransformer examples need transformer-lens 3.x")
    namespace: dict = {}
    folder = repr(str(tiny_folder("llama")))
    _run(LOADERS[backend], namespace, folder)
    _run(title, namespace, folder)
    capsys.readouterr()
