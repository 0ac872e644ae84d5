"""Exclusive ``flock`` locks on a file, taken without blocking: a lock another process holds is waited
for only as long as the caller allows, polling, so a stuck holder never hangs the caller.

``flock`` is POSIX; where it is missing (Windows) :func:`exclusive_lock` hands back the descriptor
unlocked and :data:`HAVE_FLOCK` is False: the caller decides what that means for it.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path
from typing import Optional

try:
    import fcntl
except ImportError:  # pragma: no cover - not on the platforms CI runs
    fcntl = None  # type: ignore[assignment]

HAVE_FLOCK = fcntl is not None
POLL_S = 0.05  # between tries while another process holds the lock
#: what ``flock`` answers when another descriptor holds the lock; any other error is the filesystem's
BUSY_ERRNOS = frozenset({errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES})


class LockUnsupportedError(OSError):
    """``flock`` failed for another reason than a lock held elsewhere: the filesystem does not support
    file locks (an NFS mount without its lock service, some FUSE or SMB mounts), or the descriptor is bad."""


def exclusive_lock(path: Path, patience_s: float = 0.0) -> Optional[int]:
    """A descriptor of ``path`` (made, with its folder, when missing) holding an exclusive ``flock`` on
    it, taken within ``patience_s`` (0: one try); None when another descriptor held it all that time.
    The lock lasts until the descriptor is closed or unlocked, in every process that inherits it.
    Raises ``OSError`` when the file cannot be made or opened, and :class:`LockUnsupportedError` (an
    ``OSError``) when ``flock`` fails for another reason than a lock held elsewhere: that is no busy lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(str(path), os.O_RDWR | os.O_CREAT, 0o644)
    if fcntl is None:  # pragma: no cover - Windows
        return fd
    deadline = time.monotonic() + patience_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except OSError as exc:
            if exc.errno not in BUSY_ERRNOS:
                os.close(fd)
                raise LockUnsupportedError(
                    exc.errno, f"cannot lock the file: {exc.strerror or exc} (does its filesystem support file "
                    "locks? an NFS mount without its lock service, some FUSE or SMB mounts do not)", str(path)
                ) from exc
            if time.monotonic() >= deadline:
                os.close(fd)
                return None
            time.sleep(POLL_S)
