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


@pytest.fixture(scope="session")
def tiny_bridge(tiny_folder: Callable[[str], Path]) -> Callable[[str], object]:
    """``tiny_bridge(family)``: a booted bridge of that family, shared by the session (do not mutate)."""
    booted: dict[str, object] = {}

    def get(family: str):
        if family not in booted:
            booted[family] = boot(tiny_folder(family))
        return booted[family]

    return get
