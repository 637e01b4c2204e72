"""``--format hf-dataset``: the trigger examples as a Hugging Face ``datasets`` dataset (save_to_disk + Parquet).

One row per trigger example (top-k, and bottom-k on signed runs): :data:`COLUMNS`. Written twice:
``dataset/`` by ``Dataset.save_to_disk`` (``datasets.load_from_disk``) and ``parquet/layer-L.parquet``,
one file per layer, streamed as they are computed (``load_dataset("parquet", data_files=...,
streaming=True)``). See docs/exports.md.
"""

from pathlib import Path
from typing import Any

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


def layer_table(source: ExportSource, examples: LayerExamples) -> Any:
    """The rows of one layer as a pyarrow Table of :func:`_schema`."""
    import pyarrow as pa

    frame = examples.frame
    values = {key: source.value_tokens(examples.layer, key) for key in sorted(set(frame["key"].tolist()))}
    columns: dict[str, list[Any]] = {name: [] for name in COLUMNS}
    rows = zip(frame.itertuples(index=False), examples.tokens, examples.coefficients, strict=True)
    for row, tokens, coefficients in rows:
        position = int(row.position)
        nxt = tokens[position + 1] if position + 1 < len(tokens) else None
        value = values[int(row.key)]
        items = (
            examples.layer, int(row.key), int(row.sign), int(row.rank), int(row.unit_id), int(row.doc_id), tokens,
            source.unit(int(row.unit_id))[1], coefficients, position, float(row.coefficient),
            None if nxt is None else source.decode([nxt])[0], nxt, value["top_tokens"], value["top_logits"],
        )  # fmt: skip
        for name, item in zip(COLUMNS, items, strict=True):
            columns[name].append(item)
    return pa.table(columns, schema=_schema())


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
    tables, files = [], []
    with atomic_folder(out / PARQUET) as folder:
        for examples in source.examples(kinds=kinds, progress=progress):
            table = layer_table(source, examples)
            name = f"layer-{examples.layer}.parquet"
            pq.write_table(table, folder / name)
            tables.append(table)
            files.append(name)
    dataset = datasets.Dataset(pa.concat_tables(tables) if tables else _schema().empty_table())
    with atomic_folder(out / DATASET) as folder:
        dataset.save_to_disk(str(folder))
    return {"rows": dataset.num_rows, "parquet": [f"{PARQUET}/{name}" for name in files], "dataset": DATASET}
