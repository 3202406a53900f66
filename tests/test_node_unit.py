"""Node's gate, reconnect back-off and timeout, on trio's MockClock.

One layer: a `Node` over a small in-memory fake backend whose requests can
be held, and whose connection can be broken and refused, so every wait is
an event and every duration is virtual (`autojump_clock`: time jumps to
the next deadline whenever every task is blocked). The behaviour checked is
the one dstfs/node.py's docstring states, through Node's public methods
(read, write, flush, suspend, resume, state, stats, timeout).
"""

from __future__ import annotations

import errno

import pytest
import trio
import trio.testing
from helpers.virtual import Task, bounded

from dstfs.backends.base import BackendBase
from dstfs.iotypes import ConnectionLost
from dstfs.node import BACKOFF_MAX, BACKOFF_MIN, Node, State
from dstfs.uri import parse_node

SIZE = 1 << 20


class FakeBackend(BackendBase):
    """Bytes in memory. `hold` (an Event, while set to one) keeps every
    request waiting until it is set; `down` makes requests raise
    ConnectionLost and `reconnect()` fail (or hang, with `silent`) until
    `down` is cleared. Requests and reconnect attempts are recorded with
    their virtual time."""

    can_reconnect = True

    def __init__(self, size: int = SIZE) -> None:
        self.name = "fake"
        self.data = bytearray(size)
        self.hold: trio.Event | None = None
        self.down = False
        self.silent = False
        self.requests: list[tuple[str, int]] = []  # (kind, offset) as they reached us
        self.attempts: list[float] = []  # reconnect() calls, trio.current_time()

    @property
    def size(self) -> int:
        return len(self.data)

    async def _enter(self, kind: str, offset: int) -> None:
        if self.down:
            raise ConnectionLost("fake: connection reset")
        self.requests.append((kind, offset))
        if self.hold is not None:
            await self.hold.wait()

    async def pread(self, offset: int, length: int) -> bytes:
        await self._enter("r", offset)
        return bytes(self.data[offset : offset + length])

    async def pwrite(self, offset: int, data: bytes, fua: bool = False) -> None:
        await self._enter("w", offset)
        self.data[offset : offset + len(data)] = data

    async def flush(self) -> None:
        await self._enter("f", 0)

    async def trim(self, offset: int, length: int) -> None:
        await self._enter("t", offset)

    async def write_zeroes(self, offset: int, length: int, may_trim: bool = True) -> None:
        await self.pwrite(offset, bytes(length))

    async def reconnect(self) -> None:
        self.attempts.append(trio.current_time())
        if self.down and self.silent:
            await trio.sleep_forever()
        if self.down:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "fake: refused")

    async def aclose(self) -> None:
        pass


def make_node(nursery: trio.Nursery, backend: FakeBackend) -> Node:
    return Node(parse_node("nbd://127.0.0.1:1"), backend, backend.size, nursery)


# -- the gate: suspend and resume


@bounded
async def test_suspend_waits_for_requests_in_flight_and_holds_new_ones(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = FakeBackend()
    async with trio.open_nursery() as nursery:
        node = make_node(nursery, backend)
        node.timeout = 0  # a slow answer, not a lost one: no reply deadline
        backend.hold = trio.Event()
        inflight = Task(nursery, node.write, 0, b"a" * 512)
        await trio.testing.wait_all_tasks_blocked()
        assert backend.requests == [("w", 0)]

        suspend = Task(nursery, node.suspend)
        await trio.sleep(60)  # a minute of virtual time: still draining
        assert not suspend.done.is_set(), "suspend returned with a request in flight"
        assert node.state is State.SUSPENDED

        later = [Task(nursery, node.write, 512 * i, bytes([i]) * 512) for i in (1, 2, 3)]
        backend.hold.set()
        backend.hold = None
        await suspend.done.wait()
        assert inflight.done.is_set() and inflight.error is None

        await trio.sleep(600)  # ten minutes: nothing passes the gate
        assert [t.done.is_set() for t in later] == [False, False, False]
        assert backend.requests == [("w", 0)]
        assert node.stats.writes == 1

        node.resume()
        for t in later:
            await t.done.wait()
            assert t.error is None
        assert node.state is State.ONLINE
        # Every waiter went on (in no set order: trio wakes them as one batch).
        assert sorted(backend.requests) == [("w", 0), ("w", 512), ("w", 1024), ("w", 1536)]
        assert bytes(backend.data[512:2048]) == b"\1" * 512 + b"\2" * 512 + b"\3" * 512
        assert node.stats.writes == 4


@bounded
async def test_suspend_of_an_idle_node_returns_at_once_and_resume_is_idempotent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = FakeBackend()
    async with trio.open_nursery() as nursery:
        node = make_node(nursery, backend)
        t0 = trio.current_time()
        await node.suspend()
        await node.suspend()
        assert trio.current_time() == t0
        assert node.state is State.SUSPENDED
        read = Task(nursery, node.read, 0, 512)
        await trio.sleep(10)
        assert not read.done.is_set()
        node.resume()
        node.resume()
        await read.done.wait()
        assert read.result == bytes(512)
        assert node.state is State.ONLINE


# -- a lost connection: reconnect with back-off, resend


@bounded
async def test_lost_connection_reconnects_with_doubling_backoff_and_resends(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = FakeBackend()
    async with trio.open_nursery() as nursery:
        node = make_node(nursery, backend)
        node.timeout = 0  # wait for ever: only the back-off is under test
        backend.down = True
        write = Task(nursery, node.write, 4096, b"x" * 512)
        await trio.testing.wait_all_tasks_blocked()
        assert node.state is State.RECONNECTING
        # Let it try until the delay has reached its ceiling, then come back.
        while len(backend.attempts) < 10:
            await trio.sleep(BACKOFF_MIN)
        assert not write.done.is_set()
        backend.down = False
        with trio.fail_after(BACKOFF_MAX + 10):  # virtual seconds
            await write.done.wait()

    assert write.error is None, write.error
    assert bytes(backend.data[4096:4608]) == b"x" * 512
    gaps = [round(b - a, 6) for a, b in zip(backend.attempts, backend.attempts[1:], strict=False)]
    want, delay = [], BACKOFF_MIN
    for _ in gaps:
        want.append(round(delay, 6))
        delay = min(delay * 2, BACKOFF_MAX)
    assert gaps == want
    assert gaps[-1] == BACKOFF_MAX
    assert node.state is State.ONLINE
    assert node.stats.reconnects == 1
    assert node.stats.failures == 0
    assert node.stats.writes == 1


@bounded
async def test_requests_meeting_a_lost_connection_share_one_reconnect_job(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = FakeBackend()
    async with trio.open_nursery() as nursery:
        node = make_node(nursery, backend)
        backend.down = True
        tasks = [Task(nursery, node.write, 512 * i, b"y" * 512) for i in range(5)]
        await trio.sleep(BACKOFF_MIN / 2)
        first = len(backend.attempts)
        assert first == 1  # one job tries, not one per request
        backend.down = False
        for t in tasks:
            await t.done.wait()
            assert t.error is None
    assert node.stats.reconnects == 1
    assert bytes(backend.data[: 5 * 512]) == b"y" * 5 * 512


# -- timeout -> failed -> back online


@pytest.mark.parametrize("silent", [False, True], ids=["refused", "silent"])
@bounded
async def test_node_away_past_its_timeout_fails_with_eio_and_comes_back(
    autojump_clock: trio.testing.MockClock, silent: bool
) -> None:
    """Refused: every reconnect fails at once. Silent: a connect never
    answers; the timeout must still bound it."""
    backend = FakeBackend()
    async with trio.open_nursery() as nursery:
        node = make_node(nursery, backend)
        node.timeout = 3
        await node.write(0, b"a" * 512)
        backend.down, backend.silent = True, silent
        t_lost = trio.current_time()
        waiting = Task(nursery, node.write, 512, b"b" * 512)
        await trio.sleep(node.timeout - 0.5)
        assert node.state is State.RECONNECTING
        assert not waiting.done.is_set(), "a request failed before the node's timeout"

        with trio.fail_after(BACKOFF_MAX + 10):  # virtual seconds
            await waiting.done.wait()
        assert waiting.error is not None and waiting.error.errno == errno.EIO
        assert node.state is State.FAILED
        assert t_lost + node.timeout <= waiting.ended <= t_lost + node.timeout + BACKOFF_MAX
        assert node.stats.failures == 1

        # While failed: EIO at once, for every kind of request.
        t0 = trio.current_time()
        for call in (node.read(0, 512), node.write(0, b"c" * 512), node.flush()):
            with pytest.raises(OSError) as e:
                await call
            assert e.value.errno == errno.EIO
        assert trio.current_time() == t0
        assert bytes(backend.data[:512]) == b"a" * 512

        await trio.sleep(60)  # a long outage: still failed, still one failure
        assert node.state is State.FAILED
        assert node.stats.failures == 1

        backend.down = False  # the server is back
        with trio.fail_after(BACKOFF_MAX + 5 + 1):  # one back-off, one connect bound
            while node.state is not State.ONLINE:
                await trio.sleep(0.01)
        await node.write(0, b"d" * 512)
        assert await node.read(0, 512) == b"d" * 512
        assert node.stats.reconnects == 1
        assert node.stats.failures == 1


@bounded
async def test_suspended_failed_node_holds_requests_instead_of_failing_them(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = FakeBackend()
    async with trio.open_nursery() as nursery:
        node = make_node(nursery, backend)
        node.timeout = 1
        backend.down = True
        with pytest.raises(OSError) as e:
            await node.write(0, b"a" * 512)
        assert e.value.errno == errno.EIO
        assert node.state is State.FAILED
        await node.suspend()
        held = Task(nursery, node.write, 0, b"e" * 512)
        await trio.sleep(30)
        assert not held.done.is_set(), "a suspended node answered"
        backend.down = False
        with trio.fail_after(BACKOFF_MAX + 10):  # virtual seconds
            while node.state is State.FAILED:
                await trio.sleep(0.1)
        await trio.sleep(10)
        assert not held.done.is_set(), "a suspended node answered once reconnected"
        node.resume()
        await held.done.wait()
        assert held.error is None
        assert bytes(backend.data[:512]) == b"e" * 512
