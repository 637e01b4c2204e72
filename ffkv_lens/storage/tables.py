"""Tables and version records as every writer of a run or comparison folder stores them.

:func:`write_table` writes a DataFrame as ``NAME.csv`` (text fields quoted) and, when small, as
``NAME.json`` records; :func:`library_versions` is the ``versions`` entry of every manifest.

Example:
    >>> import tempfile, pathlib, pandas as pd
    >>> from ffkv_lens.storage.tables import write_table
    >>> stem = pathlib.Path(tempfile.mkdtemp()) / "t"
    >>> write_table(pd.DataFrame({"layer": [0, 1]}), stem)
    >>> sorted(p.name for p in stem.parent.iterdir())
    ['t.csv', 't.json']
"""

import csv
from pathlib import Path
from typing import Any

from ffkv_lens.storage.atomic import atomic_write_bytes

__all__ = ["JSON_ROWS", "VERSIONED_PACKAGES", "library_versions", "write_table"]

JSON_ROWS = 10_000  # tables up to this many rows are also written as JSON records
VERSIONED_PACKAGES = ("ffkv-lens", "transformer-lens", "torch", "transformers")  # packages that change results


def write_table(frame: Any, path: Path) -> None:
    """Write a DataFrame atomically as CSV (and JSON records when small).

    Args:
        frame: The table.
        path: The file's path without suffix (``tables/agreement_per_layer``).
    """
    path = Path(path)
    # Text fields quoted: a decoded token may be "\r" or hold commas, which unquoted would split rows.
    text = frame.to_csv(index=False, quoting=csv.QUOTE_NONNUMERIC)
    atomic_write_bytes(path.with_suffix(".csv"), text.encode("utf-8"))
    if len(frame) <= JSON_ROWS:
        atomic_write_bytes(path.with_suffix(".json"), frame.to_json(orient="records", indent=1).encode("utf-8"))


def library_versions() -> dict[str, str]:
    """Versions of the packages that change results (recorded in every manifest)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in VERSIONED_PACKAGES:
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "not installed"
    return out
