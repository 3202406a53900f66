"""The mirror without FUSE: an Array over in-memory replicas whose faults the
tests control (a read or write errno, a lost connection that heals), with a
real state dir, so the bitmaps and the replica state are the files a mount
uses. Checked: writes reach every replica; reads are balanced and survive a
bad replica, which is repaired; a replica that fails or is suspended leaves
the in-sync set at once, its regions are marked durably before the write is
acknowledged, and it is resynced (only dirty regions) when it returns; a
crash's in-flight regions are resynced at the next start; check/repair;
every replica gone gives EIO; the state says who is behind."""

from __future__ import annotations

import errno
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing

from dstfs import state
from dstfs.array import Array, ArrayError
from dstfs.backends.base import BackendBase
from dstfs.backends.registry import open_backend
from dstfs.bitmap import RegionBitmap
from dstfs.iotypes import EXTENT_HOLE, EXTENT_ZERO, ConnectionLost
from dstfs.node import NodeUnavailable

KiB = 1024
MiB = 1024 * KiB
REGION = 64 * KiB
SIZE = 16 * REGION


class Replica(BackendBase):
    """An in-memory replica. `read_errno`/`write_errno` fail those requests
    (in `bad_range` only, if set); `down` breaks the connection until it is
    cleared (reconnect() succeeds again)."""

    def __init__(self, name: str, size: int = SIZE) -> None:
        self.name = name
        self.data = bytearray(size)
        self.read_errno: int | None = None
        self.write_errno: int | None = None
        self.bad_range: tuple[int, int] | None = None
        self.down = False
        self.reads = 0
        self.writes: list[tuple[int, int]] = []
        self.zeroes: list[tuple[int, int]] = []
        self.flushes = 0
        self.status_calls = 0
        self.hold: trio.Event | None = None  # writes wait on it while set

    #: Answers block status, as SEEK_HOLE would: zeroes are a hole.
    can_block_status = True
    can_reconnect = True

    @property
    def size(self) -> int:
        return len(self.data)

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        await trio.sleep(0)
        self._up()
        self.status_calls += 1
        zero = self.data[offset : offset + length] == bytes(length)
        return [(length, EXTENT_HOLE | EXTENT_ZERO if zero else 0)]

    def _hit(self, offset: int, length: int) -> bool:
        if self.bad_range is None:
            return True
        lo, hi = self.bad_range
        return offset < hi and offset + length > lo

    def _up(self) -> None:
        if self.down:
            raise ConnectionLost(f"{self.name}: down")

    async def reconnect(self) -> None:
        await trio.sleep(0)
        if self.down:
            raise OSError(errno.ECONNREFUSED, "refused")

    async def pread(self, offset: int, length: int) -> bytes:
        await trio.sleep(0)
        self._up()
        self.reads += 1
        if self.read_errno is not None and self._hit(offset, length):
            raise OSError(self.read_errno, "bad sector")
        return bytes(self.data[offset : offset + length])

    async def pwrite(self, offset: int, data: bytes, fua: bool = False) -> None:
        if self.hold is not None:
            await self.hold.wait()
        await trio.sleep(0)
        self._up()
        if self.write_errno is not None and self._hit(offset, len(data)):
            raise OSError(self.write_errno, "write error")
        self.data[offset : offset + len(data)] = data
        self.writes.append((offset, len(data)))

    async def write_zeroes(self, offset: int, length: int, may_trim: bool = True) -> None:
        await trio.sleep(0)
        self._up()
        self.data[offset : offset + length] = bytes(length)
        self.zeroes.append((offset, length))

    async def flush(self) -> None:
        await trio.sleep(0)
        self._up()
        self.flushes += 1

    async def trim(self, offset: int, length: int) -> None:
        await self.write_zeroes(offset, length)

    async def aclose(self) -> None:
        pass


class Replicas(dict[str, "Replica"]):
    """Backends for `file:///replica/NAME` URIs; `open` is the opener to
    hand to the Array (other URIs go to the real one)."""

    async def open(self, spec, nursery, connections=1):  # type: ignore[no-untyped-def]
        if spec.path and spec.path.startswith("/replica/"):
            return self[spec.path.removeprefix("/replica/")]
        return await open_backend(spec, nursery, connections)


@pytest.fixture
def replicas() -> Replicas:
    return Replicas()


async def mount(
    nursery: trio.Nursery,
    made: Replicas,
    state_dir: Path,
    names: list[str],
    force: int | None = None,
) -> Array:
    """As the daemon mounts: nodes from the state dir (a new mirror if none),
    then the state dir, then the replica set starts."""
    for n in names:
        made.setdefault(n, Replica(n))
    config = state.load(state_dir)
    if config is None:
        entries = [state.NodeEntry(uri=f"file:///replica/{n}") for n in names]
        entries[0] = state.NodeEntry(uri=entries[0].uri, synced=1)
        config = state.ArrayConfig(
            "m", "alg_mirror", {"region": REGION}, tuple(entries), generation=1
        )
    array = Array(config.name, nursery, alg=config.alg, options=config.options, opener=made.open)
    for e in config.nodes:
        assert e.uri is not None
        await array.add_node(e.uri, e)
    array.state_dir = state_dir
    array.generation = config.generation
    array.persist()
    assert array.replicas is not None
    array.replicas.start(config.generation, list(array.entries), force)
    return array


async def settle(array: Array, timeout: float = 10) -> None:
    """Wait until every replica is in sync (resyncs done)."""
    rs = array.replicas
    assert rs is not None
    with trio.fail_after(timeout):
        while rs.degraded or any(r.resyncing for r in rs.replicas):
            await trio.sleep(0.01)


def states(array: Array) -> list[str]:
    assert array.replicas is not None
    return [array.replicas.state_of(n) for n in array.nodes]


async def test_a_new_mirror_syncs_its_second_replica_sending_no_zeroes(
    nursery: trio.Nursery, replicas: dict, tmp_path: Path
) -> None:
    replicas["a"] = Replica("a")
    replicas["a"].data[REGION : REGION + 5] = b"hello"
    array = await mount(nursery, replicas, tmp_path, ["a", "b"])
    await settle(array)
    assert replicas["b"].data == replicas["a"].data
    # Only the one region with data was sent as bytes; the rest as zeroes.
    assert replicas["b"].writes == [(REGION, REGION)]
    assert len(replicas["b"].zeroes) == SIZE // REGION - 1
    assert array.replicas is not None
    assert array.replicas.stats.resync_bytes == REGION
    assert states(array) == ["in_sync", "in_sync"]
    # Block status said the other regions were holes: only one was read.
    assert replicas["a"].reads == 1
    assert replicas["a"].status_calls == SIZE // REGION


async def test_writes_reach_every_replica_and_reads_are_balanced(
    nursery: trio.Nursery, replicas: dict, tmp_path: Path
) -> None:
    array = await mount(nursery, replicas, tmp_path, ["a", "b"])
    await settle(array)
    await array.write(3 * REGION + 7, b"x" * 1000)
    for r in replicas.values():
        assert r.data[3 * REGION + 7 : 3 * REGION + 1007] == b"x" * 1000
    before = {n: r.reads for n, r in replicas.items()}
    async with trio.open_nursery() as n:
        for i in range(40):
            n.start_soon(array.read, i * 4096, 4096)
    got = {n: r.reads - before[n] for n, r in replicas.items()}
    assert sum(got.values()) == 40
    assert got["a"] > 5 and got["b"] > 5, got


async def test_a_failing_read_is_served_by_the_other_replica_and_repaired(
    nursery: trio.Nursery, replicas: dict, tmp_path: Path
) -> None:
    array = await mount(nursery, replicas, tmp_path, ["a", "b"])
    await settle(array)
    await array.write(0, b"good" * 1024)
    bad = replicas["b"]
    bad.data[0:4] = b"BAD!"  # what a bad sector would return, were it read
    bad.read_errno = errno.EIO
    bad.bad_range = (0, 4096)
    for _ in range(10):
        assert bytes(await array.read(0, 4096)) == b"good" * 1024
    rs = array.replicas
    assert rs is not None
    assert rs.stats.read_errors >= 1
    assert rs.stats.read_repairs >= 1
    assert bad.data[0:4] == b"good"  # rewritten from the good copy
    assert states(array) == ["in_sync", "in_sync"]


async def test_a_failed_write_degrades_the_replica_durably_and_it_resyncs_only_dirty_regions(
    nursery: trio.Nursery, replicas: dict, tmp_path: Path
) -> None:
    array = await mount(nursery, replicas, tmp_path, ["a", "b"])
    await settle(array)
    b = replicas["b"]
    b.down = True
    await array.write(5 * REGION, b"y" * 8192)  # acknowledged: a holds it
    await array.write(9 * REGION + 100, b"z" * 100)
    assert states(array)[1] in ("reconnecting", "degraded")
    assert array.replicas is not None
    assert array.replicas.degraded == 1
    # Durable: the bitmap file and the state say b is behind, in those regions.
    on_disk = RegionBitmap.open(tmp_path / "bitmap-n-1", SIZE // REGION)
    assert set(on_disk) >= {5, 9}
    saved = state.load(tmp_path)
    assert saved is not None
    assert saved.nodes[0].synced == saved.generation
    assert saved.nodes[1].synced != saved.generation
    # Reads never go to b while it is behind.
    reads_b = b.reads
    for _ in range(5):
        assert bytes(await array.read(5 * REGION, 8192)) == b"y" * 8192
    assert b.reads == reads_b
    b.writes.clear()
    b.zeroes.clear()
    b.down = False
    await settle(array)
    assert b.data == replicas["a"].data
    copied = {off // REGION for off, _ in b.writes + b.zeroes}
    assert copied <= {5, 9}, copied  # only what it missed
    saved = state.load(tmp_path)
    assert saved is not None and saved.nodes[1].synced == saved.generation


async def test_a_suspended_replica_does_not_hold_writes_and_resyncs_on_resume(
    nursery: trio.Nursery, replicas: dict, tmp_path: Path
) -> None:
    array = await mount(nursery, replicas, tmp_path, ["a", "b"])
    await settle(array)
    await array.nodes[1].suspend()
    assert states(array) == ["in_sync", "suspended"]
    with trio.fail_after(5):  # nothing waits for the suspended replica
        for i in range(8):
            await array.write(i * REGION, bytes([i + 1]) * 4096)
        await array.flush()
    assert replicas["b"].data != replicas["a"].data
    assert array.replicas is not None and array.replicas.dirty_of(array.nodes[1]) == 8
    array.nodes[1].resume()
    await settle(array)
    assert replicas["b"].data == replicas["a"].data


async def test_the_last_in_sync_replica_is_never_dropped_and_all_failed_is_eio(
    nursery: trio.Nursery, replicas: dict, tmp_path: Path
) -> None:
    array = await mount(nursery, replicas, tmp_path, ["a", "b"])
    await settle(array)
    replicas["b"].down = True
    await array.write(0, b"1" * 512)
    assert array.replicas is not None and array.replicas.in_sync_count() == 1
    for node in array.nodes:
        node.timeout = 0.2
    replicas["a"].down = True
    with trio.fail_after(10), pytest.raises(OSError) as e:
        await array.write(0, b"2" * 512)  # waits for a, then a fails
    assert e.value.errno == errno.EIO
    assert array.replicas.in_sync_count() == 1  # a is still the good one
    with pytest.raises(OSError) as e:
        await array.read(0, 512)
    assert e.value.errno == errno.EIO


async def test_a_crash_mid_write_resyncs_the_regions_in_flight(
    nursery: trio.Nursery, replicas: dict, tmp_path: Path
) -> None:
    array = await mount(nursery, replicas, tmp_path, ["a", "b"])
    await settle(array)
    await array.write(7 * REGION, b"w" * 4096)
    # The active bitmap holds region 7 (cleared only after a few idle seconds).
    assert 7 in RegionBitmap.open(tmp_path / "bitmap-active", SIZE // REGION)
    # "Crash": a new daemon on the same state dir, b differing in region 7.
    replicas["b"].data[7 * REGION : 7 * REGION + 4] = b"XXXX"
    async with trio.open_nursery() as n2:
        again = await mount(n2, replicas, tmp_path, ["a", "b"])
        await settle(again)
        assert replicas["b"].data == replicas["a"].data
        assert again.replicas is not None
        assert again.replicas.stats.resync_regions == 1
        n2.cancel_scope.cancel()


async def test_the_active_region_is_cleared_once_idle(
    nursery: trio.Nursery, replicas: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dstfs.replicas as replicas_mod

    monkeypatch.setattr(replicas_mod, "ACTIVE_IDLE", 0.2)
    monkeypatch.setattr(replicas_mod, "CLEAN_EVERY", 0.05)
    array = await mount(nursery, replicas, tmp_path, ["a", "b"])
    await settle(array)
    await array.write(2 * REGION, b"q" * 10)
    assert array.replicas is not None and array.replicas.active is not None
    assert 2 in array.replicas.active
    flushes = replicas["b"].flushes
    with trio.fail_after(30):
        while 2 in array.replicas.active:
            await trio.sleep(0.05)
    assert replicas["b"].flushes > flushes  # made durable before the mark went
    assert 2 not in RegionBitmap.open(tmp_path / "bitmap-active", SIZE // REGION)


async def test_check_counts_a_planted_difference_and_repair_fixes_it(
    nursery: trio.Nursery, replicas: dict, tmp_path: Path
) -> None:
    array = await mount(nursery, replicas, tmp_path, ["a", "b"])
    await settle(array)
    rs = array.replicas
    assert rs is not None

    async def run(action: str) -> int:
        rs.start_verify(action)
        with trio.fail_after(10):
            while rs.sync_action != "idle":
                await trio.sleep(0.01)
        return rs.stats.mismatch_cnt

    assert await run("check") == 0
    replicas["b"].data[4 * REGION + 10] = 0x55
    assert await run("check") == REGION // 512
    assert replicas["b"].data != replicas["a"].data  # check changes nothing
    assert await run("repair") == REGION // 512
    assert replicas["b"].data == replicas["a"].data
    assert await run("check") == 0


async def test_no_replica_known_good_refuses_to_guess_unless_forced(
    nursery: trio.Nursery, replicas: dict, tmp_path: Path
) -> None:
    array = await mount(nursery, replicas, tmp_path, ["a", "b"])
    await settle(array)
    saved = state.load(tmp_path)
    assert saved is not None
    # A state where neither replica is at the array's generation.
    state.save(tmp_path, attrs.evolve(saved, generation=99))
    with pytest.raises(ValueError, match="force-replica"):
        await mount(nursery, replicas, tmp_path, ["a", "b"])
    replicas["a"].data[0:3] = b"AAA"
    async with trio.open_nursery() as n3:
        forced = await mount(n3, replicas, tmp_path, ["a", "b"], force=1)
        await settle(forced)
        assert replicas["a"].data[0:3] == b"\0\0\0"  # synced from n-1
        n3.cancel_scope.cancel()


async def test_a_mirror_refuses_a_node_smaller_than_the_disk(
    nursery: trio.Nursery, replicas: dict, tmp_path: Path
) -> None:
    array = await mount(nursery, replicas, tmp_path, ["a", "b"])
    replicas["small"] = Replica("small", SIZE - REGION)
    with pytest.raises(ArrayError) as e:
        await array.add_node("file:///replica/small")
    assert e.value.errno == errno.EINVAL
    assert len(array.nodes) == 2


async def test_add_node_to_a_mirror_in_use_fully_syncs_it(
    nursery: trio.Nursery, replicas: dict, tmp_path: Path
) -> None:
    array = await mount(nursery, replicas, tmp_path, ["a", "b"])
    await settle(array)
    await array.write(REGION, b"d" * REGION)
    array.open_count = 1  # disk.img open: a mirror may still grow a replica
    replicas["c"] = Replica("c")
    replicas["c"].data[:] = b"\xff" * SIZE
    await array.add_node("file:///replica/c")
    await settle(array)
    assert replicas["c"].data == replicas["a"].data
    assert states(array) == ["in_sync"] * 3


def test_node_unavailable_is_an_oserror_with_eagain() -> None:
    e = NodeUnavailable("n", "suspended")
    assert isinstance(e, OSError) and e.errno == errno.EAGAIN


async def test_a_mirror_built_at_run_time_and_rebuilt_after_remove_all(
    nursery: trio.Nursery, replicas: dict, tmp_path: Path
) -> None:
    array = Array("rt", nursery, state_dir=tmp_path, opener=replicas.open)
    array.set_alg("alg_mirror")
    for n in ("a", "b"):
        replicas[n] = Replica(n)
    replicas["a"].data[0:4] = b"data"
    await array.add_node("file:///replica/a")
    await array.add_node("file:///replica/b")
    await settle(array)
    assert replicas["b"].data[0:4] == b"data"  # the first replica is the source
    await array.write(REGION, b"more")
    assert replicas["b"].data[REGION : REGION + 4] == b"more"
    saved = state.load(tmp_path)
    assert saved is not None and all(e.synced == saved.generation for e in saved.nodes)

    await array.remove_all_nodes()
    assert not (tmp_path / "bitmap-n-1").exists()
    replicas["c"], replicas["d"] = Replica("c"), Replica("d")
    replicas["c"].data[5:8] = b"new"
    await array.add_node("file:///replica/c")
    await array.add_node("file:///replica/d")
    await settle(array)
    assert replicas["d"].data == replicas["c"].data
    await array.write(0, b"x")
    assert replicas["d"].data[0:1] == b"x"


async def test_a_resync_ends_while_disk_img_stays_busy(
    nursery: trio.Nursery, replicas: dict, tmp_path: Path
) -> None:
    array = await mount(nursery, replicas, tmp_path, ["a", "b"])
    await settle(array)
    replicas["b"].down = True
    for r in (2, 5, 11):
        await array.write(r * REGION, b"d" * 512)
    rs = array.replicas
    assert rs is not None and rs.dirty_of(array.nodes[1]) == 3
    # Foreground I/O that never pauses: only the first worker copies, and
    # the others, paused, must still end once every region is taken.
    rs._foreground_busy = lambda: True  # type: ignore[method-assign]
    replicas["b"].down = False
    await settle(array, timeout=5)
    assert replicas["b"].data == replicas["a"].data


async def test_write_zeroes_reaches_every_replica(
    nursery: trio.Nursery, replicas: dict, tmp_path: Path
) -> None:
    array = await mount(nursery, replicas, tmp_path, ["a", "b"])
    await settle(array)
    await array.write(0, b"\x01" * (3 * REGION))
    await array.write_zeroes(REGION // 2, REGION)
    for r in replicas.values():
        assert r.data[: REGION // 2] == b"\x01" * (REGION // 2)
        assert r.data[REGION // 2 : REGION // 2 + REGION] == bytes(REGION)
        assert r.data[REGION // 2 + REGION : 3 * REGION] == b"\x01" * (REGION * 3 // 2)
    with pytest.raises(OSError) as e:
        await array.write_zeroes(SIZE - 10, 20)
    assert e.value.errno == errno.EINVAL


async def test_overlapping_writes_in_flight_reach_every_replica_in_one_order(
    nursery: trio.Nursery, replicas: dict, tmp_path: Path
) -> None:
    """Two overlapping writes in flight together: replica b is slow with the
    first. Were the second sent at once, a would end with the second's bytes
    and b with the first's (replicas that differ, nothing marked dirty)."""
    array = await mount(nursery, replicas, tmp_path, ["a", "b"])
    await settle(array)
    b = replicas["b"]
    gate = trio.Event()
    plain = b.pwrite
    first = True

    async def slow_first(offset: int, data: bytes, fua: bool = False) -> None:
        nonlocal first
        if first:
            first = False
            await gate.wait()
        await plain(offset, data, fua)

    b.pwrite = slow_first
    async with trio.open_nursery() as writers:
        writers.start_soon(array.write, 0, b"1" * 8192)
        await trio.testing.wait_all_tasks_blocked()
        writers.start_soon(array.write, 4096, b"2" * 8192)  # overlaps the first
        writers.start_soon(array.write, 65536 + 4096, b"3" * 4096)  # does not
        # The write that overlaps nothing is not held up by the slow one
        # (its region's first write marks the active bitmap, in a thread).
        with trio.fail_after(10):
            while b.data[65536 + 4096 : 65536 + 8192] != b"3" * 4096:
                await trio.sleep(0.01)
        assert replicas["a"].data[65536 + 4096 : 65536 + 8192] == b"3" * 4096
        assert not gate.is_set()
        gate.set()
    assert replicas["a"].data[: 3 * 4096] == b.data[: 3 * 4096]
    assert bytes(b.data[: 3 * 4096]) == b"1" * 4096 + b"2" * 8192


async def test_a_write_whose_only_in_sync_replica_goes_before_it_is_sent_waits_for_it(
    nursery: trio.Nursery, replicas: dict, tmp_path: Path
) -> None:
    """The last in-sync replica lost while the active bitmap is written: the
    write went only to a replica out of sync and got EIO (found by killing
    servers at random under fio)."""
    array = await mount(nursery, replicas, tmp_path, ["a", "b"])
    await settle(array)
    rs = array.replicas
    assert rs is not None
    a, b = replicas["a"], replicas["b"]
    # b out of sync and reachable: its resync cannot read region 5 from a.
    await array.nodes[1].suspend()
    await array.write(5 * REGION, b"x" * 512)
    a.read_errno, a.bad_range = errno.EIO, (5 * REGION, 6 * REGION)
    array.nodes[1].resume()
    assert not rs.replicas[1].in_sync
    writes = len(b.writes)
    mark = rs.active.mark  # type: ignore[union-attr]

    async def heal() -> None:
        while len(b.writes) == writes:  # until b took the write: a was not sent it
            await trio.sleep(0.005)
        a.down = False

    async def lose_a_first(regions: range) -> None:
        rs.active.mark = mark  # type: ignore[union-attr,method-assign]
        a.down = True
        array.nodes[0].lost("cut while the bitmap was written")
        nursery.start_soon(heal)
        await mark(regions)

    rs.active.mark = lose_a_first  # type: ignore[union-attr,method-assign]
    with trio.fail_after(10):
        await array.write(0, b"w" * 4096)  # waits for a, then lands there too
    assert bytes(a.data[:4096]) == b"w" * 4096
    a.read_errno = None
    await settle(array)
    assert b.data == a.data


async def test_a_flush_whose_only_in_sync_replica_loses_its_link_waits_for_it(
    nursery: trio.Nursery, replicas: dict, tmp_path: Path
) -> None:
    """fsync got EAGAIN (NodeUnavailable's errno) when the last in-sync
    replica's connection broke under the flush; a linear node's flush waits."""
    array = await mount(nursery, replicas, tmp_path, ["a", "b"])
    await settle(array)
    await array.nodes[1].suspend()
    a = replicas["a"]
    await array.write(0, b"f" * 4096)
    a.down = True  # the flush meets the broken connection

    async def heal() -> None:
        while array.nodes[0].ready:
            await trio.sleep(0.005)
        a.down = False

    nursery.start_soon(heal)
    flushes = a.flushes
    with trio.fail_after(10):
        await array.flush()
    assert a.flushes == flushes + 1
    assert states(array) == ["in_sync", "suspended"]
