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
:func:`iter_batches`, which groups units into padded batches. ``max_tokens`` stops the stream, and the
reading of the corpus, once the total number of unit tokens reaches it or the next unit would take the
total above it.

Work per character is bounded: documents are read one at a time, and no text longer than
``max_chars`` characters is split into sentences or tokenised in one call. A longer line
(``"sentence"``) or document (``"document"``, ``"window"``) is cut into pieces by
:func:`~ffkv_lens.corpus.sentences.cut_spans` (at the last whitespace before ``max_chars``
characters), each piece handled in turn; the default (10,000) cuts no line or document of the
embedded corpus.

Example:
    >>> from ffkv_lens.corpus import UnitConfig
    >>> UnitConfig(unit="window", max_len=64).to_dict()
    {'unit': 'window', 'max_len': 64, 'max_tokens': None, 'long_sentences': 'truncate', 'max_chars': 10000}
"""

import dataclasses
import itertools
import logging
from collections.abc import Iterable, Iterator
from typing import Any, Literal, get_args

from ffkv_lens.corpus.sentences import DEFAULT_MAX_CHARS, cut_spans, line_spans, sentence_spans, split_sentences
from ffkv_lens.errors import ConfigError

__all__ = [
    "UNIT_KINDS",
    "Unit",
    "UnitConfig",
    "UnitKind",
    "UnitStats",
    "UnitStream",
    "iter_units",
    "split_sentences",
]

logger = logging.getLogger(__name__)

UnitKind = Literal["sentence", "document", "window"]
"""The kinds of unit a corpus is cut into; the one definition every config and CLI choice derives from."""
UNIT_KINDS: tuple[UnitKind, ...] = get_args(UnitKind)
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
        max_chars: Longest text split into sentences or tokenised in one call; a longer line
            (sentence units) or document (document and window units) is cut into pieces at the
            last whitespace before this many characters (see the module docstring).
    """

    unit: UnitKind = "sentence"
    max_len: int = 128
    max_tokens: int | None = None
    long_sentences: LongSentences = "truncate"
    max_chars: int = DEFAULT_MAX_CHARS

    def __post_init__(self) -> None:
        _check_choice("unit", self.unit, UnitKind)
        _check_choice("long_sentences", self.long_sentences, LongSentences)
        _check_int("max_len", self.max_len, minimum=1, optional=False)
        _check_int("max_tokens", self.max_tokens, minimum=1, optional=True)
        _check_int("max_chars", self.max_chars, minimum=1, optional=False)

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
        texts_cut: Lines (sentence units) or documents (document and window units) longer than
            ``max_chars`` characters, cut into pieces.
        stopped_at_max_tokens: The stream ended at ``max_tokens`` (reached, or passed by the next
            unit) rather than at the end of the corpus.
    """

    documents: int = 0
    units: int = 0
    tokens: int = 0
    long_sentences: int = 0
    tokens_dropped: int = 0
    skipped_no_tokens: int = 0
    texts_cut: int = 0
    stopped_at_max_tokens: bool = False


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, clean_up_tokenization_spaces=False)


# A piece: (doc_id, token_ids, text, char_start, char_end, truncated)
_Piece = tuple[int, list[int], str, int | None, int | None, bool]


class _Locator:
    """Decodes consecutive windows of a text and finds each in the text while they match."""

    def __init__(self, tokenizer: Any, doc_id: int, text: str, start: int) -> None:
        self.tokenizer, self.doc_id, self.text, self.start = tokenizer, doc_id, text, start
        self.cursor: int | None = 0

    def piece(self, chunk: list[int]) -> _Piece:
        decoded = _decode(self.tokenizer, chunk)
        if self.cursor is not None and self.text.startswith(decoded, self.cursor):
            begin = self.start + self.cursor
            self.cursor += len(decoded)
            return self.doc_id, chunk, decoded, begin, begin + len(decoded), False
        self.cursor = None
        return self.doc_id, chunk, decoded, None, None, False


def _windows(tokenizer: Any, doc_id: int, ids: list[int], text: str, start: int, max_len: int) -> Iterator[_Piece]:
    """``text`` (at ``start`` in its document) as one piece, or windows of ``max_len`` tokens."""
    if len(ids) <= max_len:
        yield doc_id, ids, text, start, start + len(text), False
        return
    locator = _Locator(tokenizer, doc_id, text, start)
    for offset in range(0, len(ids), max_len):
        yield locator.piece(ids[offset : offset + max_len])


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
            if budget is not None and self._counts.tokens >= budget:
                self._count(stopped_at_max_tokens=True)  # no unit fits any more: read no further
                break
        self._log_counts()

    def _log_counts(self) -> None:
        final = self._counts
        if final.long_sentences:
            logger.info(
                "%d of %d sentences had more than max_len=%d tokens (%s; %d tokens dropped).",
                final.long_sentences, final.units, self.config.max_len, self.config.long_sentences,
                final.tokens_dropped,
            )  # fmt: skip
        if final.texts_cut:
            what = "lines" if self.config.unit == "sentence" else "documents"
            logger.info(
                "%d %s had more than max_chars=%d characters and were cut into pieces at whitespace.",
                final.texts_cut, what, self.config.max_chars,
            )  # fmt: skip

    def _sentences(self) -> Iterator[_Piece]:
        max_chars, tok = self.config.max_chars, self._tokenizer
        for doc_id, document in self._documents():
            for line_start, line_end in line_spans(document):
                if line_end - line_start > max_chars:
                    self._count(texts_cut=1)
                for a, b in cut_spans(document, max_chars, line_start, line_end):
                    spans = sentence_spans(document, a, b)
                    texts = [document[start:end] for start, end in spans]
                    for (start, _), text, ids in zip(spans, texts, _encode(tok, texts), strict=True):
                        yield from self._sentence(doc_id, ids, text, start)

    def _sentence(self, doc_id: int, ids: list[int], text: str, start: int) -> Iterator[_Piece]:
        max_len, tok = self.config.max_len, self._tokenizer
        if len(ids) <= max_len:
            yield doc_id, ids, text, start, start + len(text), False
            return
        self._count(long_sentences=1)
        if self.config.long_sentences == "split":
            yield from _windows(tok, doc_id, ids, text, start, max_len)
            return
        self._count(tokens_dropped=len(ids) - max_len)
        kept = ids[:max_len]
        decoded = _decode(tok, kept)
        located = text.startswith(decoded)
        yield doc_id, kept, decoded, start if located else None, start + len(decoded) if located else None, True

    def _token_pieces(self, document: str) -> Iterator[list[int]]:
        """The tokens of ``document``: in one call, or piece by piece when longer than ``max_chars``."""
        max_chars = self.config.max_chars
        if len(document) > max_chars:
            self._count(texts_cut=1)
        for a, b in cut_spans(document, max_chars):
            (ids,) = _encode(self._tokenizer, [document[a:b]])
            yield ids

    def _whole_documents(self) -> Iterator[_Piece]:
        max_len, tok = self.config.max_len, self._tokenizer
        for doc_id, document in self._documents():
            if len(document) <= self.config.max_chars:
                (ids,) = _encode(tok, [document])
                yield from _windows(tok, doc_id, ids, document, 0, max_len)
                continue
            locator, buffer = _Locator(tok, doc_id, document, 0), []
            for ids in self._token_pieces(document):
                buffer.extend(ids)
                while len(buffer) >= max_len:
                    chunk, buffer = buffer[:max_len], buffer[max_len:]
                    yield locator.piece(chunk)
            if buffer:
                yield locator.piece(buffer)

    def _token_windows(self) -> Iterator[_Piece]:
        max_len, tok = self.config.max_len, self._tokenizer
        eos = getattr(tok, "eos_token_id", None)
        buffer: list[int] = []
        owners: list[int] = []
        for doc_id, document in self._documents():
            pieces = self._token_pieces(document)
            for ids in itertools.chain(pieces, [[eos]] if eos is not None else []):
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
    max_chars: int = DEFAULT_MAX_CHARS,
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
        max_chars: Longest line (sentence units) or document (document and window units)
            split or tokenised in one call; longer ones are cut into pieces at whitespace.

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
    config = UnitConfig(
        unit=unit, max_len=max_len, max_tokens=max_tokens, long_sentences=long_sentences, max_chars=max_chars
    )
    return UnitStream(corpus, tokenizer, config)
