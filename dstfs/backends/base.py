"""The backend interface: what a node needs from its storage.

Rules:
- Offsets and lengths are bytes. Callers stay inside [0, size).
- Failures are `OSError` with `errno` set, translated once here at the
  boundary (a backend never lets a raw exception of its transport escape).
- `ConnectionLost` (an OSError, in dstfs.iotypes) means the transport broke: the request may or
  may not have reached storage, and can be retried on a new connection. Any
  other OSError is the storage's answer to this request.
- A filter wraps a backend and passes through everything it does not change,
  like an nbdkit filter over a plugin.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from dstfs.iotypes import Buffer, scatter


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

    #: Whether `block_status(offset, length) -> list[(length, flags)]` is
    #: offered: extents from `offset` covering at least a prefix of the
    #: range, flags as dstfs.iotypes.EXTENT_* (0 is data). A backend that
    #: learns only later that its storage cannot (a server without
    #: base:allocation) sets it False then and raises EOPNOTSUPP.
    can_block_status: bool


async def read_into(backend: Backend, offset: int, views: list[memoryview]) -> None:
    """Read into `views` in order: in place where the backend offers
    `pread_into` (an optional method), else through `pread` and a copy."""
    direct = getattr(backend, "pread_into", None)
    if direct is not None:
        await direct(offset, views)
        return
    scatter(await backend.pread(offset, sum(len(v) for v in views)), views)


class BackendFilter:
    """Base for wrappers: every call goes to `inner` unless overridden."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.name = inner.name

    @property
    def size(self) -> int:
        return self.inner.size

    async def pread(self, offset: int, length: int) -> Buffer:
        return await self.inner.pread(offset, length)

    async def pread_into(self, offset: int, views: list[memoryview]) -> None:
        # Through this filter's pread, so a filter that changes reads is obeyed.
        scatter(await self.pread(offset, sum(len(v) for v in views)), views)

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
    def can_block_status(self) -> bool:
        return self.inner.can_block_status

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        return await self.inner.block_status(offset, length)  # type: ignore[attr-defined]

    def file_slice(self, offset: int, length: int) -> None:
        # Reads through a filter must pass its pread: no zero-copy shortcut
        # to the file underneath.
        return None

    def __getattr__(self, name: str) -> object:
        # Anything else (reconnect, read_only, ...) is the inner backend's.
        return getattr(self.inner, name)
