"""Atomic writes: a reader (or a later run) never sees a half-written file or folder.

Files are written to a temporary name in the same folder, flushed to disk and renamed over
the target (``os.replace`` is atomic on POSIX). Folders are built under a temporary name and
swapped in with a rename; an older folder at the target is moved aside first and removed
after the swap.

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
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ffkv_lens.errors import FfkvLensError

__all__ = ["atomic_folder", "atomic_write_bytes", "atomic_write_json", "read_json"]


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


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
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


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


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike) -> Iterator[Path]:
    """Build a folder under a temporary name and move it to ``target`` when the block ends.

    If the block raises, the temporary folder is removed and ``target`` is untouched.

    Args:
        target: Final path of the folder (replaced if it exists).

    Yields:
        The temporary folder to write into.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    tmp.chmod(0o777 & ~_umask())  # an ordinary folder's permissions, not mkdtemp's private 0o700
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
        os.replace(target, old / "previous")
    os.replace(tmp, target)
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
