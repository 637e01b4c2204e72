"""Many residual states read in the vocabulary at once (section 5): the tiled twin of the readouts.

The same results as :mod:`ffkv_lens.kernels.readouts` (the reference: the model's ``readout`` of every
state), computed from the readout's steps (:class:`~ffkv_lens.adapters.tl_model.ReadoutParts`) over
column tiles of ``W_U``: one matrix product per tile reads ``r`` and ``y`` of a block of rows together,
the running argmax keeps the first maximum (the lowest token id, as ``argmax``), the log-sum-exp runs
online, and ``o`` is mostly not read at all:

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
resolve differently, as it may between any two batchings of the same matrix product.
``model`` is a :class:`~ffkv_lens.MemoryLens` or its adapter; the adapter must have
``readout_parts()`` (float32), ``final_norm_gain()`` and ``final_norm_centres``.

Example:
    >>> tops = state_tops(lens, r, y, o, final_tokens, rows=512)  # doctest: +SKIP
"""

import logging
from typing import Any, NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ffkv_lens.errors import ConfigError
from ffkv_lens.kernels.readouts import StateTops, tileable_parts
from ffkv_lens.kernels.softmax import logsumexp_rows

__all__ = ["DERIVE_LIMIT", "NORM_FORM_RTOL", "READOUT_ROWS", "VOCAB_TILE", "state_top", "state_tops"]

log = logging.getLogger(__name__)
# Rows of each state per block of the tiled pass (the product reads 2 x READOUT_ROWS rows per tile) and
# vocabulary columns per tile, so that a tile of logits stays near the cache for the passes after the
# product; the sizes are the fastest of those measured by benchmarks/state_readouts.py (docs/dynamics.md).
READOUT_ROWS = 1024
VOCAB_TILE = 2048
# Relative tolerance of the per-row checks that o may be derived from r and y.
NORM_FORM_RTOL = 1e-4
# Largest a + b for which o is derived (rounding in P(r), P(y) is amplified by about a + b).
DERIVE_LIMIT = 4.0


def _parts(model: Any, what: str) -> Any:
    """The model's float32 ReadoutParts, or ConfigError naming ``what`` needs them."""
    parts = tileable_parts(model)
    if parts is None:
        raise ConfigError(
            f"the tiled {what} needs a float32 readout of the form norm, W_U, b_U (adapter.readout_parts()); "
            f"this model has none: use ffkv_lens.kernels.readouts.{what}."
        )
    return parts


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


def state_tops(
    model: Any,
    resid_before: Float[Tensor, "n d_model"],
    ffn_output: Float[Tensor, "n d_model"],
    resid_after: Float[Tensor, "n d_model"],
    targets: Int[Tensor, " n"],
    *,
    rows: int = READOUT_ROWS,
    tile: int = VOCAB_TILE,
) -> StateTops:
    """:func:`~ffkv_lens.kernels.readouts.state_tops` over column tiles of ``W_U``, ``o`` derived from ``r`` and ``y``.

    Needs the adapter's ``readout_parts()`` (module docstring); ``rows`` and ``tile`` change speed and memory only.
    """
    adapter = getattr(model, "adapter", model)
    parts = _parts(model, "state_tops")
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


def state_top(model: Any, states: Float[Tensor, "n d_model"], *, tile: int = VOCAB_TILE) -> Int[Tensor, " n"]:
    """``argmax readout(x)`` of each row over column tiles of ``W_U`` (``tile`` changes speed only)."""
    parts = _parts(model, "state_top")
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
