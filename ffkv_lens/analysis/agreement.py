"""Do values predict what follows their keys' triggers? (Geva et al. 2021, section 4, Fig 4-6, Table 2).

For every memory of a layer, compare the value's top token (:mod:`ffkv_lens.analysis.values`)
with the next token of the key's top-1 trigger example (:class:`ffkv_lens.TriggerAtlas`).
Per layer: the agreement rate with a bootstrap confidence interval over memories, the median
rank of the next token in the value's distribution, and three baselines (uniform, corpus
unigram of next tokens, values permuted among the layer's keys). Per memory: agreement, rank
and precision@k over all the key's trigger examples (the paper's Table 2).

``variant="signed"`` reads the negative side of a signed atlas: a memory with ``m < 0`` adds
``-|m| v``, which promotes the tokens where ``v``'s logit is lowest, so the value's *bottom*
token is compared with the next tokens of the key's *bottom-k* (most negative) examples, and
ranks count from the bottom.

Example:
    >>> atlas = lens.search_triggers(fk.Corpus.default(), max_tokens=20_000, k=50)  # doctest: +SKIP
    >>> result = value_agreement(lens, atlas)  # doctest: +SKIP
    >>> result.per_layer[["layer", "agreement_rate", "baseline_unigram", "median_rank"]]  # doctest: +SKIP
"""

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from jaxtyping import Int
from torch import Tensor

from ffkv_lens.adapters import AdapterLike, MemoryAdapter, as_adapter
from ffkv_lens.analysis.atlas import TriggerAtlas
from ffkv_lens.analysis.values import ValueProjection, project_values_and_ranks, value_ranks
from ffkv_lens.errors import AtlasMismatchError, ConfigError

__all__ = ["AgreementConfig", "AgreementResult", "agreement_targets", "next_token_ids", "value_agreement"]

log = logging.getLogger(__name__)
Variant = Literal["paper", "signed"]
_VARIANTS = ("paper", "signed")
DEFINITIONS = {
    "value_token": "paper: the value's top token (highest logit); signed: its bottom token (lowest logit)",
    "trigger": "paper: the key's top-1 trigger example; signed: its most negative example (bottom-1)",
    "next_token": "token_ids[position + 1] of the example's unit; none when the peak is the unit's last token",
    "agreement_rate": "share of counted memories whose value token equals the top-1 trigger's next token",
    "counted": "memories whose top-1 trigger has a next token (n_no_next counts the others)",
    "ci": "percentile bootstrap over the counted memories of the layer",
    "rank": "tokens with a strictly greater logit than the next token (signed: strictly lower); 0 = top",
    "precision_at_k": "share of the key's trigger examples that have a next token whose next token is the value token",
    "baseline_uniform": "1 / d_vocab",
    "baseline_unigram": "mean over counted memories of p(value token) under atlas.next_token_counts",
    "baseline_permuted": "agreement with value tokens shuffled among all the layer's memories, mean over permutations",
}


@dataclass(frozen=True)
class AgreementConfig:
    """Settings of :func:`value_agreement` that change its numbers.

    Attributes:
        variant: ``"paper"`` (top token vs top-1 trigger) or ``"signed"`` (bottom token vs the
            most negative trigger; needs a signed atlas).
        n_bootstrap: Bootstrap resamples for the confidence interval (0: no interval).
        n_permutations: Key/value permutations for the permuted baseline (0: none).
        seed: Seed of the bootstrap and the permutations.
        ci: Confidence level of the interval.
    """

    variant: Variant = "paper"
    n_bootstrap: int = 1000
    n_permutations: int = 20
    seed: int = 0
    ci: float = 0.95

    def __post_init__(self) -> None:
        if self.variant not in _VARIANTS:
            raise ConfigError(f"variant={self.variant!r}; allowed: {_VARIANTS}.")
        for name in ("n_bootstrap", "n_permutations", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name}={value!r}; pass a non-negative integer.")
        if not 0 < self.ci < 1:
            raise ConfigError(f"ci={self.ci!r}; pass a confidence level strictly between 0 and 1, e.g. 0.95.")

    @property
    def sign(self) -> int:
        """1 for the paper's variant, -1 for the negative side."""
        return 1 if self.variant == "paper" else -1


@dataclass(frozen=True, eq=False)
class AgreementResult:
    """Value/trigger agreement of every layer of an atlas.

    Attributes:
        per_layer: One row per layer (columns in ``docs/values.md``).
        per_memory: One row per (layer, key).
        settings: Every setting and definition behind the numbers.
    """

    per_layer: Any
    per_memory: Any
    settings: dict[str, Any]

    def to_pandas(self) -> Any:
        """The per-layer table."""
        return self.per_layer


def agreement_targets(atlas: TriggerAtlas, sign: int = 1) -> dict[int, Int[Tensor, " d_mlp"]]:
    """Per layer, the next token of each key's top-1 (``sign=-1``: bottom-1) trigger; ``-1`` if none.

    These are the tokens whose rank ``value_agreement`` needs; pass them to
    ``project_values(rank_targets={sign: ...})`` to rank them during the projection.
    """
    return {layer: next_token_ids(atlas, layer, sign=sign)[:, 0] for layer in atlas.layers}


def next_token_ids(atlas: TriggerAtlas, layer: int, *, sign: int = 1) -> Int[Tensor, "d_mlp k"]:
    """Next token id of every trigger example of ``layer`` (``-1``: empty slot or unit end).

    Read from the atlas's tensors: the example at unit-own position ``p`` is followed by
    ``token_ids[p + 1]``, and by nothing when ``p`` is the unit's last token.
    """
    if sign == -1 and not atlas.signed:
        raise ConfigError("sign=-1 needs an atlas searched with signed=True; this one was not.")
    table = (atlas.top if sign == 1 else atlas.bottom).get(layer)
    if table is None:
        raise ConfigError(f"layer={layer!r} was not searched; searched layers: {atlas.layers}.")
    store = atlas.units
    filled = table.units >= 0
    out = torch.full(table.units.shape, -1, dtype=torch.long)
    if not filled.any():
        return out
    rows = torch.searchsorted(store.unit_ids, table.units.clamp_min(0)).clamp_max(len(store) - 1)
    if bool((store.unit_ids[rows] != table.units)[filled].any()):
        raise AtlasMismatchError("The atlas references units whose tokens it does not store; it is damaged.")
    start, end = store.offsets[rows], store.offsets[rows + 1]
    where = start + table.positions.long() + 1
    has = filled & (where < end)
    out[has] = store.tokens[where[has]].long()
    return out


def _generator(seed: int, layer: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + layer * 2 + stream)


def _bootstrap(hits: Tensor, config: AgreementConfig, layer: int) -> tuple[float, float]:
    n = hits.numel()
    if n == 0 or config.n_bootstrap == 0:
        return math.nan, math.nan
    gen = _generator(config.seed, layer, 0)
    rates = []
    for start in range(0, config.n_bootstrap, 256):  # bounded memory: 256 x n indices at a time
        reps = min(256, config.n_bootstrap - start)
        rates.append(hits[torch.randint(n, (reps, n), generator=gen)].mean(dim=1))
    tail = (1 - config.ci) / 2
    low, high = torch.quantile(torch.cat(rates), torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return low, high


def _permuted(value_tok: Tensor, next_tok: Tensor, keys: Tensor, config: AgreementConfig, layer: int) -> float:
    if keys.numel() == 0 or config.n_permutations == 0:
        return math.nan
    gen = _generator(config.seed, layer, 1)
    rates = [
        (value_tok[torch.randperm(value_tok.numel(), generator=gen)][keys] == next_tok[keys]).double().mean()
        for _ in range(config.n_permutations)
    ]
    return float(torch.stack(rates).mean())


def _unigram(atlas: TriggerAtlas) -> Tensor | None:
    counts = atlas.next_token_counts
    if counts is None or int(counts.sum()) == 0:
        log.warning("The atlas has no next-token counts: baseline_unigram is NaN.")
        return None
    return counts.double() / counts.sum()


def _layer(
    adapter: MemoryAdapter,
    layer: int,
    value_tok: Tensor,
    nxt: Tensor,
    ranks: Tensor,
    config: AgreementConfig,
    unigram: Tensor | None,
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    top1_next = nxt[:, 0]
    keys = (top1_next >= 0).nonzero().squeeze(1)
    agrees = value_tok == top1_next
    valid = nxt >= 0
    n_examples = valid.sum(dim=1)
    precision = ((nxt == value_tok[:, None]) & valid).sum(dim=1).double() / n_examples.double()
    hits = agrees[keys].double()
    low, high = _bootstrap(hits, config, layer)
    row = {
        "layer": layer,
        "agreement_rate": float(hits.mean()) if keys.numel() else math.nan,
        "agreement_ci_low": low,
        "agreement_ci_high": high,
        "median_rank": _median(ranks[keys]),
        "mean_precision_at_k": float(precision[n_examples > 0].mean()) if bool((n_examples > 0).any()) else math.nan,
        "baseline_uniform": 1.0 / adapter.d_vocab,
        "baseline_unigram": float(unigram[value_tok[keys]].mean())
        if unigram is not None and keys.numel()
        else math.nan,
        "baseline_permuted": _permuted(value_tok, top1_next, keys, config, layer),
        "n_memories": int(keys.numel()),
        "n_no_next": int(top1_next.numel() - keys.numel()),
    }
    counted = top1_next >= 0
    memory = {"value_tok": value_tok, "next": top1_next, "agrees": agrees, "counted": counted, "ranks": ranks}
    return row, dict(memory, precision=precision, n_examples=n_examples)


def _median(x: Tensor) -> float:
    return float(x.double().quantile(0.5)) if x.numel() else math.nan


def _memory_frame(layer: int, parts: dict[str, Tensor], decode: dict[int, str]) -> Any:
    import pandas as pd

    counted = parts["counted"].numpy()
    nxt = parts["next"].tolist()
    agrees = [bool(a) if c else None for a, c in zip(parts["agrees"].tolist(), counted, strict=True)]
    return pd.DataFrame(
        {
            "layer": layer,
            "key": range(counted.size),
            "value_top_token_id": parts["value_tok"].numpy(),
            "value_top_token": [decode[t] for t in parts["value_tok"].tolist()],
            "top1_next_token_id": pd.array([t if t >= 0 else None for t in nxt], dtype="Int64"),
            "top1_next_token": [decode[t] if t >= 0 else None for t in nxt],
            "agrees": pd.array(agrees, dtype="boolean"),
            "rank": pd.array([r if r >= 0 else None for r in parts["ranks"].tolist()], dtype="Int64"),
            "precision_at_k": parts["precision"].numpy(),
            "n_examples": parts["n_examples"].numpy(),
        }
    )


def _decoder(adapter: MemoryAdapter, parts: list[dict[str, Tensor]]) -> dict[int, str]:
    ids = sorted({t for p in parts for name in ("value_tok", "next") for t in p[name].tolist() if t >= 0})
    return dict(zip(ids, adapter.tokenizer.batch_decode([[t] for t in ids]), strict=True))


def _projection_and_ranks(
    adapter: MemoryAdapter,
    atlas: TriggerAtlas,
    projection: ValueProjection | None,
    targets: dict[int, Tensor],
    sign: int,
) -> tuple[ValueProjection, dict[int, Tensor]]:
    """The projection and the rank of each memory's target (-1: none), in one pass when projecting here."""
    if projection is None:
        return project_values_and_ranks(adapter, top_k=1, layers=atlas.layers, targets=targets, sign=sign)
    _check_projection(adapter, atlas, projection)
    stored = projection.target_ranks.get(sign, {})
    if all(layer in stored and torch.equal(stored[layer][:, 0], target) for layer, target in targets.items()):
        return projection, {layer: stored[layer][:, 1] for layer in targets}  # ranked with the projection
    ranks = {}
    for layer, target in targets.items():
        ranks[layer] = torch.full_like(target, -1)
        keys = (target >= 0).nonzero().squeeze(1)
        chunk = projection.settings.get("chunk_memories")
        ranks[layer][keys] = value_ranks(adapter, layer, keys, target[keys], sign=sign, chunk_memories=chunk)
    return projection, ranks


def _check_projection(adapter: MemoryAdapter, atlas: TriggerAtlas, projection: ValueProjection) -> None:
    got = (projection.settings["d_vocab"], projection.settings["d_mlp"], projection.settings["value_readout_mode"])
    want = (adapter.d_vocab, adapter.d_mlp, adapter.value_readout_mode)
    if got != want:
        raise AtlasMismatchError(
            f"The projection has (d_vocab, d_mlp, readout) = {got}, the lens {want}; project with this lens."
        )
    missing = [layer for layer in atlas.layers if layer not in projection.top1]
    if missing:
        raise ConfigError(
            f"The projection lacks layers {missing} of the atlas; pass project_values(lens, layers={atlas.layers})."
        )


def _settings(
    adapter: MemoryAdapter, atlas: TriggerAtlas, projection: ValueProjection, config: AgreementConfig
) -> dict[str, Any]:
    manifest = atlas.manifest
    return dict(
        asdict(config),
        definitions=DEFINITIONS,
        value_readout_mode=projection.settings["value_readout_mode"],
        projection={key: value for key, value in projection.settings.items() if key != "model"},
        atlas={
            "model": manifest.get("model"),
            "corpus": manifest.get("corpus"),
            "settings": manifest.get("settings"),
            "tokenizer_fingerprint": manifest.get("tokenizer_fingerprint"),
            "progress": manifest.get("progress"),
        },
        model=adapter.describe(),
    )


def value_agreement(
    model: AdapterLike,
    atlas: TriggerAtlas,
    projection: ValueProjection | None = None,
    *,
    variant: Variant = "paper",
    n_bootstrap: int = 1000,
    n_permutations: int = 20,
    seed: int = 0,
) -> AgreementResult:
    """Agreement between each value's top token and the next token of its key's top trigger.

    Args:
        model: A :class:`ffkv_lens.MemoryLens` or its :class:`~ffkv_lens.adapters.MemoryAdapter`.
        atlas: A :class:`ffkv_lens.TriggerAtlas` made with the same model (checked).
        projection: A :class:`ValueProjection` covering the atlas's layers; computed if None.
        variant: ``"paper"`` or ``"signed"`` (bottom token vs most negative triggers).
        n_bootstrap: Bootstrap resamples of the per-layer confidence interval.
        n_permutations: Permutations of the permuted baseline.
        seed: Seed of the bootstrap and the permutations.

    Returns:
        An :class:`AgreementResult` (tables in ``docs/values.md``).
    """
    import pandas as pd

    config = AgreementConfig(variant, n_bootstrap, n_permutations, seed)
    adapter = as_adapter(model)
    atlas.check_matches(adapter)
    if config.sign == -1 and not atlas.signed:
        raise ConfigError("variant='signed' needs an atlas searched with signed=True; search again or use 'paper'.")
    sign = config.sign
    nexts = {layer: next_token_ids(atlas, layer, sign=sign) for layer in atlas.layers}
    with torch.no_grad():
        targets = {layer: nxt[:, 0] for layer, nxt in nexts.items()}  # = agreement_targets(atlas, sign)
        projection, ranks = _projection_and_ranks(adapter, atlas, projection, targets, sign)
    unigram = _unigram(atlas)
    rows, parts = [], []
    for layer in atlas.layers:
        value_tok = (projection.top1 if sign == 1 else projection.bottom1)[layer].long()
        row, part = _layer(adapter, layer, value_tok, nexts[layer], ranks[layer], config, unigram)
        rows.append(row)
        parts.append(part)
    decode = _decoder(adapter, parts)
    settings = _settings(adapter, atlas, projection, config)
    per_layer = pd.DataFrame(rows)
    frames = [_memory_frame(layer, part, decode) for layer, part in zip(atlas.layers, parts, strict=True)]
    per_memory = pd.concat(frames, ignore_index=True)
    per_layer.attrs["settings"] = per_memory.attrs["settings"] = settings
    return AgreementResult(per_layer, per_memory, settings)
