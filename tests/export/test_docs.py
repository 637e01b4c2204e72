"""Run every ``python`` block of docs/exports.md on exports of a tiny run (the paths under exports/ replaced)."""

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "exports.md"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def test_the_page_has_a_loading_example_per_format() -> None:
    blocks = _BLOCK.findall(DOC.read_text(encoding="utf-8"))
    assert len(blocks) == 3
    for block, name in zip(blocks, ("demo-hf", "demo-neuronrecord", "demo-neuronpedia"), strict=True):
        assert f'"exports/{name}/' in block


def test_loading_examples_run(exports, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("neuron_explainer.activations.activations")
    root = {exports(fmt).path.parent for fmt in ("hf-dataset", "neuronrecord", "neuronpedia")}.pop()
    namespace: dict = {}
    for i, block in enumerate(_BLOCK.findall(DOC.read_text(encoding="utf-8"))):
        code = block.replace('"exports/', f'"{root}/')
        exec(compile(code, f"{DOC.name}: block {i}", "exec"), namespace)
    assert namespace["neuron"].neuron_id.layer_index == 2 and namespace["feature"]["index"] == "7"
    assert namespace["first"]["layer"] in (0, 1, 2)
    capsys.readouterr()
