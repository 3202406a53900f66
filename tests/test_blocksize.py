"""The client obeys a server's NBD_INFO_BLOCK_SIZE: nbdkit's blocksize-policy
filter advertises a minimum of 4096 and a maximum payload of 64 KiB and
answers any request that breaks them with an error, so each request dstfs
sends must be whole blocks and at most 64 KiB; what lands in the backing file
is compared with a model. dstfs serve advertises 64 MiB."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import trio
from helpers.procs import dstfs_server, nbdkit

from dstfs.array import Array
from dstfs.nbd.client import open_client

KiB, MiB = 1024, 1024 * 1024
SIZE = 4 * MiB


@contextmanager
def strict_nbdkit(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    backing = tmp_path / "backing.img"
    backing.write_bytes(random.randbytes(SIZE))
    args = [
        "--filter=blocksize-policy",
        "file",
        str(backing),
        "blocksize-minimum=4096",
        "blocksize-preferred=4096",
        "blocksize-maximum=65536",
        "blocksize-error-policy=error",
    ]
    with nbdkit(*args) as uri:
        yield uri, backing


async def test_client_splits_and_aligns_for_a_strict_server(tmp_path: Path) -> None:
    rng = random.Random(4096)
    with strict_nbdkit(tmp_path) as (uri, backing):
        want = bytearray(backing.read_bytes())
        async with open_client(uri) as c:
            assert (c.min_block, c.max_payload) == (4096, 64 * KiB)
            # Unaligned, small and large, and many at once in the same blocks.
            writes = [(1000, 10), (4095, 2), (8191, 300 * KiB), (5 * 4096, 4096)]
            # 40 writes into 4 blocks at once, none overlapping another: a
            # read-modify-write that is not exclusive would undo a neighbour.
            writes += [
                (64 * KiB + i * 400 + rng.randrange(100), rng.randrange(1, 300)) for i in range(40)
            ]
            with trio.fail_after(60):
                for offset, n in writes[:4]:
                    data = rng.randbytes(n)
                    await c.pwrite(offset, data)
                    want[offset : offset + n] = data
                async with trio.open_nursery() as nursery:
                    for offset, n in writes[4:]:
                        data = rng.randbytes(n)
                        want[offset : offset + n] = data
                        nursery.start_soon(c.pwrite, offset, data)
                await c.write_zeroes(3 * MiB + 100, 200 * KiB)
                want[3 * MiB + 100 : 3 * MiB + 100 + 200 * KiB] = bytes(200 * KiB)
                await c.trim(2 * MiB + 1, 10)  # inside one block: nothing to trim
                await c.flush()
                # Reads: unaligned, and above the maximum.
                assert bytes(await c.pread(1001, 7)) == want[1001:1008]
                assert bytes(await c.pread(0, SIZE)) == want
                view = bytearray(70 * KiB)
                await c.pread_into(3, [memoryview(view)[:5], memoryview(view)[5:]])
                assert view == want[3 : 3 + 70 * KiB]
                extents = await c.block_status(1, 10) if c.meta_id is not None else []
                assert sum(n for n, _ in extents) <= 10
        assert backing.read_bytes() == want


async def test_unaligned_writes_through_an_array_land_right(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    with strict_nbdkit(tmp_path) as (uri, backing):
        want = bytearray(backing.read_bytes())
        array = Array("strict", nursery)
        try:
            await array.add_node(uri)
            with trio.fail_after(30):
                for offset, n in ((512, 512), (4096 + 7, 70 * KiB), (SIZE - 3, 3)):
                    data = random.randbytes(n)
                    await array.write(offset, data)
                    want[offset : offset + n] = data
                await array.flush()
                assert bytes(await array.read(0, SIZE)) == want
        finally:
            await array.aclose()
        assert backing.read_bytes() == want


async def test_dstfs_serve_advertises_64_mib_and_the_client_uses_it(tmp_path: Path) -> None:
    with dstfs_server(tmp_path / "d.img", "128M") as (uri, _):
        async with open_client(uri) as c:
            assert (c.min_block, c.max_payload) == (1, 64 * MiB)
            data = random.randbytes(1 * MiB) * 40
            with trio.fail_after(30):
                await c.pwrite(1, data)
                assert bytes(await c.pread(1, len(data))) == data
