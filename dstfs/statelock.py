"""One daemon per state dir: an exclusive flock(2) on STATE_DIR/lock.

Rules:
- `dstfs mount` takes the lock before it reads or creates anything in the
  state dir, and hands the locked descriptor to the daemon it starts, which
  holds it for its lifetime. The kernel drops the lock when the last
  descriptor closes, so a daemon killed with -9 leaves no stale lock.
- The lock file is never removed (removing it would let two processes lock
  two different files of that name); it holds the pid and mount point of the
  holder, for the error message of the next one.
- Never blocks: a held lock is refused at once.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

LOCK_FILE = "lock"


class StateDirBusy(Exception):
    """The state dir is locked by a running daemon; str() says which."""


def acquire(state_dir: Path) -> int:
    """Create `state_dir` if needed and lock it; the locked descriptor
    (close-on-exec). StateDirBusy if a daemon holds it, OSError otherwise."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = _holder(fd)
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise StateDirBusy(
                f"{state_dir} is in use by {holder}; one daemon per state dir"
            ) from None
        raise
    return fd


def record(fd: int, pid: int, mountpoint: str | None) -> None:
    """Write who holds the lock into the lock file (for the next one's error);
    no `mountpoint` for a daemon run without FUSE."""
    mountpoint = mountpoint or "-"
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{pid} {mountpoint}\n".encode(), 0)


def _holder(fd: int) -> str:
    try:
        pid, _, mountpoint = os.pread(fd, 4096, 0).decode().strip().partition(" ")
        int(pid)
    except (OSError, ValueError, UnicodeDecodeError):
        return "another dstfs daemon"
    if mountpoint == "-":
        return f"the dstfs daemon {pid} (running without FUSE)"
    return f"the dstfs daemon {pid} (mounted on {mountpoint})" if mountpoint else f"pid {pid}"
