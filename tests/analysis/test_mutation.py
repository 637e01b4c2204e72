"""The mutation test against hand-computed cases and a brute-force recomputation.

Tolerances: the fake model is exact (float64 arithmetic on integers) and compared at 1e-12;
brute force runs every mutated prefix alone (batch of one, no padding) in float64 and must
agree within 1e-5 relative (per example and per-layer means); the shared strategy against the
per-prefix reference, batching, deduplication and the zero-attention model compare in float32
within 1e-5 relative (the shared strategy also in float64, within 1e-6: see its test for why
float64 is not exact here).
"""

import itertools
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from jaxtyping import TypeCheckError

from ffkv_lens import MemoryLens
from ffkv_lens.adapters import MemoryAdapter
from ffkv_lens.analysis import mutation_test
from ffkv_lens.analysis.atlas import LayerTopK, TriggerAtlas, UnitStore, tokenizer_fingerprint
from ffkv_lens.analysis.mutation import MutationConfig
from ffkv_lens.analysis.mutation.batching import FORWARD_OVERHEAD_TOKENS, batch_bounds, cheapest_bounds
from ffkv_lens.analysis.mutation.streams import random_token_index, unit_order
from ffkv_lens.analysis.triggers import search_triggers
from ffkv_lens.corpus import Corpus
from ffkv_lens.errors import AtlasMismatchError, ConfigError
from tests.conftest import boot
from tests.factories import FAMILY_NAMES
from tests.helpers import assert_close

TEXTS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Memories in feed-forward layers store patterns. They promote tokens!",
    "hello world. hello world. The quick brown fox jumps over the lazy dog.",
    "0123456789 is a number. Is it? Yes, it is.",
    "Paris is in France. Rome is in Italy. The fox is quick.",
]
CHANGES = ["change_first", "change_last", "change_random"]


# -- a fake model whose coefficients are known in closed form ----------------------------------
class _Tokenizer:
    pad_token_id, eos_token_id = 0, 0

    def get_vocab(self) -> dict[str, int]:
        return {f"t{i}": i for i in range(64)}


def _fake_m(tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    x = tokens.double() * attention_mask
    first_is_bos = (tokens[:, :1] == 0).double().expand_as(x)
    return torch.stack([x, x.cumsum(1), 1.0 + 4.0 * first_is_bos], dim=-1)


@MemoryAdapter.register
class _Adapter:
    """Key 0: the last token's id. Key 1: sum of the ids so far. Key 2: 5 if the sequence starts
    with BOS (id 0; contributes 0 to keys 0 and 1) else 1. Causal by construction."""

    tokenizer, device, causal = _Tokenizer(), torch.device("cpu"), True
    n_layers, d_mlp, d_vocab = 1, 3, 64

    def __init__(self, bos: int | None) -> None:
        self.bos_token_id = bos
        self.calls: list[tuple[int, int]] = []
        self.stops: list[str | None] = []

    def describe(self) -> dict:
        return {"name": "fake", "family": "fake"}

    def hook_names(self, layer: int) -> SimpleNamespace:
        return SimpleNamespace(coefficients=f"blocks.{layer}.mlp.hook_post")

    def run_with_hooks(self, tokens, fwd_hooks, *, attention_mask, stop_after=None) -> None:
        self.calls.append(tuple(tokens.shape))
        self.stops.append(stop_after)
        m = _fake_m(tokens, attention_mask)
        for name, fn in fwd_hooks:
            fn(m, SimpleNamespace(name=name))

    def coefficients(self, tokens, *, layers, attention_mask):
        self.calls.append(tuple(tokens.shape))
        return {0: _fake_m(tokens, attention_mask)}


class _FakeLens:
    """A lens-like handle: the mutation test unwraps its ``adapter``."""

    def __init__(self, bos: int | None) -> None:
        self.adapter = _Adapter(bos)
        self.calls = self.adapter.calls
        self.coefficients = self.adapter.coefficients


def _fake_atlas(has_bos: bool) -> TriggerAtlas:
    units = {0: (0, [5, 6, 7, 40]), 1: (0, [3, 9, 2]), 2: (1, [11])}
    # per key: (unit, position) examples, best first; the third of key 0 has a single own token
    examples = [[(0, 3), (1, 1), (2, 0)], [(0, 3), (1, 2), (-1, -1)], [(0, 2), (1, 2), (-1, -1)]]
    unit_ids = torch.tensor([[u for u, _ in row] for row in examples])
    positions = torch.tensor([[p for _, p in row] for row in examples])
    lens = _FakeLens(0 if has_bos else None)
    values = torch.zeros(3, 3)
    for key, row in enumerate(examples):
        for rank, (u, p) in enumerate(row):
            if u >= 0:
                seq = ([0] if has_bos else []) + units[u][1][: p + 1]
                ones = torch.ones(1, len(seq), dtype=torch.int64)
                m = lens.coefficients(torch.tensor([seq]), layers=[0], attention_mask=ones)[0]
                values[key, rank] = m[0, -1, key]
    manifest = {
        "model": "fake",
        "model_layout": {"n_layers": 1, "d_mlp": 3, "d_vocab": 64},
        "tokenizer_fingerprint": tokenizer_fingerprint(_Tokenizer()),
        "corpus": {"fingerprint": "abc"},
        "settings": {"k": 3, "has_bos": has_bos, "signed": False},
    }
    return TriggerAtlas({0: LayerTopK(values, unit_ids, positions)}, None, UnitStore.from_units(units), manifest)


def _expected(key: int, own: list[int], j: int) -> tuple[float, float, float]:
    """(first, last, random) relative changes of the fake keys, by hand."""
    if key == 0:
        m = float(own[-1])
        return 0.0, (own[-2] - m) / m, ((own[-2] - m) / m if j == len(own) - 1 else 0.0)
    if key == 1:
        m = float(sum(own))
        return -own[0] / m, -own[-1] / m, -own[j] / m
    return 0.0, 0.0, 0.0  # key 2 sees the BOS, which is never removed (no BOS: it is 1 throughout)


@pytest.mark.parametrize("strategy", ["shared", "prefix"])
@pytest.mark.parametrize("has_bos", [True, False], ids=["bos", "no_bos"])
def test_fake_model_hand_computed(has_bos: bool, strategy: str) -> None:
    atlas, lens = _fake_atlas(has_bos), _FakeLens(0 if has_bos else None)
    kw = dict(keys_per_layer=3, examples=3, progress=False, shallow_threshold=0.3, strategy=strategy)
    result = mutation_test(lens, atlas, **kw)
    assert result.settings["run"]["strategy"] == strategy
    ex = result.per_example
    units = {0: [5, 6, 7, 40], 1: [3, 9, 2]}
    assert len(ex) == 6 and result.per_layer.loc[0, "n_skipped_short"] == 1  # unit 2, position 0
    for row in ex.itertuples():
        own = units[row.unit_id][: row.position + 1]
        expected = _expected(row.key, own, row.random_index)
        got = (row.change_first, row.change_last, row.change_random)
        assert np.allclose(got, expected, rtol=0, atol=1e-12), (row.key, own, row.random_index, got, expected)
        assert row.m_orig == pytest.approx(row.m_atlas, abs=1e-12)
    per_key = result.per_key.set_index("key")
    for key in range(3):
        rows = ex[ex.key == key]
        assert per_key.loc[key, "change_last"] == pytest.approx(rows.change_last.mean(), abs=1e-12)
        score = rows.change_random.mean() - rows.change_last.mean()
        assert per_key.loc[key, "shallow_score"] == pytest.approx(score, abs=1e-12)
        assert per_key.loc[key, "kind"] == ("shallow" if score >= 0.3 else "semantic")
    assert per_key.loc[2, "kind"] == "semantic" and per_key.loc[0, "kind"] == "shallow"
    layer = result.per_layer.iloc[0]
    assert layer.change_last == pytest.approx(ex.change_last.mean(), abs=1e-12)
    assert layer.change_last_ci_low <= layer.change_last <= layer.change_last_ci_high
    assert (layer.n_keys, layer.n_examples, layer.n_skipped) == (3, 6, 1)
    assert result.settings["has_bos"] is has_bos and result.settings["atlas_max_abs_deviation"] == 0.0
    assert result.per_layer.attrs["seed"] == 0 and "shallow_score" in result.settings["definitions"]


def test_fake_model_dedupes_and_batches() -> None:
    atlas = _fake_atlas(True)
    lens = _FakeLens(0)
    kw = dict(keys_per_layer=3, examples=3, progress=False, strategy="prefix")
    result = mutation_test(lens, atlas, batch_tokens=8, **kw)
    run = result.settings["run"]
    assert run["requested_sequences"][0] == 24 and run["unique_sequences"][0] < 24
    assert all(rows * width <= 8 or rows == 1 for rows, width in lens.calls)
    again = mutation_test(_FakeLens(0), atlas, dedupe=False, **kw)
    assert again.settings["run"]["unique_sequences"][0] == 24
    assert np.allclose(again.per_example[CHANGES], result.per_example[CHANGES], rtol=0, atol=1e-12)


def test_fake_model_shared_variants() -> None:
    """Units 0 and 1 each need the whole unit and the unit without its first token; a random
    removal adds a variant only when it is neither the first nor the last own token."""
    atlas, lens = _fake_atlas(True), _FakeLens(0)
    result = mutation_test(lens, atlas, keys_per_layer=3, examples=3, progress=False, batch_tokens=8)
    run, ex = result.settings["run"], result.per_example
    middle: dict[tuple[int, int], int] = {}  # (unit, j) -> tokens needed: BOS + own tokens up to the peak - 1
    for u, j, n in zip(ex.unit_id, ex.random_index, ex.n_own_tokens, strict=True):
        if 0 < j < n - 1:
            middle[u, j] = max(middle.get((u, j), 0), n)
    assert run["variants_by_kind"] == {"whole": 2, "first": 2, "random": len(middle)}
    assert run["variants"] == 4 + len(middle) and run["requested_sequences"] == 24
    assert sum(rows for rows, _ in lens.calls) == run["variants"] and len(lens.calls) == run["forwards"]
    assert all(rows * width <= 8 or rows == 1 for rows, width in lens.calls)
    assert set(lens.adapter.stops) == {"blocks.0.mlp.hook_post"}
    # peaks: unit 0 at own positions 3 and 2, unit 1 at 2 and 1; whole = BOS + up to the highest peak,
    # first = one token fewer: 5 + 4 (unit 0) + 4 + 3 (unit 1)
    assert run["tokens"] == 16 + sum(middle.values()) and run["token_layers"] == run["tokens"]


def test_zero_coefficient_examples_are_skipped() -> None:
    atlas = _fake_atlas(False)  # no BOS: key 2 is 1 everywhere; min_abs_coefficient above it skips them
    config = MutationConfig(keys_per_layer=3, examples=3, min_abs_coefficient=1.5)
    result = mutation_test(_FakeLens(None), atlas, config=config, progress=False)
    layer = result.per_layer.iloc[0]
    assert (layer.n_skipped_zero, layer.n_skipped_short, layer.n_skipped) == (2, 1, 3)
    assert set(result.per_key.key) == {0, 1} and layer.n_examples == 4


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(keys_per_layer=0),
        dict(examples=True),
        dict(seed=-1),
        dict(sign=2),
        dict(ci_level=1.0),
        dict(shallow_threshold=float("nan")),
        dict(on_atlas_mismatch="maybe"),
        dict(min_abs_coefficient=-1.0),
    ],
    ids=lambda kw: next(iter(kw)),
)
def test_config_rejects_bad_values(kwargs: dict) -> None:
    # Under the test-time type checker a value outside a Literal fails before validation.
    with pytest.raises((ConfigError, TypeCheckError), match=next(iter(kwargs))):
        MutationConfig(**kwargs)


def test_bad_arguments() -> None:
    atlas, lens = _fake_atlas(True), _FakeLens(0)
    with pytest.raises(ConfigError, match="signed=True"):
        mutation_test(lens, atlas, sign=-1, progress=False)
    with pytest.raises(ConfigError, match="not searched"):
        mutation_test(lens, atlas, layers=[1], progress=False)
    with pytest.raises(ConfigError, match="batch_tokens"):
        mutation_test(lens, atlas, batch_tokens=0, progress=False)
    with pytest.raises((ConfigError, TypeCheckError), match="strategy"):  # the type checker may answer first
        mutation_test(lens, atlas, strategy="fast", progress=False)
    with pytest.raises(ConfigError, match="not both"):
        mutation_test(lens, atlas, seed=1, config=MutationConfig(), progress=False)
    with pytest.raises(AtlasMismatchError, match="BOS"):
        mutation_test(_FakeLens(None), atlas, progress=False)


# -- tiny real models ----------------------------------------------------------------------------
def _prefix(atlas: TriggerAtlas, unit: int, position: int, bos: int | None) -> list[int]:
    return ([] if bos is None else [bos]) + atlas.units.get(unit)[1][: position + 1]


def brute_force(lens: MemoryLens, atlas: TriggerAtlas, per_example, bos: int | None) -> dict[str, np.ndarray]:
    """Every original and mutated prefix run alone; coefficient at its last position."""
    cache: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}
    out = {name: [] for name in ("m_orig", "m_first", "m_last", "m_random")}
    for row in per_example.itertuples():
        seq = _prefix(atlas, row.unit_id, row.position, bos)
        head, own, j = seq[: len(seq) - row.n_own_tokens], seq[len(seq) - row.n_own_tokens :], row.random_index
        variants = {"m_orig": own, "m_first": own[1:], "m_last": own[:-1], "m_random": own[:j] + own[j + 1 :]}
        for name, tokens in variants.items():
            ids = (row.layer, tuple(head + tokens))
            if ids not in cache:
                with torch.no_grad():
                    cache[ids] = lens.coefficients(torch.tensor([ids[1]]), layers=[row.layer])[row.layer][0, -1]
            out[name].append(float(cache[ids][row.key]))
    return {name: np.array(values) for name, values in out.items()}


@pytest.fixture(scope="module")
def float64_lens(tiny_folder):
    booted: dict[str, MemoryLens] = {}

    def get(family: str) -> MemoryLens:
        if family not in booted:
            bridge = boot(tiny_folder(family))
            bridge.to(torch.float64)
            booted[family] = MemoryLens(bridge)
        return booted[family]

    return get


def _atlas(lens: MemoryLens, signed: bool = False) -> TriggerAtlas:
    corpus = Corpus.from_texts(TEXTS)
    return search_triggers(lens.adapter, corpus, k=5, max_len=16, signed=signed, progress=False)


@pytest.mark.parametrize("family", FAMILY_NAMES, ids=FAMILY_NAMES)
def test_equals_brute_force(float64_lens, family: str) -> None:
    lens = float64_lens(family)
    atlas = _atlas(lens)
    config = MutationConfig(keys_per_layer=4, examples=3, on_atlas_mismatch="ignore")
    result = mutation_test(lens, atlas, config=config, batch_tokens=48, progress=False)
    ex = result.per_example
    bos = lens.adapter.bos_token_id
    assert result.settings["has_bos"] is (bos is not None) and len(ex) > 0
    expected = brute_force(lens, atlas, ex, bos)
    for name, values in expected.items():
        assert_close(torch.tensor(ex[name].to_numpy()), torch.tensor(values), rel=1e-5, what=f"{family} {name}")
    for layer, frame in ex.groupby("layer"):
        idx = frame.index.to_numpy()
        keep = np.abs(expected["m_orig"][idx]) > config.min_abs_coefficient
        row = result.per_layer.set_index("layer").loc[layer]
        for name in ("first", "last", "random"):
            change = (expected[f"m_{name}"][idx] - expected["m_orig"][idx]) / np.abs(expected["m_orig"][idx])
            mean = change[keep].mean()
            assert abs(row[f"change_{name}"] - mean) <= 1e-5 * abs(mean) + 1e-12, (family, layer, name)
    if lens.adapter.spec.layout != "post_norm":  # causal models: the prefix reproduces the atlas's peak
        assert result.settings["atlas_max_rel_deviation"] <= 1e-6  # float64 noise


@pytest.mark.parametrize("family", ["llama", "qwen2"], ids=["bos", "no_bos"])
def test_batching_and_dedupe_do_not_change_results(tiny_bridge, family: str) -> None:
    lens = MemoryLens(tiny_bridge(family))
    atlas = _atlas(lens)
    kw = dict(keys_per_layer=10, examples=5, progress=False)
    base = mutation_test(lens, atlas, batch_tokens=4096, **kw).per_example
    for batch_tokens, dedupe, strategy in ((16, True, "shared"), (16, True, "prefix"), (4096, False, "prefix")):
        run = dict(batch_tokens=batch_tokens, dedupe=dedupe, strategy=strategy)
        other = mutation_test(lens, atlas, **run, **kw).per_example
        assert other[["key", "rank", "random_index"]].equals(base[["key", "rank", "random_index"]])
        cols = ["m_orig", "m_first", "m_last", "m_random"]
        assert_close(torch.tensor(other[cols].to_numpy()), torch.tensor(base[cols].to_numpy()), rel=1e-5, what=family)


def test_seeds_are_reproducible(tiny_bridge) -> None:
    lens = MemoryLens(tiny_bridge("llama"))
    atlas = _atlas(lens)
    kw = dict(keys_per_layer=10, examples=5, progress=False)
    first, second = (mutation_test(lens, atlas, seed=3, **kw) for _ in range(2))
    assert first.per_example.equals(second.per_example) and first.per_layer.equals(second.per_layer)
    other = mutation_test(lens, atlas, seed=4, **kw).per_example
    assert not other[["key", "random_index"]].equals(first.per_example[["key", "random_index"]])
    everything = mutation_test(lens, atlas, keys_per_layer=10_000, examples=100, progress=False)
    assert everything.per_layer["n_keys_sampled"].tolist() == [lens.d_mlp] * lens.n_layers


def test_last_token_only_model(tiny_folder) -> None:
    """Attention outputs zeroed: every coefficient depends on the current token only, so removing
    the first token changes nothing and removing the last moves to the previous token's value."""
    bridge = boot(tiny_folder("llama"))
    with torch.no_grad():
        for name, param in bridge.named_parameters():
            if "o_proj" in name:
                param.zero_()
    lens = MemoryLens(bridge)
    atlas = _atlas(lens)
    result = mutation_test(lens, atlas, keys_per_layer=8, examples=5, progress=False)
    bos, vocab = lens.adapter.bos_token_id, torch.arange(lens.d_vocab)
    with torch.no_grad():
        per_token = lens.coefficients(torch.stack([torch.full_like(vocab, bos), vocab], 1))  # [vocab, 2, d_mlp]
    for row in result.per_example.itertuples():
        own = atlas.units.get(row.unit_id)[1][: row.position + 1]
        table = per_token[row.layer][:, 1, row.key].double()
        m, prev = float(table[own[-1]]), float(table[own[-2]])
        assert abs(row.change_first) <= 1e-5 and row.m_orig == pytest.approx(m, rel=1e-5, abs=1e-7)
        assert row.change_last == pytest.approx((prev - m) / abs(m), rel=1e-4, abs=1e-5)
        if row.random_index != len(own) - 1:
            assert abs(row.change_random) <= 1e-5


def test_signed_bottom_examples(float64_lens) -> None:
    lens = float64_lens("llama")
    atlas = _atlas(lens, signed=True)
    result = mutation_test(lens, atlas, sign=-1, keys_per_layer=5, examples=3, progress=False)
    ex = result.per_example
    assert (ex["m_orig"] < 0).all() and result.settings["sign"] == -1
    expected = -(ex["m_last"] - ex["m_orig"]) / ex["m_orig"].abs()
    assert np.allclose(ex["change_last"], expected, rtol=1e-12, atol=0)
    bottom = atlas.bottom[ex.layer.iloc[0]]
    assert ex.m_atlas.iloc[0] == pytest.approx(float(bottom.values[ex.key.iloc[0], 0]), rel=1e-9)


def test_bidirectional_deviation_warns(tiny_bridge, caplog) -> None:
    lens = MemoryLens(tiny_bridge("bert"))
    atlas = _atlas(lens)
    with caplog.at_level(logging.WARNING, logger="ffkv_lens.analysis.mutation"):
        result = mutation_test(lens, atlas, keys_per_layer=4, examples=3, progress=False)
    assert result.settings["atlas_max_rel_deviation"] > 1e-3 and "deviate from the atlas" in caplog.text
    assert not lens.adapter.causal and result.settings["run"]["strategy"] == "prefix"  # the fallback
    with pytest.raises(ConfigError, match="causal"):
        mutation_test(lens, atlas, keys_per_layer=4, examples=3, progress=False, strategy="shared")
    with pytest.raises(AtlasMismatchError, match="deviate"):
        mutation_test(lens, atlas, config=MutationConfig(keys_per_layer=4, on_atlas_mismatch="raise"), progress=False)


# -- the shared strategy against the per-prefix reference ----------------------------------------
CAUSAL = [family for family in FAMILY_NAMES if family != "bert"]
MEASURED = ["m_orig", "m_first", "m_last", "m_random"]


def _assert_same_examples(shared, prefix, rel: float, what: str) -> None:
    """Same examples and draws; every coefficient within ``rel`` of the column's largest |value|."""
    ids = ["layer", "key", "rank", "unit_id", "position", "random_index", "n_own_tokens"]
    assert shared[ids].equals(prefix[ids]), what
    for name in MEASURED:
        a, b = shared[name].to_numpy(), prefix[name].to_numpy()
        worst = np.abs(a - b).max() / np.abs(b).max()
        assert worst <= rel, f"{what} {name}: max |shared - prefix| = {worst:.3e} of max |m| > {rel:.0e}"


@pytest.mark.parametrize("family", CAUSAL, ids=CAUSAL)
def test_shared_equals_prefix(tiny_bridge, family: str) -> None:
    """float32: the shared strategy reads prefixes inside longer sequences (other summation
    order), so the two agree to float32 noise, checked at 1e-5 of the largest coefficient."""
    lens = MemoryLens(tiny_bridge(family))
    assert lens.adapter.causal
    atlas = _atlas(lens, signed=True)
    kw = dict(keys_per_layer=12, examples=5, progress=False, batch_tokens=64)
    for sign in (1, -1):
        shared = mutation_test(lens, atlas, sign=sign, strategy="shared", **kw)
        prefix = mutation_test(lens, atlas, sign=sign, strategy="prefix", **kw)
        assert shared.settings["run"]["strategy"] == "shared" and len(shared.per_example) > 20
        _assert_same_examples(shared.per_example, prefix.per_example, 1e-5, f"{family} sign={sign}")
        for name in CHANGES:  # per-layer means of the changes
            a, b = shared.per_layer[name].to_numpy(), prefix.per_layer[name].to_numpy()
            assert np.allclose(a, b, rtol=1e-4, atol=1e-5), (family, sign, name, a, b)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "gpt2"], ids=["bos", "no_bos", "gemma3", "gpt2"])
def test_shared_equals_prefix_float64(float64_lens, family: str) -> None:
    """float64: the two strategies agree within 1e-6 of the largest coefficient (observed: 0 on
    llama and gpt2, up to 3e-8 on qwen2 and gemma3). Not 1e-15 because the attention softmax runs
    in float32 even in a float64 model (transformers' eager attention, softmax(dtype=float32));
    its rounding in a row depends on the row's width, the sequence length (masked entries included;
    observed on qwen2: the layer-0 pattern at a position moves by 3e-8 from length 7 to 8), so a
    prefix read inside a longer sequence moves by float32 rounding, as in a wider padded batch."""
    lens = float64_lens(family)
    atlas = _atlas(lens)
    kw = dict(config=MutationConfig(keys_per_layer=12, examples=5, on_atlas_mismatch="ignore"), progress=False)
    shared = mutation_test(lens, atlas, strategy="shared", **kw).per_example
    prefix = mutation_test(lens, atlas, strategy="prefix", **kw).per_example
    _assert_same_examples(shared, prefix, 1e-6, family)


def test_random_index_rule_is_exactly_uniform() -> None:
    """Over all permutations of a unit of 6 tokens, the first entry below n takes each value of
    [0, n) equally often, for every n (exact counts: the rule is uniform for a uniform permutation)."""
    length = 6
    perms = [np.array(p) for p in itertools.permutations(range(length))]
    for n in range(1, length + 1):
        counts = np.bincount([random_token_index(p, n) for p in perms], minlength=length)
        assert counts[:n].tolist() == [len(perms) // n] * n and counts[n:].sum() == 0, (n, counts)


# chi-square quantiles at 1 - 1e-4, by degrees of freedom
_CHI2_9999 = {1: 15.14, 2: 18.42, 3: 21.11, 4: 23.51, 5: 25.74, 6: 27.86, 7: 29.88}


@pytest.mark.parametrize("unit_id", [0, 7, 123456])
def test_random_index_uniform_over_seeds(unit_id: int) -> None:
    """The seeded draws of one toy unit (8 tokens) over 4,000 seeds: a chi-square test of
    uniformity on [0, n) for each n passes at the 1e-4 level (deterministic given the seeds)."""
    seeds, length = 4000, 8
    draws = np.array(
        [[random_token_index(unit_order(s, unit_id, length), n) for n in range(2, length + 1)] for s in range(seeds)]
    )
    for column, n in enumerate(range(2, length + 1)):
        counts = np.bincount(draws[:, column], minlength=n)
        assert len(counts) == n, (n, counts)
        expected = seeds / n
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 <= _CHI2_9999[n - 1], (unit_id, n, counts, chi2)


def test_random_index_independent_of_layers_keys_and_batches(tiny_bridge) -> None:
    """The removed token depends on (seed, unit, prefix length) only: the same for every key and
    layer, whichever layers are tested and however the prefixes are batched."""
    lens = MemoryLens(tiny_bridge("llama"))
    atlas = _atlas(lens)
    kw = dict(keys_per_layer=20, examples=5, progress=False)
    every = mutation_test(lens, atlas, **kw).per_example
    one = mutation_test(lens, atlas, layers=[1], batch_tokens=16, **kw).per_example
    ids = ["key", "rank", "unit_id", "position", "random_index"]
    assert one[ids].reset_index(drop=True).equals(every[every.layer == 1][ids].reset_index(drop=True))
    assert every.groupby(["unit_id", "n_own_tokens"])["random_index"].nunique().max() == 1
    for row in every.itertuples():
        order = unit_order(0, row.unit_id, len(atlas.units.get(row.unit_id)[1]))
        assert row.random_index == random_token_index(order, row.n_own_tokens)


def test_batch_bounds() -> None:
    assert batch_bounds([], 8) == []
    assert batch_bounds([2, 2, 3, 5], 8) == [(0, 2), (2, 3), (3, 4)]
    assert batch_bounds([9], 8) == [(0, 1)]  # a row longer than the budget runs alone


def _segmentations(n: int):
    for cuts in itertools.product([False, True], repeat=max(0, n - 1)):
        points = [0] + [i + 1 for i, cut in enumerate(cuts) if cut] + [n]
        yield list(itertools.pairwise(points))


@pytest.mark.parametrize("seed", range(6))
def test_cheapest_bounds_is_optimal(seed: int) -> None:
    """Against every segmentation of up to 9 rows (lengths and depths random, some rows over budget)."""
    rng = np.random.default_rng(seed)
    n, budget = int(rng.integers(1, 10)), 12
    lengths, depths = rng.integers(1, 14, n), rng.integers(0, 5, n)

    def cost(bounds) -> float:
        total = 0.0
        for s, e in bounds:
            rows, width = e - s, int(lengths[s:e].max())
            if rows > 1 and rows * width > budget:
                return float("inf")
            total += (int(depths[s:e].max()) + 1) * (rows * width + FORWARD_OVERHEAD_TOKENS)
        return total

    got = cheapest_bounds(lengths, depths, budget)
    assert [s for s, _ in got] == sorted({s for s, _ in got}) and got[0][0] == 0 and got[-1][1] == n
    assert all(a[1] == b[0] for a, b in itertools.pairwise(got))
    assert cost(got) == min(cost(b) for b in _segmentations(n)), (lengths, depths, got)
    assert cheapest_bounds(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), budget) == []


@pytest.mark.slow
def test_smollm2_smoke() -> None:
    from ffkv_lens import load_model

    lens = MemoryLens(load_model("smollm2-135m", device="cpu"))
    atlas = lens.search_triggers(Corpus.default().take(2), k=5, layers=[0, 29], progress=False)
    result = mutation_test(lens, atlas, keys_per_layer=5, examples=3, progress=False)
    assert result.per_layer["layer"].tolist() == [0, 29] and (result.per_layer["n_examples"] > 0).all()
    assert result.settings["atlas_max_rel_deviation"] <= 1e-3
