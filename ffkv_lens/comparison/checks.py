"""Checks of a comparison folder read back from disk (``Comparison.load``).

The manifest's fields (runs, settings, pairs and their summaries) and the two tables are checked
for the types and columns the report reads, so a damaged or hand-edited folder is a one-line
:class:`~ffkv_lens.errors.DamagedFileError` naming the file, never a traceback.
"""

from pathlib import Path
from typing import Any

from ffkv_lens.errors import DamagedFileError
from ffkv_lens.storage.reading import check_columns, field, short

__all__ = ["COMPARE_FIX", "check_comparison_manifest", "check_curves", "check_matches"]

COMPARE_FIX = "the comparison folder is damaged: write it again with `ffkv-lens compare`"
_SUMMARY = ("memories", "significant", "median_best", "median_null")


def _label(value: Any, name: str, path: Path) -> str:
    if not isinstance(value, str) or not value or "/" in value or "\\" in value or value in (".", ".."):
        raise DamagedFileError(
            f"{path}: {name} is {short(value)}, not a run label (a name without '/'); {COMPARE_FIX}."
        )
    return value


def check_comparison_manifest(manifest: dict[str, Any], path: Path) -> None:
    """Raise :class:`DamagedFileError` unless every field the comparison report reads has its type."""
    fix = COMPARE_FIX
    runs = field(manifest, "runs", list, path, fix=fix)
    if len(runs) < 2:
        raise DamagedFileError(f"{path}: 'runs' lists {len(runs)} runs, a comparison has at least two; {fix}.")
    labels = []
    for i, run in enumerate(runs):
        labels.append(_label(field(run, f"runs[{i}].label", str, path, fix=fix), f"runs[{i}].label", path))
        for name in ("path", "model"):
            field(run, f"runs[{i}].{name}", str, path, fix=fix)
        for name in ("n_layers", "d_mlp"):
            field(run, f"runs[{i}].{name}", int, path, low=1, fix=fix)
        for name in ("corpus", "corpus_fingerprint"):
            field(run, f"runs[{i}].{name}", str, path, optional=True, fix=fix)
    if len(set(labels)) != len(labels):
        raise DamagedFileError(f"{path}: run labels repeat ({short(labels)}); {fix}.")
    settings = field(manifest, "settings", dict, path, fix=fix)
    match = field(settings, "settings.match", bool, path, fix=fix)
    field(settings, "settings.fdr", float, path, low=0, high=1, fix=fix)
    field(manifest, "corpora_differ", bool, path, optional=True, fix=fix)
    for name in ("versions", "timings"):
        field(manifest, name, dict, path, optional=True, fix=fix)
    pairs = field(manifest, "pairs", list, path, fix=fix)
    if match:
        for i, pair in enumerate(pairs):
            _check_pair(pair, f"pairs[{i}]", set(labels), path)


def _check_pair(pair: Any, where: str, labels: set[str], path: Path) -> None:
    fix = COMPARE_FIX
    for side in ("run_a", "run_b"):
        if field(pair, f"{where}.{side}", str, path, fix=fix) not in labels:
            raise DamagedFileError(f"{path}: {where}.{side} is {short(pair[side])}, not a run of 'runs'; {fix}.")
    vocab = field(pair, f"{where}.vocabulary", dict, path, fix=fix)
    field(vocab, f"{where}.vocabulary.n_shared", int, path, low=0, fix=fix)
    for name in ("share_a", "share_b"):
        field(vocab, f"{where}.vocabulary.{name}", float, path, low=0, high=1, fix=fix)
    for name in ("kind_a", "kind_b"):
        field(vocab, f"{where}.vocabulary.{name}", str, path, fix=fix)
    kinds = field(pair, f"{where}.kinds", dict, path, fix=fix)
    for kind, summary in kinds.items():
        if kind not in ("value", "key"):
            raise DamagedFileError(f"{path}: {where}.kinds holds {short(kind)}, not 'value' or 'key'; {fix}.")
        field(field(summary, f"{where}.kinds.{kind}.settings", dict, path, fix=fix), "null", str, path,
              optional=True, fix=fix)  # fmt: skip
        for direction in ("ab", "ba"):
            counts = field(summary, f"{where}.kinds.{kind}.{direction}", dict, path, fix=fix)
            for name in _SUMMARY:
                low = 0 if name in ("memories", "significant") else None
                kind_of = int if low == 0 else float
                field(counts, f"{where}.kinds.{kind}.{direction}.{name}", kind_of, path, low=low,
                      optional=low is None, fix=fix)  # fmt: skip


def check_curves(frame: Any, path: Path) -> Any:
    """``tables/curves.csv`` with its columns and number types checked."""
    return check_columns(frame, path, ints=("layer",), numbers=("relative_depth", "value"), fix=COMPARE_FIX,
                         strings=("run", "metric"))  # fmt: skip


def check_matches(frame: Any, path: Path) -> Any:
    """``tables/matches.csv`` with its columns and number types checked."""
    ints = ("layer_a", "key_a", "layer_b", "key_b", "rank")
    return check_columns(frame, path, ints=ints, numbers=("score",), strings=("kind", "run_a", "run_b"),
                         fix=COMPARE_FIX)  # fmt: skip
