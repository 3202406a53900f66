"""Live migration and repointing of a node.

Rules of a migration (DESIGN.md, "Live migration"):
- The node's used range is copied to the new target in chunks, in order,
  four in flight while the disk is idle and one while it is in use (so the
  foreground keeps most of the bandwidth), while the disk stays in use. Reads
  are served by the old target throughout.
- The node's backend is wrapped by `MigrationFilter` while copying. A write
  that reaches a chunk already claimed by the copier goes to both targets; a
  write beyond goes to the old one only (the copier will carry it over). A
  write that meets a chunk being copied waits for that chunk; the copier
  waits for writes already in flight on its chunk before reading it. So no
  acknowledged write can be missed on the new target.
- When every chunk is copied: the node is drained (its gate held shut for a
  moment), the new target is flushed, the node switches to it, the state dir
  is rewritten, the gate reopens, and the old connection is closed.
- A chunk of zeroes (a hole) is sent as WRITE_ZEROES, not as bytes.
- Any error on the new target, or `cancel`, ends the migration as
  `failed: reason`: the filter is removed and the old target stays, having
  received every write all along. Nothing is lost.
"""

from __future__ import annotations

import errno
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial

import trio

from dstfs import sparse
from dstfs.array import Array, ArrayError
from dstfs.backends.base import Backend, BackendFilter
from dstfs.interlock import RegionLock
from dstfs.iotypes import Buffer
from dstfs.members import admitting
from dstfs.node import DEFAULT_TIMEOUT as DEFAULT_NODE_TIMEOUT
from dstfs.node import Node
from dstfs.uri import NodeSpec, parse_node

log = logging.getLogger(__name__)

CHUNK = 2 << 20
#: Chunks in flight when the disk is idle; one while it is in use.
WORKERS = 4
FOREGROUND_WINDOW = 0.2
YIELD_SLEEP = 0.05


class MigrationFailed(Exception):
    pass


class MigrationFilter(BackendFilter):
    """Old target underneath; mirrors writes to the new target as needed."""

    def __init__(
        self,
        old: Backend,
        new: Backend,
        size: int,
        chunk: int = CHUNK,
        timeout: float = DEFAULT_NODE_TIMEOUT,
    ) -> None:
        super().__init__(old)
        self.new = new
        #: Seconds the new target may take for one request before the
        #: migration is failed (a silent target must not hold the node).
        self.timeout = timeout
        self.chunk = chunk
        self.nchunks = math.ceil(size / chunk)
        #: Highest chunk index handed to a copier so far (-1: none).
        self.claimed = -1
        #: Writers against the copier, chunk by chunk (dstfs.interlock).
        self.lock = RegionLock()
        self.error: str | None = None

    def _chunks(self, offset: int, length: int) -> range:
        return range(offset // self.chunk, (offset + max(length, 1) - 1) // self.chunk + 1)

    async def _mirror(self, op: Callable[[Backend], Awaitable[object]], chunks: range) -> None:
        """Run `op` on the old target, and on the new one if the copier has
        reached these chunks; new-target errors end the migration, not the op."""
        await self.lock.enter(chunks)
        try:
            if self.error is None and chunks.start <= self.claimed:
                err: list[OSError] = []

                async def to_new() -> None:
                    try:
                        await self.on_new(op(self.new))
                    except OSError as e:
                        err.append(e)

                old_err: OSError | None = None
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(to_new)
                    try:
                        await op(self.inner)
                    except OSError as e:  # raised outside the nursery: no group
                        old_err = e
                if err:
                    self.fail(f"write to the new target failed: {err[0]}")
                if old_err is not None:
                    raise old_err
            else:
                await op(self.inner)
        finally:
            self.lock.leave(chunks)

    async def on_new(self, request: Awaitable[object]) -> None:
        """Await a request to the new target; no answer within the timeout is
        ETIMEDOUT."""
        try:
            with trio.fail_after(self.timeout):
                await request
        except trio.TooSlowError:
            raise OSError(errno.ETIMEDOUT, f"no answer in {self.timeout:g} s") from None

    async def pread_into(self, offset: int, views: list[memoryview]) -> None:
        await self.inner.pread_into(offset, views)  # reads: the old target, unchanged

    async def pwrite(self, offset: int, data: Buffer, fua: bool = False) -> None:
        await self._mirror(lambda b: b.pwrite(offset, data, fua), self._chunks(offset, len(data)))

    async def trim(self, offset: int, length: int) -> None:
        await self._mirror(lambda b: b.trim(offset, length), self._chunks(offset, length))

    async def write_zeroes(self, offset: int, length: int, may_trim: bool = True) -> None:
        await self._mirror(
            lambda b: b.write_zeroes(offset, length, may_trim), self._chunks(offset, length)
        )

    def fail(self, reason: str) -> None:
        if self.error is None:
            self.error = reason
            log.error("%s: migration to %s failed: %s", self.name, self.new.name, reason)

    async def claim(self, index: int) -> None:
        """Hold writers off chunk `index` and wait for those already on it."""
        self.claimed = max(self.claimed, index)
        await self.lock.claim(index)

    def release(self, index: int) -> None:
        self.lock.release(index)


class Migration:
    """One node's migration job and the status its `migrate` file shows."""

    def __init__(self, array: Array, node: Node, spec: NodeSpec) -> None:
        self.array = array
        self.node = node
        self.spec = spec
        #: What the map uses of the node (a stripe leaves a bigger node's tail
        #: unused): the bytes to copy.
        self.total = array.alg.used_bytes(array.nodes.index(node))
        self.copied = 0
        #: Of `copied`: bytes sent as data, and zeroes sent as WRITE_ZEROES.
        self.sent_bytes = 0
        self.zero_bytes = 0
        self.status = "copying"
        self.filter: MigrationFilter | None = None
        self.cancel_scope = trio.CancelScope()
        self.started = time.monotonic()
        self._fg_count = -1
        self._fg_time = 0.0

    def _foreground_busy(self) -> bool:
        """Whether disk.img saw I/O within the last FOREGROUND_WINDOW s."""
        stats = self.array.stats
        count = stats.reads + stats.writes
        now = time.monotonic()
        if count != self._fg_count:
            self._fg_count, self._fg_time = count, now
        return now - self._fg_time < FOREGROUND_WINDOW

    def show(self) -> str:
        if self.status == "copying":
            return f"copying {self.copied // 512}/{self.total // 512} sectors\n"
        return self.status + "\n"

    async def run(self, new: Backend) -> None:
        node = self.node
        old = node.backend
        filt = MigrationFilter(old, new, self.total, timeout=node.timeout or DEFAULT_NODE_TIMEOUT)
        self.filter = filt
        node.backend = filt
        node.migration = self
        reason = None
        try:  # nothing may escape: this runs in the daemon's own nursery
            with self.cancel_scope:
                await self._copy(filt)
                await self._switch(filt, new)
                return
            reason = "cancelled"
        except MigrationFailed as e:
            reason = str(e)
        except OSError as e:
            reason = f"{e.strerror or e}"
        except Exception as e:
            log.exception("%s: migration crashed", node.name)
            reason = f"internal error: {e!r}"
        finally:
            node.migration = None
            if self.status != "done":
                if node.backend is filt:
                    node.backend = old
                self.status = f"failed: {reason or filt.error or 'unknown error'}"
                log.error("%s: migration to %s %s", node.name, self.spec.uri, self.status)
                with trio.CancelScope(shield=True):
                    await new.aclose()

    async def _copy(self, filt: MigrationFilter) -> None:
        next_chunk = 0
        total = self.total
        chunk = filt.chunk

        async def worker(number: int) -> None:
            # Workers end quietly on failure (filt.error says why): an
            # exception here would reach the caller wrapped in a group.
            nonlocal next_chunk
            while next_chunk < filt.nchunks and filt.error is None:
                if number and self._foreground_busy():
                    # The disk is in use: copy with one worker, leave the rest
                    # of the node's bandwidth to the foreground.
                    await trio.sleep(YIELD_SLEEP)
                    continue
                index = next_chunk
                next_chunk += 1
                offset = index * chunk
                length = min(chunk, total - offset)
                await filt.claim(index)
                try:
                    try:
                        if self.node.can_block_status and await sparse.reads_as_zeroes(
                            self.node.block_status, offset, length
                        ):
                            data: Buffer | None = sparse.zeros(length)  # a hole: not read
                        else:
                            data = await self.node.read(offset, length)  # old target, gated
                    except OSError as e:
                        filt.fail(f"read from the old target failed: {e.strerror or e}")
                        return
                    try:
                        view = memoryview(data)
                        for off, n, zero in sparse.runs(data):  # holes: no bytes sent
                            if zero:
                                await filt.on_new(filt.new.write_zeroes(offset + off, n))
                                self.zero_bytes += n
                            else:
                                await filt.on_new(
                                    filt.new.pwrite(offset + off, view[off : off + n])
                                )
                                self.sent_bytes += n
                    except OSError as e:
                        filt.fail(f"write to the new target failed: {e.strerror or e}")
                        return
                finally:
                    filt.release(index)
                self.copied += length

        async with trio.open_nursery() as nursery:
            for number in range(WORKERS):
                nursery.start_soon(worker, number)
        if filt.error is not None:
            raise MigrationFailed(filt.error)

    async def _switch(self, filt: MigrationFilter, new: Backend) -> None:
        node = self.node
        was_suspended = node.suspended
        await node.suspend()  # drain: nothing in flight while we switch
        try:
            if filt.error is not None:
                raise MigrationFailed(filt.error)
            try:
                await filt.on_new(new.flush())
            except OSError as e:
                raise MigrationFailed(f"flush of the new target failed: {e.strerror or e}") from e
            old_name = node.name
            self.array.retarget(node, self.spec, new)
            old = filt.inner
            self.status = "done"
            elapsed = time.monotonic() - self.started
            log.warning(
                "%s: migrated to %s: %d bytes in %.1f s (%.0f MB/s), %d sent as data, %d as zeroes",
                old_name,
                self.spec.uri,
                self.total,
                elapsed,
                self.total / elapsed / 1e6 if elapsed else 0,
                self.sent_bytes,
                self.zero_bytes,
            )
        finally:
            if not was_suspended:
                node.resume()
        with trio.CancelScope(shield=True):
            try:
                await old.aclose()
            except OSError as e:
                log.warning("%s: closing the old target: %s", old_name, e)


@asynccontextmanager
async def _open_target(
    array: Array, node: Node, text: str, what: str
) -> AsyncIterator[tuple[NodeSpec, Backend]]:
    """Parse, admit and open a new target for `node`. The target stays
    claimed (members.admitting) until the block, which makes it a member,
    ends; `target` may name storage the node itself uses (it gives it up),
    `migrate` may not."""
    try:
        spec = parse_node(text)
    except ValueError as e:
        raise ArrayError(errno.EINVAL, str(e)) from None
    if spec.uri == node.spec.uri:
        raise ArrayError(errno.EINVAL, "the target is the node's current target")
    replacing = node if what == "target" else None
    async with admitting(array, spec, replacing, f"{what} of {node.name}"):
        try:
            backend = await array.opener(spec.with_size(None), array.nursery, array.connections)
        except OSError as e:
            raise ArrayError(e.errno or errno.EIO, f"{spec.uri}: {e.strerror or e}") from None
        # A replica holds the disk (its own size may be unknown: unreachable at
        # mount); any other node its share.
        need = array.size if array.replicas is not None else node.size
        if backend.size < need:
            await backend.aclose()
            raise ArrayError(
                errno.ENOSPC, f"{spec.uri}: {backend.size} bytes, the node needs {need}"
            )
        if backend.read_only:
            await backend.aclose()
            raise ArrayError(errno.EROFS, f"{spec.uri} is read-only")
        yield spec.with_size(node.spec.size), backend


def status(array: Array, node: Node) -> str:
    """The node's `migrate` file: its last migration's status, or idle."""
    job = array.migrations.get(node)
    return job.show() if job is not None else "idle\n"


def _running(array: Array, node: Node) -> Migration | None:
    job = array.migrations.get(node)
    return job if job is not None and job.status == "copying" else None


async def migrate(array: Array, node: Node, value: str) -> None:
    """A write to `migrate`: a URI starts a live migration (a mirror's
    replica is replaced instead), `cancel` stops the running one."""
    if value == "cancel":
        job = _running(array, node)
        if job is None:
            raise ArrayError(errno.EINVAL, "no migration is running")
        job.cancel_scope.cancel()
        return
    if _running(array, node) is not None:
        raise ArrayError(errno.EBUSY, "a migration is already running")
    if array.replicas is not None:
        await replace_replica(array, node, value)
        return
    if node.suspended:
        raise ArrayError(errno.EBUSY, "the node is suspended")
    async with _open_target(array, node, value, "migrate") as (spec, backend):
        job = Migration(array, node, spec)
        array.migrations[node] = job
        node.migration = job  # a member from now on (run() sets it too)
        array.jobs.start(f"migrate {node.name} -> {spec.uri}", partial(job.run, backend))
    log.info("%s: migrating to %s (%d bytes)", node.name, spec.uri, job.total)


async def replace_replica(array: Array, node: Node, value: str) -> None:
    """A mirror's replica is replaced, not copied from: the new target is
    synced from the in-sync replicas, so a dead replica can be replaced too."""
    assert array.replicas is not None
    async with _open_target(array, node, value, "target") as (spec, backend):
        old_name = node.name
        old: list[Backend] = []
        try:
            await array.replicas.replace(
                node, lambda: old.append(array.retarget(node, spec, backend))
            )
        except OSError:
            await backend.aclose()
            raise
    log.warning("%s: replica replaced by %s", old_name, spec.uri)
    with trio.CancelScope(shield=True):
        for b in old:
            await b.aclose()


async def repoint(array: Array, node: Node, value: str) -> None:
    """A write to `target`: point a suspended node at other storage, no copy
    (a mirror's replica is replaced and synced)."""
    if array.replicas is not None:
        await replace_replica(array, node, value)
        return
    if not node.suspended:
        raise ArrayError(errno.EBUSY, "suspend the node before repointing it")
    if _running(array, node) is not None:
        raise ArrayError(errno.EBUSY, "a migration is running")
    async with _open_target(array, node, value, "target") as (spec, backend):
        old_name = node.name
        try:
            old = array.retarget(node, spec, backend)
        except OSError:
            await backend.aclose()
            raise
    log.warning("%s: repointed to %s", old_name, spec.uri)
    with trio.CancelScope(shield=True):
        await old.aclose()
