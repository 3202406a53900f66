"""alg_mirror: every node (replica) holds the whole disk.

The disk is as big as the smallest replica (whole sectors). `map()` gives one
extent per replica, all with the same buffer segment: for a write, every
replica must get it; for a read, they are alternatives and the array picks
one (the replica set knows which are in sync and how busy each is). The map
also fixes the region size of the write-intent bitmap: the unit in which the
array tracks what a replica is missing and what it resyncs.
"""

from __future__ import annotations

from collections.abc import Sequence

from dstfs.algorithms.base import SECTOR, Extent, check_range

DEFAULT_REGION = 1 << 20
MIN_REGION = 64 << 10


class Mirror:
    name = "alg_mirror"
    #: Node directories are n-INDEX: every replica starts at sector 0.
    named_by_index = True
    #: Extents of one range are copies, not parts (see Algorithm.redundant).
    redundant = True

    def __init__(self, node_sizes: Sequence[int], region: int = DEFAULT_REGION) -> None:
        if region < MIN_REGION or region & (region - 1):
            raise ValueError(f"region must be a power of two >= {MIN_REGION}, not {region}")
        if any(s <= 0 for s in node_sizes):
            raise ValueError("node sizes must be positive")
        self.region = region
        self._n = len(node_sizes)
        self._size = min(node_sizes) // SECTOR * SECTOR if node_sizes else 0

    @property
    def size(self) -> int:
        return self._size

    @property
    def regions(self) -> int:
        """Bitmap regions covering the disk (the last one may be short)."""
        return -(-self._size // self.region)

    def region_range(self, offset: int, length: int) -> range:
        """The regions that [offset, offset+length) touches."""
        return range(offset // self.region, (offset + max(length, 1) - 1) // self.region + 1)

    def map(self, offset: int, length: int, write: bool = False) -> list[Extent]:
        check_range(offset, length, self._size)
        seg = ((0, length),)
        return [Extent(i, offset, length, seg) for i in range(self._n)]

    def node_ranges(self) -> list[tuple[int, int]]:
        return [(0, self._size // SECTOR)] * self._n

    def used_bytes(self, node: int) -> int:
        return self._size

    def options(self) -> dict[str, int]:
        return {"region": self.region}
