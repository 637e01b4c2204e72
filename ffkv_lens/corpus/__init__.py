"""Corpora and units for the trigger search.

A :class:`Corpus` yields documents ``(doc_id, text)`` from texts, files, JSON Lines, a
Hugging Face dataset or the embedded English corpus (:meth:`Corpus.default`: Wikipedia lead
summaries, CC BY-SA 4.0). :func:`iter_units` cuts documents into tokenised units
(sentences, documents or windows) and :func:`iter_batches` pads them into batches.

Example:
    >>> from ffkv_lens.corpus import Corpus, UnitConfig
    >>> corpus = Corpus.from_texts(["One. Two.", "Three."])
    >>> corpus.describe()["kind"], len(corpus.fingerprint())
    ('texts', 16)
"""

from ffkv_lens.corpus.batches import UnitBatch, iter_batches
from ffkv_lens.corpus.corpus import Corpus, CorpusStats, Document
from ffkv_lens.corpus.sentences import split_sentences
from ffkv_lens.corpus.units import (
    UNIT_KINDS,
    Unit,
    UnitConfig,
    UnitKind,
    UnitStats,
    UnitStream,
    iter_units,
)

__all__ = [
    "UNIT_KINDS",
    "Corpus",
    "CorpusStats",
    "Document",
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
