"""Shared fixtures: tiny random models of every family, built offline once per session."""

import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.factories import build_tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``tiny_folder(family)``: path of a saved tiny model of that family (built once)."""
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build_tiny_model(family, tmp_path_factory.mktemp(f"tiny-{family}"))
        return built[family]

    return get


def boot(folder: Path):
    """Boot a saved HF folder as a TransformerBridge on the CPU, quietly."""
    from transformer_lens.model_bridge import TransformerBridge

    logging.getLogger("transformer_lens").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TransformerBridge.boot_transformers(str(folder), device="cpu", dtype=torch.float32)


def has_hooked_transformer() -> bool:
    """Whether the installed TransformerLens has ``HookedTransformer`` (3.x; removed in 4.0)."""
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:
        return False
    return True


def build_hooked(folder: Path, processed: bool):
    """A HookedTransformer with the weights of a saved HF folder (TransformerLens's converters), quietly."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ffkv_lens.adapters.hooked_loading import build_hooked_model

    logging.getLogger("transformer_lens").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        return build_hooked_model(hf_model, tokenizer, processed=processed, name=Path(folder).name)


@pytest.fixture(scope="session")
def tiny_hooked(tiny_folder: Callable[[str], Path]) -> Callable[[str, bool], object]:
    """``tiny_hooked(family, processed)``: a HookedTransformer of that family, shared (do not mutate)."""
    built: dict[tuple[str, bool], object] = {}

    def get(family: str, processed: bool):
        if (family, processed) not in built:
            built[family, processed] = build_hooked(tiny_folder(family), processed)
        return built[family, processed]

    return get


@pytest.fixture(scope="session")
def tiny_bridge(tiny_folder: Callable[[str], Path]) -> Callable[[str], object]:
    """``tiny_bridge(family)``: a booted bridge of that family, shared by the session (do not mutate)."""
    booted: dict[str, object] = {}

    def get(family: str):
        if family not in booted:
            booted[family] = boot(tiny_folder(family))
        return booted[family]

    return get
