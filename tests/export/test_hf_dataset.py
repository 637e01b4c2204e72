"""hf-dataset export: read back with `datasets` (load_from_disk, streamed Parquet), every memory, coefficients."""

import json

import datasets
import pytest
import torch

from ffkv_lens import MemoryLens, load_model
from ffkv_lens.analysis.atlas import TriggerAtlas
from ffkv_lens.export.hf_dataset import COLUMNS


@pytest.fixture(scope="module")
def hf_export(exports):
    return exports("hf-dataset")


def test_dataset_round_trips_and_holds_every_trigger_example(export_run_dir, hf_export) -> None:
    atlas = TriggerAtlas.load(export_run_dir / "atlas")
    expected = atlas.to_pandas(text=True)
    ds = datasets.load_from_disk(str(hf_export.path / "dataset"))
    assert list(ds.column_names) == list(COLUMNS) and ds.num_rows == len(expected) > 0
    frame = ds.to_pandas()
    got = frame[["layer", "key", "sign", "rank", "unit_id", "doc_id", "peak_position"]].to_numpy().tolist()
    want = expected[["layer", "key", "sign", "rank", "unit_id", "doc_id", "position"]].to_numpy().tolist()
    assert sorted(got) == sorted(want)
    # every memory of every layer, both signs
    assert {(r.layer, r.key, r.sign) for r in frame.itertuples()} == {
        (layer, key, sign) for layer in atlas.layers for key in range(atlas.d_mlp) for sign in (1, -1)
    }
    row = ds[0]
    assert row["tokens"] == [atlas.tokenizer.decode([t]) for t in row["token_ids"]]
    assert row["coefficients"][row["peak_position"]] == pytest.approx(row["peak_coefficient"], rel=1e-3, abs=1e-4)
    manifest = json.loads((hf_export.path / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["export_format"] == "hf-dataset"


def test_parquet_streams_with_the_same_rows(hf_export) -> None:
    files = sorted(str(p) for p in (hf_export.path / "parquet").glob("*.parquet"))
    stream = datasets.load_dataset("parquet", data_files=files, split="train", streaming=True)
    streamed = [(r["layer"], r["key"], r["sign"], r["rank"], tuple(r["coefficients"])) for r in stream]
    disk = datasets.load_from_disk(str(hf_export.path / "dataset"))
    assert streamed == [(r["layer"], r["key"], r["sign"], r["rank"], tuple(r["coefficients"])) for r in disk]


def test_coefficients_equal_an_independent_recomputation(export_run_dir, hf_export) -> None:
    ds = datasets.load_from_disk(str(hf_export.path / "dataset"))
    lens = MemoryLens(load_model(json.loads((export_run_dir / "manifest.json").read_text())["config"]["model"]))
    bos = lens.adapter.bos_token_id
    for i in range(0, ds.num_rows, max(1, ds.num_rows // 12)):  # 12 rows spread over layers, keys and signs
        row = ds[i]
        tokens = torch.tensor([[bos, *row["token_ids"]]])
        m = lens.coefficients(tokens, layers=[row["layer"]])[row["layer"]][0, 1:, row["key"]]
        got = torch.tensor(row["coefficients"])
        assert torch.allclose(got, m.float(), rtol=1e-4, atol=1e-6), (i, (got - m).abs().max())
