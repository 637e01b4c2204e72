"""The per-layer identities every adapter must satisfy, shared by tiny and real models.

(a) coefficients recomputed from keys and the FFN input equal ``hook_post``;
(b) coefficient-weighted values (+ bias, + post-FFN transform) equal what the FFN adds to
    the residual stream; r + y == o;
(c) ``readout`` of the final residual equals the model's logits.
"""

import torch

from ffkv_lens import MemoryLens
from tests.helpers import assert_close


def recompute_coefficients(lens: MemoryLens, layer: int, x: torch.Tensor) -> torch.Tensor:
    """m = f(x k + b) (non-gated) or f(x g + b_g) * (x u + b_u) (gated), from public weights."""
    adapter = lens.adapter

    def project(keys: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = x @ keys.T
        return out if bias is None else out + bias

    m = adapter.activation(project(lens.keys(layer), adapter.key_bias(layer)))
    if lens.gated:
        m = m * project(lens.up_keys(layer), adapter.up_key_bias(layer))
    return m


def check_layer_identities(lens: MemoryLens, tokens: torch.Tensor, layer: int, rel: float) -> None:
    hooks = lens.hook_names(layer)
    acts = lens.adapter.record(tokens, hooks.required())
    m = acts[hooks.coefficients]
    assert_close(recompute_coefficients(lens, layer, acts[hooks.ffn_input]), m, rel=rel, what=f"(a) layer {layer}")
    post_scale = acts[hooks.post_ffn_scale] if hooks.post_ffn_scale else None
    y = acts[hooks.ffn_output]
    assert_close(lens.ffn_output(layer, m, post_scale), y, rel=rel, what=f"(b) layer {layer}")
    r = lens.adapter.residual_before_ffn(acts, layer)
    assert_close(r + y, acts[hooks.resid_after_ffn], rel=rel, what=f"r + y == o, layer {layer}")


def final_residual_hook(lens: MemoryLens) -> str:
    """The hook carrying the residual that the readout reads (BERT: after the last post-LN)."""
    last = lens.n_layers - 1
    if lens.adapter.spec.layout == "post_norm":
        return lens.adapter.model.hook_dict[f"blocks.{last}.hook_out"].name
    return lens.hook_names(last).resid_after_ffn


def check_readout(lens: MemoryLens, tokens: torch.Tensor, rel: float) -> None:
    name = final_residual_hook(lens)
    resid = lens.adapter.record(tokens, [name])[name]
    logits = lens.adapter.model(tokens)
    assert_close(lens.readout(resid), logits, rel=rel, what="(c) readout")


def assert_atlases_equivalent(atlas, reference, *, rel: float = 1e-4, tie_rel: float = 1e-5, what: str = "") -> int:
    """Same units and positions at every rank, up to ties; coefficients within ``rel``.

    A rank may name another (unit, position) only where the two coefficients at that rank agree
    within ``tie_rel`` times the layer's largest coefficient (fp32 errors are absolute-ish): a tie
    that one backend breaks by float error (e.g. identical prefixes in two batch rows computed a few
    ulps apart). Returns how many ranks differ.
    """
    assert atlas.layers == reference.layers, f"{what}: layers {atlas.layers} vs {reference.layers}"
    differing = 0
    for layer in atlas.layers:
        tables = [(atlas.top, reference.top)] + ([(atlas.bottom, reference.bottom)] if reference.bottom else [])
        for mine, theirs in tables:
            a, b = mine[layer], theirs[layer]
            assert_close(a.values, b.values, rel=rel, what=f"{what} values layer {layer}")
            moved = (a.units != b.units) | (a.positions != b.positions)
            scale = b.values.abs().max().clamp_min(1e-30)
            untied = moved & ((a.values - b.values).abs() > tie_rel * scale)
            assert not untied.any(), (
                f"{what} layer {layer}: {int(untied.sum())} ranks name other units without a tie, e.g. key "
                f"{int(untied.nonzero()[0, 0])}: {a.units[untied.nonzero()[0, 0]].tolist()} vs "
                f"{b.units[untied.nonzero()[0, 0]].tolist()}"
            )
            differing += int(moved.sum())
    return differing
