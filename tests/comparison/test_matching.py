"""Matching memories across models: known-answer twins, unrelated models, exactness of the scores.

Tolerances: scores are float32 cosines of float64-built features: 1e-5 absolute against
brute-force correlations computed in float64 (numpy.corrcoef).
"""

import numpy as np
import pytest
import torch

from ffkv_lens import Corpus, MemoryLens, load_model
from ffkv_lens.comparison.matching import (
    best_matches,
    fdr_qvalues,
    key_sample,
    match_keys,
    match_values,
    type_permutation,
)
from ffkv_lens.comparison.token_alignment import align_vocabularies
from tests.comparison.twins import SPECIALS, build_twin
from tests.factories import TEXT, build_tiny_model

SENTENCES = [
    "The capital of France is Paris.", "The capital of Italy is Rome.", "Memories store patterns.",
    "Feed-forward layers promote tokens.", "hello world, the quick brown fox jumps over the lazy dog.",
    "The fox is quick and the dog is lazy.", "Paris and Rome are capitals.", "0123456789 are digits.",
] * 6  # fmt: skip
FDR = 0.05


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return Corpus.from_texts([" ".join(SENTENCES[i : i + 4]) for i in range(0, len(SENTENCES), 4)] + [TEXT])


@pytest.fixture(scope="module")
def twins(tiny_folder, tmp_path_factory):
    """A tiny Llama and its twin (memories permuted, vocabulary re-indexed), loaded."""
    folder = tiny_folder("llama")
    twin, memory_perms, token_perm = build_twin(folder, tmp_path_factory.mktemp("twin") / "twin")
    return MemoryLens(load_model(str(folder))), MemoryLens(load_model(str(twin))), memory_perms, token_perm


@pytest.fixture(scope="module")
def unrelated(tmp_path_factory):
    """Two tiny Llamas with independent random weights (same tokenizer)."""
    lenses = []
    for seed in (11, 12):
        folder = build_tiny_model("llama", tmp_path_factory.mktemp(f"unrelated-{seed}") / "m", seed=seed)
        lenses.append(MemoryLens(load_model(str(folder))))
    return lenses


def _twin_index(memory_perms: list[torch.Tensor], d_mlp: int) -> np.ndarray:
    """Flat index in the twin of every flat memory of the original."""
    return np.concatenate([layer * d_mlp + perm.numpy() for layer, perm in enumerate(memory_perms)])


def test_vocabularies_align_through_the_reindexing(twins):
    lens, twin, _, token_perm = twins
    alignment = align_vocabularies(lens.adapter.tokenizer, twin.adapter.tokenizer)
    n_tokens = len(lens.adapter.tokenizer)
    assert alignment.n_shared == n_tokens - SPECIALS
    assert torch.equal(alignment.ids_b, token_perm[alignment.ids_a])


def test_every_memory_finds_its_twin_by_value(twins):
    lens, twin, memory_perms, _ = twins
    alignment = align_vocabularies(lens.adapter.tokenizer, twin.adapter.tokenizer)
    result = match_values(lens, twin, alignment, seed=0)
    expected = _twin_index(memory_perms, lens.d_mlp)
    assert np.array_equal(result.ab.index[:, 0], expected)
    assert np.array_equal(result.ba.index[expected, 0], np.arange(expected.size))
    np.testing.assert_allclose(result.ab.scores[:, 0], 1.0, atol=1e-5)
    assert result.ab.significant(FDR).all() and result.ba.significant(FDR).all()


def test_every_memory_finds_its_twin_by_key(twins, corpus):
    lens, twin, memory_perms, _ = twins
    sample = key_sample(lens, twin, corpus, positions=300, documents=50, progress=False)
    result = match_keys(sample, seed=0)
    expected = _twin_index(memory_perms, lens.d_mlp)
    assert sample.positions >= 200
    assert np.array_equal(result.ab.index[:, 0], expected)
    np.testing.assert_allclose(result.ab.scores[:, 0], 1.0, atol=1e-5)
    assert result.ab.significant(FDR).all() and result.ba.significant(FDR).all()


def test_unrelated_models_find_no_matches_beyond_the_rate(unrelated, corpus):
    a, b = unrelated
    alignment = align_vocabularies(a.adapter.tokenizer, b.adapter.tokenizer)
    values = match_values(a, b, alignment, seed=0)
    keys = match_keys(key_sample(a, b, corpus, positions=300, documents=50, progress=False), seed=0)
    for result in (values, keys):
        for side in (result.ab, result.ba):
            found = int(side.significant(FDR).sum())
            assert found <= FDR * side.valid.sum(), (result.kind, found, int(side.valid.sum()))


def test_value_scores_are_correlations_over_the_shared_vocabulary(unrelated):
    a, b = unrelated
    alignment = align_vocabularies(a.adapter.tokenizer, b.adapter.tokenizer)
    result = match_values(a, b, alignment, seed=0)
    logits_a = torch.cat([a.value_logits(layer)[:, alignment.ids_a] for layer in range(a.n_layers)]).double().numpy()
    logits_b = torch.cat([b.value_logits(layer)[:, alignment.ids_b] for layer in range(b.n_layers)]).double().numpy()
    rng = np.random.default_rng(0)
    pairs_a, pairs_b = rng.integers(0, len(logits_a), 50), rng.integers(0, len(logits_b), 50)
    brute = [np.corrcoef(logits_a[i], logits_b[j])[0, 1] for i, j in zip(pairs_a, pairs_b, strict=True)]
    np.testing.assert_allclose(result.pair_scores(pairs_a, pairs_b), brute, atol=1e-5)
    # The reported best match is the brute-force best.
    full = np.corrcoef(logits_a, logits_b)[: len(logits_a), len(logits_a) :]
    np.testing.assert_array_equal(result.ab.index[:, 0], full.argmax(axis=1))
    np.testing.assert_allclose(result.ab.scores[:, 0], full.max(axis=1), atol=1e-5)


def test_key_scores_are_correlations_of_coefficients(unrelated, corpus):
    a, b = unrelated
    sample = key_sample(a, b, corpus, positions=200, documents=50, progress=False)
    result = match_keys(sample, seed=0)
    ca, cb = sample.coefficients_a.numpy(), sample.coefficients_b.numpy()
    full = np.corrcoef(ca.T, cb.T)[: ca.shape[1], ca.shape[1] :]
    np.testing.assert_allclose(result.ab.scores[:, 0], full.max(axis=1), atol=1e-5)
    np.testing.assert_array_equal(result.ba.index[:, 0], full.argmax(axis=0))


def test_key_sample_reads_what_the_model_reads(unrelated, corpus):
    """The sample's coefficients are the model's coefficients on BOS + sentence (to_tokens)."""
    a, b = unrelated
    sample = key_sample(a, b, corpus, positions=20, documents=50, progress=False)
    first = next(s for s in _sentences(corpus))
    tokens = a.adapter.to_tokens(first)
    coefs = a.coefficients(tokens)
    flat = torch.cat([coefs[layer][0] for layer in range(a.n_layers)], dim=-1).double()
    # The first aligned position of the first sentence is one of its token positions (BOS excluded).
    distances = (flat[1:] - sample.coefficients_a[0]).abs().amax(dim=1)
    assert float(distances.min()) < 1e-5


def _sentences(corpus):
    from ffkv_lens.comparison.matching import sample_sentences

    return sample_sentences(corpus, documents=50, seed=0)


def test_best_matches_equals_brute_force_in_chunks():
    generator = torch.Generator().manual_seed(0)
    fa, fb = torch.randn(37, 5, generator=generator), torch.randn(23, 5, generator=generator)
    scores_ab, index_ab, scores_ba, index_ba = best_matches(fa, fb, top_n=3, chunk=4)
    full = fa @ fb.T
    expected_ab = torch.topk(full, 3, dim=1)
    expected_ba = torch.topk(full.T, 3, dim=1)
    assert torch.equal(index_ab, expected_ab.indices) and torch.allclose(scores_ab, expected_ab.values)
    assert torch.equal(index_ba, expected_ba.indices) and torch.allclose(scores_ba, expected_ba.values)


def test_fdr_qvalues_by_hand():
    # real best scores 0.9, 0.8, 0.3; null 0.85, 0.2, 0.1 (one permutation: scale 1).
    # t=0.9: null 0 -> (0+1)/1 = 1; t=0.8: null 1 -> (1+1)/2 = 1; t=0.3: null 1 -> (1+1)/3 = 0.667.
    q = fdr_qvalues(np.array([0.8, 0.9, 0.3]), np.array([0.85, 0.2, 0.1]))
    np.testing.assert_allclose(q, [2 / 3, 2 / 3, 2 / 3])
    # 40 real scores far above every null score: FDR(t) = 1 / (number of real scores >= t).
    real = np.linspace(0.9, 0.99, 40)
    q = fdr_qvalues(real, np.full(40, 0.1))
    np.testing.assert_allclose(np.sort(q), np.full(40, 1 / 40))


def test_type_permutation_moves_types_as_blocks():
    types = torch.tensor([5, 7, 5, 9, 7, 5, 11, 12, 9, 5])
    source = type_permutation(types, seed=3, block=2)
    # every occurrence of one type draws from occurrences of a single other type
    for t in types.unique():
        drawn = types[source[types == t]].unique()
        assert drawn.numel() == 1
    # types are shuffled only within blocks of similar count: the most frequent (5) pairs with 7 or 9
    assert int(types[source[types == 5]][0]) in (5, 7)
