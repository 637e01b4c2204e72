"""Per-memory statistics of the trigger search against a brute force that materialises every activation.

Tiny random models of several families (float64, so that padding cannot move a value across a bin
edge), signed and unsigned, three batch sizes. Tolerances: counts, histograms, groups and the sampled
(unit, position) pairs are exact; sums of m and m**2, minima, maxima and sampled coefficients within
1e-12 relative (a padded batch computes m to float64 rounding, and sums run in another order).
"""

import pytest
import torch

from ffkv_lens import MemoryLens
from ffkv_lens.analysis.atlas import TriggerAtlas
from ffkv_lens.analysis.triggers import search_triggers
from ffkv_lens.corpus import Corpus
from ffkv_lens.errors import ConfigError
from tests.analysis.stats.brute import calibration_ranges, coefficients, corpus_units, expected_stats
from tests.analysis.test_triggers import TEXTS
from tests.conftest import boot

CASES = {"gpt2-unsigned": ("gpt2", False), "llama-signed": ("llama", True), "gemma3-unsigned": ("gemma3", False),
         "bert-signed": ("bert", True)}  # fmt: skip
STATS = dict(histogram_bins=8, quantile_groups=3, quantile_samples=2, density_threshold=0.05)


def assert_stats_equal(atlas, lens, corpus, kw, stats, keys_to_frame=(0, 7)) -> None:
    units = corpus_units(lens, corpus, unit=kw["unit"], max_len=kw["max_len"], max_tokens=kw.get("max_tokens"))
    layers = kw["layers"]
    ranges = calibration_ranges(lens, units, layers=layers, calibration_units=64)
    seen = coefficients(lens, units, layers=layers)
    for layer in layers:
        lo, hi = ranges[layer]
        assert atlas.stats_settings["ranges"][str(layer)] == [lo, hi], f"layer {layer} range"
        m, unit_ids, positions = seen[layer]
        want = expected_stats(m, unit_ids, positions, layer=layer, lo=lo, hi=hi, bins=stats["histogram_bins"],
                              groups=stats["quantile_groups"], samples=stats["quantile_samples"],
                              threshold=stats["density_threshold"])  # fmt: skip
        got = atlas.memory_stats[layer]
        assert int(got.count[0]) == want["count"]
        for name in ("active", "hist", "outside", "group_count"):
            assert torch.equal(getattr(got, name), want[name]), f"{name} differs at layer {layer}"
        for name in ("sums", "squares", "minimum", "maximum"):
            err = (getattr(got, name) - want[name]).abs().max() / want[name].abs().max().clamp_min(1e-300)
            assert err <= 1e-12, f"{name} differs at layer {layer}: {err:.1e}"
        frame = atlas.stats(layer)
        assert torch.allclose(torch.tensor(frame["mean"].values), want["sums"] / want["count"], rtol=1e-12, atol=0)
        shift = 1  # these models put a BOS first: stored positions count the unit's own tokens
        for key in range(m.shape[1]):
            for group in range(stats["quantile_groups"]):
                kept = got.sample_units[key, group] >= 0
                pairs = zip(got.sample_units[key, group][kept].tolist(),
                            (got.sample_positions[key, group][kept] + shift).tolist(), strict=True)  # fmt: skip
                expected = want["samples"][(key, group)]
                assert list(pairs) == [(u, p) for u, p, _ in expected], f"samples of layer {layer} key {key} {group}"
                values = got.sample_values[key, group][kept].double()
                assert torch.allclose(values, torch.tensor([v for *_, v in expected], dtype=torch.float64),
                                      rtol=1e-12, atol=0)  # fmt: skip
        for key in keys_to_frame:
            q = atlas.quantile_examples(layer, key)
            assert len(q) == int((got.sample_units[key] >= 0).sum())
            assert q.groupby("group").group_share.first().sum() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("case", list(CASES))
def test_stats_equal_brute_force_at_every_batch_size(tiny_folder, case) -> None:
    family, signed = CASES[case]
    bridge = boot(tiny_folder(family))
    bridge.to(torch.float64)
    lens = MemoryLens(bridge)
    corpus = Corpus.from_texts(TEXTS)
    kw = dict(unit="sentence", k=3, signed=signed, max_len=12, layers=[0, 2])
    for batch_tokens in (16, 64, 1000):
        atlas = search_triggers(lens.adapter, corpus, batch_tokens=batch_tokens, progress=False, **kw, **STATS)
        assert_stats_equal(atlas, lens, corpus, kw, STATS)


def test_stats_survive_save_and_load(tiny_bridge, tmp_path) -> None:
    lens = MemoryLens(tiny_bridge("llama"))
    atlas = search_triggers(lens.adapter, Corpus.from_texts(TEXTS), k=2, max_len=12, progress=False, **STATS)
    loaded = TriggerAtlas.load(atlas.save(tmp_path / "atlas"))
    assert loaded.has_stats and not loaded.has_quadrants
    for layer in atlas.layers:
        for name, tensor in atlas.memory_stats[layer].tensors(layer).items():
            torch.testing.assert_close(loaded.memory_stats[layer].tensors(layer)[name], tensor, rtol=0, atol=0,
                                       equal_nan=True, msg=name)  # fmt: skip
        assert loaded.stats(layer).equals(atlas.stats(layer))
        assert torch.equal(loaded.histograms(layer), atlas.histograms(layer))
    q = loaded.quantile_examples(atlas.layers[0], 3)
    assert list(q.columns) == ["group", "group_lo", "group_hi", "group_share", "unit_id", "doc_id", "position",
                               "coefficient", "text", "token"]  # fmt: skip
    assert abs(q.drop_duplicates("group").group_share.sum() - 1) <= 1e-12
    h = loaded.histogram(atlas.layers[0], 3)
    assert list(h.columns) == ["bin_lo", "bin_hi", "count"] and len(h) == STATS["histogram_bins"]


def test_stats_off_and_quadrants_refused(tiny_bridge) -> None:
    lens = MemoryLens(tiny_bridge("gpt2"))
    atlas = search_triggers(lens.adapter, Corpus.from_texts(TEXTS), k=2, max_len=12, progress=False, stats=False)
    assert not atlas.has_stats and atlas.stats_settings["stats"] is False
    with pytest.raises(ConfigError, match="stats=True"):
        atlas.stats(0)
    with pytest.raises(ConfigError, match="quadrants=True"):
        atlas.quadrants(0, 0)


@pytest.mark.slow
def test_smollm2_stats_equal_brute_force() -> None:
    from ffkv_lens import load_model

    lens = MemoryLens(load_model("smollm2-135m", device="cpu", dtype=torch.float64))
    corpus = Corpus.default().take(3)
    kw = dict(unit="sentence", k=3, signed=True, max_len=48, layers=[0, 2], max_tokens=2000)
    for batch_tokens in (200, 2048):
        atlas = search_triggers(lens.adapter, corpus, batch_tokens=batch_tokens, progress=False, **kw)
        assert_stats_equal(atlas, lens, corpus, kw, atlas.stats_settings, keys_to_frame=(0, 1535))
