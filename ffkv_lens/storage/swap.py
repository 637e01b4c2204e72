"""Flushing a folder tree to disk and swapping it in place of another, atomically where the OS can.

On Linux the swap is ``renameat2(RENAME_EXCHANGE)`` (glibc 2.28+, ext4, xfs, btrfs, tmpfs, ...):
both names exist at every instant, so the target is always a complete folder, old or new. Where
that call or the filesystem's support is missing, :func:`swap_in` falls back to two renames
(target -> ``old``, new -> target); a crash between them leaves the target missing and the
previous folder complete at ``old``, which :func:`ffkv_lens.storage.recover_folder` puts back.
"""

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import shutil
from pathlib import Path

__all__ = ["exchange", "fsync_dir", "fsync_tree", "remove_tree", "swap_in"]

logger = logging.getLogger(__name__)

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
# errnos meaning "this kernel, libc or filesystem cannot exchange", not "this exchange failed".
_UNSUPPORTED = frozenset({errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV})


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entry list to disk (where the OS allows opening folders)."""
    if os.name != "posix":  # pragma: no cover - folders cannot be opened for fsync elsewhere
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush (fsync) every regular file and folder under ``folder``, deepest first and ``folder`` last.

    Links are not followed: their entries are flushed with the folder that holds them.
    """
    for root, _dirs, names in os.walk(folder, topdown=False):
        for name in names:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                _fsync_file(path)
        fsync_dir(Path(root))


def _load_renameat2() -> object | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_RENAMEAT2 = _load_renameat2()


def exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths atomically; ``False`` when this system cannot (nothing changed).

    Raises:
        OSError: If the exchange is supported but failed (e.g. a path vanished).
    """
    if _RENAMEAT2 is None:
        return False
    result = _RENAMEAT2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(first), None, str(second))


def swap_in(new: Path, target: Path, old: Path) -> Path | None:
    """Put the complete folder ``new`` at ``target``; return where the previous target now is.

    With an atomic exchange the previous target ends at ``new``'s name; with the two-rename
    fallback it ends at ``old``. ``None`` when there was no previous target.
    """
    parent = target.parent
    if not os.path.lexists(target):
        os.rename(new, target)
        fsync_dir(parent)
        return None
    if exchange(new, target):
        fsync_dir(parent)
        return new
    logger.debug("No atomic exchange for %s: swapping with two renames", target)
    os.rename(target, old)
    fsync_dir(parent)
    os.rename(new, target)
    fsync_dir(parent)
    return old


def remove_tree(path: Path) -> None:
    """Remove a folder we wrote (a plain file or link is unlinked, never followed)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
