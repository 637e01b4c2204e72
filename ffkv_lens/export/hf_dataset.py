"""``--format hf-dataset``: the trigger examples as a Hugging Face ``datasets`` dataset (save_to_disk + Parquet).

One row per trigger example (top-k, and bottom-k on signed runs): :data:`COLUMNS`. Written twice:
``dataset/`` by ``Dataset.save_to_disk`` (``datasets.load_from_disk``) and ``parquet/layer-L.parquet``,
one file per layer, streamed as they are computed (``load_dataset("parquet", data_files=...,
streaming=True)``). See docs/exports.md.
"""

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ffkv_lens.errors import ConfigError
from ffkv_lens.export.source import ExportSource, LayerExamples
from ffkv_lens.storage import atomic_folder

__all__ = ["COLUMNS", "DATASET", "PARQUET", "write_hf_dataset"]

DATASET = "dataset"  # the save_to_disk folder
PARQUET = "parquet"  # layer-L.parquet files
COLUMNS = (
    "layer", "key", "sign", "rank", "unit_id", "doc_id", "token_ids", "tokens", "coefficients", "peak_position",
    "peak_coefficient", "next_token", "next_token_id", "value_top_tokens", "value_top_logits",
)  # fmt: skip


def _schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            ("layer", pa.int32()),
            ("key", pa.int32()),
            ("sign", pa.int8()),
            ("rank", pa.int32()),
            ("unit_id", pa.int64()),
            ("doc_id", pa.int64()),
            ("token_ids", pa.list_(pa.int32())),
            ("tokens", pa.list_(pa.string())),
            ("coefficients", pa.list_(pa.float32())),
            ("peak_position", pa.int32()),
            ("peak_coefficient", pa.float32()),
            ("next_token", pa.string()),
            ("next_token_id", pa.int64()),
            ("value_top_tokens", pa.list_(pa.string())),
            ("value_top_logits", pa.list_(pa.float32())),
        ]
    )


def _lists(lengths: np.ndarray, values: Any) -> Any:
    """A pyarrow list array of consecutive runs of ``values`` (``lengths`` per row)."""
    import pyarrow as pa

    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def layer_table(source: ExportSource, examples: LayerExamples) -> Any:
    """The rows of one layer as a pyarrow Table of :func:`_schema`, built column by column."""
    import pyarrow as pa
    import pyarrow.compute as pc

    frame, n = examples.frame, len(examples.frame)
    lengths = np.fromiter((len(t) for t in examples.tokens), dtype=np.int64, count=n)
    flat_ids = np.fromiter((t for tokens in examples.tokens for t in tokens), dtype=np.int64, count=int(lengths.sum()))
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    position = frame["position"].to_numpy(dtype=np.int64)
    has_next = position + 1 < lengths
    next_ids = np.where(has_next, flat_ids[np.minimum(starts + position + 1, max(len(flat_ids) - 1, 0))], 0)
    keys = frame["key"].to_numpy(dtype=np.int64)
    p = source.projection
    top_ids = p.top_ids[examples.layer]
    top_strings = _lists(np.full(top_ids.shape[0], top_ids.shape[1]), source.vocabulary(top_ids.reshape(-1).numpy()))
    top_logits = _lists(np.full(top_ids.shape[0], top_ids.shape[1]), p.top_logits[examples.layer].reshape(-1).numpy())
    coefficients = np.concatenate(examples.coefficients) if n else np.empty(0, np.float32)
    schema = _schema()
    arrays = [
        pa.array(np.full(n, examples.layer, dtype=np.int32)),
        pa.array(keys.astype(np.int32)),
        pa.array(frame["sign"].to_numpy(dtype=np.int8)),
        pa.array(frame["rank"].to_numpy(dtype=np.int32)),
        pa.array(frame["unit_id"].to_numpy(dtype=np.int64)),
        pa.array(frame["doc_id"].to_numpy(dtype=np.int64)),
        _lists(lengths, pa.array(flat_ids.astype(np.int32))),
        _lists(lengths, source.vocabulary(flat_ids)),
        _lists(lengths, pa.array(coefficients.astype(np.float32))),
        pa.array(position.astype(np.int32)),
        pa.array(frame["coefficient"].to_numpy(dtype=np.float64).astype(np.float32)),
        pc.if_else(pa.array(has_next), source.vocabulary(next_ids), pa.scalar(None, pa.string())),
        pa.array(next_ids, mask=~has_next, type=pa.int64()),
        top_strings.take(pa.array(keys)),
        top_logits.cast(pa.list_(pa.float32())).take(pa.array(keys)),
    ]
    return pa.Table.from_arrays(
        [a.cast(f.type) if a.type != f.type else a for a, f in zip(arrays, schema, strict=True)], schema=schema
    )


def write_hf_dataset(source: ExportSource, out: Path, *, progress: bool = False) -> dict[str, Any]:
    """Write ``out/dataset`` and ``out/parquet``; returns what the export manifest records."""
    try:
        import datasets
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(
            "--format hf-dataset needs the `datasets` package, which is not installed: pip install 'ffkv-lens[export]'."
        ) from None
    kinds = ("top", "bottom") if source.atlas.signed else ("top",)
    files, rows = [], 0
    with atomic_folder(out / DATASET) as target, atomic_folder(out / PARQUET) as folder:
        staged = target / "rows" / "rows.arrow"  # each layer's table appended as it is done (memory: one layer)
        staged.parent.mkdir()
        with pa.OSFile(str(staged), "wb") as sink, pa.ipc.new_stream(sink, _schema()) as writer:
            for examples in source.examples(kinds=kinds, progress=progress):
                table = layer_table(source, examples)
                name = f"layer-{examples.layer}.parquet"
                pq.write_table(table, folder / name)
                writer.write_table(table)
                files.append(name)
                rows += table.num_rows
        dataset = datasets.Dataset.from_file(str(staged), in_memory=False)  # memory-mapped
        dataset.save_to_disk(str(target))
        del dataset
        shutil.rmtree(staged.parent)
    return {"rows": rows, "parquet": [f"{PARQUET}/{name}" for name in files], "dataset": DATASET}
