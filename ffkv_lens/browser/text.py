"""Trigger-example text for the browser index, decoded once per unit.

A full atlas holds millions of examples (SmolLM2: 30 layers x 1536 keys x 50 x 2 = 4.6M) but
far fewer distinct *contexts*, the (unit, peak position) pairs they point at: an example's text
depends only on its context. So the text is made once per context, and without a tokenizer call
per context: each unit is decoded once, each distinct token once, and a prefix is the unit's text
cut at the sum of its tokens' decoded lengths.

That cut equals ``tokenizer.decode(tokens[:position + 1])`` (what :meth:`TriggerAtlas.examples`
shows) when decoding is concatenative, which this module checks per unit: the concatenated
single-token texts must equal the unit's text. Units that fail the check (a character split
across byte-level tokens, SentencePiece's dropped leading space, clean-up rules) fall back to
decoding their used prefixes exactly, two per context. :func:`normalize_token` is the key that
value tokens are indexed and searched by.

Example:
    >>> contexts = decode_contexts(atlas.units, atlas.tokenizer, units, positions)  # doctest: +SKIP
    >>> contexts.prefixes[0][contexts.peak_starts[0]:]  # the peak token's text  # doctest: +SKIP
"""

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Contexts", "context_keys", "decode_contexts", "decode_tokens", "normalize_token"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Contexts:
    """Distinct (unit, peak position) pairs with their text, in ``context_keys`` order.

    Attributes:
        unit_ids: Unit of each context.
        doc_ids: Document of each context's unit.
        positions: Peak position among the unit's tokens (-1: the BOS).
        prefixes: ``decode(tokens[:position + 1])``.
        peak_starts: Character offset in the prefix where the peak token's text starts.
        next_token_ids: Token after the peak, -1 at the unit's end.
        next_tokens: ``decode([next_token_id])``, ``None`` at the unit's end.
        exact_units: Units whose text was derived by offsets (the rest were decoded per prefix).
    """

    unit_ids: np.ndarray
    doc_ids: np.ndarray
    positions: np.ndarray
    prefixes: list[str]
    peak_starts: list[int]
    next_token_ids: np.ndarray
    next_tokens: list[str | None]
    exact_units: int


def context_keys(store: Any, units: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """One int64 per (unit, position) pair, ordered by unit then position (``units`` must be in ``store``)."""
    rows = np.searchsorted(store.unit_ids.numpy(), units)
    stride = int(np.diff(store.offsets.numpy()).max(initial=0)) + 2
    return rows.astype(np.int64) * stride + (positions.astype(np.int64) + 1)


def decode_tokens(tokenizer: Any, token_ids: np.ndarray) -> dict[int, str]:
    """``{id: tokenizer.decode([id])}`` for the distinct ids, in one batch call."""
    ids = np.unique(token_ids).tolist()
    return dict(zip(ids, tokenizer.batch_decode([[t] for t in ids]), strict=True))


def decode_contexts(store: Any, tokenizer: Any, keys: np.ndarray) -> Contexts:
    """Text of the distinct contexts ``keys`` (sorted, unique; from :func:`context_keys`).

    Args:
        store: The atlas's :class:`~ffkv_lens.analysis.atlas.UnitStore`.
        tokenizer: The atlas's tokenizer.
        keys: Sorted unique context keys.

    Returns:
        The contexts, aligned with ``keys``.
    """
    offsets, flat = store.offsets.numpy(), store.tokens.numpy()
    stride = int(np.diff(offsets).max(initial=0)) + 2
    rows, positions = keys // stride, keys % stride - 1
    used_rows, first = np.unique(rows, return_index=True)
    pieces = decode_tokens(tokenizer, flat) if flat.size else {}
    texts = tokenizer.batch_decode([flat[offsets[r] : offsets[r + 1]].tolist() for r in used_rows])
    prefixes: list[str] = []
    peak_starts: list[int] = []
    next_ids = np.full(keys.shape, -1, dtype=np.int64)
    exact = 0
    bounds = [*first.tolist(), keys.size]
    for i, row in enumerate(used_rows.tolist()):
        tokens = flat[offsets[row] : offsets[row + 1]]
        lo, hi = bounds[i], bounds[i + 1]
        wanted = positions[lo:hi]
        parts = [pieces[t] for t in tokens.tolist()]
        if "".join(parts) == texts[i]:
            exact += 1
            _by_offsets(texts[i], parts, wanted, prefixes, peak_starts)
        else:
            _by_decoding(tokenizer, tokens, wanted, prefixes, peak_starts)
        after = wanted + 1
        has_next = after < tokens.size
        next_ids[lo:hi][has_next] = tokens[after[has_next]]
    if used_rows.size > exact:
        log.info("%d of %d units decoded per prefix (not concatenative)", used_rows.size - exact, used_rows.size)
    return Contexts(
        unit_ids=store.unit_ids.numpy()[rows],
        doc_ids=store.doc_ids.numpy()[rows],
        positions=positions,
        prefixes=prefixes,
        peak_starts=peak_starts,
        next_token_ids=next_ids,
        next_tokens=[pieces[t] if t >= 0 else None for t in next_ids.tolist()],
        exact_units=exact,
    )


def _by_offsets(text: str, parts: list[str], wanted: np.ndarray, prefixes: list[str], starts: list[int]) -> None:
    ends = np.cumsum([0, *(len(p) for p in parts)])  # ends[p + 1]: end of token p's text
    for position in wanted.tolist():
        prefixes.append(text[: ends[position + 1]])
        starts.append(int(ends[max(position, 0)]))


def _by_decoding(
    tokenizer: Any, tokens: np.ndarray, wanted: np.ndarray, prefixes: list[str], starts: list[int]
) -> None:
    ids = tokens.tolist()
    cuts = wanted.tolist()
    upto = tokenizer.batch_decode([ids[: p + 1] for p in cuts])
    before = tokenizer.batch_decode([ids[: max(p, 0)] for p in cuts])
    for prefix, shorter, position in zip(upto, before, cuts, strict=True):
        prefixes.append(prefix)
        starts.append(0 if position < 1 else _common_prefix(prefix, shorter))


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def normalize_token(text: str) -> str:
    """The token-search key: surrounding whitespace removed, then case-folded.

    ``"Paris"``, ``" Paris"`` and ``"paris"`` all find the value token ``" Paris"`` (and ``"Paris"``).
    A query that is only whitespace keeps its whitespace, so a lone space or newline stays searchable.
    """
    stripped = text.strip()
    return (stripped or text).casefold()
