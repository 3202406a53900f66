"""The algorithm interface and the extent value it produces."""

from __future__ import annotations

from typing import Protocol

import attrs

SECTOR = 512


@attrs.frozen
class Extent:
    """One node's part of a request.

    `length` bytes at `node_offset` on node `node` (an index into the node
    list) hold the request's bytes at the buffer offsets in `segments`,
    `(buffer_offset, length)` pairs in node order. Linear gives one segment;
    a stripe gives one extent per node whose segments interleave.
    """

    node: int
    node_offset: int
    length: int
    segments: tuple[tuple[int, int], ...]


class Algorithm(Protocol):
    #: The control tree name: alg_linear, alg_stripe, ...
    name: str
    #: Node directories are n-INDEX (True) or n-START_SECTOR (False).
    named_by_index: bool
    #: False: map() splits a range into parts, one node each, all needed.
    #: True (a mirror): map() gives copies, one extent per replica, each
    #: covering the whole range; a write must reach every replica that is
    #: in sync (the others are marked dirty), a read needs any one of them,
    #: in the array's order of preference. Which replica is usable is the
    #: array's knowledge, not the map's: maps stay pure.
    redundant: bool

    @property
    def size(self) -> int:
        """Disk size in bytes."""
        ...

    def map(self, offset: int, length: int, write: bool = False) -> list[Extent]:
        """Extents covering [offset, offset+length), which must lie in the disk."""
        ...

    def node_ranges(self) -> list[tuple[int, int]]:
        """(start, size) in sectors of each node's share, for `nodes` and `n-START`."""
        ...

    def used_bytes(self, node: int) -> int:
        """How many bytes of node `node` (from its offset 0) the map uses."""
        ...

    def options(self) -> dict[str, int]:
        """Parameters to persist (e.g. chunk), beside the node list."""
        ...


def check_range(offset: int, length: int, size: int) -> None:
    if offset < 0 or length < 0 or offset + length > size:
        raise ValueError(f"range {offset}+{length} outside the {size}-byte disk")
