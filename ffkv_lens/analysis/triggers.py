"""Streaming top-k trigger search (Geva et al. 2021, section 3).

For every key of every requested layer, keep the ``k`` units with the highest maximum
coefficient (and, with ``signed=True``, the ``k`` with the lowest), one example per unit,
with the peak position. The reduction happens inside the forward hooks, one layer at a
time (activations of all layers are never cached), the forward stops after the last
requested layer, and the top-k update is threshold-gated (``ffkv_lens.kernels``).

Ranking: coefficient descending, ties to the lower unit id; within a unit the first
position attaining the maximum. The result does not depend on the batch size.
"""

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ffkv_lens.adapters import AdapterLike, MemoryAdapter, as_adapter
from ffkv_lens.analysis.atlas import LayerTopK, TriggerAtlas, UnitStore, tokenizer_fingerprint
from ffkv_lens.analysis.search_config import BATCH_TOKENS, CHECKPOINT_EVERY, SEARCH_DEFAULTS, SearchConfig
from ffkv_lens.analysis.stats.accumulators import MemoryStats
from ffkv_lens.analysis.stats.settings import STATS_DEFAULTS, StatsSettings
from ffkv_lens.corpus import Corpus, UnitBatch, UnitKind
from ffkv_lens.distributed import World
from ffkv_lens.errors import ConfigError
from ffkv_lens.kernels import (
    TopKState,
    batch_candidates,
    grouped_merge_units,
    merge_states,
    merge_topk,
    update_topk,
    update_topk_signed,
)
from ffkv_lens.storage.tables import library_versions

__all__ = ["SearchConfig", "TriggerSearch", "search_triggers"]  # SearchConfig: from search_config

log = logging.getLogger(__name__)
# Units are sorted by length in groups of this many before batching, so that a batch of sentences
# computes little padding (docs/performance.md); the result does not depend on it (ties go by unit id).
SORT_WINDOW = 1024


@dataclass
class _Progress:
    units: int = 0
    tokens: int = 0
    batches: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class TriggerSearch:
    """The state of one trigger search; feed it batches, then take the atlas.

    Args:
        adapter: The model's :class:`~ffkv_lens.adapters.MemoryAdapter`.
        config: The search settings.
        corpus_info: The corpus description recorded in the manifest (with its fingerprint).
        batching: How the stream is cut into batches (recorded in checkpoints).
        stats: The per-memory statistics' settings (``stats.stats=False``: none gathered).
    """

    def __init__(
        self,
        adapter: MemoryAdapter,
        config: SearchConfig,
        corpus_info: dict[str, Any],
        batching: dict[str, Any] | None = None,
        stats: StatsSettings = STATS_DEFAULTS,
    ) -> None:
        self.adapter, self.config, self.corpus_info = adapter, config, corpus_info
        # How the stream is cut into batches: a checkpoint counts batches, so resuming needs the same cut.
        self.batching = batching
        self.layers = adapter.check_layers(None if config.layers is None else list(config.layers))
        dev = adapter.device
        # Compare in float64 for float64 models, else float32 (bf16/fp16 coefficients are upcast).
        self.dtype = torch.float64 if adapter.keys(self.layers[0]).dtype == torch.float64 else torch.float32
        self._top = {layer: TopKState.empty(adapter.d_mlp, config.k, dev, self.dtype) for layer in self.layers}
        self._bottom = (
            {layer: TopKState.empty(adapter.d_mlp, config.k, dev, self.dtype) for layer in self.layers}
            if config.signed
            else None
        )
        self.progress = _Progress()
        self.stats_settings = stats
        self.memory_stats = (
            MemoryStats(stats, self.layers, adapter.d_mlp, dev, self.dtype, adapter) if stats.stats else None
        )
        self.per_rank: list[dict[str, int]] | None = None  # set by merge_world under torchrun
        # How often each token is the next token of some candidate position (a unit's tokens
        # after its first): the corpus unigram of next tokens, for the agreement baseline.
        self.next_token_counts = torch.zeros(adapter.d_vocab, dtype=torch.int64)
        self._units: dict[int, tuple[int, list[int]]] = {}
        self._hook_layer = {adapter.hook_names(layer).coefficients: layer for layer in self.layers}
        self._stop = adapter.hook_names(self.layers[-1]).coefficients
        self._has_bos: bool | None = None
        self._world: dict[str, Any] = {"world_size": 1, "backend": None}
        # CPU only: each layer's candidates (values, positions, unit ids) per sign, merged in groups.
        self._pending: dict[tuple[int, int], list[tuple[Tensor, Tensor, Tensor]]] = {}

    @property
    def top(self) -> dict[int, TopKState]:
        """Each layer's top-k state (pending candidates merged first)."""
        self.flush()
        return self._top

    @property
    def bottom(self) -> dict[int, TopKState] | None:
        """Each layer's bottom-k state (negated values), or None when the search is not signed."""
        self.flush()
        return self._bottom

    def flush(self) -> None:
        """Merge every layer's pending candidates into its states (exact: see ``batch_candidates``)."""
        for layer, sign in list(self._pending):
            self._flush(layer, sign)

    def _flush(self, layer: int, sign: int) -> None:
        parts = self._pending.pop((layer, sign), [])
        if not parts:
            return
        tables = self._top if sign == 1 else self._bottom
        values, positions, units = (torch.cat(column) for column in zip(*parts, strict=True))
        tables[layer] = merge_topk(tables[layer], values, positions, units)

    # -- the hot loop ----------------------------------------------------------------------
    def update(self, batch: UnitBatch) -> None:
        """Run one batch of units through the model and merge its candidates into the top-k."""
        dev = self.adapter.device
        tokens = batch.tokens.to(dev)
        mask = batch.attention_mask.to(dev)
        valid = mask.bool()
        if batch.has_bos and self.config.exclude_bos:
            valid[:, 0] = False
        unit_ids = batch.unit_ids.to(dev)
        self._has_bos = bool(batch.has_bos)

        def reduce(m: Tensor, hook: Any) -> None:
            layer = self._hook_layer[hook.name]
            m = m.detach().to(self.dtype)
            with _one_cpu_thread(m.device):
                self._reduce(layer, m, valid, unit_ids)

        start = time.perf_counter()
        hooks = (self.memory_stats.hooks() if self.memory_stats is not None else []) + [  # gate/up fire first
            (name, reduce) for name in self._hook_layer
        ]
        with torch.no_grad():
            self.adapter.run_with_hooks(tokens, hooks, attention_mask=mask, stop_after=self._stop)
        self.progress.seconds += time.perf_counter() - start
        following: list[int] = []
        for unit in batch.units:
            self._units[unit.unit_id] = (unit.doc_id, list(unit.token_ids))
            following.extend(unit.token_ids[1:])
        if following:  # one scatter-add per batch, not a vocabulary-sized bincount per unit
            ids = torch.as_tensor(following, dtype=torch.int64)
            self.next_token_counts.index_add_(0, ids, torch.ones_like(ids))
        self.progress.units += len(batch.units)
        self.progress.tokens += int(sum(batch.lengths))
        self.progress.batches += 1

    def _reduce(self, layer: int, m: Tensor, valid: Tensor, unit_ids: Tensor) -> None:
        top, bottom = self._top, self._bottom
        group = grouped_merge_units(m.device)  # CPU: merges grouped, a merge dominates a filling state
        if group is not None:
            found = batch_candidates(top[layer], m, valid, unit_ids, None if bottom is None else bottom[layer])
            for sign, candidates in ((1, found[0]), (-1, found[1])):
                if candidates is not None:
                    pending = self._pending.setdefault((layer, sign), [])
                    pending.append((*candidates, unit_ids))
                    if sum(part[2].numel() for part in pending) >= group:
                        self._flush(layer, sign)
        elif bottom is None:
            top[layer] = update_topk(top[layer], m, valid, unit_ids)
        else:  # one pass for both signs
            top[layer], bottom[layer] = update_topk_signed(top[layer], bottom[layer], m, valid, unit_ids)
        if self.memory_stats is not None:  # the same coefficients, in the same hook: no second pass
            self.memory_stats.update(layer, m, valid, unit_ids)

    def prune_units(self) -> None:
        """Forget the tokens of units no longer referenced by any top-k table."""
        if not self._units:
            return
        # A mask over unit ids (no sort: torch.unique of every table measured slower than a search batch).
        seen = torch.zeros(max(self._units) + 2, dtype=torch.bool)
        for tables in (self.top, self.bottom or {}):
            for state in tables.values():
                ids = state.units.reshape(-1).cpu()
                seen[ids[(ids >= 0) & (ids < seen.numel())]] = True
        if self.memory_stats is not None:  # units of the quantile samples are kept too
            ids = self.memory_stats.referenced_units()
            seen[ids[ids < seen.numel()]] = True
        keep = seen.tolist()
        self._units = {u: v for u, v in self._units.items() if keep[u]}

    def merge_world(self, here: World) -> None:
        """Combine the searches of every rank into the search of the whole corpus, on every rank.

        Top-k states are gathered and merged exactly (:func:`~ffkv_lens.kernels.merge_states`, in
        rank order; unit ids are global, so ties keep the global order), next-token counts and
        progress are summed, and the tokens of the units the merged tables reference are shared.
        Call it once, after the last batch (and after the last checkpoint) of every rank.
        """
        from ffkv_lens.distributed import all_gather_varlen, all_sum_

        if not here.distributed:
            return
        for tables in (self.top, self.bottom or {}):
            for layer, state in tables.items():
                gathered = [all_gather_varlen(t.reshape(-1), here) for t in state]
                merged = None
                for rank in range(here.size):
                    part = TopKState(*(g[rank].view(state.values.shape) for g in gathered))
                    merged = part if merged is None else merge_states(merged, part)
                tables[layer] = merged
        all_sum_(self.next_token_counts, here)
        if self.memory_stats is not None:
            self.memory_stats.merge_world(here)
        counts = torch.tensor([self.progress.units, self.progress.tokens, self.progress.batches], dtype=torch.int64)
        # What each rank searched, recorded in the manifest: units, tokens and batches per rank.
        names = ("units", "tokens", "batches")
        self.per_rank = [dict(zip(names, c.tolist(), strict=True)) for c in all_gather_varlen(counts, here)]
        self.progress.units, self.progress.tokens, self.progress.batches = all_sum_(counts, here).tolist()
        self.prune_units()  # keep only units the merged tables reference, then share their tokens
        mine = UnitStore.from_units(self._units)
        lengths = mine.offsets[1:] - mine.offsets[:-1]
        fields = [all_gather_varlen(t, here) for t in (mine.unit_ids, mine.doc_ids, lengths, mine.tokens)]
        units: dict[int, tuple[int, list[int]]] = {}
        for ids, docs, sizes, tokens in zip(*fields, strict=True):
            for unit, doc, piece in zip(ids.tolist(), docs.tolist(), tokens.split(sizes.tolist()), strict=True):
                units[unit] = (doc, piece.tolist())
        self._units = units
        self._world = here.describe()

    # -- results -----------------------------------------------------------------------------
    def to_atlas(self, model_name: str | None = None) -> TriggerAtlas:
        """The atlas of everything seen so far (positions converted to unit-own token indices)."""
        self.prune_units()
        shift = 1 if self._has_bos else 0

        def table(state: TopKState, sign: int) -> LayerTopK:
            positions = torch.where(state.units >= 0, state.positions.long() - shift, -1)
            return LayerTopK(sign * state.values.cpu(), state.units.cpu(), positions.cpu())

        top = {layer: table(state, 1) for layer, state in self.top.items()}
        bottom = None if self.bottom is None else {layer: table(s, -1) for layer, s in self.bottom.items()}
        units = UnitStore.from_units(self._units)
        counts = self.next_token_counts.clone()
        stats = None if self.memory_stats is None else self.memory_stats.finish(shift)
        return TriggerAtlas(top, bottom, units, self.manifest(model_name), self.adapter.tokenizer, counts, stats)

    def manifest(self, model_name: str | None = None) -> dict[str, Any]:
        """Everything needed to interpret and reproduce the atlas."""
        adapter = self.adapter
        return {
            "model": model_name or adapter.model_name,
            "model_layout": {"n_layers": adapter.n_layers, "d_mlp": adapter.d_mlp, "d_vocab": adapter.d_vocab},
            "adapter": adapter.describe(),
            "tokenizer_fingerprint": tokenizer_fingerprint(adapter.tokenizer),
            "corpus": self.corpus_info,
            "settings": dict(self.config.to_dict(), layers=self.layers, has_bos=bool(self._has_bos)),
            "stats": self.stats_settings.to_dict() if self.memory_stats is None else self.memory_stats.describe(),
            "progress": {
                "units": self.progress.units,
                "tokens": self.progress.tokens,
                "batches": self.progress.batches,
                **({"per_rank": self.per_rank} if self.per_rank else {}),
            },
            "versions": library_versions(),
            "distributed": self._world,
        }

    # -- checkpoints -----------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        """What must match for a checkpoint to be resumed."""
        adapter = self.adapter
        return {
            "settings": self.config.to_dict(),
            "stats": self.stats_settings.to_dict(),
            "layers": self.layers,
            "corpus_fingerprint": self.corpus_info.get("fingerprint"),
            "model": adapter.model_name,
            "model_layout": {"n_layers": adapter.n_layers, "d_mlp": adapter.d_mlp, "d_vocab": adapter.d_vocab},
            "tokenizer_fingerprint": tokenizer_fingerprint(adapter.tokenizer),
            "batching": self.batching,
        }

    def save_checkpoint(self, folder: str | Path) -> None:
        """Write the whole state atomically to ``folder/checkpoint``."""
        from ffkv_lens.analysis.checkpoint import write_checkpoint

        self.prune_units()
        write_checkpoint(Path(folder), self)

    def load_checkpoint(self, folder: str | Path) -> bool:
        """Restore from ``folder/checkpoint`` if present; returns whether anything was restored."""
        from ffkv_lens.analysis.checkpoint import read_checkpoint

        return read_checkpoint(Path(folder), self)


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run the top-k update on one CPU thread, then restore torch's thread count.

    The update is many small ops; split over threads, each op waits for the slowest thread, and on a
    machine where another process holds a core that wait is a scheduler time slice per op
    (measured in docs/performance.md).
    """
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _batches(corpus: Corpus, adapter: MemoryAdapter, config: SearchConfig, batch_tokens: int) -> Iterator[UnitBatch]:
    """The batches of the whole search, always cut the same way (sharding and resuming index them).

    Units are sorted by length within groups of :data:`SORT_WINDOW` (deterministic), so that
    sentences of similar length share a batch.
    """
    from ffkv_lens.corpus import iter_batches, iter_units

    units = iter_units(
        corpus, adapter.tokenizer, unit=config.unit, max_len=config.max_len, max_tokens=config.max_tokens
    )
    tok = adapter.tokenizer
    bos = adapter.bos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    yield from iter_batches(
        units, batch_tokens=batch_tokens, bos_token_id=bos, pad_token_id=pad, sort_window=SORT_WINDOW
    )


def search_triggers(
    model: AdapterLike,
    corpus: Corpus,
    *,
    k: int = SEARCH_DEFAULTS.k,
    unit: UnitKind = SEARCH_DEFAULTS.unit,
    max_len: int = SEARCH_DEFAULTS.max_len,
    layers: int | list[int] | None = None,
    signed: bool = SEARCH_DEFAULTS.signed,
    exclude_bos: bool = SEARCH_DEFAULTS.exclude_bos,
    max_tokens: int | None = SEARCH_DEFAULTS.max_tokens,
    batch_tokens: int = BATCH_TOKENS,
    device: str | torch.device | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = CHECKPOINT_EVERY,
    progress: bool = True,
    stats: bool = STATS_DEFAULTS.stats,
    density_threshold: float = STATS_DEFAULTS.density_threshold,
    histogram_bins: int = STATS_DEFAULTS.histogram_bins,
    quantile_groups: int = STATS_DEFAULTS.quantile_groups,
    quantile_samples: int = STATS_DEFAULTS.quantile_samples,
    quadrants: bool = STATS_DEFAULTS.quadrants,
) -> TriggerAtlas:
    """Find the top-k trigger examples of every key; see :meth:`ffkv_lens.MemoryLens.search_triggers`."""
    from ffkv_lens.analysis.checkpoint import rank_checkpoint_dir
    from ffkv_lens.distributed import world

    adapter = as_adapter(model)
    _check_device(adapter, device)
    chosen = adapter.check_layers(layers)
    config = SearchConfig(k, unit, max_len, tuple(chosen), signed, exclude_bos, max_tokens)
    here = world()
    batching = {"batch_tokens": batch_tokens, "sort_window": SORT_WINDOW}
    settings = StatsSettings(stats, density_threshold, histogram_bins, quantile_groups, quantile_samples, quadrants)
    search = TriggerSearch(adapter, config, corpus.describe(), batching, settings)
    folder = None if checkpoint_dir is None else rank_checkpoint_dir(checkpoint_dir, here)
    if folder is not None and search.load_checkpoint(folder):
        log.info("resuming from %s after %d batches", folder, search.progress.batches)
    if search.memory_stats is not None and search.memory_stats.ranges is None:
        search.memory_stats.calibrate(adapter, corpus, config, here)
    # Batch i belongs to rank i % size; this rank has done its first `progress.batches` of them.
    resume_at = here.rank + here.size * search.progress.batches
    total = None if max_tokens is None or here.distributed else max_tokens
    bar = _progress_bar(progress and here.is_main, total, search.progress.tokens)
    since = search.progress.tokens
    for index, batch in enumerate(_batches(corpus, adapter, config, batch_tokens)):
        if index % here.size != here.rank or index < resume_at:
            continue
        search.update(batch)
        bar.update(int(sum(batch.lengths)))
        if folder is not None and search.progress.tokens - since >= checkpoint_every:
            search.save_checkpoint(folder)
            since = search.progress.tokens
        elif search.progress.batches % 64 == 0:
            search.prune_units()
    bar.close()
    if folder is not None:
        search.save_checkpoint(folder)
    search.merge_world(here)
    return search.to_atlas()


def _check_device(adapter: MemoryAdapter, device: str | torch.device | None) -> None:
    """The search runs where the model is; refuse a different device instead of moving the user's model."""
    if device is None:
        return
    wanted = torch.device(device)
    have = adapter.device
    if wanted.type != have.type or (wanted.index is not None and wanted.index != have.index):
        raise ConfigError(
            f"device={str(device)!r} but the model is on {have}; the search runs where the model is. "
            f"Load the model there (ffkv_lens.load_model(name, device={str(device)!r})) or pass device=None."
        )


def _progress_bar(enabled: bool, total: int | None, initial: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="tok", unit_scale=True, desc="trigger search", disable=not enabled)
