"""The Array without FUSE: nodes joined by an algorithm, read and written as
one disk. Nodes are "pattern backends" (in memory, or files served as
file:// or over NBD by an in-process server) whose every 8-byte little-endian
word starts out holding TAG << 48 | its own node offset, so a byte that
comes from the wrong node or offset is obvious. Checked: reads and writes
crossing node boundaries, short reads and ENOSPC at the end, flush on every
node, one node's errno reaching the caller, concurrency of extents,
add_node validation that changes nothing on failure, and persisted state."""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

import pytest
import trio
from helpers.patterns import word_pattern as pattern
from helpers.procs import free_port

from dstfs import state
from dstfs.array import Array, ArrayError
from dstfs.backends.base import BackendBase
from dstfs.backends.file import FileBackend
from dstfs.backends.registry import open_backend
from dstfs.nbd.server import Export, NbdServer
from dstfs.uri import NodeSpec

KiB = 1024


class PatternBackend(BackendBase):
    """An in-memory node; `fail` makes every request fail with that errno;
    `barrier` makes reads wait until that many reads have started."""

    def __init__(self, tag: int, size: int) -> None:
        self.name = f"pattern-{tag}"
        self.tag = tag
        self.data = bytearray(pattern(tag, 0, size))
        self.flushes = 0
        self.writes: list[tuple[int, int]] = []
        self.fail: int | None = None
        self.closed = False
        self.barrier: tuple[list[int], int, trio.Event] | None = None

    @property
    def size(self) -> int:
        return len(self.data)

    def _check(self) -> None:
        if self.fail is not None:
            raise OSError(self.fail, os.strerror(self.fail))

    async def pread(self, offset: int, length: int) -> bytes:
        if self.barrier is not None:
            started, want, event = self.barrier
            started.append(self.tag)
            if len(started) == want:
                event.set()
            await event.wait()
        await trio.sleep(0)
        self._check()
        assert offset >= 0 and offset + length <= self.size
        return bytes(self.data[offset : offset + length])

    async def pwrite(self, offset: int, data: bytes, fua: bool = False) -> None:
        await trio.sleep(0)
        self._check()
        assert offset >= 0 and offset + len(data) <= self.size
        self.data[offset : offset + len(data)] = data
        self.writes.append((offset, len(data)))

    async def flush(self) -> None:
        await trio.sleep(0)
        self._check()
        self.flushes += 1

    async def trim(self, offset: int, length: int) -> None:
        self._check()

    async def write_zeroes(self, offset: int, length: int, may_trim: bool = True) -> None:
        await self.pwrite(offset, bytes(length))

    async def aclose(self) -> None:
        self.closed = True


class Patterns(dict[str, PatternBackend]):
    """Backends for `file:///pattern/NAME` node URIs: register one under
    NAME; `open` is the opener to hand to the Array (else the real one)."""

    async def open(self, spec: NodeSpec, nursery: trio.Nursery, connections: int = 1):
        if spec.path and spec.path.startswith("/pattern/"):
            backend = self[spec.path.removeprefix("/pattern/")]
            if spec.size and spec.size * 512 > backend.size:
                raise OSError(errno.ENOSPC, "smaller than asked")
            return backend
        return await open_backend(spec, nursery, connections)


@pytest.fixture
def patterns() -> Patterns:
    return Patterns()


async def pattern_array(
    nursery: trio.Nursery,
    patterns: Patterns,
    sizes: list[int],
    alg: str = "alg_linear",
    **kw: object,
) -> tuple[Array, list[PatternBackend]]:
    array = Array("test", nursery, alg=alg, opener=patterns.open, **kw)  # type: ignore[arg-type]
    backends = []
    for i, size in enumerate(sizes):
        patterns[str(i)] = b = PatternBackend(i + 1, size)
        backends.append(b)
        await array.add_node(f"file:///pattern/{i}")
    return array, backends


def linear_image(backends: list[PatternBackend]) -> bytearray:
    return bytearray(b"".join(b.data for b in backends))


SIZES = [64 * KiB, 96 * KiB, 32 * KiB]
B1, B2 = 64 * KiB, 160 * KiB  # node boundaries on the disk
END = 192 * KiB


# -- reads


@pytest.mark.parametrize(
    ("offset", "length"),
    [
        (0, 4096),
        (B1 - 4096, 8192),  # across node 0 / node 1
        (B1 - 3, 11),  # unaligned, across
        (B1, 4096),
        (B2 - 8, 16),
        (B1 - 100, B2 - B1 + 200),  # all of node 1 and a bit of each neighbour
        (0, END),
        (END - 5, 5),
    ],
)
async def test_read_across_node_boundaries_returns_each_nodes_own_words(
    nursery: trio.Nursery, patterns: dict, offset: int, length: int
) -> None:
    array, backends = await pattern_array(nursery, patterns, SIZES)
    assert array.size == END
    data = await array.read(offset, length)
    assert bytes(data) == bytes(linear_image(backends)[offset : offset + length])


async def test_read_at_a_boundary_shows_the_node_tag_and_offset_change(
    nursery: trio.Nursery, patterns: dict
) -> None:
    array, _ = await pattern_array(nursery, patterns, SIZES)
    words = struct.unpack("<4Q", await array.read(B1 - 16, 32))
    assert words == (1 << 48 | B1 - 16, 1 << 48 | B1 - 8, 2 << 48 | 0, 2 << 48 | 8)


async def test_reads_past_the_end_are_short_or_empty(nursery: trio.Nursery, patterns: dict) -> None:
    array, backends = await pattern_array(nursery, patterns, SIZES)
    assert bytes(await array.read(END - 100, 1000)) == bytes(backends[2].data[-100:])
    assert await array.read(END, 10) == b""
    assert await array.read(END + 4096, 10) == b""
    assert await array.read(0, 0) == b""


async def test_array_without_nodes_is_empty(nursery: trio.Nursery) -> None:
    array = Array("empty", nursery)
    assert array.size == 0
    assert await array.read(0, 10) == b""
    with pytest.raises(OSError) as e:
        await array.write(0, b"x")
    assert e.value.errno == errno.ENOSPC


async def test_extents_of_one_request_run_concurrently(
    nursery: trio.Nursery, patterns: dict
) -> None:
    array, backends = await pattern_array(nursery, patterns, SIZES)
    barrier: tuple[list[int], int, trio.Event] = ([], 3, trio.Event())
    for b in backends:
        b.barrier = barrier
    with trio.fail_after(30):  # one extent after another would wait for ever
        data = await array.read(0, END)
    assert sorted(barrier[0]) == [1, 2, 3]
    assert bytes(data) == bytes(linear_image(backends))


# -- writes


async def test_write_across_boundaries_lands_on_each_node_at_its_offset(
    nursery: trio.Nursery, patterns: dict
) -> None:
    array, backends = await pattern_array(nursery, patterns, SIZES)
    image = linear_image(backends)
    payload = os.urandom(B2 - B1 + 8192)
    assert await array.write(B1 - 4096, payload) == len(payload)
    image[B1 - 4096 : B2 + 4096] = payload
    assert backends[0].writes == [(B1 - 4096, 4096)]
    assert backends[1].writes == [(0, B2 - B1)]
    assert backends[2].writes == [(0, 4096)]
    assert linear_image(backends) == image  # nothing else moved
    assert bytes(await array.read(0, END)) == bytes(image)


async def test_write_past_the_end_is_enospc_and_a_straddling_write_is_short(
    nursery: trio.Nursery, patterns: dict
) -> None:
    array, backends = await pattern_array(nursery, patterns, SIZES)
    before = linear_image(backends)
    for offset in (END, END + 4096):
        with pytest.raises(OSError) as e:
            await array.write(offset, b"x" * 512)
        assert e.value.errno == errno.ENOSPC
    assert linear_image(backends) == before
    assert await array.write(END - 2, b"abcd") == 2
    assert linear_image(backends) == before[:-2] + b"ab"


async def test_stripe_array_places_chunks_round_robin(
    nursery: trio.Nursery, patterns: dict
) -> None:
    chunk = 4096
    array, backends = await pattern_array(
        nursery, patterns, [5 * chunk, 4 * chunk], alg="alg_stripe", options={"chunk": chunk}
    )
    assert array.size == 8 * chunk
    expect = b"".join(
        bytes(backends[k % 2].data[(k // 2) * chunk :][:chunk]) for k in range(8)
    )  # the model: chunk k on node k % 2, row k // 2
    assert bytes(await array.read(0, array.size)) == expect
    payload = os.urandom(5 * chunk + 100)
    await array.write(chunk - 50, payload)
    model = bytearray(expect)
    model[chunk - 50 : 6 * chunk + 50] = payload
    for k in range(8):
        node, row = k % 2, k // 2
        assert backends[node].data[row * chunk : (row + 1) * chunk] == model[k * chunk :][:chunk]
    assert bytes(await array.read(0, array.size)) == bytes(model)


# -- flush and errors


async def test_flush_reaches_every_node_once(nursery: trio.Nursery, patterns: dict) -> None:
    array, backends = await pattern_array(nursery, patterns, SIZES)
    await array.flush()
    assert [b.flushes for b in backends] == [1, 1, 1]
    assert array.stats.flushes == 1
    assert [n.stats.flushes for n in array.nodes] == [1, 1, 1]


async def test_flush_error_of_one_node_surfaces_after_the_others_flushed(
    nursery: trio.Nursery, patterns: dict
) -> None:
    array, backends = await pattern_array(nursery, patterns, SIZES)
    backends[1].fail = errno.EIO
    with pytest.raises(OSError) as e:
        await array.flush()
    assert e.value.errno == errno.EIO
    assert [backends[0].flushes, backends[2].flushes] == [1, 1]


@pytest.mark.parametrize("err", [errno.EIO, errno.EROFS, errno.ENOSPC])
async def test_one_nodes_errno_reaches_the_caller_and_other_nodes_still_work(
    nursery: trio.Nursery, patterns: dict, err: int
) -> None:
    array, backends = await pattern_array(nursery, patterns, SIZES)
    backends[1].fail = err
    with pytest.raises(OSError) as e:
        await array.read(B1 - 4096, 8192)
    assert e.value.errno == err
    with pytest.raises(OSError) as e:
        await array.write(B1 - 4096, b"w" * 8192)
    assert e.value.errno == err
    # Every extent finished before the error was raised: node 0's part landed.
    assert backends[0].data[B1 - 4096 : B1] == b"w" * 4096
    assert array.stats.errors == 2
    assert array.nodes[1].stats.errors == 2
    assert bytes(await array.read(0, 4096)) == pattern(1, 0, 4096)
    assert bytes(await array.read(B2, 4096)) == pattern(3, 0, 4096)


async def test_stats_count_requests_and_bytes(nursery: trio.Nursery, patterns: dict) -> None:
    array, _ = await pattern_array(nursery, patterns, SIZES)
    await array.read(0, 100)
    await array.read(B1 - 50, 100)
    await array.write(10, b"x" * 30)
    s = array.stats
    assert (s.reads, s.read_bytes, s.writes, s.write_bytes) == (2, 200, 1, 30)
    assert s.render().splitlines()[:4] == [
        "reads 2",
        "writes 1",
        "read_bytes 200",
        "write_bytes 30",
    ]
    assert (array.nodes[0].stats.reads, array.nodes[1].stats.reads) == (2, 1)


# -- real backends: files and an in-process NBD server


def pattern_file(path: Path, tag: int, size: int) -> Path:
    path.write_bytes(pattern(tag, 0, size))
    return path


async def test_file_and_nbd_nodes_map_linearly(nursery: trio.Nursery, tmp_path: Path) -> None:
    a = pattern_file(tmp_path / "a.img", 1, 64 * KiB)
    b = pattern_file(tmp_path / "b.img", 2, 96 * KiB)
    server = NbdServer([Export("", FileBackend(str(b)))])
    listeners = await nursery.start(server.serve_tcp, "127.0.0.1", 0)
    port = listeners[0].socket.getsockname()[1]
    array = Array("real", nursery)
    await array.add_node(f"file://{a}")
    await array.add_node(f"nbd://127.0.0.1:{port}")
    assert array.size == 160 * KiB
    data = await array.read(B1 - 8, 16)
    assert struct.unpack("<2Q", data) == (1 << 48 | B1 - 8, 2 << 48 | 0)
    payload = os.urandom(8192)
    await array.write(B1 - 4096, payload)
    await array.flush()
    assert a.read_bytes()[B1 - 4096 :] == payload[:4096]
    assert b.read_bytes()[:4096] == payload[4096:]
    assert b.read_bytes()[4096:8192] == pattern(2, 4096, 4096)
    await array.aclose()


async def test_add_node_with_size_uses_only_that_many_sectors(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    a = pattern_file(tmp_path / "a.img", 1, 64 * KiB)
    b = pattern_file(tmp_path / "b.img", 2, 64 * KiB)
    array = Array("sized", nursery)
    await array.add_node(f"file://{a},size=16")
    await array.add_node(f"file://{b}")
    assert array.size == 8 * KiB + 64 * KiB
    assert struct.unpack("<2Q", await array.read(8 * KiB - 8, 16)) == (1 << 48 | 8184, 2 << 48)
    assert [(n.start, n.sectors) for n in array.nodes] == [(0, 16), (16, 128)]
    await array.aclose()


# -- add_node validation


def snapshot(array: Array, state_dir: Path | None = None) -> tuple:
    saved = (state_dir / "array.json").read_text() if state_dir else None
    return (
        list(array.nodes),
        list(array.entries),
        array.size,
        array.alg_name,
        [(n.start, n.sectors) for n in array.nodes],
        saved,
    )


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize(
    ("uri", "err"),
    [
        ("nbd://", errno.EINVAL),
        ("bogus://host/x", errno.EINVAL),
        ("nbds://127.0.0.1/x?tls-type=psk", errno.EINVAL),
        ("nbd://127.0.0.1:99999", errno.EINVAL),
        ("FILE,size=abc", errno.EINVAL),
        ("FILE,size=0", errno.EINVAL),
        ("FILE,colour=red", errno.EINVAL),
        ("file:///no/such/dstfs/node.img", errno.ENOENT),
        ("OTHER,size=1000", errno.ENOSPC),  # more sectors than the file holds
        ("FILE", errno.EEXIST),  # n-0 uses it already
        ("TINY", errno.EINVAL),  # smaller than one sector
        ("DIR", errno.EISDIR),
        ("FIFO", errno.EINVAL),  # not a regular file or block device
        ("UNREACHABLE", errno.ECONNREFUSED),
    ],
)
async def test_add_node_refusal_has_the_true_errno_and_changes_nothing(
    nursery: trio.Nursery, tmp_path: Path, uri: str, err: int
) -> None:
    good = pattern_file(tmp_path / "good.img", 1, 64 * KiB)
    other = pattern_file(tmp_path / "other.img", 2, 64 * KiB)
    tiny = tmp_path / "tiny.img"
    tiny.write_bytes(b"x" * 100)
    os.mkfifo(tmp_path / "fifo")
    uri = (
        uri.replace("FILE", f"file://{good}")
        .replace("OTHER", f"file://{other}")
        .replace("TINY", f"file://{tiny}")
        .replace("DIR", f"file://{tmp_path}")
        .replace("FIFO", f"file://{tmp_path}/fifo")
        .replace("UNREACHABLE", f"nbd://127.0.0.1:{free_port()}")
    )
    state_dir = tmp_path / "state"
    array = Array("v", nursery, state_dir=state_dir)
    await array.add_node(f"file://{good}")
    before, fds = snapshot(array, state_dir), open_fds()
    with pytest.raises(OSError) as e:  # ArrayError, or members.Refused
        await array.add_node(uri)
    assert e.value.errno == err, e.value
    assert snapshot(array, state_dir) == before
    assert open_fds() == fds, "the refused node's file or socket was left open"
    assert bytes(await array.read(0, 16)) == pattern(1, 0, 16)
    await array.aclose()


async def test_stripe_refuses_a_node_smaller_than_a_chunk(
    nursery: trio.Nursery, patterns: dict
) -> None:
    array, _ = await pattern_array(
        nursery, patterns, [8192, 8192], alg="alg_stripe", options={"chunk": 4096}
    )
    before = snapshot(array)
    patterns["small"] = small = PatternBackend(9, 2048)
    with pytest.raises(ArrayError) as e:
        await array.add_node("file:///pattern/small")
    assert e.value.errno == errno.EINVAL
    assert snapshot(array) == before
    assert small.closed


async def test_stripe_refuses_a_new_node_while_the_disk_is_open(
    nursery: trio.Nursery, patterns: dict
) -> None:
    array, _ = await pattern_array(
        nursery, patterns, [8192, 8192], alg="alg_stripe", options={"chunk": 4096}
    )
    patterns["more"] = PatternBackend(9, 8192)
    array.open_count = 1
    with pytest.raises(ArrayError) as e:
        await array.add_node("file:///pattern/more")
    assert e.value.errno == errno.EBUSY
    assert array.size == 16384
    array.open_count = 0
    await array.add_node("file:///pattern/more")
    assert array.size == 3 * 8192


async def test_linear_add_node_while_open_grows_the_disk_and_calls_on_resize(
    nursery: trio.Nursery, patterns: dict
) -> None:
    array, _ = await pattern_array(nursery, patterns, SIZES[:2])
    resized = []
    array.on_resize = lambda: resized.append(array.size)
    array.open_count = 1
    patterns["more"] = PatternBackend(7, 32 * KiB)
    await array.add_node("file:///pattern/more")
    assert resized == [END]
    assert bytes(await array.read(B2, 8)) == pattern(7, 0, 8)


async def test_set_alg_only_without_nodes(nursery: trio.Nursery, patterns: Patterns) -> None:
    array = Array("a", nursery, opener=patterns.open)
    array.set_alg("alg_stripe")
    assert array.alg_name == "alg_stripe" and array.alg.options() == {"chunk": 65536}
    with pytest.raises(ArrayError) as e:
        array.set_alg("alg_raid5")
    assert e.value.errno == errno.EINVAL
    patterns["0"] = PatternBackend(1, 1 << 20)
    await array.add_node("file:///pattern/0")
    with pytest.raises(ArrayError) as e:
        array.set_alg("alg_linear")
    assert e.value.errno == errno.EBUSY
    assert array.alg_name == "alg_stripe"


async def test_set_alg_drops_the_old_algorithms_options(
    nursery: trio.Nursery, patterns: Patterns
) -> None:
    # A stripe's chunk must not be handed to linear when the algorithm changes.
    array = Array("a", nursery, alg="alg_stripe", options={"chunk": 131072}, opener=patterns.open)
    array.set_alg("alg_linear")
    patterns["0"] = PatternBackend(1, 64 * KiB)
    await array.add_node("file:///pattern/0")
    assert array.size == 64 * KiB and array.config().options == {}


async def test_remove_all_nodes_refused_while_open_then_empties_the_array(
    nursery: trio.Nursery, patterns: dict, tmp_path: Path
) -> None:
    array, backends = await pattern_array(nursery, patterns, SIZES, state_dir=tmp_path)
    array.open_count = 1
    with pytest.raises(ArrayError) as e:
        await array.remove_all_nodes()
    assert e.value.errno == errno.EBUSY
    assert len(array.nodes) == 3
    array.open_count = 0
    await array.remove_all_nodes()
    assert (array.nodes, array.size) == ([], 0)
    assert all(b.closed and b.flushes == 1 for b in backends)
    loaded = state.load(tmp_path)
    assert loaded is not None and loaded.nodes == ()


# -- persisted state


async def test_add_node_persists_the_array_atomically(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    a = pattern_file(tmp_path / "a.img", 1, 64 * KiB)
    b = pattern_file(tmp_path / "b.img", 2, 64 * KiB)
    sd = tmp_path / "state"
    array = Array("persisted", nursery, alg="alg_stripe", options={"chunk": 8192}, state_dir=sd)
    await array.add_node(f"file://{a}")
    assert state.load(sd) == state.ArrayConfig(
        "persisted", "alg_stripe", {"chunk": 8192}, (state.NodeEntry(uri=f"file://{a}"),)
    )
    await array.add_node(f"file://{b},size=64")
    loaded = state.load(sd)
    assert loaded is not None
    assert loaded.nodes == (
        state.NodeEntry(uri=f"file://{a}"),
        state.NodeEntry(uri=f"file://{b},size=64"),
    )
    assert sorted(p.name for p in sd.iterdir()) == ["array.json"]  # no temp file left
    await array.aclose()


def test_state_write_is_atomic_a_failed_rename_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = state.ArrayConfig("s", nodes=(state.NodeEntry(uri="nbd://127.0.0.1:1"),))
    state.save(tmp_path, old)

    def crash(src: object, dst: object) -> None:
        raise OSError(errno.EIO, "crash before rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        state.save(tmp_path, state.ArrayConfig("s"))
    monkeypatch.undo()
    assert state.load(tmp_path) == old


GOOD_STATE = '{"version": 1, "name": "x", "alg": "alg_linear", "nodes": []}'


@pytest.mark.parametrize(
    "text",
    [
        "{",
        "",
        '{"version": 2}',
        '{"version": 1, "name": "x"}',
        GOOD_STATE.replace("[]", '[{"uri": "bogus://x"}]'),
        GOOD_STATE.replace("[]", '[{"uri": "nbd://h", "serve": "/p"}]'),
        GOOD_STATE.replace("[]", '[{"uri": "nbd://h", "size": 0}]'),
        GOOD_STATE.replace("[]", "[[]]"),
        GOOD_STATE.replace("[]", "null"),
    ],
)
def test_state_load_refuses_a_file_it_cannot_understand(tmp_path: Path, text: str) -> None:
    assert state.load(tmp_path) is None
    (tmp_path / "array.json").write_text(text)
    with pytest.raises(ValueError, match="not a dstfs state file"):
        state.load(tmp_path)


@pytest.mark.parametrize(
    "text", ["[]", "null", '"text"', GOOD_STATE.replace('"nodes"', '"options": null, "nodes"')]
)
def test_state_load_refuses_json_that_is_not_an_object(tmp_path: Path, text: str) -> None:
    (tmp_path / "array.json").write_text(text)
    with pytest.raises(ValueError, match="not a dstfs state file"):
        state.load(tmp_path)


async def test_add_node_whose_state_cannot_be_written_changes_nothing(
    nursery: trio.Nursery, patterns: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    array, _ = await pattern_array(nursery, patterns, SIZES[:1], state_dir=tmp_path)
    before = snapshot(array, tmp_path)
    patterns["more"] = PatternBackend(5, 8192)

    def full(path: Path, text: str) -> None:
        raise OSError(errno.ENOSPC, "state disk full")

    monkeypatch.setattr(state, "write_atomic", full)
    with pytest.raises(OSError):
        await array.add_node("file:///pattern/more")
    assert snapshot(array, tmp_path) == before
