"""Composition within a layer and residual vs FFN across layers (Geva et al. 2021, section 5).

One pass over randomly sampled prefixes (:mod:`ffkv_lens.analysis.sampling`). At each sampled
position and each layer, the forward pass records the memory coefficients ``m``, the FFN output
``y``, the residual ``r`` the FFN output is added to and ``o = r + y``. ``top(x)`` is
``argmax lens.readout(x)`` (final norm with fresh statistics, unembedding, soft-cap; BERT: the
MLM head). The model's final prediction is ``top(o)`` of the last layer: its output on every
decoder family (on post-LN BERT, ``o`` is the sum before the last LayerNorm).

*Composition* (Fig 7-8): which memories are *active* (``"positive"``: ``m_i > 0``; ``"magnitude"``:
``|m_i| >= active_threshold * max_j |m_j|`` and ``m_i != 0``); an active memory predicts its value's
top token when ``m_i > 0`` and its bottom token when ``m_i < 0`` (from ``lens.value_logits``); the
layer predicts ``top(y)``. ``no_memory_agrees`` is the share of positions where no active memory
predicts what the layer predicts.

*Residual* (Fig 9-11): how often ``top(r)`` is the final prediction, the probability of the final
token under ``softmax(readout(r))``, and each position's bucket: *agreement* (``top(r) = top(y) =
top(o)``), *residual* (``top(o) = top(r) != top(y)``), *ffn* (``top(o) = top(y) != top(r)``),
*other* (``top(r) = top(y) != top(o)``, possible through the final norm) and *composition*
(all three differ). The five shares sum to 1.
"""

import logging
import time
import unicodedata
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ffkv_lens.adapters import AdapterLike, MemoryAdapter, as_adapter
from ffkv_lens.analysis.sampling import (
    Prefix,
    SampleConfig,
    SampledStates,
    prefix_batches,
    record_states,
    sample_prefixes,
)
from ffkv_lens.analysis.values import ValueProjection, value_extremes
from ffkv_lens.corpus import Corpus, UnitKind
from ffkv_lens.errors import AtlasMismatchError, ConfigError
from ffkv_lens.kernels import state_tops

__all__ = [
    "BUCKETS",
    "STOPWORDS",
    "DynamicsConfig",
    "DynamicsResult",
    "PositionRecords",
    "active_memories",
    "bucket_codes",
    "composition",
    "composition_table",
    "layer_dynamics",
    "memory_agreement",
    "residual_agreement",
    "residual_table",
    "wilson_interval",
]

log = logging.getLogger(__name__)

ActiveMode = Literal["positive", "magnitude"]
_ACTIVE = ("positive", "magnitude")
DEFAULT_ACTIVE_THRESHOLD = 0.1
DEFAULT_SHORT_PREFIX = 5
BUCKETS = ("residual", "ffn", "agreement", "composition", "other")
_Z95 = 1.959963984540054
STOPWORDS_SOURCE = "NLTK English stop-word list (nltk_data corpora/stopwords/english, 179 words), built in"
STOPWORDS = frozenset(
    """i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself yourselves he
    him his himself she she's her hers herself it it's its itself they them their theirs themselves what which
    who whom this that that'll these those am is are was were be been being have has had having do does did
    doing a an the and but if or because as until while of at by for with about against between into through
    during before after above below to from up down in out on off over under again further then once here there
    when where why how all any both each few more most other some such no nor not only own same so than too very
    s t can will just don don't should should've now d ll m o re ve y ain aren aren't couldn couldn't didn
    didn't doesn doesn't hadn hadn't hasn hasn't haven haven't isn isn't ma mightn mightn't mustn mustn't needn
    needn't shan shan't shouldn shouldn't wasn wasn't weren weren't won won't wouldn wouldn't""".split()
)


class PositionRecords(NamedTuple):
    """Per-position values behind the tables: ``[n]`` or ``[n, layer]`` (layers as analysed).

    Attributes:
        unit_id: The prefix's unit.
        doc_id: The unit's document.
        position: Index of the analysed token among the unit's tokens.
        prefix_len: Tokens in the prefix, BOS not counted (``position + 1``).
        final_token: The model's final prediction, ``argmax lens.readout`` of the last layer's ``o``.
        n_active: Number of active memories.
        agrees: Whether some active memory predicts the layer's token ``top(y)``.
        top_r: ``top(r)``, the residual's prediction.
        top_y: ``top(y)``, the layer's (FFN output's) prediction.
        top_o: ``top(o)``, the prediction after the FFN.
        prob_r: Probability of ``final_token`` under ``softmax(readout(r))``.
    """

    unit_id: Int[Tensor, " n"]
    doc_id: Int[Tensor, " n"]
    position: Int[Tensor, " n"]
    prefix_len: Int[Tensor, " n"]
    final_token: Int[Tensor, " n"]
    n_active: Int[Tensor, "n layer"]
    agrees: Bool[Tensor, "n layer"]
    top_r: Int[Tensor, "n layer"]
    top_y: Int[Tensor, "n layer"]
    top_o: Int[Tensor, "n layer"]
    prob_r: Float[Tensor, "n layer"]


@dataclass(frozen=True)
class DynamicsConfig:
    """Every setting of the section-5 analyses that changes the numbers.

    Attributes:
        sample: Which prefixes are analysed.
        active: ``"positive"`` (``m_i > 0``, ReLU's meaning) or ``"magnitude"``
            (``|m_i| >= active_threshold * max_j |m_j|``, for signed gated activations).
        active_threshold: Fraction of the position's largest ``|m_j|`` (``"magnitude"`` only).
        short_prefix: Prefixes with fewer tokens than this (BOS not counted) are short.
        layers: Layers analysed (sorted), or ``None`` for all.
    """

    sample: SampleConfig = SampleConfig()
    active: ActiveMode = "positive"
    active_threshold: float = DEFAULT_ACTIVE_THRESHOLD
    short_prefix: int = DEFAULT_SHORT_PREFIX
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.active not in _ACTIVE:
            raise ConfigError(f"active={self.active!r} is not allowed; choose one of {list(_ACTIVE)}.")
        threshold = self.active_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0 < threshold <= 1:
            raise ConfigError(f"active_threshold={threshold!r} is not allowed; pass a number in (0, 1].")
        if isinstance(self.short_prefix, bool) or not isinstance(self.short_prefix, int) or self.short_prefix < 1:
            raise ConfigError(f"short_prefix={self.short_prefix!r} is not allowed; pass an integer >= 1.")

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable settings."""
        out = asdict(self)
        out["sample"] = self.sample.to_dict()
        out["layers"] = None if self.layers is None else list(self.layers)
        if self.active == "positive":
            out["active_threshold"] = None
        return out


@dataclass(frozen=True)
class DynamicsResult:
    """Both section-5 analyses from one pass.

    Attributes:
        composition: One row per layer (paper Fig 7-8); see :func:`composition`.
        residual: One row per layer (paper Fig 9-11); see :func:`residual_agreement`.
        samples: One row per sampled prefix: unit, document, position, length, final token.
        records: The per-position, per-layer values the tables summarise.
        settings: Every setting that changes the numbers (also each table's ``attrs["settings"]``).
        seconds: Wall-clock time of the whole analysis.
    """

    composition: pd.DataFrame
    residual: pd.DataFrame
    samples: pd.DataFrame
    records: PositionRecords
    settings: dict[str, Any]
    seconds: float


# -- pure functions ---------------------------------------------------------------------------
def active_memories(
    m: Float[Tensor, "*batch d_mlp"], mode: ActiveMode, threshold: float = DEFAULT_ACTIVE_THRESHOLD
) -> Bool[Tensor, "*batch d_mlp"]:
    """Which memories are active.

    Example:
        >>> active_memories(torch.tensor([2.0, -1.0, 0.1, 0.0]), "magnitude", 0.1).tolist()
        [True, True, False, False]
    """
    if mode == "positive":
        return m > 0
    scale = m.abs().amax(dim=-1, keepdim=True)
    return (m.abs() >= threshold * scale) & (m != 0)


def memory_agreement(
    m: Float[Tensor, "batch d_mlp"],
    active: Bool[Tensor, "batch d_mlp"],
    layer_top: Int[Tensor, " batch"],
    value_top: Int[Tensor, " d_mlp"],
    value_bottom: Int[Tensor, " d_mlp"],
) -> Bool[Tensor, " batch"]:
    """Whether some active memory predicts the layer's token (top token if m > 0, bottom if m < 0).

    Example:
        >>> m = torch.tensor([[1.0, -2.0], [1.0, -2.0]])
        >>> memory_agreement(m, m != 0, torch.tensor([8, 5]), torch.tensor([7, 8]), torch.tensor([4, 5])).tolist()
        [False, True]
    """
    predicted = torch.where(m > 0, value_top, value_bottom)
    return (active & (predicted == layer_top[:, None])).any(dim=-1)


def bucket_codes(
    top_r: Int[Tensor, "*shape"], top_y: Int[Tensor, "*shape"], top_o: Int[Tensor, "*shape"]
) -> Int[Tensor, "*shape"]:
    """Index into :data:`BUCKETS` of each position's update (the five cases partition all).

    Example:
        >>> r, y, o = torch.tensor([1, 1, 1, 1, 1]), torch.tensor([1, 2, 2, 2, 1]), torch.tensor([1, 1, 2, 3, 3])
        >>> [BUCKETS[i] for i in bucket_codes(r, y, o).tolist()]
        ['agreement', 'residual', 'ffn', 'composition', 'other']
    """
    code = torch.full_like(top_r, BUCKETS.index("composition"))
    code[(top_o == top_r) & (top_r != top_y)] = BUCKETS.index("residual")
    code[(top_o == top_y) & (top_y != top_r)] = BUCKETS.index("ffn")
    code[(top_o == top_r) & (top_r == top_y)] = BUCKETS.index("agreement")
    code[(top_r == top_y) & (top_o != top_r)] = BUCKETS.index("other")
    return code


def wilson_interval(successes: np.ndarray, n: np.ndarray, z: float = _Z95) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of a binomial proportion (NaN where ``n`` is 0).

    Example:
        >>> [round(float(x[0]), 4) for x in wilson_interval(np.array([5]), np.array([10]))]
        [0.2366, 0.7634]
    """
    k, n = np.asarray(successes, dtype=float), np.asarray(n, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = k / n
        denom = 1 + z**2 / n
        centre = (p + z**2 / (2 * n)) / denom
        half = z * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / denom
    return np.clip(centre - half, 0.0, 1.0), np.clip(centre + half, 0.0, 1.0)


def token_kinds(tokens: list[int], tokenizer: Any) -> dict[int, tuple[bool, bool]]:
    """``{token: (is_stop_word, is_punctuation)}``: the decoded token, stripped and lower-cased."""
    kinds = {}
    for token in set(tokens):
        text = tokenizer.decode([token], clean_up_tokenization_spaces=False).strip().lower()
        punct = bool(text) and all(unicodedata.category(c).startswith("P") for c in text)
        kinds[token] = (text in STOPWORDS, punct)
    return kinds


def _share(columns: dict[str, Any], name: str, hits: np.ndarray, n: np.ndarray) -> None:
    with np.errstate(invalid="ignore", divide="ignore"):
        columns[name] = hits / n
    columns[f"{name}_ci_low"], columns[f"{name}_ci_high"] = wilson_interval(hits, n)


def _layer_columns(layers: list[int], n_layers: int, n: int) -> dict[str, Any]:
    return {"layer": layers, "depth": [(layer + 1) / n_layers for layer in layers], "n_positions": [n] * len(layers)}


def composition_table(
    records: PositionRecords, layers: list[int], n_layers: int, d_mlp: int, tokenizer: Any,
    short_prefix: int = DEFAULT_SHORT_PREFIX,
) -> pd.DataFrame:  # fmt: skip
    """One row per layer: active memories and whether some memory agrees with the layer."""
    n = records.top_y.shape[0]
    agrees = records.agrees.numpy()
    kinds = token_kinds(records.top_y[records.agrees].tolist(), tokenizer)
    stop = np.vectorize(lambda t: kinds.get(t, (False, False))[0], otypes=[bool])(records.top_y.numpy())
    punct = np.vectorize(lambda t: kinds.get(t, (False, False))[1], otypes=[bool])(records.top_y.numpy())
    short = (records.prefix_len.numpy() < short_prefix)[:, None]
    n_agree = agrees.sum(0)
    columns = _layer_columns(layers, n_layers, n)
    columns["active_mean"] = records.n_active.double().mean(0).numpy()
    columns["active_fraction"] = columns["active_mean"] / d_mlp
    _share(columns, "no_memory_agrees", n - n_agree, np.full(len(layers), n))
    columns["n_agree"] = n_agree
    _share(columns, "agree_stopword_share", (agrees & stop).sum(0), n_agree)
    _share(columns, "agree_short_prefix_share", (agrees & short).sum(0), n_agree)
    _share(columns, "agree_punctuation_share", (agrees & punct).sum(0), n_agree)
    return pd.DataFrame(columns)


def residual_table(records: PositionRecords, layers: list[int], n_layers: int) -> pd.DataFrame:
    """One row per layer: the residual's prediction against the final one, and the update's bucket."""
    n = records.top_r.shape[0]
    total = np.full(len(layers), n)
    columns = _layer_columns(layers, n_layers, n)
    _share(columns, "resid_matches_final", (records.top_r == records.final_token[:, None]).sum(0).numpy(), total)
    columns["resid_prob_final_median"] = records.prob_r.double().quantile(0.5, dim=0).numpy()
    columns["resid_prob_final_mean"] = records.prob_r.double().mean(0).numpy()
    codes = bucket_codes(records.top_r, records.top_y, records.top_o)
    for index, bucket in enumerate(BUCKETS):
        _share(columns, f"frac_{bucket}", (codes == index).sum(0).numpy(), total)
    return pd.DataFrame(columns)


def _batch_records(
    adapter: MemoryAdapter, states: SampledStates, extremes: list[tuple[Tensor, Tensor]], config: DynamicsConfig
) -> dict[str, Tensor]:
    """Per-position, per-layer records of one batch (``[batch, layer]`` each)."""
    b, n_layers, d = states.ffn_output.shape
    flat = lambda x: x.reshape(b * n_layers, d)  # noqa: E731
    final = states.final_token.cpu()
    targets = final[:, None].expand(b, n_layers).reshape(-1)
    tops = state_tops(adapter, flat(states.resid_before), flat(states.ffn_output), flat(states.resid_after), targets)
    top_r, top_y, top_o, prob_r = (x.view(b, n_layers) for x in (tops.top_r, tops.top_y, tops.top_o, tops.prob_r))
    layers = list(config.layers or ())
    if adapter.n_layers - 1 in layers:  # there top(o) is the final prediction, read once (no rounding apart)
        top_o[:, layers.index(adapter.n_layers - 1)] = final
    m = states.coefficients.cpu()
    active = active_memories(m, config.active, config.active_threshold)
    agrees = torch.stack(
        [memory_agreement(m[:, i], active[:, i], top_y[:, i], *extremes[i]) for i in range(n_layers)], 1
    )
    return dict(n_active=active.sum(-1), agrees=agrees, top_r=top_r, top_y=top_y, top_o=top_o, prob_r=prob_r)


# -- the analysis -------------------------------------------------------------------------------
def layer_dynamics(
    model: AdapterLike,
    corpus: Corpus | Iterable[tuple[int, str]],
    *,
    positions: int = 4000,
    seed: int = 0,
    active: ActiveMode = "positive",
    active_threshold: float = DEFAULT_ACTIVE_THRESHOLD,
    layers: int | list[int] | None = None,
    unit: UnitKind = "sentence",
    max_len: int = 128,
    max_units: int | None = None,
    short_prefix: int = DEFAULT_SHORT_PREFIX,
    batch_tokens: int = 4096,
    progress: bool = True,
    projection: ValueProjection | None = None,
) -> DynamicsResult:
    """Composition within each layer and residual vs FFN across layers (paper section 5).

    Both analyses come from the same forward passes over ``positions`` random prefixes.

    Args:
        model: The model's :class:`~ffkv_lens.MemoryLens` or :class:`~ffkv_lens.adapters.MemoryAdapter`.
        corpus: A :class:`~ffkv_lens.Corpus` (or an iterable of ``(doc_id, text)``).
        positions: Prefixes to analyse (the paper used 4,000).
        seed: Seed of the prefix sample.
        active: ``"positive"`` (``m_i > 0``) or ``"magnitude"`` (``|m_i| >= threshold * max |m|``).
        active_threshold: The fraction for ``"magnitude"``.
        layers: Layers to analyse (default all).
        unit: Units the prefixes are cut from (``"sentence"``: the paper's).
        max_len: Longest unit in tokens (BOS not counted).
        max_units: Read at most this many units (default: the whole corpus).
        short_prefix: Prefixes shorter than this many tokens count as short.
        batch_tokens: Padded tokens per forward pass (speed and memory only).
        progress: Show a progress bar.
        projection: A :class:`~ffkv_lens.analysis.values.ValueProjection` of this lens covering
            ``layers`` (``lens.project_values()``): its top and bottom tokens are the memories'
            predictions, which saves projecting every value again (the same tokens: both order
            by ``lens.value_logits``, ties to the lower id). Default: projected here.

    Returns:
        A :class:`DynamicsResult` with the ``composition`` and ``residual`` tables.

    Example:
        >>> result = layer_dynamics(lens, fk.Corpus.default(), positions=500)  # doctest: +SKIP
        >>> result.residual[["layer", "resid_matches_final", "frac_composition"]]  # doctest: +SKIP
    """
    adapter = as_adapter(model)
    chosen = adapter.check_layers(layers)
    sample = SampleConfig(positions, seed, unit, max_len, max_units)
    config = DynamicsConfig(sample, active, active_threshold, short_prefix, tuple(chosen))
    start = time.perf_counter()
    drawn = sample_prefixes(corpus, adapter.tokenizer, sample)
    if not drawn.prefixes:
        raise ConfigError(f"The corpus gave no {unit} units to sample prefixes from; pass a non-empty corpus.")
    with adapter.inference():
        extremes = _memory_predictions(adapter, chosen, projection)
        records = _run(adapter, drawn.prefixes, extremes, config, batch_tokens, progress)
    settings = _settings(adapter, corpus, config, drawn.units_read, len(drawn.prefixes), batch_tokens)
    comp = composition_table(records, chosen, adapter.n_layers, adapter.d_mlp, adapter.tokenizer, short_prefix)
    resid = residual_table(records, chosen, adapter.n_layers)
    for table in (comp, resid):
        table.attrs["settings"] = settings
    per_prefix = ("unit_id", "doc_id", "position", "prefix_len", "final_token")
    samples = pd.DataFrame({name: getattr(records, name).numpy() for name in per_prefix})
    seconds = time.perf_counter() - start
    log.info("layer dynamics: %d prefixes x %d layers in %.1f s", len(drawn.prefixes), len(chosen), seconds)
    return DynamicsResult(comp, resid, samples, records, settings, seconds)


def _memory_predictions(
    adapter: MemoryAdapter, layers: list[int], projection: ValueProjection | None
) -> list[tuple[Tensor, Tensor]]:
    """Each analysed layer's value top and bottom tokens, from ``projection`` when given."""
    if projection is None:
        return [value_extremes(adapter, layer) for layer in layers]
    got = tuple(projection.settings.get(key) for key in ("d_vocab", "d_mlp", "value_readout_mode"))
    want = (adapter.d_vocab, adapter.d_mlp, adapter.value_readout_mode)
    if got != want:
        raise AtlasMismatchError(
            f"The projection has (d_vocab, d_mlp, readout) = {got}, the lens {want}; project with this lens."
        )
    missing = [layer for layer in layers if layer not in projection.top1]
    if missing:
        raise ConfigError(f"The projection lacks layers {missing}; pass project_values(lens, layers={layers}).")
    return [(projection.top1[layer].long(), projection.bottom1[layer].long()) for layer in layers]


def _run(
    adapter: MemoryAdapter,
    prefixes: list[Prefix],
    extremes: list[tuple[Tensor, Tensor]],
    config: DynamicsConfig,
    batch_tokens: int,
    progress: bool,
) -> PositionRecords:
    from tqdm.auto import tqdm

    from ffkv_lens.distributed import all_sum_, shard, world

    tok = adapter.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    layers = list(config.layers or ())
    n, width = len(prefixes), len(layers)
    out = {k: torch.zeros(n, width, dtype=torch.int64) for k in ("n_active", "top_r", "top_y", "top_o")}
    out["agrees"] = torch.zeros(n, width, dtype=torch.bool)
    out["prob_r"] = torch.zeros(n, width, dtype=torch.float32)
    final = torch.zeros(n, dtype=torch.int64)
    here = world()
    bar = tqdm(total=n, unit="prefix", desc="layer dynamics", disable=not (progress and here.is_main))
    batches = prefix_batches(prefixes, batch_tokens=batch_tokens, bos_token_id=adapter.bos_token_id, pad_token_id=pad)
    for _, batch in shard(batches, here):  # batch i on rank i % size (all of them in a single process)
        states = record_states(adapter, batch, layers)
        for key, value in _batch_records(adapter, states, extremes, config).items():
            out[key][batch.index] = value.to(out[key].dtype)
        final[batch.index] = states.final_token.cpu()
        bar.update(len(batch.index) * here.size)
    bar.close()
    for tensor in (*out.values(), final):  # each rank filled only its rows: the sum is exact
        all_sum_(tensor, here)
    column = lambda attr: torch.tensor([getattr(p, attr) for p in prefixes], dtype=torch.int64)  # noqa: E731
    position = column("position")
    return PositionRecords(
        column("unit_id"), column("doc_id"), position, position + 1, final,
        out["n_active"], out["agrees"], out["top_r"], out["top_y"], out["top_o"], out["prob_r"],
    )  # fmt: skip


def _settings(
    adapter: MemoryAdapter,
    corpus: Corpus | Iterable[tuple[int, str]],
    config: DynamicsConfig,
    units_read: int,
    drawn: int,
    batch_tokens: int,
) -> dict[str, Any]:
    describe = getattr(corpus, "describe", None)
    return {
        "analysis": "layer_dynamics (Geva et al. 2021, section 5)",
        **config.to_dict(),
        "positions_drawn": drawn,
        "units_read": units_read,
        "has_bos": adapter.bos_token_id is not None,
        "active_definition": (
            "m_i > 0" if config.active == "positive" else f"|m_i| >= {config.active_threshold} * max_j |m_j|, m_i != 0"
        ),
        "memory_prediction": "value top token if m_i > 0, bottom token if m_i < 0, under lens.value_logits",
        "value_readout_mode": adapter.value_readout_mode,
        "state_readout": "argmax lens.readout(x): final norm with fresh statistics, unembedding, soft-cap",
        "final_prediction": "argmax lens.readout(resid_after_ffn of the last layer); post-LN: before the last LN",
        "buckets": list(BUCKETS),
        "stopwords": STOPWORDS_SOURCE,
        "ci": "Wilson score interval, 95%",
        "batch_tokens": batch_tokens,
        "model": adapter.describe(),
        "corpus": describe() if callable(describe) else None,
    }


def composition(model: AdapterLike, corpus: Corpus | Iterable[tuple[int, str]], **kwargs: Any) -> pd.DataFrame:
    """The composition table of :func:`layer_dynamics` (same keywords), one row per layer."""
    return layer_dynamics(model, corpus, **kwargs).composition


def residual_agreement(model: AdapterLike, corpus: Corpus | Iterable[tuple[int, str]], **kwargs: Any) -> pd.DataFrame:
    """The residual-vs-FFN table of :func:`layer_dynamics` (same keywords), one row per layer."""
    return layer_dynamics(model, corpus, **kwargs).residual
