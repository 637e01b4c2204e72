"""A tiny finished run folder for the report and CLI tests (built with ``run_study``)."""

import json
import shutil
from pathlib import Path

from ffkv_lens.pipeline import RunConfig, run_study
from tests.factories import TEXT

# Trigger text is arbitrary corpus text; the corpus file's name reaches the report's settings.
HOSTILE = '<script>alert("x")</script> & <i>not markup</i>.'


def build_tiny_run(model_folder: Path, root: Path) -> Path:
    """Run the whole study on a tiny model and a corpus whose name and text carry markup."""
    corpus = root / "c<script>x<i>.txt"
    corpus.write_text((TEXT + "\n" + HOSTILE + "\n") * 3)
    config = RunConfig(
        model=str(model_folder), corpus=str(corpus), k=4, keys_per_layer=8, examples=4, positions=16, max_tokens=2000
    )
    return run_study(config, root / "run", progress=False)


def copy_run(folder: Path, dest: Path, *, drop_steps: tuple[str, ...] = (), drop: tuple[str, ...] = ()) -> Path:
    """A copy of a run folder without some steps (as if the run stopped) and files (relative globs)."""
    shutil.copytree(folder, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    for step in drop_steps:
        manifest["steps"].pop(step, None)
    if drop_steps:
        manifest["status"] = "running"
        manifest.pop("finished", None)
    (dest / "manifest.json").write_text(json.dumps(manifest))
    for pattern in drop:
        for path in dest.glob(pattern):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return dest


def without_stats(folder: Path, dest: Path) -> Path:
    """A copy of a run folder as written before per-memory statistics: no ``stats.safetensors``, no manifest entry."""
    copy_run(folder, dest, drop=("atlas/stats.safetensors", "browser.sqlite", "report.html"))
    path = dest / "atlas" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.pop("stats", None)
    path.write_text(json.dumps(manifest))
    return dest
