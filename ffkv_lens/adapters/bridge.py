"""TransformerLens 4.x backend: memories of a ``TransformerBridge``.

The bridge exposes every supported family with the same hook aliases and weight
accessors in TransformerLens orientation (``W_in``/``W_gate`` ``[d_model, d_mlp]``,
``W_out`` ``[d_mlp, d_model]``); this module turns them into keys and values in the one
ffkv_lens orientation ``[d_mlp, d_model]`` and resolves aliases to canonical hook names
once, so a hook is never registered twice on one point.
"""

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.model_bridge.exceptions import StopAtLayerException

from ffkv_lens.adapters.base import FwdHook, LayerHooks, MemoryAdapter, ReadoutHooks
from ffkv_lens.adapters.families import FamilySpec, family_for_architecture
from ffkv_lens.adapters.tl_model import TLModelShape
from ffkv_lens.errors import ConfigError, UnsupportedArchitectureError
from ffkv_lens.types import AttentionMask, Keys, Logits, Residual, Tokens, ValueBias, Values

__all__ = ["BridgeAdapter"]


def _raise_stop(tensor: Tensor, hook: Any) -> None:
    raise StopAtLayerException(tensor)


class BridgeAdapter(TLModelShape, MemoryAdapter):
    """Key-value memories of a :class:`transformer_lens.model_bridge.TransformerBridge`.

    Args:
        model: A booted bridge (``ffkv_lens.load_model`` or ``TransformerBridge.boot_transformers``).
        spec: The family; looked up from ``model.cfg.architecture`` when omitted.
    """

    def __init__(self, model: TransformerBridge, spec: FamilySpec | None = None) -> None:
        self.model = model
        self.spec = spec or family_for_architecture(str(model.cfg.architecture))
        cfg = model.cfg
        if bool(cfg.gated_mlp) != self.spec.gated:
            raise UnsupportedArchitectureError(
                f"{cfg.architecture} is registered as gated={self.spec.gated} but the model's "
                f"config says gated_mlp={cfg.gated_mlp}; its FFN differs from the family's."
            )
        from transformers.activations import ACT2FN

        self._act = ACT2FN[cfg.act_fn]
        self._parallel = self.spec.layout == "parallel" and bool(cfg.parallel_attn_mlp)
        self._hooks = [self._layer_hooks(layer) for layer in range(cfg.n_layers)]
        self._aliases: dict[str, list[str]] | None = None

    # -- shape -----------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return str(getattr(self.model.cfg, "model_name", None) or self.model.cfg.architecture)

    def describe(self) -> dict[str, Any]:
        from importlib.metadata import version

        return {
            "backend": "TransformerBridge",
            "transformer_lens": version("transformer-lens"),
            "family": self.spec.name,
            "hf_architecture": str(self.model.cfg.architecture),
            "model_name": self.model_name,
            "dtype": str(self.model.cfg.dtype),
            "weights_processed": bool(getattr(self.model, "compatibility_mode", False)),
            "value_readout": self.value_readout_mode,
        }

    # -- hooks -----------------------------------------------------------------------------
    def _canonical(self, layer: int, alias: str) -> str:
        return self.model.hook_dict[f"blocks.{layer}.{alias}"].name

    def _layer_hooks(self, layer: int) -> LayerHooks:
        name = lambda alias: self._canonical(layer, alias)  # noqa: E731
        # The input of the first projection is x on every family; transformer-lens 3.9 never fires
        # the container's mlp.hook_in on OPT and BERT, whose MLP has no HF module of its own.
        first_in = f"blocks.{layer}.mlp.in.hook_in"
        if not self.spec.gated and first_in in self.model.hook_dict:
            ffn_input = self.model.hook_dict[first_in].name
        else:
            ffn_input = name("mlp.hook_in")
        if self.spec.layout == "post_norm":
            before, after = ffn_input, name("ln2.hook_in")
        elif self._parallel:
            before, after = None, name("hook_resid_post")
        else:
            before, after = name("hook_resid_mid"), name("hook_resid_post")
        return LayerHooks(
            coefficients=name("mlp.hook_post"),
            ffn_input=ffn_input,
            ffn_output=name("hook_mlp_out"),
            resid_before_ffn=before,
            resid_after_ffn=after,
            post_ffn_scale=name("ln2_post.hook_scale") if self.spec.post_ffn_norm else None,
            gate_pre=name("mlp.hook_pre") if self.spec.gated else None,
            up_pre=name("mlp.hook_pre_linear") if self.spec.gated else None,
        )

    def hook_names(self, layer: int) -> LayerHooks:
        return self._hooks[self.check_layers(layer)[0]]

    # -- weights ---------------------------------------------------------------------------
    def _mlp(self, layer: int) -> Any:
        return self.model.blocks[self.check_layers(layer)[0]].mlp

    def keys(self, layer: int) -> Keys:
        mlp = self._mlp(layer)
        return (mlp.W_gate if self.spec.gated else mlp.W_in).detach().T

    def up_keys(self, layer: int) -> Keys | None:
        return self._mlp(layer).W_in.detach().T if self.spec.gated else None

    def key_bias(self, layer: int) -> Tensor | None:
        mlp = self._mlp(layer)
        bias = mlp.b_gate if self.spec.gated else mlp.b_in
        return None if bias is None else bias.detach()

    def up_key_bias(self, layer: int) -> Tensor | None:
        bias = self._mlp(layer).b_in if self.spec.gated else None
        return None if bias is None else bias.detach()

    def values(self, layer: int) -> Values:
        w_out = self._mlp(layer).W_out.detach()
        if self.spec.post_ffn_norm:
            w_out = w_out * self._norm_gain(self.model.blocks[layer].ln2_post)
        return w_out

    def value_bias(self, layer: int) -> ValueBias | None:
        bias = self._mlp(layer).b_out
        return None if bias is None else bias.detach()

    def activation(self, pre: Tensor) -> Tensor:
        return self._act(pre)

    def _norm_gain(self, norm: Any) -> Tensor:
        return norm.original_component.weight.detach() + self.spec.norm_gain_offset

    # -- running -----------------------------------------------------------------------------
    def run_with_hooks(
        self,
        tokens: Tokens,
        fwd_hooks: Sequence[FwdHook],
        *,
        attention_mask: AttentionMask | None = None,
        stop_after: str | None = None,
    ) -> Logits | None:
        hooks = list(fwd_hooks)
        if stop_after is not None:
            hooks.append((stop_after, _raise_stop))
        with self.model.hooks(fwd_hooks=hooks):
            out = self.model(tokens, attention_mask=attention_mask)
        return None if stop_after is not None else out

    def hooks(self, fwd_hooks: Sequence[FwdHook]) -> contextlib.AbstractContextManager[None]:
        return self.model.hooks(fwd_hooks=list(fwd_hooks))

    def value_weight(self, layer: int) -> Tensor:
        out = self._mlp(layer).out
        weight = self._mlp(layer).W_out
        if weight.untyped_storage().data_ptr() != out.weight.untyped_storage().data_ptr():
            raise UnsupportedArchitectureError(
                f"{self.architecture}: W_out of layer {layer} is a copy, not a view of the weight; "
                "it cannot be edited in place. Use hook edits (lens.intervene) instead."
            )
        return weight

    def readout(self, resid: Residual) -> Logits:
        model = self.model
        x = resid
        if self.spec.readout == "mlm_head":
            x = self._act(model.mlm_head(x))
        logits = model.unembed(model.ln_final(x))
        cap = model.cfg.output_logits_soft_cap
        if cap is not None and cap > 0:
            logits = cap * torch.tanh(logits / cap)
        return logits

    def readout_hooks(self) -> ReadoutHooks:
        return ReadoutHooks(
            resid=self.hook_names(self.n_layers - 1).resid_after_ffn,
            norm_scale=self.model.hook_dict["ln_final.hook_scale"].name,
        )

    def hook_aliases(self, name: str) -> list[str]:
        if self._aliases is None:
            groups: dict[str, list[str]] = {}
            for alias, point in self.model.hook_dict.items():
                groups.setdefault(point.name, []).append(alias)
            self._aliases = {key: [key, *sorted(set(names) - {key})] for key, names in groups.items()}
        return self._aliases.get(name, [name])

    def unembedding(self) -> Tensor:
        return self.model.W_U

    def final_norm_gain(self) -> Tensor:
        return self._norm_gain(self.model.ln_final)

    @property
    def final_norm_centres(self) -> bool:
        return self.model.cfg.normalization_type in ("LN", "LNPre")


def make_bridge_adapter(model: TransformerBridge) -> BridgeAdapter:
    """Build the adapter of a bridge, with a clear error for a non-bridge object."""
    if not isinstance(model, TransformerBridge):
        raise ConfigError(f"Expected a TransformerBridge, got {type(model).__name__}.")
    return BridgeAdapter(model)
