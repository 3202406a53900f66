"""The migration write interlock, on trio's MockClock.

One layer: dstfs/migrate.py's `MigrationFilter` (and the RegionLock it
shares with the mirror's resync, dstfs/interlock.py) over two small fake
backends (old and new target) whose writes can be held. The copier's side
is `claim(i)` / `release(i)`; the foreground's side is `pwrite` (and trim).
What must hold (migrate.py's docstring):
- a write that meets a chunk being copied waits until it is released;
- `claim` waits for the writes already in flight on its chunk;
- a write to a chunk already claimed goes to both targets, a write beyond
  to the old one only; writes to other chunks are not held;
- the new target failing or staying silent ends the migration (`error`),
  not the write, which the old target acknowledged.
"""

from __future__ import annotations

import errno

import pytest
import trio
import trio.testing
from helpers.virtual import Task, bounded

from dstfs.backends.base import BackendBase
from dstfs.interlock import RegionLock
from dstfs.migrate import MigrationFilter

CHUNK = 64 * 1024
SIZE = 4 * CHUNK


class FakeBackend(BackendBase):
    """Bytes in memory; `hold` (an Event) keeps writes waiting until set;
    `fail` (an errno) fails writes; `silent` never answers them."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.data = bytearray(SIZE)
        self.hold: trio.Event | None = None
        self.fail: int | None = None
        self.silent = False
        self.writes: list[int] = []  # offsets, as writes completed

    @property
    def size(self) -> int:
        return len(self.data)

    async def pread(self, offset: int, length: int) -> bytes:
        await trio.sleep(0)
        return bytes(self.data[offset : offset + length])

    async def pwrite(self, offset: int, data: bytes, fua: bool = False) -> None:
        if self.hold is not None:
            await self.hold.wait()
        if self.silent:
            await trio.sleep_forever()
        if self.fail is not None:
            raise OSError(self.fail, "fake failure")
        self.data[offset : offset + len(data)] = data
        self.writes.append(offset)

    async def flush(self) -> None:
        pass

    async def trim(self, offset: int, length: int) -> None:
        await self.pwrite(offset, bytes(length))

    async def write_zeroes(self, offset: int, length: int, may_trim: bool = True) -> None:
        await self.pwrite(offset, bytes(length))

    async def aclose(self) -> None:
        pass


def make() -> tuple[MigrationFilter, FakeBackend, FakeBackend]:
    old, new = FakeBackend("old"), FakeBackend("new")
    return MigrationFilter(old, new, SIZE, chunk=CHUNK, timeout=5), old, new


@bounded
async def test_a_write_to_a_chunk_being_copied_waits_for_its_release(
    autojump_clock: trio.testing.MockClock,
) -> None:
    filt, old, new = make()
    async with trio.open_nursery() as nursery:
        await filt.claim(1)
        write = Task(nursery, filt.pwrite, CHUNK + 512, b"w" * 512)
        await trio.sleep(600)
        assert not write.done.is_set(), "a write went through a chunk being copied"
        assert old.writes == [] and new.writes == []
        filt.release(1)
        await write.done.wait()
    assert write.error is None
    # Claimed already: the write reached both targets.
    assert old.writes == [CHUNK + 512] and new.writes == [CHUNK + 512]
    assert filt.error is None


@bounded
async def test_a_write_straddling_into_a_chunk_being_copied_waits_too(
    autojump_clock: trio.testing.MockClock,
) -> None:
    filt, old, new = make()
    async with trio.open_nursery() as nursery:
        await filt.claim(2)
        write = Task(nursery, filt.pwrite, 2 * CHUNK - 512, b"s" * 1024)
        other = Task(nursery, filt.pwrite, 0, b"o" * 512)  # chunk 0: not held
        await other.done.wait()
        await trio.sleep(60)
        assert not write.done.is_set()
        filt.release(2)
        await write.done.wait()
    assert old.data[2 * CHUNK - 512 : 2 * CHUNK + 512] == b"s" * 1024
    assert new.data[2 * CHUNK - 512 : 2 * CHUNK + 512] == b"s" * 1024
    assert new.data[:512] == b"o" * 512  # chunk 0 <= claimed: mirrored


@bounded
async def test_claim_waits_for_the_writes_in_flight_on_its_chunk(
    autojump_clock: trio.testing.MockClock,
) -> None:
    filt, old, new = make()
    async with trio.open_nursery() as nursery:
        old.hold = trio.Event()
        write = Task(nursery, filt.pwrite, 512, b"a" * 512)  # chunk 0, in flight
        elsewhere = Task(nursery, filt.pwrite, 3 * CHUNK, b"b" * 512)  # chunk 3
        await trio.testing.wait_all_tasks_blocked()
        claim = Task(nursery, filt.claim, 0)
        await trio.sleep(600)
        assert not claim.done.is_set(), "the copier claimed a chunk with a write in flight"
        hold, old.hold = old.hold, None
        hold.set()
        await claim.done.wait()
        await write.done.wait()
        await elsewhere.done.wait()
        # The claim returned only once the write on its chunk had landed:
        # the copier's read of the chunk will see it.
        assert 512 in old.writes
        filt.release(0)
    # Both started before any claim: old target only (the copier carries them).
    assert new.writes == []


@bounded
async def test_writes_beyond_the_copier_go_to_the_old_target_only(
    autojump_clock: trio.testing.MockClock,
) -> None:
    filt, old, new = make()
    await filt.claim(0)
    filt.release(0)
    await filt.pwrite(0, b"c" * 512)
    await filt.pwrite(CHUNK, b"d" * 512)
    assert old.writes == [0, CHUNK]
    assert new.writes == [0]
    await filt.trim(0, 512)
    assert new.data[:512] == bytes(512)


@bounded
async def test_a_failing_new_target_ends_the_migration_not_the_write(
    autojump_clock: trio.testing.MockClock,
) -> None:
    filt, old, new = make()
    await filt.claim(0)
    filt.release(0)
    new.fail = errno.EIO
    await filt.pwrite(0, b"f" * 512)
    assert old.data[:512] == b"f" * 512
    assert filt.error is not None and "new target" in filt.error


@bounded
async def test_a_silent_new_target_fails_the_migration_after_its_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    filt, old, new = make()
    await filt.claim(0)
    filt.release(0)
    new.silent = True
    t0 = trio.current_time()
    await filt.pwrite(0, b"g" * 512)
    assert trio.current_time() - t0 == pytest.approx(filt.timeout)
    assert old.data[:512] == b"g" * 512
    assert filt.error is not None


@bounded
async def test_an_old_target_error_reaches_the_writer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    filt, old, _new = make()
    await filt.claim(0)
    filt.release(0)
    old.fail = errno.ENOSPC
    with pytest.raises(OSError) as e:
        await filt.pwrite(0, b"h" * 512)
    assert e.value.errno == errno.ENOSPC
    assert filt.error is None  # the new target did nothing wrong


# -- the RegionLock itself (dstfs/interlock.py), shared by migration and resync


@bounded
async def test_region_lock_claim_waits_for_writers_and_holds_new_ones(
    autojump_clock: trio.testing.MockClock,
) -> None:
    lock = RegionLock()
    async with trio.open_nursery() as nursery:
        await lock.enter(range(2, 4))  # a writer inside regions 2 and 3
        claim = Task(nursery, lock.claim, 3)
        await trio.sleep(600)
        assert not claim.done.is_set(), "claimed a region with a writer inside"
        other = Task(nursery, lock.enter, range(0, 2))  # not region 3: goes in
        await other.done.wait()
        lock.leave(range(0, 2))
        lock.leave(range(2, 4))
        await claim.done.wait()
        held = Task(nursery, lock.enter, range(3, 5))
        await trio.sleep(600)
        assert not held.done.is_set(), "a writer entered a region being copied"
        lock.release(3)
        await held.done.wait()
        lock.leave(range(3, 5))
    assert not lock.writers and not lock.copying


@bounded
async def test_region_lock_second_claimant_waits_its_turn(
    autojump_clock: trio.testing.MockClock,
) -> None:
    lock = RegionLock()
    async with trio.open_nursery() as nursery:
        await lock.claim(1)
        second = Task(nursery, lock.claim, 1)
        await trio.sleep(600)
        assert not second.done.is_set()
        lock.release(1)
        await second.done.wait()
        assert 1 in lock.copying
        lock.release(1)
    assert not lock.copying
