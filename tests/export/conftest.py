"""One tiny finished run folder shared by the export tests (a gated LLaMA, signed search)."""

from pathlib import Path

import pytest

from ffkv_lens.pipeline import RunConfig, run_study
from tests.factories import TEXT


@pytest.fixture(scope="session")
def export_run_dir(tiny_folder, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run of the whole study on a tiny LLaMA (every step, statistics included when searched)."""
    root = tmp_path_factory.mktemp("export-run")
    corpus = root / "corpus.txt"
    corpus.write_text((TEXT + "\n") * 3)
    # k=4 signed: every memory has top and bottom examples; the steps the exports do not read (mutation test,
    # dynamics) run at their smallest sizes.
    config = RunConfig(
        model=str(tiny_folder("llama")), corpus=str(corpus), k=4, keys_per_layer=1, examples=1, positions=4,
        max_tokens=2000,
    )  # fmt: skip
    return run_study(config, root / "run", progress=False)


@pytest.fixture(scope="session")
def exports(export_run_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """``exports(fmt)``: the run exported in that format once per session, at ``<root>/demo-<short name>``."""
    from ffkv_lens.export import export_run

    root = tmp_path_factory.mktemp("exports")
    done: dict = {}
    names = {"hf-dataset": "demo-hf", "neuronrecord": "demo-neuronrecord", "neuronpedia": "demo-neuronpedia"}

    def get(fmt: str):
        if fmt not in done:
            done[fmt] = export_run(export_run_dir, root / names[fmt], format=fmt, progress=False)
        return done[fmt]

    return get
