"""Atomic writes: content, permissions, every file flushed, no temporary left behind on failure or a full disk."""

import errno
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ffkv_lens.errors import DiskFullError
from ffkv_lens.storage import atomic_folder, atomic_write_bytes, atomic_write_json, read_json


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_files_and_folders_get_ordinary_permissions(tmp_path) -> None:
    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "a.json", {"x": 1})
        with atomic_folder(tmp_path / "folder") as tmp:
            (tmp / "inside.txt").write_text("hi")
    finally:
        os.umask(old)
    assert read_json(tmp_path / "a.json") == {"x": 1}
    assert _mode(tmp_path / "a.json") == 0o644  # not mkstemp's 0o600: reports are meant to be shared
    assert _mode(tmp_path / "folder") == 0o755  # not mkdtemp's 0o700
    assert (tmp_path / "folder" / "inside.txt").read_text() == "hi"


def test_failed_write_leaves_old_content_and_no_temporary(tmp_path) -> None:
    target = tmp_path / "t.bin"
    atomic_write_bytes(target, b"old")
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["t.bin"]


def _synced_paths(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Patch ``os.fsync`` to record the path of every descriptor it flushes (then flush it)."""
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    return synced


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd to name a descriptor's file")
def test_atomic_folder_fsyncs_every_file_and_folder_before_the_swap(tmp_path, monkeypatch) -> None:
    target = tmp_path / "folder"
    with atomic_folder(target) as tmp:
        (tmp / "a.bin").write_bytes(b"a")
        (tmp / "sub" / "deeper").mkdir(parents=True)
        (tmp / "sub" / "b.json").write_text("{}")
        (tmp / "sub" / "deeper" / "c.txt").write_text("c")
        synced = _synced_paths(monkeypatch)  # only what the swap flushes, not the writes above
        written = [str(tmp / name) for name in ("a.bin", "sub", "sub/b.json", "sub/deeper", "sub/deeper/c.txt")]
        temporary = str(tmp)
    assert set(written) | {temporary} <= set(synced)
    assert synced.index(temporary) > max(synced.index(path) for path in written)  # the folder after its content
    assert str(tmp_path) in synced  # the parent, after the rename
    assert (target / "sub" / "deeper" / "c.txt").read_text() == "c"


def test_atomic_folder_replaces_an_existing_folder_and_leaves_nothing_else(tmp_path) -> None:
    target = tmp_path / "folder"
    for version in ("old", "new"):
        with atomic_folder(target) as tmp:
            (tmp / version).write_text(version)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]
    assert sorted(p.name for p in target.iterdir()) == ["new"]


def test_failed_folder_keeps_the_old_one_and_no_temporary(tmp_path) -> None:
    target = tmp_path / "folder"
    with atomic_folder(target) as tmp:
        (tmp / "old").write_text("old")
    with pytest.raises(KeyError), atomic_folder(target) as tmp:
        (tmp / "new").write_text("new")
        raise KeyError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]
    assert (target / "old").read_text() == "old"


# ---- disk full -----------------------------------------------------------------------------------


def _no_space(*_args: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_file_write_is_one_line_error_without_temporary(tmp_path, monkeypatch) -> None:
    target = tmp_path / "t.bin"
    atomic_write_bytes(target, b"old")
    monkeypatch.setattr(os, "fsync", _no_space)
    with pytest.raises(DiskFullError) as info:
        atomic_write_bytes(target, b"x" * 3000)
    message = str(info.value)
    assert "\n" not in message
    assert str(target) in message and "free there" in message and "2.9 KiB needed" in message
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["t.bin"]


def test_disk_full_folder_write_is_one_line_error_without_temporary(tmp_path) -> None:
    target = tmp_path / "folder"
    with atomic_folder(target) as tmp:
        (tmp / "old").write_text("old")
    with pytest.raises(DiskFullError) as info, atomic_folder(target) as tmp:
        (tmp / "part").write_bytes(b"x" * 2048)
        _no_space()
    message = str(info.value)
    assert "\n" not in message
    assert str(target) in message and "free there" in message and "at least 2.0 KiB needed" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]
    assert (target / "old").read_text() == "old"


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A real 64 KiB tmpfs (needs root and permission to mount; skipped otherwise)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a 64 KiB tmpfs needs root and the mount command")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"mount -t tmpfs is not permitted here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_real_full_filesystem(small_filesystem: Path) -> None:
    with pytest.raises(DiskFullError, match=r"KiB free there, 200\.0 KiB needed"):
        atomic_write_bytes(small_filesystem / "big.bin", b"x" * 200 * 1024)
    with (
        pytest.raises(DiskFullError, match=r"free there, at least \d+\.\d KiB needed"),
        atomic_folder(small_filesystem / "folder") as tmp,
    ):
        (tmp / "big.bin").write_bytes(b"x" * 200 * 1024)
    assert list(small_filesystem.iterdir()) == []
