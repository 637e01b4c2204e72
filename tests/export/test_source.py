"""The examples an export reads: quantile rows read in bulk equal the atlas's own per-key API."""

import pandas as pd

from ffkv_lens.export.source import ExportSource


def test_quantile_rows_equal_the_atlas_api(export_run_dir) -> None:
    source = ExportSource(export_run_dir, stats=True)
    columns = ["key", "group", "group_lo", "group_hi", "group_share", "unit_id", "doc_id", "position", "coefficient"]
    for layer in source.layers:
        bulk = source.frame(layer, kinds=("quantile",))
        api = pd.concat([source.atlas.quantile_examples(layer, k).assign(key=k) for k in range(source.d_mlp)])
        assert len(bulk) == len(api) > 0
        pd.testing.assert_frame_equal(
            bulk[columns].reset_index(drop=True), api[columns].reset_index(drop=True), check_dtype=False
        )
