"""What both TransformerLens backends read the same way from ``model.cfg`` and the weights."""

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor

from ffkv_lens.types import Residual, Tokens

__all__ = ["ReadoutParts", "TLModelShape"]


class ReadoutParts(NamedTuple):
    """The readout of full residual states split into its steps.

    ``readout(x) == soft_cap(norm(x) @ unembedding + bias)`` with ``soft_cap(z) = c * tanh(z / c)``
    (skipped when ``soft_cap`` is ``None``); ``bias`` is ``None`` when the unembedding has none.
    Lets vocabulary passes work on column tiles of the unembedding.

    Attributes:
        norm: The final norm (the model's own module).
        unembedding: ``W_U``.
        bias: ``b_U``, or ``None`` when it is absent or zero.
        soft_cap: The output soft-cap, or ``None``.
    """

    norm: Callable[[Residual], Residual]
    unembedding: Float[Tensor, "d_model d_vocab"]
    bias: Float[Tensor, " d_vocab"] | None
    soft_cap: float | None


class TLModelShape:
    """Sizes, device, tokenizer, BOS and tokenisation of a TransformerLens model (``HookedTransformer`` or bridge).

    Mixed into the adapters, which set ``self.model`` and ``self.spec``; ``model_name`` stays backend-specific.
    """

    model: Any
    spec: Any

    @property
    def n_layers(self) -> int:
        return int(self.model.cfg.n_layers)

    @property
    def d_model(self) -> int:
        return int(self.model.cfg.d_model)

    @property
    def d_mlp(self) -> int:
        return int(self.model.blocks[0].mlp.W_out.shape[0])

    @property
    def d_vocab(self) -> int:
        return int(self.model.W_U.shape[-1])

    @property
    def device(self) -> torch.device:
        return self.model.W_U.device

    @property
    def tokenizer(self) -> Any:
        return self.model.tokenizer

    @property
    def bos_token_id(self) -> int | None:
        if not self.model.cfg.default_prepend_bos:
            return None
        return self.tokenizer.bos_token_id

    def weights_fingerprint(self) -> str:
        """blake2b (16 bytes, hex) of every parameter's name, dtype, shape and bytes, in module order."""
        import hashlib

        digest = hashlib.blake2b(digest_size=16)
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                data = param.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
                digest.update(f"{name}|{param.dtype}|{tuple(param.shape)}|".encode())
                digest.update(memoryview(data.numpy()))
        return digest.hexdigest()

    def wraps(self, model: object) -> bool:
        """Whether ``model`` is the TransformerLens model behind this adapter."""
        return model is self.model

    def readout_parts(self) -> ReadoutParts | None:
        """:class:`ReadoutParts` of ``readout``; ``None`` for an MLM head (BERT), which is not of that form."""
        if self.spec.readout != "unembed":
            return None
        bias = self.model.b_U.detach()
        cap = self.model.cfg.output_logits_soft_cap
        return ReadoutParts(
            self.model.ln_final,
            self.model.W_U.detach(),
            bias if bool(bias.any()) else None,
            float(cap) if cap is not None and cap > 0 else None,
        )

    def to_tokens(self, text: str | list[str], *, prepend_bos: bool | None = None) -> Tokens:
        return self.model.to_tokens(text, prepend_bos=prepend_bos)
