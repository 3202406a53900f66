"""The kernel's mount table and FUSE connections, read without touching a
mount point.

Rules: nothing here stats, opens or lists a path under a mount point: a
hung FUSE daemon would hang the caller, and the daemon itself would wait on
itself. The table comes from /proc/self/mountinfo; a FUSE connection is
/sys/fs/fuse/connections/MINOR, MINOR being the mount's device minor.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
from pathlib import Path

import attrs

log = logging.getLogger(__name__)

FUSECTL = Path("/sys/fs/fuse/connections")
#: The type of a dstfs mount in the table (the daemon mounts with subtype=dstfs).
DSTFS_FSTYPE = "fuse.dstfs"


@attrs.frozen
class Mount:
    device: str  # major:minor
    mountpoint: str
    fstype: str  # DSTFS_FSTYPE for ours
    source: str

    @property
    def minor(self) -> str:
        return self.device.partition(":")[2]

    @property
    def is_dstfs(self) -> bool:
        return self.fstype == DSTFS_FSTYPE

    @property
    def is_fuse(self) -> bool:
        return self.fstype == "fuse" or self.fstype.startswith("fuse.")


def _unescape(field: str) -> str:
    """Undo mountinfo's octal escapes (\\040 for a space, \\134 for \\)."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts() -> list[Mount]:
    """Every mount of this process's namespace, in mount order."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rest = left.split(), right.split()
            out.append(Mount(fields[2], _unescape(fields[4]), rest[0], _unescape(rest[1])))
    return out


def mount_at(path: str) -> Mount | None:
    """The topmost mount on `path` (an absolute path, symlinks resolved by
    the caller), or None if nothing is mounted there."""
    found = None
    for m in mounts():
        if m.mountpoint == path:
            found = m
    return found


def ensure_fusectl() -> None:
    """Mount the fusectl filesystem if it is not (root only; harmless else)."""
    with contextlib.suppress(OSError):
        if FUSECTL.is_dir() and not any(FUSECTL.iterdir()):
            subprocess.run(
                ["mount", "-t", "fusectl", "none", str(FUSECTL)], capture_output=True, check=False
            )


def abort_fuse(mount: Mount) -> bool:
    """Abort `mount`'s FUSE connection: every waiter gets ENOTCONN at once.
    False if that was not possible (not root, or no such connection)."""
    ensure_fusectl()
    try:
        (FUSECTL / mount.minor / "abort").write_text("1")
    except OSError as e:
        log.info("%s: cannot abort FUSE connection %s: %s", mount.mountpoint, mount.minor, e)
        return False
    return True
