"""Checks of a saved trigger atlas and value projection read back from disk (``load``).

A folder may be truncated or edited by hand, so nothing in it is trusted: the manifest's fields
have the right types and ranges, the tensors have the shapes and dtypes the manifest implies, and
every stored example points at a stored unit and a position inside it. Any violation is a
one-line :class:`~ffkv_lens.errors.DamagedFileError` naming the file.
"""

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ffkv_lens.errors import DamagedFileError
from ffkv_lens.storage.reading import check_tensor, field, int_list, short

__all__ = [
    "ATLAS_FIX",
    "VALUES_FIX",
    "AtlasShape",
    "check_manifest",
    "check_references",
    "check_stats",
    "check_stats_manifest",
    "check_tables",
    "check_units",
    "check_values_manifest",
    "check_values_tensors",
    "target_key",
]

ATLAS_FIX = "the atlas is damaged: restore the folder or search again (re-run `ffkv-lens run`)"
_FIELDS = ("values", "units", "positions")
_VALUE_FIELDS = ("top_ids", "top_logits", "bottom_ids", "bottom_logits", "max_prob")
_UNIT_FIELDS = ("unit_ids", "doc_ids", "offsets", "tokens")


class AtlasShape:
    """What a valid atlas manifest promises: layers, k, signed, and the model layout (if recorded)."""

    def __init__(self, layers: list[int], k: int, signed: bool, d_mlp: int | None, d_vocab: int | None) -> None:
        self.layers, self.k, self.signed, self.d_mlp, self.d_vocab = layers, k, signed, d_mlp, d_vocab


def check_manifest(manifest: Any, path: Path) -> AtlasShape:
    """The checked fields of an atlas ``manifest.json`` (``path``), or :class:`DamagedFileError`."""
    fix = ATLAS_FIX
    layers = int_list(manifest, "layers", path, fix=fix)
    if not layers:
        raise DamagedFileError(f"{path}: 'layers' is empty; {fix}.")
    settings = field(manifest, "settings", dict, path, fix=fix)
    k = field(settings, "settings.k", int, path, low=1, fix=fix)
    signed = field(settings, "settings.signed", bool, path, fix=fix)
    layout = field(manifest, "model_layout", dict, path, optional=True, fix=fix) or {}
    d_mlp = field(layout, "model_layout.d_mlp", int, path, low=1, optional=True, fix=fix)
    d_vocab = field(layout, "model_layout.d_vocab", int, path, low=1, optional=True, fix=fix)
    n_layers = field(layout, "model_layout.n_layers", int, path, low=1, optional=True, fix=fix)
    if n_layers is not None and max(layers) >= n_layers:
        raise DamagedFileError(f"{path}: layer {max(layers)} is outside the model's {n_layers} layers; {fix}.")
    for name in ("model", "tokenizer_fingerprint"):
        field(manifest, name, str, path, optional=True, fix=fix)
    progress = field(manifest, "progress", dict, path, optional=True, fix=fix) or {}
    for name in ("units", "tokens", "batches"):
        field(progress, f"progress.{name}", int, path, low=0, optional=True, fix=fix)
    return AtlasShape(layers, k, signed, d_mlp, d_vocab)


def check_tables(tensors: dict[str, Tensor], shape: AtlasShape, path: Path) -> int:
    """Check every layer's ``[d_mlp, k]`` values, units and positions in ``atlas.safetensors``; returns d_mlp."""
    d_mlp = shape.d_mlp
    for prefix in ("top", "bottom") if shape.signed else ("top",):
        for layer in shape.layers:
            for name in _FIELDS:
                kind = "float" if name == "values" else "int"
                tensor = check_tensor(tensors, f"{prefix}.{layer}.{name}", path, shape=(d_mlp, shape.k), kind=kind,
                                      fix=ATLAS_FIX)  # fmt: skip
                d_mlp = int(tensor.shape[0])
    if "corpus.next_token_counts" in tensors:
        check_tensor(tensors, "corpus.next_token_counts", path, shape=(shape.d_vocab,), kind="int", fix=ATLAS_FIX)
    return int(d_mlp)


def check_units(tensors: dict[str, Tensor], path: Path, d_vocab: int | None) -> dict[str, Tensor]:
    """The four ragged-array tensors of ``units.safetensors``, checked to be consistent."""
    fix = ATLAS_FIX
    parts = {name: check_tensor(tensors, name, path, shape=(None,), kind="int", fix=fix) for name in _UNIT_FIELDS}
    ids, offsets, tokens = parts["unit_ids"].long(), parts["offsets"].long(), parts["tokens"].long()
    n = ids.numel()
    if parts["doc_ids"].numel() != n or offsets.numel() != n + 1:
        raise DamagedFileError(
            f"{path}: {n} unit_ids need {n} doc_ids and {n + 1} offsets, found {parts['doc_ids'].numel()} and "
            f"{offsets.numel()}; {fix}."
        )
    if int(offsets[0]) != 0 or int(offsets[-1]) != tokens.numel() or bool((offsets.diff() < 0).any()):
        raise DamagedFileError(f"{path}: offsets do not run from 0 up to the {tokens.numel()} tokens; {fix}.")
    if n and (bool((ids.diff() <= 0).any()) or int(ids[0]) < 0):
        raise DamagedFileError(f"{path}: unit_ids are not distinct, ascending and >= 0; {fix}.")
    if tokens.numel() and (int(tokens.min()) < 0 or (d_vocab is not None and int(tokens.max()) >= d_vocab)):
        raise DamagedFileError(f"{path}: token ids fall outside the vocabulary (0 to {d_vocab}); {fix}.")
    return {name: parts[name].long() for name in _UNIT_FIELDS}


def check_references(tables: dict[int, Any], units: dict[str, Tensor], path: Path) -> None:
    """Every example's unit is stored (or -1: empty slot) and its position lies within that unit (or -1)."""
    ids, offsets = units["unit_ids"], units["offsets"]
    lengths = offsets.diff()
    for layer, table in tables.items():
        used = table.units.long()
        valid = used >= 0
        row = torch.searchsorted(ids, used.clamp_min(0))
        found = row < ids.numel()
        found[found.clone()] = ids[row[found]] == used[found]
        if bool((valid & ~found).any()) or bool((used < -1).any()):
            bad = int(used[(valid & ~found) | (used < -1)][0])
            raise DamagedFileError(f"{path}: layer {layer} refers to unit {bad}, which is not stored; {ATLAS_FIX}.")
        length = lengths[row.clamp_max(max(ids.numel() - 1, 0))] if ids.numel() else torch.zeros_like(used)
        length = torch.where(valid, length, 0)
        pos = table.positions.long()
        out = valid & ((pos < -1) | (pos >= length))
        if bool(out.any()):
            raise DamagedFileError(
                f"{path}: layer {layer} has position {int(pos[out][0])} outside its unit of {int(length[out][0])} "
                f"tokens; {ATLAS_FIX}."
            )


VALUES_FIX = "the value projection is damaged: restore the folder or re-run the values step (`ffkv-lens run`)"


def check_values_manifest(manifest: dict[str, Any], path: Path) -> tuple[list[int], dict[str, Any]]:
    """The layers and settings of a value projection's ``manifest.json``, checked."""
    layers = int_list(manifest, "layers", path, fix=VALUES_FIX)
    settings = field(manifest, "settings", dict, path, fix=VALUES_FIX)
    for name in ("top_k", "d_mlp", "d_vocab"):
        field(settings, f"settings.{name}", int, path, low=1, fix=VALUES_FIX)
    field(settings, "settings.chunk_memories", int, path, low=1, optional=True, fix=VALUES_FIX)
    field(settings, "settings.value_readout_mode", str, path, optional=True, fix=VALUES_FIX)
    return layers, settings


def check_values_tensors(tensors: dict[str, Tensor], layers: list[int], settings: dict[str, Any], path: Path) -> dict:
    """``{field: {layer: tensor}}`` of ``projection.safetensors``: shapes, dtypes and token ids checked."""
    d_mlp, k, d_vocab = settings["d_mlp"], settings["top_k"], settings["d_vocab"]
    parts: dict[str, dict[int, Tensor]] = {name: {} for name in _VALUE_FIELDS}
    for name in _VALUE_FIELDS:
        shape, kind = ((d_mlp,), "float") if name == "max_prob" else ((d_mlp, k), "int" if "ids" in name else "float")
        for layer in layers:
            parts[name][layer] = check_tensor(tensors, f"{name}.{layer}", path, shape=shape, kind=kind, fix=VALUES_FIX)
            if kind == "int" and ((t := parts[name][layer]).min() < 0 or t.max() >= d_vocab):
                raise DamagedFileError(
                    f"{path}: {name}.{layer} holds token ids outside 0 to {d_vocab - 1}; {VALUES_FIX}."
                )
    return parts


def target_key(key: str, layers: list[int], path: Path) -> tuple[int, int]:
    """``(sign, layer)`` of a ``target_ranks.<sign>.<layer>`` tensor name, or :class:`DamagedFileError`."""
    pieces = key.split(".")
    if len(pieces) != 3 or pieces[1] not in ("1", "-1") or not pieces[2].isdigit() or int(pieces[2]) not in layers:
        raise DamagedFileError(f"{path} holds an unexpected tensor {short(key)}; {VALUES_FIX}.")
    return int(pieces[1]), int(pieces[2])


_STATS_FIELDS = {  # field -> (shape suffix after d_mlp: "" | "bins" | "2" | "G" | "GR", kind)
    "count": ("one", "int"), "sums": ("", "float"), "squares": ("", "float"), "active": ("", "int"),
    "minimum": ("", "float"), "maximum": ("", "float"), "hist": ("bins", "int"), "outside": ("2", "int"),
    "group_lo": ("G", "float"), "group_hi": ("G", "float"), "group_count": ("G", "int"),
    "sample_units": ("GR", "int"), "sample_positions": ("GR", "int"), "sample_values": ("GR", "float"),
}  # fmt: skip


def check_stats_manifest(stats: Any, layers: list[int], path: Path) -> dict[int, tuple[float, float]]:
    """The checked ``manifest["stats"]`` settings; returns each layer's histogram range ``(lo, hi)``."""
    fix = ATLAS_FIX
    for name in ("histogram_bins", "quantile_groups", "quantile_samples"):
        field(stats, f"stats.{name}", int, path, low=1, fix=fix)
    field(stats, "stats.density_threshold", float, path, low=0, fix=fix)
    field(stats, "stats.quadrants", bool, path, fix=fix)
    ranges = field(stats, "stats.ranges", dict, path, fix=fix)
    out = {}
    for layer in layers:
        pair = ranges.get(str(layer))
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, (int, float)) for v in pair)):
            raise DamagedFileError(f"{path}: stats.ranges lacks layer {layer} as [lo, hi]; {fix}.")
        if not pair[0] < pair[1]:
            raise DamagedFileError(f"{path}: stats.ranges of layer {layer} is {pair}, not lo < hi; {fix}.")
        out[layer] = (float(pair[0]), float(pair[1]))
    return out


def check_stats(tensors: dict[str, Tensor], stats: dict[str, Any], layers: list[int], d_mlp: int, path: Path,
                units: dict[str, Tensor]) -> dict[int, dict[str, Tensor]]:  # fmt: skip
    """``{layer: {field: tensor}}`` of ``stats.safetensors``: shapes, dtypes, counts and sample references."""
    bins, groups, samples = stats["histogram_bins"], stats["quantile_groups"], stats["quantile_samples"]
    dims = {"one": (1,), "": (d_mlp,), "bins": (d_mlp, bins), "2": (d_mlp, 2), "G": (d_mlp, groups),
            "GR": (d_mlp, groups, samples)}  # fmt: skip
    out = {}
    for layer in layers:
        parts = {name: check_tensor(tensors, f"{layer}.{name}", path, shape=dims[suffix], kind=kind, fix=ATLAS_FIX)
                 for name, (suffix, kind) in _STATS_FIELDS.items()}  # fmt: skip
        count = int(parts["count"][0])
        counted = parts["hist"].sum(1)
        if count < 0 or bool((counted != count).any()) or bool((parts["group_count"].sum(1) != count).any()):
            raise DamagedFileError(
                f"{path}: layer {layer}'s histograms or groups do not add up to its {count} positions; {ATLAS_FIX}."
            )
        if bool((parts["active"] < 0).any() | (parts["active"] > count).any()):
            raise DamagedFileError(f"{path}: layer {layer} has active counts outside 0 to {count}; {ATLAS_FIX}.")
        table = _Samples(parts["sample_units"].reshape(d_mlp, -1), parts["sample_positions"].reshape(d_mlp, -1))
        check_references({layer: table}, units, path)
        if stats.get("quadrants"):
            parts.update(_check_quadrants(tensors, layer, parts["active"], stats, path, units))
        out[layer] = parts
    return out


def _check_quadrants(tensors: dict[str, Tensor], layer: int, active: Tensor, stats: dict[str, Any], path: Path,
                     units: dict[str, Tensor]) -> dict[str, Tensor]:  # fmt: skip
    """The quadrant tensors of one layer: shapes, counts adding up to the active counts, example references."""
    d_mlp, k = active.shape[0], field(stats, "stats.quadrant_examples", int, path, low=1, fix=ATLAS_FIX)
    parts = {"quadrant_counts": check_tensor(tensors, f"{layer}.quadrant_counts", path, shape=(d_mlp, 4), kind="int",
                                             fix=ATLAS_FIX)}  # fmt: skip
    for name, kind in (("quadrant_units", "int"), ("quadrant_positions", "int"), ("quadrant_values", "float")):
        parts[name] = check_tensor(tensors, f"{layer}.{name}", path, shape=(d_mlp, 4, k), kind=kind, fix=ATLAS_FIX)
    if bool((parts["quadrant_counts"] < 0).any()) or not torch.equal(parts["quadrant_counts"].sum(1), active):
        raise DamagedFileError(
            f"{path}: layer {layer}'s quadrant counts do not add up to its active counts; {ATLAS_FIX}."
        )
    table = _Samples(parts["quadrant_units"].reshape(d_mlp, -1), parts["quadrant_positions"].reshape(d_mlp, -1))
    check_references({layer: table}, units, path)
    return parts


class _Samples:
    """Sampled examples as a table for :func:`check_references`."""

    def __init__(self, units: Tensor, positions: Tensor) -> None:
        self.units, self.positions = units, positions
