"""Value/trigger agreement: a hand-computed case, a brute force on every family, the bootstrap.

The hand case uses a fake lens (4 memories, 6 tokens) whose value logits and atlas are written
out below; every number is checked exactly (permuted baseline: within 0.02 of its exact
expectation over 4,000 permutations). The brute force loops over ``atlas.examples`` and fully
sorts ``lens.value_logits``; ids, ranks and counts must be equal, rates within 1e-12.
"""

import math

import pandas as pd
import pytest
import torch

from ffkv_lens import Corpus, MemoryLens
from ffkv_lens.adapters import MemoryAdapter
from ffkv_lens.analysis import agreement, value_agreement
from ffkv_lens.analysis.agreement import AgreementConfig, agreement_targets, next_token_ids
from ffkv_lens.analysis.atlas import LayerTopK, TriggerAtlas, UnitStore, tokenizer_fingerprint
from ffkv_lens.analysis.values import ValueProjection, project_values
from ffkv_lens.errors import AtlasMismatchError, ConfigError
from tests.factories import FAMILY_NAMES

V = 6
LOGITS = torch.tensor(
    [
        [0.0, 5.0, 1.0, 2.0, -1.0, 3.0],  # top 1, bottom 4
        [4.0, 0.0, 0.0, 1.0, 2.0, -3.0],  # top 0, bottom 5
        [1.0, 2.0, 3.0, 6.0, 0.0, -2.0],  # top 3, bottom 5
        [2.0, 2.0, 1.0, 0.0, -1.0, -1.0],  # ties: top 0 (not 1), bottom 4 (not 5)
    ]
)
UNITS = {0: (0, [2, 1, 3]), 1: (0, [0, 3, 1, 5]), 2: (1, [4, 0]), 3: (2, [1, 1])}
# (unit, position) per key, best first; -1: empty slot. Next token = unit tokens[position + 1].
TOP = [
    [(1, 1), (0, 0), (2, 1)],  # next 1, 1, none
    [(0, 2), (1, 0), (3, 0)],  # none (top-1 ends its unit), 3, 1
    [(2, 0), (1, 2), (-1, -1)],  # next 0, 5
    [(3, 0), (0, 1), (1, 1)],  # next 1, 3, 1
]
BOTTOM = [
    [(2, 0), (0, 0), (-1, -1)],  # next 0, 1
    [(1, 2), (0, 0), (-1, -1)],  # next 5, 1
    [(3, 1), (1, 2), (-1, -1)],  # none, 5
    [(1, 0), (-1, -1), (-1, -1)],  # next 3
]
COUNTS = torch.tensor([1, 4, 0, 2, 0, 3])  # corpus next-token unigram, sum 10


class FakeTokenizer:
    def get_vocab(self) -> dict[str, int]:
        return {f"t{i}": i for i in range(V)}

    def batch_decode(self, ids: list[list[int]]) -> list[str]:
        return [f"t{row[0]}" for row in ids]


@MemoryAdapter.register
class FakeAdapter:
    """Just what the value analyses read from a MemoryAdapter."""

    n_layers, d_mlp, d_vocab, value_readout_mode, tokenizer = 1, 4, V, "fake", FakeTokenizer()
    check_layers = MemoryAdapter.check_layers

    def describe(self) -> dict:
        return {"backend": "fake"}

    def value_logits(self, layer: int, memories=None) -> torch.Tensor:
        return LOGITS if memories is None else LOGITS[torch.as_tensor(memories, dtype=torch.long)]


class FakeLens:
    """A lens-like handle: the analyses unwrap its ``adapter``."""

    def __init__(self) -> None:
        self.adapter = FakeAdapter()


def _table(rows: list[list[tuple[int, int]]], sign: int) -> LayerTopK:
    units = torch.tensor([[u for u, _ in row] for row in rows])
    positions = torch.tensor([[p for _, p in row] for row in rows])
    values = sign * torch.arange(3, 0, -1, dtype=torch.float32).expand(4, 3).clone()
    return LayerTopK(torch.where(units >= 0, values, 0.0), units, positions)


def hand_atlas(signed: bool = True) -> TriggerAtlas:
    manifest = {
        "model": "fake",
        "model_layout": {"n_layers": 1, "d_mlp": 4, "d_vocab": V},
        "tokenizer_fingerprint": tokenizer_fingerprint(FakeTokenizer()),
        "settings": {"k": 3, "signed": signed, "has_bos": False},
        "corpus": {"fingerprint": "hand"},
    }
    bottom = {0: _table(BOTTOM, -1)} if signed else None
    return TriggerAtlas({0: _table(TOP, 1)}, bottom, UnitStore.from_units(UNITS), manifest, FakeTokenizer(), COUNTS)


def test_next_tokens_by_hand() -> None:
    atlas = hand_atlas()
    assert next_token_ids(atlas, 0).tolist() == [[1, 1, -1], [-1, 3, 1], [0, 5, -1], [1, 3, 1]]
    assert next_token_ids(atlas, 0, sign=-1).tolist() == [[0, 1, -1], [5, 1, -1], [-1, 5, -1], [3, -1, -1]]


def test_hand_computed_paper_variant() -> None:
    result = value_agreement(FakeLens(), hand_atlas(), n_bootstrap=200, n_permutations=4000)
    mem = result.per_memory
    assert mem.value_top_token_id.tolist() == [1, 0, 3, 0]
    assert mem.value_top_token.tolist() == ["t1", "t0", "t3", "t0"]
    assert _nullable(mem.top1_next_token_id) == [1, None, 0, 1]
    assert _nullable(mem.top1_next_token) == ["t1", None, "t0", "t1"]
    assert _nullable(mem.agrees) == [True, None, False, False]  # memory 1 is not counted
    assert mem["rank"].fillna(-1).tolist() == [0, -1, 3, 0]  # memory 3: the tie with token 0 gives rank 0
    assert mem.precision_at_k.tolist() == [1.0, 0.0, 0.0, 0.0]
    assert mem.n_examples.tolist() == [2, 2, 2, 3]
    row = result.per_layer.iloc[0]
    assert row.agreement_rate == pytest.approx(1 / 3, abs=1e-12)
    assert (row.n_memories, row.n_no_next, row.median_rank) == (3, 1, 0.0)
    assert row.mean_precision_at_k == pytest.approx(0.25, abs=1e-12)
    assert row.baseline_uniform == pytest.approx(1 / 6, abs=1e-12)
    assert row.baseline_unigram == pytest.approx((0.4 + 0.2 + 0.1) / 3, abs=1e-12)
    # Exact expectation: value tokens [1, 0, 3, 0]; counted next tokens 1, 0, 1 -> (1/4 + 2/4 + 1/4) / 3.
    assert row.baseline_permuted == pytest.approx(1 / 3, abs=0.02)
    assert row.agreement_ci_low <= row.agreement_rate <= row.agreement_ci_high
    assert result.settings["variant"] == "paper" and result.per_layer.attrs["settings"] is result.settings


def test_hand_computed_signed_variant() -> None:
    result = value_agreement(FakeLens(), hand_atlas(), variant="signed", n_bootstrap=0, n_permutations=0)
    mem = result.per_memory
    assert mem.value_top_token_id.tolist() == [4, 5, 5, 4]  # the bottom tokens (ties to the lower id)
    assert _nullable(mem.agrees) == [False, True, None, False]
    assert mem["rank"].fillna(-1).tolist() == [1, 0, -1, 2]  # counted from the bottom
    assert mem.precision_at_k.tolist() == [0.0, 0.5, 1.0, 0.0]
    row = result.per_layer.iloc[0]
    assert row.agreement_rate == pytest.approx(1 / 3, abs=1e-12)
    assert (row.n_memories, row.n_no_next, row.median_rank) == (3, 1, 1.0)
    assert row.baseline_unigram == pytest.approx(0.1, abs=1e-12)
    assert math.isnan(row.agreement_ci_low) and math.isnan(row.baseline_permuted)


def test_permuted_baseline_equals_agreement_when_all_values_agree_on_a_token(monkeypatch) -> None:
    lens = FakeLens()
    monkeypatch.setattr(lens.adapter, "value_logits", lambda layer, memories=None: torch.eye(V)[[1, 1, 1, 1]][memories])
    result = value_agreement(lens, hand_atlas(), n_permutations=5)
    row = result.per_layer.iloc[0]
    assert row.agreement_rate == pytest.approx(2 / 3, abs=1e-12) and row.baseline_permuted == row.agreement_rate


def test_bootstrap_is_reproducible_and_brackets_the_rate(tiny_bridge) -> None:
    lens = MemoryLens(tiny_bridge("gpt2"))
    atlas = lens.search_triggers(Corpus.from_texts(TEXTS), k=4, progress=False, max_len=12)
    proj = project_values(lens, top_k=1)
    first = value_agreement(lens, atlas, proj, n_bootstrap=300, seed=3)
    again = value_agreement(lens, atlas, proj, n_bootstrap=300, seed=3)
    assert first.per_layer.equals(again.per_layer) and first.per_memory.equals(again.per_memory)
    for row in first.per_layer.itertuples():
        assert row.agreement_ci_low <= row.agreement_rate <= row.agreement_ci_high
    # Rate 1/3 over 3 memories: the interval is not degenerate, reproducible, and brackets the rate.
    hand = [value_agreement(FakeLens(), hand_atlas(), n_bootstrap=500, seed=0).per_layer for _ in range(2)]
    assert hand[0].equals(hand[1])
    low, rate, high = hand[0].loc[0, ["agreement_ci_low", "agreement_rate", "agreement_ci_high"]]
    assert low == 0.0 and rate < high <= 1.0


def test_errors_are_named() -> None:
    with pytest.raises(ConfigError, match="variant='signed' needs an atlas searched with signed=True"):
        value_agreement(FakeLens(), hand_atlas(signed=False), variant="signed")
    # Under the test-time type checker a bad Literal is refused before __post_init__ runs;
    # exercise our own validation (what users without beartype get) directly.
    config = AgreementConfig()
    object.__setattr__(config, "variant", "both")
    with pytest.raises(ConfigError, match=r"variant='both'; allowed: \('paper', 'signed'\)"):
        config.__post_init__()
    with pytest.raises(ConfigError, match="n_bootstrap=-1"):
        value_agreement(FakeLens(), hand_atlas(), n_bootstrap=-1)
    wrong = hand_atlas()
    wrong.manifest["model_layout"] = {"n_layers": 1, "d_mlp": 5, "d_vocab": V}
    with pytest.raises(AtlasMismatchError, match="d_mlp"):
        value_agreement(FakeLens(), wrong)


# -- brute force on tiny models of every family -------------------------------------------------
VARIANTS = ("paper", "signed")
TEXTS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Memories in feed-forward layers store patterns. They promote tokens!",
    "hello world. hello world. The quick brown fox jumps over the lazy dog.",
    "Paris is in France. Rome is in Italy. The fox is quick.",
]


def brute_force(lens: MemoryLens, atlas: TriggerAtlas, sign: int) -> dict[int, dict[str, list]]:
    """Plain loops over atlas.examples and fully sorted value logits."""
    out = {}
    for layer in atlas.layers:
        logits = lens.value_logits(layer).double()
        order = logits.sort(dim=-1, descending=sign == 1, stable=True).indices
        rows = {"value": [], "next": [], "agrees": [], "rank": [], "precision": [], "n_examples": []}
        for key in range(lens.d_mlp):
            value_token = int(order[key, 0])
            examples = atlas.examples(layer, key, sign=sign)
            nexts = [e.next_token_id for e in examples if e.next_token_id is not None]
            top1 = examples[0].next_token_id if examples else None
            rows["value"].append(value_token)
            rows["next"].append(top1)
            rows["agrees"].append(None if top1 is None else value_token == top1)
            beats = (sign * logits[key] > sign * logits[key, top1]) if top1 is not None else None
            rows["rank"].append(None if top1 is None else int(beats.sum()))
            rows["precision"].append(sum(n == value_token for n in nexts) / len(nexts) if nexts else math.nan)
            rows["n_examples"].append(len(nexts))
        out[layer] = rows
    return out


def _nullable(series: pd.Series) -> list:
    """Values with missing entries (pd.NA, None, NaN) as None."""
    return [None if pd.isna(x) else x for x in series.tolist()]


@torch.no_grad()
def test_ranks_from_the_projection_pass_are_reused_and_equal(tiny_bridge, monkeypatch, tmp_path) -> None:
    lens = MemoryLens(tiny_bridge("llama"))
    atlas = lens.search_triggers(Corpus.from_texts(TEXTS), k=4, signed=True, progress=False, max_len=12)
    plain = project_values(lens, top_k=3, chunk_memories=5)
    targets = {sign: agreement_targets(atlas, sign) for sign in (1, -1)}
    ranked = ValueProjection.load(
        project_values(lens, top_k=3, chunk_memories=7, rank_targets=targets).save(tmp_path / "v"), lens=lens
    )
    expected = {v: value_agreement(lens, atlas, plain, variant=v, n_bootstrap=0, n_permutations=0) for v in VARIANTS}
    calls = []
    monkeypatch.setattr(agreement, "value_ranks", lambda *a, **kw: calls.append(a))
    for variant in VARIANTS:  # the stored ranks answer: no rank pass (value_ranks never called)
        got = value_agreement(lens, atlas, ranked, variant=variant, n_bootstrap=0, n_permutations=0)
        assert got.per_layer.equals(expected[variant].per_layer)
        assert got.per_memory.equals(expected[variant].per_memory)
    assert calls == []
    # Other targets (another atlas) are not answered from the stored ranks.
    other = lens.search_triggers(Corpus.from_texts(TEXTS[:2]), k=4, signed=True, progress=False, max_len=12)
    with pytest.raises(TypeError):  # the patched value_ranks returns None: proof that it was called
        value_agreement(lens, other, ranked, n_bootstrap=0, n_permutations=0)
    assert len(calls) >= 1


@pytest.mark.parametrize("family", FAMILY_NAMES)
@torch.no_grad()
def test_agreement_equals_brute_force(tiny_bridge, family: str) -> None:
    lens = MemoryLens(tiny_bridge(family))
    atlas = lens.search_triggers(Corpus.from_texts(TEXTS), k=4, signed=True, progress=False, max_len=12)
    unigram = atlas.next_token_counts.double() / atlas.next_token_counts.sum()
    projection = project_values(lens, top_k=3, chunk_memories=5)  # ranks in a separate pass
    for variant, sign in (("paper", 1), ("signed", -1)):
        result = value_agreement(lens, atlas, variant=variant, n_bootstrap=0, n_permutations=0)
        given = value_agreement(lens, atlas, projection, variant=variant, n_bootstrap=0, n_permutations=0)
        assert given.per_layer.equals(result.per_layer) and given.per_memory.equals(result.per_memory)
        expected = brute_force(lens, atlas, sign)
        for layer, rows in expected.items():
            mem = result.per_memory[result.per_memory.layer == layer]
            assert mem.value_top_token_id.tolist() == rows["value"]
            assert _nullable(mem.top1_next_token_id) == rows["next"]
            assert _nullable(mem.agrees) == rows["agrees"]
            assert _nullable(mem["rank"]) == rows["rank"]
            assert mem.n_examples.tolist() == rows["n_examples"]
            torch.testing.assert_close(
                torch.tensor(mem.precision_at_k.tolist()), torch.tensor(rows["precision"]), equal_nan=True
            )
            counted = [a for a in rows["agrees"] if a is not None]
            row = result.per_layer[result.per_layer.layer == layer].iloc[0]
            assert (row.n_memories, row.n_no_next) == (len(counted), lens.d_mlp - len(counted))
            assert row.agreement_rate == pytest.approx(sum(counted) / len(counted), abs=1e-12)
            ranks = torch.tensor([r for r in rows["rank"] if r is not None], dtype=torch.float64)
            assert row.median_rank == pytest.approx(float(ranks.quantile(0.5)), abs=1e-9)
            tokens = [v for v, a in zip(rows["value"], rows["agrees"], strict=True) if a is not None]
            assert row.baseline_unigram == pytest.approx(float(unigram[tokens].mean()), abs=1e-12)


@torch.no_grad()
def test_next_token_follows_the_peak(tiny_bridge) -> None:
    """Alignment on models with and without BOS: the peak is at the example's position, the next token after it."""
    for family in ("llama", "gpt_neox"):
        lens = MemoryLens(tiny_bridge(family))
        atlas = lens.search_triggers(Corpus.from_texts(TEXTS[:2]), k=2, progress=False, max_len=12, layers=[1])
        result = value_agreement(lens, atlas, n_bootstrap=0, n_permutations=0)
        bos = lens.adapter.bos_token_id
        shift = 0 if bos is None else 1
        for key in range(0, lens.d_mlp, 9):
            unit = int(atlas.top[1].units[key, 0])
            position = int(atlas.top[1].positions[key, 0])
            _, ids = atlas.units.get(unit)
            m = lens.coefficients(torch.tensor([([bos] if bos is not None else []) + ids]), layers=1)[1][0, :, key]
            assert int(m[shift:].argmax()) == position
            expected = ids[position + 1] if position + 1 < len(ids) else None
            assert _nullable(result.per_memory.top1_next_token_id)[key] == expected


@pytest.mark.slow
@torch.no_grad()
def test_smollm2_agreement_smoke() -> None:
    from ffkv_lens import load_model

    lens = MemoryLens(load_model("smollm2-135m", device="cpu"))
    atlas = lens.search_triggers(Corpus.default().take(20), k=5, max_tokens=1000, layers=[0, 29], progress=False)
    result = value_agreement(lens, atlas, n_bootstrap=100, n_permutations=2)
    assert result.per_layer.layer.tolist() == [0, 29]
    assert (result.per_layer.n_memories + result.per_layer.n_no_next == lens.d_mlp).all()
    assert len(result.per_memory) == 2 * lens.d_mlp
    assert result.settings["value_readout_mode"] == lens.value_readout_mode
