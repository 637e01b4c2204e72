r"""Sentence splitting: line breaks, then pysbd, with spans exact in the document.

pysbd (Python Sentence Boundary Disambiguation) is a rule-based port of the Ruby
``pragmatic_segmenter``: deterministic, no model to download. It is used for English with
``clean=False``. pysbd occasionally drops or reorders text around brackets; the spans
returned here are re-derived from its segments so that they always are exact substrings
of the document and together cover all its non-whitespace text.

Example:
    >>> from ffkv_lens.corpus.sentences import split_sentences
    >>> text = "Dr. Smith went to Washington. He arrived at 5 p.m. on Monday.\nNew line here"
    >>> [text[a:b] for a, b in split_sentences(text)]
    ['Dr. Smith went to Washington.', 'He arrived at 5 p.m. on Monday.', 'New line here']

pysbd's time grows quadratically with the length of the text it is given (docs/corpus.md), so a
line longer than ``max_chars`` characters (default
:data:`DEFAULT_MAX_CHARS`, five times the longest line of the embedded corpus) is first cut into
pieces by :func:`cut_spans`, and each piece is split on its own: the work per character is then
bounded. A sentence that straddles a cut becomes two sentences.

    >>> text = "Call me Ishmael. Some years ago"
    >>> [text[a:b] for a, b in cut_spans(text, 12)]
    ['Call me', ' Ishmael.', ' Some years', ' ago']
"""

import functools
import re
from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["DEFAULT_MAX_CHARS", "cut_spans", "line_spans", "sentence_spans", "split_sentences"]

# The longest line of the embedded corpus has 1,972 characters and its longest document 2,134:
# neither is cut.
DEFAULT_MAX_CHARS = 10_000

_LINES = re.compile(r"[^\r\n]+")
_UP_TO_LAST_SPACE = re.compile(r".*\s", re.DOTALL)


@functools.lru_cache(maxsize=1)
def _segmenter() -> Any:
    import pysbd

    return pysbd.Segmenter(language="en", clean=False)


def _align(line: str, segments: Iterable[str]) -> list[tuple[int, int]]:
    """Spans of the sentences of ``line``, from pysbd's segments located in the line.

    pysbd sometimes drops or moves text; only the ends of the segments found in order are
    used as boundaries, so the spans always cover the whole line and are exact substrings.
    """
    boundaries, cursor = [], 0
    for segment in segments:
        piece = segment.strip()
        found = line.find(piece, cursor) if piece else -1
        if found >= 0:
            cursor = found + len(piece)
            boundaries.append(cursor)
    spans, start = [], 0
    for end in [*boundaries, len(line)]:
        chunk = line[start:end]
        if chunk.strip():
            left = start + len(chunk) - len(chunk.lstrip())
            spans.append((left, start + len(chunk.rstrip())))
        start = end
    return spans


def line_spans(text: str) -> Iterator[tuple[int, int]]:
    """Spans ``(start, end)`` of the lines of ``text`` that are not blank, line breaks excluded."""
    for match in _LINES.finditer(text):
        if not match.group().isspace():
            yield match.start(), match.end()


def cut_spans(text: str, max_chars: int, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
    """Cut ``text[start:end]`` into consecutive pieces of at most ``max_chars`` characters.

    The rule: while more than ``max_chars`` characters remain, the next piece ends just before
    the last whitespace character among the next ``max_chars + 1`` characters (not the first),
    so that the whitespace starts the following piece; with no such whitespace it ends after
    exactly ``max_chars`` characters. A text of at most ``max_chars`` characters is one piece.

    Args:
        text: The text.
        max_chars: Most characters per piece (``>= 1``).
        start: Where the range to cut starts in ``text``.
        end: Where it ends (``None``: the end of ``text``).

    Yields:
        Spans ``(a, b)`` covering ``[start, end)`` exactly, in order.
    """
    end = len(text) if end is None else end
    while end - start > max_chars:
        limit = start + max_chars
        match = _UP_TO_LAST_SPACE.match(text, start + 1, limit + 1)
        cut = match.end() - 1 if match is not None else limit
        yield start, cut
        start = cut
    if start < end:
        yield start, end


def sentence_spans(text: str, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    """Spans of the sentences of the line (or line piece) ``text[start:end]``, split by pysbd, stripped."""
    line = text[start:end]
    if not line.strip():
        return []
    return [(start + a, start + b) for a, b in _align(line, _segmenter().segment(line))]


def split_sentences(text: str, max_chars: int = DEFAULT_MAX_CHARS) -> list[tuple[int, int]]:
    """Character spans ``(start, end)`` of the sentences of ``text``, stripped, in order.

    A line break always ends a sentence; a line longer than ``max_chars`` is cut by
    :func:`cut_spans`; each line (piece) is split by pysbd (English, ``clean=False``).

    Args:
        text: A document.
        max_chars: Longest text given to pysbd at once.

    Returns:
        The spans; ``text[start:end]`` is a sentence without surrounding whitespace.
    """
    return [
        span
        for line_start, line_end in line_spans(text)
        for a, b in cut_spans(text, max_chars, line_start, line_end)
        for span in sentence_spans(text, a, b)
    ]
