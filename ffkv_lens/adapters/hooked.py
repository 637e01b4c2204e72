"""TransformerLens 3.x backend: memories of a ``HookedTransformer``.

A ``HookedTransformer`` holds its weights in TransformerLens orientation (``W_in``/``W_gate``
``[d_model, d_mlp]``, ``W_out`` ``[d_mlp, d_model]``), either raw or processed (folded norms,
centred writing weights and unembedding: ``from_pretrained``'s default). This adapter gives the
same memories, coefficients and value readout as :class:`~ffkv_lens.adapters.bridge.BridgeAdapter`
on the same weights, whatever the processing:

- **Coefficients** are ``blocks.l.mlp.hook_post`` on both backends (weight processing leaves
  them unchanged).
- **Keys live in the space of** ``blocks.l.ln2.hook_normalized``, the normalised FFN input
  before the norm's gain: no HookedTransformer hook carries the FFN input after the gain, so
  the adapter folds the pre-FFN norm's gain (and LayerNorm bias) into the keys, exactly as
  ``fold_ln`` does. Raw and processed models therefore have the same keys up to centring.
- **Norm gains** are stored by TransformerLens's converters as the applied gain (Gemma's
  ``1 + w`` already added), so :attr:`FamilySpec.norm_gain_offset` (a Hugging Face weight
  convention) is not applied here.
- **Value readout** is direction-only through the final norm's gain and ``W_U``, centred over the
  vocabulary (:meth:`MemoryAdapter.value_logits`); with folded norms the gain is already in
  ``W_U`` and the final norm has none.

GatedMLP in TransformerLens adds ``b_in`` after the gate product; it is zero on every supported
gated family, and a model where it is not is refused.
"""

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ffkv_lens.adapters.base import FwdHook, LayerHooks, MemoryAdapter, ReadoutHooks
from ffkv_lens.adapters.families import FamilySpec, family_for_architecture
from ffkv_lens.adapters.tl_model import TLModelShape
from ffkv_lens.errors import ConfigError, UnsupportedArchitectureError
from ffkv_lens.types import AttentionMask, Keys, Logits, Residual, Tokens, ValueBias, Values

__all__ = ["HookedAdapter"]


class _StopForward(Exception):  # noqa: N818 - control flow, never reaches the user
    """Raised by the stop hook to end a forward pass early; caught by ``run_with_hooks``."""


def _raise_stop(tensor: Tensor, hook: Any) -> None:
    raise _StopForward


def _nonzero(bias: Tensor | None) -> Tensor | None:
    return None if bias is None or not bool(bias.detach().any()) else bias.detach()


class HookedAdapter(TLModelShape, MemoryAdapter):
    """Key-value memories of a :class:`transformer_lens.HookedTransformer` (TransformerLens 3.x).

    Args:
        model: A ``HookedTransformer`` with raw or processed weights.
        spec: The family; looked up from ``model.cfg.original_architecture`` when omitted.
    """

    def __init__(self, model: Any, spec: FamilySpec | None = None) -> None:
        self.model = model
        cfg = model.cfg
        self.spec = spec or family_for_architecture(str(cfg.original_architecture))
        if self.spec.readout != "unembed" or self.spec.layout == "post_norm":
            raise UnsupportedArchitectureError(
                f"{cfg.original_architecture} is not a decoder HookedTransformer; use a TransformerBridge."
            )
        if bool(cfg.gated_mlp) != self.spec.gated:
            raise UnsupportedArchitectureError(
                f"{cfg.original_architecture} is registered as gated={self.spec.gated} but the model's "
                f"config says gated_mlp={cfg.gated_mlp}; its FFN differs from the family's."
            )
        if self.spec.post_ffn_norm != bool(cfg.use_normalization_before_and_after):
            raise UnsupportedArchitectureError(
                f"{cfg.original_architecture}: the family expects post_ffn_norm={self.spec.post_ffn_norm}, the "
                f"model has use_normalization_before_and_after={cfg.use_normalization_before_and_after}."
            )
        if self.spec.gated and any(bool(block.mlp.b_in.detach().any()) for block in model.blocks):
            raise UnsupportedArchitectureError(
                "This gated HookedTransformer has a non-zero b_in, which TransformerLens adds after the gate "
                "product; ffkv_lens's memory form m = f(x g) (x u) has no place for it."
            )
        self._parallel = bool(cfg.parallel_attn_mlp)
        self._hooks = [self._layer_hooks(layer) for layer in range(cfg.n_layers)]

    # -- shape -----------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return str(self.model.cfg.model_name or self.model.cfg.original_architecture)

    def weight_processing(self) -> dict[str, bool]:
        """Which of ``from_pretrained``'s weight processing steps this model shows (detected)."""
        blocks = self.model.blocks
        w_out = torch.stack([block.mlp.W_out.detach() for block in blocks])
        w_u = self.model.W_U.detach()
        return {
            "fold_ln": str(self.model.cfg.normalization_type).endswith("Pre"),
            "center_writing_weights": bool(w_out.mean(-1).abs().max() <= 1e-5 * w_out.abs().max()),
            "center_unembed": bool(w_u.mean(-1).abs().max() <= 1e-5 * w_u.abs().max()),
        }

    def describe(self) -> dict[str, Any]:
        from importlib.metadata import version

        processing = self.weight_processing()
        return {
            "backend": "HookedTransformer",
            "transformer_lens": version("transformer-lens"),
            "family": self.spec.name,
            "hf_architecture": str(self.model.cfg.original_architecture),
            "model_name": self.model_name,
            "dtype": str(self.model.cfg.dtype),
            "weights_processed": processing["fold_ln"],
            "weight_processing": processing,
            "value_readout": self.value_readout_mode,
        }

    # -- hooks -----------------------------------------------------------------------------
    def _layer_hooks(self, layer: int) -> LayerHooks:
        prefix = f"blocks.{layer}."
        return LayerHooks(
            coefficients=prefix + "mlp.hook_post",
            ffn_input=prefix + "ln2.hook_normalized",
            ffn_output=prefix + "hook_mlp_out",
            resid_before_ffn=None if self._parallel else prefix + "hook_resid_mid",
            resid_after_ffn=prefix + "hook_resid_post",
            post_ffn_scale=prefix + "ln2_post.hook_scale" if self.spec.post_ffn_norm else None,
            gate_pre=prefix + "mlp.hook_pre" if self.spec.gated else None,
            up_pre=prefix + "mlp.hook_pre_linear" if self.spec.gated else None,
        )

    def hook_names(self, layer: int) -> LayerHooks:
        return self._hooks[self.check_layers(layer)[0]]

    def readout_hooks(self) -> ReadoutHooks:
        return ReadoutHooks(resid=self.hook_names(self.n_layers - 1).resid_after_ffn, norm_scale="ln_final.hook_scale")

    # -- weights ---------------------------------------------------------------------------
    def _block(self, layer: int) -> Any:
        return self.model.blocks[self.check_layers(layer)[0]]

    def _fold_ln2(self, layer: int, weight: Tensor, bias: Tensor | None) -> tuple[Keys, Tensor | None]:
        """Keys ``[d_mlp, d_model]`` and bias in the space of ``ln2.hook_normalized`` (gain folded in)."""
        ln2 = self._block(layer).ln2
        gain, shift = getattr(ln2, "w", None), getattr(ln2, "b", None)
        weight = weight.detach()
        if shift is not None:
            folded = shift.detach() @ weight
            bias = folded if bias is None else bias.detach() + folded
        if gain is not None:
            weight = weight * gain.detach()[:, None]
        return weight.T, _nonzero(bias)

    def keys(self, layer: int) -> Keys:
        mlp = self._block(layer).mlp
        return self._fold_ln2(layer, mlp.W_gate if self.spec.gated else mlp.W_in, None)[0]

    def up_keys(self, layer: int) -> Keys | None:
        return self._fold_ln2(layer, self._block(layer).mlp.W_in, None)[0] if self.spec.gated else None

    def key_bias(self, layer: int) -> Tensor | None:
        mlp = self._block(layer).mlp
        if self.spec.gated:
            return self._fold_ln2(layer, mlp.W_gate, None)[1]
        return self._fold_ln2(layer, mlp.W_in, mlp.b_in)[1]

    def up_key_bias(self, layer: int) -> Tensor | None:
        return self._fold_ln2(layer, self._block(layer).mlp.W_in, None)[1] if self.spec.gated else None

    def values(self, layer: int) -> Values:
        block = self._block(layer)
        w_out = block.mlp.W_out.detach()
        if self.spec.post_ffn_norm:
            w_out = w_out * block.ln2_post.w.detach()
        return w_out

    def value_bias(self, layer: int) -> ValueBias | None:
        return _nonzero(self._block(layer).mlp.b_out)

    def activation(self, pre: Tensor) -> Tensor:
        return self.model.blocks[0].mlp.act_fn(pre)

    def unembedding(self) -> Tensor:
        return self.model.W_U

    def final_norm_gain(self) -> Tensor | None:
        gain = getattr(self.model.ln_final, "w", None)
        return None if gain is None else gain.detach()

    @property
    def final_norm_centres(self) -> bool:
        return str(self.model.cfg.normalization_type).startswith("LN")

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
        try:
            # model.hooks() registers at a new context level and removes exactly those hooks on
            # exit (exceptions and KeyboardInterrupt included); the user's hooks stay and fire first.
            with self.model.hooks(fwd_hooks=hooks):
                out = self.model(tokens, attention_mask=attention_mask)
        except _StopForward:
            return None
        return None if stop_after is not None else out

    def hooks(self, fwd_hooks: Sequence[FwdHook]) -> contextlib.AbstractContextManager[None]:
        return self.model.hooks(fwd_hooks=list(fwd_hooks))

    def value_weight(self, layer: int) -> Tensor:
        return self._block(layer).mlp.W_out

    def readout(self, resid: Residual) -> Logits:
        model = self.model
        logits = model.unembed(model.ln_final(resid))
        cap = model.cfg.output_logits_soft_cap
        if cap is not None and cap > 0:
            logits = cap * torch.tanh(logits / cap)
        return logits


def make_hooked_adapter(model: Any) -> HookedAdapter:
    """Build the adapter of a ``HookedTransformer``, with a clear error for other objects."""
    from ffkv_lens.adapters.hooked_loading import require_hooked_transformer

    if not isinstance(model, require_hooked_transformer()):
        raise ConfigError(f"Expected a HookedTransformer, got {type(model).__name__}.")
    return HookedAdapter(model)
