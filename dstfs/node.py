"""A node: one storage backend behind a gate.

Rules:
- Every request passes the gate. The gate is open while the node is online;
  it closes while the node is suspended or reconnecting, and requests wait
  there. A failed node (lost for longer than its timeout)
  answers EIO at once until it is back.
- A request that meets a broken connection is not failed: the node starts
  one reconnect job (back-off 50 ms doubling to 2 s), and the request waits
  at the gate and is sent again once the connection is back. Writes are
  idempotent, so resending one that may have landed is safe.
- Any other OSError is the storage's answer and goes to the caller.
- A request to a remote node not answered within the node's timeout (a
  server that stopped answering, or trickles its reply) is a lost
  connection: the connection is dropped and the request waits for the
  reconnect like any other. FLUSH is exempt: it takes what the disk takes.
  A watchdog task checks this once a second, so requests pay no timer.
- `suspend()` closes the gate and returns once the requests already past it
  have drained; `resume()` reopens it and the waiters proceed together, in
  no promised order (trio wakes them as one batch): like any requests in
  flight at once, which a block device may complete in any order.
- A node that is not `hold`ing (a mirror replica: the array has other
  copies) never makes a request wait: while its gate is shut, and when its
  connection breaks under a request, the request fails at once with
  `NodeUnavailable`, and the reconnect goes on in the background. Which I/O
  waits for a node is the algorithm's decision, not the node's. Such a node
  is back only once its server answers a read after the reconnect (within
  the attempt's limit): one that takes connections but hangs requests would
  else be back at once, again and again, and every write to it would wait
  for its timeout.
- A reconnect that fails with `NotRetryable` (e.g. a TLS certificate not
  trusted) makes the node failed at once and ends the reconnect job.
- Every request, error, reconnect and failure is counted in `stats`, every
  state change is logged with the node's name and reported to `on_change`.
- The reconnect job follows the node's current backend: a node repointed
  while reconnecting drops the old target's attempt and connection.
"""

from __future__ import annotations

import enum
import errno
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import attrs
import trio

from dstfs.backends.base import Backend
from dstfs.iotypes import Buffer, ConnectionLost, NotRetryable
from dstfs.uri import NodeSpec

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_TIMEOUT = 30.0
BACKOFF_MIN = 0.05
BACKOFF_MAX = 2.0
CONNECT_TIMEOUT = 5.0
#: How often the reply deadline is checked (see Node._watch).
WATCH_EVERY = 1.0
#: Read from a replica after a reconnect, before it counts as back.
PROBE_BYTES = 512


class NodeUnavailable(OSError):
    """The node cannot take requests now (suspended, reconnecting, failed)
    and is not holding them: the caller has other copies to use."""

    def __init__(self, name: str, why: str) -> None:
        super().__init__(errno.EAGAIN, f"{name}: unavailable ({why})")


class State(enum.Enum):
    ONLINE = "online"
    SUSPENDED = "suspended"
    RECONNECTING = "reconnecting"
    FAILED = "failed"
    MIGRATING = "migrating"


def render_counters(counters: object) -> str:
    """A stats file: one `key value` line per attrs field."""
    return "".join(f"{k} {v}\n" for k, v in attrs.asdict(counters).items())  # type: ignore[arg-type]


@attrs.frozen
class NodeStatsSnapshot:
    reads: int
    writes: int
    read_bytes: int
    write_bytes: int
    flushes: int
    errors: int
    reconnects: int
    failures: int
    latency_avg_us: float
    latency_max_us: float

    def render(self) -> str:
        return render_counters(self)


@attrs.define
class NodeStats:
    reads: int = 0
    writes: int = 0
    read_bytes: int = 0
    write_bytes: int = 0
    flushes: int = 0
    errors: int = 0
    reconnects: int = 0
    failures: int = 0
    latency_ns: int = 0
    latency_max_ns: int = 0

    def took(self, t0: int) -> None:
        """Account the latency of a request that started at `t0` (ns)."""
        dt = time.perf_counter_ns() - t0
        self.latency_ns += dt
        if dt > self.latency_max_ns:
            self.latency_max_ns = dt

    def snapshot(self) -> NodeStatsSnapshot:
        ops = self.reads + self.writes + self.flushes
        avg = self.latency_ns / ops / 1000 if ops else 0.0
        return NodeStatsSnapshot(
            self.reads,
            self.writes,
            self.read_bytes,
            self.write_bytes,
            self.flushes,
            self.errors,
            self.reconnects,
            self.failures,
            round(avg, 1),
            round(self.latency_max_ns / 1000, 1),
        )


class Node:
    """`backend` must offer `reconnect()` to recover from ConnectionLost
    (NbdBackend does); a backend without it fails such requests with EIO."""

    def __init__(self, spec: NodeSpec, backend: Backend, size: int, nursery: trio.Nursery) -> None:
        self.spec = spec
        self.backend = backend
        #: Bytes of the backend this node contributes.
        self.size = size
        #: Where the algorithm put it, in sectors (set by the array).
        self.start = 0
        self.sectors = size // 512
        self.nursery = nursery
        self.timeout = DEFAULT_TIMEOUT
        self.stats = NodeStats()
        self.suspended = False
        self.migration: object | None = None  # set by dstfs.migrate while copying
        self._lost: str | None = None  # why the connection is down, while it is
        self._failed = False
        self._ready = True
        self._gate = trio.Event()
        self._gate.set()
        self._inflight = 0
        self._drained: trio.Event | None = None
        self._reconnecting = False
        self._lost_since = 0.0
        #: False for a mirror replica: requests fail fast instead of waiting.
        self.hold = True
        #: Called after every state change (the array reacts: a mirror
        #: drops a replica from its in-sync set, or resyncs it).
        self.on_change: Callable[[Node], None] | None = None
        self._attempt: trio.CancelScope | None = None
        #: Requests in flight (not flushes) by token: when each was sent.
        self._pending: dict[int, float] = {}
        self._next_token = 0
        self._watchdog: trio.CancelScope | None = None

    # -- state

    @property
    def name(self) -> str:
        """The node's URI, for logs: follows `spec` when the node is repointed."""
        return self.spec.uri

    @property
    def state(self) -> State:
        if self._failed:
            return State.FAILED
        if self._lost is not None:
            return State.RECONNECTING
        if self.suspended:
            return State.SUSPENDED
        if self.migration is not None:
            return State.MIGRATING
        return State.ONLINE

    @property
    def inflight(self) -> int:
        """Requests past the gate and not yet answered."""
        return self._inflight

    @property
    def ready(self) -> bool:
        """Whether requests pass the gate now."""
        return self._ready

    def _update_gate(self) -> None:
        ready = not self.suspended and self._lost is None and not self._failed
        self._ready = ready
        # A failed node wakes its waiters too, so they get EIO at once.
        if ready or (self._failed and not self.suspended):
            self._gate.set()
        elif self._gate.is_set():
            self._gate = trio.Event()
        if self.on_change is not None:
            self.on_change(self)

    async def _pass_gate(self) -> None:
        while not self._ready:
            if self._failed and not self.suspended:
                raise OSError(errno.EIO, f"{self.name}: node failed ({self._lost})")
            await self._gate.wait()
            if self._failed and not self.suspended:
                raise OSError(errno.EIO, f"{self.name}: node failed ({self._lost})")

    def _done(self) -> None:
        self._inflight -= 1
        if not self._inflight and self._drained is not None:
            self._drained.set()

    # -- requests

    async def read(
        self, offset: int, length: int, into: list[memoryview] | None = None
    ) -> Buffer | None:
        """The bytes, or None when `into` (views adding up to `length`) was
        given and filled in place."""
        if into is None:
            data = await self._call("read", offset, length, lambda b: b.pread(offset, length))
        else:
            data = await self._call("read", offset, length, lambda b: b.pread_into(offset, into))
        self.stats.reads += 1
        self.stats.read_bytes += length
        return data

    async def write(self, offset: int, data: Buffer, fua: bool = False) -> None:
        await self._call("write", offset, len(data), lambda b: b.pwrite(offset, data, fua))
        self.stats.writes += 1
        self.stats.write_bytes += len(data)

    async def flush(self) -> None:
        await self._call("flush", 0, 0, lambda b: b.flush())
        self.stats.flushes += 1

    async def trim(self, offset: int, length: int) -> None:
        await self._call("trim", offset, length, lambda b: b.trim(offset, length))

    @property
    def can_block_status(self) -> bool:
        return self.backend.can_block_status

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        """(length, flags) extents from `offset` (dstfs.iotypes EXTENT_*)."""
        return await self._call(
            "block_status", offset, length, lambda b: b.block_status(offset, length)
        )

    async def write_zeroes(self, offset: int, length: int, may_trim: bool = True) -> None:
        await self._call(
            "write_zeroes", offset, length, lambda b: b.write_zeroes(offset, length, may_trim)
        )
        self.stats.writes += 1

    async def _call(
        self, what: str, offset: int, length: int, fn: Callable[[Backend], Awaitable[T]]
    ) -> T:
        """`fn(backend)` past the gate, resent after a lost connection. The
        backend is looked up only past the gate: a repoint or a migration may
        have replaced it while the request waited."""
        while True:
            if not self._ready:
                if not self.hold:
                    raise NodeUnavailable(self.name, self.state.value)
                await self._pass_gate()
            self._inflight += 1
            t0 = time.perf_counter_ns()
            # Stamped for the watchdog (a flush takes what the disk takes).
            token = self._next_token
            if what != "flush":
                self._next_token = token + 1
                self._pending[token] = trio.current_time()
                if self._watchdog is None and self.backend.can_reconnect:
                    self._watchdog = trio.CancelScope()
                    self.nursery.start_soon(self._watch, self._watchdog)
            try:
                result = await fn(self.backend)
            except ConnectionLost as e:
                self._connection_lost(e)
                if not self.hold:
                    raise NodeUnavailable(self.name, f"connection lost: {e}") from None
                continue
            except OSError as e:
                self.stats.errors += 1
                log.warning("%s: %s %d+%d failed: %s", self.name, what, offset, length, e)
                raise
            finally:
                self._pending.pop(token, None)
                self._done()
            self.stats.took(t0)
            return result

    async def _watch(self, scope: trio.CancelScope) -> None:
        """The reply deadline, off the request path: a request to a node that
        can reconnect, unanswered for the node's timeout (a dead or trickling
        server), drops the connection; its requests then meet ConnectionLost
        and wait for the reconnect like any other."""
        with scope:
            while self._pending:  # ends when idle; the next request starts it again
                await trio.sleep(WATCH_EVERY)
                if self.timeout <= 0 or not self._pending:
                    continue
                age = trio.current_time() - min(self._pending.values())
                if age >= self.timeout and self.backend.can_reconnect:
                    log.warning(
                        "%s: a request unanswered for %.0f s (timeout %g s): dropping the "
                        "connection",
                        self.name,
                        age,
                        self.timeout,
                    )
                    self._pending.clear()  # they will be resent, stamped anew
                    self.backend.abort()
        if self._watchdog is scope:
            self._watchdog = None

    # -- suspend

    async def suspend(self) -> None:
        """Close the gate; return once the requests already past it are done."""
        if not self.suspended:
            self.suspended = True
            self._update_gate()
            log.info("%s: suspended, draining %d requests", self.name, self._inflight)
        await self.drain()

    async def drain(self) -> None:
        while self._inflight:
            self._drained = trio.Event()
            await self._drained.wait()
        self._drained = None

    def resume(self) -> None:
        if self.suspended:
            self.suspended = False
            self._update_gate()
            log.info("%s: resumed", self.name)

    # -- failover

    def lost(self, why: str) -> None:
        """The node's storage cannot be reached (e.g. at mount): reconnect
        in the background, as after a broken connection."""
        self._connection_lost(ConnectionLost(why))

    def _connection_lost(self, exc: Exception) -> None:
        self.stats.errors += 1
        if self._lost is None and not self._failed:
            self._lost = str(exc)
            self._lost_since = trio.current_time()
            log.warning("%s: connection lost (%s); reconnecting", self.name, exc)
            self._update_gate()
        if not self._reconnecting:
            self._reconnecting = True
            self.nursery.start_soon(self._reconnect_loop)

    async def _reconnect_loop(self) -> None:
        delay = BACKOFF_MIN
        try:  # nothing may escape: this runs in the daemon's own nursery
            while self._lost is not None:
                limit = CONNECT_TIMEOUT
                if not self._failed and self.timeout > 0:
                    left = self._lost_since + self.timeout - trio.current_time()
                    if left <= 0:
                        self._fail()
                    else:
                        limit = min(limit, max(left, 0.05))
                # Looked up on every attempt: a repoint replaces the backend.
                backend = self.backend
                if not backend.can_reconnect:
                    if not self._failed:
                        self._fail()
                    return
                failure = None
                with trio.CancelScope() as self._attempt:
                    try:
                        with trio.fail_after(limit):
                            await backend.reconnect()
                            if not self.hold:
                                # Back only once it answers: a server that
                                # takes connections but not requests (a hung
                                # disk) would otherwise be back at once, and
                                # each write to it would wait its timeout.
                                await _probe(backend)
                    except Exception as e:  # OSError, TooSlowError, a group from connect
                        failure = e
                self._attempt = None
                if backend is not self.backend:
                    # Repointed meanwhile: this attempt was for the old target.
                    with trio.CancelScope(shield=True):
                        await _close_quietly(backend)
                    continue
                if isinstance(failure, NotRetryable):
                    # Trying again would fail the same way (a certificate
                    # not trusted): failed now, until repointed or remounted.
                    self._lost = str(failure)
                    self._fail(f"{failure}; not retrying")
                    return
                if failure is not None or self._lost is None:
                    if failure is not None:
                        log.debug("%s: reconnect failed: %s", self.name, failure)
                    await trio.sleep(delay)
                    delay = min(delay * 2, BACKOFF_MAX)
                    continue
                self.stats.reconnects += 1
                self._back_online("reconnected")
                return
        finally:
            self._reconnecting = False

    def _back_online(self, how: str) -> None:
        was_failed = self._failed
        self._lost = None
        self._failed = False
        log.warning(
            "%s: %s%s after %.1f s",
            self.name,
            how,
            " (was failed)" if was_failed else "",
            trio.current_time() - self._lost_since,
        )
        self._update_gate()

    def replace_backend(self, backend: Backend) -> Backend:
        """Point the node at `backend` (already open and answering); returns
        the old one for the caller to close. A reconnect in progress is for
        the old target: it is cancelled, and the node is back online."""
        old, self.backend = self.backend, backend
        if self._attempt is not None:
            self._attempt.cancel()
        if self._lost is not None or self._failed:
            self._back_online(f"repointed to {backend.name}")
        return old

    def _fail(self, why: str | None = None) -> None:
        self._failed = True
        self.stats.failures += 1
        log.error(
            "%s: %s: failed; its I/O gets EIO until it is back",
            self.name,
            why or f"lost for more than {self.timeout:g} s",
        )
        self._update_gate()

    # -- teardown

    async def aclose(self) -> None:
        if self._attempt is not None:
            self._attempt.cancel()
        if self._watchdog is not None:
            self._watchdog.cancel()
        await self.backend.aclose()


async def _probe(backend: Backend) -> None:
    """One read: any answer will do (an error reply is an answer; a bad
    sector 0 must not keep a replica away); a lost connection raises."""
    try:
        await backend.pread(0, PROBE_BYTES)
    except ConnectionLost:
        raise
    except OSError as e:
        log.debug("%s: probe read after reconnect: %s", backend.name, e)


async def _close_quietly(backend: Backend) -> None:
    try:
        await backend.aclose()
    except OSError as e:
        log.debug("%s: closing: %s", backend.name, e)
