"""``--format neuronrecord``: one JSON per memory in the layout of OpenAI's neuron-explainer ``NeuronRecord``.

Written at ``neurons/{layer}/{key}.json`` (the ``neurons/`` folder their ``neuron_exists`` and
``get_sorted_layers`` list; ``load_neuron(layer, key, dataset_path=".../neurons")`` reads a file), as
the JSON their ``fast_dataclasses.dumps`` writes: every object carries its ``dataclass_name``, so their
``fast_dataclasses.loads`` rebuilds ``NeuronRecord``, ``NeuronId`` and ``ActivationRecord`` objects.
Fields follow ``neuron_explainer/activations/activations.py`` (openai/automated-interpretability;
PyPI ``neuron-explainer`` 0.0.1). What is filled and how: docs/exports.md.
"""

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ffkv_lens.export.source import ExportSource, LayerExamples
from ffkv_lens.storage import atomic_folder

__all__ = ["NEURONS", "neuron_record", "write_neuron_records"]

NEURONS = "neurons"  # neurons/{layer}/{key}.json


def _record(tokens: list[str], activations: np.ndarray) -> dict[str, Any]:
    values = activations.astype(np.float64).tolist()  # the same Python floats as float(a) of each element
    return {"dataclass_name": "ActivationRecord", "tokens": tokens, "activations": values}


def _number(value: float) -> float | None:
    """JSON has no NaN: an unknown moment is ``null`` (what their orjson writer makes of NaN)."""
    return None if value is None or math.isnan(value) else float(value)


def neuron_record(
    source: ExportSource, layer: int, key: int, rows: Any, examples: LayerExamples, stats: dict[str, Any], groups: int
) -> dict[str, Any]:
    """The NeuronRecord of one memory from its example rows (indices into ``examples``) and statistics row."""
    columns = _columns(examples)
    return _neuron_record(source, layer, key, rows, examples, columns, stats, groups)


def _columns(examples: LayerExamples) -> dict[str, np.ndarray]:
    """The frame's columns a record reads, as numpy arrays (row access without pandas)."""
    frame = examples.frame
    return {name: frame[name].to_numpy() for name in ("kind", "group", "unit_id", "group_lo", "group_hi")}


def _neuron_record(
    source: ExportSource,
    layer: int,
    key: int,
    rows: Any,
    examples: LayerExamples,
    columns: dict[str, np.ndarray],
    stats: dict[str, Any],
    groups: int,
) -> dict[str, Any]:
    kind, group_of, units = columns["kind"], columns["group"], columns["unit_id"]
    top = [i for i in rows if kind[i] == "top"]
    by_group: list[list[dict[str, Any]]] = [[] for _ in range(groups)]
    bounds: list[float | None] = [None] * (groups + 1)
    for i in rows:
        if kind[i] != "quantile":
            continue
        group = int(group_of[i])
        by_group[group].append(_record(source.unit(int(units[i]))[1], examples.coefficients[i]))
        bounds[group], bounds[group + 1] = float(columns["group_lo"][i]), float(columns["group_hi"][i])
    std = float(stats["std"])
    return {
        "dataclass_name": "NeuronRecord",
        "neuron_id": {"dataclass_name": "NeuronId", "layer_index": layer, "neuron_index": key},
        "random_sample": [],
        "random_sample_by_quantile": by_group,
        "quantile_boundaries": bounds,
        "mean": _number(float(stats["mean"])),
        "variance": _number(std * std),
        "skewness": None,
        "kurtosis": None,
        "most_positive_activation_records": [
            _record(source.unit(int(units[i]))[1], examples.coefficients[i]) for i in top
        ],
    }


def write_neuron_records(source: ExportSource, out: Path, *, progress: bool = False) -> dict[str, Any]:
    """Write ``out/neurons/{layer}/{key}.json`` for every memory of the exported layers."""
    groups = int(source.atlas.stats_settings["quantile_groups"])
    written = 0
    with atomic_folder(out / NEURONS) as folder:
        for examples in source.examples(kinds=("top", "quantile"), progress=progress):
            layer = examples.layer
            stats = source.atlas.stats(layer).set_index("key")
            means, stds = stats["mean"].to_dict(), stats["std"].to_dict()
            by_key = examples.frame.groupby("key").indices
            columns = _columns(examples)
            (folder / str(layer)).mkdir()
            for key in range(source.d_mlp):
                rows = by_key.get(key, np.empty(0, dtype=np.int64))
                moments = {"mean": means[key], "std": stds[key]}
                record = _neuron_record(source, layer, key, rows, examples, columns, moments, groups)
                (folder / str(layer) / f"{key}.json").write_text(json.dumps(record, allow_nan=False), encoding="utf-8")
                written += 1
    return {"records": written, "path": f"{NEURONS}/{{layer}}/{{key}}.json"}
