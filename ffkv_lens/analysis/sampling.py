"""Random prefixes for the section-5 analyses (Geva et al. 2021), and the states recorded at them.

The paper analysed 4,000 random validation prefixes, drawing one random position per
sentence. ffkv_lens draws them like this (scheme ``"bottom-k-blake2b-v1"``):

1. Cut the corpus into units with :func:`~ffkv_lens.corpus.iter_units` (default: sentences,
   at most ``max_len`` tokens; read at most ``max_units`` units, default the whole corpus).
2. Give every unit a 128-bit digest ``blake2b("ffkv-lens/prefix/{seed}/{unit_id}")``. Its first
   64 bits are the unit's *key*; keep the ``positions`` units with the smallest keys (ties,
   which need a 64-bit collision, go to the lower unit id). This is a uniform random sample of
   units without replacement, drawn in one streaming pass with a bounded heap.
3. In each kept unit of ``n`` tokens, analyse position ``p = (last 64 bits) mod n`` (uniform up
   to a 2**-64 bias), i.e. the model's prediction after reading ``unit tokens[:p + 1]``.
   The model reads ``[BOS] + tokens[:p + 1]`` when ``adapter.bos_token_id`` is not ``None``;
   the BOS position is never analysed.

The sample depends only on the corpus, the tokenizer, the seed and the unit settings, never
on the batch size. A corpus with fewer than ``positions`` units gives one position per unit.

:func:`prefix_batches` pads the prefixes into batches; :func:`record_states` runs a batch once
and keeps ``m, y, r, o`` at each row's analysed position only. The vocabulary passes
(``readout_top``, ``value_extremes``, re-exported here) live in :mod:`ffkv_lens.kernels.readouts` and
:mod:`ffkv_lens.analysis.values`.
"""

import hashlib
import heapq
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ffkv_lens.adapters import AdapterLike, LayerHooks, as_adapter
from ffkv_lens.analysis.values import value_extremes
from ffkv_lens.corpus import UNIT_KINDS, Corpus, Unit, UnitKind
from ffkv_lens.errors import ConfigError, HookNotFiredError
from ffkv_lens.kernels import state_top
from ffkv_lens.kernels.readouts import readout_top
from ffkv_lens.types import AttentionMask, Tokens

__all__ = [
    "SAMPLING_SCHEME",
    "Prefix",
    "PrefixBatch",
    "PrefixSample",
    "SampleConfig",
    "SampledStates",
    "prefix_batches",
    "readout_top",
    "record_states",
    "sample_prefixes",
    "value_extremes",
]

log = logging.getLogger(__name__)

SAMPLING_SCHEME = "bottom-k-blake2b-v1"


def _check_int(name: str, value: object, minimum: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        hint = f"an integer >= {minimum}" + (" or None" if optional else "")
        raise ConfigError(f"{name}={value!r} is not allowed; pass {hint}.")


@dataclass(frozen=True)
class SampleConfig:
    """Which prefixes are analysed (see the module docstring for the scheme).

    Attributes:
        positions: Prefixes to draw (one per unit; the paper used 4,000).
        seed: Seed of the hash that picks units and positions.
        unit: ``"sentence"`` (the paper's), ``"document"`` or ``"window"``.
        max_len: Longest unit in tokens (BOS not counted); longer sentences are truncated.
        max_units: Read at most this many units (``None``: the whole corpus).
    """

    positions: int = 4000
    seed: int = 0
    unit: UnitKind = "sentence"
    max_len: int = 128
    max_units: int | None = None

    def __post_init__(self) -> None:
        _check_int("positions", self.positions, 1)
        _check_int("seed", self.seed, 0)
        if self.unit not in UNIT_KINDS:
            raise ConfigError(f"unit={self.unit!r} is not allowed; choose one of {list(UNIT_KINDS)}.")
        _check_int("max_len", self.max_len, 1)
        _check_int("max_units", self.max_units, 1, optional=True)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable settings, with the scheme's name."""
        return dict(asdict(self), scheme=SAMPLING_SCHEME)


@dataclass(frozen=True)
class Prefix:
    """One sampled prefix.

    Attributes:
        unit_id: The unit it was cut from.
        doc_id: The unit's document.
        position: Index of the analysed token among the unit's own tokens (0-based, no BOS).
        token_ids: ``unit tokens[:position + 1]`` (no BOS).
        unit_tokens: Number of tokens in the whole unit.
    """

    unit_id: int
    doc_id: int
    position: int
    token_ids: tuple[int, ...]
    unit_tokens: int


class PrefixSample(NamedTuple):
    """The drawn prefixes, in unit order, and how many units were read to draw them."""

    prefixes: list[Prefix]
    units_read: int


def unit_draws(seed: int, unit_id: int) -> tuple[int, int]:
    """The two 64-bit draws of a unit: its sampling key and its position draw.

    Example:
        >>> unit_draws(0, 7) == unit_draws(0, 7) != unit_draws(1, 7)
        True
    """
    digest = hashlib.blake2b(f"ffkv-lens/prefix/{seed}/{unit_id}".encode(), digest_size=16).digest()
    return int.from_bytes(digest[:8], "big"), int.from_bytes(digest[8:], "big")


def sample_prefixes(corpus: Corpus | Iterable[tuple[int, str]], tokenizer: Any, config: SampleConfig) -> PrefixSample:
    """Draw ``config.positions`` random prefixes in one streaming pass over the corpus.

    Args:
        corpus: A :class:`~ffkv_lens.corpus.Corpus` or any iterable of ``(doc_id, text)``.
        tokenizer: The model's Hugging Face tokenizer.
        config: The sampling settings.

    Returns:
        The prefixes sorted by unit id, and the number of units read.
    """
    from ffkv_lens.corpus import iter_units

    heap: list[tuple[int, int, Unit]] = []  # max-heap on (key, unit_id) through negation
    read = 0
    for unit in iter_units(corpus, tokenizer, unit=config.unit, max_len=config.max_len):
        if config.max_units is not None and read >= config.max_units:
            break
        read += 1
        key, _ = unit_draws(config.seed, unit.unit_id)
        entry = (-key, -unit.unit_id, unit)
        if len(heap) < config.positions:
            heapq.heappush(heap, entry)
        elif entry > heap[0]:
            heapq.heapreplace(heap, entry)
    prefixes = [_prefix(unit, config.seed) for _, _, unit in sorted(heap, key=lambda e: e[2].unit_id)]
    if len(prefixes) < config.positions:
        log.warning("only %d units in the corpus: %d prefixes instead of %d", read, len(prefixes), config.positions)
    return PrefixSample(prefixes, read)


def _prefix(unit: Unit, seed: int) -> Prefix:
    _, draw = unit_draws(seed, unit.unit_id)
    position = draw % unit.n_tokens
    return Prefix(unit.unit_id, unit.doc_id, position, tuple(unit.token_ids[: position + 1]), unit.n_tokens)


class PrefixBatch(NamedTuple):
    """Prefixes right-padded into one forward pass.

    Attributes:
        index: Index of each row's prefix in the sample.
        tokens: Token ids (BOS first when the model prepends one).
        attention_mask: 1 for real tokens, 0 for padding.
        last: Column of each row's analysed token (its last real token).
    """

    index: Int[Tensor, " batch"]
    tokens: Tokens
    attention_mask: AttentionMask
    last: Int[Tensor, " batch"]


def prefix_batches(
    prefixes: Sequence[Prefix],
    *,
    batch_tokens: int,
    bos_token_id: int | None,
    pad_token_id: int,
) -> Iterator[PrefixBatch]:
    """Group prefixes of similar length into padded batches of at most ``batch_tokens`` tokens.

    Prefixes are sorted by length (ties by sample index) so that little padding is needed;
    the order changes nothing in the results.

    Example:
        >>> ps = [Prefix(0, 0, 1, (5, 6), 3), Prefix(1, 0, 0, (7,), 2)]
        >>> [(b.index.tolist(), b.tokens.tolist(), b.last.tolist())
        ...  for b in prefix_batches(ps, batch_tokens=6, bos_token_id=1, pad_token_id=0)]
        [([1, 0], [[1, 7, 0], [1, 5, 6]], [1, 2])]
    """
    from ffkv_lens.corpus import iter_batches

    _check_int("batch_tokens", batch_tokens, 1)
    order = sorted(range(len(prefixes)), key=lambda i: (len(prefixes[i].token_ids), i))
    units = (Unit(i, prefixes[i].doc_id, prefixes[i].token_ids, "", None, None) for i in order)
    for batch in iter_batches(units, batch_tokens=batch_tokens, bos_token_id=bos_token_id, pad_token_id=pad_token_id):
        last = batch.lengths - 1 + int(batch.has_bos)
        yield PrefixBatch(batch.unit_ids, batch.tokens, batch.attention_mask, last)


# -- states at the sampled positions -----------------------------------------------------------
class SampledStates(NamedTuple):
    """States at the sampled positions of one batch, ``[batch, layer, ...]``, layers as requested.

    Attributes:
        coefficients: m.
        ffn_output: y.
        resid_before: r (derived as ``o - y`` on parallel blocks).
        resid_after: o.
        final_token: ``argmax readout`` of the last layer's ``o`` (see :func:`record_states`).
    """

    coefficients: Float[Tensor, "batch layer d_mlp"]
    ffn_output: Float[Tensor, "batch layer d_model"]
    resid_before: Float[Tensor, "batch layer d_model"]
    resid_after: Float[Tensor, "batch layer d_model"]
    final_token: Int[Tensor, " batch"]


# -- the forward pass -------------------------------------------------------------------------
def record_states(model: AdapterLike, batch: PrefixBatch, layers: list[int]) -> SampledStates:
    """Run one batch once and keep ``m, y, r, o`` and the final prediction at each row's last token.

    The forward pass stops after the last layer's ``resid_after_ffn`` (no unembedding of every
    token); the final prediction is ``argmax adapter.readout`` of that state
    (:func:`~ffkv_lens.kernels.state_top`), which is the model's own prediction wherever
    it is the final residual (every decoder family; on post-LN BERT it is the sum before the
    last LayerNorm, like every ``o`` there).

    Args:
        model: The model's :class:`~ffkv_lens.MemoryLens` or :class:`~ffkv_lens.adapters.MemoryAdapter`.
        batch: Prefixes, one analysed position per row (``batch.last``).
        layers: Layers to keep.

    Returns:
        The states at the sampled positions (``r`` derived on parallel blocks).
    """
    adapter = as_adapter(model)
    dev = adapter.device
    rows, cols = torch.arange(batch.tokens.shape[0], device=dev), batch.last.to(dev)
    kept: dict[str, Tensor] = {}

    def keep(tensor: Tensor, hook: Any) -> None:
        kept[hook.name] = tensor.detach()[rows, cols]

    last = adapter.hook_names(adapter.n_layers - 1).resid_after_ffn
    names = [n for layer in layers for n in _layer_names(adapter.hook_names(layer))] + [last]
    with adapter.inference():
        adapter.run_with_hooks(
            batch.tokens.to(dev),
            [(n, keep) for n in dict.fromkeys(names)],
            attention_mask=batch.attention_mask.to(dev),
            stop_after=last,
        )
        missing = [n for n in names if n not in kept]
        if missing:
            raise HookNotFiredError(f"These hooks did not fire during the forward pass: {missing}.")
        final = state_top(adapter, kept[last])
    hooks = [adapter.hook_names(layer) for layer in layers]
    stack = lambda get: torch.stack([get(h, layer) for h, layer in zip(hooks, layers, strict=True)], 1)  # noqa: E731
    return SampledStates(
        stack(lambda h, _: kept[h.coefficients]),
        stack(lambda h, _: kept[h.ffn_output]),
        stack(lambda _, layer: adapter.residual_before_ffn(kept, layer)),
        stack(lambda h, _: kept[h.resid_after_ffn]),
        final,
    )


def _layer_names(hooks: LayerHooks) -> list[str]:
    names = [hooks.coefficients, hooks.ffn_output, hooks.resid_after_ffn]
    return names + ([hooks.resid_before_ffn] if hooks.resid_before_ffn is not None else [])
