"""Which temporaries next to a folder are ours and dead, and putting a killed save's folder back.

Every :func:`~ffkv_lens.storage.atomic_folder` save of ``NAME`` claims a token first: it
creates ``.NAME.<token>.lock`` (16 hex digits, ``O_EXCL``), holds an exclusive ``flock`` on it
for the whole save and writes into it a JSON marker (pid, boot id, target name). Its
temporaries are ``.NAME.<token>.tmp`` (the folder being written) and, only in the two-rename
fallback, ``.NAME.<token>.old`` (the previous folder). The kernel drops the ``flock`` when
the process dies, however it dies, so a lock file whose lock can be taken belongs to a dead
save. :func:`sweep` removes the temporaries of dead saves only; a path without such a lock
file and marker (a user's ``.NAME.foo.tmp``, an older version's leftovers) is never touched.
"""

import contextlib
import json
import logging
import os
import re
import secrets
from pathlib import Path

from ffkv_lens.storage.swap import fsync_dir, remove_tree

__all__ = ["SaveClaim", "claim", "sweep"]

logger = logging.getLogger(__name__)

_MARKER_KEY = "ffkv_lens_atomic_folder"
_TOKEN = re.compile(r"[0-9a-f]{16}")

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no liveness test, so no sweeping
    fcntl = None  # type: ignore[assignment]


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


class SaveClaim:
    """A live save's token and its held lock file; :meth:`release` when the save is over."""

    def __init__(self, target: Path, token: str, fd: int) -> None:
        """Keep the claim (use :func:`claim`)."""
        self.target, self.token, self._fd = target, token, fd

    def sibling(self, suffix: str) -> Path:
        """``.NAME.<token>.<suffix>`` next to the target."""
        return self.target.with_name(f".{self.target.name}.{self.token}.{suffix}")

    def release(self) -> None:
        """Delete the lock file, then drop the lock (so no sweeper sees it unlocked first)."""
        with contextlib.suppress(FileNotFoundError):
            self.sibling("lock").unlink()
        os.close(self._fd)


def claim(target: Path) -> SaveClaim:
    """Claim a fresh token for a save of ``target``: create, lock and fill its lock file."""
    while True:
        token = secrets.token_hex(8)
        path = target.with_name(f".{target.name}.{token}.lock")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:  # pragma: no cover - 64 random bits collided
            continue
        break
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        marker = {_MARKER_KEY: 1, "target": target.name, "pid": os.getpid(), "boot_id": _boot_id()}
        os.write(fd, json.dumps(marker).encode("utf-8"))
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        raise
    return SaveClaim(target, token, fd)


def _is_our_marker(fd: int, target: Path) -> bool:
    try:
        marker = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get(_MARKER_KEY) == 1 and marker.get("target") == target.name


def _still_linked(fd: int, path: str) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
    except OSError:
        return False


def _recover(target: Path, claim_: SaveClaim) -> list[Path]:
    """Undo or finish a dead save of ``target``; return the temporaries removed."""
    tmp, old = claim_.sibling("tmp"), claim_.sibling("old")
    if not os.path.lexists(target) and old.is_dir():
        # Only the two-rename fallback makes ``old``, and only once ``tmp`` is complete and flushed:
        # finish the save with ``tmp`` if it is still there, else put the previous folder back.
        source = tmp if tmp.is_dir() else old
        logger.warning("Restoring %s from %s, left by a save that was killed mid-swap", target, source)
        os.rename(source, target)
        fsync_dir(target.parent)
    removed = [path for path in (tmp, old) if os.path.lexists(path)]
    for path in removed:
        logger.info("Removing %s, left by a killed save (its lock file has no live owner)", path)
        remove_tree(path)
    return removed


def sweep(target: Path) -> list[Path]:
    """Remove the temporaries of dead saves of ``target`` and restore it if one died mid-swap.

    Args:
        target: The folder whose siblings are examined (``.NAME.<token>.lock|tmp|old``).

    Returns:
        The temporaries removed.
    """
    if fcntl is None or not target.parent.is_dir():
        return []
    removed: list[Path] = []
    prefix = f".{target.name}."
    for entry in os.scandir(target.parent):
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(".lock") and _TOKEN.fullmatch(name[len(prefix) : -5])):
            continue
        try:
            fd = os.open(entry.path, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a live save holds it
            os.close(fd)
            continue
        dead = SaveClaim(target, name[len(prefix) : -5], fd)
        if not (_is_our_marker(fd, target) and _still_linked(fd, entry.path)):
            os.close(fd)  # not our marker, or released meanwhile: leave it alone
            continue
        removed += _recover(target, dead)
        dead.release()
    return removed
