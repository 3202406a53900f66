#!/usr/bin/env python3
"""Minimal pyfuse3 filesystem: one in-memory file ``disk.img``, the Python ceiling for the bench.

The root directory holds a single regular file ``disk.img`` whose bytes live in a ``bytearray``
of the size given on the command line. Reads return ``memoryview`` slices, writes copy into the
buffer, ``fsync`` returns at once. It does no other work, so anything a real pyfuse3 backend
costs on top of this row is the backend's own.

Usage: ``noop_fs.py MOUNTPOINT SIZE`` (SIZE in bytes, or with a K/M/G suffix, powers of 1024).
Runs in the foreground until unmounted (``fusermount3 -u MOUNTPOINT``) or sent SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import errno
import functools
import logging
import os
import signal
import stat
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pyfuse3
import trio

log = logging.getLogger("noop_fs")

FILE_NAME = b"disk.img"
FILE_INODE = pyfuse3.ROOT_INODE + 1
MAX_TASKS = 64

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def parse_size(text: str) -> int:
    """Parse ``123``, ``64K``, ``512M`` or ``1G`` (powers of 1024) into bytes."""
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = 1
    for suffix, factor in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30), ("T", 1 << 40)):
        if text.endswith(suffix):
            text, mult = text[:-1], factor
            break
    value = int(text) * mult
    if value <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return value


def guarded(fn: F) -> F:
    """Turn any exception other than FUSEError escaping a handler into FUSEError(EIO).

    An exception other than FUSEError leaving a handler would end pyfuse3.main and leave the
    request unanswered.
    """

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except Exception:
            log.exception("handler %s failed", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


class NoopFS(pyfuse3.Operations):
    """One file, ``disk.img``, backed by a bytearray; every other name is ENOENT."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.data = bytearray(size)
        self.view = memoryview(self.data)
        self.size = size
        self.mtime_ns = time.time_ns()

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.generation = 0
        attr.entry_timeout = 300
        attr.attr_timeout = 300
        if inode == pyfuse3.ROOT_INODE:
            attr.st_mode = stat.S_IFDIR | 0o755
            attr.st_nlink = 2
            attr.st_size = 0
        elif inode == FILE_INODE:
            attr.st_mode = stat.S_IFREG | 0o644
            attr.st_nlink = 1
            attr.st_size = self.size
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        attr.st_uid = os.getuid()
        attr.st_gid = os.getgid()
        attr.st_blksize = 4096
        attr.st_blocks = (attr.st_size + 511) // 512
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = self.mtime_ns
        return attr

    @guarded
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._attr(inode)

    @guarded
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        if parent_inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name in (b".", b".."):
            return self._attr(pyfuse3.ROOT_INODE)
        if name != FILE_NAME:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(FILE_INODE)

    @guarded
    async def setattr(
        self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        if fields.update_size and inode == FILE_INODE and attr.st_size != self.size:
            raise pyfuse3.FUSEError(errno.EPERM)
        return self._attr(inode)

    @guarded
    async def opendir(self, inode: int, ctx: Any) -> int:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @guarded
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        if start_id == 0:
            pyfuse3.readdir_reply(token, FILE_NAME, self._attr(FILE_INODE), 1)

    @guarded
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if inode != FILE_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        return pyfuse3.FileInfo(fh=inode)

    @guarded
    async def read(self, fh: int, off: int, size: int) -> Any:
        if off >= self.size:
            return b""
        return self.view[off : min(off + size, self.size)]

    @guarded
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        if off + len(buf) > self.size:
            raise pyfuse3.FUSEError(errno.ENOSPC)
        self.view[off : off + len(buf)] = buf
        return len(buf)

    @guarded
    async def flush(self, fh: int) -> None:
        return None

    @guarded
    async def fsync(self, fh: int, datasync: bool) -> None:
        return None

    @guarded
    async def release(self, fh: int) -> None:
        return None

    @guarded
    async def releasedir(self, fh: int) -> None:
        return None

    @guarded
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        st = pyfuse3.StatvfsData()
        st.f_bsize = st.f_frsize = 4096
        st.f_blocks = self.size // 4096
        st.f_bfree = st.f_bavail = 0
        st.f_files = 2
        st.f_ffree = st.f_favail = 0
        st.f_namemax = 255
        return st


async def run(ops: NoopFS) -> None:
    """Serve until unmounted or until SIGTERM/SIGINT, which end the main loop cleanly."""
    async with trio.open_nursery() as nursery:

        async def watch_signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log.info("signal %d: terminating", signum)
                    pyfuse3.terminate()
                    return

        nursery.start_soon(watch_signals)
        await pyfuse3.main(min_tasks=1, max_tasks=MAX_TASKS)
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mountpoint")
    parser.add_argument("size", type=parse_size, help="file size, e.g. 1G or 67108864")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s noop_fs %(levelname)s %(message)s",
    )
    ops = NoopFS(args.size)
    options = set(pyfuse3.default_options)
    options.add("fsname=noop_fs")
    pyfuse3.init(ops, args.mountpoint, options)
    try:
        trio.run(run, ops)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
