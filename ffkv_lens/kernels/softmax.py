"""Row-wise sums of exponentials without float32 denormals, shared by the value statistics and the readouts."""

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["EXP_FLOOR", "logsumexp_rows"]

# exp(x) for x < -87.3 is a float32 denormal, which x86 computes ~5x slower; such terms add less than
# d_vocab * 1.7e-38 to a sum that is at least 1 (its largest term is exp(0)), far below one ulp.
EXP_FLOOR = -87.0


def logsumexp_rows(logits: Float[Tensor, "n v"], maxima: Float[Tensor, " n"], buffer: Tensor | None = None) -> Tensor:
    """``sum(exp(logits - maxima[:, None]), -1)`` with exponents floored at :data:`EXP_FLOOR` (no denormals).

    ``maxima`` must be at least each row's maximum; ``buffer`` (same shape as ``logits``) avoids an allocation.

    Example:
        >>> x = torch.tensor([[0.0, -200.0, 1.0]])
        >>> float(x.amax(-1) + logsumexp_rows(x, x.amax(-1)).log()) == float(x.logsumexp(-1))
        True
    """
    buffer = torch.empty_like(logits) if buffer is None else buffer
    torch.sub(logits, maxima[:, None], out=buffer)
    return buffer.clamp_(min=EXP_FLOOR).exp_().sum(dim=-1)
