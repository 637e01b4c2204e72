"""``lens.contributions``: per-memory direct logit attribution, on both backends.

The check: a layer's contributions sum to the direct logit attribution (DLA) of its FFN output
without bias, computed independently from the recorded ``hook_mlp_out`` through the model's own
readout: for any vector y, ``(readout(y) - readout(0)) * norm_scale(y)`` is
``(gamma * center(y)) @ W_U`` (``norm_scale`` = the final norm's scale of y itself); dividing by the
final norm's scale at the position and centring over the vocabulary gives the DLA. Soft-capped
logits (Gemma 2) are un-capped first. Tolerance: ``|sum - DLA| <= 1e-4 * (|DLA| + sum |c_i|)``
in fp32 (errors seen are below 1e-6 of that scale); across backends and weight processing the
contributions agree to 1e-5 relative.
"""

import pytest
import torch

from ffkv_lens import MemoryLens
from ffkv_lens.errors import ConfigError, MissingActivationsError
from tests.conftest import has_hooked_transformer
from tests.helpers import assert_close

FAMILIES = ["gpt2", "opt", "gpt_neox", "gptj", "llama", "qwen2", "gemma2", "gemma3", "phi"]
BACKENDS = ["bridge"] + (["hooked-raw", "hooked-processed"] if has_hooked_transformer() else [])
TEXT = "The capital of France is Paris. The quick"
TOL = 1e-4


def _lens(backend: str, family: str, tiny_bridge, tiny_hooked) -> MemoryLens:
    if backend == "bridge":
        return MemoryLens(tiny_bridge(family))
    return MemoryLens(tiny_hooked(family, backend == "hooked-processed"))


def _uncapped(lens: MemoryLens, logits: torch.Tensor) -> torch.Tensor:
    cap = getattr(lens.adapter.model.cfg, "output_logits_soft_cap", None)
    return logits if not cap or cap <= 0 else cap * torch.atanh(logits / cap)


def _norm_scale(lens: MemoryLens, y: torch.Tensor) -> torch.Tensor:
    eps = lens.adapter.model.cfg.eps
    if lens.adapter.final_norm_centres:
        return (y.var(dim=-1, unbiased=False, keepdim=True) + eps).sqrt()
    return (y.pow(2).mean(dim=-1, keepdim=True) + eps).sqrt()


def independent_dla(lens: MemoryLens, acts: dict, layer: int, position: int) -> torch.Tensor:
    """Centred DLA over the vocabulary of layer's FFN output without bias, from the model's readout."""
    hooks, readout = lens.hook_names(layer), lens.adapter.readout_hooks()
    y = acts[hooks.ffn_output][0, position].double()
    bias = lens.value_bias(layer)
    if bias is not None:
        scale = acts[hooks.post_ffn_scale][0, position] if hooks.post_ffn_scale else 1.0
        y = y - bias.double() / scale
    y = y.float()
    direction = _uncapped(lens, lens.readout(y)) - _uncapped(lens, lens.readout(torch.zeros_like(y)))
    dla = direction * _norm_scale(lens, y) / acts[readout.norm_scale][0, position]
    return dla - dla.mean()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_layer_sums_equal_the_direct_logit_attribution(tiny_bridge, tiny_hooked, backend: str, family: str) -> None:
    lens = _lens(backend, family, tiny_bridge, tiny_hooked)
    tokens = lens.adapter.to_tokens(TEXT)
    hooks = [lens.hook_names(layer) for layer in range(lens.n_layers)]
    names = [n for h in hooks for n in (h.ffn_output, h.post_ffn_scale) if n is not None]
    acts = lens.adapter.record(tokens, names + lens.adapter.readout_hooks().required())
    for position in (2, -1):
        table = lens.contributions(tokens, position=position, top=None, top_tokens=0)
        token = table.attrs["settings"]["token_id"]
        final = acts[lens.adapter.readout_hooks().resid][0, position]
        assert token == int(lens.readout(final).argmax()), "default token is the model's prediction"
        for layer in range(lens.n_layers):
            part = table[table.layer == layer]
            total, scale = float(part.contribution.sum()), float(part.contribution.abs().sum())
            dla = float(independent_dla(lens, acts, layer, position)[token])
            assert abs(total - dla) <= TOL * (abs(dla) + scale), f"layer {layer} pos {position}: {total} vs {dla}"
            assert table.attrs["layer_totals"][layer] == pytest.approx(total, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
@torch.no_grad()
def test_backends_and_processing_agree(tiny_bridge, tiny_hooked, family: str) -> None:
    tables = {b: _lens(b, family, tiny_bridge, tiny_hooked) for b in BACKENDS}
    got = {b: lens.contributions(TEXT, position=-1, token=42, top=None, top_tokens=0) for b, lens in tables.items()}
    reference = got["bridge"].sort_values(["layer", "key"])
    for backend, table in got.items():
        table = table.sort_values(["layer", "key"])
        for column in ("coefficient", "contribution"):
            a, b = torch.tensor(table[column].to_numpy()), torch.tensor(reference[column].to_numpy())
            assert_close(a, b, rel=1e-5, what=f"{backend} {column}")


@pytest.mark.parametrize("backend", BACKENDS)
@torch.no_grad()
def test_a_cache_gives_the_same_table_without_a_forward_pass(tiny_bridge, tiny_hooked, backend: str) -> None:
    lens = _lens(backend, "gemma3", tiny_bridge, tiny_hooked)
    model = lens.adapter.model
    tokens = lens.adapter.to_tokens(TEXT)
    _, cache = model.run_with_cache(tokens)
    from_tokens = lens.contributions(tokens, position=-1, top=10)
    calls = []
    model.hook_dict[lens.hook_names(0).coefficients].add_hook(lambda t, hook: calls.append(1))
    try:
        from_cache = lens.contributions(cache, position=-1, top=10)
    finally:
        model.hook_dict[lens.hook_names(0).coefficients].remove_hooks()
    assert calls == [], "a cache must not run the model"
    assert from_cache[["layer", "key"]].equals(from_tokens[["layer", "key"]])
    assert list(from_cache.columns) == ["layer", "key", "coefficient", "contribution", "value_top_tokens"]
    assert_close(
        torch.tensor(from_cache.contribution.to_numpy()),
        torch.tensor(from_tokens.contribution.to_numpy()),
        rel=1e-6,
        what="cache vs tokens",
    )
    assert from_cache.contribution.is_monotonic_decreasing
    assert len(from_cache.value_top_tokens[0]) == 5


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_cache_lacking_hooks_names_them(tiny_bridge, tiny_hooked, backend: str) -> None:
    lens = _lens(backend, "llama", tiny_bridge, tiny_hooked)
    tokens = lens.adapter.to_tokens(TEXT)
    with torch.no_grad():
        _, cache = lens.adapter.model.run_with_cache(tokens, names_filter=lambda name: name.endswith("mlp.hook_post"))
    with pytest.raises(MissingActivationsError, match=r"ln_final\.hook_scale.*names_filter"):
        lens.contributions(cache, position=-1, token=5)


def test_bad_arguments_are_named(tiny_bridge) -> None:
    lens = MemoryLens(tiny_bridge("llama"))
    with pytest.raises(ConfigError, match="position=99"):
        lens.contributions(TEXT, position=99)
    with pytest.raises(ConfigError, match="pass one token"):
        lens.contributions(TEXT, position=-1, token="The capital of")
    with pytest.raises(ConfigError, match="source is a list"):
        lens.contributions([1, 2, 3], position=-1)
    with pytest.raises(ConfigError, match="decoder"):
        MemoryLens(tiny_bridge("bert")).contributions(TEXT, position=-1)


@pytest.mark.slow
@torch.no_grad()
def test_smollm2_paris_contributions_sum_to_the_ffn_attribution() -> None:
    """The issue's acceptance check, on the bridge (test_hooked_real.py repeats it on HookedTransformers)."""
    from ffkv_lens import load_model

    lens = MemoryLens(load_model("smollm2-135m", device="cpu"))
    tokens = lens.adapter.to_tokens("The capital of France is")
    names = [lens.hook_names(layer).ffn_output for layer in range(lens.n_layers)]
    acts = lens.adapter.record(tokens, names + lens.adapter.readout_hooks().required())
    table = lens.contributions(tokens, position=-1, token=" Paris", top=None, top_tokens=0)
    paris = table.attrs["settings"]["token_id"]
    dla = sum(float(independent_dla(lens, acts, layer, -1)[paris]) for layer in range(lens.n_layers))
    total = float(table.contribution.sum())
    assert abs(total - dla) <= 1e-4 * abs(dla), f"contributions sum {total} vs FFN DLA of ' Paris' {dla}"
    top = lens.contributions(tokens, position=-1, token=" Paris", top=5)
    assert list(top.columns) == ["layer", "key", "coefficient", "contribution", "value_top_tokens"]
    assert top.contribution.is_monotonic_decreasing and len(top) == 5
