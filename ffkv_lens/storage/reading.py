"""Reading files back without trusting them: safetensors, CSV tables and manifest fields.

Everything a folder holds may be truncated, damaged or edited by hand. These readers turn every
such problem into a one-line :class:`~ffkv_lens.errors.DamagedFileError` naming the file, what is
wrong and the fix. Safetensors are read with ``safetensors.torch.load_file`` only: no pickle, so
reading someone else's folder runs no code.

Example:
    >>> import tempfile, pathlib
    >>> from ffkv_lens.storage.reading import field
    >>> field({"k": 5}, "k", int, "atlas/manifest.json", low=1)
    5
"""

import os
from pathlib import Path
from typing import Any

from ffkv_lens.errors import DamagedFileError

__all__ = ["DEFAULT_FIX", "check_columns", "check_tensor", "field", "int_list", "load_tensors", "read_table", "short"]

DEFAULT_FIX = "restore the file from a copy or write the folder again"

_KINDS = {
    int: "an integer",
    float: "a number",
    bool: "true or false",
    str: "a string",
    dict: "an object",
    list: "a list",
}


def short(value: Any, limit: int = 60) -> str:
    """``repr(value)`` on one line, cut to ``limit`` characters."""
    text = repr(value).replace("\n", "\\n")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is(value: Any, kind: type) -> bool:
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind)


def field(
    obj: Any,
    name: str,
    kind: type,
    path: str | os.PathLike,
    *,
    low: int | float | None = None,
    high: int | float | None = None,
    optional: bool = False,
    fix: str = DEFAULT_FIX,
) -> Any:
    """``obj[name]`` checked to be of ``kind`` (and within ``[low, high]``), else :class:`DamagedFileError`.

    Args:
        obj: The parsed JSON object (a ``dict``; anything else is itself reported as damage).
        name: The key; dotted names (``"settings.k"``) are only used in the message.
        kind: ``int`` (not bool), ``float`` (int or float), ``bool``, ``str``, ``dict`` or ``list``.
        path: The file, for the message.
        low: Smallest allowed number.
        high: Largest allowed number.
        optional: A missing key (or ``null``) gives ``None`` instead of an error.
        fix: What the user should do, for the message.
    """
    key = name.rsplit(".", 1)[-1]
    if not isinstance(obj, dict):
        raise DamagedFileError(f"{path}: expected an object holding {name!r}, found {short(obj)}; {fix}.")
    if obj.get(key) is None:
        if optional:
            return None
        raise DamagedFileError(f"{path}: {name!r} is missing; {fix}.")
    value = obj[key]
    if not _is(value, kind):
        raise DamagedFileError(f"{path}: {name!r} is {short(value)}, not {_KINDS[kind]}; {fix}.")
    if (low is not None and value < low) or (high is not None and value > high):
        span = f"from {low if low is not None else '-inf'} to {high if high is not None else 'inf'}"
        raise DamagedFileError(f"{path}: {name!r} is {short(value)}, outside {span}; {fix}.")
    return value


def int_list(obj: Any, name: str, path: str | os.PathLike, *, low: int = 0, fix: str = DEFAULT_FIX) -> list[int]:
    """``obj[name]`` as a list of distinct integers ``>= low``, else :class:`DamagedFileError`."""
    values = field(obj, name, list, path, fix=fix)
    bad = [v for v in values if not _is(v, int) or v < low]
    if bad:
        raise DamagedFileError(f"{path}: {name!r} holds {short(bad[0])}, not an integer >= {low}; {fix}.")
    if len(set(values)) != len(values):
        raise DamagedFileError(f"{path}: {name!r} repeats entries ({short(values)}); {fix}.")
    return list(values)


def load_tensors(path: str | os.PathLike, *, device: str = "cpu", fix: str = DEFAULT_FIX) -> dict[str, Any]:
    """Every tensor of a safetensors file (no pickle); a missing or damaged file is a :class:`DamagedFileError`."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise DamagedFileError(f"{path} is missing; {fix}.")
    try:
        return load_file(str(path), device=device)
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types, OSError and ValueError
        raise DamagedFileError(f"{path} is not a readable safetensors file ({short(str(err), 120)}); {fix}.") from None


def check_tensor(
    tensors: dict[str, Any],
    name: str,
    path: str | os.PathLike,
    *,
    shape: tuple[int | None, ...],
    kind: str,
    fix: str = DEFAULT_FIX,
) -> Any:
    """``tensors[name]`` checked for its number of dimensions, the given sizes (None: any) and ``kind``.

    Args:
        tensors: From :func:`load_tensors`.
        name: The tensor's name in the file.
        path: The file, for the message.
        shape: Expected sizes per dimension; ``None`` accepts any size.
        kind: ``"int"`` (a signed or unsigned integer dtype) or ``"float"`` (a floating dtype).
        fix: What the user should do, for the message.
    """
    if name not in tensors:
        raise DamagedFileError(f"{path} lacks the tensor {name!r}; {fix}.")
    tensor = tensors[name]
    ok_kind = tensor.dtype.is_floating_point if kind == "float" else not tensor.dtype.is_floating_point
    if kind == "int" and (tensor.dtype.is_complex or str(tensor.dtype) == "torch.bool"):
        ok_kind = False
    fits = tensor.dim() == len(shape) and all(
        want is None or got == want for got, want in zip(tensor.shape, shape, strict=False)
    )
    if not ok_kind or not fits:
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + f"] {kind}"
        raise DamagedFileError(
            f"{path}: tensor {name!r} is {list(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')}, "
            f"expected {want}; {fix}."
        )
    return tensor


def read_table(path: str | os.PathLike, *, fix: str = DEFAULT_FIX, **kwargs: Any) -> Any:
    """``pandas.read_csv(path, **kwargs)``; a missing, empty or malformed file is a :class:`DamagedFileError`."""
    import pandas as pd

    path = Path(path)
    try:
        return pd.read_csv(path, **kwargs)
    except FileNotFoundError:
        raise DamagedFileError(f"{path} is missing; {fix}.") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError, OSError) as err:
        raise DamagedFileError(f"{path} is not a readable CSV table ({short(str(err), 120)}); {fix}.") from None


def check_columns(
    frame: Any,
    path: str | os.PathLike,
    *,
    ints: tuple[str, ...] = (),
    numbers: tuple[str, ...] = (),
    strings: tuple[str, ...] = (),
    fix: str = DEFAULT_FIX,
) -> Any:
    """``frame``, after checking it has the columns: ``ints`` integer-valued, ``numbers`` numeric (or empty).

    Raises:
        DamagedFileError: A column is missing or holds a value of the wrong kind (named in the message).
    """
    import pandas as pd

    missing = [c for c in (*ints, *numbers, *strings) if c not in frame.columns]
    if missing:
        raise DamagedFileError(f"{path} lacks the columns {missing}; {fix}.")
    for column in (*ints, *numbers):
        values = pd.to_numeric(frame[column], errors="coerce")
        if column in ints:
            bad = frame[column][values.isna() | (values != values.round())]
        else:
            bad = frame[column][values.isna() & frame[column].notna()]
        if len(bad):
            kind = "integers" if column in ints else "numbers"
            raise DamagedFileError(f"{path}: column {column!r} holds {short(bad.iloc[0])}, not {kind} only; {fix}.")
        frame[column] = values
    return frame
