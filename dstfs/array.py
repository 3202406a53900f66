"""The array: nodes joined by an algorithm, read and written as one disk.

Rules:
- A request is mapped by the algorithm into extents, one trio task per
  extent, run concurrently; results are joined in order. A request that maps
  to one extent runs in the caller's task (no nursery: the common case).
- A write returns only when every extent has been acknowledged; the first
  error (an errno) is raised after every extent has finished, so no task is
  left running behind the caller's back.
- Changes to the array (nodes, algorithm) are validated first and applied
  only when they can succeed, then persisted atomically to the state dir.
- Offsets and sizes are bytes here; the control tree shows sectors.
- A redundant algorithm (the mirror) hands its I/O to a ReplicaSet
  (dstfs.replicas), which knows which replicas are in sync; linear and stripe
  keep the direct path below.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import trio

from dstfs import state
from dstfs.algorithms import Algorithm, Extent, make_algorithm
from dstfs.algorithms.base import SECTOR
from dstfs.backends.base import Backend
from dstfs.backends.registry import Opener, open_backend
from dstfs.iotypes import Buffer
from dstfs.jobs import Jobs
from dstfs.members import admitting
from dstfs.node import Node, render_counters
from dstfs.replicas import ReplicaSet
from dstfs.uri import NodeSpec, parse_node

log = logging.getLogger(__name__)


class ArrayError(OSError):
    """A change to the array was refused; `errno` says why."""


@attrs.define
class ArrayStats:
    reads: int = 0
    writes: int = 0
    read_bytes: int = 0
    write_bytes: int = 0
    flushes: int = 0
    errors: int = 0

    def render(self) -> str:
        return render_counters(self)


async def _all(jobs: Iterable[Callable[[], Awaitable[object]]]) -> None:
    """Run the jobs concurrently; once all have finished, raise the first
    OSError (outside the nursery, so callers see a plain errno)."""
    errors: list[OSError] = []

    async def run(job: Callable[[], Awaitable[object]]) -> None:
        try:
            await job()
        except OSError as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        for job in jobs:
            nursery.start_soon(run, job)
    if errors:
        raise errors[0]


#: The size a replica that was unreachable at mount counts with (the mirror
#: is as big as its smallest known replica).
UNKNOWN_SIZE = 1 << 62


class Array:
    def __init__(
        self,
        name: str,
        nursery: trio.Nursery,
        alg: str = "alg_linear",
        options: dict[str, int] | None = None,
        state_dir: Path | None = None,
        connections: int = 1,
        opener: Opener = open_backend,
        mountpoint: str | None = None,
    ) -> None:
        self.name = name
        #: Opens a node's storage from its spec (tests hand in their own).
        self.opener = opener
        #: The resolved mount point: nodes inside it are refused (ELOOP).
        self.mountpoint = mountpoint
        self.nursery = nursery
        self.state_dir = state_dir
        self.connections = connections
        self.nodes: list[Node] = []
        self.entries: list[state.NodeEntry] = []
        #: The map; its options() (e.g. chunk) are the array's parameters.
        self.alg: Algorithm = make_algorithm(alg, [], **(options or {}))
        #: The mirror's replica state (None for linear and stripe).
        self.replicas: ReplicaSet | None = ReplicaSet(self) if self.alg.redundant else None
        #: See state.ArrayConfig.generation.
        self.generation = 0
        self.stats = ArrayStats()
        #: Migrations, resyncs, verify: listed, cancelled at close.
        self.jobs = Jobs(nursery)
        #: Each node's last migration (dstfs.migrate), for its `migrate` file.
        self.migrations: dict[Node, Any] = {}
        #: disk.img opens, kept by the FUSE layer (remove_all_nodes needs none).
        self.open_count = 0
        #: Called after the disk size changed (the FUSE layer drops its cache).
        self.on_resize: Callable[[], None] | None = None
        self._change_lock = trio.Lock()

    @property
    def size(self) -> int:
        return self.alg.size

    @property
    def alg_name(self) -> str:
        return self.alg.name

    # -- configuration

    def config(
        self,
        alg: Algorithm | None = None,
        entries: tuple[state.NodeEntry, ...] | None = None,
    ) -> state.ArrayConfig:
        """The config to persist: as it is, or with `alg` / `entries` changed."""
        alg = alg or self.alg
        entries = tuple(self.entries) if entries is None else entries
        return state.ArrayConfig(self.name, alg.name, alg.options(), entries, self.generation)

    def persist(self) -> None:
        self._save(self.config())

    def _save(self, config: state.ArrayConfig) -> None:
        if self.state_dir is not None:
            try:
                state.save(self.state_dir, config)
            except OSError as e:
                raise ArrayError(e.errno or errno.EIO, f"cannot write the state: {e}") from None

    def set_alg(self, name: str) -> None:
        if self.nodes:
            raise ArrayError(errno.EBUSY, "the algorithm can change only while there are no nodes")
        options = self.alg.options() if name == self.alg_name else {}
        try:
            alg = make_algorithm(name, [], **options)
        except (ValueError, TypeError) as e:
            raise ArrayError(errno.EINVAL, str(e)) from None
        self._save(self.config(alg=alg))
        self.alg = alg
        self.replicas = ReplicaSet(self) if alg.redundant else None
        if self.replicas is not None:
            self.replicas.start_empty()
        log.info("%s: algorithm is now %s", self.name, name)

    async def add_node(self, spec: NodeSpec | str, entry: state.NodeEntry | None = None) -> Node:
        """Connect a node and append it to the map; nothing changes on error."""
        if isinstance(spec, str):
            try:
                spec = parse_node(spec)
            except ValueError as e:
                raise ArrayError(errno.EINVAL, str(e)) from None
        async with self._change_lock, admitting(self, spec):
            relayout = self.alg.named_by_index and not self.alg.redundant
            if self.nodes and relayout and self.open_count:
                raise ArrayError(
                    errno.EBUSY,
                    f"{self.alg_name}: adding a node re-lays out the disk; close it first",
                )
            try:
                backend = await self.opener(spec, self.nursery, self.connections)
            except OSError as e:
                raise ArrayError(e.errno or errno.EIO, f"{spec.uri}: {e.strerror or e}") from None
            try:
                size = (spec.size * SECTOR) if spec.size else backend.size // SECTOR * SECTOR
                if self.alg.redundant and self.nodes and size < self.alg.size:
                    raise ValueError(
                        f"{size} bytes: smaller than the {self.alg.size}-byte mirror it would join"
                    )
                sizes = [n.size for n in self.nodes] + [size]
                alg = make_algorithm(self.alg_name, sizes, **self.alg.options())
            except (ValueError, OSError) as e:
                await backend.aclose()
                raise ArrayError(errno.EINVAL, f"{spec.uri}: {e}") from None
            entry = entry or state.NodeEntry(uri=spec.to_text())
            try:  # persist first: a change the state dir does not hold is not made
                self._save(self.config(alg=alg, entries=(*self.entries, entry)))
            except OSError:
                await backend.aclose()
                raise
            node = Node(spec, backend, size, self.nursery)
            self.nodes.append(node)
            self.entries.append(entry)
            self.alg = alg
            self._layout()
            if self.replicas is not None:
                self.replicas.attach(node)
        log.info("%s: added node %s (%d sectors)", self.name, spec.uri, size // SECTOR)
        if self.on_resize is not None:
            self.on_resize()
        return node

    def add_unreachable_replica(
        self, spec: NodeSpec, entry: state.NodeEntry, backend: Backend, why: str
    ) -> Node:
        """At mount: a mirror replica whose server does not answer joins as
        `reconnecting` (its node reconnects in the background and is resynced
        when back), so the array mounts degraded instead of not at all. Its
        size is not known yet: it must be at least the disk's once back."""
        assert self.alg.redundant
        node = Node(spec, backend, UNKNOWN_SIZE, self.nursery)
        alg = make_algorithm(
            self.alg_name, [n.size for n in self.nodes] + [UNKNOWN_SIZE], **self.alg.options()
        )
        self.nodes.append(node)
        self.entries.append(entry)
        self.alg = alg
        self._layout()
        assert self.replicas is not None
        self.replicas.attach(node)
        node.lost(f"not reachable at mount: {why}")
        log.warning("%s: replica %s is not reachable: mounting degraded", self.name, spec.uri)
        return node

    async def remove_all_nodes(self) -> None:
        async with self._change_lock:
            if self.open_count:
                raise ArrayError(errno.EBUSY, "disk.img is open")
            empty = make_algorithm(self.alg_name, [], **self.alg.options())
            self._save(self.config(alg=empty, entries=()))
            nodes, self.nodes = self.nodes, []
            self.entries = []
            self.migrations.clear()
            self.alg = empty
            if self.replicas is not None:
                self.replicas.forget()
        for node in nodes:
            with trio.CancelScope(shield=True):
                try:
                    await node.flush()
                except OSError as e:
                    log.warning("%s: flush before removal failed: %s", node.name, e)
                await node.aclose()
        log.info("%s: removed all nodes", self.name)
        if self.on_resize is not None:
            self.on_resize()

    def _layout(self) -> None:
        for node, (start, size) in zip(self.nodes, self.alg.node_ranges(), strict=True):
            node.start, node.sectors = start, size

    def node_dir_name(self, index: int) -> str:
        if self.alg.named_by_index:
            return f"n-{index}"
        return f"n-{self.nodes[index].start}"

    def retarget(self, node: Node, spec: NodeSpec, backend: Backend) -> Backend:
        """Point `node` at a new target (after a migration or a repoint):
        recorded in the state dir first, so a failed write changes nothing.
        Returns the old backend, for the caller to close."""
        entries = list(self.entries)
        i = self.nodes.index(node)
        # The node's settings (timeout) stay; a new target was never in sync.
        entries[i] = attrs.evolve(entries[i], uri=spec.to_text(), serve=None, synced=None)
        self._save(self.config(entries=tuple(entries)))
        self.entries = entries
        old = node.replace_backend(backend)
        node.spec = spec
        return old

    # -- I/O

    async def read(self, offset: int, length: int) -> Buffer:
        """Up to `length` bytes at `offset`; short at the end of the disk."""
        buf = bytearray(max(0, min(length, self.alg.size - offset)))
        await self.readinto(offset, memoryview(buf))
        return buf

    async def readinto(self, offset: int, view: memoryview) -> int:
        """Fill `view` from `offset`; the count read, short at the end of the
        disk. Each node's reply lands straight in its part of `view`."""
        size = self.alg.size
        length = len(view)
        if offset >= size or length <= 0:
            return 0
        if offset + length > size:
            length = size - offset
            view = view[:length]
        try:
            if self.replicas is not None:
                await self.replicas.readinto(offset, view)
            else:
                await self._read_parts(offset, length, view)
        except OSError:
            self.stats.errors += 1
            raise
        self.stats.reads += 1
        self.stats.read_bytes += length
        return length

    async def _read_parts(self, offset: int, length: int, view: memoryview) -> None:
        """Linear and stripe: each node's part straight into its segments."""
        extents = self.alg.map(offset, length)
        if len(extents) == 1 and len(extents[0].segments) == 1:
            e = extents[0]
            await self.nodes[e.node].read(e.node_offset, e.length, [view])
            return
        await _all(
            partial(
                self.nodes[e.node].read,
                e.node_offset,
                e.length,
                [view[boff : boff + blen] for boff, blen in e.segments],
            )
            for e in extents
        )

    async def write(self, offset: int, data: Buffer) -> int:
        """Write all of `data` at `offset`; ENOSPC past the end of the disk."""
        length = len(data)
        size = self.alg.size
        if offset + length > size:
            if offset >= size:
                raise OSError(errno.ENOSPC, "write past the end of the disk")
            length = size - offset
        try:
            if self.replicas is not None:
                await self.replicas.write(
                    offset, memoryview(data)[:length] if length < len(data) else data
                )
            else:
                await self._write_parts(offset, length, data)
        except OSError:
            self.stats.errors += 1
            raise
        self.stats.writes += 1
        self.stats.write_bytes += length
        return length

    async def _write_parts(self, offset: int, length: int, data: Buffer) -> None:
        """Linear and stripe: each node gets its part."""
        extents = self.alg.map(offset, length, write=True)
        view = memoryview(data)
        if len(extents) == 1 and len(extents[0].segments) == 1:
            e = extents[0]
            await self.nodes[e.node].write(
                e.node_offset, view[:length] if length < len(data) else data
            )
            return

        def piece(e: Extent) -> Buffer:
            if len(e.segments) == 1:
                boff, blen = e.segments[0]
                return view[boff : boff + blen]
            return b"".join(view[o : o + n] for o, n in e.segments)

        await _all(partial(self.nodes[e.node].write, e.node_offset, piece(e)) for e in extents)

    async def write_zeroes(self, offset: int, length: int, may_trim: bool = True) -> None:
        """Zeroes over [offset, offset+length) (each node punches or writes
        them as it can, or only writes them if not `may_trim`: NBD's
        NO_HOLE); also what a TRIM of the disk does."""
        if offset < 0 or length < 0 or offset + length > self.alg.size:
            raise OSError(errno.EINVAL, "write_zeroes outside the disk")
        try:
            if self.replicas is not None:
                await self.replicas.write_zeroes(offset, length, may_trim)
            else:
                await _all(
                    partial(self.nodes[e.node].write_zeroes, e.node_offset, e.length, may_trim)
                    for e in self.alg.map(offset, length, write=True)
                )
        except OSError:
            self.stats.errors += 1
            raise
        self.stats.writes += 1

    async def flush(self) -> None:
        """NBD_CMD_FLUSH (or fsync) on every node, concurrently."""
        self.stats.flushes += 1
        try:
            if self.replicas is not None and self.nodes:
                await self.replicas.flush()
                return
            await _all(node.flush for node in self.nodes)
        except OSError:
            self.stats.errors += 1
            raise

    async def aclose(self, timeout: float = 30.0) -> None:
        """Flush and disconnect every node (bounded: a dead node cannot
        keep the daemon from exiting)."""
        self.jobs.cancel_all()
        with trio.CancelScope(shield=True):
            with trio.move_on_after(timeout) as scope:
                try:
                    await self.flush()
                except OSError as e:
                    log.error("%s: final flush failed: %s", self.name, e)
            if scope.cancelled_caught:
                log.error("%s: final flush gave no answer in %g s", self.name, timeout)
            for node in self.nodes:
                with trio.move_on_after(5):
                    await node.aclose()
            if self.replicas is not None:
                self.replicas.close()
