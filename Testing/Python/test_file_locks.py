"""An exclusive lock another process holds is waited for only as long as the caller allows."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from SegAssistLib.file_locks import HAVE_FLOCK, exclusive_lock

pytestmark = pytest.mark.skipif(not HAVE_FLOCK, reason="flock is POSIX")

HOLDER = """
import sys, time
from pathlib import Path
from SegAssistLib.file_locks import exclusive_lock
fd = exclusive_lock(Path(sys.argv[1]))
print("held" if fd is not None else "busy", flush=True)
time.sleep(float(sys.argv[2]))
"""


def _hold(path: Path, seconds: float) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), str(seconds)], stdout=subprocess.PIPE,
                             text=True, cwd=str(Path(__file__).resolve().parents[2]))  # fmt: skip
    assert child.stdout is not None and child.stdout.readline().strip() == "held"
    return child


def test_a_lock_held_elsewhere_is_busy_and_taken_once_its_holder_ends(tmp_path: Path):
    path = tmp_path / "folder made" / ".lock"
    child = _hold(path, 1.0)
    try:
        started = time.monotonic()
        assert exclusive_lock(path, patience_s=0.2) is None  # busy: given up after the patience
        assert 0.2 <= time.monotonic() - started < 0.9
        fd = exclusive_lock(path, patience_s=30.0)  # the holder exits within a second: the lock is free then
        assert fd is not None
    finally:
        child.wait(timeout=30)
    os.close(fd)


def test_a_second_descriptor_of_the_same_process_conflicts(tmp_path: Path):
    """flock belongs to the open file description: two descriptors of one process exclude each other,
    which is what lets a watchdog thread lock a registry against its own process's writers."""
    first = exclusive_lock(tmp_path / ".lock")
    assert first is not None
    assert exclusive_lock(tmp_path / ".lock") is None
    os.close(first)
    second = exclusive_lock(tmp_path / ".lock")
    assert second is not None
    os.close(second)
