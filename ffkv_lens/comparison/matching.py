"""Match the memories of two models, calibrated against a permutation baseline.

Two scores, each a cosine between per-memory feature vectors (every memory of A against every
memory of B, in chunks, keeping each memory's closest ``top_n`` in the other model):

- **value**: what the value promotes. The Pearson correlation, over the shared vocabulary
  (:mod:`ffkv_lens.comparison.token_alignment`), of the two values' logits (direction-only readout, as
  :meth:`MemoryLens.value_logits`). The logits of a layer are ``D @ R`` (directions times the
  centred unembedding columns, :meth:`value_logit_factors`), so the correlation is computed
  exactly in ``d_model`` dimensions: ``<D_a R_a, D_b R_b> = D_a (R_a R_b^T) D_b^T``.
- **key**: what triggers the key. The Pearson correlation of the two keys' coefficients over
  the same text: a shared sample of corpus sentences, each read on its own after BOS by both
  models, at the positions where both tokenizers end a token at the same character (both
  models have then read exactly the same text).

**Null.** For values, B's vocabulary is shuffled against A's within surface classes
(:meth:`VocabAlignment.strata`: leading space, first character's class, length): same
distributions and what a token's class alone explains, no token-level correspondence. (A plain
permutation makes every memory "significant" on real models: both models' values share the
coarse class structure, e.g. word starts vs fragments, which no specific match is needed for.)
For keys, B's coefficient series is re-assigned across token *types*: the positions whose token is type ``t`` take B's
coefficients from the occurrences of another type ``pi(t)`` of similar corpus frequency
(types sorted by count, shuffled within blocks of :data:`TYPE_BLOCK`; occurrences reused
cyclically). This keeps what makes coefficient correlations large by chance (repeated tokens,
heavy tails) and breaks what the two models read. Each memory's best null score is its
decoy; the false-discovery rate of a threshold ``t`` is estimated as
``(decoys >= t + 1) / (real best scores >= t)`` (the ``+1`` makes it conservative, as in
knockoff+), q-values are its running minimum, and a memory's best match is reported as
significant when its q-value is at most the stated level.

Example:
    >>> result = match_values(lens_a, lens_b, alignment, seed=0)  # doctest: +SKIP
    >>> result.ab.significant(0.05).sum()  # doctest: +SKIP
"""

import hashlib
import heapq
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ffkv_lens.comparison.token_alignment import VocabAlignment
from ffkv_lens.corpus.sentences import split_sentences
from ffkv_lens.errors import ConfigError
from ffkv_lens.lens import MemoryLens

__all__ = [
    "TYPE_BLOCK",
    "Direction",
    "KeySample",
    "MatchResult",
    "best_matches",
    "fdr_qvalues",
    "key_sample",
    "match_keys",
    "match_values",
    "standardise_columns",
    "stratified_permutation",
    "type_permutation",
]

log = logging.getLogger(__name__)

TYPE_BLOCK = 8  # token types are shuffled within blocks of this many types of similar frequency
_CHUNK = 1024  # rows of A per similarity block
_MAX_LEN = 128  # tokens of a sentence read by each model (longer sentences are cut)


@dataclass(frozen=True)
class Direction:
    """The closest memories in model B of every memory of model A (one direction of a match).

    Attributes:
        scores: ``[N_a, top_n]`` similarity of each A memory to its closest B memories, best first.
        index: ``[N_a, top_n]`` flat index (``layer * d_mlp + key``) of those B memories.
        null: ``[N_a * repeats]`` best similarity of each valid A memory under the null.
        valid: ``[N_a]`` memories with a defined score (not constant, not a zero value).
        q_values: ``[N_a]`` q-value of each memory's best score (NaN where not valid).
    """

    scores: np.ndarray
    index: np.ndarray
    null: np.ndarray
    valid: np.ndarray
    q_values: np.ndarray

    def significant(self, fdr: float) -> np.ndarray:
        """``[N_a]`` whether a memory's best match beats the null at false-discovery rate ``fdr``."""
        return self.valid & (self.q_values <= fdr)


@dataclass(frozen=True)
class MatchResult:
    """Both directions of one kind of match between two models.

    Attributes:
        kind: ``"value"`` or ``"key"``.
        ab: Closest memories of B for each memory of A.
        ba: Closest memories of A for each memory of B.
        features_a: ``[N_a, r]`` unit-norm features of A: ``features_a[i] @ features_b[j]`` is the score.
        features_b: ``[N_b, r]`` likewise for B.
        settings: What produced the scores (recorded in the comparison manifest).
    """

    kind: str
    ab: Direction
    ba: Direction
    features_a: Tensor
    features_b: Tensor
    settings: dict[str, Any]

    def pair_scores(self, index_a: np.ndarray, index_b: np.ndarray) -> np.ndarray:
        """Scores of given memory pairs (flat indices), e.g. the value score of key matches."""
        a = self.features_a[torch.as_tensor(index_a, dtype=torch.long)]
        b = self.features_b[torch.as_tensor(index_b, dtype=torch.long)]
        return (a * b).sum(dim=1).numpy()


def best_matches(
    features_a: Tensor, features_b: Tensor, *, top_n: int = 3, chunk: int = _CHUNK
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Closest ``top_n`` rows of ``features_b`` for every row of ``features_a``, and the reverse.

    Scores are dot products (cosines for unit-norm rows), computed block by block: never more
    than ``chunk x N_b`` at once.

    Returns:
        ``(scores_ab, index_ab, scores_ba, index_ba)``: ``[N_a, n]``, ``[N_a, n]``, ``[N_b, n]``,
        ``[N_b, n]`` with ``n = min(top_n, other side's size)``.
    """
    n_a, n_b = features_a.shape[0], features_b.shape[0]
    if n_a == 0 or n_b == 0:
        raise ConfigError(f"best_matches needs memories on both sides; got {n_a} and {n_b}.")
    k_ab, k_ba = min(top_n, n_b), min(top_n, n_a)
    scores_ab = torch.empty(n_a, k_ab)
    index_ab = torch.empty(n_a, k_ab, dtype=torch.long)
    best_ba = torch.full((k_ba, n_b), -torch.inf)
    arg_ba = torch.zeros(k_ba, n_b, dtype=torch.long)
    for start in range(0, n_a, chunk):
        block = features_a[start : start + chunk] @ features_b.T
        scores_ab[start : start + block.shape[0]], index_ab[start : start + block.shape[0]] = _top(block, k_ab, 1)
        values, rows = _top(block, min(k_ba, block.shape[0]), 0)
        merged = torch.cat([best_ba, values])
        merged_arg = torch.cat([arg_ba, rows + start])
        best_ba, order = _top(merged, k_ba, 0)
        arg_ba = merged_arg.gather(0, order)
    return scores_ab, index_ab, best_ba.T.contiguous(), arg_ba.T.contiguous()


def _top(scores: Tensor, k: int, dim: int) -> tuple[Tensor, Tensor]:
    values, index = torch.topk(scores, k, dim=dim, sorted=True)
    return values, index


def fdr_qvalues(real: np.ndarray, null: np.ndarray) -> np.ndarray:
    """q-values of ``real`` best scores against ``null`` (decoy) best scores.

    ``FDR(t) = min(1, (#null >= t * len(real) / len(null) + 1) / #real >= t)``; the q-value of a
    score is the smallest ``FDR(t)`` over thresholds ``t`` at or below it.

    Args:
        real: Best score of each memory.
        null: Best null score of each memory (any number of permutations stacked).

    Returns:
        One q-value per entry of ``real``.
    """
    real = np.asarray(real, dtype=np.float64)
    null = np.sort(np.asarray(null, dtype=np.float64))
    if real.size == 0:
        return np.zeros(0)
    if null.size == 0:
        raise ConfigError("fdr_qvalues needs null scores (the permutation baseline gave none).")
    order = np.argsort(-real, kind="stable")
    ranked = real[order]
    n_real_at_least = np.searchsorted(-ranked, -ranked, side="right")  # ties counted together
    n_null_at_least = null.size - np.searchsorted(null, ranked, side="left")
    fdr = np.minimum(1.0, (n_null_at_least * (real.size / null.size) + 1.0) / n_real_at_least)
    q_sorted = np.minimum.accumulate(fdr[::-1])[::-1]
    q = np.empty_like(q_sorted)
    q[order] = q_sorted
    return q


def _direction(scores: Tensor, index: Tensor, null_best: Tensor, valid: Tensor, other_valid: Tensor) -> Direction:
    """Mask invalid memories and attach q-values."""
    valid_np = valid.numpy()
    if not bool(other_valid.any()):
        valid_np = np.zeros_like(valid_np)
    best = scores[:, 0].numpy().astype(np.float64)
    q = np.full(best.shape, np.nan)
    q[valid_np] = fdr_qvalues(best[valid_np], null_best.numpy())
    return Direction(scores.numpy(), index.numpy(), null_best.numpy(), valid_np, q)


def _match(
    kind: str,
    features_a: Tensor,
    features_b: Tensor,
    null_pairs: Iterator[tuple[Tensor, Tensor]],
    valid_a: Tensor,
    valid_b: Tensor,
    top_n: int,
    settings: dict[str, Any],
) -> MatchResult:
    """Real matches, then each null pairing's best scores; invalid rows never match."""
    fa, fb = features_a * valid_a[:, None], features_b * valid_b[:, None]
    scores_ab, index_ab, scores_ba, index_ba = best_matches(fa, fb, top_n=top_n)
    null_ab, null_ba = [], []
    for null_a, null_b in null_pairs:
        s_ab, _, s_ba, _ = best_matches(null_a * valid_a[:, None], null_b * valid_b[:, None], top_n=1)
        null_ab.append(s_ab[valid_a, 0])
        null_ba.append(s_ba[valid_b, 0])
    ab = _direction(scores_ab, index_ab, torch.cat(null_ab), valid_a, valid_b)
    ba = _direction(scores_ba, index_ba, torch.cat(null_ba), valid_b, valid_a)
    return MatchResult(kind, ab, ba, fa, fb, settings)


# -- values -----------------------------------------------------------------------------------------


def _value_factors(lens: MemoryLens, ids: Tensor) -> tuple[Tensor, Tensor | None]:
    """``(left, right)`` with ``left @ right`` = value logits over ``ids`` (+ a per-row constant).

    Linear readouts give ``[N, d_model]`` directions and ``[d_model, n_ids]`` centred columns;
    BERT's MLM head gives the explicit centred logits and ``None``.
    """
    lefts, right = [], None
    for layer in range(lens.n_layers):
        factors = lens.adapter.value_logit_factors(layer, ids)
        if factors is None:
            logits = lens.adapter.value_token_logits(layer, ids).double()
            lefts.append(logits - logits.mean(dim=1, keepdim=True))
        else:
            lefts.append(factors[0].double())
            right = factors[1].double()
    return torch.cat(lefts).cpu(), None if right is None else right.cpu()


def _unit_rows(rows: Tensor, gram: Tensor | None) -> tuple[Tensor, Tensor]:
    """Rows scaled to unit norm under ``gram`` (identity when None), and whether they are non-zero."""
    sq = (rows * rows).sum(dim=1) if gram is None else ((rows @ gram) * rows).sum(dim=1)
    norm = sq.clamp_min(0).sqrt()
    valid = norm > 1e-12 * norm.max().clamp_min(1e-300)
    return rows / norm.clamp_min(1e-300)[:, None], valid


def _value_features(left_a: Tensor, right_a: Tensor | None, left_b: Tensor, right_b: Tensor | None,
                    perm: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """Unit-norm features whose dot products are the value correlations (B's columns permuted by ``perm``)."""
    if right_a is None or right_b is None:  # explicit logits (BERT): correlate them directly
        dense_a = left_a if right_a is None else left_a @ right_a
        dense_b = left_b if right_b is None else left_b @ right_b
        dense_b = dense_b if perm is None else dense_b[:, perm]
        dense_a = dense_a - dense_a.mean(dim=1, keepdim=True)
        dense_b = dense_b - dense_b.mean(dim=1, keepdim=True)
        fa, valid_a = _unit_rows(dense_a, None)
        fb, valid_b = _unit_rows(dense_b, None)
        return fa.float(), fb.float(), valid_a, valid_b
    rb = right_b if perm is None else right_b[:, perm]
    fa, valid_a = _unit_rows(left_a, right_a @ right_a.T)
    fb, valid_b = _unit_rows(left_b, rb @ rb.T)
    return (fa @ (right_a @ rb.T)).float(), fb.float(), valid_a, valid_b


def match_values(
    lens_a: MemoryLens,
    lens_b: MemoryLens,
    alignment: VocabAlignment,
    *,
    top_n: int = 3,
    repeats: int = 1,
    seed: int = 0,
) -> MatchResult:
    """Match memories by the correlation of their value logits over the shared vocabulary.

    Args:
        lens_a: Model A.
        lens_b: Model B.
        alignment: :func:`~ffkv_lens.comparison.token_alignment.align_vocabularies` of their tokenizers.
        top_n: Closest memories kept per memory.
        repeats: Vocabulary permutations of the null (each adds one pass).
        seed: Seed of the permutations.
    """
    if alignment.n_shared < 2:
        raise ConfigError(f"the two vocabularies share {alignment.n_shared} tokens; value matching needs at least 2.")
    left_a, right_a = _value_factors(lens_a, alignment.ids_a)
    left_b, right_b = _value_factors(lens_b, alignment.ids_b)
    fa, fb, valid_a, valid_b = _value_features(left_a, right_a, left_b, right_b, None)
    generator = torch.Generator().manual_seed(seed)
    strata = alignment.strata()

    def nulls() -> Iterator[tuple[Tensor, Tensor]]:
        for _ in range(repeats):
            perm = stratified_permutation(strata, generator)
            null_a, null_b, _, _ = _value_features(left_a, right_a, left_b, right_b, perm)
            yield null_a, null_b

    settings = {"shared_tokens": alignment.n_shared, "null": "vocabulary permutation within surface classes",
                "null_classes": int(strata.max()) + 1, "repeats": repeats,
                "seed": seed, "top_n": top_n}  # fmt: skip
    return _match("value", fa, fb, nulls(), valid_a, valid_b, top_n, settings)


def stratified_permutation(strata: Tensor, generator: torch.Generator) -> Tensor:
    """A permutation of ``range(len(strata))`` that maps each position into its own stratum."""
    perm = torch.arange(len(strata))
    for code in torch.unique(strata).tolist():
        members = (strata == code).nonzero().flatten()
        perm[members] = members[torch.randperm(len(members), generator=generator)]
    return perm


# -- keys -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeySample:
    """Coefficients of both models at the positions where they have read the same text.

    Attributes:
        coefficients_a: ``[P, N_a]`` A's coefficients (float64), memories flat (``layer * d_mlp + key``).
        coefficients_b: ``[P, N_b]`` B's.
        types: ``[P]`` token type of each position (A's token id), for the null.
        sentences: Sentences read.
        settings: How the sample was drawn.
    """

    coefficients_a: Tensor
    coefficients_b: Tensor
    types: Tensor
    sentences: int
    settings: dict[str, Any]

    @property
    def positions(self) -> int:
        """Aligned positions in the sample."""
        return int(self.types.numel())


def _doc_key(seed: int, doc_id: int) -> int:
    digest = hashlib.blake2b(f"ffkv-lens/compare/{seed}/{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def sample_sentences(corpus: Any, *, documents: int, seed: int) -> list[str]:
    """The sentences of ``documents`` documents drawn uniformly (bottom-k of a keyed hash), in draw order."""
    heap: list[tuple[int, int, str]] = []
    for doc in corpus:
        item = (-_doc_key(seed, doc.doc_id), -doc.doc_id, doc.text)
        if len(heap) < documents:
            heapq.heappush(heap, item)
        elif item > heap[0]:
            heapq.heapreplace(heap, item)
    drawn = sorted(heap, reverse=True)
    return [text[a:b] for _, _, text in drawn for a, b in split_sentences(text)]


def _encode(lens: MemoryLens, sentence: str) -> tuple[list[int], list[int]]:
    """Token ids (BOS first when the model has one) and each token's end character."""
    enc = lens.adapter.tokenizer(sentence, add_special_tokens=False, return_offsets_mapping=True)
    ids, ends = list(enc["input_ids"])[:_MAX_LEN], [end for _, end in enc["offset_mapping"]][:_MAX_LEN]
    bos = lens.adapter.bos_token_id
    return ([] if bos is None else [bos]) + ids, ([] if bos is None else [-1]) + ends


def _aligned(ends_a: list[int], ends_b: list[int]) -> tuple[list[int], list[int]]:
    """Positions (in each sequence) of the characters where both tokenizers end a token (last token wins)."""
    last_a = {end: i for i, end in enumerate(ends_a) if end > 0}
    last_b = {end: i for i, end in enumerate(ends_b) if end > 0}
    shared = sorted(set(last_a) & set(last_b))
    return [last_a[e] for e in shared], [last_b[e] for e in shared]


def _coefficients(lens: MemoryLens, rows: list[list[int]], picks: list[list[int]], batch: int) -> Tensor:
    """``[sum(len(picks)), N]`` coefficients of all layers at the picked positions of each row."""
    out = []
    pad = 0
    for start in range(0, len(rows), batch):
        chunk, chosen = rows[start : start + batch], picks[start : start + batch]
        width = max(len(r) for r in chunk)
        tokens = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, r in enumerate(chunk):
            tokens[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        device = lens.adapter.device
        with lens.adapter.inference():
            coefs = lens.coefficients(tokens.to(device), attention_mask=mask.to(device))
        flat = torch.cat([coefs[layer] for layer in range(lens.n_layers)], dim=-1)
        for i, positions in enumerate(chosen):
            out.append(flat[i, positions].double().cpu())
    return torch.cat(out)


def key_sample(
    lens_a: MemoryLens,
    lens_b: MemoryLens,
    corpus: Any,
    *,
    positions: int = 2000,
    documents: int = 400,
    seed: int = 0,
    batch: int = 16,
    progress: bool = True,
) -> KeySample:
    """Run both models on the same sampled sentences; keep coefficients where they read the same text.

    Args:
        lens_a: Model A.
        lens_b: Model B.
        corpus: The corpus (both runs' corpus).
        positions: Aligned positions to collect (the BOS position is never one).
        documents: Documents drawn (their sentences are read in draw order until ``positions``).
        seed: Seed of the draw.
        batch: Sentences per forward pass.
        progress: Show a progress bar.
    """
    from tqdm.auto import tqdm

    if positions < 10:
        raise ConfigError(f"positions={positions!r}; pass at least 10 (2000 or more for stable correlations).")
    rows_a, rows_b, picks_a, picks_b, types = [], [], [], [], []
    sentences = sample_sentences(corpus, documents=documents, seed=seed)
    used = 0
    for sentence in sentences:
        if len(types) >= positions:
            break
        ids_a, ends_a = _encode(lens_a, sentence)
        ids_b, ends_b = _encode(lens_b, sentence)
        pos_a, pos_b = _aligned(ends_a, ends_b)
        pos_a, pos_b = pos_a[: positions - len(types)], pos_b[: positions - len(types)]
        if not pos_a:
            continue
        used += 1
        rows_a.append(ids_a[: pos_a[-1] + 1])
        rows_b.append(ids_b[: pos_b[-1] + 1])
        picks_a.append(pos_a)
        picks_b.append(pos_b)
        types.extend(ids_a[p] for p in pos_a)
    if len(types) < positions:
        log.warning("the shared sample has %d aligned positions (%d asked): draw more documents", len(types), positions)
    if len(types) < 10:
        raise ConfigError(f"only {len(types)} aligned positions in {documents} documents; raise documents.")
    bar = tqdm(total=2, desc="key sample (forward passes)", unit="model", disable=not progress)
    coefs_a = _coefficients(lens_a, rows_a, picks_a, batch)
    bar.update()
    coefs_b = _coefficients(lens_b, rows_b, picks_b, batch)
    bar.update()
    bar.close()
    settings = {"positions": len(types), "positions_asked": positions, "documents": documents, "sentences": used,
                "seed": seed, "max_len": _MAX_LEN, "alignment": "shared token end offsets, BOS excluded"}  # fmt: skip
    return KeySample(coefs_a, coefs_b, torch.tensor(types, dtype=torch.long), used, settings)


def standardise_columns(coefficients: Tensor) -> tuple[Tensor, Tensor]:
    """``[N, P]`` unit-norm centred series of each column (memory), and which are not constant."""
    centred = coefficients - coefficients.mean(dim=0, keepdim=True)
    rows, valid = _unit_rows(centred.T.contiguous(), None)
    spread = coefficients.std(dim=0) > 1e-9 * coefficients.abs().amax(dim=0).clamp_min(1e-300)
    return rows.float(), valid & spread


def type_permutation(types: Tensor, *, seed: int, block: int = TYPE_BLOCK) -> Tensor:
    """Source position of each position under the token-type null (see the module docstring).

    Types are sorted by count (then id), shuffled within consecutive blocks of ``block`` types;
    the ``j``-th occurrence of type ``t`` takes the ``(j mod n)``-th of the ``n`` occurrences of
    ``pi(t)``.
    """
    values, inverse, counts = torch.unique(types, return_inverse=True, return_counts=True)
    order = sorted(range(len(values)), key=lambda i: (-int(counts[i]), int(values[i])))
    generator = torch.Generator().manual_seed(seed)
    target = [0] * len(values)
    for start in range(0, len(order), block):
        group = order[start : start + block]
        shuffled = torch.randperm(len(group), generator=generator).tolist()
        for i, j in zip(group, shuffled, strict=True):
            target[i] = group[j]
    occurrences: list[list[int]] = [[] for _ in values]
    for position, t in enumerate(inverse.tolist()):
        occurrences[t].append(position)
    source = torch.empty(len(types), dtype=torch.long)
    for t, places in enumerate(occurrences):
        pool = occurrences[target[t]]
        for j, position in enumerate(places):
            source[position] = pool[j % len(pool)]
    return source


def match_keys(sample: KeySample, *, top_n: int = 3, repeats: int = 1, seed: int = 0) -> MatchResult:
    """Match memories by the correlation of their coefficients over the shared sample.

    Args:
        sample: :func:`key_sample` of the two models.
        top_n: Closest memories kept per memory.
        repeats: Token-type permutations of the null (each adds one pass).
        seed: Seed of the permutations.
    """
    fa, valid_a = standardise_columns(sample.coefficients_a)
    fb, valid_b = standardise_columns(sample.coefficients_b)

    def nulls() -> Iterator[tuple[Tensor, Tensor]]:
        for r in range(repeats):
            source = type_permutation(sample.types, seed=seed * 1000 + r)
            null_b, _ = standardise_columns(sample.coefficients_b[source])
            yield fa, null_b

    settings = dict(sample.settings, null=f"token-type permutation within blocks of {TYPE_BLOCK}", repeats=repeats,
                    null_seed=seed, top_n=top_n)  # fmt: skip
    return _match("key", fa, fb, nulls(), valid_a, valid_b, top_n, settings)


def flat_to_memory(index: np.ndarray | Sequence[int], d_mlp: int) -> tuple[np.ndarray, np.ndarray]:
    """``(layers, keys)`` of flat memory indices."""
    index = np.asarray(index)
    return index // d_mlp, index % d_mlp
