"""The array issue's acceptance, end to end, as a user would run it.

1. `dstfs mount` over two `dstfs serve` nodes and one `nbdkit memory` node;
   a loop device with direct I/O, mkfs.ext4, files of random data whose
   blocks cross the node boundaries, sync, umount, a clean `e2fsck -fn`;
   `dstfs umount`, then a remount from the state dir alone finds every
   checksum unchanged; and the bytes sit where the linear map says: disk
   offset X is at X - node_start on node X // NODE (the serve nodes' backing
   files, the nbdkit node read back with nbdcopy), both for the whole disk
   and for each file's blocks as `filefrag -v` reports them.
2. The README quick start: `dstfs mount MNT --state EMPTYDIR` builds the
   default 2 GiB array of two nodes served by the daemon itself, and
   losetup + mkfs.ext4 + mount work on it; mounted again from that state
   dir, the filesystem is still there.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
from pathlib import Path

from helpers.mounts import ext4, loop, mounted
from helpers.procs import dstfs_serve, nbdkit, need, run

MiB = 1 << 20
NODE = 96 * MiB
NODES = 3
FILE_SIZE = 64 * MiB
FILES = 3
CHUNK = 4 * MiB
BLOCK = 4096


def file_chunk(k: int, j: int) -> bytes:
    """Chunk j of file k: random, and the same every time it is asked for."""
    return random.Random(f"{k}/{j}").randbytes(CHUNK)


def physical_blocks(path: Path) -> list[int]:
    """Disk block of each of the file's blocks, from `filefrag -v`."""
    out = run(need("filefrag"), "-v", str(path)).stdout
    assert f"blocks of {BLOCK} bytes" in out, out
    blocks: list[int] = []
    for m in re.finditer(r"^\s*\d+:\s*(\d+)\.\.\s*(\d+):\s*(\d+)\.\.\s*(\d+):", out, re.M):
        l0, l1, p0, p1 = map(int, m.groups())
        assert l0 == len(blocks) and p1 - p0 == l1 - l0, out
        blocks.extend(range(p0, p1 + 1))
    return blocks


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def test_ext4_over_serve_and_nbdkit_nodes_survives_a_remount_and_lies_linearly(
    tmp_path: Path,
) -> None:
    for tool in ("mkfs.ext4", "e2fsck", "filefrag", "nbdcopy", "losetup"):
        need(tool)
    state = tmp_path / "state"
    backing = [tmp_path / "a.img", tmp_path / "b.img"]
    expected = {}
    with contextlib.ExitStack() as servers:
        uris = [servers.enter_context(dstfs_serve(p, size="96M")) for p in backing]
        uris.append(servers.enter_context(nbdkit("memory", "96M")))

        # -- build: mount, ext4, files, e2fsck
        with mounted(tmp_path, nodes=uris, state=state) as mnt:
            assert os.stat(mnt / "disk.img").st_size == NODES * NODE
            with loop(mnt / "disk.img") as dev:
                res = run("mkfs.ext4", "-q", "-F", "-b", str(BLOCK), dev)
                assert res.returncode == 0, res.stderr
                with ext4(dev, tmp_path / "data") as data:
                    for k in range(FILES):
                        h = hashlib.sha256()
                        with open(data / f"f{k}", "wb") as f:
                            for j in range(FILE_SIZE // CHUNK):
                                chunk = file_chunk(k, j)
                                f.write(chunk)
                                h.update(chunk)
                        expected[f"f{k}"] = h.hexdigest()
                    os.sync()
                    placement = {k: physical_blocks(data / f"f{k}") for k in range(FILES)}
                res = run("e2fsck", "-fn", dev)
                assert res.returncode == 0, res.stdout + res.stderr

        # The files' blocks reach every node and some run crosses a boundary.
        per_block = NODE // BLOCK
        touched = {b // per_block for blocks in placement.values() for b in blocks}
        assert touched == set(range(NODES)), touched
        crossing = [
            (k, i)
            for k, blocks in placement.items()
            for i in range(len(blocks) - 1)
            if blocks[i + 1] == blocks[i] + 1 and (blocks[i] + 1) % per_block == 0
        ]
        assert crossing, "no file runs contiguously across a node boundary"

        # -- remount from the state dir alone: same files, same bytes
        with mounted(tmp_path, state=state) as mnt:
            assert (mnt / "nodes").read_text() == (
                f"sectors (start [size]): 0 [{NODE // 512}] | {NODE // 512} [{NODE // 512}]"
                f" | {2 * NODE // 512} [{NODE // 512}]\n"
            )
            with loop(mnt / "disk.img") as dev, ext4(dev, tmp_path / "data2") as data:
                assert {f"f{k}": sha256_file(data / f"f{k}") for k in range(FILES)} == expected
            disk = []
            with open(mnt / "disk.img", "rb") as f:
                while chunk := f.read(CHUNK):
                    disk.append(hashlib.sha256(chunk).digest())
            assert len(disk) == NODES * NODE // CHUNK

        # -- the bytes on the nodes themselves
        dump = tmp_path / "c.img"
        res = run("nbdcopy", uris[2], str(dump))
        assert res.returncode == 0, res.stderr
    nodes = [*backing, dump]
    node_chunks = []
    for path in nodes:
        assert path.stat().st_size == NODE
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                node_chunks.append(hashlib.sha256(chunk).digest())
    assert node_chunks == disk, "disk.img is not the concatenation of its nodes"

    fds = [os.open(p, os.O_RDONLY) for p in nodes]
    try:
        for path in nodes:
            path.unlink()  # open still: kept until closed, gone when the test ends
        for k, blocks in placement.items():
            for j in range(FILE_SIZE // CHUNK):
                want = file_chunk(k, j)
                first = j * CHUNK // BLOCK
                got = b"".join(
                    os.pread(fds[p // per_block], BLOCK, (p % per_block) * BLOCK)
                    for p in blocks[first : first + CHUNK // BLOCK]
                )
                assert got == want, f"file f{k} chunk {j} is not where filefrag says"
    finally:
        for fd in fds:
            os.close(fd)


def test_default_array_quick_start(tmp_path: Path) -> None:
    need("mkfs.ext4")
    state = tmp_path / "empty"
    state.mkdir()
    with mounted(tmp_path, state=state) as mnt:
        assert os.stat(mnt / "disk.img").st_size == 2 << 30
        dirs = sorted(n for n in os.listdir(mnt) if n.startswith("n-"))
        assert dirs == ["n-0", "n-2097152"]
        ports = set()
        for d in dirs:
            m = re.fullmatch(r"R: 127\.0\.0\.1:(\d+)\n", (mnt / d / "type").read_text())
            assert m, (mnt / d / "type").read_text()
            ports.add(m[1])
            assert (mnt / d / "state").read_text() == "online\n"
        assert len(ports) == 2
        nodes = (mnt / "nodes").read_text()
        assert nodes == "sectors (start [size]): 0 [2097152] | 2097152 [2097152]\n"
        assert sorted(p.name for p in state.glob("node-*.img")) == ["node-0.img", "node-1.img"]
        with loop(mnt / "disk.img") as dev:
            res = run("mkfs.ext4", "-q", dev)
            assert res.returncode == 0, res.stderr
            with ext4(dev, tmp_path / "data") as data:
                payload = os.urandom(3 * MiB)
                (data / "hello").write_bytes(payload)
    # Mounted again from its state dir, the array serves the same node files
    # (on new ports) and the filesystem is still there.
    with mounted(tmp_path, state=state) as mnt:
        for d in ("n-0", "n-2097152"):
            assert re.fullmatch(r"R: 127\.0\.0\.1:\d+\n", (mnt / d / "type").read_text())
        with loop(mnt / "disk.img") as dev, ext4(dev, tmp_path / "data") as data:
            assert (data / "hello").read_bytes() == payload
        assert run("e2fsck", "-fn", str(mnt / "disk.img")).returncode == 0
    for image in state.glob("node-*.img"):
        image.unlink()
