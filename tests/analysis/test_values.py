"""Value projection against a brute force (full ``value_logits`` + full stable sort).

Tolerances: token ids must be equal; logits and max probabilities within 1e-6 relative when
computed by the same matrix product (default chunk), 1e-5 across chunk sizes and between raw
and processed weights (the adapter's tested value_logits invariance is 1e-5).
"""

import pytest
import torch

from ffkv_lens import MemoryLens
from ffkv_lens.analysis.values import (
    ValueProjection,
    chunk_size,
    project_values,
    project_values_and_ranks,
    topk_by_logit,
    value_extremes,
    value_ranks,
)
from ffkv_lens.errors import ConfigError
from tests.conftest import boot
from tests.factories import FAMILY_NAMES
from tests.helpers import assert_close

K = 5


def brute_force(lens: MemoryLens, layer: int, k: int) -> dict[str, torch.Tensor]:
    """Every logit of the layer, fully sorted (stable: ties go to the lower token id)."""
    logits = lens.value_logits(layer).double()
    down = logits.sort(dim=-1, descending=True, stable=True)
    up = logits.sort(dim=-1, descending=False, stable=True)
    return {
        "top_ids": down.indices[:, :k],
        "top_logits": down.values[:, :k],
        "bottom_ids": up.indices[:, :k],
        "bottom_logits": up.values[:, :k],
        "max_prob": logits.softmax(dim=-1).max(dim=-1).values,
    }


def sorted_ranks(logits: torch.Tensor, token_ids: torch.Tensor, *, descending: bool = True) -> torch.Tensor:
    """Argsort-based rank: position of the first token of the target's tie group in the sorted row."""
    ranks = []
    for row, token in zip(logits, token_ids.tolist(), strict=True):
        ordered = row.sort(descending=descending, stable=True).values
        ranks.append(int((ordered == row[token]).nonzero()[0]))
    return torch.tensor(ranks)


def assert_projection_equals(proj: ValueProjection, expected: dict, layer: int, rel: float) -> None:
    for name in ("top_ids", "bottom_ids"):
        assert torch.equal(getattr(proj, name)[layer], expected[name]), f"{name} differ at layer {layer}"
    for name in ("top_logits", "bottom_logits", "max_prob"):
        assert_close(getattr(proj, name)[layer], expected[name], rel=rel, what=f"{name} layer {layer}")
    assert torch.equal(proj.top1[layer], expected["top_ids"][:, 0])
    assert torch.equal(proj.bottom1[layer], expected["bottom_ids"][:, 0])


@pytest.mark.parametrize("family", FAMILY_NAMES)
@torch.no_grad()
def test_projection_equals_brute_force(tiny_bridge, family: str) -> None:
    lens = MemoryLens(tiny_bridge(family))
    proj = project_values(lens, top_k=K)
    assert proj.settings["value_readout_mode"] == lens.value_readout_mode
    assert proj.layers == list(range(lens.n_layers))
    for layer in proj.layers:
        assert_projection_equals(proj, brute_force(lens, layer, K), layer, rel=1e-6)


@pytest.mark.parametrize("family", FAMILY_NAMES)
@torch.no_grad()
def test_chunk_size_does_not_change_the_result(tiny_bridge, family: str) -> None:
    lens = MemoryLens(tiny_bridge(family))
    reference = project_values(lens, top_k=K, layers=[0, 2], chunk_memories=lens.d_mlp)
    for chunk in (1, 7):
        proj = project_values(lens, top_k=K, layers=[0, 2], chunk_memories=chunk)
        for layer in (0, 2):
            expected = {name: getattr(reference, name)[layer] for name in ("top_ids", "bottom_ids")}
            expected |= {name: getattr(reference, name)[layer] for name in ("top_logits", "bottom_logits", "max_prob")}
            assert_projection_equals(proj, expected, layer, rel=1e-5)


def _rounded(lens: MemoryLens, monkeypatch: pytest.MonkeyPatch, grid: float) -> None:
    """Make value logits coarse so that ties are everywhere (long tie runs at the k-th place too)."""
    exact = lens.value_logits
    monkeypatch.setattr(lens, "value_logits", lambda layer, memories=None: torch.round(exact(layer, memories) / grid))


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
@torch.no_grad()
def test_ties_go_to_the_lower_token_id(tiny_bridge, family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    lens = MemoryLens(tiny_bridge(family))
    _rounded(lens, monkeypatch, grid=0.5)
    for chunk in (3, None):
        proj = project_values(lens, top_k=K, layers=[1], chunk_memories=chunk)
        assert_projection_equals(proj, brute_force(lens, 1, K), 1, rel=1e-6)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma2", "bert"])
@pytest.mark.parametrize("rounded", [False, True], ids=["exact", "ties"])
@torch.no_grad()
def test_rank_of_equals_sort_based_ranks(tiny_bridge, family: str, rounded: bool, monkeypatch) -> None:
    lens = MemoryLens(tiny_bridge(family))
    if rounded:
        _rounded(lens, monkeypatch, grid=0.5)
    proj = project_values(lens, top_k=2, layers=[1])
    gen = torch.Generator().manual_seed(1)
    memories = torch.randint(lens.d_mlp, (50,), generator=gen)
    tokens = torch.randint(lens.d_vocab, (50,), generator=gen)
    tokens[:5] = proj.top1[1][memories[:5]]  # the top token has rank 0
    logits = lens.value_logits(1, memories)
    assert torch.equal(proj.rank_of(1, memories, tokens), sorted_ranks(logits, tokens))
    assert (proj.rank_of(1, memories[:5], tokens[:5]) == 0).all()
    assert torch.equal(proj.rank_of(1, memories, tokens, sign=-1), sorted_ranks(logits, tokens, descending=False))
    for chunk in (1, 7):
        got = value_ranks(lens, 1, memories, tokens, chunk_memories=chunk)
        assert torch.equal(got, sorted_ranks(logits, tokens))


@pytest.mark.parametrize("sign", [1, -1])
@torch.no_grad()
def test_ranks_in_the_projection_pass(tiny_bridge, sign: int) -> None:
    lens = MemoryLens(tiny_bridge("qwen2"))
    targets = {layer: torch.randint(lens.d_vocab, (lens.d_mlp,)) for layer in (0, 2)}
    targets[2][::3] = -1  # no target: rank -1
    proj, ranks = project_values_and_ranks(lens, top_k=2, layers=[0, 2], chunk_memories=7, targets=targets, sign=sign)
    for layer, target in targets.items():
        keys = (target >= 0).nonzero().squeeze(1)
        expected = torch.full_like(target, -1)
        expected[keys] = value_ranks(lens, layer, keys, target[keys], sign=sign)
        assert torch.equal(ranks[layer], expected)
    assert torch.equal(proj.top_ids[2], project_values(lens, top_k=2, layers=[2]).top_ids[2])
    with pytest.raises(ConfigError, match=r"targets lacks layers \[2\]"):
        project_values_and_ranks(lens, layers=[0, 2], targets={0: targets[0]})


@pytest.mark.parametrize("processed_family", ["gpt2", "llama", "gemma3", "phi"])
@torch.no_grad()
def test_top_tokens_identical_with_processed_weights(tiny_folder, processed_family: str) -> None:
    bridge = boot(tiny_folder(processed_family))
    raw = project_values(MemoryLens(bridge), top_k=K)
    bridge.enable_compatibility_mode(disable_warnings=True)
    processed = project_values(MemoryLens(bridge), top_k=K)
    assert processed.settings["model"]["weights_processed"] and not raw.settings["model"]["weights_processed"]
    for layer in raw.layers:
        expected = {name: getattr(raw, name)[layer] for name in ("top_ids", "bottom_ids")}
        expected |= {name: getattr(raw, name)[layer] for name in ("top_logits", "bottom_logits", "max_prob")}
        assert_projection_equals(processed, expected, layer, rel=1e-5)


@torch.no_grad()
def test_save_load_and_table(tiny_bridge, tmp_path) -> None:
    lens = MemoryLens(tiny_bridge("llama"))
    proj = project_values(lens, top_k=3, layers=[0, 2])
    loaded = ValueProjection.load(proj.save(tmp_path / "proj"), lens=lens)
    assert loaded.settings == proj.settings and loaded.layers == [0, 2]
    for name in ("top_ids", "top_logits", "bottom_ids", "bottom_logits", "max_prob", "top1", "bottom1"):
        for layer in (0, 2):
            assert torch.equal(getattr(loaded, name)[layer], getattr(proj, name)[layer]), name
    assert torch.equal(loaded.rank_of(2, [0, 1], [3, 4]), proj.rank_of(2, [0, 1], [3, 4]))
    with pytest.raises(ConfigError, match="rank_of needs the model"):
        ValueProjection.load(tmp_path / "proj").rank_of(0, [0], [0])
    frame = loaded.to_pandas()
    assert len(frame) == 2 * lens.d_mlp and frame.attrs["settings"] == proj.settings
    row = frame.iloc[lens.d_mlp + 5]
    assert (row.layer, row.key) == (2, 5)
    assert row.top_ids == proj.top_ids[2][5].tolist()
    assert row.top_tokens == [lens.adapter.tokenizer.decode([t]) for t in row.top_ids]
    assert row.bottom_tokens[0] == lens.adapter.tokenizer.decode([int(proj.bottom1[2][5])])
    assert row.max_prob == pytest.approx(float(proj.max_prob[2][5]), rel=1e-6)


def test_bad_settings_are_named(tiny_bridge) -> None:
    lens = MemoryLens(tiny_bridge("gpt2"))
    with pytest.raises(ConfigError, match="top_k=0"):
        project_values(lens, top_k=0)
    with pytest.raises(ConfigError, match="chunk_memories=0"):
        project_values(lens, chunk_memories=0)
    with pytest.raises(ConfigError, match="layers=9"):
        project_values(lens, layers=9)
    proj = project_values(lens, top_k=1000, layers=[0])
    assert proj.top_k == lens.d_vocab  # capped at the vocabulary
    with pytest.raises(ConfigError, match="layer=1 was not projected"):
        proj.rank_of(1, [0], [0])
    with pytest.raises(ConfigError, match=r"pass ids in \[0, 320\)"):
        proj.rank_of(0, [0], [lens.d_vocab])


def test_chunk_size_from_budget() -> None:
    assert chunk_size(262_144) == 256  # Gemma's vocabulary: 1 MiB of float32 per memory
    assert chunk_size(320, chunk_memories=7) == 7
    assert chunk_size(2**40) == 1


def test_topk_by_logit_on_awkward_sizes() -> None:
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
    vals, ids = topk_by_logit(logits, 10)
    assert ids.tolist() == [[1, 2, 3, 0], [0, 1, 2, 3]] and vals.shape == (2, 4)
    vals, ids = topk_by_logit(logits, 1, largest=False)
    assert ids.tolist() == [[0], [0]]
    wide = torch.zeros(2, 100)
    wide[0, 50:] = 1.0  # a tie run of 50 at the k-th place: longer than the fetched candidates
    vals, ids = topk_by_logit(wide, 3)
    assert ids.tolist() == [[50, 51, 52], [0, 1, 2]]


@pytest.mark.slow
@torch.no_grad()
def test_gemma3_projection_smoke() -> None:
    from ffkv_lens import load_model

    lens = MemoryLens(load_model("gemma3-270m", device="cpu"))
    proj = project_values(lens, top_k=K, layers=[17])
    logits = lens.value_logits(17, range(8)).double()
    down = logits.sort(dim=-1, descending=True, stable=True)
    assert torch.equal(proj.top_ids[17][:8], down.indices[:, :K])
    assert_close(proj.max_prob[17][:8], logits.softmax(-1).max(-1).values, rel=1e-5, what="max_prob")
    assert torch.equal(proj.rank_of(17, range(8), down.indices[:, 3]), torch.full((8,), 3))


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3", "bert"])
def test_value_extremes_are_argmax_and_argmin(tiny_bridge, family: str) -> None:
    lens = MemoryLens(tiny_bridge(family))
    with torch.no_grad():
        logits = lens.value_logits(1)
        top, bottom = value_extremes(lens, 1)
    assert torch.equal(top, logits.argmax(-1)) and torch.equal(bottom, logits.argmin(-1))
