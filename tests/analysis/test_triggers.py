"""Trigger search against a brute-force twin that materialises every activation.

The brute force runs each unit alone (batch of one, no padding), takes every key's maximum
over the unit's valid positions (first position on ties) and sorts all units fully by
(-coefficient, unit id). Tolerances: units and positions must be equal; coefficients within
1e-5 relative. Ties are forced by a user hook that rounds ``hook_post`` to a coarse grid
(run in float64 so that padding cannot move a value across a rounding boundary).
"""

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from ffkv_lens import MemoryLens
from ffkv_lens.analysis.triggers import search_triggers
from ffkv_lens.corpus import Corpus, iter_units
from ffkv_lens.errors import AtlasMismatchError, CheckpointMismatchError
from tests.conftest import boot

TEXTS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Memories in feed-forward layers store patterns. They promote tokens!",
    "hello world. hello world. The quick brown fox jumps over the lazy dog.",
    "0123456789 is a number. Is it? Yes, it is.",
    "",
    "Paris is in France. Rome is in Italy. The fox is quick.",
]
FAMILIES = ["gpt2", "llama", "gemma3", "gpt_neox", "bert"]


def brute_force(lens, corpus, *, unit, k, signed, exclude_bos, max_len, layers, max_tokens=None):
    """Every unit alone, every activation kept, full sort."""
    adapter = lens.adapter
    bos = adapter.bos_token_id
    rows = {layer: [] for layer in layers}  # per layer: list of (unit_id, values[d_mlp], positions[d_mlp])
    for u in iter_units(corpus, adapter.tokenizer, unit=unit, max_len=max_len, max_tokens=max_tokens):
        ids = ([bos] if bos is not None else []) + list(u.token_ids)
        coeffs = lens.coefficients(torch.tensor([ids]), layers=layers)
        for layer in layers:
            m = coeffs[layer][0].double()
            if bos is not None and exclude_bos:
                m = m[1:]
            shift = 0 if (bos is None or exclude_bos) else -1
            for sign in (1, -1) if signed else (1,):
                vals, pos = (sign * m).max(dim=0)  # first maximal position (documented for max/argmax)
                rows[layer].append((sign, u.unit_id, vals, pos + shift))
    out = {}
    for layer in layers:
        for sign in (1, -1) if signed else (1,):
            entries = [(uid, v, p) for s, uid, v, p in rows[layer] if s == sign]
            vals = torch.stack([v for _, v, _ in entries], 1)  # [d_mlp, n_units]
            pos = torch.stack([p for _, _, p in entries], 1)
            uids = torch.tensor([uid for uid, _, _ in entries])
            order_u = torch.argsort(uids, stable=True)
            vals, pos, uids2 = vals[:, order_u], pos[:, order_u], uids[order_u].expand(vals.shape[0], -1)
            order = torch.argsort(-vals, dim=1, stable=True)[:, :k]
            out[(layer, sign)] = (
                sign * vals.gather(1, order),
                uids2.gather(1, order),
                pos.gather(1, order),
            )
    return out


def assert_atlas_equals(atlas, expected, layers, signed) -> None:
    for layer in layers:
        for sign in (1, -1) if signed else (1,):
            table = (atlas.top if sign == 1 else atlas.bottom)[layer]
            vals, units, pos = expected[(layer, sign)]
            n = units.shape[1]
            assert torch.equal(table.units[:, :n], units), f"units differ at layer {layer} sign {sign}"
            assert torch.equal(table.positions[:, :n].long(), pos.long()), f"positions differ at layer {layer}"
            rel = (table.values[:, :n].double() - vals).norm() / vals.norm().clamp_min(1e-30)
            assert rel <= 1e-5, f"coefficients differ: {rel:.2e}"
            assert (table.units[:, n:] == -1).all(), "slots beyond the number of units must be empty"


def _rounding_hook(lens, grid):
    names = [lens.hook_names(layer).coefficients for layer in range(lens.n_layers)]
    hooks = [hp for name, hp in lens.adapter.model.hook_dict.items() if name in names]
    for hp in hooks:
        hp.add_hook(lambda t, hook: torch.round(t / grid) * grid)
    return hooks


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("unit", ["sentence", "document", "window"])
@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_search_equals_brute_force(tiny_folder, family, unit, signed) -> None:
    bridge = boot(tiny_folder(family))
    bridge.to(torch.float64)
    lens = MemoryLens(bridge)
    corpus = Corpus.from_texts(TEXTS)
    hooks = _rounding_hook(lens, grid=0.05)  # forces many exact ties
    try:
        with torch.no_grad():
            kw = dict(unit=unit, k=4, signed=signed, exclude_bos=True, max_len=12, layers=[0, 2])
            expected = brute_force(lens, corpus, **kw)
            for batch_tokens in (16, 64, 1000):
                atlas = search_triggers(lens.adapter, corpus, batch_tokens=batch_tokens, progress=False, **kw)
                assert_atlas_equals(atlas, expected, [0, 2], signed)
    finally:
        for hp in hooks:
            hp.remove_hooks()


def test_bos_can_be_included(tiny_bridge) -> None:
    lens = MemoryLens(tiny_bridge("llama"))
    corpus = Corpus.from_texts(TEXTS)
    kw = dict(unit="sentence", k=3, signed=False, exclude_bos=False, max_len=12, layers=[1])
    with torch.no_grad():
        expected = brute_force(lens, corpus, **kw)
        atlas = search_triggers(lens.adapter, corpus, progress=False, **kw)
    assert_atlas_equals(atlas, expected, [1], False)


def test_prefix_and_next_token_alignment(tiny_bridge) -> None:
    """On a toy sentence: the prefix ends at the peak token; next_token is the one after it."""
    for family in ("llama", "qwen2"):  # with BOS (llama) and without (qwen2)
        lens = MemoryLens(tiny_bridge(family))
        tok = lens.adapter.tokenizer
        text = "hello world the fox"
        ids = tok(text, add_special_tokens=False)["input_ids"]
        atlas = search_triggers(lens.adapter, Corpus.from_texts([text]), k=1, unit="document", progress=False)
        for key in range(8):
            (ex,) = atlas.examples(0, key)
            assert ex.prefix == tok.decode(ids[: ex.position + 1])
            if ex.position + 1 < len(ids):
                assert ex.next_token_id == ids[ex.position + 1]
                assert ex.next_token == tok.decode([ids[ex.position + 1]])
            else:
                assert ex.next_token is None and ex.next_token_id is None
            # the peak is where the coefficient is largest among the unit's own tokens
            bos = [lens.adapter.bos_token_id] if lens.adapter.bos_token_id is not None else []
            m = lens.coefficients(torch.tensor([bos + ids]), layers=0)[0][0, len(bos) :, key]
            assert int(m.argmax()) == ex.position
            assert abs(float(m.max()) - ex.coefficient) <= 1e-5 * max(1.0, abs(ex.coefficient))


def test_save_load_roundtrip_and_mismatch(tiny_bridge, tmp_path) -> None:
    lens = MemoryLens(tiny_bridge("gpt2"))
    atlas = search_triggers(lens.adapter, Corpus.from_texts(TEXTS), k=5, signed=True, progress=False)
    atlas.save(tmp_path / "atlas")
    loaded = type(atlas).load(tmp_path / "atlas")
    for layer in atlas.layers:
        for key in (0, 17, 63):
            assert loaded.examples(layer, key) == atlas.examples(layer, key)
            assert loaded.examples(layer, key, sign=-1) == atlas.examples(layer, key, sign=-1)
    assert loaded.to_pandas().equals(atlas.to_pandas())
    loaded.check_matches(lens)
    loaded.check_matches(MemoryLens(tiny_bridge("llama")))  # same layout and tokenizer: compatible
    loaded.manifest["model_layout"]["d_mlp"] = 128
    loaded.manifest["tokenizer_fingerprint"] = "0" * 16
    with pytest.raises(AtlasMismatchError, match="d_mlp: atlas 128 vs model 64; tokenizer"):
        loaded.check_matches(lens)


def test_checkpoint_resume_refuses_other_settings(tiny_bridge, tmp_path) -> None:
    lens = MemoryLens(tiny_bridge("gpt2"))
    corpus = Corpus.from_texts(TEXTS)
    search_triggers(lens.adapter, corpus, k=5, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(CheckpointMismatchError, match="settings"):
        search_triggers(lens.adapter, corpus, k=6, checkpoint_dir=tmp_path, progress=False)
    # A checkpoint counts batches: another cut of the stream into batches would resume at the wrong unit.
    with pytest.raises(CheckpointMismatchError, match="batching.*'batch_tokens': 2048.*'batch_tokens': 64"):
        search_triggers(lens.adapter, corpus, k=5, batch_tokens=64, checkpoint_dir=tmp_path, progress=False)


RESUME_SCRIPT = textwrap.dedent(
    """
    import os, sys, torch
    sys.path.insert(0, {root!r})
    from tests.conftest import boot
    from ffkv_lens import MemoryLens
    from ffkv_lens.analysis import triggers
    from ffkv_lens.corpus import Corpus
    lens = MemoryLens(boot({folder!r}))
    corpus = Corpus.from_texts({texts!r} * 6)
    if os.environ.get("KILL_AFTER"):
        original = triggers.TriggerSearch.save_checkpoint
        count = [0]
        def save_then_maybe_die(self, folder):
            original(self, folder)
            count[0] += 1
            if count[0] == int(os.environ["KILL_AFTER"]):
                os.kill(os.getpid(), 9)
        triggers.TriggerSearch.save_checkpoint = save_then_maybe_die
    atlas = triggers.search_triggers(lens.adapter, corpus, k=4, signed=True, batch_tokens=24,
                                     checkpoint_dir={ckpt!r}, checkpoint_every=30, progress=False, quadrants=True)
    atlas.save({out!r})
    """
)


@pytest.mark.slow
def test_sigkill_and_resume_gives_identical_atlas(tiny_folder, tmp_path) -> None:
    from ffkv_lens.analysis.atlas import TriggerAtlas

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    folder = str(tiny_folder("llama"))

    def run(ckpt, out, kill_after=None):
        env = dict(os.environ, KILL_AFTER=str(kill_after or ""))
        script = RESUME_SCRIPT.format(root=root, folder=folder, texts=TEXTS, ckpt=str(ckpt), out=str(out))
        return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)

    first = run(tmp_path / "ck", tmp_path / "a", kill_after=3)
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    assert not (tmp_path / "a").exists()
    resumed = run(tmp_path / "ck", tmp_path / "a")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    fresh = run(tmp_path / "ck2", tmp_path / "b")
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    a, b = TriggerAtlas.load(tmp_path / "a"), TriggerAtlas.load(tmp_path / "b")
    for name, tensor in b.tensors().items():
        assert torch.equal(a.tensors()[name], tensor), name
    # The per-memory statistics too, bit for bit: a resumed search adds the same batches in the same order.
    assert a.has_stats and a.has_quadrants and a.stats_settings == b.stats_settings
    for layer in b.layers:
        for name, tensor in b.memory_stats[layer].tensors(layer).items():
            torch.testing.assert_close(a.memory_stats[layer].tensors(layer)[name], tensor, rtol=0, atol=0,
                                       equal_nan=True, msg=name)  # fmt: skip
    assert a.manifest["progress"] == b.manifest["progress"]


def test_next_token_counts_are_the_corpus_unigram(tiny_bridge) -> None:
    lens = MemoryLens(tiny_bridge("gpt2"))
    corpus = Corpus.from_texts(TEXTS)
    atlas = search_triggers(lens.adapter, corpus, k=2, unit="sentence", max_len=12, progress=False)
    expected = torch.zeros(lens.d_vocab, dtype=torch.int64)
    for u in iter_units(corpus, lens.adapter.tokenizer, unit="sentence", max_len=12):
        for token in u.token_ids[1:]:
            expected[token] += 1
    assert torch.equal(atlas.next_token_counts, expected)
    assert int(expected.sum()) > 0


def test_device_other_than_the_models_is_refused(tiny_bridge) -> None:
    from ffkv_lens.errors import ConfigError

    lens = MemoryLens(tiny_bridge("gpt2"))
    with pytest.raises(ConfigError, match="device='meta' but the model is on cpu"):
        lens.search_triggers(Corpus.from_texts(TEXTS), device="meta", progress=False)
