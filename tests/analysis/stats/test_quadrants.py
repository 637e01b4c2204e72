"""Gate/up quadrants of the search against a brute force from ``hook_pre`` and the up projection.

Tiny gated models in float64, each unit run alone with the gate pre-activation, the up projection
and the coefficients recorded. Counts are exact (and sum to the active counts: shares sum to 1 within
1e-12); the top examples per quadrant have the same units and positions, coefficients within 1e-12
relative. Two batch sizes; a non-gated model is refused.
"""

import pytest
import torch

from ffkv_lens import MemoryLens
from ffkv_lens.analysis.atlas import TriggerAtlas
from ffkv_lens.analysis.stats.quadrants import QUADRANT_SIGNS
from ffkv_lens.analysis.stats.settings import STATS_DEFAULTS
from ffkv_lens.analysis.triggers import search_triggers
from ffkv_lens.corpus import Corpus
from ffkv_lens.errors import ConfigError
from tests.analysis.stats.brute import corpus_units
from tests.analysis.test_triggers import TEXTS
from tests.conftest import boot

THRESHOLD, K = 0.02, STATS_DEFAULTS.quadrant_examples


def brute_quadrants(lens, units, layer):
    """``(counts [d_mlp, 4], {(key, q): [(unit, position, m)]})`` with one example per unit, best first."""
    adapter, bos = lens.adapter, lens.adapter.bos_token_id
    names = adapter.hook_names(layer)
    counts = torch.zeros(adapter.d_mlp, 4, dtype=torch.int64)
    peaks = {}  # (key, q) -> list of (value, unit, position, m)
    for u in units:
        tokens = torch.tensor([[bos, *u.token_ids]])
        with torch.no_grad():
            acts = adapter.record(tokens, [names.gate_pre, names.up_pre, names.coefficients])
        gate, up, m = (acts[n][0, 1:].double() for n in (names.gate_pre, names.up_pre, names.coefficients))
        active = m.abs() > THRESHOLD
        for q, (gs, us) in enumerate(QUADRANT_SIGNS):
            inside = active & ((gate > 0) == (gs > 0)) & ((up > 0) == (us > 0))
            counts[:, q] += inside.sum(0)
            ranked = torch.where(inside, m * gs * us, float("-inf"))
            best, pos = ranked.max(0)  # the first position on ties
            for key in inside.any(0).nonzero().squeeze(1).tolist():
                peaks.setdefault((key, q), []).append(
                    (float(best[key]), u.unit_id, int(pos[key]), float(m[pos[key], key]))
                )
    tops = {cell: sorted(rows, key=lambda r: (-r[0], r[1]))[:K] for cell, rows in peaks.items()}
    return counts, tops


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_quadrants_equal_brute_force(tiny_folder, family, tmp_path) -> None:
    bridge = boot(tiny_folder(family))
    bridge.to(torch.float64)
    lens = MemoryLens(bridge)
    corpus = Corpus.from_texts(TEXTS)
    kw = dict(unit="sentence", k=2, max_len=12, layers=[1], density_threshold=THRESHOLD, quadrants=True)
    units = corpus_units(lens, corpus, unit="sentence", max_len=12)
    counts, tops = brute_quadrants(lens, units, 1)
    for batch_tokens in (16, 1000):
        atlas = search_triggers(lens.adapter, corpus, batch_tokens=batch_tokens, progress=False, **kw)
        atlas = TriggerAtlas.load(atlas.save(tmp_path / f"atlas{batch_tokens}"))
        assert atlas.has_quadrants
        table = atlas.memory_stats[1]
        assert torch.equal(table.quadrant_counts, counts) and torch.equal(counts.sum(1), table.active)
        for key in range(0, lens.d_mlp, 5):  # the DataFrames of every fifth memory (pandas is slow here)
            frame = atlas.quadrants(1, key)
            assert list(frame.quadrant) == ["gate+ up+", "gate+ up-", "gate- up+", "gate- up-"]
            if int(counts[key].sum()):
                assert abs(frame.share.sum() - 1) <= 1e-12
            examples = atlas.quadrant_examples(1, key)
            for q, name in enumerate(frame.quadrant):
                got = examples[examples.quadrant == name]
                want = tops.get((key, q), [])
                assert [(u, p) for u, p in zip(got.unit_id, got.position, strict=True)] == [
                    (u, p) for _, u, p, _ in want
                ]
                got_m = torch.tensor(list(got.coefficient), dtype=torch.float64)
                want_m = torch.tensor([r[3] for r in want], dtype=torch.float64)
                assert torch.allclose(got_m, want_m, rtol=1e-12, atol=0)
    assert int(counts.sum()) > 0 and bool((counts > 0).sum(0).all()), "every quadrant should occur"


def test_quadrants_need_a_gated_model(tiny_bridge) -> None:
    lens = MemoryLens(tiny_bridge("gpt2"))
    with pytest.raises(ConfigError, match="not gated"):
        search_triggers(lens.adapter, Corpus.from_texts(TEXTS), k=2, progress=False, quadrants=True)
