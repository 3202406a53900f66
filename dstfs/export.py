"""The mounted array as an NBD export (`dstfs mount --export ADDR`).

Rules:
- A request through the export is an array request like one through
  disk.img: the same map, suspend, migration, mirror and failover rules.
- FLUSH and FUA reach every node (Array.flush); TRIM and WRITE_ZEROES both
  become zeroes on every node that holds the range, so replicas of a mirror
  read the same afterwards.
- Block status is passed through where the array is one node, or a mirror,
  and that node (the first in-sync replica) answers it; otherwise the export
  does not offer it.
- The backend never closes the array: the daemon does, after the server.
"""

from __future__ import annotations

import errno

from dstfs.array import Array
from dstfs.backends.base import BackendBase
from dstfs.iotypes import Buffer


class ArrayBackend(BackendBase):
    """The array seen through the Backend interface, for the NBD server."""

    def __init__(self, array: Array) -> None:
        self.array = array
        self.name = f"array {array.name}"

    @property
    def size(self) -> int:
        return self.array.size

    async def pread(self, offset: int, length: int) -> Buffer:
        return await self.array.read(offset, length)

    async def pread_into(self, offset: int, views: list[memoryview]) -> None:
        for view in views:
            n = await self.array.readinto(offset, view)
            if n < len(view):
                raise OSError(errno.EINVAL, "read past the end of the disk")
            offset += n

    async def pwrite(self, offset: int, data: Buffer, fua: bool = False) -> None:
        await self.array.write(offset, data)
        if fua:
            await self.array.flush()

    async def flush(self) -> None:
        await self.array.flush()

    async def trim(self, offset: int, length: int) -> None:
        await self.array.write_zeroes(offset, length)

    async def write_zeroes(self, offset: int, length: int, may_trim: bool = True) -> None:
        await self.array.write_zeroes(offset, length)

    def _status_node(self):  # type: ignore[no-untyped-def]
        a = self.array
        if a.replicas is not None:
            good = [r.node for r in a.replicas.replicas if r.in_sync and r.node.ready]
            return good[0] if good else None
        return a.nodes[0] if len(a.nodes) == 1 else None

    @property
    def can_block_status(self) -> bool:
        node = self._status_node()
        return node is not None and node.can_block_status

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        node = self._status_node()
        if node is None or not node.can_block_status:
            raise OSError(errno.EOPNOTSUPP, "no block status for this array")
        return await node.block_status(offset, length)

    async def aclose(self) -> None:
        pass  # the daemon closes the array
