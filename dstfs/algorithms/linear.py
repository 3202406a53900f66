"""alg_linear, as in the seed: node i covers [start_i, start_i + size_i)."""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from dstfs.algorithms.base import SECTOR, Extent, check_range


class Linear:
    name = "alg_linear"
    #: Node directories are n-START, as in the seed.
    named_by_index = False
    redundant = False

    def __init__(self, node_sizes: Sequence[int]) -> None:
        starts = []
        pos = 0
        for s in node_sizes:
            if s <= 0 or s % SECTOR:
                raise ValueError(f"node size {s} is not a positive multiple of {SECTOR}")
            starts.append(pos)
            pos += s
        self._starts = starts
        self._sizes = list(node_sizes)
        self._size = pos

    @property
    def size(self) -> int:
        return self._size

    def map(self, offset: int, length: int, write: bool = False) -> list[Extent]:
        check_range(offset, length, self._size)
        starts = self._starts
        i = bisect.bisect_right(starts, offset) - 1
        out = []
        done = 0
        while done < length:
            node_off = offset + done - starts[i]
            n = min(length - done, self._sizes[i] - node_off)
            out.append(Extent(i, node_off, n, ((done, n),)))
            done += n
            i += 1
        return out

    def node_ranges(self) -> list[tuple[int, int]]:
        return [
            (st // SECTOR, sz // SECTOR) for st, sz in zip(self._starts, self._sizes, strict=True)
        ]

    def used_bytes(self, node: int) -> int:
        return self._sizes[node]

    def options(self) -> dict[str, int]:
        return {}
