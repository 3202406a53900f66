"""alg_stripe: chunk k of the disk lives on node k mod N, at row k div N.

Every node contributes the same number of whole chunks: the disk is
N x (smallest node rounded down to a chunk). A range maps to at most one
extent per node: consecutive chunks of a node are adjacent on that node, so
a 1 MiB request over two nodes becomes two 512 KiB node requests whose
buffer segments interleave.
"""

from __future__ import annotations

from collections.abc import Sequence

from dstfs.algorithms.base import SECTOR, Extent, check_range

DEFAULT_CHUNK = 64 * 1024
MIN_CHUNK = 4096


class Stripe:
    name = "alg_stripe"
    #: Node directories are n-INDEX: every node starts at sector 0.
    named_by_index = True
    redundant = False

    def __init__(self, node_sizes: Sequence[int], chunk: int = DEFAULT_CHUNK) -> None:
        if chunk < MIN_CHUNK or chunk & (chunk - 1):
            raise ValueError(f"chunk must be a power of two >= {MIN_CHUNK}, not {chunk}")
        self.chunk = chunk
        self._n = len(node_sizes)
        if any(s <= 0 for s in node_sizes):
            raise ValueError("node sizes must be positive")
        per_node = (min(node_sizes) // chunk * chunk) if node_sizes else 0
        if node_sizes and per_node == 0:
            raise ValueError(f"the smallest node is smaller than one {chunk}-byte chunk")
        self._per_node = per_node
        self._size = per_node * self._n

    @property
    def size(self) -> int:
        return self._size

    def map(self, offset: int, length: int, write: bool = False) -> list[Extent]:
        check_range(offset, length, self._size)
        chunk, n = self.chunk, self._n
        starts: dict[int, int] = {}
        lengths: dict[int, int] = {}
        segments: dict[int, list[tuple[int, int]]] = {}
        done = 0
        while done < length:
            pos = offset + done
            k, within = divmod(pos, chunk)
            row, node = divmod(k, n)
            take = min(chunk - within, length - done)
            if node not in starts:
                starts[node] = row * chunk + within
                lengths[node] = 0
                segments[node] = []
            lengths[node] += take
            segments[node].append((done, take))
            done += take
        return [Extent(node, starts[node], lengths[node], tuple(segments[node])) for node in starts]

    def node_ranges(self) -> list[tuple[int, int]]:
        # Every node holds rows from the start of the disk: each starts at 0.
        return [(0, self._per_node // SECTOR)] * self._n

    def used_bytes(self, node: int) -> int:
        return self._per_node

    def options(self) -> dict[str, int]:
        return {"chunk": self.chunk}
