"""The I/O types that the NBD codec, the wire (sockets) and the backends
share: what a buffer is, what a lost transport is, a file range to send with
sendfile(2), a pool of recycled payload buffers, and the flags of a block
status extent.

Rules:
- This module depends on nothing else in dstfs, so `dstfs.nbd` and
  `dstfs.backends` both import it and never each other for these types.
- Pure: no trio, no sockets; plain data types and small helpers.
"""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable

Buffer = bytes | bytearray | memoryview

#: Flags of a block status extent, as NBD's base:allocation has them: a hole
#: (not allocated) and reading as zeroes. Data is 0.
EXTENT_HOLE = 1 << 0
EXTENT_ZERO = 1 << 1


class ConnectionLost(OSError):
    """The transport to the storage broke; the request can be resent."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ECONNRESET, message)


class FileSlice:
    """Bytes of a file to send with sendfile(2), never copied through Python.
    Queued like a buffer; a short file reads as zeroes past its end."""

    __slots__ = ("count", "fd", "offset")

    def __init__(self, fd: int, offset: int, count: int) -> None:
        self.fd, self.offset, self.count = fd, offset, count

    def __len__(self) -> int:
        return self.count


class BufferPool:
    """Recycles payload buffers of the sizes a client keeps sending, to skip
    zero-filling a new bytearray for each. The owner gives a buffer back
    only once nothing refers to it any more."""

    def __init__(self, keep: int = 8, min_size: int = 64 * 1024) -> None:
        self._free: dict[int, list[bytearray]] = {}
        self.keep = keep
        self.min_size = min_size

    def take(self, n: int) -> bytearray:
        free = self._free.get(n)
        if free:
            return free.pop()
        return bytearray(n)

    def give(self, buf: bytearray) -> None:
        n = len(buf)
        if n >= self.min_size:
            free = self._free.setdefault(n, [])
            if len(free) < self.keep:
                free.append(buf)


def scatter(data: Buffer, views: list[memoryview]) -> None:
    """Copy `data` across `views`, in order."""
    mv = memoryview(data)
    pos = 0
    for v in views:
        v[:] = mv[pos : pos + len(v)]
        pos += len(v)


async def write_zero_bytes(
    pwrite: Callable[[int, Buffer], Awaitable[None]], offset: int, length: int
) -> None:
    """WRITE_ZEROES the slow way, for storage that cannot do it natively:
    zeroes written 1 MiB at a time."""
    zero = bytes(min(length, 1 << 20))
    end = offset + length
    while offset < end:
        n = min(len(zero), end - offset)
        await pwrite(offset, zero[:n])
        offset += n
