"""The one vocabulary of tensor shapes used at every public boundary of ffkv_lens.

Dimension names: ``batch pos layer d_model d_mlp d_vocab k``; ``memories`` is a
selection of memories (rows of keys/values) of one layer.

Example:
    >>> import torch
    >>> from ffkv_lens.types import Keys
    >>> Keys  # doctest: +ELLIPSIS
    <class 'jaxtyping.Float[Tensor, 'd_mlp d_model']'>
"""

from jaxtyping import Bool, Float, Int
from torch import Tensor

__all__ = [
    "AttentionMask",
    "Coefficients",
    "KeyBias",
    "Keys",
    "Logits",
    "MemoryLogits",
    "Residual",
    "Tokens",
    "ValueBias",
    "Values",
]

Tokens = Int[Tensor, "batch pos"]
AttentionMask = Int[Tensor, "batch pos"] | Bool[Tensor, "batch pos"]
Keys = Float[Tensor, "d_mlp d_model"]
Values = Float[Tensor, "d_mlp d_model"]
KeyBias = Float[Tensor, " d_mlp"]
ValueBias = Float[Tensor, " d_model"]
Coefficients = Float[Tensor, "batch pos d_mlp"]
Residual = Float[Tensor, "*batch d_model"]
Logits = Float[Tensor, "*batch d_vocab"]
MemoryLogits = Float[Tensor, "memories d_vocab"]
