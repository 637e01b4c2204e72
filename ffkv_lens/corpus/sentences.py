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
"""

import functools
import re
from collections.abc import Iterable
from typing import Any

__all__ = ["split_sentences"]

_LINES = re.compile(r"[^\r\n]+")


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


def split_sentences(text: str) -> list[tuple[int, int]]:
    """Character spans ``(start, end)`` of the sentences of ``text``, stripped, in order.

    A line break always ends a sentence; each line is split by pysbd (English, ``clean=False``).

    Args:
        text: A document.

    Returns:
        The spans; ``text[start:end]`` is a sentence without surrounding whitespace.
    """
    spans = []
    for match in _LINES.finditer(text):
        line = match.group()
        if line.strip():
            spans.extend((match.start() + a, match.start() + b) for a, b in _align(line, _segmenter().segment(line)))
    return spans
