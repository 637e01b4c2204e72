"""Checkpoints of a trigger search: written atomically, resumed only with the same settings.

A checkpoint is ``<dir>/checkpoint/`` holding ``state.safetensors`` (every top-k table and the
tokens of referenced units) and ``progress.json`` (how far the search got and the identity of
the search: settings, corpus fingerprint, model). It is replaced as a whole by a rename, so a
run killed at any moment (even SIGKILL) leaves either the previous checkpoint or the new one.
"""

import json
from pathlib import Path
from typing import Any

from torch import Tensor

from ffkv_lens.analysis.atlas import UnitStore
from ffkv_lens.analysis.checks import check_units
from ffkv_lens.distributed import World
from ffkv_lens.errors import CheckpointMismatchError
from ffkv_lens.kernels import TopKState
from ffkv_lens.storage import atomic_folder, read_json
from ffkv_lens.storage.reading import check_tensor, field, load_tensors

__all__ = ["rank_checkpoint_dir", "read_checkpoint", "write_checkpoint"]

_FIELDS = ("values", "units", "positions")


def write_checkpoint(folder: Path, search: Any) -> None:  # a TriggerSearch (which imports this module)
    """Write ``search``'s state to ``folder/checkpoint`` atomically."""
    from safetensors.torch import save_file

    tensors = {}
    for prefix, tables in (("top", search.top), ("bottom", search.bottom or {})):
        for layer, state in tables.items():
            for name in _FIELDS:
                tensors[f"{prefix}.{layer}.{name}"] = getattr(state, name).detach().contiguous().cpu()
    units = UnitStore.from_units(search._units)
    tensors.update({f"units.{name}": t.contiguous() for name, t in units.tensors().items()})
    tensors["corpus.next_token_counts"] = search.next_token_counts.contiguous()
    stats = search.memory_stats
    if stats is not None:
        tensors.update(stats.tensors())
    progress = search.progress
    record = {
        "identity": search.identity(),
        "progress": {"units": progress.units, "tokens": progress.tokens, "batches": progress.batches},
        "seconds": progress.seconds,
        "has_bos": search._has_bos,
        "stats_ranges": None if stats is None else stats.describe()["ranges"],
    }
    with atomic_folder(folder / "checkpoint") as tmp:
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "progress.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def read_checkpoint(folder: Path, search: Any) -> bool:  # a TriggerSearch (which imports this module)
    """Restore ``search`` from ``folder/checkpoint``; False when there is none.

    Raises:
        CheckpointMismatchError: If the checkpoint was written by a search with other settings,
            another corpus or another model; the message lists what differs.
        DamagedFileError: ``progress.json`` or ``state.safetensors`` is truncated, of the wrong types or
            shapes, or missing.
    """
    path = folder / "checkpoint"
    if not (path / "progress.json").exists():
        return False
    record = read_json(path / "progress.json")
    counts = _check_record(record, path / "progress.json")
    _check_identity(record["identity"], search.identity(), folder)
    file = path / "state.safetensors"
    tensors = load_tensors(file, device=str(search.adapter.device), fix=_FIX)
    for prefix, tables in (("top", search.top), ("bottom", search.bottom or {})):
        for layer, state in tables.items():
            tables[layer] = TopKState(*(_like(tensors, f"{prefix}.{layer}.{name}", getattr(state, name), file)
                                        for name in _FIELDS))  # fmt: skip
    stored = {name: tensors[f"units.{name}"].cpu() for name in _UNITS if f"units.{name}" in tensors}
    parts = check_units(stored, file, None)
    units = UnitStore(**parts)
    search._units = {int(u): units.get(int(u)) for u in units.unit_ids.tolist()}
    counts_now = search.next_token_counts
    search.next_token_counts = _like(tensors, "corpus.next_token_counts", counts_now, file).cpu()
    search.progress.units, search.progress.tokens, search.progress.batches = counts
    search.progress.seconds = float(record["seconds"])
    search._has_bos = record["has_bos"]
    if search.memory_stats is not None:
        search.memory_stats.ranges = _ranges(record, search.layers, path / "progress.json")
        search.memory_stats.restore(tensors, lambda t, name, current: _like(t, name, current, file))
    return True


def _ranges(record: dict[str, Any], layers: list[int], path: Path) -> dict[int, tuple[float, float]]:
    """Each layer's histogram range as the checkpoint recorded it (calibrated before its first batch)."""
    from ffkv_lens.analysis.checks import check_stats_manifest

    return check_stats_manifest(
        {"histogram_bins": 1, "quantile_groups": 1, "quantile_samples": 1, "density_threshold": 0.0,
         "quadrants": False, "ranges": field(record, "stats_ranges", dict, path, fix=_FIX)},
        layers, path,
    )  # fmt: skip


_FIX = "the checkpoint is damaged: delete its checkpoint/ folder to start the search afresh"
_UNITS = ("unit_ids", "doc_ids", "offsets", "tokens")


def _check_record(record: Any, path: Path) -> tuple[int, int, int]:
    field(record, "identity", dict, path, fix=_FIX)
    progress = field(record, "progress", dict, path, fix=_FIX)
    counts = tuple(field(progress, f"progress.{n}", int, path, low=0, fix=_FIX) for n in ("units", "tokens", "batches"))
    field(record, "seconds", float, path, low=0, fix=_FIX)
    field(record, "has_bos", bool, path, fix=_FIX)
    return counts  # type: ignore[return-value]


def _like(tensors: dict[str, Tensor], name: str, current: Tensor, path: Path) -> Tensor:
    """``tensors[name]``, checked to have the shape and kind (float or integer) of what the search holds now."""
    kind = "float" if current.dtype.is_floating_point else "int"
    return check_tensor(tensors, name, path, shape=tuple(current.shape), kind=kind, fix=_FIX)


def _check_identity(saved: dict[str, Any], current: dict[str, Any], folder: Path) -> None:
    diffs = []
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            diffs.append(f"{key}: checkpoint {saved.get(key)!r} vs now {current.get(key)!r}")
    if diffs:
        raise CheckpointMismatchError(
            f"The checkpoint in {folder} was written by a different search; differing: {'; '.join(diffs)}. "
            "Use the same arguments to resume, or another checkpoint_dir to start afresh."
        )


def rank_checkpoint_dir(checkpoint_dir: str | Path, here: World) -> Path:
    """This rank's checkpoint folder; refuses a folder written by a run of another world size.

    A single process uses ``checkpoint_dir`` itself; rank ``r`` of ``n`` uses
    ``checkpoint_dir/rank{r}-of-{n}``.
    """
    root = Path(checkpoint_dir)
    mine = root / f"rank{here.rank}-of-{here.size}" if here.distributed else root
    found = {p.name.split("-of-")[1] for p in root.glob("rank*-of-*") if (p / "checkpoint").exists()}
    if (root / "checkpoint").exists():
        found.add("1")
    others = sorted(found - {str(here.size)})
    if others:
        raise CheckpointMismatchError(
            f"{root} holds checkpoints of a run with {' and '.join(others)} process(es); this run has {here.size}. "
            f"Resume with the same number of processes (torchrun --nproc-per-node {others[0]}), or use another "
            "checkpoint folder (or --force) to start afresh."
        )
    return mine
