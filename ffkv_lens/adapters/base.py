"""The narrow interface between a model backend and the ffkv_lens analysis core.

A :class:`MemoryAdapter` exposes one model's FFN layers as key-value memories
(Geva et al. 2021): keys are the rows of the input weights, coefficients are the hidden
activation at ``mlp.hook_post``, values are the rows of the output weights. Everything
that depends on the backend (TransformerBridge or HookedTransformer) or on the family
(layout, norms, readout head) is settled by the concrete adapter; the analysis core only
calls the methods below.

This module does not import transformer_lens: backends live in sibling modules.
"""

import abc
import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from jaxtyping import Float
from torch import Tensor

from ffkv_lens.adapters.families import FamilySpec
from ffkv_lens.adapters.tl_model import ReadoutParts
from ffkv_lens.errors import ConfigError, HookNotFiredError
from ffkv_lens.types import AttentionMask, Coefficients, Keys, Logits, MemoryLogits, Residual, Tokens, ValueBias, Values

__all__ = ["AdapterLike", "FwdHook", "LayerHooks", "MemoryAdapter", "ReadoutHooks", "SupportsAdapter"]

FwdHook = tuple[str, Callable[[Tensor, Any], Tensor | None]]


@dataclass(frozen=True)
class LayerHooks:
    """Canonical hook names of one layer, as the analysis core needs them.

    Attributes:
        coefficients: The memory coefficients m (``mlp.hook_post``).
        ffn_input: x, the FFN input after any pre-FFN norm (``mlp.hook_in``).
        ffn_output: y, what the FFN adds to the residual stream (``hook_mlp_out``; on Gemma
            after the post-FFN norm; on BERT before the post-LN).
        resid_before_ffn: r, the residual stream the FFN's output is added to
            (``hook_resid_mid``; BERT: the FFN's input). ``None`` on parallel blocks, where
            r is derived as ``resid_after_ffn - ffn_output`` (see
            :meth:`MemoryAdapter.residual_before_ffn`).
        resid_after_ffn: o = r + y (``hook_resid_post``; BERT: the sum entering the
            output LayerNorm, ``ln2.hook_in``).
        post_ffn_scale: Per-token RMS scale of the post-FFN norm (Gemma), else ``None``.
        gate_pre: The gate pre-activation ``x W_gate`` of a gated MLP (``mlp.hook_pre``), else ``None``.
        up_pre: The up projection ``x W_in`` of a gated MLP (``mlp.hook_pre_linear``), else ``None``.
    """

    coefficients: str
    ffn_input: str
    ffn_output: str
    resid_before_ffn: str | None
    resid_after_ffn: str
    post_ffn_scale: str | None = None
    gate_pre: str | None = None
    up_pre: str | None = None

    def required(self) -> list[str]:
        """Every hook name of this layer that is set."""
        return [n for n in vars(self).values() if n is not None]


@dataclass(frozen=True)
class ReadoutHooks:
    """Canonical hook names of the final readout.

    Attributes:
        resid: The residual stream the readout reads (the last layer's ``resid_after_ffn``).
        norm_scale: Per-token scale of the final norm computed from it (``ln_final.hook_scale``).
    """

    resid: str
    norm_scale: str

    def required(self) -> list[str]:
        """Both names."""
        return [self.resid, self.norm_scale]


class MemoryAdapter(abc.ABC):
    """One model seen as a stack of key-value memory layers.

    Subclasses implement the weight accessors, :meth:`run_with_hooks`, :meth:`readout` and
    :meth:`value_logits` for one backend; the family specifics come from ``spec``.
    """

    spec: FamilySpec

    # -- shape -----------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def n_layers(self) -> int:
        """Number of FFN layers."""

    @property
    @abc.abstractmethod
    def d_model(self) -> int:
        """Width of the residual stream."""

    @property
    @abc.abstractmethod
    def d_mlp(self) -> int:
        """Number of memories per layer."""

    @property
    @abc.abstractmethod
    def d_vocab(self) -> int:
        """Vocabulary size of the readout."""

    @property
    @abc.abstractmethod
    def device(self) -> torch.device:
        """Device of the model's weights."""

    @property
    @abc.abstractmethod
    def tokenizer(self) -> Any:
        """The model's Hugging Face tokenizer."""

    @property
    @abc.abstractmethod
    def model_name(self) -> str:
        """Name or path the model was loaded from."""

    @property
    @abc.abstractmethod
    def bos_token_id(self) -> int | None:
        """BOS id when the model prepends BOS by default (the search does too), else None."""

    @abc.abstractmethod
    def weights_fingerprint(self) -> str:
        """A digest of every weight of the model: runs resume only on the same weights."""

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """JSON-serialisable description of the model and adapter, recorded with results."""

    def wraps(self, model: object) -> bool:
        """Whether ``model`` is the very model object this adapter reads (e.g. an ``ActivationCache``'s ``.model``)."""
        return False

    @property
    def architecture(self) -> str:
        """Family name, e.g. ``"llama"``."""
        return self.spec.name

    @property
    def gated(self) -> bool:
        """Whether memories have a gate key and an up key."""
        return self.spec.gated

    @property
    def causal(self) -> bool:
        """Whether each position sees only itself and earlier ones (False for BERT)."""
        return self.spec.causal

    # -- weights ---------------------------------------------------------------------------
    @abc.abstractmethod
    def keys(self, layer: int) -> Keys:
        """Keys of a layer (gate keys on gated MLPs), one row per memory."""

    @abc.abstractmethod
    def up_keys(self, layer: int) -> Keys | None:
        """Up-projection keys of a gated layer; ``None`` on non-gated MLPs."""

    @abc.abstractmethod
    def key_bias(self, layer: int) -> Float[Tensor, " d_mlp"] | None:
        """Bias of the (gate) keys, or ``None``."""

    @abc.abstractmethod
    def up_key_bias(self, layer: int) -> Float[Tensor, " d_mlp"] | None:
        """Bias of the up keys, or ``None``."""

    @abc.abstractmethod
    def values(self, layer: int) -> Values:
        """Direction each memory writes into the residual stream (post-FFN gain folded in)."""

    @abc.abstractmethod
    def value_bias(self, layer: int) -> ValueBias | None:
        """Output bias of the FFN, or ``None``."""

    @abc.abstractmethod
    def activation(self, pre: Tensor) -> Tensor:
        """The FFN's activation function f (applied to the gate pre-activation when gated)."""

    @abc.abstractmethod
    def hook_names(self, layer: int) -> LayerHooks:
        """Canonical hook names of ``layer``."""

    # -- running -----------------------------------------------------------------------------
    @abc.abstractmethod
    def to_tokens(self, text: str | list[str], *, prepend_bos: bool | None = None) -> Tokens:
        """Tokenise text the way the model expects (BOS by the model's default)."""

    @abc.abstractmethod
    def run_with_hooks(
        self,
        tokens: Tokens,
        fwd_hooks: Sequence[FwdHook],
        *,
        attention_mask: AttentionMask | None = None,
        stop_after: str | None = None,
    ) -> Logits | None:
        """Run the model with temporary forward hooks, removed even after an exception.

        Args:
            tokens: Token ids.
            fwd_hooks: ``(hook_name, fn(tensor, hook))`` pairs.
            attention_mask: 1 for real tokens, 0 for padding.
            stop_after: If given, the forward pass stops right after this hook has fired
                (after ``fwd_hooks`` on the same point) and ``None`` is returned.

        Returns:
            The logits, or ``None`` when stopped early.
        """

    @abc.abstractmethod
    def hooks(self, fwd_hooks: Sequence[FwdHook]) -> contextlib.AbstractContextManager[None]:
        """Context in which ``fwd_hooks`` fire on every forward pass of the model.

        Registered at a new level of the model's own ``hooks()`` context and removed on exit,
        exceptions and KeyboardInterrupt included; hooks the user registered stay and fire first.
        """

    @abc.abstractmethod
    def value_weight(self, layer: int) -> Float[Tensor, "d_mlp d_model"]:
        """The live ``W_out`` of ``layer`` as ``[d_mlp, d_model]``, sharing storage with the parameter.

        Writing into it changes the model (used by :meth:`scaled_values`); everything else reads
        :meth:`values`, which has the post-FFN norm gain folded in.
        """

    @contextlib.contextmanager
    def scaled_values(self, factors: Mapping[int, Mapping[int, float]]) -> Iterator[None]:
        """Temporarily multiply rows of ``W_out``: ``{layer: {memory: factor}}``; restored bit for bit on exit.

        Scaling row i of ``W_out`` by s equals scaling the coefficient m_i by s at every position,
        also under a post-FFN norm (it acts on the sum ``m @ W_out``, after which its gain applies).
        """
        saved: list[tuple[Tensor, Tensor, Tensor]] = []
        try:
            with torch.no_grad():
                for layer, rows in factors.items():
                    weight = self.value_weight(layer)
                    index = torch.as_tensor(list(rows), dtype=torch.long, device=weight.device)
                    scale = torch.as_tensor(list(rows.values()), dtype=weight.dtype, device=weight.device)
                    saved.append((weight, index, weight[index].clone()))
                    weight[index] = weight[index] * scale[:, None]
            yield
        finally:
            with torch.no_grad():
                for weight, index, original in reversed(saved):
                    weight[index] = original

    @abc.abstractmethod
    def readout(self, resid: Residual) -> Logits:
        """Logits of full residual states: final norm + unembedding (+ soft-cap)."""

    @abc.abstractmethod
    def readout_hooks(self) -> ReadoutHooks:
        """Canonical hook names of the final residual and the final norm's scale."""

    def hook_aliases(self, name: str) -> list[str]:
        """Every name under which ``name``'s hook point may appear in an ``ActivationCache``."""
        return [name]

    @abc.abstractmethod
    def unembedding(self) -> Float[Tensor, "d_model d_vocab"]:
        """The unembedding matrix ``W_U`` (the final norm's gain folded in on processed weights)."""

    @abc.abstractmethod
    def final_norm_gain(self) -> Float[Tensor, " d_model"] | None:
        """Gain of the final norm still applied before ``W_U`` (``None`` when folded into it)."""

    @property
    @abc.abstractmethod
    def final_norm_centres(self) -> bool:
        """Whether the final norm subtracts the mean (LayerNorm) rather than only scaling (RMSNorm)."""

    @abc.abstractmethod
    def readout_parts(self) -> ReadoutParts | None:
        """:meth:`readout` split into its steps (final norm, ``W_U``, bias, soft-cap), or ``None``.

        ``readout(x) == soft_cap(norm(x) @ unembedding + bias)`` for the returned
        :class:`~ffkv_lens.adapters.tl_model.ReadoutParts`; vocabulary passes use it to read
        column tiles of ``W_U`` instead of whole logit rows. Return ``None`` when the readout is
        not of that form (BERT's MLM head): callers then use :meth:`readout` itself.
        """

    # -- value readout, shared by every backend ---------------------------------------------------
    @property
    def value_readout_mode(self) -> str:
        """The definition used by :meth:`value_logits`, recorded with results.

        The same string on every backend and with processed or raw weights: the numbers agree.
        """
        if self.spec.readout == "mlm_head":
            return "mlm_head(v), centred over the vocabulary"
        if self.final_norm_centres:
            return "direction: (gamma_final * center(v)) @ W_U, centred over the vocabulary"
        return "direction: (gamma_final * v) @ W_U, centred over the vocabulary"

    def _value_rows(self, layer: int, memories: Tensor | Sequence[int] | None) -> Tensor:
        vals = self.values(layer)
        if memories is not None:
            vals = vals[torch.as_tensor(memories, device=vals.device, dtype=torch.long)]
        return vals

    def _value_directions(self, vals: Tensor) -> Tensor:
        if self.final_norm_centres:
            vals = vals - vals.mean(dim=-1, keepdim=True)
        gain = self.final_norm_gain()
        return vals if gain is None else vals * gain

    def value_logits(self, layer: int, memories: Tensor | Sequence[int] | None = None) -> MemoryLogits:
        """Direction-only projection of value vectors into the vocabulary.

        ``(gamma_final * center(v)) @ W_U`` on LayerNorm models, ``(gamma_final * v) @ W_U`` on
        RMSNorm models, centred over the vocabulary: centring removes the per-memory constant that
        weight processing (a centred unembedding) adds, so processed and raw weights, and every
        backend, give the same logits. BERT reads values through its MLM head. See
        :attr:`value_readout_mode`.
        """
        vals = self._value_rows(layer, memories)
        if self.spec.readout == "mlm_head":
            logits = self.readout(vals)
        else:
            logits = self._value_directions(vals) @ self.unembedding().detach()
        return logits - logits.mean(dim=-1, keepdim=True)

    def value_token_logits(
        self, layer: int, token_ids: Tensor | Sequence[int], memories: Tensor | Sequence[int] | None = None
    ) -> Float[Tensor, "memories n"]:
        """``value_logits(layer, memories)[:, token_ids]`` without projecting the whole vocabulary."""
        ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
        if self.spec.readout == "mlm_head":
            return self.value_logits(layer, memories)[:, ids.to(self.device)]
        w_u = self.unembedding().detach()
        directions = w_u[:, ids.to(w_u.device)] - w_u.mean(dim=1, keepdim=True)
        return self._value_directions(self._value_rows(layer, memories)) @ directions

    def value_logit_factors(
        self, layer: int, token_ids: Tensor | Sequence[int]
    ) -> tuple[Float[Tensor, "d_mlp d_model"], Float[Tensor, "d_model n"]] | None:
        """Two factors whose product is ``value_token_logits(layer, token_ids)`` centred over ``token_ids``.

        Returns ``(directions, readout)``: the value directions of every memory of ``layer`` and
        the unembedding columns of ``token_ids`` centred over those columns. Their product is the
        value logits over those tokens up to a per-memory constant, which lets comparisons over a
        sub-vocabulary work in ``d_model`` dimensions. ``None`` when the readout is not linear
        (BERT's MLM head): use :meth:`value_token_logits` then.
        """
        if self.spec.readout == "mlm_head":
            return None
        w_u = self.unembedding().detach()
        columns = w_u[:, torch.as_tensor(token_ids, dtype=torch.long, device=w_u.device).reshape(-1)]
        return self._value_directions(self.values(layer)), columns - columns.mean(dim=1, keepdim=True)

    # -- derived, backend independent ------------------------------------------------------------
    def check_layers(self, layers: int | Sequence[int] | None) -> list[int]:
        """Normalise a layer selection to a sorted list of valid indices.

        Raises:
            ConfigError: If a layer is out of range or the selection is empty.
        """
        if layers is None:
            return list(range(self.n_layers))
        chosen = [layers] if isinstance(layers, int) else list(layers)
        bad = [layer for layer in chosen if not isinstance(layer, int) or not -self.n_layers <= layer < self.n_layers]
        if bad or not chosen:
            raise ConfigError(
                f"layers={layers!r} is not a valid selection for a model with {self.n_layers} layers; "
                f"pass None (all) or integers in [0, {self.n_layers})."
            )
        return sorted({layer % self.n_layers for layer in chosen})

    def coefficients(
        self,
        tokens: Tokens,
        *,
        layers: int | Sequence[int] | None = None,
        attention_mask: AttentionMask | None = None,
    ) -> dict[int, Coefficients]:
        """Memory coefficients m at ``mlp.hook_post``, stopping after the last requested layer.

        Args:
            tokens: Token ids ``[batch, pos]``.
            layers: Layers to record (default: all).
            attention_mask: 1 for real tokens, 0 for padding (pad positions hold garbage).

        Returns:
            ``{layer: m}`` with ``m`` of shape ``[batch, pos, d_mlp]``.
        """
        chosen = self.check_layers(layers)
        names = {self.hook_names(layer).coefficients: layer for layer in chosen}
        out: dict[int, Tensor] = {}

        def record(tensor: Tensor, hook: Any) -> None:
            out[names[hook.name]] = tensor.detach()

        last = self.hook_names(chosen[-1]).coefficients
        self.run_with_hooks(tokens, [(name, record) for name in names], attention_mask=attention_mask, stop_after=last)
        _check_fired(names, {self.hook_names(layer).coefficients for layer in out})
        return out

    def record(
        self,
        tokens: Tokens,
        names: Sequence[str],
        *,
        attention_mask: AttentionMask | None = None,
        stop_after: str | None = None,
    ) -> dict[str, Tensor]:
        """Record activations at the given canonical hook names (raises if one did not fire)."""
        acts: dict[str, Tensor] = {}

        def keep(tensor: Tensor, hook: Any) -> None:
            acts[hook.name] = tensor.detach()

        self.run_with_hooks(
            tokens,
            [(name, keep) for name in dict.fromkeys(names)],
            attention_mask=attention_mask,
            stop_after=stop_after,
        )
        _check_fired(names, acts)
        return acts

    def ffn_output(
        self,
        layer: int,
        coefficients: Float[Tensor, "*batch d_mlp"],
        post_scale: Float[Tensor, "*batch 1"] | None = None,
    ) -> Float[Tensor, "*batch d_model"]:
        """What the FFN adds to the residual stream, rebuilt from coefficients and values.

        ``sum_i m_i v_i + b_out``, divided by the post-FFN norm's per-token scale where the
        family has one (``post_scale`` from :attr:`LayerHooks.post_ffn_scale`).
        """
        out = coefficients @ self.values(layer)
        bias = self.value_bias(layer)
        if bias is not None:
            out = out + bias
        if self.spec.post_ffn_norm:
            if post_scale is None:
                raise ConfigError(
                    f"{self.architecture} has a post-FFN norm: pass post_scale, the activation at "
                    f"{self.hook_names(layer).post_ffn_scale!r}."
                )
            out = out / post_scale
        return out

    def residual_before_ffn(self, acts: Mapping[str, Tensor], layer: int) -> Tensor:
        """r, the residual stream the FFN output is added to, from recorded activations.

        On parallel blocks r is ``resid_after_ffn - ffn_output`` (the block input plus the
        attention output), since attention and FFN read the same input.
        """
        hooks = self.hook_names(layer)
        if hooks.resid_before_ffn is not None:
            return acts[hooks.resid_before_ffn]
        return acts[hooks.resid_after_ffn] - acts[hooks.ffn_output]

    @contextlib.contextmanager
    def inference(self) -> Iterator[None]:
        """Context for analysis code: no autograd graph is built."""
        with torch.no_grad():
            yield


@runtime_checkable
class SupportsAdapter(Protocol):
    """Anything that carries a :class:`MemoryAdapter` as ``.adapter``, e.g. a :class:`ffkv_lens.MemoryLens`."""

    @property
    def adapter(self) -> MemoryAdapter:
        """The adapter the analysis reads."""
        ...


AdapterLike = MemoryAdapter | SupportsAdapter
"""What every public analysis function takes as its first argument (unwrapped by ``as_adapter``)."""


def _check_fired(expected: Sequence[str] | Mapping[str, Any], fired: Mapping[str, Any] | set[str]) -> None:
    missing = [name for name in expected if name not in fired]
    if missing:
        raise HookNotFiredError(
            f"These hooks did not fire during the forward pass: {missing}. The installed "
            "TransformerLens version may name or route them differently; please report the "
            "model and TransformerLens version."
        )
