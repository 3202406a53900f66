"""A remote NBD export as a backend: one or more connections to one URI.

Rules:
- With several connections (only when the server advertises CAN_MULTI_CONN)
  each request goes to the connection with the fewest requests in flight, and
  a flush on one covers the writes acknowledged on all, as the spec promises.
- A broken connection surfaces as `ConnectionLost`; `reconnect()` replaces
  every connection (NBD_ESHUTDOWN from the server counts as a broken
  connection). Retrying, back-off and timeouts are the node's job.
- The reader tasks of the connections run in the nursery given at open.
- Block status (`can_block_status` when the server lists base:allocation)
  goes over one more connection, opened at the first `block_status()` call
  and again after it broke: the data connections keep simple replies. A
  server that does not accept that connection in STATUS_OPEN_TIMEOUT (one
  client at a time) loses the capability (EOPNOTSUPP).
"""

from __future__ import annotations

import errno
import logging

import trio

from dstfs.backends.base import BackendBase
from dstfs.iotypes import Buffer, ConnectionLost
from dstfs.nbd import protocol as P
from dstfs.nbd.client import NbdClient
from dstfs.uri import NodeSpec

log = logging.getLogger(__name__)

#: Seconds the block status connection may take to open: a server that takes
#: one client at a time (qemu-nbd's default) never answers it.
STATUS_OPEN_TIMEOUT = 10.0


class NbdBackend(BackendBase):
    can_reconnect = True
    concurrent_requests = True  # every request waits on the network

    def __init__(
        self, spec: NodeSpec, nursery: trio.Nursery, connections: int = 1, min_size: int = 0
    ) -> None:
        self.spec = spec
        self.name = spec.uri
        self.nursery = nursery
        self.connections = max(1, connections)
        self.min_size = min_size
        self._clients: list[NbdClient] = []
        self._size = 0
        self._offered = False
        self._status: NbdClient | None = None
        self._status_lock = trio.Lock()

    @classmethod
    async def open(
        cls, spec: NodeSpec, nursery: trio.Nursery, connections: int = 1, min_size: int = 0
    ) -> NbdBackend:
        backend = cls(spec, nursery, connections, min_size)
        await backend.reconnect()
        return backend

    async def reconnect(self) -> None:
        """(Re)open every connection; OSError if the server cannot be reached
        or no longer offers an export big enough."""
        self._drop_status()
        for c in self._clients:
            # One that the server is shutting down disconnects softly by
            # itself, letting its requests in flight finish first.
            if not c.shutting_down:
                c.abort()
        self._clients = []
        first = await NbdClient.connect(self.spec, self.nursery)
        clients = [first]
        try:
            if first.size < self.min_size:
                raise OSError(
                    errno.ENOSPC,
                    f"{self.name}: export has {first.size} bytes, the node needs {self.min_size}",
                )
            if first.flags & P.TransmissionFlag.CAN_MULTI_CONN:
                for _ in range(self.connections - 1):
                    clients.append(await NbdClient.connect(self.spec, self.nursery))
        except BaseException:
            for c in clients:
                c.abort()
            raise
        self._size = first.size
        self._clients = clients
        self._offered = first.block_status_offered

    @property
    def size(self) -> int:
        return self._size

    @property
    def can_block_status(self) -> bool:
        return self._offered

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        if not self._offered:
            raise OSError(errno.EOPNOTSUPP, f"{self.name}: the server offers no base:allocation")
        async with self._status_lock:
            client = self._status
            if client is None or client.lost is not None:
                client = await self._open_status()
                if client.meta_id is None:
                    client.abort()
                    self._offered = False
                    raise OSError(errno.EOPNOTSUPP, f"{self.name}: base:allocation refused")
                self._status = client
        return await client.block_status(offset, length)

    async def _open_status(self) -> NbdClient:
        with trio.move_on_after(STATUS_OPEN_TIMEOUT):
            return await NbdClient.connect(self.spec, self.nursery, block_status=True)
        # Such a server (qemu-nbd without --shared) will not take it later either.
        self._offered = False
        log.warning("%s: no second connection for block status; not asking again", self.name)
        raise OSError(
            errno.EOPNOTSUPP, f"{self.name}: block status connection not accepted in time"
        )

    def _drop_status(self) -> None:
        if self._status is not None:
            self._status.abort()
            self._status = None

    @property
    def read_only(self) -> bool:
        return bool(self._clients and self._clients[0].flags & P.TransmissionFlag.READ_ONLY)

    def _pick(self) -> NbdClient:
        clients = self._clients
        if len(clients) == 1:
            return clients[0]
        if not clients:
            raise ConnectionLost(f"{self.name}: not connected")
        return min(clients, key=lambda c: c.in_flight)

    async def pread(self, offset: int, length: int) -> Buffer:
        return await self._pick().pread(offset, length)

    async def pread_into(self, offset: int, views: list[memoryview]) -> None:
        await self._pick().pread_into(offset, views)

    async def pwrite(self, offset: int, data: Buffer, fua: bool = False) -> None:
        await self._pick().pwrite(offset, data, fua)

    async def flush(self) -> None:
        await self._pick().flush()

    async def trim(self, offset: int, length: int) -> None:
        await self._pick().trim(offset, length)

    async def write_zeroes(self, offset: int, length: int, may_trim: bool = True) -> None:
        await self._pick().write_zeroes(offset, length, may_trim)

    async def aclose(self) -> None:
        self._drop_status()
        clients, self._clients = self._clients, []
        for c in clients:
            await c.aclose()

    def abort(self) -> None:
        self._drop_status()
        clients, self._clients = self._clients, []
        for c in clients:
            c.abort()
