"""storage/layout.py is the one place that names the folder formats and the run's steps."""

import re
from pathlib import Path

import pytest

import ffkv_lens
from ffkv_lens.storage.layout import ANALYSIS_STEPS, COMPARISON, RUN, RUN_STEPS

PACKAGE = Path(ffkv_lens.__file__).parent
LAYOUT = PACKAGE / "storage" / "layout.py"


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if p != LAYOUT)


@pytest.mark.parametrize("text", ["ffkv_lens.run/", "ffkv_lens.compare/"], ids=["run", "comparison"])
def test_format_strings_appear_only_in_layout(text: str) -> None:
    assert text in LAYOUT.read_text()
    found = [str(p.relative_to(PACKAGE)) for p in _modules() if text in p.read_text(encoding="utf-8")]
    assert found == [], f"{text!r} is spelled outside storage/layout.py: {found}"


def test_the_steps_are_listed_only_in_layout() -> None:
    # A tuple literal naming two steps in a row is a list of steps (the pipeline's own step calls name one each).
    pattern = re.compile(r'"triggers",\s*"(values|dynamics)"')
    found = [str(p.relative_to(PACKAGE)) for p in _modules() if pattern.search(p.read_text(encoding="utf-8"))]
    assert found == [] and pattern.search(LAYOUT.read_text())


def test_steps_and_formats() -> None:
    assert RUN_STEPS == ("triggers", "values", "dynamics", "agreement", "causal", "mutation", "figures", "report")
    assert ANALYSIS_STEPS == RUN_STEPS[:-1]
    assert (RUN.prefix, COMPARISON.prefix) == ("ffkv_lens.run/", "ffkv_lens.compare/")
    assert RUN.owns({"format": RUN.format}) and not RUN.owns({"format": COMPARISON.format})


def test_readers_and_writers_share_the_definitions() -> None:
    from ffkv_lens import pipeline
    from ffkv_lens.comparison import COMPARE_FORMAT
    from ffkv_lens.report import memories

    assert pipeline.STEPS is RUN_STEPS and memories.ANALYSIS_STEPS is ANALYSIS_STEPS
    assert COMPARE_FORMAT == COMPARISON.format
