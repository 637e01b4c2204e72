"""Atomic writes: content, permissions of an ordinary file, no temporary left behind on failure."""

import os
import stat

import pytest

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
