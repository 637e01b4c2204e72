"""Streaming top-k of the units that most activate each FFN key: the state and the pure-torch reference.

For every key (a column of the FFN hidden activation, ``d_mlp`` per layer) a :class:`TopKState` keeps the
``k`` units (sentences) with the largest peak coefficient, and the position of that peak. Batches of units
stream through :func:`update_topk`, which is :func:`reduce_units` followed by :func:`merge_topk`.

Ranking rule (exact and deterministic): value descending, then unit id ascending. Within a unit the peak
is the first valid position attaining the maximum. A unit whose maximum is ``-inf`` (no valid position,
or only ``-inf`` coefficients) gets value ``-inf`` and position ``-1`` and never enters a state; NaN
candidates never enter either. Unit ids must be non-negative and unique over the whole stream (and
across the two states given to :func:`merge_states`); a unit seen twice would be kept twice.

State layout (``d_mlp`` rows, ``k`` slots each, row-major and contiguous):

- ``values``: ``[d_mlp, k]`` in the state's float dtype (float32 by default); all comparisons are made
  in this dtype.
- ``units``: ``[d_mlp, k]`` int64 unit ids.
- ``positions``: ``[d_mlp, k]`` int64 token positions of each unit's peak (int64 like every torch index).

Each row is sorted by the ranking rule; empty slots hold ``(-inf, -1, -1)`` and sort last. Functions
may update a state in place: always use the state they return.

This module is the reference: the Triton kernels in :mod:`ffkv_lens.kernels.topk_triton` have the same
signatures and must return exactly the same tensors. :mod:`ffkv_lens.kernels` picks one by device.

Example:
    >>> import torch
    >>> from ffkv_lens.kernels.topk import TopKState, update_topk
    >>> state = TopKState.empty(d_mlp=3, k=2)
    >>> m = torch.tensor([[[0.0, 1.0, 2.0], [5.0, 1.0, 0.0]]])  # one unit, two positions
    >>> valid = torch.tensor([[True, True]])
    >>> state = update_topk(state, m, valid, unit_ids=torch.tensor([7]))
    >>> state.values[:, 0].tolist(), state.units[:, 0].tolist(), state.positions[:, 0].tolist()
    ([5.0, 1.0, 2.0], [7, 7, 7], [1, 0, 0])
"""

from typing import NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ffkv_lens.errors import ConfigError

__all__ = [
    "TopKState",
    "UnitPeaks",
    "batch_candidates",
    "merge_states",
    "merge_topk",
    "reduce_units",
    "update_topk",
    "update_topk_signed",
]

EMPTY_UNIT = -1
"""Unit id (and position) of an empty slot."""


class TopKState(NamedTuple):
    """The running top-k units of every key of one layer; rows sorted by the ranking rule.

    Attributes:
        values: Peak coefficient of each kept unit, ``-inf`` in empty slots.
        units: Unit id of each kept unit, ``-1`` in empty slots.
        positions: Position of each unit's peak, ``-1`` in empty slots.
    """

    values: Float[Tensor, "d_mlp k"]
    units: Int[Tensor, "d_mlp k"]
    positions: Int[Tensor, "d_mlp k"]

    @classmethod
    def empty(
        cls, d_mlp: int, k: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> "TopKState":
        """A state with every slot empty.

        Args:
            d_mlp: Number of keys (rows).
            k: Units kept per key, at least 1.
            device: Where the tensors live (default: torch's default device).
            dtype: Float dtype of ``values``; comparisons happen in it.

        Returns:
            The empty state.

        Raises:
            ConfigError: ``d_mlp < 0``, ``k < 1`` or a non-float ``dtype``.
        """
        if isinstance(d_mlp, bool) or not isinstance(d_mlp, int) or d_mlp < 0:
            raise ConfigError(f"d_mlp must be an int >= 0, got {d_mlp!r}; pass the layer's width.")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"k must be an int >= 1, got {k!r}; pass how many units to keep per key.")
        if not dtype.is_floating_point:
            raise ConfigError(f"dtype must be a float dtype, got {dtype}; use torch.float32 or torch.float64.")
        return cls(
            values=torch.full((d_mlp, k), float("-inf"), dtype=dtype, device=device),
            units=torch.full((d_mlp, k), EMPTY_UNIT, dtype=torch.int64, device=device),
            positions=torch.full((d_mlp, k), EMPTY_UNIT, dtype=torch.int64, device=device),
        )

    @property
    def d_mlp(self) -> int:
        """Number of keys (rows)."""
        return self.values.shape[0]

    @property
    def k(self) -> int:
        """Units kept per key (columns)."""
        return self.values.shape[1]

    def clone(self) -> "TopKState":
        """A deep copy (the functions here may update a state in place)."""
        return TopKState(self.values.clone(), self.units.clone(), self.positions.clone())


class UnitPeaks(NamedTuple):
    """Each unit's peak per key: the result of :func:`reduce_units`.

    Attributes:
        values: Maximum coefficient over the unit's valid positions, ``-inf`` if none.
        positions: First position attaining it, ``-1`` where the value is ``-inf``.
    """

    values: Float[Tensor, "batch d_mlp"]
    positions: Int[Tensor, "batch d_mlp"]


# -- argument checks (shared with the Triton implementation) ---------------------------------------
def check_state(state: TopKState, what: str = "state") -> None:
    """Raise :class:`ConfigError` unless ``state`` is a well-formed :class:`TopKState`."""
    if not isinstance(state, TopKState):
        raise ConfigError(f"{what} must be a TopKState, got {type(state).__name__}; build one with TopKState.empty.")
    v, u, p = state
    if v.ndim != 2 or v.shape[1] < 1 or u.shape != v.shape or p.shape != v.shape:
        raise ConfigError(
            f"{what} tensors must all be [d_mlp, k] with k >= 1, got values {tuple(v.shape)}, "
            f"units {tuple(u.shape)}, positions {tuple(p.shape)}; build one with TopKState.empty."
        )
    if not v.dtype.is_floating_point or u.dtype != torch.int64 or p.dtype != torch.int64:
        raise ConfigError(
            f"{what} dtypes must be (float, int64, int64), got ({v.dtype}, {u.dtype}, {p.dtype}); "
            "build one with TopKState.empty."
        )
    if not (v.device == u.device == p.device):
        raise ConfigError(f"{what} tensors are on different devices ({v.device}, {u.device}, {p.device}).")


def check_reduce_args(m: Tensor, valid: Tensor) -> None:
    """Raise :class:`ConfigError` unless ``m`` is ``[batch, pos, d_mlp]`` float and ``valid`` matches it."""
    if m.ndim != 3 or not m.dtype.is_floating_point:
        raise ConfigError(f"m must be a float [batch, pos, d_mlp] tensor, got {m.dtype} {tuple(m.shape)}.")
    if valid.dtype != torch.bool or tuple(valid.shape) != tuple(m.shape[:2]):
        raise ConfigError(
            f"valid must be a bool [batch, pos] = {tuple(m.shape[:2])} tensor, got {valid.dtype} "
            f"{tuple(valid.shape)}; pass attention_mask.bool() with excluded positions set to False."
        )
    if valid.device != m.device:
        raise ConfigError(f"valid is on {valid.device} but m is on {m.device}; move them to one device.")


def check_merge_args(state: TopKState, cand_values: Tensor, cand_positions: Tensor, unit_ids: Tensor) -> None:
    """Raise :class:`ConfigError` unless the candidates fit ``state`` (shapes, dtypes, devices)."""
    check_state(state)
    shape = (unit_ids.shape[0] if unit_ids.ndim == 1 else -1, state.d_mlp)
    if tuple(cand_values.shape) != shape or tuple(cand_positions.shape) != shape:
        raise ConfigError(
            f"candidates must be [batch, d_mlp] = {shape} (batch from unit_ids {tuple(unit_ids.shape)}, d_mlp "
            f"from the state), got values {tuple(cand_values.shape)} and positions {tuple(cand_positions.shape)}."
        )
    if unit_ids.dtype != torch.int64 or cand_positions.dtype != torch.int64:
        raise ConfigError(
            f"unit_ids and positions must be int64, got {unit_ids.dtype} and {cand_positions.dtype}; "
            "convert them with .long()."
        )
    devices = {state.values.device, cand_values.device, cand_positions.device, unit_ids.device}
    if len(devices) != 1:
        raise ConfigError(f"state and candidates must be on one device, got {sorted(map(str, devices))}.")


def check_update_args(state: TopKState, m: Tensor, valid: Tensor, unit_ids: Tensor) -> None:
    """Raise :class:`ConfigError` unless ``m``, ``valid`` and ``unit_ids`` fit ``state``."""
    check_state(state)
    check_reduce_args(m, valid)
    if m.shape[2] != state.d_mlp:
        raise ConfigError(f"m has d_mlp={m.shape[2]} but the state has d_mlp={state.d_mlp}; use this layer's state.")
    if unit_ids.dtype != torch.int64 or tuple(unit_ids.shape) != (m.shape[0],):
        raise ConfigError(
            f"unit_ids must be int64 [batch] = ({m.shape[0]},), got {unit_ids.dtype} {tuple(unit_ids.shape)}."
        )
    if unit_ids.device != m.device or state.values.device != m.device:
        raise ConfigError(
            f"m ({m.device}), unit_ids ({unit_ids.device}) and state ({state.values.device}) must share a device."
        )


def _check_unit_ids_nonnegative(unit_ids: Tensor) -> None:
    if unit_ids.numel() and int(unit_ids.min()) < 0:
        raise ConfigError(
            f"unit_ids must be >= 0 (-1 marks an empty slot), got minimum {int(unit_ids.min())}; number units from 0."
        )


def compare_dtype(m_dtype: torch.dtype, state_dtype: torch.dtype) -> torch.dtype:
    """The dtype in which units are reduced so that ranking in ``state_dtype`` is exact.

    A narrower ``m`` (bf16 into a float32 state) is reduced as is: widening is exact and keeps order. A
    wider ``m`` (float64 into a float32 state) is rounded first, so ties created by rounding resolve to
    the first position, as if the coefficients had been computed in the state's dtype.
    """
    return state_dtype if torch.promote_types(m_dtype, state_dtype) != state_dtype else m_dtype


# -- reference implementation ---------------------------------------------------------------------
def reduce_units(m: Float[Tensor, "batch pos d_mlp"], valid: Bool[Tensor, "batch pos"]) -> UnitPeaks:
    """Each unit's maximum over its valid positions and the first position attaining it.

    Args:
        m: Coefficients of a batch of right-padded units.
        valid: False at padding and excluded positions.

    Returns:
        ``UnitPeaks(values, positions)``; values in ``m``'s dtype, positions int64; ``(-inf, -1)`` for a
        unit whose maximum is ``-inf``.

    Raises:
        ConfigError: Mismatched shapes, dtypes or devices.
    """
    check_reduce_args(m, valid)
    batch, pos, d_mlp = m.shape
    if batch * pos * d_mlp == 0:
        return _no_peaks(batch, d_mlp, m.dtype, m.device)
    work = torch.float32 if m.dtype in (torch.float16, torch.bfloat16) else m.dtype
    inf = torch.tensor(float("inf"), dtype=work, device=m.device)
    cap = torch.where(valid, inf, -inf).unsqueeze(-1)
    masked = torch.minimum(m, cap)  # valid: m (exact), invalid: -inf; a float op, fast on CPU
    values = masked.amax(dim=1)
    if pos >= 1 / torch.finfo(work).eps or not bool((values < inf).all()):  # huge pos, +inf, NaN: slow path
        return _reduce_units_exact(m, valid)
    # First position of the maximum without a (slow) argmax: sign(masked - max) is 0 exactly at the
    # maxima and -1 elsewhere, so (pos - t) + (pos + 1) * sign is largest at the first maximum.
    shift = values.clamp_min(torch.finfo(work).min).unsqueeze(1)  # -inf rows stay -inf, not NaN
    rev = torch.arange(pos, 0, -1, dtype=work, device=m.device).view(1, pos, 1)
    sign = masked.sub_(shift).sign_()
    score = torch.add(rev, sign, alpha=pos + 1, out=sign).amax(dim=1)
    positions = (pos - score).to(torch.int64).masked_fill_(values == -inf, EMPTY_UNIT)
    return UnitPeaks(values.to(m.dtype), positions)


def _reduce_units_exact(m: Tensor, valid: Tensor) -> UnitPeaks:
    """Masked ``max(dim=1)``: slower, but exact for infinities and NaN too."""
    values, positions = m.masked_fill(~valid.unsqueeze(-1), float("-inf")).max(dim=1)
    return UnitPeaks(values, positions.masked_fill_(values == float("-inf"), EMPTY_UNIT))


def _no_peaks(batch: int, d_mlp: int, dtype: torch.dtype, device: torch.device) -> UnitPeaks:
    return UnitPeaks(
        torch.full((batch, d_mlp), float("-inf"), dtype=dtype, device=device),
        torch.full((batch, d_mlp), EMPTY_UNIT, dtype=torch.int64, device=device),
    )


def merge_topk(
    state: TopKState,
    cand_values: Float[Tensor, "batch d_mlp"],
    cand_positions: Int[Tensor, "batch d_mlp"],
    unit_ids: Int[Tensor, " batch"],
) -> TopKState:
    """Merge one candidate per (unit, key) into the top-k, in place.

    A candidate can only enter a row if it beats that row's k-th entry, so rows with no such candidate
    are not touched; when none passes (the usual case once the state is warm) this costs two small ops.

    Args:
        state: The running state (updated in place).
        cand_values: Each unit's peak per key (cast to the state's dtype).
        cand_positions: Position of each peak.
        unit_ids: Global unit ids, non-negative, unique over the stream.

    Returns:
        ``state``, updated.

    Raises:
        ConfigError: Mismatched shapes, dtypes or devices, or a negative unit id.
    """
    check_merge_args(state, cand_values, cand_positions, unit_ids)
    _check_unit_ids_nonnegative(unit_ids)
    if cand_values.shape[0] == 0:
        return state
    cand = cand_values.to(state.values.dtype)
    reach = torch.ge(cand, state.values[:, -1])  # necessary to pass: reach the k-th value
    if not bool(reach.any()):  # the warm fast path: nothing can enter
        return state
    rows = reach.any(dim=0).nonzero().squeeze(1)
    every_row = rows.numel() == state.d_mlp
    pick = (lambda t: t) if every_row else (lambda t: t.index_select(0, rows))
    values, units, positions = pick(state.values), pick(state.units), pick(state.positions)
    cand_rows = (cand if every_row else cand.index_select(1, rows)).T.contiguous()  # [rows, batch]
    kth_values, kth_units = values[:, -1:], units[:, -1:]
    passing = (cand_rows > kth_values) | ((cand_rows == kth_values) & (unit_ids < kth_units))
    cand_pos = (cand_positions if every_row else cand_positions.index_select(1, rows)).T
    merged = _insert_sorted(values, units, positions, cand_rows, unit_ids, cand_pos, passing)
    if every_row:
        for target, source in zip(state, merged, strict=True):
            target.copy_(source)
    else:
        for target, source in zip(state, merged, strict=True):
            target.index_copy_(0, rows, source)
    return state


def _insert_sorted(
    values: Tensor,
    units: Tensor,
    positions: Tensor,
    cand: Tensor,
    unit_ids: Tensor,
    cand_positions: Tensor,
    passing: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Merge the passing candidates into sorted rows: sort the few candidates, then binary searches.

    Each row ``(values, units)`` is sorted by the ranking rule. The candidates of a row are sorted
    the same way (by unit, then stably by value); non-passing ones become empty slots. Then each
    item's place in the merged row is its index in its own list plus the number of items of the
    other list strictly above it (two ``searchsorted``), and places ``>= k`` fall off. A candidate
    whose value equals a row entry's needs the unit ids to order them: such rows (rare) take the
    exact sort of :func:`_top_k_rows` instead. Every ``[rows, ...]`` input holds only rows that
    receive at least one candidate.
    """
    n_rows, k = values.shape
    batch = cand.shape[1]
    by_unit = torch.argsort(unit_ids)  # so that the stable sort below breaks value ties by unit
    keep = passing.index_select(1, by_unit)
    c_values = cand.index_select(1, by_unit).masked_fill(~keep, float("-inf"))
    c_units = unit_ids.index_select(0, by_unit).expand(n_rows, batch).masked_fill(~keep, EMPTY_UNIT)
    c_positions = cand_positions.index_select(1, by_unit).masked_fill(~keep, EMPTY_UNIT)
    order = torch.argsort(c_values, dim=1, descending=True, stable=True)
    c_values, c_units, c_positions = (t.gather(1, order) for t in (c_values, c_units, c_positions))
    # Rows are descending; their negations ascending, as searchsorted wants.
    row_up, cand_up = values.neg(), c_values.neg()
    above_cand = torch.searchsorted(row_up, cand_up, right=False)  # row entries strictly above each candidate
    tie = torch.searchsorted(row_up, cand_up, right=True) > above_cand
    if bool((tie & (c_values > float("-inf"))).any()):  # a candidate equals a row entry: exact sort
        merged = (torch.cat(pair, dim=1) for pair in ((values, c_values), (units, c_units), (positions, c_positions)))
        return _top_k_rows(*merged, k=k)
    above_entry = torch.searchsorted(cand_up, row_up, right=False)  # candidates strictly above each entry
    grid = torch.arange(max(k, batch), device=values.device)
    index = torch.cat([grid[:k] + above_entry, grid[:batch] + above_cand], dim=1)
    # Real items land on 0..(filled + passing - 1) one each; empty items (identical) may share places.
    out = []
    for old, new in ((values, c_values), (units, c_units), (positions, c_positions)):
        merged = torch.empty((n_rows, k + batch), dtype=old.dtype, device=old.device)
        out.append(merged.scatter_(1, index, torch.cat([old, new], dim=1))[:, :k])
    return out[0], out[1], out[2]


def update_topk(
    state: TopKState,
    m: Float[Tensor, "batch pos d_mlp"],
    valid: Bool[Tensor, "batch pos"],
    unit_ids: Int[Tensor, " batch"],
) -> TopKState:
    """Stream one batch of units into the top-k: :func:`reduce_units` then :func:`merge_topk`.

    When every unit's valid positions form one contiguous run (right padding, BOS excluded: the
    usual case) the maxima are taken over those runs without a mask, and peak positions are looked
    up only for the (unit, key) pairs that reach a row's k-th value (threshold gating). Otherwise it
    is literally :func:`reduce_units` then :func:`merge_topk`; both give the same state.

    Args:
        state: The layer's running state (updated in place).
        m: Coefficients of the batch, right-padded.
        valid: False at padding and excluded positions.
        unit_ids: Global unit ids of the batch, non-negative, unique over the stream.

    Returns:
        ``state``, updated.

    Raises:
        ConfigError: Mismatched shapes, dtypes or devices, or a negative unit id.
    """
    top, _ = batch_candidates(state, m, valid, unit_ids)
    return state if top is None else merge_topk(state, top[0], top[1], unit_ids)


def update_topk_signed(
    top: TopKState,
    bottom: TopKState,
    m: Float[Tensor, "batch pos d_mlp"],
    valid: Bool[Tensor, "batch pos"],
    unit_ids: Int[Tensor, " batch"],
) -> tuple[TopKState, TopKState]:
    """Update the top-k of ``m`` and of ``-m`` (the bottom-k) in one pass over the coefficients.

    Equal to ``update_topk(top, m, ...)`` and ``update_topk(bottom, -m, ...)``, without materialising
    ``-m``: each unit's minima and maxima are read from the same slice of ``m``.

    Args:
        top: The state of the largest coefficients (updated in place).
        bottom: The state of the most negative ones, holding negated values (updated in place).
        m: Coefficients of the batch, right-padded.
        valid: False at padding and excluded positions.
        unit_ids: Global unit ids of the batch, non-negative, unique over the stream.

    Returns:
        ``(top, bottom)``, updated.

    Raises:
        ConfigError: Mismatched shapes, dtypes or devices, or a negative unit id.
    """
    high, low = batch_candidates(top, m, valid, unit_ids, bottom)
    top = top if high is None else merge_topk(top, high[0], high[1], unit_ids)
    return top, bottom if low is None else merge_topk(bottom, low[0], low[1], unit_ids)


class Spans(NamedTuple):
    """Each unit's valid positions as one run ``[start, end)``, as lists and as tensors."""

    runs: list[tuple[int, int]]
    starts: Tensor
    ends: Tensor


def _spans(valid: Tensor) -> Spans | None:
    """Each row's valid positions as one ``[start, end)`` run, or None if some row has holes."""
    counts = valid.sum(dim=1)
    starts = valid.to(torch.uint8).argmax(dim=1)  # first valid position (0 for a row with none)
    ends = starts + counts
    grid = torch.arange(valid.shape[1], device=valid.device)
    runs = (grid >= starts.unsqueeze(1)) & (grid < ends.unsqueeze(1))
    if not bool(torch.equal(runs, valid)):
        return None
    return Spans(list(zip(starts.tolist(), ends.tolist(), strict=True)), starts, ends)


def _span_extremes(m: Tensor, spans: Spans, *, lowest: bool) -> tuple[Tensor | None, Tensor]:
    """Per unit and key, the minimum (if ``lowest``) and maximum over the unit's run.

    A unit with an empty run gets ``(+inf, -inf)``, so it never enters a state. NaN propagates
    (a NaN candidate never enters either).
    """
    batch, _, d_mlp = m.shape
    if len(set(spans.runs)) == 1:  # every run the same (full windows): one reduction for the batch
        start, end = spans.runs[0]
        if end > start:
            part = m[:, start:end]
            return (part.amin(dim=1) if lowest else None), part.amax(dim=1)
    high = torch.full((batch, d_mlp), float("-inf"), dtype=m.dtype, device=m.device)
    low = torch.full((batch, d_mlp), float("inf"), dtype=m.dtype, device=m.device) if lowest else None
    for row, (start, end) in enumerate(spans.runs):
        if end <= start:
            continue
        torch.amax(m[row, start:end], dim=0, out=high[row])
        if low is not None:
            torch.amin(m[row, start:end], dim=0, out=low[row])
    return low, high


def _all_first_positions(m: Tensor, valid: Tensor, spans: Spans, extreme: Tensor, sign: int) -> Tensor:
    """First position of every unit's ``extreme`` per key, for the whole batch.

    With one run shared by every unit and finite extremes, no mask is needed: ``sign(m - extreme)``
    is 0 exactly at the extremes and has one sign elsewhere, so ``(pos - t) - (pos + 1) * |sign|``
    is largest at the first extreme (the trick of :func:`reduce_units`, two passes fewer).
    Otherwise :func:`reduce_units` on ``sign * m``.
    """
    batch, pos, _ = m.shape
    start, end = spans.runs[0]
    uniform = len(set(spans.runs)) == 1 and end > start
    exact = m.dtype in (torch.float32, torch.float64) and pos < 1 / torch.finfo(m.dtype).eps  # rev is exact
    if not (uniform and exact) or not bool(extreme.isfinite().all()):
        return reduce_units(m if sign > 0 else m.neg(), valid).positions
    run = end - start
    off = torch.sub(m[:, start:end], extreme.unsqueeze(1)).abs_().sign_()  # 0 at the extremes, 1 elsewhere
    rev = torch.arange(run, 0, -1, dtype=m.dtype, device=m.device).view(1, run, 1)
    score = torch.add(rev, off, alpha=-(run + 1), out=off).amax(dim=1)
    return (run - score).to(torch.int64) + start


def gated_candidates(
    state: TopKState, m: Tensor, valid: Tensor, spans: Spans, extreme: Tensor, unit_ids: Tensor, sign: int
) -> tuple[Tensor, Tensor] | None:
    """Each unit's extreme coefficient per key, with its peak position only where it can enter.

    ``extreme`` is the maximum (``sign=1``) or minimum (``sign=-1``, the state then ranks
    ``-extreme``). Returns ``(values, positions)``, or None when no pair reaches a row's k-th value.
    Positions are looked up only for pairs that reach it (the first position of the unit's run
    holding the extreme); pairs that do not reach the row's k-th value get ``-inf`` (they can never enter, now or after
    later merges, which only raise the k-th value), so the candidates of several batches may be
    concatenated and merged at once with :func:`merge_topk`: the result is the same top-k.
    """
    _check_unit_ids_nonnegative(unit_ids)
    cand = (extreme if sign > 0 else extreme.neg()).to(state.values.dtype)
    reach = torch.ge(cand, state.values[:, -1])
    if not bool(reach.any()):  # the warm fast path
        return None
    if int(reach.sum()) * 8 > reach.numel():  # a cold state: most pairs reach, whole-tensor positions are cheaper
        return cand, _all_first_positions(m, valid, spans, extreme, sign)
    units, keys = reach.nonzero().unbind(dim=1)
    columns = m[units, :, keys]  # [pairs, pos]: each reaching pair's coefficients
    grid = torch.arange(m.shape[1], device=m.device)
    inside = (grid >= spans.starts[units, None]) & (grid < spans.ends[units, None])
    hit = (columns == extreme[units, keys, None]) & inside
    positions = torch.full(cand.shape, EMPTY_UNIT, dtype=torch.int64, device=m.device)
    positions[units, keys] = hit.to(torch.uint8).argmax(dim=1)  # argmax returns the first maximum
    return cand.masked_fill(~reach, float("-inf")), positions


def batch_candidates(
    state: TopKState, m: Tensor, valid: Tensor, unit_ids: Tensor, bottom: TopKState | None = None
) -> tuple[tuple[Tensor, Tensor] | None, tuple[Tensor, Tensor] | None]:
    """Candidates of one batch for ``state`` (and for ``bottom``, ranking ``-m``), to merge later.

    ``merge_topk(state, *top_candidates, unit_ids)`` then equals ``update_topk(state, m, valid,
    unit_ids)``; the candidates of several batches (against the same or an older state) can be
    concatenated along the batch and merged at once, which is cheaper on the CPU than a merge
    per batch while the states are still filling.

    Returns:
        ``(top, bottom)``: each ``(values [batch, d_mlp], positions [batch, d_mlp])`` or None when
        no pair can enter (``bottom`` is None when not asked).
    """
    check_update_args(state, m, valid, unit_ids)
    if bottom is not None:
        check_update_args(bottom, m, valid, unit_ids)
    if m.shape[0] == 0:
        return None, None
    m = m.to(compare_dtype(m.dtype, state.values.dtype))
    spans = _spans(valid)
    if spans is None:
        _check_unit_ids_nonnegative(unit_ids)
        high = reduce_units(m, valid)
        low = None if bottom is None else reduce_units(m.neg(), valid)
        return (high.values, high.positions), None if low is None else (low.values, low.positions)
    low, high = _span_extremes(m, spans, lowest=bottom is not None)
    top = gated_candidates(state, m, valid, spans, high, unit_ids, sign=1)
    return top, None if bottom is None else gated_candidates(bottom, m, valid, spans, low, unit_ids, sign=-1)


def merge_states(a: TopKState, b: TopKState) -> TopKState:
    """The exact top-k of the union of two states of the same shape (disjoint unit ids).

    Used to combine shards of a distributed run or a resumed run with its checkpoint. The result is a
    new state; ``a`` and ``b`` are not modified. The merge is associative and commutative.

    Args:
        a: One state.
        b: Another state with the same shape, dtypes and device.

    Returns:
        The merged state.

    Raises:
        ConfigError: The states differ in shape, dtype or device.
    """
    check_state(a, "a")
    check_state(b, "b")
    if a.values.shape != b.values.shape or a.values.dtype != b.values.dtype or a.values.device != b.values.device:
        raise ConfigError(
            f"states must share shape, dtype and device, got a {tuple(a.values.shape)} {a.values.dtype} "
            f"{a.values.device} and b {tuple(b.values.shape)} {b.values.dtype} {b.values.device}; "
            "merge states of the same layer built with the same k."
        )
    merged = (torch.cat([x, y], dim=1) for x, y in zip(a, b, strict=True))
    return TopKState(*_top_k_rows(*merged, k=a.k))


def _top_k_rows(values: Tensor, units: Tensor, positions: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """First ``k`` columns of each row after sorting by (value descending, unit ascending).

    One sort by value is exact unless two equal finite values compete for the first ``k + 1`` places
    (all ``-inf`` entries are empty slots, identical, so their order does not matter); then two stable
    sorts, by unit then by value, so that equal values keep the unit order.
    """
    order = torch.argsort(values, dim=1, descending=True)
    head = values.gather(1, order[:, : k + 1])
    if bool(((head[:, 1:] == head[:, :-1]) & (head[:, 1:] > float("-inf"))).any()):
        by_unit = torch.argsort(units, dim=1, stable=True)
        values, units, positions = (t.gather(1, by_unit) for t in (values, units, positions))
        order = torch.argsort(values, dim=1, descending=True, stable=True)
    order = order[:, :k]
    return values.gather(1, order), units.gather(1, order), positions.gather(1, order)
