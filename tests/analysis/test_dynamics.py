"""Section-5 analyses (composition, residual vs FFN) against hand-computed cases and a brute force.

The brute force runs every sampled prefix alone (batch of one, no padding) with
``adapter.record``, reads every state with plain loops and recomputes every table column in
plain Python. Tolerances: counts and fractions must be equal; probabilities within 1e-5
(absolute); ``r + y == o`` within 1e-5 relative (fp32).
"""

import hashlib
import statistics

import numpy as np
import pandas as pd
import pytest
import torch

from ffkv_lens import MemoryLens
from ffkv_lens.analysis.dynamics import (
    BUCKETS,
    STOPWORDS,
    DynamicsConfig,
    PositionRecords,
    active_memories,
    bucket_codes,
    composition,
    composition_table,
    layer_dynamics,
    memory_agreement,
    residual_agreement,
    residual_table,
    wilson_interval,
)
from ffkv_lens.analysis.sampling import SampleConfig, prefix_batches, record_states, sample_prefixes
from ffkv_lens.analysis.values import project_values
from ffkv_lens.corpus import Corpus, iter_units
from ffkv_lens.errors import AtlasMismatchError, ConfigError
from tests.factories import FAMILY_NAMES
from tests.helpers import assert_close

TEXTS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Memories in feed-forward layers store patterns. They promote tokens!",
    "hello world. hello world. The quick brown fox jumps over the lazy dog.",
    "0123456789 is a number. Is it? Yes, it is.",
    "",
    "Paris is in France. Rome is in Italy. The fox is quick.",
    "The dog is lazy. A fox jumps over it.",
]
POSITIONS = 12


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return Corpus.from_texts(TEXTS)


def run(lens: MemoryLens, corpus: Corpus, **kw):
    kw = dict(dict(positions=POSITIONS, seed=3, progress=False, batch_tokens=48), **kw)
    return layer_dynamics(lens, corpus, **kw)


# -- hand-computed cases ------------------------------------------------------------------------
def test_bucket_codes_partition_by_hand() -> None:
    r = torch.tensor([1, 1, 1, 1, 1, 4])
    y = torch.tensor([1, 2, 2, 2, 1, 5])
    o = torch.tensor([1, 1, 2, 3, 3, 6])
    got = [BUCKETS[i] for i in bucket_codes(r, y, o).tolist()]
    assert got == ["agreement", "residual", "ffn", "composition", "other", "composition"]


def test_active_memories_by_hand() -> None:
    m = torch.tensor([[3.0, -2.0, 0.2, 0.0, -0.31], [0.0, 0.0, 0.0, 0.0, 0.0]])
    assert active_memories(m, "positive").tolist() == [[True, False, True, False, False], [False] * 5]
    # |m| >= 0.1 * 3 = 0.3; zeros are never active, even when the whole row is zero.
    assert active_memories(m, "magnitude", 0.1).tolist() == [[True, True, False, False, True], [False] * 5]
    assert active_memories(m, "magnitude", 0.5).tolist()[0] == [True, True, False, False, False]


def test_memory_agreement_by_hand() -> None:
    # Memory 0 predicts top 7 (m > 0); memory 1 predicts its bottom 5 (m < 0); memory 2 is inactive.
    m = torch.tensor([[1.0, -2.0, 0.5]] * 4)
    active = torch.tensor([[True, True, False]] * 3 + [[False, True, False]])
    value_top, value_bottom = torch.tensor([7, 8, 9]), torch.tensor([4, 5, 6])
    layer_top = torch.tensor([7, 8, 9, 5])
    # 7: memory 0 agrees; 8: memory 1's top, but m_1 < 0 so it predicts 5; 9: only inactive memory 2.
    assert memory_agreement(m, active, layer_top, value_top, value_bottom).tolist() == [True, False, False, True]


def test_wilson_interval_by_hand() -> None:
    low, high = wilson_interval(np.array([5, 0, 0]), np.array([10, 10, 0]))
    # p = 0.5, n = 10, z = 1.96: centre 0.5, half-width 1.96 * sqrt(0.025 + 0.0096) / 1.384 = 0.2634.
    assert abs(low[0] - 0.2366) < 1e-4 and abs(high[0] - 0.7634) < 1e-4
    assert low[1] == 0.0 and abs(high[1] - 0.2775) < 1e-4
    assert np.isnan(low[2]) and np.isnan(high[2])


class WordTokenizer:
    """Token id -> word."""

    words = {0: " the", 1: "Paris", 2: " Of", 3: ",", 4: "fox", 5: "\n"}

    def decode(self, ids, clean_up_tokenization_spaces=False):
        return "".join(self.words[i] for i in ids)


def hand_records() -> PositionRecords:
    # 5 positions, 2 layers.
    return PositionRecords(
        unit_id=torch.arange(5),
        doc_id=torch.zeros(5, dtype=torch.int64),
        position=torch.tensor([0, 3, 4, 9, 1]),
        prefix_len=torch.tensor([1, 4, 5, 10, 2]),
        final_token=torch.tensor([1, 1, 4, 0, 3]),
        n_active=torch.tensor([[2, 0], [4, 1], [0, 1], [2, 2], [2, 6]]),
        agrees=torch.tensor([[True, False], [True, True], [False, True], [True, False], [False, False]]),
        top_r=torch.tensor([[1, 1], [0, 1], [4, 4], [0, 0], [3, 3]]),
        top_y=torch.tensor([[0, 2], [1, 3], [4, 5], [2, 0], [3, 3]]),
        top_o=torch.tensor([[1, 2], [1, 1], [4, 4], [3, 0], [3, 1]]),
        prob_r=torch.tensor([[0.5, 0.1], [0.2, 0.3], [0.9, 0.9], [0.1, 0.4], [0.3, 0.2]]),
    )


def test_composition_table_by_hand() -> None:
    table = composition_table(hand_records(), [0, 1], n_layers=2, d_mlp=8, tokenizer=WordTokenizer())
    assert table["layer"].tolist() == [0, 1] and table["n_positions"].tolist() == [5, 5]
    assert table["active_mean"].tolist() == [2.0, 2.0]
    assert table["active_fraction"].tolist() == [0.25, 0.25]
    assert table["n_agree"].tolist() == [3, 2]
    assert table["no_memory_agrees"].tolist() == [2 / 5, 3 / 5]
    # Layer 0 agreeing positions 0, 1, 3 predict " the" (stop word), "Paris", " Of" (stop word, lower-cased).
    # Layer 1 agreeing positions 1, 2 predict "," (punctuation) and "\n" (neither).
    assert table["agree_stopword_share"].tolist() == [2 / 3, 0.0]
    assert table["agree_punctuation_share"].tolist() == [0.0, 1 / 2]
    # Short prefixes (< 5 tokens): positions 0, 1 and 4; layer 0 agrees at 0, 1, 3; layer 1 at 1, 2.
    assert table["agree_short_prefix_share"].tolist() == [2 / 3, 1 / 2]
    assert (table["no_memory_agrees_ci_low"] <= table["no_memory_agrees"]).all()


def test_residual_table_by_hand() -> None:
    table = residual_table(hand_records(), [0, 1], n_layers=2)
    assert table["depth"].tolist() == [0.5, 1.0]
    # final = (1, 1, 4, 0, 3); top_r matches it at positions 0, 2, 3, 4 in layer 0 and everywhere in layer 1.
    assert table["resid_matches_final"].tolist() == [4 / 5, 5 / 5]
    assert_close(torch.tensor(table["resid_prob_final_median"].values), torch.tensor([0.3, 0.3]), rel=1e-9)
    assert_close(torch.tensor(table["resid_prob_final_mean"].values), torch.tensor([0.4, 0.38]), rel=1e-6)
    # Layer 0 (r, y, o): (1,0,1) residual, (0,1,1) ffn, (4,4,4) agreement, (0,2,3) composition, (3,3,3) agreement.
    # Layer 1: (1,2,2) ffn, (1,3,1) residual, (4,5,4) residual, (0,0,0) agreement, (3,3,1) other.
    expected = {"residual": [1, 2], "ffn": [1, 1], "agreement": [2, 1], "composition": [1, 0], "other": [0, 1]}
    for bucket, counts in expected.items():
        assert table[f"frac_{bucket}"].tolist() == [c / 5 for c in counts], bucket
    total = sum(table[f"frac_{b}"] for b in BUCKETS)
    assert np.allclose(total, 1.0, atol=1e-12)


@pytest.mark.parametrize(
    ("config", "changes", "pattern"),
    [
        pytest.param(DynamicsConfig(), {"active": "loud"}, r"active='loud'.*\['positive', 'magnitude'\]", id="active"),
        pytest.param(DynamicsConfig(), {"active_threshold": 0}, r"active_threshold=0.*\(0, 1\]", id="threshold"),
        pytest.param(DynamicsConfig(), {"short_prefix": 0}, r"short_prefix=0", id="short-prefix"),
        pytest.param(SampleConfig(), {"positions": 0}, r"positions=0.*>= 1", id="positions"),
        pytest.param(SampleConfig(), {"unit": "line"}, r"unit='line'", id="unit"),
        pytest.param(SampleConfig(), {"max_units": 0}, r"max_units=0.*or None", id="max-units"),
    ],
)
def test_configs_validate_and_name_the_value(config, changes: dict, pattern: str) -> None:
    # The test-time type checker refuses a bad Literal before __post_init__ runs; exercise our
    # own validation (what users without beartype get) directly, as tests/corpus does.
    for key, value in changes.items():
        object.__setattr__(config, key, value)
    with pytest.raises(ConfigError, match=pattern):
        config.__post_init__()


# -- sampling -----------------------------------------------------------------------------------
def independent_sample(corpus, tokenizer, positions, seed, max_units=None):
    """The documented scheme, re-implemented: smallest 64-bit blake2b keys, position = draw mod n."""
    units = list(iter_units(corpus, tokenizer, unit="sentence", max_len=128))[:max_units]
    digest = lambda u: hashlib.blake2b(f"ffkv-lens/prefix/{seed}/{u.unit_id}".encode(), digest_size=16).digest()  # noqa: E731
    chosen = sorted(units, key=lambda u: (int.from_bytes(digest(u)[:8], "big"), u.unit_id))[:positions]
    out = []
    for u in sorted(chosen, key=lambda u: u.unit_id):
        p = int.from_bytes(digest(u)[8:], "big") % u.n_tokens
        out.append((u.unit_id, p, tuple(u.token_ids[: p + 1])))
    return out


def test_sampling_follows_the_documented_scheme(tiny_bridge, corpus) -> None:
    tok = MemoryLens(tiny_bridge("llama")).adapter.tokenizer
    for seed, positions, max_units in [(0, 5, None), (3, POSITIONS, None), (7, 100, None), (1, 4, 9)]:
        drawn = sample_prefixes(corpus, tok, SampleConfig(positions=positions, seed=seed, max_units=max_units))
        got = [(p.unit_id, p.position, p.token_ids) for p in drawn.prefixes]
        assert got == independent_sample(corpus, tok, positions, seed, max_units), (seed, positions)
        assert all(len(p.token_ids) == p.position + 1 <= p.unit_tokens for p in drawn.prefixes)
    n_units = len(list(iter_units(corpus, tok)))
    assert len(sample_prefixes(corpus, tok, SampleConfig(positions=1000)).prefixes) == n_units
    a = sample_prefixes(corpus, tok, SampleConfig(positions=6, seed=0)).prefixes
    b = sample_prefixes(corpus, tok, SampleConfig(positions=6, seed=1)).prefixes
    assert a == sample_prefixes(corpus, tok, SampleConfig(positions=6, seed=0)).prefixes and a != b


def test_batches_put_bos_first_and_point_at_the_last_prefix_token(tiny_bridge, corpus) -> None:
    lens = MemoryLens(tiny_bridge("llama"))
    bos = lens.adapter.bos_token_id
    assert bos is not None
    prefixes = sample_prefixes(corpus, lens.adapter.tokenizer, SampleConfig(positions=POSITIONS, seed=3)).prefixes
    seen = []
    for batch in prefix_batches(prefixes, batch_tokens=40, bos_token_id=bos, pad_token_id=0):
        assert batch.tokens.shape[0] * batch.tokens.shape[1] <= 40 or batch.tokens.shape[0] == 1
        for row, index in enumerate(batch.index.tolist()):
            ids = prefixes[index].token_ids
            assert batch.tokens[row, 0] == bos and batch.tokens[row, 1 : len(ids) + 1].tolist() == list(ids)
            assert int(batch.last[row]) == len(ids) and int(batch.tokens[row, batch.last[row]]) == ids[-1]
            assert batch.attention_mask[row].sum() == len(ids) + 1
            seen.append(index)
    assert sorted(seen) == list(range(len(prefixes)))


# -- brute force on every family ----------------------------------------------------------------
def brute_force(lens: MemoryLens, prefixes, threshold: float):
    """Every prefix alone; ``{active mode: rows}`` with, per position and layer,
    ``(n_active, agrees, top_r, top_y, top_o, prob_r)``, and the final predictions (checked
    against the model's own output wherever the last ``o`` is the final residual)."""
    adapter = lens.adapter
    bos = adapter.bos_token_id
    layers = list(range(lens.n_layers))
    names = [n for layer in layers for n in adapter.hook_names(layer).required()]
    value_logits = [lens.value_logits(layer) for layer in layers]
    top = lambda x: int(lens.readout(x[None])[0].argmax())  # noqa: E731
    rows, finals = {"positive": [], "magnitude": []}, []
    with torch.no_grad():
        for prefix in prefixes:
            tokens = torch.tensor([([bos] if bos is not None else []) + list(prefix.token_ids)])
            acts = adapter.record(tokens, names)
            final = top(acts[adapter.hook_names(layers[-1]).resid_after_ffn][0, -1])
            if adapter.spec.layout != "post_norm":  # there the last o is the final residual
                assert final == int(adapter.run_with_hooks(tokens, [])[0, -1].argmax()), "final prediction"
            finals.append(final)
            per_layer = {"positive": [], "magnitude": []}
            for layer in layers:
                hooks = adapter.hook_names(layer)
                m = acts[hooks.coefficients][0, -1].tolist()
                y, o = acts[hooks.ffn_output][0, -1], acts[hooks.resid_after_ffn][0, -1]
                r = acts[hooks.resid_before_ffn][0, -1] if hooks.resid_before_ffn else o - y
                assert_close(r + y, o, rel=1e-5, what=f"r + y == o at layer {layer}")
                t_r, t_y, t_o = top(r), top(y), top(o)
                prob = float(torch.softmax(lens.readout(r[None])[0].double(), -1)[final])
                biggest = max(abs(mi) for mi in m)
                for mode in per_layer:
                    n_active, agrees = 0, False
                    for i, mi in enumerate(m):
                        on = mi > 0 if mode == "positive" else (mi != 0 and abs(mi) >= threshold * biggest)
                        if on:
                            n_active += 1
                            logits = value_logits[layer][i]
                            agrees = agrees or int(logits.argmax() if mi > 0 else logits.argmin()) == t_y
                    per_layer[mode].append((n_active, agrees, t_r, t_y, t_o, prob))
            for mode in rows:
                rows[mode].append(per_layer[mode])
    return rows, finals


def bucket_of(r: int, y: int, o: int) -> str:
    if r == y == o:
        return "agreement"
    if o == r:
        return "residual"
    if o == y:
        return "ffn"
    if r == y:
        return "other"
    return "composition"


def expected_tables(lens, prefixes, rows, finals):
    n, tok = len(prefixes), lens.adapter.tokenizer
    comp, resid = [], []
    for layer in range(lens.n_layers):
        cells = [row[layer] for row in rows]
        agreeing = [(p, c) for p, c in zip(prefixes, cells, strict=True) if c[1]]
        word = lambda t: tok.decode([t], clean_up_tokenization_spaces=False).strip().lower()  # noqa: E731
        comp.append(
            {
                "layer": layer,
                "n_positions": n,
                "active_mean": sum(c[0] for c in cells) / n,
                "no_memory_agrees": (n - len(agreeing)) / n,
                "n_agree": len(agreeing),
                "agree_stopword_share": sum(word(c[3]) in STOPWORDS for _, c in agreeing) / len(agreeing)
                if agreeing
                else float("nan"),
                "agree_short_prefix_share": sum(len(p.token_ids) < 5 for p, _ in agreeing) / len(agreeing)
                if agreeing
                else float("nan"),
            }
        )
        buckets = [bucket_of(c[2], c[3], c[4]) for c in cells]
        entry = {
            "layer": layer,
            "resid_matches_final": sum(c[2] == f for c, f in zip(cells, finals, strict=True)) / n,
            "resid_prob_final_median": statistics.median(c[5] for c in cells),
            "resid_prob_final_mean": sum(c[5] for c in cells) / n,
        }
        entry.update({f"frac_{b}": buckets.count(b) / n for b in BUCKETS})
        resid.append(entry)
    return pd.DataFrame(comp), pd.DataFrame(resid)


def assert_table_matches(actual: pd.DataFrame, expected: pd.DataFrame, what: str) -> None:
    for column in expected.columns:
        got, want = actual[column].to_numpy(dtype=float), expected[column].to_numpy(dtype=float)
        if column.startswith("resid_prob"):
            assert np.allclose(got, want, atol=1e-5, rtol=0, equal_nan=True), f"{what} {column}: {got} != {want}"
        else:
            same = (got == want) | (np.isnan(got) & np.isnan(want))
            assert same.all(), f"{what} {column}: {got} != {want}"


@pytest.mark.parametrize("family", FAMILY_NAMES, ids=FAMILY_NAMES)
def test_layer_dynamics_equals_brute_force(tiny_bridge, corpus, family: str) -> None:
    lens = MemoryLens(tiny_bridge(family))
    prefixes = sample_prefixes(corpus, lens.adapter.tokenizer, SampleConfig(positions=POSITIONS, seed=3)).prefixes
    rows, finals = brute_force(lens, prefixes, 0.25)
    for active in ("positive", "magnitude"):
        result = run(lens, corpus, active=active, active_threshold=0.25)
        assert result.samples["unit_id"].tolist() == [p.unit_id for p in prefixes]
        assert result.samples["position"].tolist() == [p.position for p in prefixes]
        assert result.records.final_token.tolist() == finals
        comp, resid = expected_tables(lens, prefixes, rows[active], finals)
        assert_table_matches(result.composition, comp, f"{family} {active} composition")
        assert_table_matches(result.residual, resid, f"{family} {active} residual")
        assert result.composition.attrs["settings"]["active"] == active
        assert result.settings["sample"]["scheme"] == "bottom-k-blake2b-v1"


@pytest.mark.parametrize("family", FAMILY_NAMES, ids=FAMILY_NAMES)
def test_r_plus_y_equals_o_at_sampled_positions(tiny_bridge, corpus, family: str) -> None:
    lens = MemoryLens(tiny_bridge(family))
    prefixes = sample_prefixes(corpus, lens.adapter.tokenizer, SampleConfig(positions=POSITIONS, seed=3)).prefixes
    bos = lens.adapter.bos_token_id
    layers = list(range(lens.n_layers))
    for batch in prefix_batches(prefixes, batch_tokens=64, bos_token_id=bos, pad_token_id=0):
        states = record_states(lens, batch, layers)
        assert states.coefficients.shape == (len(batch.index), lens.n_layers, lens.d_mlp)
        assert_close(states.resid_before + states.ffn_output, states.resid_after, rel=1e-5, what=f"{family} r + y")


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3", "phi", "bert"])
def test_batch_size_independence(tiny_bridge, corpus, family: str) -> None:
    lens = MemoryLens(tiny_bridge(family))
    small, big = run(lens, corpus, batch_tokens=8), run(lens, corpus, batch_tokens=4096)
    for field in PositionRecords._fields:
        a, b = getattr(small.records, field), getattr(big.records, field)
        if field == "prob_r":
            assert_close(a, b, rel=1e-5, what=field)
        else:
            assert torch.equal(a, b), field
    pd.testing.assert_frame_equal(small.composition, big.composition)
    assert small.settings == dict(big.settings, batch_tokens=small.settings["batch_tokens"])


@pytest.mark.parametrize("family", ["gpt2", "gemma2", "bert"])
def test_reference_readouts_give_the_same_records(tiny_bridge, corpus, family: str, monkeypatch) -> None:
    """The tiled readouts (default; BERT: reference anyway) against FFKV_LENS_KERNELS=reference."""
    lens = MemoryLens(tiny_bridge(family))
    fast = run(lens, corpus)
    monkeypatch.setenv("FFKV_LENS_KERNELS", "reference")
    slow = run(lens, corpus)
    for field in PositionRecords._fields:
        a, b = getattr(fast.records, field), getattr(slow.records, field)
        if field == "prob_r":  # float32 sums in another order
            assert float((a - b).abs().max()) <= 1e-6, field
        else:
            assert torch.equal(a, b), field


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_a_given_projection_gives_the_same_records(tiny_bridge, corpus, family: str) -> None:
    lens = MemoryLens(tiny_bridge(family))
    plain = run(lens, corpus, layers=[0, 2])
    shared = run(lens, corpus, layers=[0, 2], projection=project_values(lens, top_k=2, chunk_memories=7))
    for field in PositionRecords._fields:
        assert torch.equal(getattr(plain.records, field), getattr(shared.records, field)), field
    with pytest.raises(ConfigError, match=r"lacks layers \[2\]"):
        run(lens, corpus, layers=[0, 2], projection=project_values(lens, top_k=1, layers=[0]))
    other = MemoryLens(tiny_bridge("gpt2" if family != "gpt2" else "llama"))
    with pytest.raises(AtlasMismatchError, match="project with this lens"):
        run(lens, corpus, projection=project_values(other, top_k=1))


def test_wrappers_layers_and_settings(tiny_bridge, corpus) -> None:
    lens = MemoryLens(tiny_bridge("gpt2"))
    result = run(lens, corpus, layers=[2, 0])
    assert result.composition["layer"].tolist() == [0, 2] and result.residual["layer"].tolist() == [0, 2]
    pd.testing.assert_frame_equal(composition(lens, corpus, positions=POSITIONS, seed=3, progress=False, layers=[0, 2]),
                                  result.composition)  # fmt: skip
    pd.testing.assert_frame_equal(residual_agreement(lens, corpus, positions=POSITIONS, seed=3, progress=False,
                                                     layers=[0, 2]), result.residual)  # fmt: skip
    settings = result.residual.attrs["settings"]
    assert result.composition.attrs["settings"] == settings == result.settings
    assert settings["corpus"]["fingerprint"] == corpus.fingerprint()
    assert settings["value_readout_mode"] == lens.value_readout_mode and settings["positions_drawn"] == POSITIONS
    assert settings["active_definition"] == "m_i > 0" and settings["layers"] == [0, 2]
    with pytest.raises(ConfigError, match="no sentence units"):
        run(lens, Corpus.from_texts(["   "]))


@pytest.mark.slow
def test_smollm2_smoke() -> None:
    from ffkv_lens import load_model

    lens = MemoryLens(load_model("smollm2-135m", device="cpu"))
    result = layer_dynamics(lens, Corpus.default().take(20), positions=16, layers=[0, 29], progress=False)
    assert len(result.composition) == 2 and result.composition["n_positions"].tolist() == [16, 16]
    assert (result.composition["active_fraction"] > 0).all()
    total = sum(result.residual[f"frac_{b}"] for b in BUCKETS)
    assert np.allclose(total, 1.0)
    # At the last layer o is the final residual: top(o) is the model's own prediction.
    assert (result.records.top_o[:, 1] == result.records.final_token).all()
