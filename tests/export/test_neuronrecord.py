"""neuronrecord export: read back by neuron-explainer's own loader, and a schema check from its dataclasses."""

import json
import math

import pytest

from ffkv_lens.analysis.atlas import TriggerAtlas

# neuron_explainer/activations/activations.py (PyPI neuron-explainer 0.0.1): field -> allowed JSON types.
RECORD = {"dataclass_name": str, "tokens": list, "activations": list}
NEURON = {
    "dataclass_name": str, "neuron_id": dict, "random_sample": list, "random_sample_by_quantile": (list, type(None)),
    "quantile_boundaries": (list, type(None)), "mean": (float, type(None)), "variance": (float, type(None)),
    "skewness": (float, type(None)), "kurtosis": (float, type(None)), "most_positive_activation_records": list,
}  # fmt: skip


def check_activation_record(record: dict) -> None:
    assert set(record) == set(RECORD) and record["dataclass_name"] == "ActivationRecord"
    assert all(isinstance(t, str) for t in record["tokens"]) and len(record["tokens"]) == len(record["activations"])
    assert all(isinstance(a, float) and math.isfinite(a) for a in record["activations"])


def check_neuron_record(record: dict, layer: int, key: int) -> None:
    assert set(record) == set(NEURON), set(record) ^ set(NEURON)
    for name, types in NEURON.items():
        assert isinstance(record[name], types), name
    assert record["neuron_id"] == {"dataclass_name": "NeuronId", "layer_index": layer, "neuron_index": key}
    for item in record["random_sample"] + record["most_positive_activation_records"]:
        check_activation_record(item)
    for group in record["random_sample_by_quantile"]:
        for item in group:
            check_activation_record(item)
    assert len(record["quantile_boundaries"]) == len(record["random_sample_by_quantile"]) + 1


@pytest.fixture(scope="module")
def records(exports):
    return exports("neuronrecord")


def test_every_memory_has_a_record_that_fits_the_schema(export_run_dir, records) -> None:
    atlas = TriggerAtlas.load(export_run_dir / "atlas")
    folder = records.path / "neurons"
    assert sorted(int(p.name) for p in folder.iterdir()) == atlas.layers
    groups = atlas.stats_settings["quantile_groups"]
    for layer in atlas.layers:
        assert sorted(int(p.stem) for p in (folder / str(layer)).iterdir()) == list(range(atlas.d_mlp))
        stats = atlas.stats(layer)
        for key in range(atlas.d_mlp):
            record = json.loads((folder / str(layer) / f"{key}.json").read_text())
            check_neuron_record(record, layer, key)
            top = record["most_positive_activation_records"]
            examples = atlas.examples(layer, key)
            assert len(top) == len(examples) and len(record["random_sample_by_quantile"]) == groups
            for got, example in zip(top, examples, strict=True):
                assert got["activations"][example.position] == pytest.approx(example.coefficient, rel=1e-3, abs=1e-4)
            assert record["mean"] == pytest.approx(float(stats["mean"][key]), rel=1e-12)
            assert record["variance"] == pytest.approx(float(stats["std"][key]) ** 2, rel=1e-12)
            sampled = atlas.quantile_examples(layer, key)
            assert sum(len(g) for g in record["random_sample_by_quantile"]) == len(sampled)


def test_neuron_explainer_reads_the_records(records) -> None:
    activations = pytest.importorskip("neuron_explainer.activations.activations")
    from neuron_explainer.fast_dataclasses import loads

    path = records.path / "neurons" / "1" / "5.json"
    record = loads(path.read_text())
    assert isinstance(record, activations.NeuronRecord)
    assert record.neuron_id == activations.NeuronId(layer_index=1, neuron_index=5)
    assert all(isinstance(r, activations.ActivationRecord) for r in record.most_positive_activation_records)
    assert all(isinstance(r, activations.ActivationRecord) for g in record.random_sample_by_quantile for r in g)
    top = json.loads(path.read_text())["most_positive_activation_records"]
    assert record.max_activation == pytest.approx(max(max(r["activations"]) for r in top), rel=1e-12)
    assert activations.neuron_exists(str(records.path), 1, 5)
    assert activations.get_sorted_neuron_indices(str(records.path), 1)[:3] == [0, 1, 2]
