"""The trigger atlas: the top-k trigger examples of every key, and how to store them.

A trigger example of a key is a unit (the text the model saw as one sequence) cut at the
token where the key's coefficient peaks, plus the next token. The atlas keeps, per layer,
``[d_mlp, k]`` tensors of coefficients, unit ids and peak positions, the token ids of every
unit it references (so examples render and re-run without the corpus), and a manifest with
every setting that changes results.

On disk (``save``/``load``) an atlas is a folder with ``manifest.json``, ``atlas.safetensors``,
``units.safetensors`` and the tokenizer's own JSON files in ``tokenizer/``: nothing is pickled,
so loading an atlas from someone else runs no code.
"""

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from ffkv_lens.adapters import AdapterLike, as_adapter
from ffkv_lens.analysis.stats.frames import StatsViews
from ffkv_lens.analysis.stats.tables import LayerStats
from ffkv_lens.errors import AtlasMismatchError, ConfigError, DamagedFileError
from ffkv_lens.storage import atomic_folder, read_json
from ffkv_lens.storage.reading import load_tensors, short

__all__ = ["LayerTopK", "TriggerAtlas", "TriggerExample", "UnitStore", "tokenizer_fingerprint"]

FORMAT = "ffkv_lens.trigger_atlas/1"


@dataclass(frozen=True)
class TriggerExample:
    """One trigger example of a key.

    Attributes:
        unit_id: Global index of the unit in the corpus's unit stream.
        doc_id: Index of the document the unit came from.
        position: 0-based index of the peak token among the unit's own tokens (BOS not
            counted; -1 when the peak is the BOS itself, possible only with ``exclude_bos=False``).
        coefficient: The key's coefficient at the peak.
        prefix: Decoded text of the unit up to and including the peak token.
        next_token: Decoded token after the peak; ``None`` at the unit's end.
        next_token_id: Its id, or ``None``.
    """

    unit_id: int
    doc_id: int
    position: int
    coefficient: float
    prefix: str
    next_token: str | None
    next_token_id: int | None


@dataclass(frozen=True)
class LayerTopK:
    """Top-k of one layer in one direction, sorted best first (empty slots: unit -1)."""

    values: Float[Tensor, "d_mlp k"]
    units: Int[Tensor, "d_mlp k"]
    positions: Int[Tensor, "d_mlp k"]


class UnitStore:
    """Token ids of the units an atlas references, as one ragged array.

    Args:
        unit_ids: Sorted unit ids ``[n]``.
        doc_ids: Document of each unit ``[n]``.
        offsets: ``[n + 1]`` start of each unit's tokens in ``tokens``.
        tokens: Concatenated token ids (without BOS).
    """

    def __init__(self, unit_ids: Tensor, doc_ids: Tensor, offsets: Tensor, tokens: Tensor) -> None:
        self.unit_ids, self.doc_ids, self.offsets, self.tokens = unit_ids, doc_ids, offsets, tokens
        self._row = {int(u): i for i, u in enumerate(unit_ids.tolist())}

    @classmethod
    def from_units(cls, units: dict[int, tuple[int, list[int]]]) -> "UnitStore":
        """Build from ``{unit_id: (doc_id, token_ids)}``."""
        ids = sorted(units)
        lengths = [len(units[u][1]) for u in ids]
        offsets = torch.zeros(len(ids) + 1, dtype=torch.int64)
        offsets[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0) if ids else offsets[1:]
        flat = [t for u in ids for t in units[u][1]]
        return cls(
            torch.tensor(ids, dtype=torch.int64),
            torch.tensor([units[u][0] for u in ids], dtype=torch.int64),
            offsets,
            torch.tensor(flat, dtype=torch.int64),
        )

    def __len__(self) -> int:
        return len(self._row)

    def __contains__(self, unit_id: int) -> bool:
        return int(unit_id) in self._row

    def get(self, unit_id: int) -> tuple[int, list[int]]:
        """``(doc_id, token_ids)`` of a unit."""
        row = self._row[int(unit_id)]
        start, end = int(self.offsets[row]), int(self.offsets[row + 1])
        return int(self.doc_ids[row]), self.tokens[start:end].tolist()

    def doc_ids_of(self, unit_ids: Any) -> Any:
        """The document of each of ``unit_ids`` (stored units), as an int64 numpy array."""
        stored, wanted = self.unit_ids.numpy(), np.asarray(unit_ids, dtype=np.int64)
        rows = np.minimum(np.searchsorted(stored, wanted), max(len(stored) - 1, 0))
        if len(wanted) and (not len(stored) or not np.array_equal(stored[rows], wanted)):
            raise KeyError(f"units {sorted(set(wanted.tolist()) - set(stored.tolist()))[:5]} are not stored")
        return self.doc_ids.numpy()[rows].astype(np.int64)

    def tensors(self) -> dict[str, Tensor]:
        """The arrays, for safetensors."""
        return {"unit_ids": self.unit_ids, "doc_ids": self.doc_ids, "offsets": self.offsets, "tokens": self.tokens}


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A stable hash of a tokenizer's vocabulary (ids and strings)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


class TriggerAtlas(StatsViews):
    """Top-k trigger examples of every key of the searched layers, and the per-memory statistics.

    The statistics' methods (``stats``, ``histogram``, ``quantile_examples``...) come from
    :class:`~ffkv_lens.analysis.stats.frames.StatsViews` (docs/triggers.md, "Per-memory statistics").

    Args:
        top: ``{layer: LayerTopK}`` of the highest coefficients.
        bottom: ``{layer: LayerTopK}`` of the most negative coefficients (signed search), else None.
        units: Token ids of every referenced unit.
        manifest: Settings, model and corpus description (JSON-serialisable).
        tokenizer: Used to decode examples; may be None (then only ids are available).
        next_token_counts: ``[d_vocab]`` how often each token follows a searched position in
            the corpus (every unit token after the unit's first), for unigram baselines.
        memory_stats: ``{layer: LayerStats}`` per-memory statistics, or None (searched with ``stats=False``).
    """

    def __init__(
        self,
        top: dict[int, LayerTopK],
        bottom: dict[int, LayerTopK] | None,
        units: UnitStore,
        manifest: dict[str, Any],
        tokenizer: Any = None,
        next_token_counts: Int[Tensor, " d_vocab"] | None = None,
        memory_stats: dict[int, LayerStats] | None = None,
    ) -> None:
        self.top, self.bottom, self.units, self.manifest, self.tokenizer = top, bottom, units, manifest, tokenizer
        self.next_token_counts, self.memory_stats = next_token_counts, memory_stats

    def __repr__(self) -> str:
        return (
            f"TriggerAtlas(model={self.manifest.get('model')!r}, layers={len(self.layers)}, k={self.k}, "
            f"signed={self.signed}, units={len(self.units)})"
        )

    @property
    def layers(self) -> list[int]:
        """Searched layers, ascending."""
        return sorted(self.top)

    @property
    def k(self) -> int:
        """Examples kept per key and direction."""
        return int(self.manifest["settings"]["k"])

    @property
    def signed(self) -> bool:
        """Whether bottom-k (most negative) examples were kept too."""
        return self.bottom is not None

    @property
    def d_mlp(self) -> int:
        """Keys per layer."""
        return int(next(iter(self.top.values())).values.shape[0])

    def _table(self, layer: int, sign: int) -> LayerTopK:
        if sign not in (1, -1):
            raise ConfigError(f"sign={sign!r}; use 1 (top-k) or -1 (bottom-k, signed atlases only).")
        tables = self.top if sign == 1 else self.bottom
        if tables is None:
            raise ConfigError("sign=-1 needs an atlas searched with signed=True; this one was not.")
        if layer not in tables:
            raise ConfigError(f"layer={layer!r} was not searched; searched layers: {self.layers}.")
        return tables[layer]

    def examples(self, layer: int, key: int, *, sign: int = 1) -> list[TriggerExample]:
        """Trigger examples of one key, best first (for ``sign=-1``: most negative first)."""
        table = self._table(layer, sign)
        if not 0 <= key < table.values.shape[0]:
            raise ConfigError(f"key={key!r} is out of range for d_mlp={table.values.shape[0]}.")
        rows = zip(table.units[key].tolist(), table.positions[key].tolist(), table.values[key].tolist(), strict=True)
        return [self._example(unit, pos, value) for unit, pos, value in rows if unit >= 0]

    def _example(self, unit_id: int, position: int, value: float) -> TriggerExample:
        doc_id, tokens = self.units.get(unit_id)
        nxt = tokens[position + 1] if position + 1 < len(tokens) else None
        decode = self._decode
        return TriggerExample(
            unit_id=unit_id,
            doc_id=doc_id,
            position=position,
            coefficient=value,
            prefix=decode(tokens[: position + 1]),
            next_token=None if nxt is None else decode([nxt]),
            next_token_id=nxt,
        )

    def prefix_parts(self, example: TriggerExample) -> tuple[str, str]:
        """``(text before the peak token, the peak token)`` of an example, to highlight the peak.

        The two pieces concatenate to ``example.prefix`` whenever decoding the shorter prefix gives
        a prefix of it (byte-level and SentencePiece tokenizers); otherwise the peak token is
        decoded alone. A peak on the BOS (``position == -1``) gives ``("", "")``.
        """
        if example.position < 0:
            return "", ""
        _, tokens = self.units.get(example.unit_id)
        before = self._decode(tokens[: example.position])
        if example.prefix.startswith(before):
            return before, example.prefix[len(before) :]
        return before, self._decode([tokens[example.position]])

    def _decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            raise ConfigError(
                "This atlas has no tokenizer to decode examples; pass tokenizer= to TriggerAtlas.load "
                "or save the atlas with its tokenizer."
            )
        return self.tokenizer.decode(ids)

    def to_pandas(self, *, layers: Iterable[int] | None = None, text: bool = True) -> Any:
        """One row per (layer, key, sign, rank) example; ``text=False`` skips decoding (fast)."""
        import pandas as pd

        frames = []
        for sign, tables in ((1, self.top), (-1, self.bottom)):
            for layer in layers if layers is not None else self.layers:
                if tables is None:
                    continue
                frames.append(self._layer_frame(layer, sign, self._table(layer, sign), text))
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def _layer_frame(self, layer: int, sign: int, table: LayerTopK, text: bool) -> Any:
        import pandas as pd

        d_mlp, k = table.units.shape
        frame = pd.DataFrame(
            {
                "layer": layer,
                "key": torch.arange(d_mlp).repeat_interleave(k).numpy(),
                "sign": sign,
                "rank": torch.arange(k).repeat(d_mlp).numpy(),
                "unit_id": table.units.reshape(-1).numpy(),
                "position": table.positions.reshape(-1).numpy(),
                "coefficient": table.values.reshape(-1).double().numpy(),
            }
        )
        frame = frame[frame["unit_id"] >= 0].reset_index(drop=True)
        frame["doc_id"] = self.units.doc_ids_of(frame["unit_id"].to_numpy())
        if text:
            examples = [
                self._example(u, p, c) for u, p, c in zip(frame.unit_id, frame.position, frame.coefficient, strict=True)
            ]
            frame["prefix"] = [e.prefix for e in examples]
            frame["next_token"] = [e.next_token for e in examples]
            frame["next_token_id"] = [e.next_token_id for e in examples]
        return frame

    # -- persistence -------------------------------------------------------------------------
    def tensors(self) -> dict[str, Tensor]:
        """All per-layer tables as named tensors."""
        out = {}
        for prefix, tables in (("top", self.top), ("bottom", self.bottom or {})):
            for layer, table in tables.items():
                for field in ("values", "units", "positions"):
                    out[f"{prefix}.{layer}.{field}"] = getattr(table, field).contiguous().cpu()
        if self.next_token_counts is not None:
            out["corpus.next_token_counts"] = self.next_token_counts.contiguous().cpu()
        return out

    def save(self, path: str | Path) -> Path:
        """Write the atlas to a folder atomically (safetensors + JSON + tokenizer JSON files)."""
        from safetensors.torch import save_file

        from ffkv_lens.analysis.stats.storage import save_stats

        with atomic_folder(path) as tmp:
            save_file(self.tensors(), str(tmp / "atlas.safetensors"))
            save_file({n: t.contiguous() for n, t in self.units.tensors().items()}, str(tmp / "units.safetensors"))
            if self.memory_stats is not None:
                save_stats(tmp, self.memory_stats)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(str(tmp / "tokenizer"))
            manifest = dict(self.manifest, format=FORMAT, layers=self.layers)
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, *, tokenizer: Any = None) -> "TriggerAtlas":
        """Load a saved atlas (no pickle); the saved tokenizer is used unless one is given.

        Raises:
            AtlasMismatchError: The folder holds another format.
            DamagedFileError: A file is missing or truncated, or its content contradicts the manifest
                (types, ranges, tensor shapes and dtypes, examples pointing outside the stored units).
        """
        from ffkv_lens.analysis import checks
        from ffkv_lens.analysis.stats.storage import load_stats

        path = Path(path)
        manifest = read_json(path / "manifest.json")
        if not isinstance(manifest, dict):
            raise DamagedFileError(
                f"{path / 'manifest.json'} holds {short(manifest)}, not a JSON object; {checks.ATLAS_FIX}."
            )
        if manifest.get("format") != FORMAT:
            raise AtlasMismatchError(
                f"{path / 'manifest.json'} has format {short(manifest.get('format'))}; this version reads "
                f"{FORMAT!r}: pass a folder written by this version of ffkv-lens."
            )
        shape = checks.check_manifest(manifest, path / "manifest.json")
        tensors = load_tensors(path / "atlas.safetensors", fix=checks.ATLAS_FIX)
        shape.d_mlp = checks.check_tables(tensors, shape, path / "atlas.safetensors")
        top = _tables(tensors, "top", shape.layers)
        bottom = _tables(tensors, "bottom", shape.layers) if shape.signed else None
        units_path = path / "units.safetensors"
        parts = checks.check_units(load_tensors(units_path, fix=checks.ATLAS_FIX), units_path, shape.d_vocab)
        for tables in (top, bottom or {}):
            checks.check_references(tables, parts, units_path)
        stats = load_stats(path, manifest, shape.layers, shape.d_mlp, parts)
        units = UnitStore(**parts)
        if tokenizer is None and (path / "tokenizer").is_dir():
            tokenizer = _load_tokenizer(path / "tokenizer")
        return cls(top, bottom, units, manifest, tokenizer, tensors.get("corpus.next_token_counts"), stats)

    def check_matches(self, model: AdapterLike) -> None:
        """Raise :class:`AtlasMismatchError` if the atlas was not made with a model like ``model``."""
        adapter = as_adapter(model)
        layout = self.manifest["model_layout"]
        got = {"n_layers": adapter.n_layers, "d_mlp": adapter.d_mlp, "d_vocab": adapter.d_vocab}
        diffs = [f"{key}: atlas {layout[key]} vs model {value}" for key, value in got.items() if layout[key] != value]
        fingerprint = tokenizer_fingerprint(adapter.tokenizer)
        if fingerprint != self.manifest["tokenizer_fingerprint"]:
            diffs.append(f"tokenizer: atlas {self.manifest['tokenizer_fingerprint']} vs model {fingerprint}")
        if diffs:
            raise AtlasMismatchError(
                f"This atlas was made with another model ({self.manifest.get('model')!r}): {'; '.join(diffs)}. "
                "Load the model it was made with, or search again."
            )


def _load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as err:  # noqa: BLE001 - tokenizers raise many types on damaged JSON
        raise DamagedFileError(
            f"{folder} holds no readable tokenizer ({short(str(err), 120)}); restore the atlas folder or search again."
        ) from None


def _tables(tensors: dict[str, Tensor], prefix: str, layers: list[int]) -> dict[int, LayerTopK]:
    return {
        layer: LayerTopK(*(tensors[f"{prefix}.{layer}.{field}"] for field in ("values", "units", "positions")))
        for layer in layers
    }
