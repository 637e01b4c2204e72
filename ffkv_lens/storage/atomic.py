"""Atomic writes: a reader (or a later run) never sees a half-written file or folder.

Files are written to a temporary name in the same folder, flushed to disk and renamed over
the target (``os.replace`` is atomic on POSIX). Folders are built under a temporary name,
every file and folder in it is flushed, and it is swapped in place of the target with an
atomic exchange where the OS has one (Linux ``renameat2``), so the target is at every instant
the complete old folder or the complete new one (see :mod:`ffkv_lens.storage.swap` for the
fallback). Temporaries of killed saves are swept by the next save (:mod:`ffkv_lens.storage.sweep`).
A write that runs out of space raises :class:`~ffkv_lens.errors.DiskFullError` and leaves
no temporary behind.

Example:
    >>> import tempfile, pathlib
    >>> from ffkv_lens.storage import atomic_write_json, read_json
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "x.json"
    >>> atomic_write_json(path, {"a": 1})
    >>> read_json(path)
    {'a': 1}
"""

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ffkv_lens.errors import DiskFullError, FfkvLensError
from ffkv_lens.storage.diskfull import disk_full_error, folder_bytes, is_disk_full
from ffkv_lens.storage.swap import fsync_dir, fsync_tree, remove_tree, swap_in
from ffkv_lens.storage.sweep import claim, sweep

__all__ = ["atomic_folder", "atomic_write_bytes", "atomic_write_json", "read_json", "recover_folder"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, rename).

    The file gets the permissions of an ordinary new file (``0o666`` less the umask), not the
    private ``0o600`` of the temporary file, so reports and tables can be shared.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            os.fchmod(handle.fileno(), 0o666 & ~_umask())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, Exception) and is_disk_full(exc):
            raise disk_full_error(path, len(data)) from exc
        raise
    with contextlib.suppress(OSError):
        fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file, with an error naming the file when it is missing or malformed."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FfkvLensError(f"{path} does not exist; was the folder written completely?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FfkvLensError(f"{path} is not valid JSON ({err}); the file is damaged.") from None


def recover_folder(target: str | os.PathLike) -> Path:
    """Sweep the temporaries of killed saves of ``target`` and restore it if one died mid-swap.

    Only needed where the atomic exchange is unavailable (then a save killed between its two
    renames leaves ``target`` missing and its previous folder at ``.NAME.<token>.old``); every
    :func:`atomic_folder` save of ``target`` does this first. Live saves are left alone.

    Args:
        target: The folder a reader is about to open.

    Returns:
        ``target``.
    """
    target = Path(target)
    sweep(target)
    return target


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike) -> Iterator[Path]:
    """Build a folder under a temporary name and swap it in at ``target`` when the block ends.

    Before the swap every file and folder written is fsynced; the swap is atomic where the OS
    has an exchange (Linux), so ``target`` is always a complete folder, the old or the new one.
    If the block raises, the temporary folder is removed and ``target`` is untouched. A save
    killed at any point leaves temporaries that the next save of ``target`` removes.

    Args:
        target: Final path of the folder (replaced if it exists).

    Yields:
        The temporary folder to write into.

    Raises:
        DiskFullError: If the filesystem or quota is full (nothing is left behind).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep(target)
    save = claim(target)
    tmp, old = save.sibling("tmp"), save.sibling("old")
    try:
        os.mkdir(tmp, 0o777)  # an ordinary folder's permissions (the umask applies)
        yield tmp
        fsync_tree(tmp)
        previous = swap_in(tmp, target, old)
        if previous is not None:
            remove_tree(previous)
    except BaseException as exc:
        written = folder_bytes(tmp)
        _undo(target, tmp, old)
        if isinstance(exc, Exception) and not isinstance(exc, DiskFullError) and is_disk_full(exc):
            raise disk_full_error(target, written, at_least=True) from exc
        raise
    finally:
        save.release()


def _undo(target: Path, tmp: Path, old: Path) -> None:
    """After a failed save: put the previous folder back if it was moved aside, drop the rest."""
    if not os.path.lexists(target) and old.is_dir():
        os.rename(old, target)
    remove_tree(tmp)
    remove_tree(old)
