"""neuronpedia export: the bulk-data layout and a schema check written from export-data.py and schema.prisma."""

import gzip
import json
import math

import pytest
import torch

from ffkv_lens import MemoryLens, load_model
from ffkv_lens.analysis.atlas import TriggerAtlas
from ffkv_lens.export.neuronpedia import _write_batches, model_id_of

# Columns export-data.py exports (hijohnnylin/neuronpedia, utils/neuronpedia-utils/neuronpedia_utils/export-data.py).
FEATURE_COLUMNS = {
    "modelId", "layer", "index", "maxActApprox", "creatorId", "frac_nonzero", "freq_hist_data_bar_heights",
    "freq_hist_data_bar_values", "logits_hist_data_bar_heights", "logits_hist_data_bar_values",
    "neuron_alignment_indices", "neuron_alignment_l1", "neuron_alignment_values", "correlated_neurons_indices",
    "correlated_neurons_l1", "correlated_neurons_pearson", "decoder_weights_dist", "neg_str", "neg_values", "pos_str",
    "pos_values", "sourceSetName", "topkCosSimIndices", "topkCosSimValues", "vector", "vectorLabel", "hookName",
    "vectorDefaultSteerStrength", "hasVector",
}  # fmt: skip
ACTIVATION_COLUMNS = {
    "id", "modelId", "layer", "index", "creatorId", "dataSource", "tokens", "maxValue", "minValue", "values",
    "maxValueTokenIndex", "dfaValues", "dfaMaxValue", "dfaTargetIndex", "binContains", "binMin", "binMax",
    "qualifyingTokenIndex",  # not exported by export-data.py, but a column of schema.prisma's Activation
}  # fmt: skip
# Types of the columns we write (schema.prisma: Neuron and Activation; String[] / Float[] are JSON lists).
STRINGS = {"modelId", "layer", "index", "hookName", "sourceSetName", "id"}
FLOATS = {"maxActApprox", "frac_nonzero", "maxValue", "minValue", "binMin", "binMax", "binContains"}
STRING_LISTS = {"pos_str", "neg_str", "tokens"}
FLOAT_LISTS = {
    "freq_hist_data_bar_heights", "freq_hist_data_bar_values", "logits_hist_data_bar_heights",
    "logits_hist_data_bar_values", "pos_values", "neg_values", "values",
}  # fmt: skip


def check_types(row: dict) -> None:
    for name, value in row.items():
        if name in STRINGS:
            assert isinstance(value, str), name
        elif name in FLOATS:
            assert isinstance(value, (int, float)) and math.isfinite(value), name
        elif name in STRING_LISTS:
            assert isinstance(value, list) and all(isinstance(v, str) for v in value), name
        elif name in FLOAT_LISTS:
            assert isinstance(value, list) and all(isinstance(v, (int, float)) and math.isfinite(v) for v in value), (
                name
            )
        else:
            assert name in ("maxValueTokenIndex", "qualifyingTokenIndex") and isinstance(value, int), name


def read_rows(folder) -> list[dict]:
    rows = []
    for path in sorted(folder.glob("batch-*.jsonl.gz")):
        rows += [json.loads(line) for line in gzip.decompress(path.read_bytes()).decode().splitlines()]
    return rows


@pytest.fixture(scope="module")
def exported(exports):
    return exports("neuronpedia")


def test_layout_features_and_activations_fit_the_schema(export_run_dir, exported) -> None:
    atlas = TriggerAtlas.load(export_run_dir / "atlas")
    model_id = model_id_of(json.loads((export_run_dir / "manifest.json").read_text())["config"]["model"])
    assert exported.manifest["result"]["model_id"] == model_id
    for layer in atlas.layers:
        source = exported.path / "v1" / model_id / f"{layer}-ffkv-mlp"
        features = read_rows(source / "features")
        assert [f["index"] for f in features] == [str(k) for k in range(atlas.d_mlp)]  # every memory, in order
        stats = atlas.stats(layer)
        for feature in features:
            assert set(feature) <= FEATURE_COLUMNS and feature["layer"] == f"{layer}-ffkv-mlp"
            assert feature["hookName"] == f"blocks.{layer}.mlp.hook_post"
            check_types(feature)
            key = int(feature["index"])
            assert sum(feature["freq_hist_data_bar_heights"]) == int(stats["count"][key])
            assert sum(feature["logits_hist_data_bar_heights"]) == atlas.manifest["model_layout"]["d_vocab"]
            assert feature["frac_nonzero"] == pytest.approx(float(stats["density"][key]), rel=1e-12)
        activations = read_rows(source / "activations")
        edges = atlas.histogram_edges(layer).tolist()
        for row in activations:
            assert set(row) <= ACTIVATION_COLUMNS and {"tokens", "values", "maxValue", "index"} <= set(row)
            check_types(row)
            assert len(row["tokens"]) == len(row["values"]) and row["maxValue"] == max(row["values"])
            assert row["values"][row["maxValueTokenIndex"]] == row["maxValue"]
            assert row["binContains"] == -1 or (0 <= row["binContains"] <= 1 and row["binMin"] <= row["binMax"])
            if row["binContains"] != -1:  # a quantile sample: its own position's coefficient lies in its group
                peak = row["values"][row["qualifyingTokenIndex"]]  # (the end bins also hold values beyond the range)
                assert row["binMin"] - 1e-4 <= peak or row["binMin"] == edges[0]
                assert peak <= row["binMax"] + 1e-4 or row["binMax"] == edges[-1]
        tops = [r for r in activations if r["binContains"] == -1]
        assert len(tops) == sum(len(atlas.examples(layer, k)) for k in range(atlas.d_mlp))
        quantiles = len(activations) - len(tops)
        assert quantiles == sum(len(atlas.quantile_examples(layer, k)) for k in range(atlas.d_mlp))


def test_top_activation_values_equal_an_independent_recomputation(export_run_dir, exported) -> None:
    atlas = TriggerAtlas.load(export_run_dir / "atlas")
    model = json.loads((export_run_dir / "manifest.json").read_text())["config"]["model"]
    lens = MemoryLens(load_model(model))
    rows = read_rows(exported.path / "v1" / model_id_of(model) / "2-ffkv-mlp" / "activations")
    tops = [r for r in rows if "@top-" in r["id"]][:12]
    for row in tops:
        key, rank = int(row["index"]), int(row["id"].rsplit("-", 1)[1])
        _, tokens = atlas.units.get(atlas.examples(2, key)[rank].unit_id)
        m = lens.coefficients(torch.tensor([[lens.adapter.bos_token_id, *tokens]]), layers=[2])[2][0, 1:, key]
        assert torch.allclose(torch.tensor(row["values"]), m.float(), rtol=1e-4, atol=1e-6)


def test_batches_hold_1024_features_each(tmp_path) -> None:
    rows = [{"index": str(i), "n": n} for i in range(2500) for n in range(2)]
    assert _write_batches(tmp_path / "b", rows) == 3
    sizes = [len(read_rows_one(tmp_path / "b" / f"batch-{n}.jsonl.gz")) for n in range(3)]
    assert sizes == [2048, 2048, 904]


def read_rows_one(path) -> list[dict]:
    return [json.loads(line) for line in gzip.decompress(path.read_bytes()).decode().splitlines()]


def test_round7_equals_the_string_rounding_for_float32_values() -> None:
    import numpy as np

    from ffkv_lens.export.neuronpedia import round7

    rng = np.random.default_rng(0)
    signs = rng.choice([-1.0, 1.0], 400_000)
    magnitudes = 10.0 ** rng.uniform(-12, 9, 400_000)
    powers = np.array([10.0**i for i in range(-12, 9)], dtype=np.float32)
    near = np.concatenate([np.nextafter(powers, 0), powers, np.nextafter(powers, np.inf)])  # log10 edge cases
    ties = np.array([1234567.5, 0.5, 2.0**-18, 2.0**-19, 999999.94, 1e6, 0.0, -0.0], dtype=np.float32)
    values = np.concatenate([(signs * magnitudes).astype(np.float32), near, -near, ties])
    want = [float(f"{float(v):.7g}") for v in values]
    got = round7(values).tolist()
    assert [repr(g) for g in got] == [repr(w) for w in want]  # the same doubles (and the same signed zeros)
