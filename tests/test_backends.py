"""The backends' optional block status capability: FileBackend from
SEEK_DATA/SEEK_HOLE, and a filter passing it through."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dstfs.backends.base import BackendFilter
from dstfs.backends.file import MAX_EXTENTS, FileBackend
from dstfs.iotypes import EXTENT_HOLE, EXTENT_ZERO

MiB = 1 << 20
HOLE = EXTENT_HOLE | EXTENT_ZERO


@pytest.fixture
def sparse(tmp_path: Path) -> FileBackend:
    """8 MiB: data at [1 MiB, +64 KiB) and [6 MiB, +4 KiB), holes elsewhere."""
    backend = FileBackend.create(str(tmp_path / "s.img"), 8 * MiB)
    os.pwrite(backend.fd, b"d" * 65536, 1 * MiB)
    os.pwrite(backend.fd, b"e" * 4096, 6 * MiB)
    return backend


async def test_file_block_status_from_seek_data_and_hole(sparse: FileBackend) -> None:
    assert sparse.can_block_status
    assert await sparse.block_status(0, 8 * MiB) == [
        (1 * MiB, HOLE),
        (65536, 0),
        (5 * MiB - 65536, HOLE),
        (4096, 0),
        (2 * MiB - 4096, HOLE),
    ]
    # A range inside: starts at its offset, ends at its end.
    assert await sparse.block_status(1 * MiB + 512, 1024) == [(1024, 0)]
    assert await sparse.block_status(2 * MiB, 4096) == [(4096, HOLE)]
    assert await sparse.block_status(8 * MiB, 4096) == []
    await sparse.aclose()


async def test_file_shorter_than_its_export_is_a_hole_past_its_end(tmp_path: Path) -> None:
    path = tmp_path / "short.img"
    path.write_bytes(b"x" * 4096)
    backend = FileBackend(str(path))
    backend._size = 8192  # as when serving with --size bigger than the file
    assert await backend.block_status(0, 8192) == [(4096, 0), (4096, HOLE)]
    await backend.aclose()


async def test_many_extents_give_a_prefix(tmp_path: Path) -> None:
    backend = FileBackend.create(str(tmp_path / "many.img"), (MAX_EXTENTS + 10) * 8192)
    for i in range(MAX_EXTENTS // 2 + 5):
        os.pwrite(backend.fd, b"d" * 4096, i * 8192)
    extents = await backend.block_status(0, backend.size)
    assert len(extents) == MAX_EXTENTS
    assert extents[:2] == [(4096, 0), (4096, HOLE)]
    assert sum(n for n, _ in extents) < backend.size
    await backend.aclose()


async def test_filter_passes_block_status_through(sparse: FileBackend) -> None:
    f = BackendFilter(sparse)
    assert f.can_block_status
    assert await f.block_status(1 * MiB, 65536) == [(65536, 0)]
    await f.aclose()


async def test_a_backend_without_the_capability_says_so(tmp_path: Path) -> None:
    class NoStatus:
        name = "plain"
        can_block_status = False

    assert BackendFilter(NoStatus()).can_block_status is False  # type: ignore[arg-type]
