"""Edits of memory coefficients, applied as TransformerLens hooks on ``mlp.hook_post``.

An :class:`Edit` names memories (one layer, one or several keys), an operation and the
positions it acts on. Because it changes the coefficients m at ``mlp.hook_post``, the change
flows through the rest of the layer's FFN output and every later layer.

Operations, for memory i at an edited position:

- ``zero``: m_i = 0 (ablation);
- ``scale``: m_i = s * m_i (``scale(1)`` changes nothing, bit for bit);
- ``set``: m_i = v (a clamp, e.g. LM-Debugger's "layer max + epsilon");
- ``mean``: m_i = mean_i, the memory's mean coefficient passed in (:func:`mean_coefficients`);
- ``add``: m_i = m_i + delta.

Positions: ``"all"`` (default), ``"last"`` (the last position of each forward pass), a tuple of
positions (negative counts from the end) or a ``slice``.

Example:
    >>> from ffkv_lens import Edit
    >>> Edit.zero(3, [7, 8]).to_dict()
    {'layer': 3, 'keys': [7, 8], 'op': 'zero', 'value': None, 'positions': 'all'}
    >>> Edit.scale(3, 7, 2.0, positions="last").describe()
    'scale 3:7 x2 at last'
"""

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from ffkv_lens.adapters.base import FwdHook, MemoryAdapter
from ffkv_lens.errors import ConfigError
from ffkv_lens.types import AttentionMask, Tokens

__all__ = [
    "OPERATIONS",
    "Edit",
    "edit_hooks",
    "intervene",
    "mean_coefficients",
    "parse_edit",
    "validate_edits",
]

OPERATIONS: tuple[str, ...] = ("zero", "scale", "set", "mean", "add")
Positions = Literal["all", "last"] | tuple[int, ...] | slice
_NEEDS_VALUE = {"scale": "factor s", "set": "coefficient v", "mean": "mean coefficient", "add": "delta"}


def _keys(keys: Any) -> tuple[int, ...]:
    chosen = (keys,) if isinstance(keys, int) else tuple(keys) if isinstance(keys, Iterable) else (keys,)
    if not chosen or not all(isinstance(k, int) and not isinstance(k, bool) for k in chosen):
        raise ConfigError(f"keys={keys!r}; pass a memory index or a non-empty list of them (integers).")
    return tuple(int(k) for k in chosen)


def _positions(positions: Any) -> Positions:
    if positions in ("all", "last") or isinstance(positions, slice):
        if isinstance(positions, slice) and not all(
            v is None or isinstance(v, int) for v in (positions.start, positions.stop, positions.step)
        ):
            raise ConfigError(f"positions={positions!r}; a slice of integers is allowed.")
        return positions
    if isinstance(positions, int) and not isinstance(positions, bool):
        return (positions,)
    if isinstance(positions, Iterable) and not isinstance(positions, str):
        chosen = tuple(positions)
        if chosen and all(isinstance(p, int) and not isinstance(p, bool) for p in chosen):
            return tuple(int(p) for p in chosen)
    raise ConfigError(f"positions={positions!r}; pass 'all', 'last', a list of positions or a slice.")


def _value(op: str, value: Any, n_keys: int) -> tuple[float, ...] | None:
    if op == "zero":
        if value is not None:
            raise ConfigError(f"op='zero' takes no value, got value={value!r}.")
        return None
    if value is None:
        raise ConfigError(f"op={op!r} needs a value (the {_NEEDS_VALUE[op]}), got None.")
    if isinstance(value, Tensor):
        value = value.reshape(-1).tolist()
    numbers = [value] if isinstance(value, int | float) else list(value) if isinstance(value, Iterable) else [value]
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in numbers):
        raise ConfigError(f"op={op!r}: value={value!r} must be a finite number or one per key.")
    if len(numbers) == 1:
        numbers = numbers * n_keys
    if len(numbers) != n_keys:
        raise ConfigError(f"op={op!r}: {len(numbers)} values for {n_keys} keys; pass one number or one per key.")
    return tuple(float(v) for v in numbers)


@dataclass(frozen=True)
class Edit:
    """An edit of the coefficients of some memories of one layer (see the module docstring).

    Args:
        layer: The layer.
        keys: A memory index or several.
        op: One of ``zero``, ``scale``, ``set``, ``mean``, ``add``.
        value: ``scale``: the factor; ``set``: the coefficient; ``mean``: the mean coefficient;
            ``add``: the delta; one number or one per key. ``zero``: ``None``.
        positions: ``"all"``, ``"last"``, positions (negative from the end) or a ``slice``.

    Raises:
        ConfigError: For an unknown operation, a missing or non-finite value, bad keys or positions.
    """

    # Annotated with what the constructor accepts; after construction ``keys`` is a tuple of
    # ints, ``value`` a tuple of floats (one per key) or None, ``positions`` "all", "last", a
    # tuple of ints or a slice.
    layer: int
    keys: int | Sequence[int]
    op: str = "zero"
    value: Any = None
    positions: Any = "all"

    def __post_init__(self) -> None:
        if self.op not in OPERATIONS:
            raise ConfigError(f"op={self.op!r} is not an operation; pass one of {list(OPERATIONS)}.")
        if not isinstance(self.layer, int) or isinstance(self.layer, bool):
            raise ConfigError(f"layer={self.layer!r}; pass a layer index (an integer).")
        keys = _keys(self.keys)
        object.__setattr__(self, "keys", keys)
        object.__setattr__(self, "value", _value(self.op, self.value, len(keys)))
        object.__setattr__(self, "positions", _positions(self.positions))

    def __hash__(self) -> int:
        return hash((self.layer, self.keys, self.op, self.value, _position_key(self.positions)))

    # -- constructors, one per operation (defined last: ``set`` would shadow the builtin above)
    @classmethod
    def zero(cls, layer: int, keys: int | Sequence[int], *, positions: Any = "all") -> "Edit":
        """Ablate memories: m = 0."""
        return cls(layer, keys, "zero", None, positions)

    @classmethod
    def scale(cls, layer: int, keys: int | Sequence[int], s: Any, *, positions: Any = "all") -> "Edit":
        """Boost or damp memories: m = s * m."""
        return cls(layer, keys, "scale", s, positions)

    @classmethod
    def add(cls, layer: int, keys: int | Sequence[int], delta: Any, *, positions: Any = "all") -> "Edit":
        """Shift memories: m = m + delta."""
        return cls(layer, keys, "add", delta, positions)

    @classmethod
    def mean(cls, layer: int, keys: int | Sequence[int], means: Any, *, positions: Any = "all") -> "Edit":
        """Mean-ablate memories: m = their mean coefficient (one number per key, see :func:`mean_coefficients`)."""
        return cls(layer, keys, "mean", means, positions)

    @classmethod
    def set(cls, layer: int, keys: int | Sequence[int], v: Any, *, positions: Any = "all") -> "Edit":
        """Clamp memories: m = v."""
        return cls(layer, keys, "set", v, positions)

    # -- JSON ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (a slice becomes ``{"start", "stop", "step"}``)."""
        pos = self.positions
        if isinstance(pos, slice):
            pos = {"start": pos.start, "stop": pos.stop, "step": pos.step}
        elif isinstance(pos, tuple):
            pos = list(pos)
        return {
            "layer": self.layer,
            "keys": list(self.keys),
            "op": self.op,
            "value": None if self.value is None else list(self.value) if len(set(self.value)) > 1 else self.value[0],
            "positions": pos,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Edit":
        """Inverse of :meth:`to_dict` (e.g. a browser request); bad fields raise :class:`ConfigError`."""
        if not isinstance(data, Mapping) or "layer" not in data or "keys" not in data:
            raise ConfigError(f"edit={data!r}; pass an object with layer, keys, op, value, positions.")
        pos = data.get("positions", "all")
        if isinstance(pos, Mapping):
            pos = slice(pos.get("start"), pos.get("stop"), pos.get("step"))
        return cls(data["layer"], data["keys"], data.get("op", "zero"), data.get("value"), pos)

    def describe(self) -> str:
        """One line, e.g. ``"scale 3:7 x2 at last"``."""
        keys = ",".join(map(str, self.keys))
        values = "" if self.value is None else ",".join(f"{v:g}" for v in dict.fromkeys(self.value))
        what = {
            "zero": "",
            "scale": f" x{values}",
            "set": f" ={values}",
            "mean": f" =mean {values}",
            "add": f" +{values}",
        }
        pos = self.positions
        where = pos if isinstance(pos, str) else f"{pos.start}:{pos.stop}:{pos.step}" if isinstance(pos, slice) else pos
        return f"{self.op} {self.layer}:{keys}{what[self.op]} at {where}"


def _position_key(positions: Positions) -> Any:
    return ("slice", positions.start, positions.stop, positions.step) if isinstance(positions, slice) else positions


def _may_overlap(a: Positions, b: Positions) -> bool:
    """Whether two position specs can name a common position (decided without the sequence length)."""
    if a == "all" or b == "all" or isinstance(a, slice) or isinstance(b, slice):
        return True
    if a == "last" or b == "last":
        other = b if a == "last" else a
        return other == "last" or -1 in other or any(p >= 0 for p in other)
    return bool(set(a) & set(b))


def validate_edits(adapter: MemoryAdapter, edits: "Edit | Iterable[Edit]") -> tuple[Edit, ...]:
    """Check edits against the model and each other; returns them as a tuple, exact duplicates dropped.

    Raises:
        ConfigError: A layer or key out of range (the value is named), an object that is not an
            :class:`Edit`, or two different edits that may act on the same memory at the same position.
    """
    chosen = [edits] if isinstance(edits, Edit) else list(edits)
    bad = [e for e in chosen if not isinstance(e, Edit)]
    if bad:
        raise ConfigError(f"edits must be ffkv_lens.Edit objects; got {bad[0]!r}.")
    out = tuple(dict.fromkeys(chosen))
    for edit in out:
        if not 0 <= edit.layer < adapter.n_layers:
            raise ConfigError(f"{edit.describe()}: layer {edit.layer} is out of range [0, {adapter.n_layers}).")
        wrong = [k for k in edit.keys if not 0 <= k < adapter.d_mlp]
        if wrong:
            raise ConfigError(
                f"{edit.describe()}: key {wrong[0]} is out of range [0, {adapter.d_mlp}) of layer {edit.layer}."
            )
    for i, a in enumerate(out):
        for b in out[i + 1 :]:
            shared = sorted(set(a.keys) & set(b.keys))
            if a.layer == b.layer and shared and _may_overlap(a.positions, b.positions):
                raise ConfigError(
                    f"contradictory edits of memory {a.layer}:{shared[0]}: {a.describe()!r} and {b.describe()!r} "
                    "may act on the same position; merge them into one edit or give them disjoint positions."
                )
    return out


def _position_index(positions: Positions, n_pos: int, device: torch.device) -> Tensor:
    if positions == "all":
        return torch.arange(n_pos, device=device)
    if positions == "last":
        return torch.tensor([n_pos - 1], device=device)
    if isinstance(positions, slice):
        return torch.arange(n_pos, device=device)[positions]
    wrong = [p for p in positions if not -n_pos <= p < n_pos]
    if wrong:
        raise ConfigError(f"position {wrong[0]} is outside a sequence of {n_pos} tokens.")
    return torch.tensor([p % n_pos for p in positions], device=device)


def _apply(m: Tensor, edit: Edit) -> None:
    """Apply one edit in place to coefficients ``[batch, pos, d_mlp]``."""
    pos = _position_index(edit.positions, m.shape[1], m.device)[:, None]
    keys = torch.tensor(edit.keys, device=m.device)[None, :]
    if edit.op == "zero":
        m[:, pos, keys] = 0
        return
    value = torch.tensor(edit.value, dtype=m.dtype, device=m.device)[None, :]
    if edit.op == "scale":
        m[:, pos, keys] = m[:, pos, keys] * value
    elif edit.op == "add":
        m[:, pos, keys] = m[:, pos, keys] + value
    else:  # set, mean
        m[:, pos, keys] = value.expand(pos.shape[0], -1)


def _layer_hook(layer_edits: Sequence[Edit]) -> Callable[[Tensor, Any], Tensor]:
    def edit(m: Tensor, hook: Any) -> Tensor:
        out = m.clone()
        for one in layer_edits:
            _apply(out, one)
        return out

    return edit


def edit_hooks(adapter: MemoryAdapter, edits: "Edit | Iterable[Edit]") -> list[FwdHook]:
    """``(hook_name, fn)`` pairs applying ``edits``, one per edited layer, for ``run_with_hooks``.

    Example:
        >>> hooks = edit_hooks(lens.adapter, [Edit.zero(2, [5, 9])])  # doctest: +SKIP
        >>> logits = model.run_with_hooks(tokens, fwd_hooks=hooks)  # doctest: +SKIP
    """
    by_layer: dict[int, list[Edit]] = {}
    for one in validate_edits(adapter, edits):
        by_layer.setdefault(one.layer, []).append(one)
    return [(adapter.hook_names(layer).coefficients, _layer_hook(group)) for layer, group in sorted(by_layer.items())]


@contextlib.contextmanager
def intervene(adapter: MemoryAdapter, edits: "Edit | Iterable[Edit]") -> Iterator[None]:
    """Within the block, every forward pass of the model runs under ``edits``.

    The hooks sit at a new level of the model's ``hooks()`` context: the user's own hooks stay
    (and fire first) and the edit hooks are removed on exit, after exceptions and KeyboardInterrupt too.

    Example:
        >>> with intervene(lens.adapter, [Edit.zero(2, 5)]):  # doctest: +SKIP
        ...     logits = model(tokens)
    """
    with adapter.hooks(edit_hooks(adapter, edits)):
        yield


def mean_coefficients(
    adapter: MemoryAdapter,
    tokens: Tokens,
    *,
    layers: int | Sequence[int] | None = None,
    attention_mask: AttentionMask | None = None,
    exclude_bos: bool = True,
) -> dict[int, Tensor]:
    """Each memory's mean coefficient over a token sample, ``{layer: [d_mlp]}``, for ``Edit.mean``.

    Padding (``attention_mask == 0``) and, with ``exclude_bos``, the BOS position are left out.
    """
    with torch.no_grad():
        coefficients = adapter.coefficients(tokens, layers=layers, attention_mask=attention_mask)
    keep = torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device)
    if attention_mask is not None:
        keep &= attention_mask.bool()
    if exclude_bos and adapter.bos_token_id is not None:
        keep[:, 0] &= tokens[:, 0] != adapter.bos_token_id
    if not keep.any():
        raise ConfigError("mean_coefficients() got no token to average over; pass a longer sample.")
    return {layer: m[keep.to(m.device)].double().mean(0).to(m.dtype) for layer, m in coefficients.items()}


_SPEC_HINT = "write LAYER:KEY[,KEY...] for --zero, LAYER:KEY[,KEY...]=NUMBER for --scale and --set"


def parse_edit(op: str, spec: str) -> Edit:
    """An edit from a command-line spec: ``parse_edit("zero", "3:7,9")``, ``parse_edit("scale", "3:7=2")``.

    Raises:
        ConfigError: One line naming the spec and the expected form.
    """
    memories, _, number = spec.partition("=")
    layer, sep, keys = memories.partition(":")
    try:
        if not sep or (op == "zero") == ("=" in spec):
            raise ValueError
        parsed_keys = [int(k) for k in keys.split(",")]
        value = None if op == "zero" else float(number)
        return Edit(int(layer), tuple(parsed_keys), op, value)
    except ValueError:
        raise ConfigError(f"--{op} {spec!r} is not a memory spec; {_SPEC_HINT}.") from None
