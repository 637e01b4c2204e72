"""Value vectors read in the vocabulary (Geva et al. 2021, section 4).

Every memory's value is projected into the vocabulary with :meth:`MemoryLens.value_logits`
(direction only, centred over the vocabulary; the definition is ``lens.value_readout_mode``)
and summarised by its top-k and bottom-k tokens and the maximum probability of
``softmax(logits)``. The projection runs in chunks of memories, so ``[d_mlp, d_vocab]`` is never
materialised (Gemma's vocabulary has 262,144 tokens); ranks are counted, never sorted. Each
block's statistics come from :func:`ffkv_lens.kernels.value_row_stats` (torch reference or Numba twin).

Ties: tokens are ordered by logit, then by token id (lower first), exactly, also at the k-th
place. Ranks count the tokens with a strictly greater logit (rank 0 = top).

Example:
    >>> proj = project_values(lens, top_k=10)  # doctest: +SKIP
    >>> proj.top1[29][:5], proj.max_prob[29].max()  # doctest: +SKIP
    >>> proj.to_pandas(layers=[29]).head()  # doctest: +SKIP
"""

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ffkv_lens.adapters import as_adapter
from ffkv_lens.errors import AtlasMismatchError, ConfigError, DamagedFileError
from ffkv_lens.kernels import value_row_stats
from ffkv_lens.kernels.value_stats import count_beats, topk_by_logit
from ffkv_lens.storage import atomic_folder, read_json
from ffkv_lens.storage.reading import check_tensor, load_tensors, short

__all__ = [
    "ValueProjection",
    "chunk_size",
    "project_values",
    "project_values_and_ranks",
    "topk_by_logit",
    "value_extremes",
    "value_ranks",
]

log = logging.getLogger(__name__)
FORMAT = "ffkv_lens.value_projection/1"
DEFAULT_BUDGET_MB = 256
# Floats held by one chunk of value logits in value_extremes: 512 MiB, 512 Gemma 3 values per product
# (products of 512 rows run near the CPU's matmul peak; fewer rows run slower).
VALUE_BUDGET = 2**27
_FIELDS = ("top_ids", "top_logits", "bottom_ids", "bottom_logits", "max_prob")
DEFINITIONS = {
    "logits": "lens.value_logits(layer): direction-only projection, centred over the vocabulary",
    "top": "the top_k tokens by logit, highest first; ties: lower token id first",
    "bottom": "the top_k tokens with the lowest logits, lowest first; ties: lower token id first",
    "max_prob": "max softmax probability of the value's logits, 1 / sum(exp(logits - max))",
    "rank": "number of tokens with a strictly greater logit (sign=-1: strictly lower); 0 = top",
}


def chunk_size(
    d_vocab: int, *, chunk_memories: int | None = None, memory_budget_mb: int | float = DEFAULT_BUDGET_MB
) -> int:
    """Memories per chunk: ``chunk_memories`` if given, else what fits one float32 logits block in the budget."""
    if chunk_memories is not None:
        if not isinstance(chunk_memories, int) or chunk_memories < 1:
            raise ConfigError(f"chunk_memories={chunk_memories!r}; pass a positive integer or None.")
        return chunk_memories
    if not memory_budget_mb > 0:
        raise ConfigError(f"memory_budget_mb={memory_budget_mb!r}; pass a positive number of megabytes.")
    return max(1, int(memory_budget_mb * 2**20) // (4 * d_vocab))


def value_extremes(lens: Any, layer: int) -> tuple[Int[Tensor, " d_mlp"], Int[Tensor, " d_mlp"]]:
    """Each value's top and bottom token under ``lens.value_logits`` (first index on ties), chunked over memories."""
    chunk = max(1, VALUE_BUDGET // lens.d_vocab)
    tops, bottoms = [], []
    for start in range(0, lens.d_mlp, chunk):
        logits = lens.value_logits(layer, memories=torch.arange(start, min(start + chunk, lens.d_mlp)))
        tops.append(logits.argmax(dim=-1))
        bottoms.append(logits.argmin(dim=-1))
        del logits
    return torch.cat(tops).cpu(), torch.cat(bottoms).cpu()


def _as_index(value: Tensor | Sequence[int]) -> Tensor:
    return torch.as_tensor(value, dtype=torch.long).reshape(-1).cpu()


def value_ranks(
    lens: Any,
    layer: int,
    memories: Tensor | Sequence[int],
    token_ids: Tensor | Sequence[int],
    *,
    sign: int = 1,
    chunk_memories: int | None = None,
    memory_budget_mb: int | float = DEFAULT_BUDGET_MB,
) -> Int[Tensor, " n"]:
    """Rank of ``token_ids[i]`` in the value distribution of memory ``memories[i]`` of ``layer``.

    The rank is the number of tokens with a strictly greater logit (``sign=-1``: strictly lower,
    the rank from the bottom), counted chunk by chunk; nothing is sorted.
    """
    if sign not in (1, -1):
        raise ConfigError(f"sign={sign!r}; use 1 (rank from the top) or -1 (rank from the bottom).")
    memories, token_ids = _as_index(memories), _as_index(token_ids)
    if memories.shape != token_ids.shape:
        raise ConfigError(
            f"memories has {memories.numel()} entries but token_ids has {token_ids.numel()}; pass one token per memory."
        )
    if token_ids.numel() and not (0 <= int(token_ids.min()) and int(token_ids.max()) < lens.d_vocab):
        raise ConfigError(
            f"token_ids range over [{int(token_ids.min())}, {int(token_ids.max())}]; pass ids in [0, {lens.d_vocab})."
        )
    chunk = chunk_size(lens.d_vocab, chunk_memories=chunk_memories, memory_budget_mb=memory_budget_mb)
    out = torch.empty(memories.numel(), dtype=torch.long)
    with torch.no_grad():
        for start in range(0, memories.numel(), chunk):
            logits = lens.value_logits(layer, memories=memories[start : start + chunk])
            out[start : start + chunk] = count_beats(logits, token_ids[start : start + chunk], sign)
    return out


@dataclass(frozen=True, eq=False)
class ValueProjection:
    """Top and bottom tokens of every value of the projected layers.

    Attributes:
        top_ids: ``{layer: [d_mlp, k]}`` highest-logit tokens, best first.
        top_logits: Their logits.
        bottom_ids: ``{layer: [d_mlp, k]}`` lowest-logit tokens, lowest first.
        bottom_logits: Their logits.
        max_prob: ``{layer: [d_mlp]}`` max softmax probability of each value's distribution.
        settings: Every setting and definition behind the numbers (readout mode included).
        lens: The lens it was computed with (needed by :meth:`rank_of`); ``None`` after loading.
        tokenizer: Decodes tokens in :meth:`to_pandas`.
        top1: ``{layer: [d_mlp]}`` each value's top token (derived once, for gathers).
        bottom1: ``{layer: [d_mlp]}`` each value's bottom token.
        target_ranks: ``{sign: {layer: [d_mlp, 2]}}`` given target tokens (column 0, ``-1``: none)
            and their ranks (column 1) computed in the same pass (``project_values(rank_targets=...)``);
            ``value_agreement`` reuses them when its targets are the same instead of projecting again.
    """

    top_ids: dict[int, Int[Tensor, "d_mlp k"]]
    top_logits: dict[int, Float[Tensor, "d_mlp k"]]
    bottom_ids: dict[int, Int[Tensor, "d_mlp k"]]
    bottom_logits: dict[int, Float[Tensor, "d_mlp k"]]
    max_prob: dict[int, Float[Tensor, " d_mlp"]]
    settings: dict[str, Any]
    lens: Any = field(default=None, repr=False)
    tokenizer: Any = field(default=None, repr=False)
    target_ranks: dict[int, dict[int, Int[Tensor, "d_mlp 2"]]] = field(default_factory=dict, repr=False)
    top1: dict[int, Int[Tensor, " d_mlp"]] = field(init=False, repr=False)
    bottom1: dict[int, Int[Tensor, " d_mlp"]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        layers = sorted(self.top_ids)
        for name in _FIELDS:
            if sorted(getattr(self, name)) != layers:
                raise ConfigError(f"{name} covers layers {sorted(getattr(self, name))}, top_ids covers {layers}.")
        object.__setattr__(self, "top1", {layer: self.top_ids[layer][:, 0].contiguous() for layer in layers})
        object.__setattr__(self, "bottom1", {layer: self.bottom_ids[layer][:, 0].contiguous() for layer in layers})
        if self.tokenizer is None and self.lens is not None:
            object.__setattr__(self, "tokenizer", as_adapter(self.lens).tokenizer)

    def __repr__(self) -> str:
        mode = self.settings.get("value_readout_mode")
        return f"ValueProjection(layers={self.layers}, top_k={self.top_k}, readout={mode!r})"

    @property
    def layers(self) -> list[int]:
        """Projected layers, ascending."""
        return sorted(self.top_ids)

    @property
    def top_k(self) -> int:
        """Tokens kept per value and direction."""
        return int(self.settings["top_k"])

    def rank_of(
        self, layer: int, memories: Tensor | Sequence[int], token_ids: Tensor | Sequence[int], *, sign: int = 1
    ) -> Int[Tensor, " n"]:
        """Rank of ``token_ids[i]`` in value ``memories[i]``'s distribution (see :func:`value_ranks`)."""
        if self.lens is None:
            raise ConfigError(
                "rank_of needs the model: load the projection with ValueProjection.load(path, lens=lens)."
            )
        self._check_layer(layer)
        chunk = self.settings.get("chunk_memories")
        return value_ranks(self.lens, layer, memories, token_ids, sign=sign, chunk_memories=chunk)

    def _check_layer(self, layer: int) -> None:
        if layer not in self.top_ids:
            raise ConfigError(f"layer={layer!r} was not projected; projected layers: {self.layers}.")

    def to_pandas(self, *, layers: Iterable[int] | None = None, text: bool = True) -> Any:
        """One row per (layer, key): top/bottom token ids, logits, decoded tokens (``text=True``), max_prob."""
        import pandas as pd

        frames = []
        for layer in self.layers if layers is None else list(layers):
            self._check_layer(layer)
            d_mlp = self.top_ids[layer].shape[0]
            frame = pd.DataFrame({"layer": layer, "key": range(d_mlp), "max_prob": self.max_prob[layer].double()})
            for name in ("top_ids", "top_logits", "bottom_ids", "bottom_logits"):
                frame[name] = getattr(self, name)[layer].tolist()
            frames.append(frame)
        out = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        if text and len(out):
            decode = self._decoder(out)
            out["top_tokens"] = [[decode[t] for t in row] for row in out["top_ids"]]
            out["bottom_tokens"] = [[decode[t] for t in row] for row in out["bottom_ids"]]
        out.attrs["settings"] = self.settings
        return out

    def _decoder(self, frame: Any) -> dict[int, str]:
        if self.tokenizer is None:
            raise ConfigError("No tokenizer to decode tokens: pass lens= or tokenizer= to load, or use text=False.")
        ids = sorted({t for col in ("top_ids", "bottom_ids") for row in frame[col] for t in row})
        return dict(zip(ids, self.tokenizer.batch_decode([[t] for t in ids]), strict=True))

    # -- persistence -------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write to a folder atomically: ``projection.safetensors`` + ``manifest.json`` (no pickle)."""
        import json

        from safetensors.torch import save_file

        tensors = {
            f"{name}.{layer}": getattr(self, name)[layer].contiguous().cpu()
            for name in _FIELDS
            for layer in self.layers
        }
        for sign, by_layer in self.target_ranks.items():
            tensors.update({f"target_ranks.{sign}.{layer}": t.contiguous().cpu() for layer, t in by_layer.items()})
        with atomic_folder(path) as tmp:
            save_file(tensors, str(tmp / "projection.safetensors"))
            manifest = {"format": FORMAT, "layers": self.layers, "settings": self.settings}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, *, lens: Any = None, tokenizer: Any = None) -> "ValueProjection":
        """Load a saved projection; pass ``lens`` (checked against the saved layout) to use :meth:`rank_of`.

        Raises:
            AtlasMismatchError: Another format, or a ``lens`` of other sizes.
            DamagedFileError: A file is missing or truncated, or its content contradicts the manifest.
        """
        from ffkv_lens.analysis import checks

        path = Path(path)
        manifest = read_json(path / "manifest.json")
        if not isinstance(manifest, dict):
            raise DamagedFileError(
                f"{path / 'manifest.json'} holds {short(manifest)}, not a JSON object; {checks.VALUES_FIX}."
            )
        if manifest.get("format") != FORMAT:
            raise AtlasMismatchError(
                f"{path / 'manifest.json'} has format {short(manifest.get('format'))}; this version reads "
                f"{FORMAT!r}: pass a folder written by this version of ffkv-lens."
            )
        layers, settings = checks.check_values_manifest(manifest, path / "manifest.json")
        if lens is not None and (lens.d_vocab, lens.d_mlp) != (settings["d_vocab"], settings["d_mlp"]):
            raise AtlasMismatchError(
                f"{path} was projected with d_vocab={settings['d_vocab']}, d_mlp={settings['d_mlp']}; the lens has "
                f"d_vocab={lens.d_vocab}, d_mlp={lens.d_mlp}. Load it with the model it was made with."
            )
        file = path / "projection.safetensors"
        tensors = load_tensors(file, fix=checks.VALUES_FIX)
        parts = checks.check_values_tensors(tensors, layers, settings, file)
        target_ranks: dict[int, dict[int, Tensor]] = {}
        for key in tensors:
            if key.startswith("target_ranks."):
                sign, layer = checks.target_key(key, layers, file)
                target_ranks.setdefault(sign, {})[layer] = check_tensor(
                    tensors, key, file, shape=(settings["d_mlp"], 2), kind="int", fix=checks.VALUES_FIX
                )
        return cls(**parts, settings=settings, lens=lens, tokenizer=tokenizer, target_ranks=target_ranks)


def _project_layer(
    lens: Any, layer: int, k: int, chunk: int, wanted: dict[int, Tensor]
) -> tuple[dict[str, Tensor], dict[int, Tensor]]:
    """One layer's top/bottom tokens, and the ranks of ``wanted[sign]`` (one id per memory) per sign."""
    parts: dict[str, list[Tensor]] = {name: [] for name in _FIELDS}
    ranks: dict[int, list[Tensor]] = {sign: [] for sign in wanted}
    for start in range(0, lens.d_mlp, chunk):
        logits = lens.value_logits(layer, memories=torch.arange(start, min(start + chunk, lens.d_mlp)))
        targets = {sign: ids[start : start + chunk].to(logits.device) for sign, ids in wanted.items()}
        values, counted = value_row_stats(logits, k, targets)
        for name, value in zip(_FIELDS, values, strict=True):
            parts[name].append(value.cpu())
        for sign, value in counted.items():  # ranks in the same pass, saving another projection
            ranks[sign].append(value.cpu())
    return {name: torch.cat(values) for name, values in parts.items()}, {s: torch.cat(r) for s, r in ranks.items()}


def project_values(
    lens: Any,
    *,
    top_k: int = 10,
    layers: int | Sequence[int] | None = None,
    chunk_memories: int | None = None,
    memory_budget_mb: int | float = DEFAULT_BUDGET_MB,
    rank_targets: dict[int, dict[int, Tensor]] | None = None,
) -> ValueProjection:
    """Top-k and bottom-k tokens and max probability of every value of the requested layers.

    Args:
        lens: A :class:`ffkv_lens.MemoryLens`.
        top_k: Tokens kept per value in each direction (capped at ``d_vocab``).
        layers: Layers to project (default all).
        chunk_memories: Memories projected at once; default: as many as fit one float32
            ``[chunk, d_vocab]`` block in ``memory_budget_mb`` (the peak is a few such blocks).
            Does not change the result.
        memory_budget_mb: See ``chunk_memories``.
        rank_targets: ``{sign: {layer: [d_mlp] token ids}}`` (``-1``: none): also rank these tokens
            in the same pass (see :func:`value_ranks`); kept in ``target_ranks``. The targets of
            ``value_agreement`` are ``ffkv_lens.analysis.agreement.agreement_targets(atlas, sign)``.

    Returns:
        A :class:`ValueProjection` (its ``settings`` record ``lens.value_readout_mode``).
    """
    if not isinstance(top_k, int) or top_k < 1:
        raise ConfigError(f"top_k={top_k!r}; pass a positive integer (e.g. 10).")
    chosen = as_adapter(lens).check_layers(layers)
    chunk = chunk_size(lens.d_vocab, chunk_memories=chunk_memories, memory_budget_mb=memory_budget_mb)
    k = min(top_k, lens.d_vocab)
    rank_targets = rank_targets or {}
    for sign, targets in rank_targets.items():
        if sign not in (1, -1):
            raise ConfigError(f"rank_targets has sign {sign!r}; use 1 (top) or -1 (bottom).")
        bad = [layer for layer in chosen if tuple(getattr(targets.get(layer), "shape", ())) != (lens.d_mlp,)]
        if bad:
            raise ConfigError(
                f"targets lacks layers {bad} or has the wrong shape; map each layer to {lens.d_mlp} token ids."
            )
    start = time.perf_counter()
    parts: dict[str, dict[int, Tensor]] = {name: {} for name in _FIELDS}
    target_ranks: dict[int, dict[int, Tensor]] = {sign: {} for sign in rank_targets}
    with torch.no_grad():
        for layer in chosen:
            wanted = {sign: targets[layer].long().cpu() for sign, targets in rank_targets.items()}
            values, ranks = _project_layer(lens, layer, k, chunk, wanted)
            for name, value in values.items():
                parts[name][layer] = value
            for sign, rank in ranks.items():
                target_ranks[sign][layer] = torch.stack([wanted[sign], rank], dim=1)
            log.info("projected the values of layer %d (%.1f s so far)", layer, time.perf_counter() - start)
    settings = {
        "top_k": k,
        "layers": chosen,
        "value_readout_mode": lens.value_readout_mode,
        "d_vocab": lens.d_vocab,
        "d_mlp": lens.d_mlp,
        "model": as_adapter(lens).describe(),
        "definitions": DEFINITIONS,
        "chunk_memories": chunk,  # speed and memory only
    }
    return ValueProjection(**parts, settings=settings, lens=lens, target_ranks=target_ranks)


def project_values_and_ranks(
    lens: Any,
    *,
    top_k: int = 10,
    layers: int | Sequence[int] | None = None,
    chunk_memories: int | None = None,
    memory_budget_mb: int | float = DEFAULT_BUDGET_MB,
    targets: dict[int, Tensor] | None = None,
    sign: int = 1,
) -> tuple[ValueProjection, dict[int, Tensor]]:
    """:func:`project_values` plus, in the same pass, the rank of ``targets[layer][i]`` in value i.

    ``targets[layer]`` holds one token id per memory (``-1``: no target, rank ``-1``); ranks are
    those of :func:`value_ranks` with the same ``sign``. Used by ``value_agreement``.
    """
    projection = project_values(
        lens, top_k=top_k, layers=layers, chunk_memories=chunk_memories, memory_budget_mb=memory_budget_mb,
        rank_targets=None if targets is None else {sign: targets},
    )  # fmt: skip
    ranks = {layer: pair[:, 1] for layer, pair in projection.target_ranks.get(sign, {}).items()}
    return projection, ranks
