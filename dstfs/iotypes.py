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

import contextlib
import errno
import mmap
import time
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

    def __str__(self) -> str:
        # The message says what broke ("...: send failed: Broken pipe"); an
        # "[Errno 104]" before it would name a reset that may not have been one.
        return self.strerror


class NotRetryable(OSError):
    """A connection attempt failed in a way that trying again will not heal
    (a server certificate that is not trusted, a client certificate the
    server refuses, TLS asked of a server without it): the node fails at
    once instead of reconnecting for ever."""


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


class PayloadPool:
    """Request payload buffers with a cap on the memory they may commit.

    Buffers are anonymous mappings rounded up to a power of two (a size
    class, from `min_class`): the kernel commits a page only once data is
    received into it, so a WRITE header whose payload never comes costs no
    memory, and a free buffer serves any request of its class. `take(n)`
    hands out a view of exactly n bytes, or None when the buffers out
    already reserve `cap` bytes (the caller waits for a `give`; one buffer
    is always granted, so any single request can proceed). Requests up to
    `small` bytes are never refused: a connection holds one at a time (or,
    serving requests concurrently, a bounded number: see nbd/server.py), so
    they are bounded by the connection limit, and a normal client is served
    while large payloads wait. Free buffers idle for `idle` seconds are
    unmapped by `trim()`, which gives their memory back to the system."""

    def __init__(
        self,
        cap: int = 256 << 20,
        small: int = 1 << 20,
        min_class: int = 64 << 10,
        keep: int = 4,
        idle: float = 2.0,
    ) -> None:
        self.cap, self.small, self.min_class = cap, small, min_class
        self.keep, self.idle = keep, idle
        #: Bytes reserved by large buffers handed out and not given back.
        self.reserved = 0
        #: Mapped bytes of every buffer out or free (what may be committed).
        self.mapped = 0
        self._free: dict[int, list[tuple[float, mmap.mmap]]] = {}

    def size_class(self, n: int) -> int:
        return max(self.min_class, 1 << (n - 1).bit_length())

    def take(self, n: int) -> memoryview | None:
        cls = self.size_class(n)
        large = n > self.small
        if large and self.reserved and self.reserved + cls > self.cap:
            return None
        free = self._free.get(cls)
        if free:
            buf = free.pop()[1]
        else:
            buf = mmap.mmap(-1, cls)
            self.mapped += cls
        if large:
            self.reserved += cls
        return memoryview(buf)[:n]

    def give(self, view: memoryview, reuse: bool = True) -> None:
        """Return a buffer from `take`; with `reuse`, nothing refers to it
        any more and it may be handed out again."""
        buf = view.obj
        assert isinstance(buf, mmap.mmap)
        cls, n = len(buf), len(view)
        with contextlib.suppress(BufferError):
            view.release()
        if n > self.small:
            self.reserved -= cls
        free = self._free.setdefault(cls, [])
        if reuse and len(free) < self.keep:
            free.append((time.monotonic(), buf))
        else:
            self.mapped -= cls  # unmapped once the last reference goes

    def trim(self, now: float | None = None) -> int:
        """Unmap free buffers idle for `idle` seconds; the bytes freed."""
        now = time.monotonic() if now is None else now
        freed = 0
        for free in self._free.values():
            while free and now - free[0][0] >= self.idle:
                buf = free.pop(0)[1]
                freed += len(buf)
                with contextlib.suppress(BufferError):  # else unmapped when unreferenced
                    buf.close()
        self.mapped -= freed
        return freed


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
