"""Many residual states read in the vocabulary at once: the readouts of section 5, exact and fast.

At every sampled position and layer, :func:`~ffkv_lens.analysis.dynamics.layer_dynamics` needs
``top(x) = argmax lens.readout(x)`` of the residual ``r`` before the FFN, the FFN output ``y`` and
``o = r + y``, and the probability of the final token under ``softmax(lens.readout(r))``.
:func:`state_tops` computes all four; two implementations share its signature:

- :func:`state_tops_reference`: ``lens.readout`` of each state, row chunks over the whole
  vocabulary, ``argmax`` and ``logsumexp`` (the definition, and the path of models whose readout
  is not a norm followed by a matrix, such as BERT's MLM head);
- :func:`state_tops_tiled`: the readout's steps (:class:`~ffkv_lens.adapters.tl_model.ReadoutParts`)
  over column tiles of ``W_U``: one matrix product per tile reads ``r`` and ``y`` of a block of
  rows together, the running argmax keeps the first maximum (the lowest token id, as ``argmax``),
  the log-sum-exp runs online, and ``o`` is mostly not read at all:

  ``readout(x) = soft_cap(norm(x) W_U + b_U)`` and ``norm(x) = beta + s(x) * g * c(x)`` (``c``:
  centring on LayerNorm models, identity on RMSNorm models), so with ``P(x) = norm(x) W_U + b_U``
  and ``B = P(0) = beta W_U + b_U``, ``o = r + y`` gives, exactly in real arithmetic,
  ``P(o) = a P(r) + b P(y) + (1 - a - b) B`` with ``a = s(o) / s(r)``, ``b = s(o) / s(y)``.
  The scales are read from the model's own norm (``s(x) = <norm(x) - beta, d> / <d, d>``,
  ``d = g * c(x)``) and every row is checked: ``norm(x) - beta == s(x) d`` for r, y and o,
  ``d(o) == d(r) + d(y)`` (tolerance ``NORM_FORM_RTOL``), and ``a + b <= DERIVE_LIMIT`` (a larger sum
  amplifies rounding). Rows that fail any check have their ``o`` read directly, in the same
  matrix product. This saves a third of the vocabulary products.

Both give the same tokens up to float32 rounding: a near-tie (two logits within a few ulp) may
resolve differently, as it may between any two batchings of the same matrix product. The
environment variable ``FFKV_LENS_KERNELS=reference`` forces the reference (read at every call).

Example:
    >>> tops = state_tops(lens, r, y, o, final_tokens)  # doctest: +SKIP
    >>> tops.top_o[:5], tops.prob_r[:5]  # doctest: +SKIP
"""

import logging
import os
from typing import Any, NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ffkv_lens.adapters import MemoryAdapter, as_adapter
from ffkv_lens.errors import ConfigError

__all__ = [
    "DERIVE_LIMIT",
    "EXP_FLOOR",
    "NORM_FORM_RTOL",
    "READOUT_BUDGET",
    "READOUT_ROWS",
    "VOCAB_TILE",
    "StateTops",
    "logsumexp_rows",
    "readout_top",
    "state_top",
    "state_tops",
    "state_tops_reference",
    "state_tops_tiled",
    "value_extremes",
]

log = logging.getLogger(__name__)

KERNELS_ENV = "FFKV_LENS_KERNELS"
# Floats held by one reference readout chunk (rows x d_vocab).
READOUT_BUDGET = 2**25
# Floats held by one chunk of value logits in value_extremes: 512 MiB, 512 Gemma 3 values per product
# ([rows, 640] @ [640, 262144] on the 2-core CPU, one session: 128 rows 83-102 GFLOP/s, 512 rows 120-125).
VALUE_BUDGET = 2**27
# Rows of each state per block of the tiled pass (the product reads 2 x READOUT_ROWS rows per tile) and
# vocabulary columns per tile, so that a tile of logits stays near the cache for the passes after the
# product. Measured on the 2-core CPU (r, y, o readouts of 4,096 rows): SmolLM2 110 GFLOP/s of products
# at 1024 x 2048 (96 at 1024 x 4096, 86 at 512 x 4096); Gemma 3 114 (110, 84; 118 at 2048 x 2048).
READOUT_ROWS = 1024
VOCAB_TILE = 2048
# exp(x) for x < -87.3 is a float32 denormal, which x86 computes ~5x slower; such terms add less than
# d_vocab * 1.7e-38 to a sum that is at least 1 (its largest term is exp(0)), far below one ulp.
EXP_FLOOR = -87.0
# Relative tolerance of the per-row checks that o may be derived from r and y.
NORM_FORM_RTOL = 1e-4
# Largest a + b for which o is derived (rounding in P(r), P(y) is amplified by about a + b).
DERIVE_LIMIT = 4.0


class StateTops(NamedTuple):
    """Readouts of ``n`` rows of r, y and o.

    Attributes:
        top_r: ``argmax lens.readout(r)``.
        prob_r: ``softmax(lens.readout(r))[target]``.
        top_y: ``argmax lens.readout(y)``.
        top_o: ``argmax lens.readout(o)``.
    """

    top_r: Int[Tensor, " n"]
    prob_r: Float[Tensor, " n"]
    top_y: Int[Tensor, " n"]
    top_o: Int[Tensor, " n"]


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


def value_extremes(lens: Any, layer: int) -> tuple[Int[Tensor, " d_mlp"], Int[Tensor, " d_mlp"]]:
    """Each value's top and bottom token under ``lens.value_logits`` (first index on ties), chunked over memories."""
    chunk = max(1, VALUE_BUDGET // lens.d_vocab)
    tops, bottoms = [], []
    for start in range(0, lens.d_mlp, chunk):
        logits = lens.value_logits(layer, memories=torch.arange(start, min(start + chunk, lens.d_mlp)))
        tops.append(logits.argmax(dim=-1))
        bottoms.append(logits.argmin(dim=-1))
        del logits
    return torch.cat(tops).cpu(), torch.cat(bottoms).cpu()


# -- reference ------------------------------------------------------------------------------------
def readout_top(
    lens: Any, states: Float[Tensor, "n d_model"], targets: Int[Tensor, " n"] | None = None
) -> tuple[Int[Tensor, " n"], Float[Tensor, " n"] | None]:
    """``argmax lens.readout(x)`` of each row, and the probability of ``targets`` when given."""
    chunk = max(1, READOUT_BUDGET // lens.d_vocab)
    tops, probs = [], []
    for start in range(0, states.shape[0], chunk):
        logits = lens.readout(states[start : start + chunk])
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16/fp16: softmax in fp32
        tops.append(logits.argmax(dim=-1))
        if targets is not None:
            picked = logits.gather(-1, targets[start : start + chunk, None].to(logits.device))[:, 0]
            probs.append((picked - logits.logsumexp(dim=-1)).exp())
    empty = torch.empty(0, dtype=torch.long)
    top = torch.cat(tops).cpu() if tops else empty
    return top, None if targets is None else (torch.cat(probs).cpu() if probs else empty.float())


def state_tops_reference(
    lens: Any,
    resid_before: Float[Tensor, "n d_model"],
    ffn_output: Float[Tensor, "n d_model"],
    resid_after: Float[Tensor, "n d_model"],
    targets: Int[Tensor, " n"],
) -> StateTops:
    """:func:`state_tops` by the definition: ``lens.readout`` of each state over the whole vocabulary."""
    top_r, prob_r = readout_top(lens, resid_before, targets)
    top_y, _ = readout_top(lens, ffn_output)
    top_o, _ = readout_top(lens, resid_after)
    return StateTops(top_r, prob_r, top_y, top_o)  # type: ignore[arg-type]  # prob_r is set: targets given


# -- tiled ----------------------------------------------------------------------------------------
class _Running:
    """Running maximum and its first index over column tiles (ties keep the earlier, lower id).

    ``amax`` is ~20x faster than ``argmax`` on the CPU, so the index is searched only in the rows
    whose maximum the tile raises (about ``ln(tiles)`` times per row).
    """

    def __init__(self, n: int, device: torch.device) -> None:
        self.best = torch.full((n,), -torch.inf, device=device)
        self.index = torch.zeros(n, dtype=torch.long, device=device)

    def update(self, tile: Tensor, offset: int) -> Tensor:
        """Fold in a tile; returns the previous maxima."""
        values = tile.amax(dim=-1)
        previous = self.best
        raised = (values > previous).nonzero().squeeze(1)
        if raised.numel():
            self.index[raised] = tile.index_select(0, raised).argmax(dim=-1) + offset
        self.best = torch.maximum(previous, values)
        return previous


def _direction(x: Tensor, gain: Tensor | None, centres: bool) -> Tensor:
    if centres:
        x = x - x.mean(dim=-1, keepdim=True)
    return x if gain is None else x * gain


def _scale(normed: Tensor, beta: Tensor, direction: Tensor) -> tuple[Tensor, Tensor]:
    """``s`` with ``normed - beta == s * direction`` per row, and whether that holds (``NORM_FORM_RTOL``)."""
    shifted = normed - beta
    den = (direction * direction).sum(dim=-1)
    s = torch.where(den > 0, (shifted * direction).sum(dim=-1) / den.clamp_min(torch.finfo(den.dtype).tiny), 0.0)
    miss = (shifted - s[:, None] * direction).norm(dim=-1)
    return s, miss <= NORM_FORM_RTOL * shifted.norm(dim=-1)


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    return torch.where(den != 0, num / torch.where(den != 0, den, 1.0), 0.0)


def _o_weights(parts: Any, gain: Tensor | None, centres: bool, beta: Tensor, r: Tensor, y: Tensor,
               o: Tensor) -> tuple[list[Tensor], Tensor, Tensor, Tensor]:  # fmt: skip
    """Normalised r, y and o, the weights a and b of ``P(o)``, and which rows must read o directly."""
    normed = [parts.norm(x) for x in (r, y, o)]
    directions = [_direction(x, gain, centres) for x in (r, y, o)]
    (s_r, ok_r), (s_y, ok_y), (s_o, ok_o) = (_scale(n, beta, d) for n, d in zip(normed, directions, strict=True))
    d_r, d_y, d_o = directions
    additive = (d_o - d_r - d_y).norm(dim=-1) <= NORM_FORM_RTOL * (d_r.norm(dim=-1) + d_y.norm(dim=-1))
    a, b = _ratio(s_o, s_r), _ratio(s_o, s_y)
    direct = ~(ok_r & ok_y & ok_o & additive & (a.abs() + b.abs() <= DERIVE_LIMIT))
    return normed, a, b, direct.nonzero().squeeze(1)


class _Readout(NamedTuple):
    parts: Any  # ReadoutParts
    gain: Tensor | None
    centres: bool
    beta: Tensor  # norm(0)
    base: Tensor | None  # P(0) = beta W_U + b_U, None when zero


def _block_tops(ro: _Readout, r: Tensor, y: Tensor, o: Tensor, targets: Tensor, tile: int) -> tuple[StateTops, int]:
    """One block of rows: :class:`StateTops` and the number of rows whose o was read directly."""
    n, dev = r.shape[0], r.device
    parts, base = ro.parts, ro.base
    (normed_r, normed_y, normed_o), a, b, direct = _o_weights(parts, ro.gain, ro.centres, ro.beta, r, y, o)
    stacked = torch.cat([normed_r, normed_y, normed_o[direct]])
    w_u, bias, cap = parts.unembedding, parts.bias, parts.soft_cap
    v = w_u.shape[1]
    width = min(tile, v)
    logits = torch.empty(stacked.shape[0], width, device=dev)
    derived, scratch = torch.empty(n, width, device=dev), torch.empty(n, width, device=dev)
    runs = {name: _Running(n, dev) for name in ("r", "y", "o")}
    total, picked = torch.zeros(n, device=dev), torch.zeros(n, device=dev)
    targets = targets.to(dev)
    for start in range(0, v, width):
        cols = min(width, v - start)
        out = logits[:, :cols]
        torch.mm(stacked, w_u[:, start : start + cols], out=out)
        if bias is not None:
            out.add_(bias[start : start + cols])
        p_r, p_y, p_o = out[:n], out[n : 2 * n], derived[:, :cols]
        torch.mul(p_r, a[:, None], out=p_o)
        p_o.addcmul_(p_y, b[:, None])
        if base is not None:
            p_o.addr_(1 - a - b, base[start : start + cols])
        if direct.numel():
            p_o.index_copy_(0, direct, out[2 * n :])
        if cap is not None:
            for part in (p_r, p_y, p_o):
                part.div_(cap).tanh_().mul_(cap)
        previous = runs["r"].update(p_r, start)
        best = runs["r"].best
        total = total * (previous - best).exp() + logsumexp_rows(p_r, best, scratch[:, :cols])
        inside = ((targets >= start) & (targets < start + cols)).nonzero().squeeze(1)
        picked[inside] = p_r[inside, targets[inside] - start]
        runs["y"].update(p_y, start)
        runs["o"].update(p_o, start)
    prob = (picked - runs["r"].best - total.log()).exp()
    tops = StateTops(runs["r"].index.cpu(), prob.cpu(), runs["y"].index.cpu(), runs["o"].index.cpu())
    return tops, int(direct.numel())


def _tileable_parts(adapter: MemoryAdapter) -> Any:
    """The adapter's ReadoutParts when the tiled pass applies (float32 weights), else None."""
    parts = adapter.readout_parts()
    return parts if parts is not None and parts.unembedding.dtype == torch.float32 else None


def state_tops_tiled(
    lens: Any,
    resid_before: Float[Tensor, "n d_model"],
    ffn_output: Float[Tensor, "n d_model"],
    resid_after: Float[Tensor, "n d_model"],
    targets: Int[Tensor, " n"],
    *,
    rows: int = READOUT_ROWS,
    tile: int = VOCAB_TILE,
) -> StateTops:
    """:func:`state_tops` over column tiles of ``W_U``, ``o`` derived from ``r`` and ``y`` (module docstring).

    Needs ``lens.adapter.readout_parts()``; ``rows`` and ``tile`` change speed and memory only.
    """
    adapter = as_adapter(lens)
    parts = _tileable_parts(adapter)
    if parts is None:
        raise ConfigError(
            "state_tops_tiled needs a float32 readout of the form norm, W_U, b_U (adapter.readout_parts()); "
            "this model has none: use state_tops_reference."
        )
    w_u = parts.unembedding
    beta = parts.norm(torch.zeros(1, w_u.shape[0], device=w_u.device, dtype=w_u.dtype))[0]
    base = None if parts.bias is None and not bool(beta.any()) else beta @ w_u
    if base is not None and parts.bias is not None:
        base = base + parts.bias
    ro = _Readout(parts, adapter.final_norm_gain(), adapter.final_norm_centres, beta, base)
    out: list[StateTops] = []
    direct = 0
    for start in range(0, resid_before.shape[0], rows):
        part = slice(start, start + rows)
        states = (x[part].to(w_u.device) for x in (resid_before, ffn_output, resid_after))
        block, read = _block_tops(ro, *states, targets[part], tile)
        out.append(block)
        direct += read
    if direct:
        log.debug("state readouts: o read directly at %d of %d rows", direct, resid_before.shape[0])
    if not out:
        empty = torch.empty(0, dtype=torch.long)
        return StateTops(empty, empty.float(), empty, empty)
    return StateTops(*(torch.cat(columns) for columns in zip(*out, strict=True)))


def state_top(lens: Any, states: Float[Tensor, "n d_model"], *, tile: int = VOCAB_TILE) -> Int[Tensor, " n"]:
    """``argmax lens.readout(x)`` of each row, over column tiles of ``W_U`` when the readout allows it.

    ``FFKV_LENS_KERNELS=reference`` (or a readout without parts) gives :func:`readout_top`.
    """
    parts = _tileable_parts(as_adapter(lens))
    if parts is None or os.environ.get(KERNELS_ENV, "").strip().lower() == "reference":
        return readout_top(lens, states)[0]
    w_u, bias, cap = parts.unembedding, parts.bias, parts.soft_cap
    tops = []
    for start in range(0, states.shape[0], 2 * READOUT_ROWS):
        normed = parts.norm(states[start : start + 2 * READOUT_ROWS].to(w_u.device))
        running = _Running(normed.shape[0], w_u.device)
        for col in range(0, w_u.shape[1], tile):
            logits = normed @ w_u[:, col : col + tile]
            if bias is not None:
                logits.add_(bias[col : col + tile])
            if cap is not None:
                logits.div_(cap).tanh_().mul_(cap)
            running.update(logits, col)
        tops.append(running.index.cpu())
    return torch.cat(tops) if tops else torch.empty(0, dtype=torch.long)


def state_tops(
    lens: Any,
    resid_before: Float[Tensor, "n d_model"],
    ffn_output: Float[Tensor, "n d_model"],
    resid_after: Float[Tensor, "n d_model"],
    targets: Int[Tensor, " n"],
) -> StateTops:
    """``top(r)``, ``p(target | r)``, ``top(y)``, ``top(o)`` of each row: tiled when the readout allows it.

    ``FFKV_LENS_KERNELS=reference`` forces :func:`state_tops_reference`.
    """
    if _tileable_parts(as_adapter(lens)) is None or os.environ.get(KERNELS_ENV, "").strip().lower() == "reference":
        return state_tops_reference(lens, resid_before, ffn_output, resid_after, targets)
    return state_tops_tiled(lens, resid_before, ffn_output, resid_after, targets)
