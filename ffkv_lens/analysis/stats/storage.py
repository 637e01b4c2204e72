"""The statistics inside an atlas folder: ``stats.safetensors`` (``<layer>.<field>``) plus ``manifest["stats"]``."""

from pathlib import Path
from typing import Any

from torch import Tensor

from ffkv_lens.analysis.stats.tables import LayerStats

__all__ = ["STATS_FILE", "load_stats", "save_stats"]

STATS_FILE = "stats.safetensors"


def save_stats(folder: Path, stats: dict[int, LayerStats]) -> None:
    """Write every layer's statistics to ``folder/stats.safetensors``."""
    from safetensors.torch import save_file

    tensors: dict[str, Tensor] = {}
    for layer, table in stats.items():
        tensors.update(table.tensors(layer))
    save_file(tensors, str(folder / STATS_FILE))


def load_stats(
    folder: Path, manifest: dict[str, Any], layers: list[int], d_mlp: int, units: dict[str, Tensor]
) -> dict[int, LayerStats] | None:
    """The checked statistics of an atlas folder, or None when it was searched with ``stats=False``.

    Raises:
        DamagedFileError: The manifest's statistics settings or ``stats.safetensors`` are missing, damaged
            or inconsistent (shapes, dtypes, counts, samples pointing outside the stored units).
    """
    from ffkv_lens.analysis import checks
    from ffkv_lens.storage.reading import field, load_tensors

    path = folder / "manifest.json"
    stats = field(manifest, "stats", dict, path, optional=True, fix=checks.ATLAS_FIX)
    if stats is None or not field(stats, "stats.stats", bool, path, fix=checks.ATLAS_FIX):
        return None
    checks.check_stats_manifest(stats, layers, path)
    tensors = load_tensors(folder / STATS_FILE, fix=checks.ATLAS_FIX)
    parts = checks.check_stats(tensors, stats, layers, d_mlp, folder / STATS_FILE, units)
    return {layer: LayerStats(**fields) for layer, fields in parts.items()}
