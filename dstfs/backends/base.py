"""The backend interface: what a node needs from its storage.

Rules:
- Offsets and lengths are bytes. Callers stay inside [0, size).
- Failures are `OSError` with `errno` set, translated once here at the
  boundary (a backend never lets a raw exception of its transport escape).
- `ConnectionLost` (an OSError, in dstfs.iotypes) means the transport broke: the request may or
  may not have reached storage, and can be retried on a new connection. Any
  other OSError is the storage's answer to this request.
- A backend declares what it can do (`read_only`, `can_reconnect`,
  `can_block_status`, `concurrent_requests`) and offers every method of the interface; BackendBase
  gives the plain answers (reads into caller buffers through `pread`, no
  file slices, no reconnect, no block status), so nobody probes with getattr.
- A filter wraps a backend and passes through everything it does not change,
  like an nbdkit filter over a plugin: reads into caller buffers too. A
  filter that changes reads overrides `pread_into` as well as `pread`; file
  slices (a zero-copy shortcut past the filter) are never passed through.
"""

from __future__ import annotations

import errno
from typing import Protocol, runtime_checkable

from dstfs.iotypes import Buffer, FileSlice, scatter


@runtime_checkable
class Backend(Protocol):
    #: For log messages: a URI or a path.
    name: str

    @property
    def size(self) -> int: ...

    async def pread(self, offset: int, length: int) -> Buffer: ...

    async def pwrite(self, offset: int, data: Buffer, fua: bool = False) -> None: ...

    async def flush(self) -> None: ...

    async def trim(self, offset: int, length: int) -> None: ...

    async def write_zeroes(self, offset: int, length: int, may_trim: bool = True) -> None: ...

    async def aclose(self) -> None: ...

    #: Writes, trims and zeroes are refused (EROFS).
    read_only: bool

    async def pread_into(self, offset: int, views: list[memoryview]) -> None:
        """Read into `views`, in order (each reply lands in place where it can)."""
        ...

    def file_slice(self, offset: int, length: int) -> FileSlice | None:
        """The bytes as a slice of a file, for sendfile(2); None if not a file."""
        ...

    #: Whether `reconnect()` can recover from ConnectionLost (a new connection).
    can_reconnect: bool

    async def reconnect(self) -> None: ...

    def abort(self) -> None:
        """Drop the connection now: requests in flight get ConnectionLost
        (a node's reply deadline); nothing for storage without one."""
        ...

    #: Whether `block_status(offset, length) -> list[(length, flags)]` is
    #: offered: extents from `offset` covering at least a prefix of the
    #: range, flags as dstfs.iotypes.EXTENT_* (0 is data). A backend that
    #: learns only later that its storage cannot (a server without
    #: base:allocation) sets it False then and raises EOPNOTSUPP.
    can_block_status: bool

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]: ...

    #: Whether requests gain from being served concurrently (they wait on
    #: something slow, like a network) rather than one at a time in order;
    #: the NBD server serves each connection accordingly.
    concurrent_requests: bool


class BackendBase:
    """The plain answers to the optional parts of the interface."""

    read_only = False
    can_reconnect = False
    can_block_status = False
    concurrent_requests = False

    async def pread(self, offset: int, length: int) -> Buffer:
        raise NotImplementedError

    async def pread_into(self, offset: int, views: list[memoryview]) -> None:
        scatter(await self.pread(offset, sum(len(v) for v in views)), views)

    def file_slice(self, offset: int, length: int) -> FileSlice | None:
        return None

    async def reconnect(self) -> None:
        raise OSError(errno.EOPNOTSUPP, "this storage cannot reconnect")

    def abort(self) -> None:
        pass

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        raise OSError(errno.EOPNOTSUPP, "no block status")


class BackendFilter:
    """Base for wrappers: every call goes to `inner` unless overridden."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.name = inner.name

    @property
    def size(self) -> int:
        return self.inner.size

    @property
    def read_only(self) -> bool:
        return self.inner.read_only

    async def pread(self, offset: int, length: int) -> Buffer:
        return await self.inner.pread(offset, length)

    async def pread_into(self, offset: int, views: list[memoryview]) -> None:
        await self.inner.pread_into(offset, views)

    async def pwrite(self, offset: int, data: Buffer, fua: bool = False) -> None:
        await self.inner.pwrite(offset, data, fua)

    async def flush(self) -> None:
        await self.inner.flush()

    async def trim(self, offset: int, length: int) -> None:
        await self.inner.trim(offset, length)

    async def write_zeroes(self, offset: int, length: int, may_trim: bool = True) -> None:
        await self.inner.write_zeroes(offset, length, may_trim)

    async def aclose(self) -> None:
        await self.inner.aclose()

    @property
    def can_reconnect(self) -> bool:
        return self.inner.can_reconnect

    async def reconnect(self) -> None:
        await self.inner.reconnect()

    def abort(self) -> None:
        self.inner.abort()

    @property
    def can_block_status(self) -> bool:
        return self.inner.can_block_status

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        return await self.inner.block_status(offset, length)

    @property
    def concurrent_requests(self) -> bool:
        return self.inner.concurrent_requests

    def file_slice(self, offset: int, length: int) -> FileSlice | None:
        # Reads through a filter pass its methods: no zero-copy shortcut to
        # the storage underneath.
        return None
