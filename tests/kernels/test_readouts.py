"""State readouts: the tiled twin and the dispatcher against the reference (``lens.readout`` of each state).

Tolerances: tokens must be equal; probabilities within 1e-6 absolute (the log-sum-exp runs over
tiles in another order; measured differences are ~3e-9); ``logsumexp_rows`` within 1e-6 relative
of ``torch.logsumexp``. Ties are tested on integer-valued weights, where every logit is exact.
"""

import pytest
import torch

from ffkv_lens import MemoryLens
from ffkv_lens.adapters import MemoryAdapter
from ffkv_lens.adapters.tl_model import ReadoutParts
from ffkv_lens.analysis.sampling import SampleConfig, prefix_batches, record_states, sample_prefixes
from ffkv_lens.corpus import Corpus
from ffkv_lens.errors import ConfigError
from ffkv_lens.kernels import KERNELS_ENV, StateTops, readouts, readouts_tiled, state_top, state_tops
from ffkv_lens.kernels.readouts import readout_top
from ffkv_lens.kernels.readouts import state_tops as state_tops_reference
from ffkv_lens.kernels.readouts_tiled import state_tops as state_tops_tiled
from ffkv_lens.kernels.softmax import logsumexp_rows
from tests.conftest import has_hooked_transformer
from tests.factories import FAMILY_NAMES

TILED = [f for f in FAMILY_NAMES if f != "bert"]
# (rows per block, vocabulary tile): one column, awkward sizes, the whole vocabulary (320), more.
SIZES = {"1x1": (1, 1), "5x7": (5, 7), "3x319": (3, 319), "64x320": (64, 320), "default": (1024, 4096)}
TEXTS = ["The capital of France is Paris. The capital of Italy is Rome.", "The dog is lazy. A fox jumps over it."]


def assert_tops_equal(got: StateTops, want: StateTops, what: str) -> None:
    for name in ("top_r", "top_y", "top_o"):
        assert torch.equal(getattr(got, name), getattr(want, name)), f"{what} {name}: {getattr(got, name)}"
    err = float((got.prob_r - want.prob_r).abs().max()) if want.prob_r.numel() else 0.0
    assert err <= 1e-6, f"{what} prob_r: max abs diff {err:.2e} > 1e-6"


def random_states(lens: MemoryLens, n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(n, lens.d_model, generator=gen) * 3
    y = torch.randn(n, lens.d_model, generator=gen)
    targets = torch.randint(lens.d_vocab, (n,), generator=gen)
    targets[:2] = torch.tensor([0, lens.d_vocab - 1])
    return r, y, r + y, targets


@pytest.mark.parametrize("size", list(SIZES), ids=list(SIZES))
@pytest.mark.parametrize("family", TILED, ids=TILED)
def test_tiled_equals_reference(tiny_bridge, family: str, size: str) -> None:
    lens = MemoryLens(tiny_bridge(family))
    r, y, o, targets = random_states(lens, 40)
    rows, tile = SIZES[size]
    with torch.no_grad():
        want = state_tops_reference(lens, r, y, o, targets)
        got = state_tops_tiled(lens, r, y, o, targets, rows=rows, tile=tile)
    assert_tops_equal(got, want, f"{family} {size}")


@pytest.mark.parametrize("forced", ["numba", "reference"])
@pytest.mark.parametrize("family", FAMILY_NAMES, ids=FAMILY_NAMES)
def test_state_top_equals_readout_argmax(tiny_bridge, family: str, forced: str, monkeypatch) -> None:
    """The dispatcher, forced to each implementation, against the reference's argmax."""
    monkeypatch.setenv(KERNELS_ENV, forced)
    lens = MemoryLens(tiny_bridge(family))
    r, *_ = random_states(lens, 30)
    with torch.no_grad():
        want, _ = readout_top(lens, r)
        for tile in (1, 7, 320, 4096):
            assert torch.equal(state_top(lens, r, tile=tile), want), f"{family} tile {tile}"


@pytest.mark.parametrize("family", TILED, ids=TILED)
def test_recorded_states_derive_o_and_match(tiny_bridge, family: str) -> None:
    """On states of a real forward pass, o is derived from r and y (not read again) and agrees."""
    lens = MemoryLens(tiny_bridge(family))
    prefixes = sample_prefixes(Corpus.from_texts(TEXTS), lens.adapter.tokenizer, SampleConfig(positions=8)).prefixes
    layers = list(range(lens.n_layers))
    batch = next(prefix_batches(prefixes, batch_tokens=4096, bos_token_id=lens.adapter.bos_token_id, pad_token_id=0))
    states = record_states(lens, batch, layers)
    r, y, o = (x.flatten(0, 1) for x in (states.resid_before, states.ffn_output, states.resid_after))
    targets = states.final_token[:, None].expand(-1, len(layers)).reshape(-1)
    parts = lens.adapter.readout_parts()
    beta = parts.norm(torch.zeros(1, lens.d_model))[0]
    with torch.no_grad():
        *_, direct = readouts_tiled._o_weights(parts, lens.adapter.final_norm_gain(), lens.adapter.final_norm_centres,
                                      beta, r, y, o)  # fmt: skip
        assert direct.numel() <= r.shape[0] // 4, f"{family}: o read directly at {direct.numel()} of {r.shape[0]} rows"
        want = state_tops_reference(lens, r, y, o, targets)
        assert_tops_equal(state_tops_tiled(lens, r, y, o, targets, tile=50), want, family)


@pytest.mark.skipif(not has_hooked_transformer(), reason="needs TransformerLens 3.x (HookedTransformer)")
@pytest.mark.parametrize("processed", [False, True], ids=["raw", "processed"])
@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma2", "phi"])
def test_tiled_equals_reference_on_hooked_transformers(tiny_hooked, family: str, processed: bool) -> None:
    """Processed weights fold the final norm's gain into W_U (LNPre / RMSPre); the pass must still agree."""
    lens = MemoryLens(tiny_hooked(family, processed))
    r, y, o, targets = random_states(lens, 40)
    parts = lens.adapter.readout_parts()
    with torch.no_grad():
        beta = parts.norm(torch.zeros(1, lens.d_model))[0]
        gain, centres = lens.adapter.final_norm_gain(), lens.adapter.final_norm_centres
        *_, direct = readouts_tiled._o_weights(parts, gain, centres, beta, r, y, o)
        assert direct.numel() <= 10, f"o read directly at {direct.numel()} of 40 rows"
        want = state_tops_reference(lens, r, y, o, targets)
        assert_tops_equal(state_tops_tiled(lens, r, y, o, targets, rows=9, tile=50), want, f"{family} {processed}")
        assert torch.equal(state_top(lens, o, tile=50), want.top_o)


def test_rows_that_fail_the_checks_read_o_directly(tiny_bridge) -> None:
    lens = MemoryLens(tiny_bridge("gpt2"))
    r, y, o, targets = random_states(lens, 12)
    o[::2] = r[::2] + 2 * y[::2]  # not r + y: these rows must be read directly
    with torch.no_grad():
        parts = lens.adapter.readout_parts()
        beta = parts.norm(torch.zeros(1, lens.d_model))[0]
        *_, direct = readouts_tiled._o_weights(parts, lens.adapter.final_norm_gain(), True, beta, r, y, o)
        assert direct.tolist() == list(range(0, 12, 2))
        assert_tops_equal(state_tops_tiled(lens, r, y, o, targets, rows=5, tile=9),
                          state_tops_reference(lens, r, y, o, targets), "mixed rows")  # fmt: skip


@MemoryAdapter.register
class IntegerAdapter:
    """A readout with identity norm and integer weights: every logit is exact, so ties are exact."""

    final_norm_centres = False

    def __init__(self, w_u: torch.Tensor) -> None:
        self.w_u = w_u
        self.d_model, self.d_vocab = w_u.shape

    def readout_parts(self) -> ReadoutParts:
        return ReadoutParts(lambda x: x, self.w_u, None, None)

    def final_norm_gain(self) -> None:
        return None

    def readout(self, resid: torch.Tensor) -> torch.Tensor:
        return resid @ self.w_u


class IntegerLens:
    def __init__(self, w_u: torch.Tensor) -> None:
        self.adapter = IntegerAdapter(w_u)
        self.d_model, self.d_vocab = w_u.shape

    def readout(self, resid: torch.Tensor) -> torch.Tensor:
        return self.adapter.readout(resid)


@pytest.mark.parametrize("tile", [1, 3, 4, 16], ids=lambda t: f"tile{t}")
def test_ties_go_to_the_lowest_token_id_across_tiles(tile: int) -> None:
    gen = torch.Generator().manual_seed(0)
    w_u = torch.randint(-3, 4, (6, 16), generator=gen).float()
    w_u[:, 9] = w_u[:, 2]  # token 9 ties with token 2 in every row, in another tile
    w_u[:, 13] = w_u[:, 2]
    lens = IntegerLens(w_u)
    x = torch.randint(-2, 3, (30, 6), generator=gen).float()
    x[:5] = 0.0  # all logits tie: the answer is token 0
    r, y = x, torch.roll(x, 1, 0)
    targets = torch.arange(30) % 16
    want = state_tops_reference(lens, r, y, r + y, targets)
    assert want.top_r[:5].tolist() == [0] * 5 and 9 not in want.top_r.tolist() and 13 not in want.top_r.tolist()
    assert_tops_equal(state_tops_tiled(lens, r, y, r + y, targets, rows=7, tile=tile), want, f"tile {tile}")
    assert torch.equal(state_top(lens, r, tile=tile), want.top_r)


def test_dispatch_and_reference_switch(tiny_bridge, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    empty = StateTops(*(torch.zeros(3, dtype=dtype) for dtype in (torch.long, torch.float32, torch.long, torch.long)))

    def record(name: str):
        return lambda *args, **kwargs: calls.append(name) or empty

    monkeypatch.setattr(readouts_tiled, "state_tops", record("tiled"))
    monkeypatch.setattr(readouts, "state_tops", record("reference"))
    cases = (("llama", None), ("llama", "reference"), ("llama", "numba"), ("bert", None), ("bert", "numba"))
    for family, env in cases:
        if env is None:
            monkeypatch.delenv(KERNELS_ENV, raising=False)
        else:
            monkeypatch.setenv(KERNELS_ENV, env)
        lens = MemoryLens(tiny_bridge(family))
        state_tops(lens, *random_states(lens, 3))
    assert calls == ["tiled", "reference", "tiled", "reference", "reference"]


def test_tiled_refuses_a_readout_without_parts(tiny_bridge) -> None:
    lens = MemoryLens(tiny_bridge("bert"))
    with pytest.raises(ConfigError, match="readout_parts"):
        state_tops_tiled(lens, *random_states(lens, 3))


def test_logsumexp_rows_matches_torch_with_tiny_terms() -> None:
    x = torch.tensor([[0.0, -200.0, -90.0, 1.5], [3.0, 3.0, -1e4, 2.0], [-5.0, -5.0, -5.0, -5.0]])
    maxima = x.amax(-1)
    got = maxima + logsumexp_rows(x, maxima).log()
    want = x.logsumexp(-1)
    assert float(((got - want).abs() / want.abs().clamp_min(1)).max()) <= 1e-6, (got, want)
