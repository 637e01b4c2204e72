"""Many residual states read in the vocabulary at once (section 5): the reference, by the definition.

At every sampled position and layer, :func:`~ffkv_lens.analysis.dynamics.layer_dynamics` needs
``top(x) = argmax readout(x)`` of the residual ``r`` before the FFN, the FFN output ``y`` and
``o = r + y``, and the probability of the final token under ``softmax(readout(r))``.
:func:`state_tops` computes all four, :func:`state_top` one state's tokens: here by the model's own
``readout`` of each state, row chunks over the whole vocabulary, ``argmax`` and ``logsumexp`` (the
definition, and the path of models whose readout is not a norm followed by a matrix, such as BERT's
MLM head). Ties go to the lowest token id, as ``argmax``.

The twin :mod:`ffkv_lens.kernels.readouts_tiled` has the same signatures and gives the same tokens up
to float32 rounding; :func:`ffkv_lens.kernels.state_tops` and :func:`ffkv_lens.kernels.state_top` pick one.

``model`` is a :class:`~ffkv_lens.MemoryLens` or its :class:`~ffkv_lens.adapters.base.MemoryAdapter`:
anything with ``readout(resid)`` and ``d_vocab``.

Example:
    >>> tops = state_tops(lens, r, y, o, final_tokens)  # doctest: +SKIP
    >>> tops.top_o[:5], tops.prob_r[:5]  # doctest: +SKIP
"""

from typing import Any, NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

__all__ = ["READOUT_BUDGET", "StateTops", "readout_top", "state_top", "state_tops", "tileable_parts"]

# Floats held by one reference readout chunk (rows x d_vocab).
READOUT_BUDGET = 2**25


class StateTops(NamedTuple):
    """Readouts of ``n`` rows of r, y and o.

    Attributes:
        top_r: ``argmax readout(r)``.
        prob_r: ``softmax(readout(r))[target]``.
        top_y: ``argmax readout(y)``.
        top_o: ``argmax readout(o)``.
    """

    top_r: Int[Tensor, " n"]
    prob_r: Float[Tensor, " n"]
    top_y: Int[Tensor, " n"]
    top_o: Int[Tensor, " n"]


def tileable_parts(model: Any) -> Any:
    """The model's ``ReadoutParts`` when the tiled twin applies (float32 weights), else None."""
    adapter = getattr(model, "adapter", model)
    parts = adapter.readout_parts()
    return parts if parts is not None and parts.unembedding.dtype == torch.float32 else None


def readout_top(
    model: Any, states: Float[Tensor, "n d_model"], targets: Int[Tensor, " n"] | None = None
) -> tuple[Int[Tensor, " n"], Float[Tensor, " n"] | None]:
    """``argmax model.readout(x)`` of each row, and the probability of ``targets`` when given."""
    chunk = max(1, READOUT_BUDGET // model.d_vocab)
    tops, probs = [], []
    for start in range(0, states.shape[0], chunk):
        logits = model.readout(states[start : start + chunk])
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16/fp16: softmax in fp32
        tops.append(logits.argmax(dim=-1))
        if targets is not None:
            picked = logits.gather(-1, targets[start : start + chunk, None].to(logits.device))[:, 0]
            probs.append((picked - logits.logsumexp(dim=-1)).exp())
    empty = torch.empty(0, dtype=torch.long)
    top = torch.cat(tops).cpu() if tops else empty
    return top, None if targets is None else (torch.cat(probs).cpu() if probs else empty.float())


def state_top(model: Any, states: Float[Tensor, "n d_model"]) -> Int[Tensor, " n"]:
    """``argmax model.readout(x)`` of each row."""
    return readout_top(model, states)[0]


def state_tops(
    model: Any,
    resid_before: Float[Tensor, "n d_model"],
    ffn_output: Float[Tensor, "n d_model"],
    resid_after: Float[Tensor, "n d_model"],
    targets: Int[Tensor, " n"],
) -> StateTops:
    """``top(r)``, ``p(target | r)``, ``top(y)``, ``top(o)`` of each row: ``model.readout`` of each state."""
    top_r, prob_r = readout_top(model, resid_before, targets)
    top_y, _ = readout_top(model, ffn_output)
    top_o, _ = readout_top(model, resid_after)
    return StateTops(top_r, prob_r, top_y, top_o)  # type: ignore[arg-type]  # prob_r is set: targets given
