"""The completion marker of a converted embedded model: what it records and how a slot is read.

``ffkv_lens_complete.json`` is written last into a conversion folder. It records the model
name, the source GGUF file (path, size, mtime in nanoseconds, sha256), the converter format
and the versions of the packages involved; :mod:`ffkv_lens.models.cache` checks it on every load.
"""

import hashlib
import importlib.metadata
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from ffkv_lens.errors import ModelConversionError

__all__ = [
    "CACHE_ENV_VAR",
    "MARKER_NAME",
    "foreign_slot_error",
    "installed_version",
    "read_marker",
    "sha256_file",
    "source_matches",
    "write_marker",
]

MARKER_NAME = "ffkv_lens_complete.json"
CACHE_ENV_VAR = "FFKV_LENS_CACHE"


def foreign_slot_error(folder: Path, what: str) -> ModelConversionError:
    """The one-line refusal for a cache slot that holds something ffkv_lens must not replace."""
    return ModelConversionError(
        f"The model cache slot {folder} {what}, so ffkv_lens will not replace it. Move it away (or point "
        f"{CACHE_ENV_VAR} at another folder) and run again."
    )


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The completion marker of a slot, ``{}`` when it is damaged, ``None`` when the slot is empty.

    Raises:
        ModelConversionError: If the slot holds something ffkv_lens did not write.
    """
    if not os.path.lexists(folder):
        return None
    if folder.is_symlink() or not folder.is_dir():
        raise foreign_slot_error(folder, "is not a folder ffkv_lens wrote")
    try:
        marker = json.loads((folder / MARKER_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise foreign_slot_error(folder, f"has no {MARKER_NAME}: it is not a conversion ffkv_lens wrote") from None
    except (OSError, ValueError):  # our marker, damaged: the folder is ours, convert again
        return {}
    return marker if isinstance(marker, dict) else {}


def installed_version(distribution: str) -> str | None:
    """The installed version of a distribution (its PyPI name), ``None`` when it is not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def source_matches(source: dict[str, Any], gguf_path: Path) -> bool:
    """Size and mtime as recorded; a file that was only touched (same size) is compared by sha256."""
    try:
        stat = gguf_path.stat()
    except OSError:
        return False
    if stat.st_size != source.get("size"):
        return False
    if stat.st_mtime_ns == source.get("mtime_ns"):
        return True
    return source.get("sha256") == sha256_file(gguf_path)


def write_marker(folder: Path, entry: Any, gguf_path: Path, seconds: float, format_version: int) -> None:
    """Write the completion marker of a conversion of ``entry`` (an ``EmbeddedModel``) into ``folder``."""
    stat = gguf_path.stat()
    versions = {}
    for distribution in ("ffkv-lens", "transformers", "torch", "gguf", entry.distribution):
        versions[distribution] = installed_version(distribution) or getattr(  # e.g. run from a source checkout
            sys.modules.get(distribution.replace("-", "_")), "__version__", None
        )
    source = {
        "path": str(gguf_path),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "sha256": sha256_file(gguf_path),
    }
    marker = {
        "format": format_version,
        "name": entry.name,
        "source": source,
        "versions": versions,
        "seconds": round(seconds, 1),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (folder / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")
