"""Units: the texts the model reads as one sequence each, cut from a corpus and tokenised.

Three kinds of unit (:class:`UnitConfig`):

- ``"sentence"`` (Geva et al. 2021): each document is cut at line breaks, then each line
  into sentences by pysbd (rule-based, deterministic, English, ``clean=False``). The text
  is kept exactly as in the document, stripped of surrounding whitespace, with its
  character span. A sentence longer than ``max_len`` tokens is truncated to its first
  ``max_len`` tokens (``long_sentences="truncate"``, the default; its ``text`` is then the
  decoded prefix) or cut into consecutive windows (``"split"``); both are counted.
- ``"document"``: the whole document; one longer than ``max_len`` tokens is cut into
  consecutive, non-overlapping windows of ``max_len`` tokens. A window boundary may fall
  inside a word (or, with byte-level tokenizers, inside a character).
- ``"window"``: the documents are concatenated, each followed by the tokenizer's EOS token
  when it has one, and cut into windows of ``max_len`` tokens; the last partial window is
  kept. A window's ``doc_id`` is that of its first token.

Tokens never include special tokens (``add_special_tokens=False``): the BOS is added by
:func:`iter_batches`, which groups units into padded batches. ``max_tokens`` stops the stream before the
first unit that would take the total number of unit tokens above it.

Example:
    >>> from ffkv_lens.corpus import UnitConfig
    >>> UnitConfig(unit="window", max_len=64).to_dict()
    {'unit': 'window', 'max_len': 64, 'max_tokens': None, 'long_sentences': 'truncate'}
"""

import dataclasses
import logging
from collections.abc import Iterable, Iterator
from typing import Any, Literal, get_args

from jaxtyping import Int
from torch import Tensor

from ffkv_lens.corpus.sentences import split_sentences
from ffkv_lens.errors import ConfigError
from ffkv_lens.types import Tokens

__all__ = [
    "Unit",
    "UnitBatch",
    "UnitConfig",
    "UnitKind",
    "UnitStats",
    "UnitStream",
    "iter_batches",
    "iter_units",
    "split_sentences",
]

logger = logging.getLogger(__name__)

UnitKind = Literal["sentence", "document", "window"]
LongSentences = Literal["truncate", "split"]


@dataclasses.dataclass(frozen=True)
class UnitConfig:
    """How a corpus is cut into units. Its :meth:`to_dict` gives :func:`iter_units`'s keywords.

    Attributes:
        unit: ``"sentence"``, ``"document"`` or ``"window"`` (see the module docstring).
        max_len: Most tokens in one unit (BOS not counted).
        max_tokens: Stop before the unit that would take the total of unit tokens above
            this (``None``: read the whole corpus).
        long_sentences: What to do with a sentence of more than ``max_len`` tokens:
            ``"truncate"`` keeps its first ``max_len`` tokens, ``"split"`` cuts it into windows.
    """

    unit: UnitKind = "sentence"
    max_len: int = 128
    max_tokens: int | None = None
    long_sentences: LongSentences = "truncate"

    def __post_init__(self) -> None:
        _check_choice("unit", self.unit, UnitKind)
        _check_choice("long_sentences", self.long_sentences, LongSentences)
        _check_int("max_len", self.max_len, minimum=1, optional=False)
        _check_int("max_tokens", self.max_tokens, minimum=1, optional=True)

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-serialisable dict (for manifests)."""
        return dataclasses.asdict(self)


def _check_choice(name: str, value: object, choices: Any) -> None:
    allowed = get_args(choices)
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not allowed; choose one of {list(allowed)}.")


def _check_int(name: str, value: object, *, minimum: int, optional: bool) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        hint = f"an int >= {minimum}" + (" or None" if optional else "")
        raise ConfigError(f"{name}={value!r} is not allowed; pass {hint}.")


@dataclasses.dataclass(frozen=True)
class Unit:
    """One unit of text, tokenised.

    Attributes:
        unit_id: 0-based global index, in corpus order.
        doc_id: The document it comes from (for windows: the document of its first token).
        token_ids: Its tokens, without BOS or any other special token.
        text: Its text: exact document text for sentences and whole documents, the decoded
            tokens for windows and truncated sentences.
        char_start: Start of ``text`` in the document, or ``None`` (``"window"`` units, and
            pieces whose decoded text does not match the document).
        char_end: End (exclusive) of ``text`` in the document, or ``None``.
        truncated: The sentence had more than ``max_len`` tokens and was truncated.
    """

    unit_id: int
    doc_id: int
    token_ids: tuple[int, ...]
    text: str
    char_start: int | None
    char_end: int | None
    truncated: bool = False

    @property
    def n_tokens(self) -> int:
        """Number of tokens (without BOS)."""
        return len(self.token_ids)


@dataclasses.dataclass(frozen=True)
class UnitStats:
    """Counts of a unit stream so far (complete once it is exhausted).

    Attributes:
        documents: Documents read.
        units: Units yielded.
        tokens: Tokens in the units yielded.
        long_sentences: Sentences of more than ``max_len`` tokens (truncated or split).
        tokens_dropped: Tokens cut off by truncation.
        skipped_no_tokens: Pieces skipped because they tokenise to nothing.
        stopped_at_max_tokens: The stream ended at ``max_tokens`` before the corpus did.
    """

    documents: int = 0
    units: int = 0
    tokens: int = 0
    long_sentences: int = 0
    tokens_dropped: int = 0
    skipped_no_tokens: int = 0
    stopped_at_max_tokens: bool = False


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, clean_up_tokenization_spaces=False)


# A piece: (doc_id, token_ids, text, char_start, char_end, truncated)
_Piece = tuple[int, list[int], str, int | None, int | None, bool]


def _windows(tokenizer: Any, doc_id: int, ids: list[int], text: str, start: int, max_len: int) -> Iterator[_Piece]:
    """``text`` (at ``start`` in its document) as one piece, or windows of ``max_len`` tokens."""
    if len(ids) <= max_len:
        yield doc_id, ids, text, start, start + len(text), False
        return
    cursor: int | None = 0
    for offset in range(0, len(ids), max_len):
        chunk = ids[offset : offset + max_len]
        decoded = _decode(tokenizer, chunk)
        if cursor is not None and text.startswith(decoded, cursor):
            yield doc_id, chunk, decoded, start + cursor, start + cursor + len(decoded), False
            cursor += len(decoded)
        else:
            cursor = None
            yield doc_id, chunk, decoded, None, None, False


class UnitStream:
    """An iterator over :class:`Unit` that counts what it did (:meth:`stats`).

    Built by :func:`iter_units`; iterate it once.
    """

    def __init__(self, corpus: Iterable[tuple[int, str]], tokenizer: Any, config: UnitConfig) -> None:
        self.config = config
        self._corpus = corpus
        self._tokenizer = tokenizer
        self._counts = UnitStats()
        self._iterator = self._units()

    def __iter__(self) -> "UnitStream":
        return self

    def __next__(self) -> Unit:
        return next(self._iterator)

    def stats(self) -> UnitStats:
        """Counts so far (final once the stream is exhausted)."""
        return self._counts

    def _count(self, **increments: int | bool) -> None:
        changes = {k: (v if isinstance(v, bool) else getattr(self._counts, k) + v) for k, v in increments.items()}
        self._counts = dataclasses.replace(self._counts, **changes)

    def _documents(self) -> Iterator[tuple[int, str]]:
        for doc_id, text in self._corpus:
            self._count(documents=1)
            yield doc_id, text

    def _units(self) -> Iterator[Unit]:
        pieces = {"sentence": self._sentences, "document": self._whole_documents, "window": self._token_windows}
        budget = self.config.max_tokens
        for doc_id, ids, text, start, end, truncated in pieces[self.config.unit]():
            if not ids:
                self._count(skipped_no_tokens=1)
                continue
            if budget is not None and self._counts.tokens + len(ids) > budget:
                self._count(stopped_at_max_tokens=True)
                break
            yield Unit(self._counts.units, doc_id, tuple(ids), text, start, end, truncated)
            self._count(units=1, tokens=len(ids))
        final = self._counts
        if final.long_sentences:
            logger.info(
                "%d of %d sentences had more than max_len=%d tokens (%s; %d tokens dropped).",
                final.long_sentences, final.units, self.config.max_len, self.config.long_sentences,
                final.tokens_dropped,
            )  # fmt: skip

    def _sentences(self) -> Iterator[_Piece]:
        max_len, tok = self.config.max_len, self._tokenizer
        for doc_id, document in self._documents():
            spans = split_sentences(document)
            texts = [document[a:b] for a, b in spans]
            for (start, end), text, ids in zip(spans, texts, _encode(tok, texts), strict=True):
                if len(ids) <= max_len:
                    yield doc_id, ids, text, start, end, False
                    continue
                self._count(long_sentences=1)
                if self.config.long_sentences == "split":
                    yield from _windows(tok, doc_id, ids, text, start, max_len)
                    continue
                self._count(tokens_dropped=len(ids) - max_len)
                kept = ids[:max_len]
                decoded = _decode(tok, kept)
                located = text.startswith(decoded)
                yield doc_id, kept, decoded, start if located else None, start + len(decoded) if located else None, True

    def _whole_documents(self) -> Iterator[_Piece]:
        for doc_id, document in self._documents():
            (ids,) = _encode(self._tokenizer, [document])
            yield from _windows(self._tokenizer, doc_id, ids, document, 0, self.config.max_len)

    def _token_windows(self) -> Iterator[_Piece]:
        max_len, tok = self.config.max_len, self._tokenizer
        eos = getattr(tok, "eos_token_id", None)
        buffer: list[int] = []
        owners: list[int] = []
        for doc_id, document in self._documents():
            (ids,) = _encode(tok, [document])
            if eos is not None:
                ids.append(eos)
            buffer.extend(ids)
            owners.extend([doc_id] * len(ids))
            while len(buffer) >= max_len:
                chunk, buffer, first, owners = buffer[:max_len], buffer[max_len:], owners[0], owners[max_len:]
                yield first, chunk, _decode(tok, chunk), None, None, False
        if buffer:
            yield owners[0], buffer, _decode(tok, buffer), None, None, False


def iter_units(
    corpus: Iterable[tuple[int, str]],
    tokenizer: Any,
    *,
    unit: UnitKind = "sentence",
    max_len: int = 128,
    max_tokens: int | None = None,
    long_sentences: LongSentences = "truncate",
) -> UnitStream:
    """Cut a corpus into tokenised units, streaming and deterministically.

    The keywords are those of :class:`UnitConfig`: ``iter_units(corpus, tok, **config.to_dict())``.

    Args:
        corpus: A :class:`~ffkv_lens.corpus.Corpus` or any iterable of ``(doc_id, text)``.
        tokenizer: A Hugging Face tokenizer (called with ``add_special_tokens=False``).
        unit: ``"sentence"``, ``"document"`` or ``"window"``.
        max_len: Most tokens in one unit (BOS not counted).
        max_tokens: Stop before the unit that would take the total above this.
        long_sentences: ``"truncate"`` or ``"split"`` sentences of more than ``max_len`` tokens.

    Returns:
        An iterator over :class:`Unit` whose :meth:`UnitStream.stats` counts documents,
        units, tokens, long sentences and dropped tokens.

    Example:
        >>> from ffkv_lens.corpus import Corpus
        >>> class Chars:  # a stand-in tokenizer: one token per character
        ...     eos_token_id = None
        ...     def __call__(self, texts, add_special_tokens):
        ...         return {"input_ids": [[ord(c) for c in t] for t in texts]}
        ...     def decode(self, ids, clean_up_tokenization_spaces):
        ...         return "".join(map(chr, ids))
        >>> units = iter_units(Corpus.from_texts(["It rains. We stay in."]), Chars())
        >>> [(u.unit_id, u.text, u.char_start) for u in units]
        [(0, 'It rains.', 0), (1, 'We stay in.', 10)]
    """
    config = UnitConfig(unit=unit, max_len=max_len, max_tokens=max_tokens, long_sentences=long_sentences)
    return UnitStream(corpus, tokenizer, config)


def _length_sorted(units: Iterable[Unit], window: int) -> Iterator[Unit]:
    """The stream, each run of ``window`` units sorted by (token count, unit id)."""
    group: list[Unit] = []
    for unit in units:
        group.append(unit)
        if len(group) == window:
            yield from sorted(group, key=lambda u: (u.n_tokens, u.unit_id))
            group = []
    yield from sorted(group, key=lambda u: (u.n_tokens, u.unit_id))


@dataclasses.dataclass(frozen=True)
class UnitBatch:
    """Units, right-padded into one tensor.

    Attributes:
        tokens: Token ids, BOS first when ``has_bos``; padding on the right.
        attention_mask: 1 for real tokens (BOS included), 0 for padding.
        unit_ids: The units' ``unit_id``.
        lengths: The units' token counts, without BOS.
        has_bos: Whether column 0 holds a BOS token.
        units: The units themselves (texts, spans).
    """

    tokens: Tokens
    attention_mask: Int[Tensor, "batch pos"]
    unit_ids: Int[Tensor, " batch"]
    lengths: Int[Tensor, " batch"]
    has_bos: bool
    units: tuple[Unit, ...]


def _check_batching(batch_units: int | None, batch_tokens: int | None) -> None:
    if batch_units is None and batch_tokens is None:
        raise ConfigError("iter_batches needs batch_units or batch_tokens (or both); got neither.")
    _check_int("batch_units", batch_units, minimum=1, optional=True)
    _check_int("batch_tokens", batch_tokens, minimum=1, optional=True)


def _make_batch(units: list[Unit], bos_token_id: int | None, pad_token_id: int) -> UnitBatch:
    import torch

    extra = 0 if bos_token_id is None else 1
    width = extra + max(u.n_tokens for u in units)
    tokens = torch.full((len(units), width), pad_token_id, dtype=torch.int64)
    mask = torch.zeros((len(units), width), dtype=torch.int64)
    for row, unit in enumerate(units):
        if bos_token_id is not None:
            tokens[row, 0] = bos_token_id
        tokens[row, extra : extra + unit.n_tokens] = torch.tensor(unit.token_ids, dtype=torch.int64)
        mask[row, : extra + unit.n_tokens] = 1
    unit_ids = torch.tensor([u.unit_id for u in units], dtype=torch.int64)
    lengths = torch.tensor([u.n_tokens for u in units], dtype=torch.int64)
    return UnitBatch(tokens, mask, unit_ids, lengths, bos_token_id is not None, tuple(units))


def iter_batches(
    units: Iterable[Unit],
    *,
    batch_units: int | None = None,
    batch_tokens: int | None = None,
    bos_token_id: int | None = None,
    pad_token_id: int = 0,
    sort_window: int | None = None,
) -> Iterator[UnitBatch]:
    """Group units into right-padded batches, streaming.

    A batch grows while it has at most ``batch_units`` units and its padded size
    ``B x T`` (``T``: longest unit, BOS included) stays within ``batch_tokens``. A unit
    that alone exceeds ``batch_tokens`` gets a batch of its own. Without ``sort_window``
    the order is kept. With it, units are read ``sort_window`` at a time and each group
    is sorted by (token count, unit id) before batching, so that units of similar length
    share a batch and little padding is computed (sentences vary from a few tokens to
    ``max_len``); the batches are still the same for the same stream (deterministic), and
    memory holds one group of units.

    Args:
        units: The units (e.g. from :func:`iter_units`).
        batch_units: Most units per batch (``None``: no limit).
        batch_tokens: Most padded tokens per batch (``None``: no limit).
        bos_token_id: Prepended to every row when not ``None``.
        pad_token_id: Fills the padding (masked out).
        sort_window: Units sorted by length per group of this many (``None``: keep the order).

    Yields:
        :class:`UnitBatch` objects.

    Example:
        >>> units = [Unit(i, 0, tuple(range(1, n + 1)), "", None, None) for i, n in enumerate([2, 3, 1])]
        >>> [b.tokens.tolist() for b in iter_batches(units, batch_tokens=8, bos_token_id=9)]
        [[[9, 1, 2, 0], [9, 1, 2, 3]], [[9, 1]]]
    """
    _check_batching(batch_units, batch_tokens)
    _check_int("sort_window", sort_window, minimum=1, optional=True)
    if sort_window is not None:
        units = _length_sorted(units, sort_window)
    extra = 0 if bos_token_id is None else 1
    pending: list[Unit] = []
    width = 0
    for unit in units:
        new_width = max(width, extra + unit.n_tokens)
        too_many = batch_units is not None and len(pending) + 1 > batch_units
        too_big = batch_tokens is not None and (len(pending) + 1) * new_width > batch_tokens
        if pending and (too_many or too_big):
            yield _make_batch(pending, bos_token_id, pad_token_id)
            pending, new_width = [], extra + unit.n_tokens
        pending.append(unit)
        width = new_width
    if pending:
        yield _make_batch(pending, bos_token_id, pad_token_id)
