"""Lenses of every family on every backend the installed TransformerLens has, for the intervention tests."""

import pytest

from ffkv_lens import MemoryLens
from tests.conftest import has_hooked_transformer
from tests.factories import FAMILY_NAMES

BACKENDS = ["bridge"] + (["hooked-raw", "hooked-processed"] if has_hooked_transformer() else [])
CASES = [(b, f) for b in BACKENDS for f in FAMILY_NAMES if not (b != "bridge" and f == "bert")]
DECODER_CASES = [(b, f) for b, f in CASES if f != "bert"]
TEXT = "The capital of France is Paris. The quick"


def case_id(case: tuple[str, str]) -> str:
    return f"{case[0]}-{case[1]}"


def make_lens(case: tuple[str, str], tiny_bridge, tiny_hooked) -> MemoryLens:
    backend, family = case
    if backend == "bridge":
        return MemoryLens(tiny_bridge(family))
    return MemoryLens(tiny_hooked(family, backend == "hooked-processed"))


def lens_fixture(cases: list[tuple[str, str]]):
    """A parametrised ``lens`` fixture over ``cases``."""

    @pytest.fixture(params=cases, ids=case_id)
    def lens(request: pytest.FixtureRequest, tiny_bridge, tiny_hooked) -> MemoryLens:
        return make_lens(request.param, tiny_bridge, tiny_hooked)

    return lens
