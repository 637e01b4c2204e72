"""The mutation test against hand-computed cases and a brute-force recomputation.

Tolerances: the fake model is exact (float64 arithmetic on integers) and compared at 1e-12;
brute force runs every mutated prefix alone (batch of one, no padding) in float64 and must
agree within 1e-5 relative (per example and per-layer means); batching, deduplication and the
zero-attention model compare in float32 within 1e-5.
"""

import logging

import numpy as np
import pytest
import torch
from jaxtyping import TypeCheckError

from ffkv_lens import MemoryLens
from ffkv_lens.analysis import mutation_test
from ffkv_lens.analysis.atlas import LayerTopK, TriggerAtlas, UnitStore, tokenizer_fingerprint
from ffkv_lens.analysis.mutation import MutationConfig
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


class _Adapter:
    """Key 0: the last token's id. Key 1: sum of the ids so far. Key 2: 5 if the sequence starts
    with BOS (id 0; contributes 0 to keys 0 and 1) else 1."""

    tokenizer, device = _Tokenizer(), torch.device("cpu")

    def __init__(self, bos: int | None) -> None:
        self.bos_token_id = bos

    def describe(self) -> dict:
        return {"name": "fake"}


class _FakeLens:
    n_layers, d_mlp, d_vocab = 1, 3, 64

    def __init__(self, bos: int | None) -> None:
        self.adapter = _Adapter(bos)
        self.calls: list[tuple[int, int]] = []

    def coefficients(self, tokens, *, layers, attention_mask):
        self.calls.append(tuple(tokens.shape))
        x = tokens.double() * attention_mask
        first_is_bos = (tokens[:, :1] == 0).double().expand_as(x)
        return {0: torch.stack([x, x.cumsum(1), 1.0 + 4.0 * first_is_bos], dim=-1)}


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


@pytest.mark.parametrize("has_bos", [True, False], ids=["bos", "no_bos"])
def test_fake_model_hand_computed(has_bos: bool) -> None:
    atlas, lens = _fake_atlas(has_bos), _FakeLens(0 if has_bos else None)
    result = mutation_test(lens, atlas, keys_per_layer=3, examples=3, progress=False, shallow_threshold=0.3)
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
    result = mutation_test(lens, atlas, keys_per_layer=3, examples=3, progress=False, batch_tokens=8)
    run = result.settings["run"]
    assert run["requested_sequences"][0] == 24 and run["unique_sequences"][0] < 24
    assert all(rows * width <= 8 or rows == 1 for rows, width in lens.calls)
    again = mutation_test(_FakeLens(0), atlas, keys_per_layer=3, examples=3, progress=False, dedupe=False)
    assert again.settings["run"]["unique_sequences"][0] == 24
    assert np.allclose(again.per_example[CHANGES], result.per_example[CHANGES], rtol=0, atol=1e-12)


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
    for batch_tokens, dedupe in ((16, True), (4096, False)):
        other = mutation_test(lens, atlas, batch_tokens=batch_tokens, dedupe=dedupe, **kw).per_example
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
    with pytest.raises(AtlasMismatchError, match="deviate"):
        mutation_test(lens, atlas, config=MutationConfig(keys_per_layer=4, on_atlas_mismatch="raise"), progress=False)


@pytest.mark.slow
def test_smollm2_smoke() -> None:
    from ffkv_lens import load_model

    lens = MemoryLens(load_model("smollm2-135m", device="cpu"))
    atlas = lens.search_triggers(Corpus.default().take(2), k=5, layers=[0, 29], progress=False)
    result = mutation_test(lens, atlas, keys_per_layer=5, examples=3, progress=False)
    assert result.per_layer["layer"].tolist() == [0, 29] and (result.per_layer["n_examples"] > 0).all()
    assert result.settings["atlas_max_rel_deviation"] <= 1e-3
