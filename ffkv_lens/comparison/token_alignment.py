r"""Align two vocabularies by what their tokens spell.

Tokenizers spell the same text with different ids and different markers: byte-level BPE
(GPT-2, Llama 3, SmolLM2) writes a leading space as ``Ġ`` and every byte as a printable stand-in;
SentencePiece-style tokenizers (Gemma, Llama 2) write it as ``▁`` and fall back to ``<0xNN>``
byte tokens; WordPiece (BERT) marks word continuations with ``##``. :func:`token_surfaces`
turns every token into the bytes it stands for in running text (``b" the"``, ``b"\\n"``, a
single byte), so that :func:`align_vocabularies` can pair tokens of two models that spell the
same bytes. Special tokens are left out; a token whose bytes cannot be known is left out too.

Example:
    >>> alignment = align_vocabularies(tokenizer_a, tokenizer_b)  # doctest: +SKIP
    >>> alignment.share_a, alignment.share_b  # doctest: +SKIP
    (0.71, 0.13)
"""

import json
import re
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["VocabAlignment", "align_vocabularies", "surface_kind", "token_surfaces"]

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_METASPACE = "\u2581"


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in for each byte, inverted (character -> byte)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = {b: b for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + extra
            extra += 1
    return {chr(code): b for b, code in chars.items()}


def surface_kind(tokenizer: Any) -> str:
    """How a tokenizer marks spaces and bytes: ``byte_level``, ``metaspace``, ``wordpiece`` or ``decode``.

    Read from the fast tokenizer's decoder; ``decode`` (decode each token on its own) is the
    fallback for tokenizers without one.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return "decode"
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    types = {p.get("type") for p in parts}
    if "ByteLevel" in types:
        return "byte_level"
    if "Metaspace" in types or any(
        p.get("type") == "Replace" and p.get("pattern", {}).get("String") == _METASPACE for p in parts
    ):
        return "metaspace"
    if "WordPiece" in types:
        return "wordpiece"
    return "decode"


def token_surfaces(tokenizer: Any) -> list[bytes | None]:
    """The bytes each token id stands for in running text (None: special or unknown).

    Args:
        tokenizer: A Hugging Face tokenizer.

    Returns:
        One entry per id in ``range(len(tokenizer))``.
    """
    kind = surface_kind(tokenizer)
    n = len(tokenizer)
    specials = set(tokenizer.all_special_ids)
    pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
    byte_of = _byte_level_decoder() if kind == "byte_level" else {}
    out: list[bytes | None] = []
    for i, piece in enumerate(pieces):
        if i in specials or piece is None:
            out.append(None)
            continue
        if kind == "byte_level":
            try:
                out.append(bytes(byte_of[ch] for ch in piece))
            except KeyError:  # an added token written in plain text
                out.append(piece.encode("utf-8"))
        elif kind == "metaspace":
            match = _BYTE_TOKEN.fullmatch(piece)
            out.append(bytes([int(match.group(1), 16)]) if match else piece.replace(_METASPACE, " ").encode("utf-8"))
        elif kind == "wordpiece":
            if piece.startswith("##"):
                out.append(piece[2:].encode("utf-8"))
            else:  # a word start follows a space, unless it is punctuation
                spaced = piece if not piece[:1].isalnum() else " " + piece
                out.append(spaced.encode("utf-8"))
        else:
            text = tokenizer.decode([i], clean_up_tokenization_spaces=False)
            out.append(None if "\ufffd" in text else text.encode("utf-8"))
    return out


@dataclass(frozen=True)
class VocabAlignment:
    """Token pairs of two vocabularies that spell the same bytes.

    Attributes:
        ids_a: ``[n_shared]`` token ids of model A, ascending.
        ids_b: ``[n_shared]`` the id of model B spelling the same bytes as ``ids_a[i]``.
        size_a: A's vocabulary size (``len(tokenizer)``).
        size_b: B's vocabulary size.
        kind_a: :func:`surface_kind` of A's tokenizer.
        kind_b: :func:`surface_kind` of B's tokenizer.
        duplicates_a: Ids of A left out because a lower id spells the same bytes.
        duplicates_b: Likewise for B.
        surfaces: The bytes each aligned pair spells, in the order of ``ids_a``.
    """

    ids_a: torch.Tensor
    ids_b: torch.Tensor
    size_a: int
    size_b: int
    kind_a: str
    kind_b: str
    duplicates_a: int
    duplicates_b: int
    surfaces: tuple[bytes, ...]

    def strata(self) -> torch.Tensor:
        """``[n_shared]`` surface class of each aligned token, for a stratified permutation.

        The class is (leading space or not, first character upper / lower / digit / other ASCII /
        non-ASCII / none, length 1 / 2 / 3-4 / 5-7 / 8+ bytes without the space): shuffling tokens
        only within a class keeps what the class alone explains (e.g. "promotes capitalised
        words") out of the null's reach.
        """
        codes: dict[tuple[bool, int, int], int] = {}
        out = [codes.setdefault(_stratum(surface), len(codes)) for surface in self.surfaces]
        return torch.tensor(out, dtype=torch.long)

    @property
    def n_shared(self) -> int:
        """Number of aligned token pairs."""
        return int(self.ids_a.numel())

    @property
    def share_a(self) -> float:
        """Share of A's vocabulary that aligns."""
        return self.n_shared / self.size_a

    @property
    def share_b(self) -> float:
        """Share of B's vocabulary that aligns."""
        return self.n_shared / self.size_b

    def describe(self) -> dict[str, Any]:
        """The figures a report shows (JSON-ready)."""
        return {
            "n_shared": self.n_shared,
            "size_a": self.size_a,
            "size_b": self.size_b,
            "share_a": self.share_a,
            "share_b": self.share_b,
            "kind_a": self.kind_a,
            "kind_b": self.kind_b,
            "duplicates_a": self.duplicates_a,
            "duplicates_b": self.duplicates_b,
        }


def _stratum(surface: bytes) -> tuple[bool, int, int]:
    word = surface.lstrip(b" ")
    first = word[:1]
    kind = (
        0 if not first else 1 if first.isupper() else 2 if first.islower() else 3 if first.isdigit()
        else 4 if first[0] < 128 else 5
    )  # fmt: skip
    size = len(word)
    length = 0 if size <= 1 else 1 if size <= 2 else 2 if size <= 4 else 3 if size <= 7 else 4
    return surface[:1] == b" ", kind, length


def _first_ids(surfaces: list[bytes | None]) -> tuple[dict[bytes, int], int]:
    first: dict[bytes, int] = {}
    duplicates = 0
    for i, surface in enumerate(surfaces):
        if surface is None:
            continue
        if surface in first:
            duplicates += 1
        else:
            first[surface] = i
    return first, duplicates


def align_vocabularies(tokenizer_a: Any, tokenizer_b: Any) -> VocabAlignment:
    """Pair the tokens of two tokenizers that spell the same bytes (see :func:`token_surfaces`).

    When several ids of one vocabulary spell the same bytes, the lowest id is kept.
    """
    first_a, dup_a = _first_ids(token_surfaces(tokenizer_a))
    first_b, dup_b = _first_ids(token_surfaces(tokenizer_b))
    pairs = sorted((i, first_b[s], s) for s, i in first_a.items() if s in first_b)
    ids = torch.tensor([(a, b) for a, b, _ in pairs], dtype=torch.long).reshape(-1, 2)
    return VocabAlignment(
        ids_a=ids[:, 0].contiguous(),
        ids_b=ids[:, 1].contiguous(),
        size_a=len(tokenizer_a),
        size_b=len(tokenizer_b),
        kind_a=surface_kind(tokenizer_a),
        kind_b=surface_kind(tokenizer_b),
        duplicates_a=dup_a,
        duplicates_b=dup_b,
        surfaces=tuple(s for _, _, s in pairs),
    )
