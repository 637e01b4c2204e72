"""Compare FFN memories across models: overlaid curves, vocabulary alignment, matched memories.

- :mod:`~ffkv_lens.comparison.curves`: per-layer tables of several runs, tidy and overlaid by depth.
- :mod:`~ffkv_lens.comparison.token_alignment`: align two vocabularies by the bytes their tokens spell.
- :mod:`~ffkv_lens.comparison.matching`: value and key similarities, permutation nulls, FDR.
- :mod:`~ffkv_lens.comparison.folder`: :func:`compare` writes a comparison folder.
- :mod:`~ffkv_lens.comparison.reader`: :class:`Comparison` reads it back.
- :mod:`~ffkv_lens.comparison.html`: the comparison's self-contained ``report.html``.

``ffkv_lens.compare`` is :func:`compare`.
"""

from ffkv_lens.comparison.folder import compare
from ffkv_lens.comparison.reader import COMPARE_FORMAT, MATCH_COLUMNS, Comparison
from ffkv_lens.comparison.token_alignment import VocabAlignment, align_vocabularies, token_surfaces

__all__ = [
    "COMPARE_FORMAT",
    "MATCH_COLUMNS",
    "Comparison",
    "VocabAlignment",
    "align_vocabularies",
    "compare",
    "token_surfaces",
]
