"""What both TransformerLens backends read the same way from ``model.cfg`` and the weights."""

from typing import Any

import torch

from ffkv_lens.types import Tokens

__all__ = ["TLModelShape"]


class TLModelShape:
    """Sizes, device, tokenizer, BOS and tokenisation of a TransformerLens model (``HookedTransformer`` or bridge).

    Mixed into the adapters, which set ``self.model``; ``model_name`` stays backend-specific.
    """

    model: Any

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

    def to_tokens(self, text: str | list[str], *, prepend_bos: bool | None = None) -> Tokens:
        return self.model.to_tokens(text, prepend_bos=prepend_bos)
