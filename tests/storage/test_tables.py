"""write_table and library_versions: the tables and version records of every folder the program writes."""

import pandas as pd

from ffkv_lens.storage.tables import library_versions, write_table


def test_tables_round_trip_tokens_with_carriage_returns_and_commas(tmp_path) -> None:
    frame = pd.DataFrame({"token": ["\r", "a,b", '"q"', None, "\n"], "rate": [0.5, None, 1.0, 2.0, 3.0]})
    write_table(frame, tmp_path / "t")
    back = pd.read_csv(tmp_path / "t.csv")
    assert len(back) == 5 and back["token"].tolist()[:3] == ["\r", "a,b", '"q"'] and back["token"].isna()[3]
    assert back["token"][4] == "\n" and back["rate"].isna().tolist() == [False, True, False, False, False]


def test_library_versions_names_every_package_that_changes_results() -> None:
    versions = library_versions()
    assert list(versions) == ["ffkv-lens", "transformer-lens", "torch", "transformers"]
    assert all(isinstance(v, str) and v for v in versions.values())
