"""Run every ``python`` block of docs/interventions.md: on a tiny LLaMA bridge, and (slow) on SmolLM2.

The blocks share one namespace and run in order. On the tiny model the embedded name
``"smollm2-135m"`` is swapped for the tiny folder and blocks starting with ``# SmolLM2 memories``
(they name SmolLM2's layers and keys) are left out; the slow test runs them all on SmolLM2-135M and
checks the numbers the page quotes.
"""

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "interventions.md"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def blocks(*, real: bool) -> list[str]:
    found = _BLOCK.findall(DOC.read_text(encoding="utf-8"))
    return found if real else [b for b in found if not b.startswith("# SmolLM2 memories")]


def _run(code_blocks: list[str], replace: str | None = None) -> dict:
    namespace: dict = {}
    for i, block in enumerate(code_blocks):
        code = block if replace is None else block.replace('"smollm2-135m"', replace)
        exec(compile(code, f"{DOC.name}: block {i}", "exec"), namespace)
    return namespace


def test_the_page_has_its_examples() -> None:
    assert len(blocks(real=False)) >= 6 and len(blocks(real=True)) == len(blocks(real=False)) + 1


def test_examples_run_on_a_tiny_model(tiny_folder, capsys: pytest.CaptureFixture[str]) -> None:
    namespace = _run(blocks(real=False), repr(str(tiny_folder("llama"))))
    assert float((namespace["by_hooks"] - namespace["by_weights"]).abs().max()) < 1e-4
    assert namespace["ablated"].prob(namespace["paris"]) < namespace["base"].prob(namespace["paris"])
    capsys.readouterr()


@pytest.mark.slow
def test_examples_run_on_smollm2_and_give_the_quoted_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    ns = _run(blocks(real=True))
    base, ablated, paris = ns["base"], ns["ablated"], ns["paris"]
    assert base.prediction == " Paris" and base.prob(paris) == pytest.approx(0.7491, abs=5e-4)
    assert ablated.prob(paris) == pytest.approx(0.0403, abs=5e-4) and ablated.prediction == " The"
    assert [(int(r.layer), int(r.key)) for r in ns["top10"].itertuples()][:3] == [(24, 1005), (28, 625), (27, 1392)]
    assert ns["boost"].original == " Paris.\n\nThe capital of the United States"
    assert ns["boost"].edited == " the capital of the French capital of the 2"
    capsys.readouterr()
