"""Saves killed with SIGKILL at chosen moments: the target stays complete, the next save sweeps.

Each save runs in a real subprocess that pauses (sleeps) at one point after touching an event
file; the test kills it there. Without ``renameat2`` (``fallback``) the swap is two renames.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ffkv_lens.storage import atomic_folder, recover_folder

N_FILES = 4
CHILD_TIMEOUT_S = 120

_CHILD = r"""
import os, sys, time
from pathlib import Path
from ffkv_lens.storage import atomic, atomic_folder, swap

target, point, event, mode = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4]


def pause(here):
    if here == point:
        event.touch()
        time.sleep(300)


if mode == "fallback":
    swap._RENAMEAT2 = None  # as on a system without renameat2
real_swap_in, real_rename = swap.swap_in, os.rename


def swap_in(new, tgt, old):
    pause("before-swap")
    previous = real_swap_in(new, tgt, old)
    pause("after-swap")
    return previous


def rename(src, dst):
    real_rename(src, dst)
    if Path(src) == target:
        pause("between-renames")


atomic.swap_in, os.rename = swap_in, rename
with atomic_folder(target) as tmp:
    for i in range(int(sys.argv[5])):
        (tmp / f"f{i}.txt").write_text("new")
        if i == 1:
            pause("writing")
"""


def _save(target: Path, version: str) -> None:
    with atomic_folder(target) as tmp:
        for i in range(N_FILES):
            (tmp / f"f{i}.txt").write_text(version)


def _version(target: Path) -> str:
    """The version every file of ``target`` holds; fails on a missing or half folder."""
    contents = {(target / f"f{i}.txt").read_text() for i in range(N_FILES)}
    assert len(contents) == 1 and sorted(p.name for p in target.iterdir()) == [f"f{i}.txt" for i in range(N_FILES)]
    return contents.pop()


def _start_paused(target: Path, point: str, mode: str, tmp_path: Path) -> subprocess.Popen:
    event = tmp_path / f"event-{point}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), *sys.path])}
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(target), point, str(event), mode, str(N_FILES)], env=env
    )
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while not event.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    if not event.exists():
        child.kill()
        pytest.fail(f"the child never reached {point!r} (exit code {child.poll()})")
    return child


def _kill(child: subprocess.Popen) -> None:
    os.kill(child.pid, signal.SIGKILL)
    child.wait(CHILD_TIMEOUT_S)


def _user_decoys(parent: Path) -> list[Path]:
    """Temporaries-lookalikes the program did not write; they must survive every sweep."""
    decoys = [
        parent / ".run.foo.tmp",  # not our token pattern
        parent / ".run.0123456789abcdef.tmp",  # our pattern, but no lock file owns it
        parent / ".run.fedcba9876543210.tmp",  # our pattern, with a lock file that is not our marker
        parent / ".run.fedcba9876543210.lock",
    ]
    for decoy in decoys[:3]:
        decoy.mkdir()
        (decoy / "user-data.txt").write_text("mine")
    decoys[3].write_text("a user's file")
    return decoys


@pytest.mark.parametrize(
    ("mode", "point", "expected"),
    [
        ("exchange", "writing", "old"),
        ("exchange", "before-swap", "old"),
        ("exchange", "after-swap", "new"),
        ("fallback", "writing", "old"),
        ("fallback", "before-swap", "old"),
        ("fallback", "between-renames", "new"),
        ("fallback", "after-swap", "new"),
    ],
    ids=lambda value: str(value),
)
def test_killed_save_leaves_complete_folder_and_is_swept(mode: str, point: str, expected: str, tmp_path: Path) -> None:
    parent = tmp_path / "runs"
    target = parent / "run"
    _save(target, "old")
    decoys = _user_decoys(parent)
    _kill(_start_paused(target, point, mode, tmp_path))

    stale = [p for p in parent.iterdir() if p != target and p not in decoys]
    assert stale, "the killed save left no temporary, so the sweep is not exercised"
    if point == "between-renames":
        assert not target.exists()  # the fallback's window: the previous folder is at .run.<token>.old
        assert sorted(p.suffix for p in stale) == [".lock", ".old", ".tmp"]
    assert _version(recover_folder(target)) == expected
    assert [p for p in parent.iterdir() if p != target and p not in decoys] == []

    _save(target, "third")
    assert _version(target) == "third"
    assert sorted(parent.iterdir()) == sorted([target, *decoys])
    assert all((d / "user-data.txt").read_text() == "mine" for d in decoys[:3])


def test_killed_save_leaves_target_complete_before_any_recovery(tmp_path: Path) -> None:
    target = tmp_path / "run"
    _save(target, "old")
    for point, expected in (("before-swap", "old"), ("after-swap", "new")):
        _kill(_start_paused(target, point, "exchange", tmp_path))
        assert _version(target) == expected  # a reader that never sweeps sees a complete folder


def test_a_live_save_is_not_swept(tmp_path: Path) -> None:
    target = tmp_path / "run"
    _save(target, "old")
    child = _start_paused(target, "writing", "exchange", tmp_path)
    try:
        live = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".run."))
        _save(target, "other")  # sweeps first: the paused child's lock is held
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".run.")) == live
        assert len(live) == 2  # its .lock and its half-written .tmp
    finally:
        _kill(child)
    assert _version(target) == "other"
    _save(target, "last")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["event-writing", "run"]
