"""Cutting long lines before sentence splitting: the rule, and sentences that respect it."""

import pytest

from ffkv_lens.corpus.sentences import DEFAULT_MAX_CHARS, cut_spans, split_sentences


@pytest.mark.parametrize(
    ("text", "max_chars", "pieces"),
    [
        pytest.param("short", 10, ["short"], id="fits"),
        pytest.param("exactly10!", 10, ["exactly10!"], id="exact-fit"),
        pytest.param("abcdefghijkl", 5, ["abcde", "fghij", "kl"], id="no-whitespace-hard-cut"),
        pytest.param("aa bb cc dd", 6, ["aa bb", " cc dd"], id="before-last-space"),
        pytest.param("aaaaa bb", 5, ["aaaaa", " bb"], id="space-right-after-limit"),
        pytest.param(" aaaaaaa", 4, [" aaa", "aaaa"], id="leading-space-not-a-cut"),
        pytest.param("a\tb\nc d", 3, ["a\tb", "\nc", " d"], id="any-whitespace"),
        pytest.param("", 3, [], id="empty"),
    ],
)
def test_cut_spans_rule(text: str, max_chars: int, pieces: list[str]) -> None:
    spans = list(cut_spans(text, max_chars))
    assert [text[a:b] for a, b in spans] == pieces
    assert all(b - a <= max_chars for a, b in spans)
    assert "".join(pieces) == text, "the pieces cover the text exactly"


def test_cut_spans_of_a_range_stays_inside_it() -> None:
    text = "xx aa bb cc yy"
    assert [text[a:b] for a, b in cut_spans(text, 4, 3, 11)] == ["aa", " bb", " cc"]


def test_split_sentences_cuts_long_lines_only() -> None:
    text = "One short line.\nA long line. It has two sentences and more words here."
    assert [text[a:b] for a, b in split_sentences(text)] == [
        "One short line.",
        "A long line.",
        "It has two sentences and more words here.",
    ]
    cut = [text[a:b] for a, b in split_sentences(text, max_chars=20)]
    assert cut[:3] == ["One short line.", "A long line.", "It has"], "the first piece ends before 'two'"
    assert " ".join(cut).split() == text.split(), "cutting loses no text"
    assert max(b - a for a, b in split_sentences(text, max_chars=20)) <= 20


def test_default_max_chars_is_above_the_embedded_corpus_lines() -> None:
    assert DEFAULT_MAX_CHARS == 10_000, "docs/corpus.md states this value and the measured longest line (1,972)"
