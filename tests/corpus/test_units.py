"""Sentence splitting, units (sentence, document, window), max_tokens and padded batches."""

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from ffkv_lens.corpus import Corpus, Unit, UnitConfig, iter_batches, iter_units, split_sentences
from ffkv_lens.corpus.sentences import _align, cut_spans
from ffkv_lens.errors import ConfigError
from tests.factories import train_tokenizer

STORY = (
    "Dr. Smith went to Washington on Monday. He arrived at 5 p.m. and met Mrs. Jones!\n"
    "Was the meeting useful? Nobody knows.\n\n"
    "  The end.  "
)
STORY_SENTENCES = [
    "Dr. Smith went to Washington on Monday.",
    "He arrived at 5 p.m. and met Mrs. Jones!",
    "Was the meeting useful?",
    "Nobody knows.",
    "The end.",
]
DOCS = [STORY, "The capital of France is Paris. The capital of Italy is Rome.", "hello world"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(folder)
    return AutoTokenizer.from_pretrained(folder)


def encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class CharTokenizer:
    """One token per character, no EOS: a tokenizer whose counts are obvious."""

    eos_token_id = None

    def __call__(self, texts: list[str], add_special_tokens: bool) -> dict[str, list[list[int]]]:
        return {"input_ids": [[ord(c) for c in text] for text in texts]}

    def decode(self, ids: list[int], clean_up_tokenization_spaces: bool) -> str:
        return "".join(map(chr, ids))


# Sentence splitting ----------------------------------------------------------------------


def test_split_sentences_keeps_exact_text() -> None:
    spans = split_sentences(STORY)
    assert [STORY[a:b] for a, b in spans] == STORY_SENTENCES
    assert split_sentences("") == [] and split_sentences(" \n\t ") == []


@pytest.mark.parametrize(
    ("segments", "expected"),
    [
        pytest.param(["One. ", "Two. ", "Three."], ["One.", "Two.", "Three."], id="exact"),
        pytest.param(["One. ", "Three."], ["One.", "Two. Three."], id="dropped-text"),
        pytest.param(["One. ", "Three.", "Two. "], ["One.", "Two. Three."], id="reordered"),
        pytest.param([], ["One. Two. Three."], id="nothing"),
        pytest.param(["One. Two. ", "not in the line"], ["One. Two.", "Three."], id="invented-text"),
    ],
)
def test_align_always_covers_the_line(segments: list[str], expected: list[str]) -> None:
    line = "One. Two. Three."
    assert [line[a:b] for a, b in _align(line, segments)] == expected


# Config ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        pytest.param({"unit": "paragraph"}, r"unit='paragraph'.*\['sentence', 'document', 'window'\]", id="unit"),
        pytest.param({"max_len": 0}, r"max_len=0.*int >= 1", id="max-len"),
        pytest.param({"max_tokens": 2.5}, r"max_tokens=2.5.*or None", id="max-tokens"),
        pytest.param({"max_chars": 0}, r"max_chars=0.*int >= 1", id="max-chars"),
        pytest.param({"long_sentences": "drop"}, r"\['truncate', 'split'\]", id="long-sentences"),
    ],
)
def test_unit_config_validates(kwargs: dict[str, Any], pattern: str) -> None:
    # Under the test-time type checker a bad Literal or type is refused before __post_init__
    # runs; exercise our own validation (what users without beartype get) directly.
    config = UnitConfig()
    for key, value in kwargs.items():
        object.__setattr__(config, key, value)
    with pytest.raises(ConfigError, match=pattern):
        config.__post_init__()


def test_unit_config_to_dict_feeds_iter_units(tokenizer: Any) -> None:
    config = UnitConfig(unit="document", max_len=16)
    assert config.to_dict() == {
        "unit": "document",
        "max_len": 16,
        "max_tokens": None,
        "long_sentences": "truncate",
        "max_chars": 10_000,
    }
    stream = iter_units(Corpus.from_texts(DOCS), tokenizer, **config.to_dict())
    assert stream.config == config
    with pytest.raises(ConfigError, match=r"max_len=-1"):
        iter_units(Corpus.from_texts(DOCS), tokenizer, max_len=-1)


# Sentence units ----------------------------------------------------------------------------


def test_sentence_units_ids_text_and_tokens(tokenizer: Any) -> None:
    corpus = Corpus.from_texts(DOCS)
    stream = iter_units(corpus, tokenizer)
    units = list(stream)
    texts = dict(corpus)
    assert [u.unit_id for u in units] == list(range(len(units)))
    assert [u.doc_id for u in units] == [0] * 5 + [1, 1, 2]
    assert [u.text for u in units[:5]] == STORY_SENTENCES
    for unit in units:
        assert texts[unit.doc_id][unit.char_start : unit.char_end] == unit.text
        assert list(unit.token_ids) == encode(tokenizer, unit.text), "tokens have no BOS and match the text"
        assert not unit.truncated
    stats = stream.stats()
    assert (stats.documents, stats.units, stats.tokens) == (3, 8, sum(u.n_tokens for u in units))
    assert [u.text for u in iter_units(corpus, tokenizer)] == [u.text for u in units], "deterministic"


def test_long_sentences_are_truncated_and_counted() -> None:
    corpus = Corpus.from_texts(["Short one. This sentence is quite long indeed."])
    stream = iter_units(corpus, CharTokenizer(), max_len=12)
    units = list(stream)
    assert [(u.text, u.char_start, u.char_end, u.truncated) for u in units] == [
        ("Short one.", 0, 10, False),
        ("This sentenc", 11, 23, True),
    ]
    stats = stream.stats()
    assert (stats.long_sentences, stats.tokens_dropped, stats.tokens) == (1, 35 - 12, 10 + 12)


def test_long_sentences_split_into_windows() -> None:
    text = "Short one. This sentence is quite long indeed."
    stream = iter_units(Corpus.from_texts([text]), CharTokenizer(), max_len=12, long_sentences="split")
    units = list(stream)
    assert [u.text for u in units] == ["Short one.", "This sentenc", "e is quite l", "ong indeed."]
    assert all(text[u.char_start : u.char_end] == u.text for u in units)
    assert stream.stats().long_sentences == 1 and stream.stats().tokens_dropped == 0


def test_max_tokens_stops_before_crossing(tokenizer: Any) -> None:
    all_units = list(iter_units(Corpus.from_texts(DOCS), tokenizer))
    budget = sum(u.n_tokens for u in all_units[:3]) + all_units[3].n_tokens - 1
    stream = iter_units(Corpus.from_texts(DOCS), tokenizer, max_tokens=budget)
    units = list(stream)
    assert units == all_units[:3]
    assert stream.stats().stopped_at_max_tokens and stream.stats().tokens <= budget
    everything = iter_units(Corpus.from_texts(DOCS), tokenizer, max_tokens=10_000)
    assert len(list(everything)) == len(all_units) and not everything.stats().stopped_at_max_tokens


@pytest.mark.parametrize("unit", ["sentence", "document", "window"])
def test_max_tokens_reached_reads_no_further_document(unit: str) -> None:
    pulled = []

    def documents() -> Iterator[tuple[int, str]]:
        for doc_id in range(1000):
            pulled.append(doc_id)
            yield doc_id, "abcdefgh"

    stream = iter_units(documents(), CharTokenizer(), unit=unit, max_len=8, max_tokens=16)
    assert [u.text for u in stream] == ["abcdefgh", "abcdefgh"]
    assert pulled == [0, 1] and stream.stats().stopped_at_max_tokens


# Bounded work on long lines and documents --------------------------------------------------

LONG_LINE = "The cat sat on the mat. It was warm there, and the dog slept. "  # 62 characters


def test_sentence_units_never_cross_a_cut() -> None:
    text = (LONG_LINE * 4).strip()
    stream = iter_units(Corpus.from_texts([text, "Short."]), CharTokenizer(), max_len=1000, max_chars=100)
    units = list(stream)
    assert stream.stats().texts_cut == 1
    assert all(u.n_tokens <= 100 for u in units), "no sentence crosses a cut"
    assert " ".join(u.text for u in units[:-1]).split() == text.split(), "cutting loses no text"
    uncut = iter_units(Corpus.from_texts([text, "Short."]), CharTokenizer(), max_len=1000, max_chars=len(text))
    assert [u.text for u in uncut] == [*[s.strip() + "." for s in text.split(".")[:-1]], "Short."]
    assert uncut.stats().texts_cut == 0


@pytest.mark.parametrize("unit", ["document", "window"])
def test_long_documents_are_tokenised_piece_by_piece(tokenizer: Any, unit: str) -> None:
    text = (LONG_LINE * 4).strip()
    stream = iter_units(Corpus.from_texts([text]), tokenizer, unit=unit, max_len=16, max_chars=100)
    tokens = [t for u in stream for t in u.token_ids]
    pieces = [encode(tokenizer, text[a:b]) for a, b in cut_spans(text, 100)]
    eos = [tokenizer.eos_token_id] if unit == "window" else []
    assert len(pieces) == 3 and tokens == [t for piece in pieces for t in piece] + eos
    assert stream.stats().texts_cut == 1
    whole = iter_units(Corpus.from_texts([text]), tokenizer, unit=unit, max_len=16, max_chars=len(text))
    assert [t for u in whole for t in u.token_ids] == encode(tokenizer, text) + eos
    assert whole.stats().texts_cut == 0


def test_sentence_units_of_cut_lines_keep_their_spans() -> None:
    text = "Intro line.\n" + (LONG_LINE * 3).strip()
    units = list(iter_units(Corpus.from_texts([text]), CharTokenizer(), max_chars=70))
    assert all(text[u.char_start : u.char_end] == u.text for u in units)
    assert [u.text for u in units][:3] == [
        "Intro line.",
        "The cat sat on the mat.",
        "It was warm there, and the dog slept.",
    ]


def write_one_line(path: Path, megabytes: int) -> Path:
    path.write_text(LONG_LINE * (megabytes * 1_000_000 // len(LONG_LINE)), encoding="utf-8")
    return path


@pytest.mark.parametrize("unit", ["sentence", "document", "window"])
@pytest.mark.parametrize("kind", ["file", "jsonl"])
def test_a_10_mb_line_starts_within_seconds(tokenizer: Any, tmp_path: Path, unit: str, kind: str) -> None:
    path = write_one_line(tmp_path / "one_line.txt", 10)
    if kind == "jsonl":
        text = path.read_text(encoding="utf-8")
        (tmp_path / "one_line.jsonl").write_text(json.dumps({"text": text}) + "\n", encoding="utf-8")
        corpus = Corpus.from_jsonl(tmp_path / "one_line.jsonl")
    else:
        corpus = Corpus.from_files(path)
    start = time.perf_counter()
    stream = iter_units(corpus, tokenizer, unit=unit, max_len=64, max_tokens=2000)
    batches = iter_batches(stream, batch_tokens=512, bos_token_id=tokenizer.bos_token_id, sort_window=1024)
    first = next(batches)
    rest = [unit for batch in batches for unit in batch.units]
    seconds = time.perf_counter() - start
    assert seconds < 30, f"{unit} units of a 10 MB line took {seconds:.1f} s to reach max_tokens=2000"
    assert first.tokens.shape[0] >= 1 and stream.stats().stopped_at_max_tokens
    assert 1900 <= stream.stats().tokens <= 2000 and stream.stats().documents == 1
    assert len(first.units) + len(rest) == stream.stats().units


# Document and window units -----------------------------------------------------------------


def test_document_units_split_long_documents(tokenizer: Any) -> None:
    assert len(encode(tokenizer, DOCS[2])) == 9 < len(encode(tokenizer, DOCS[1]))
    units = list(iter_units(Corpus.from_texts(DOCS), tokenizer, unit="document", max_len=9))
    assert [u.unit_id for u in units] == list(range(len(units)))
    for doc_id, text in enumerate(DOCS):
        pieces = [u for u in units if u.doc_id == doc_id]
        assert [t for u in pieces for t in u.token_ids] == encode(tokenizer, text), "windows tile the document"
        assert all(u.n_tokens <= 9 for u in pieces) and all(u.n_tokens == 9 for u in pieces[:-1])
        for unit in pieces:  # ASCII text: every decoded window is found in the document
            assert text[unit.char_start : unit.char_end] == unit.text
    short = [u for u in units if u.doc_id == 2]
    assert len(short) == 1 and (short[0].text, short[0].char_start, short[0].char_end) == ("hello world", 0, 11)


def test_window_units_concatenate_documents_with_eos(tokenizer: Any) -> None:
    stream = iter_units(Corpus.from_texts(DOCS), tokenizer, unit="window", max_len=10)
    units = list(stream)
    expected = [t for text in DOCS for t in [*encode(tokenizer, text), tokenizer.eos_token_id]]
    assert [t for u in units for t in u.token_ids] == expected, "the last partial window is kept"
    assert all(u.n_tokens == 10 for u in units[:-1]) and 0 < units[-1].n_tokens <= 10
    starts, position = [], 0
    for text in DOCS:
        starts.append(position)
        position += len(encode(tokenizer, text)) + 1
    for unit in units:
        first = unit.unit_id * 10
        assert unit.doc_id == max(d for d, s in enumerate(starts) if s <= first), "doc of the first token"
        assert unit.char_start is None and unit.char_end is None
    assert stream.stats().tokens == len(expected)


def test_window_units_without_eos() -> None:
    units = list(iter_units(Corpus.from_texts(["abcd", "efg"]), CharTokenizer(), unit="window", max_len=3))
    assert [(u.doc_id, u.text) for u in units] == [(0, "abc"), (0, "def"), (1, "g")]


# Batches -------------------------------------------------------------------------------------


def make_units(lengths: list[int]) -> list[Unit]:
    return [Unit(i, 0, tuple(range(10 + i, 10 + i + n)), "", None, None) for i, n in enumerate(lengths)]


def test_batches_pad_mask_and_bos() -> None:
    units = make_units([2, 3, 1])
    (batch,) = iter_batches(units, batch_units=8, bos_token_id=1, pad_token_id=0)
    assert batch.tokens.dtype == torch.int64 and batch.has_bos
    assert batch.tokens.tolist() == [[1, 10, 11, 0], [1, 11, 12, 13], [1, 12, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch.unit_ids.tolist() == [0, 1, 2] and batch.lengths.tolist() == [2, 3, 1]
    assert batch.units == tuple(units)
    (plain,) = iter_batches(units, batch_units=8, pad_token_id=7)
    assert not plain.has_bos and plain.tokens.tolist() == [[10, 11, 7], [11, 12, 13], [12, 7, 7]]
    assert plain.attention_mask.sum(1).tolist() == [2, 3, 1]


@pytest.mark.parametrize(
    ("kwargs", "sizes"),
    [
        pytest.param({"batch_units": 2}, [2, 2, 1], id="units"),
        pytest.param({"batch_tokens": 8}, [2, 1, 2], id="tokens"),
        pytest.param({"batch_tokens": 8, "batch_units": 1}, [1, 1, 1, 1, 1], id="both"),
        pytest.param({"batch_tokens": 3}, [1, 1, 1, 1, 1], id="oversize-alone"),
    ],
)
def test_batches_group_consecutive_units(kwargs: dict[str, int], sizes: list[int]) -> None:
    units = make_units([2, 3, 6, 1, 1])
    batches = list(iter_batches(units, bos_token_id=1, **kwargs))
    assert [len(b.unit_ids) for b in batches] == sizes
    assert torch.cat([b.unit_ids for b in batches]).tolist() == [0, 1, 2, 3, 4]
    if "batch_tokens" in kwargs:
        limit = kwargs["batch_tokens"]
        assert all(b.tokens.numel() <= limit or len(b.unit_ids) == 1 for b in batches)


def test_sort_window_sorts_each_group_by_length_then_unit() -> None:
    units = make_units([5, 2, 5, 1, 3, 2, 4])
    batches = list(iter_batches(units, batch_units=2, sort_window=4, pad_token_id=0))
    # groups [0..3] and [4..6], each sorted by (length, unit id), then packed in that order
    assert [b.unit_ids.tolist() for b in batches] == [[3, 1], [0, 2], [5, 4], [6]]
    assert sum(b.tokens.numel() for b in batches) < sum(
        b.tokens.numel() for b in iter_batches(units, batch_units=2, pad_token_id=0)
    )  # less padding than in stream order
    with pytest.raises(ConfigError, match=r"sort_window=0"):
        list(iter_batches(units, batch_units=2, sort_window=0))


def test_batches_need_a_limit() -> None:
    with pytest.raises(ConfigError, match="batch_units or batch_tokens"):
        list(iter_batches(make_units([1])))
    with pytest.raises(ConfigError, match=r"batch_tokens=0"):
        list(iter_batches(make_units([1]), batch_tokens=0))


def test_units_to_batches_end_to_end(tokenizer: Any, tmp_path: Path) -> None:
    (tmp_path / "story.txt").write_text(STORY, encoding="utf-8")
    units = iter_units(Corpus.from_files(tmp_path), tokenizer, max_len=32)
    batches = list(iter_batches(units, batch_tokens=64, bos_token_id=tokenizer.bos_token_id))
    assert sum(len(b.unit_ids) for b in batches) == 5
    for batch in batches:
        assert (batch.tokens[:, 0] == tokenizer.bos_token_id).all()
        assert batch.attention_mask.sum(1).tolist() == (batch.lengths + 1).tolist()
