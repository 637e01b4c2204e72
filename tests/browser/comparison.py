"""A comparison folder written by hand in the format of ``ffkv-lens compare`` (manifest + tables/matches.csv).

The matches are synthetic but deterministic, so the browser can be tested apart from the matching
itself. The tests take what to expect from the folder's own ``matches.csv`` (:func:`table_matches`),
not from how this module made it, so a folder written by ``ffkv_lens.compare`` serves as well.
"""

import csv
import json
import math
import os
from pathlib import Path

import pandas as pd

FDR = 0.05  # the FDR level the synthetic ``significant`` flags use
SCORE_TOL = 1e-12  # scores go float64 -> CSV (repr, round-trips) -> SQLite REAL: exact up to parsing
COLUMNS = ["kind", "run_a", "layer_a", "key_a", "run_b", "layer_b", "key_b", "rank", "score", "q_value",
           "significant", "value_similarity", "key_correlation"]  # fmt: skip


def _match(kind: str, pair: int, layer: int, key: int, rank: int, layers: list[int], d_mlp: int) -> dict:
    """The synthetic match of rank ``rank`` of memory (layer, key) for an ordered pair of runs (0 or 1)."""
    shift = 5 * rank + (11 if kind == "key" else 0) + 3 * pair
    score = round(0.95 - 0.1 * rank - key / (10 * d_mlp), 6)
    q_value = round((key % 10) / 50 + 0.001, 6) if rank == 1 else math.nan
    return {
        "kind": kind, "layer_b": layers[(layers.index(layer) + rank - 1) % len(layers)],
        "key_b": (key + shift) % d_mlp, "rank": rank, "score": score, "q_value": q_value,
        "significant": bool(rank == 1 and q_value <= FDR),
        "value_similarity": score if kind == "value" else round(score / 2, 6),
        "key_correlation": score if kind == "key" else math.nan,
    }  # fmt: skip


def _memory_rows(label_a: str, label_b: str, layer: int, key: int, layers: list[int], d_mlp: int) -> list[dict]:
    """The rows of memory (layer, key) of run ``label_a`` matched in run ``label_b``."""
    pair = int(label_a > label_b)
    rows = [_match(kind, pair, layer, key, rank, layers, d_mlp) for kind in ("value", "key") for rank in (1, 2, 3)]
    return [{"run_a": label_a, "layer_a": layer, "key_a": key, "run_b": label_b, **row} for row in rows]


def write_comparison(runs: dict[str, Path], out: Path, layers: list[int], d_mlp: int, *, relative: bool) -> Path:
    """Write ``out/manifest.json`` and ``out/tables/matches.csv`` for the runs (label -> folder), both directions.

    Args:
        runs: Two runs, label -> run folder.
        out: The comparison folder (created).
        layers: The layers both runs have.
        d_mlp: Keys per layer of both runs.
        relative: Store the run folders relative to ``out`` (the first absolute, the others relative).
    """
    (out / "tables").mkdir(parents=True, exist_ok=True)
    entries = []
    for i, (label, folder) in enumerate(runs.items()):
        path = os.path.relpath(folder, out) if relative and i > 0 else str(folder.resolve())
        manifest = json.loads((folder / "manifest.json").read_text())
        entries.append({"label": label, "path": path, "model": manifest["config"]["model"], "n_layers": len(layers),
                        "d_mlp": d_mlp, "corpus_fingerprint": "test"})  # fmt: skip
    manifest = {"format": "ffkv_lens.compare/1", "runs": entries, "settings": {"fdr": FDR, "top_n": 3}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    labels = list(runs)
    rows = [
        row
        for a in labels
        for b in labels
        if a != b
        for layer in layers
        for key in range(d_mlp)
        for row in _memory_rows(a, b, layer, key, layers, d_mlp)
    ]
    frame = pd.DataFrame(rows, columns=COLUMNS)
    (out / "tables" / "matches.csv").write_text(frame.to_csv(index=False, quoting=csv.QUOTE_NONNUMERIC))
    return out


def table_matches(folder: Path, run: str, layer: int, key: int) -> list[dict]:
    """The rows of ``matches.csv`` for memory (layer, key) of ``run``, as the browser serves them, in its order.

    Order: the other runs in the manifest's order, value matches before key matches, then by rank.
    Served: the other run's side (``run``, ``layer``, ``key``), NaN as None, ``significant`` a bool.
    """
    labels = [entry["label"] for entry in json.loads((folder / "manifest.json").read_text())["runs"]]
    floats = ("score", "q_value", "value_similarity", "key_correlation")
    table = pd.read_csv(folder / "tables" / "matches.csv", keep_default_na=False,
                        na_values={c: [""] for c in floats}, dtype={"run_a": str, "run_b": str})  # fmt: skip
    rows = table[(table["run_a"] == run) & (table["layer_a"] == layer) & (table["key_a"] == key)].to_dict("records")
    rows.sort(key=lambda r: (labels.index(r["run_b"]), r["kind"] != "value", r["rank"], r["layer_b"], r["key_b"]))
    names = ("kind", "rank", "score", "q_value", "value_similarity", "key_correlation")
    out = []
    for row in rows:
        served = {"run": row["run_b"], "layer": row["layer_b"], "key": row["key_b"], **{n: row[n] for n in names}}
        served = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in served.items()}
        out.append(
            {**served, "significant": {True: True, False: False, "True": True, "False": False}[row["significant"]]}
        )
    return out


def assert_same_matches(got: list[dict], expected: list[dict]) -> None:
    """Served matches equal the expected ones, in order (floats within SCORE_TOL)."""
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        exact = {k: v for k, v in e.items() if not isinstance(v, float)}
        assert {k: g[k] for k in exact} == exact, (g, e)
        for name, value in e.items():
            if isinstance(value, float):
                assert g[name] is not None and abs(g[name] - value) <= SCORE_TOL, (name, g, e)
