"""Turning "no space left on device" into one :class:`~ffkv_lens.errors.DiskFullError` line.

Example:
    >>> import errno
    >>> is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    True
    >>> is_disk_full(ValueError("bad"))
    False
"""

import errno
import os
from pathlib import Path

from ffkv_lens.errors import DiskFullError

__all__ = ["disk_full_error", "folder_bytes", "format_bytes", "free_bytes", "is_disk_full"]

_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# How libraries that wrap the OS error (safetensors' Rust IoError, torch's stream writer) spell it.
_FULL_TEXTS = ("no space left on device", "disk quota exceeded", "os error 28", "os error 122", "storagefull")


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) says the filesystem or quota is full."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _FULL_ERRNOS:
            return True
        if any(text in str(current).lower() for text in _FULL_TEXTS):
            return True
        current = current.__cause__ or current.__context__
    return False


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free bytes on the filesystem holding ``path`` (its nearest existing ancestor), if readable."""
    current = Path(path).absolute()
    while not current.exists() and current != current.parent:
        current = current.parent
    try:
        return int(os.statvfs(current).f_bavail * os.statvfs(current).f_frsize)
    except OSError:
        return None


def folder_bytes(folder: Path) -> int:
    """Total size of the regular files under ``folder`` (0 when it is gone)."""
    total = 0
    for root, _dirs, names in os.walk(folder):
        for name in names:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue
    return total


def format_bytes(count: int | None) -> str:
    """``123456789`` -> ``"117.7 MiB"``; ``None`` -> ``"an unknown amount"``."""
    if count is None:
        return "an unknown amount"
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"  # pragma: no cover - the loop always returns


def disk_full_error(path: str | os.PathLike, needed: int | None, *, at_least: bool = False) -> DiskFullError:
    """The one-line error for a write to ``path`` that ran out of space.

    Args:
        path: What was being written.
        needed: Bytes the write needs, or ``None`` when unknown.
        at_least: ``needed`` is only a lower bound (what was written before the failure).

    Returns:
        The error, ready to raise (``raise disk_full_error(...) from exc``).
    """
    free = format_bytes(free_bytes(Path(path).parent))
    if needed is None:
        need = "the space needed is not known"
    else:
        need = f"{'at least ' if at_least else ''}{format_bytes(needed)} needed"
    return DiskFullError(
        f"No space left on the filesystem (or quota) holding {path}: {free} free there, {need}; "
        "nothing half-written was kept. Free some space there (or write elsewhere) and run again."
    )
