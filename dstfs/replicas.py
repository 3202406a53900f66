"""The mirror's replica set: which replicas are in sync, and the I/O rules.

Rules (md raid1 and DRBD are the models):
- A replica is *in sync* or not. Only in-sync replicas are read from; the
  state dir records, for each replica, the array generation at which it was
  last known in sync (`NodeEntry.synced`), and the generation goes up every
  time the in-sync set shrinks. After any crash or remount a replica whose
  `synced` is not the array's generation is resynced before it is read.
- Writes go to every replica that is reachable (in sync or resyncing) and
  are acknowledged once every one of them answered and at least one in-sync
  replica holds the data. A replica that fails a write, loses its
  connection, is suspended or failed leaves the in-sync set at once (it is
  not waited for: its node does not `hold`), and the regions it missed are
  marked in its bitmap, durably, before the write is acknowledged. A write
  that no in-sync replica holds gets EIO (or is resent once one is back),
  and its regions are marked for every replica out of sync, durably: it may
  have landed there, so they now differ from the in-sync one.
- Writes that overlap go to the replicas one after another: a write waits
  for every overlapping write in flight before it is sent, so each replica
  applies them in the same order (two in flight together could otherwise
  land in opposite orders on two replicas: replicas that differ with
  nothing marked). Writes that do not overlap still run side by side.
- The last in-sync replica never leaves the set: with no in-sync replica
  reachable, I/O waits for one (suspended or reconnecting) like a linear
  node's, and gets EIO once every in-sync replica is failed. Never a stale read.
- While all replicas are in sync, the regions with writes in flight are
  marked in the `active` bitmap before the first write to a region (only the
  first write pays) and cleared lazily once idle and flushed, so after a
  crash of the daemon the next mount resyncs exactly those regions (onto
  every replica but the one copied from, a resyncing one too).
- Regions written since a replica's last good flush are remembered: a flush
  that fails or a connection that breaks may have lost them on that
  replica, so they are marked dirty for it too.
- Reads go to the in-sync replica with the fewest requests in flight. A read
  that fails is retried on another replica, and the bad range is rewritten
  from the good copy (counted as read_errors / read_repairs).
- Resync (a returning replica's dirty regions; every region for a new or
  replaced replica) copies region by region from an in-sync replica under
  the write interlock, paced like migration; all-zero source data is sent as
  WRITE_ZEROES, never as bytes. When no dirty region is left the replica is
  in sync again, recorded in the state dir.
- `check` / `repair` (the `sync_action` file) compare every region of the
  in-sync replicas under the interlock, counting mismatched sectors;
  `repair` rewrites the others from the first in-sync replica.
- Every state change is logged with the replica and the reason.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
import trio

from dstfs import sparse, state
from dstfs.algorithms.base import SECTOR
from dstfs.bitmap import RegionBitmap
from dstfs.interlock import RegionLock
from dstfs.iotypes import Buffer
from dstfs.jobs import Job
from dstfs.node import Node, NodeUnavailable, State

if TYPE_CHECKING:
    from dstfs.algorithms.mirror import Mirror
    from dstfs.array import Array

log = logging.getLogger(__name__)

#: A region with no write for this long is cleared from the active bitmap.
ACTIVE_IDLE = 3.0
CLEAN_EVERY = 1.0
#: Regions copied between flushes of the replica being resynced.
RESYNC_BATCH = 64
#: Resync workers while disk.img is idle; one while it is in use.
RESYNC_WORKERS = 4
FOREGROUND_WINDOW = 0.2
YIELD_SLEEP = 0.05
RETRY_MIN = 0.5
RETRY_MAX = 10.0


@attrs.define
class MirrorStats:
    degraded_writes: int = 0
    read_errors: int = 0
    read_repairs: int = 0
    resync_regions: int = 0
    resync_bytes: int = 0
    resync_zero_bytes: int = 0
    mismatch_cnt: int = 0


@attrs.define(eq=False)
class Replica:
    node: Node
    bitmap: RegionBitmap
    in_sync: bool = False
    #: Regions written since this replica's last good flush.
    written: set[int] = attrs.Factory(set)
    #: Regions copied by the running resync and not marked again since.
    clean: set[int] = attrs.Factory(set)
    resyncing: bool = False
    sync_done: int = 0
    sync_total: int = 0
    retry_delay: float = RETRY_MIN
    #: Raised when the replica gets a new target: a copy made for the old
    #: one (finished, or still in flight then) must not count for the new.
    target_epoch: int = 0

    @property
    def name(self) -> str:
        return self.node.name

    def mark(self, regions: Iterable[int]) -> None:
        """This replica misses `regions` (durable with the next flush of its
        bitmap)."""
        regions = list(regions)
        self.bitmap.add(regions)
        self.clean.difference_update(regions)


class ReplicaSet:
    def __init__(self, array: Array) -> None:
        self.array = array
        self.replicas: list[Replica] = []
        self.lock = RegionLock()
        self.stats = MirrorStats()
        self.active: RegionBitmap | None = None
        self._active_count: dict[int, int] = {}
        self._active_last: dict[int, float] = {}
        #: Writes in flight by region: (start, end, done) of each.
        self._writing: dict[int, list[tuple[int, int, trio.Event]]] = {}
        self._changed = trio.Event()
        self._started = False
        self.sync_action = "idle"
        self.sync_done = 0
        self.sync_total = 0
        self._verify_job: Job | None = None
        self._fg_count = -1
        self._fg_time = 0.0
        self._turn = 0

    @property
    def alg(self) -> Mirror:
        return self.array.alg  # type: ignore[return-value]

    # -- membership

    def _bitmap_path(self, name: str) -> Path | None:
        sd = self.array.state_dir
        return None if sd is None else sd / f"bitmap-{name}"

    def attach(self, node: Node) -> Replica:
        """A replica joins: at mount (start() decides, from the state dir,
        whether it is in sync), or at run time: then the first replica of an
        empty mirror holds the disk, and any other is fully synced."""
        node.hold = False
        node.on_change = self._on_change
        if not self._started:
            # Bitmaps are opened by start(), once the disk's size (and so
            # the region count) is known.
            rep = Replica(node, RegionBitmap(None, 0))
            self.replicas.append(rep)
            return rep
        first = not self.replicas
        if first:  # the disk's size is known only now
            if self.active is not None:
                self.active.close()
            self.active = _open_bitmap(self._bitmap_path("active"), self.alg.regions)
            self.active.clear_all()
        bm = _open_bitmap(self._bitmap_path(f"n-{len(self.replicas)}"), self.alg.regions)
        rep = Replica(node, bm, in_sync=first)
        self.replicas.append(rep)
        if first:
            bm.clear_all()  # a stale file of an earlier array
            self._state_changed(rep, "first replica")
        else:
            bm.mark_all()
            log.warning("%s: new replica: full sync of %d regions", node.name, len(bm))
            self._state_changed(rep, "added")
            self._maybe_resync(rep)
        return rep

    def start(self, generation: int, entries: list[state.NodeEntry], force: int | None) -> None:
        """After the nodes of a mount are attached: decide which replicas
        are good, turn a crash's active regions into dirty regions, start
        the background work. ValueError when no replica is known good."""
        for i, rep in enumerate(self.replicas):
            rep.bitmap = _open_bitmap(self._bitmap_path(f"n-{i}"), self.alg.regions)
        # A replica with dirty regions is behind, whatever the state file
        # says (a state write may have failed after its bitmap was written).
        good = [
            e.synced == generation and not len(rep.bitmap)
            for e, rep in zip(entries, self.replicas, strict=True)
        ]
        if force is not None:
            if not 0 <= force < len(entries):
                raise ValueError(f"--force-replica n-{force}: no such replica")
            log.warning(
                "%s: replica n-%d forced good; every other replica gets a full sync",
                self.array.name,
                force,
            )
            good = [i == force for i in range(len(entries))]
            for i, rep in enumerate(self.replicas):
                if i != force:
                    rep.bitmap.mark_all()
        elif self.replicas and not any(good):
            raise ValueError(
                "no replica is known to be in sync (the state dir records none at "
                f"generation {generation}); mount with --force-replica n-X to choose one"
            )
        self.active = _open_bitmap(self._bitmap_path("active"), self.alg.regions)
        crashed = list(self.active)
        # The source for a crash's regions: a good replica reachable now.
        ready_good = [i for i, g in enumerate(good) if g and self.replicas[i].node.ready]
        first = ready_good[0] if ready_good else (good.index(True) if any(good) else None)
        for i, rep in enumerate(self.replicas):
            rep.in_sync = good[i]
            if not good[i] and not len(rep.bitmap) and entries[i].synced is None:
                rep.bitmap.mark_all()  # never synced: everything
            if crashed and i != first:
                # Writes were in flight here at a crash: this copy may differ
                # from the first good one until those regions are resynced.
                # A replica that was resyncing got them too, maybe in regions
                # its resync had done and cleared: they go back in its bitmap.
                rep.mark(crashed)
                rep.in_sync = False
        if crashed:
            log.warning(
                "%s: %d regions had writes in flight when the array stopped: resyncing them",
                self.array.name,
                len(crashed),
            )
        # A replica that cannot be reached now is not in sync (unless it is
        # the only good one: then I/O waits for it, as on a linear node).
        for rep in self.replicas:
            if rep.in_sync and not rep.node.ready and self.in_sync_count() > 1:
                rep.in_sync = False
                log.error("%s: out of sync (unreachable at mount)", rep.name)
        self._started = True
        if [r.in_sync for r in self.replicas] != good or force is not None:
            self.array.generation += 1  # who is good changed: a new generation
        self._persist()
        if crashed:
            self.active.clear_all()
        for rep in self.replicas:
            if not rep.in_sync:
                log.warning(
                    "%s: out of sync, %d dirty regions to resync", rep.name, len(rep.bitmap)
                )
                self._maybe_resync(rep)
        self.array.jobs.start(f"{self.array.name}: bitmap cleaner", self._cleaner)

    def start_empty(self) -> None:
        """A mirror chosen at run time (`alg`), before it has nodes."""
        self.start(self.array.generation, [], None)

    async def replace(self, node: Node, swap: Callable[[], None]) -> None:
        """`migrate`/`target` of a replica: `swap()` points the node at its
        new target, which is then fully synced (zeroes are not sent). The
        old target is out of the in-sync set (and its marks durable) first."""
        rep = self._rep(node)
        if rep.in_sync and self.in_sync_count() == 1:
            raise OSError(errno.EBUSY, "the only in-sync replica cannot be replaced")
        self._leave(rep, "being replaced by a new target")
        rep.bitmap.mark_all()
        # A resync may be running: what it copied to the old target is not
        # on the new one (its marks would be cleared at its next flush).
        rep.target_epoch += 1
        rep.clean.clear()
        rep.written.clear()
        await self._flush_bitmap(rep)
        swap()
        log.warning("%s: new target: full sync of %d regions", rep.name, len(rep.bitmap))
        self._maybe_resync(rep)

    def close(self) -> None:
        for rep in self.replicas:
            rep.bitmap.close()
        if self.active is not None:
            self.active.close()

    def forget(self) -> None:
        """Every replica removed (remove_all_nodes): their bitmaps go too."""
        self.close()
        for rep in self.replicas:
            _unlink(rep.bitmap.path)
        if self.active is not None:
            _unlink(self.active.path)
        self.replicas = []
        self.active = None

    # -- what a person sees

    def _rep(self, node: Node) -> Replica:
        for rep in self.replicas:
            if rep.node is node:
                return rep
        raise KeyError(node.name)

    def in_sync_count(self) -> int:
        return sum(r.in_sync for r in self.replicas)

    @property
    def degraded(self) -> int:
        return sum(not r.in_sync for r in self.replicas)

    def state_of(self, node: Node) -> str:
        rep = self._rep(node)
        ns = node.state
        if ns in (State.SUSPENDED, State.FAILED, State.RECONNECTING):
            return ns.value
        if rep.resyncing:
            return f"resyncing {rep.sync_done}/{rep.sync_total}"
        return "in_sync" if rep.in_sync else "degraded"

    def dirty_of(self, node: Node) -> int:
        return len(self._rep(node).bitmap)

    def show_sync(self) -> str:
        if self.sync_action == "idle":
            return "none\n"
        return f"{self.sync_done} / {self.sync_total}\n"

    # -- state changes

    def _on_change(self, node: Node) -> None:
        try:
            rep = self._rep(node)
        except KeyError:
            return
        if not node.ready:
            if rep.in_sync and self._started:
                self._leave(rep, f"node is {node.state.value}")
            if rep.written:
                # Unflushed writes may be lost with the connection: resync
                # them too, and say so durably (a crash must not forget it).
                rep.mark(rep.written)
                rep.written.clear()
                self.array.nursery.start_soon(self._flush_quietly, rep)
        else:
            self._maybe_resync(rep)
        self._wake()

    def _wake(self) -> None:
        ev, self._changed = self._changed, trio.Event()
        ev.set()

    def _leave(self, rep: Replica, reason: str) -> bool:
        """Take `rep` out of the in-sync set (never the last one)."""
        if not rep.in_sync:
            return True
        if self.in_sync_count() <= 1:
            log.error("%s: %s, but it is the last in-sync replica: kept", rep.name, reason)
            return False
        rep.in_sync = False
        if rep.written:  # unflushed there: may be lost with it
            rep.mark(rep.written)
            rep.written.clear()
            self.array.nursery.start_soon(self._flush_quietly, rep)
        self.array.generation += 1
        log.error(
            "%s: out of sync (%s); the array is degraded, generation %d",
            rep.name,
            reason,
            self.array.generation,
        )
        self._state_changed(rep, reason)
        return True

    def _state_changed(self, rep: Replica, reason: str) -> None:
        try:
            self._persist()
        except OSError as e:
            log.error("%s: cannot record the replica state (%s): %s", rep.name, reason, e)

    def _persist(self) -> None:
        """Record who is in sync: `synced` = the generation for those that
        are; the others keep an older one (every change that takes a replica
        out bumps the generation first)."""
        gen = self.array.generation
        entries = list(self.array.entries)
        for i, rep in enumerate(self.replicas):
            if rep.in_sync and entries[i].synced != gen:
                entries[i] = attrs.evolve(entries[i], synced=gen)
        self.array.entries = entries
        self.array.persist()

    async def _flush_quietly(self, rep: Replica) -> None:
        with contextlib.suppress(OSError):  # the bitmap logs it; tried again later
            await rep.bitmap.flush()

    async def _flush_bitmap(self, rep: Replica) -> None:
        try:
            await rep.bitmap.flush()
        except OSError as e:
            raise OSError(errno.EIO, f"{rep.name}: bitmap not written: {e}") from None

    # -- I/O

    def _readable(self) -> list[Replica]:
        return [r for r in self.replicas if r.in_sync and r.node.ready]

    async def _wait_for_replica(self) -> None:
        """No in-sync replica can take I/O: wait for one (like a linear
        node's gate), EIO once they have all failed."""
        while not self._readable():
            if all(r.node.state is State.FAILED for r in self.replicas if r.in_sync):
                raise OSError(errno.EIO, f"{self.array.name}: every in-sync replica has failed")
            await self._changed.wait()

    async def readinto(self, offset: int, view: memoryview) -> None:
        length = len(view)
        bad: list[Replica] = []
        while True:
            choices = [r for r in self._readable() if r not in bad]
            if not choices:
                if bad:  # every reachable copy failed this read
                    raise OSError(errno.EIO, f"{self.array.name}: no replica could read it")
                await self._wait_for_replica()
                continue
            # Fewest in flight (a slow replica gets fewer); ties in turn.
            self._turn += 1
            n, turn = len(choices), self._turn
            rep = choices[min(range(n), key=lambda i: (choices[i].node.inflight, (i + turn) % n))]
            try:
                await rep.node.read(offset, length, [view])
            except NodeUnavailable:
                continue  # its on_change took it out of the set
            except OSError as e:
                self.stats.read_errors += 1
                log.warning(
                    "%s: read %d+%d failed (%s); trying another replica",
                    rep.name,
                    offset,
                    length,
                    e,
                )
                bad.append(rep)
                continue
            break
        for b in bad:
            if b.in_sync:
                await self._repair_range(rep, b, offset, length)

    async def _repair_range(self, good: Replica, bad: Replica, offset: int, length: int) -> None:
        """md's read-error correction: rewrite the range on `bad` from
        `good`, region by region under the interlock."""
        for region in self.alg.region_range(offset, length):
            try:
                ok = await self._copy_region(good, bad, region)
            except OSError as e:
                # The reader has its data: only the rewrite failed (the good
                # copy could not read the whole region). Not the reader's
                # error (it got EIO); the next read error tries again.
                log.warning(
                    "%s: rewrite of region %d from %s after a read error failed: %s",
                    bad.name,
                    region,
                    good.name,
                    e,
                )
                return
            if not ok:
                self._maybe_resync(bad)
                return
        self.stats.read_repairs += 1
        log.warning(
            "%s: rewrote %d+%d from %s after a read error", bad.name, offset, length, good.name
        )

    async def write(self, offset: int, data: Buffer) -> None:
        await self._update(offset, len(data), lambda node: node.write(offset, data))

    async def write_zeroes(self, offset: int, length: int, may_trim: bool = True) -> None:
        """Zeroes on every replica (also what a TRIM does here: replicas
        must read the same afterwards)."""
        await self._update(offset, length, lambda node: node.write_zeroes(offset, length, may_trim))

    async def _update(
        self, offset: int, length: int, op: Callable[[Node], Awaitable[None]]
    ) -> None:
        """A change to [offset, offset+length), `op` on every reachable replica."""
        regions = self.alg.region_range(offset, length)
        entry = await self._order(offset, offset + length, regions)
        try:
            await self.lock.enter(regions)
        except BaseException:
            self._ordered(entry, regions)
            raise
        for r in regions:
            self._active_count[r] = self._active_count.get(r, 0) + 1
        try:
            while not await self._update_once(offset, length, op, regions):
                pass  # the last in-sync replica went away under it: wait, resend
        finally:
            self._ordered(entry, regions)
            now = time.monotonic()
            for r in regions:
                n = self._active_count[r] - 1
                if n:
                    self._active_count[r] = n
                else:
                    del self._active_count[r]
                self._active_last[r] = now
            self.lock.leave(regions)

    async def _order(self, start: int, end: int, regions: range) -> tuple[int, int, trio.Event]:
        """Wait until no write in flight overlaps [start, end), then count
        this one in (see the module's rules)."""
        writing = self._writing
        while True:
            busy = None
            for r in regions:
                for s, e, done in writing.get(r, ()):
                    if s < end and start < e:
                        busy = done
                        break
                if busy is not None:
                    break
            if busy is None:
                break
            await busy.wait()
        entry = (start, end, trio.Event())
        for r in regions:
            writing.setdefault(r, []).append(entry)
        return entry

    def _ordered(self, entry: tuple[int, int, trio.Event], regions: range) -> None:
        """A write is done: overlapping writes waiting on it may go."""
        for r in regions:
            inflight = self._writing[r]
            inflight.remove(entry)
            if not inflight:
                del self._writing[r]
        entry[2].set()

    async def _update_once(
        self, offset: int, length: int, op: Callable[[Node], Awaitable[None]], regions: range
    ) -> bool:
        if not self._readable():
            await self._wait_for_replica()
        if self.active is not None:
            try:
                await self.active.mark(regions)
            except OSError as e:
                raise OSError(errno.EIO, f"write-intent bitmap: {e}") from None
        targets = [r for r in self.replicas if r.node.ready]
        missing = [r for r in self.replicas if not r.node.ready]
        failed: list[tuple[Replica, OSError]] = []

        async def one(rep: Replica) -> None:
            try:
                await op(rep.node)
            except OSError as e:
                failed.append((rep, e))
            else:
                rep.written.update(regions)

        async with trio.open_nursery() as nursery:
            for rep in targets:
                nursery.start_soon(one, rep)
        for rep, e in failed:
            if not isinstance(e, NodeUnavailable):
                log.warning("%s: write %d+%d failed: %s", rep.name, offset, length, e)
            missing.append(rep)
        held = [r for r in targets if r.in_sync and all(r is not f for f, _ in failed)]
        if not held:
            # No in-sync replica holds it: not acknowledged. If they only
            # went away (suspend, lost link), send it again once one is back;
            # a storage error goes to the caller.
            errors = [e for f, e in failed if f.in_sync]
            if all(isinstance(e, NodeUnavailable) for e in errors):
                # Also with no error at all: the last in-sync replica went
                # away before the write was sent (while the active bitmap
                # was written), and only others took it; before, EIO.
                # The others that took it are marked too: the resend may
                # never come (every in-sync replica failed meanwhile).
                await self._failed_write(regions, [])
                return False
            err = errors[0]
            await self._failed_write(regions, [f for f, _ in failed if f.in_sync])
            raise OSError(err.errno or errno.EIO, str(err))
        if missing:
            self.stats.degraded_writes += 1
            for rep in missing:
                if rep.in_sync:
                    self._leave(rep, "write failed")
            await self._resync_regions(missing, regions)
        return True

    async def _resync_regions(self, reps: list[Replica], regions: range) -> None:
        """`regions` marked in each of `reps`' bitmaps, durably, then each
        one's resync started: one still connected (a write error, not a lost
        link) gets no on_change that would start it (see _maybe_resync)."""
        for rep in reps:
            rep.mark(regions)
        for rep in reps:
            await self._flush_bitmap(rep)
        for rep in reps:
            self._maybe_resync(rep)

    async def _failed_write(self, regions: range, failed_in_sync: list[Replica]) -> None:
        """A write that no in-sync replica holds gets EIO, but the others
        may hold it (a resyncing replica, one of several in-sync ones that
        failed): the range now differs between replicas. One in-sync replica
        stays the reference; every other one gets the regions resynced from
        it (before, nothing was marked: replicas that differed for good)."""
        for rep in failed_in_sync:
            self._leave(rep, "write failed")  # the last in-sync one is kept
        await self._resync_regions([r for r in self.replicas if not r.in_sync], regions)

    async def flush(self) -> None:
        while not await self._flush_once():
            pass  # the last in-sync replica went away under it: wait, flush again

    async def _flush_once(self) -> bool:
        """False when the flush must be sent again: the last in-sync replica
        lost its connection under it (it is kept; a linear node's flush waits
        for the reconnect the same way). Before, fsync got EAGAIN."""
        if not self._readable():
            await self._wait_for_replica()
        targets = [r for r in self.replicas if r.node.ready]
        failed: list[tuple[Replica, OSError]] = []

        async def one(rep: Replica) -> None:
            written = set(rep.written)
            try:
                await rep.node.flush()
            except OSError as e:
                failed.append((rep, e))
            else:
                rep.written -= written

        async with trio.open_nursery() as nursery:
            for rep in targets:
                nursery.start_soon(one, rep)
        again = False
        error: OSError | None = None
        for rep, e in failed:
            log.warning("%s: flush failed: %s", rep.name, e)
            if not self._leave(rep, f"flush failed: {e}"):
                if isinstance(e, NodeUnavailable):
                    again = True
                else:
                    error = error or e
                continue
            rep.mark(rep.written)
            rep.written.clear()
            await self._flush_bitmap(rep)
            self._maybe_resync(rep)
        if error is not None:
            raise OSError(error.errno or errno.EIO, str(error))
        if again:
            return False
        if not any(r.in_sync for r in targets if all(r is not f for f, _ in failed)):
            raise OSError(errno.EIO, "no in-sync replica was flushed")
        return True

    # -- copying (resync, repair, verify)

    def _foreground_busy(self) -> bool:
        stats = self.array.stats
        count = stats.reads + stats.writes
        now = time.monotonic()
        if count != self._fg_count:
            self._fg_count, self._fg_time = count, now
        return now - self._fg_time < FOREGROUND_WINDOW

    def _source(self, exclude: Replica) -> Replica | None:
        choices = [r for r in self._readable() if r is not exclude]
        return min(choices, key=lambda r: r.node.inflight) if choices else None

    async def _copy_region(self, src: Replica, dst: Replica, region: int) -> bool:
        """Copy one region from `src` to `dst` under the interlock. False
        (and `dst` marked dirty there) when `dst` failed; OSError when `src` did."""
        size = self.alg.size
        offset = region * self.alg.region
        length = min(self.alg.region, size - offset)
        if length <= 0:
            return True
        epoch = dst.target_epoch
        await self.lock.claim(region)
        try:
            if src.node.can_block_status and await sparse.reads_as_zeroes(
                src.node.block_status, offset, length
            ):
                data: Buffer = sparse.zeros(length)  # a hole: not even read
            else:
                got = await src.node.read(offset, length)
                assert got is not None
                data = got
            try:
                view = memoryview(data)
                for off, n, zero in sparse.runs(data):  # zeroes: no bytes sent
                    if zero:
                        await dst.node.write_zeroes(offset + off, n)
                        self.stats.resync_zero_bytes += n
                    else:
                        await dst.node.write(offset + off, view[off : off + n])
                        self.stats.resync_bytes += n
            except OSError as e:
                if not isinstance(e, NodeUnavailable):
                    log.warning("%s: copy of region %d failed: %s", dst.name, region, e)
                self._leave(dst, f"copy failed: {e}")
                dst.mark((region,))
                return False
            if dst.target_epoch == epoch:  # else copied to a target since replaced
                dst.written.add(region)
                dst.clean.add(region)
            return True
        finally:
            self.lock.release(region)

    def _maybe_resync(self, rep: Replica) -> None:
        """Start `rep`'s resync if it is out of sync and reachable. Called
        when a node comes back (on_change) and wherever a replica that is
        still connected fails an I/O (its node's state does not change, so
        no on_change would ever start it: it stayed degraded for ever)."""
        if (
            self._started
            and not rep.in_sync
            and not rep.resyncing
            and rep.node.ready
            and self.replicas
        ):
            rep.resyncing = True
            self.array.jobs.start(f"resync {rep.name}", partial(self._resync, rep))

    async def _resync(self, rep: Replica) -> None:
        try:
            await self._resync_inner(rep)
        finally:
            rep.resyncing = False
        if not rep.in_sync and rep.node.ready and rep in self.replicas:
            # Stopped by an error: try again after a pause.
            await trio.sleep(rep.retry_delay)
            rep.retry_delay = min(rep.retry_delay * 2, RETRY_MAX)
            self._maybe_resync(rep)

    async def _resync_inner(self, rep: Replica) -> None:
        t0 = time.monotonic()
        rep.sync_done = rep.sync_total = 0
        sent0 = self.stats.resync_bytes
        log.warning("%s: resync of %d regions started", rep.name, len(rep.bitmap))
        while len(rep.bitmap):
            todo = sorted(rep.bitmap)
            rep.sync_total += len(todo)
            rep.clean.clear()
            if not await self._copy_regions(rep, todo):
                log.warning("%s: resync stopped with %d dirty regions", rep.name, len(rep.bitmap))
                return
        if not rep.node.ready:
            return
        rep.in_sync = True
        rep.retry_delay = RETRY_MIN
        log.warning(
            "%s: in sync again: %d regions in %.1f s, %d bytes sent",
            rep.name,
            rep.sync_done,
            time.monotonic() - t0,
            self.stats.resync_bytes - sent0,
        )
        self._state_changed(rep, "resynced")
        self._wake()

    async def _copy_regions(self, rep: Replica, todo: list[int]) -> bool:
        """Copy `todo` to `rep`, RESYNC_WORKERS at a time while disk.img is
        idle and one while it is in use; every RESYNC_BATCH regions the
        replica is flushed and only then are their marks cleared. False when
        the replica or every source went away."""
        queue = collections.deque(todo)
        failed = False

        async def settle() -> None:
            # Durable on the replica first, then the marks may go; a region
            # marked again since its copy (a write failed there) stays.
            batch = list(rep.clean)
            epoch = rep.target_epoch
            if batch:
                await rep.node.flush()
                if rep.target_epoch != epoch:  # flushed the old target
                    return
                done = [r for r in batch if r in rep.clean]
                rep.clean.difference_update(done)
                rep.bitmap.clear(done)
                rep.written.difference_update(done)

        async def worker(number: int) -> None:
            nonlocal failed
            # A paused worker ends once the queue is empty: while disk.img
            # stays busy it would otherwise wait for ever, and the resync
            # with it.
            while not failed and queue:
                # Take a region only when allowed to copy it now: a worker
                # that waited holding one would hold up the resync's end.
                if number and self._foreground_busy():
                    await trio.sleep(YIELD_SLEEP)
                    continue
                region = queue.popleft()
                src = self._source(rep)
                if failed or src is None or not rep.node.ready:
                    failed = True
                    return
                try:
                    ok = await self._copy_region(src, rep, region)
                except OSError as e:
                    # Stays dirty; the source's own errors take it out of sync.
                    log.warning("%s: resync read from %s failed: %s", rep.name, src.name, e)
                    failed = True
                    return
                if not ok:
                    failed = True
                    return
                rep.sync_done += 1
                self.stats.resync_regions += 1
                if len(rep.clean) >= RESYNC_BATCH:
                    try:
                        await settle()
                    except OSError:
                        failed = True
                        return

        async with trio.open_nursery() as nursery:
            for number in range(RESYNC_WORKERS):
                nursery.start_soon(worker, number)
        if failed:
            return False
        try:
            await settle()
            await rep.bitmap.flush()
        except OSError as e:
            log.warning("%s: flush after resync failed: %s", rep.name, e)
            return False
        return True

    # -- the active-region bitmap

    async def _cleaner(self) -> None:
        """Clear active regions idle for ACTIVE_IDLE s, after a flush of
        every in-sync replica has made their data durable."""
        while self._started:
            await trio.sleep(CLEAN_EVERY)
            active = self.active
            if active is None or not len(active):
                continue
            now = time.monotonic()
            idle = [
                r
                for r in active
                if r not in self._active_count
                and now - self._active_last.get(r, 0.0) >= ACTIVE_IDLE
            ]
            if not idle:
                continue
            started = time.monotonic()
            try:
                await self.flush()
            except OSError as e:
                log.warning("%s: flush before clearing the bitmap: %s", self.array.name, e)
                continue
            done = [
                r
                for r in idle
                if r not in self._active_count and self._active_last.get(r, 0.0) < started
            ]
            active.clear(done)
            for r in done:
                self._active_last.pop(r, None)
            with contextlib.suppress(OSError):  # logged there; tried next round
                await active.flush()

    # -- verify

    def start_verify(self, action: str) -> None:
        if action == "idle":
            if self._verify_job is not None:
                self._verify_job.cancel()
            return
        if self.sync_action != "idle":
            raise OSError(errno.EBUSY, f"{self.sync_action} is running")
        if self.in_sync_count() < 2:
            raise OSError(errno.EINVAL, "fewer than two in-sync replicas to compare")
        self.sync_action = action
        self.stats.mismatch_cnt = 0
        self.sync_done = 0
        self.sync_total = self.alg.size // SECTOR
        self._verify_job = self.array.jobs.start(
            f"{self.array.name}: {action}", partial(self._verify, action == "repair")
        )

    async def _verify(self, repair: bool) -> None:
        what = "repair" if repair else "check"
        log.warning("%s: %s started", self.array.name, what)
        done = False
        try:
            for region in range(self.alg.regions):
                if self._foreground_busy():  # paced, never stopped, by foreground I/O
                    await trio.sleep(YIELD_SLEEP)
                await self._verify_region(region, repair)
                offset = min((region + 1) * self.alg.region, self.alg.size)
                self.sync_done = offset // SECTOR
            done = True
        finally:
            log.warning(
                "%s: %s %s: %d mismatched sectors",
                self.array.name,
                what,
                "done" if done else "stopped",
                self.stats.mismatch_cnt,
            )
            self._verify_job = None
            self.sync_action = "idle"

    async def _verify_region(self, region: int, repair: bool) -> None:
        offset = region * self.alg.region
        length = min(self.alg.region, self.alg.size - offset)
        await self.lock.claim(region)
        try:
            reps = self._readable()
            if len(reps) < 2:
                return
            datas: list[Buffer | None] = [None] * len(reps)

            async def read(i: int) -> None:
                try:
                    datas[i] = await reps[i].node.read(offset, length)
                except OSError as e:
                    log.warning("%s: verify read of region %d failed: %s", reps[i].name, region, e)

            async with trio.open_nursery() as nursery:
                for i in range(len(reps)):
                    nursery.start_soon(read, i)
            first = datas[0]
            if first is None:
                return
            for rep, data in zip(reps[1:], datas[1:], strict=True):
                if data is None or data == first:
                    continue
                self.stats.mismatch_cnt += length // SECTOR
                log.warning("%s: region %d differs from %s", rep.name, region, reps[0].name)
                if repair:
                    try:
                        await rep.node.write(offset, first)
                    except OSError as e:
                        self._leave(rep, f"repair write failed: {e}")
                        rep.mark((region,))
                        self._maybe_resync(rep)
        finally:
            self.lock.release(region)


def _open_bitmap(path: Path | None, regions: int) -> RegionBitmap:
    return RegionBitmap(None, regions) if path is None else RegionBitmap.open(path, regions)


def _unlink(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()
