"""Thin trio I/O over a non-blocking transport (a plain socket, see
nbd/transport.py), for the NBD hot path.

Why not trio.SocketStream: each of its sends and receives is a full trip
through the scheduler even when the kernel could take the bytes at once. Here
a send tries the socket first and only waits when the kernel pushes back, and
a receive waits only when nothing is there. Cancellation points remain where
we wait; a send that is cut half way marks the socket broken, since the byte
stream can no longer be trusted.

Rules: one `SocketIO` per connection; there is one reader. Sends are
serialised by a lock. On the hot path, `send_now()` sends from the caller's
own task when the line is free (nothing queued, no send under way, no burst
open): a FUSE request, which comes one per scheduler round, then costs no
hop to another task. That send opens a burst: whatever is sent after it
before the sender task runs (the rest of the round) is queued, and the
sender sends it all in one sendmsg, so 32 requests decoded together still
cost one system call and one wake-up of the peer, not 32. `send_soon()`
always queues. The queue is bounded in bytes: `wait_room()` holds producers
while it is over `HIGH_WATER`.
- A receive that got less than it asked for means the kernel had no more:
  the next `fill()` waits for readiness before it receives, instead of
  paying a failed receive (and an exception) to learn the same.
- Bytes are counted as they are queued (`queued_total`) and as they reach
  the kernel (`sent_total`); both are in queue order, so a reply queued when
  `queued_total` was M has left once `sent_total` >= M. `on_sent` hears of
  each advance (the server releases read memory with it), and, when the
  stream breaks, of everything queued as gone.
- `send_stall` (None: no limit) drops the connection when the peer takes
  no byte for that many seconds while a send waits (a client that stopped
  reading its replies holds their memory).
- Nothing here assumes a raw socket: every byte goes through the
  `Transport`; file slices go with sendfile(2) where the transport can, else
  are read and sent as bytes. `transport` may be replaced while nothing is
  in flight (STARTTLS swaps in the TLS transport, nbd/tls.py).
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import Callable, Iterator
from typing import Protocol

import outcome
import trio

from dstfs.iotypes import Buffer, ConnectionLost, FileSlice
from dstfs.nbd.transport import Transport

_IOV_MAX = 1024
#: Bytes queued for sending past which producers wait (memory stays bounded).
HIGH_WATER = 8 << 20
#: Scheduler rounds the sender waits while the queue keeps growing.
COALESCE_ROUNDS = 2


#: A pending payload at least this big is received straight into its buffer.
_DIRECT_MIN = 16 * 1024
#: Bytes of a file read per send where the transport has no sendfile.
_FILE_PIECE = 256 * 1024


_local = threading.local()


def _bounce() -> memoryview:
    """The receive buffer of this thread's connections. One is enough: what
    is received into it is handed to the decoder, which copies it, before
    anything else runs; one per connection cost 256 KiB each (1000 idle
    clients: 256 MiB)."""
    try:
        return _local.bounce
    except AttributeError:
        _local.bounce = memoryview(bytearray(256 * 1024))
        return _local.bounce


class Decoder(Protocol):
    def payload_buffer(self) -> memoryview | None: ...
    def payload_buffers(self) -> list[memoryview] | None: ...
    def payload_received(self, n: int) -> None: ...
    def receive_data(self, data: memoryview) -> None: ...


def _why(e: OSError) -> str:
    # The transport's own words where it has them ("TLS: ..."), else the errno's.
    return e.strerror or os.strerror(e.errno or errno.EIO)


class SocketIO:
    def __init__(self, transport: Transport, peer: str) -> None:
        self.transport = transport
        self.peer = peer
        self._send_lock = trio.StrictFIFOLock()
        self.closed = False
        self.broken: str | None = None
        self._queue: list[Buffer] = []
        self.queued = 0
        self._sender: trio.lowlevel.Task | None = None
        self._sender_parked = False
        self._room = trio.Event()
        self._room.set()
        self._big_payloads = False
        self._burst = False
        self.queued_total = 0
        self.sent_total = 0
        self.on_sent: Callable[[int], None] | None = None
        self.send_stall: float | None = None
        #: The last receive in fill() got less than it asked for.
        self._drained = False

    # -- batched sending (the hot path)

    def send_soon(self, *bufs: Buffer) -> None:
        """Queue `bufs` (kept, not copied) for the sender task."""
        if self.broken is not None:
            raise ConnectionLost(f"{self.peer}: {self.broken}")
        self._queue.extend(bufs)
        n = 0
        for b in bufs:
            n += len(b)
        self.queued += n
        self.queued_total += n
        if self.queued > HIGH_WATER and self._room.is_set():
            self._room = trio.Event()
        if self._sender_parked:
            self._sender_parked = False
            trio.lowlevel.reschedule(self._sender)

    def send_now(self, *bufs: Buffer) -> None:
        """Send `bufs` from the caller's task when the line is free (see the
        module's rules), else queue them. What the kernel does not take at
        once is queued for the sender, ahead of anything queued later, so
        the order on the wire is kept."""
        if self._queue or self._send_lock.locked() or self.broken is not None or self._burst:
            self.send_soon(*bufs)
            return
        # Until the sender runs (next round), later sends join one batch.
        self._burst = True
        if self._sender_parked:
            self._sender_parked = False
            trio.lowlevel.reschedule(self._sender)
        try:
            sent = self.transport.send(bufs)
        except BlockingIOError:
            sent = 0
        except OSError as e:
            raise self._fail(f"send failed: {_why(e)}") from None
        self.queued_total += sent
        self.sent_total += sent
        for i, b in enumerate(bufs):
            n = len(b)
            if sent < n:
                rest = [memoryview(b).cast("B")[sent:], *bufs[i + 1 :]]
                self.send_soon(*rest)
                return
            sent -= n

    async def flush(self, timeout: float = 5.0) -> None:
        """Wait (up to `timeout`) until everything queued has been sent."""
        with trio.move_on_after(timeout):
            while (self._queue or self._send_lock.locked()) and self.broken is None:
                await trio.sleep(0.001)

    async def wait_room(self) -> None:
        """Wait while more than HIGH_WATER bytes are queued."""
        while not self._room.is_set():
            if self.broken is not None:
                raise ConnectionLost(f"{self.peer}: {self.broken}")
            await self._room.wait()

    async def run_sender(self) -> None:
        """Send what `send_soon` queues until the socket breaks or closes;
        a failure marks the socket broken (readers then see it too)."""
        self._sender = trio.lowlevel.current_task()
        try:
            while True:
                if not self._queue:
                    self._burst = False
                    if self.broken is not None:
                        return
                    self._sender_parked = True
                    await trio.lowlevel.wait_task_rescheduled(self._unpark)
                    continue
                # Let the tasks that are ready now queue theirs too: one send
                # for a burst of requests costs far less than one each.
                for _ in range(COALESCE_ROUNDS):
                    n = len(self._queue)
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    if len(self._queue) == n:
                        break
                bufs, self._queue = self._queue, []
                taken = self.queued  # all of it is in this batch
                if any(type(b) is FileSlice for b in bufs):
                    await self._send_mixed(bufs)
                else:
                    await self.send_all(*bufs)
                self.sent_total += taken
                if self.on_sent is not None:
                    self.on_sent(self.sent_total)
                self.queued = 0 if not self._queue else sum(len(b) for b in self._queue)
                if self.queued <= HIGH_WATER:
                    self._room.set()
        except ConnectionLost:
            self._room.set()  # producers wake and see `broken`
            self._close_for_readers()
            # Nothing queued will leave now: count it as gone, for on_sent.
            self.sent_total = self.queued_total
            if self.on_sent is not None:
                self.on_sent(self.sent_total)
        finally:
            self._sender_parked = False
            self._sender = None

    def _unpark(self, _: object) -> trio.lowlevel.Abort:
        # Cancelled while parked: no send_soon may reschedule it any more
        # (a second reschedule of a task crashes the run loop).
        self._sender_parked = False
        return trio.lowlevel.Abort.SUCCEEDED

    async def _send_mixed(self, items: list[Buffer | FileSlice]) -> None:
        if not self.transport.can_sendfile:
            await self._send_read(items)
            return
        run: list[Buffer] = []
        for item in items:
            if type(item) is FileSlice:
                if run:
                    await self.send_all(*run)
                    run = []
                await self._sendfile(item)
            else:
                run.append(item)  # type: ignore[arg-type]
        if run:
            await self.send_all(*run)

    async def _sendfile(self, piece: FileSlice) -> None:
        offset, left = piece.offset, piece.count
        transport = self.transport
        with self._sending("sendfile"):
            while left:
                try:
                    n = transport.sendfile(piece.fd, offset, left)
                except BlockingIOError:
                    await self._wait_writable()
                    continue
                if n == 0:  # past the end of a short file: zeroes
                    await self.send_all(bytes(left))
                    return
                offset += n
                left -= n

    async def _send_read(self, items: list[Buffer | FileSlice]) -> None:
        """A transport without sendfile: file slices are read in pieces and
        sent with the buffers around them (a reply's header goes with its
        data); past the end of a short file, zeroes."""
        run: list[Buffer] = []
        size = 0
        for item in items:
            if type(item) is not FileSlice:
                run.append(item)  # type: ignore[arg-type]
                size += len(item)
                continue
            offset, end = item.offset, item.offset + item.count
            while offset < end:
                n = min(_FILE_PIECE, end - offset)
                try:
                    data = os.pread(item.fd, n, offset)
                except OSError as e:
                    raise self._fail(f"file read failed: {_why(e)}") from None
                if not data:
                    data = bytes(n)
                run.append(data)
                size += len(data)
                offset += len(data)
                if size >= _FILE_PIECE:
                    await self.send_all(*run)
                    run, size = [], 0
        if run:
            await self.send_all(*run)

    @contextlib.contextmanager
    def _sending(self, what: str) -> Iterator[None]:
        """Errors while part of a message is on the wire: the stream is lost
        (also when cancelled half way), and the socket is marked broken."""
        try:
            yield
        except OSError as e:
            raise self._fail(f"{what} failed: {_why(e)}") from None
        except trio.ClosedResourceError:
            raise self._fail("socket closed during send") from None
        except BaseException:
            self._fail("send interrupted")
            raise

    def _close_for_readers(self) -> None:
        # The stream is unusable: make a reader blocked in recv notice now.
        self.transport.shutdown()

    async def send_all(self, *bufs: Buffer) -> None:
        """Send every byte of `bufs`, in order, as one unit on the stream."""
        lock = self._send_lock
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:
            await lock.acquire()
        try:
            if self.broken is not None:
                raise ConnectionLost(f"{self.peer}: {self.broken}")
            try:
                sent = self.transport.send(bufs if len(bufs) <= _IOV_MAX else bufs[:_IOV_MAX])
            except BlockingIOError:
                sent = 0
            except OSError as e:
                raise self._fail(f"send failed: {_why(e)}") from None
            total = sum(len(b) for b in bufs)
            if sent == total:
                return
            await self._send_rest(bufs, sent)
        except ConnectionLost:
            self._room.set()
            raise
        finally:
            lock.release()

    async def _send_rest(self, bufs: tuple[Buffer, ...], sent: int) -> None:
        views = [memoryview(b).cast("B") for b in bufs if len(b)]
        with self._sending("send"):
            while True:
                while views and sent >= len(views[0]):
                    sent -= len(views[0])
                    views.pop(0)
                if not views:
                    return
                if sent:
                    views[0] = views[0][sent:]
                    sent = 0
                await self._wait_writable()
                try:
                    sent = self.transport.send(views[:_IOV_MAX])
                except BlockingIOError:
                    sent = 0

    async def _wait_writable(self) -> None:
        if self.send_stall is None:
            await self.transport.wait_writable()
            return
        with trio.move_on_after(self.send_stall):
            await self.transport.wait_writable()
            return
        raise self._fail(f"the peer read nothing for {self.send_stall:g} s")

    async def recvmsg_into(self, bufs: list[memoryview]) -> int:
        """Like recv_into, scattering over `bufs`."""
        return await self._receive(lambda: self.transport.recvmsg_into(bufs))

    async def recv_into(self, buf: memoryview) -> int:
        """Receive at least one byte into `buf`; 0 means the peer closed."""
        return await self._receive(lambda: self.transport.recv_into(buf))

    async def _receive(self, attempt: Callable[[], int]) -> int:
        while True:
            try:
                return attempt()
            except BlockingIOError:
                pass
            except OSError as e:
                raise self._fail(f"receive failed: {_why(e)}") from None
            try:
                await self.transport.wait_readable()
            except trio.ClosedResourceError:
                raise ConnectionLost(f"{self.peer}: socket closed") from None

    async def fill(self, decoder: Decoder) -> None:
        """Receive into `decoder`: a large pending payload straight into its
        own buffer, anything else through a bounce buffer. After a large
        payload the bounce read is kept small, so the next payload (likely
        large too) is copied once, from the kernel into its buffer, not twice.
        Where to receive is asked of the decoder again after every wait: a
        reader that gave up meanwhile has had its buffers taken back.
        ConnectionLost when the peer closed."""
        transport = self.transport
        if self._drained:
            # The last receive did not fill its buffer: the kernel had no
            # more then. Wait for readiness first rather than spend a
            # receive (and an exception) to learn that again; readiness is
            # level-triggered, so bytes that came meanwhile are not missed.
            self._drained = False
            try:
                await transport.wait_readable()
            except trio.ClosedResourceError:
                raise ConnectionLost(f"{self.peer}: socket closed") from None
        while True:
            pbs = decoder.payload_buffers()
            direct = pbs is not None and sum(len(b) for b in pbs) >= _DIRECT_MIN
            try:
                if direct:
                    assert pbs is not None
                    if len(pbs) == 1:
                        asked = len(pbs[0])
                        n = transport.recv_into(pbs[0])
                    else:
                        asked = sum(len(b) for b in pbs)
                        n = transport.recvmsg_into(pbs)
                else:
                    bounce = _bounce()
                    if self._big_payloads:
                        bounce = bounce[:4096]
                    asked = len(bounce)
                    n = transport.recv_into(bounce)
            except BlockingIOError:
                try:
                    await transport.wait_readable()
                except trio.ClosedResourceError:
                    raise ConnectionLost(f"{self.peer}: socket closed") from None
                continue
            except OSError as e:
                raise self._fail(f"receive failed: {os.strerror(e.errno or errno.EIO)}") from None
            break
        if not n:
            # Our own shutdown (a failed send) reads as an end of stream too.
            raise ConnectionLost(f"{self.peer}: {self.broken or 'closed by the peer'}")
        self._drained = n < asked
        if direct:
            decoder.payload_received(n)
            self._big_payloads = True
        else:
            decoder.receive_data(bounce[:n])
            # Stay small only while the data keeps opening large payloads.
            pb = decoder.payload_buffer()
            self._big_payloads = pb is not None and len(pb) >= _DIRECT_MIN

    def _fail(self, reason: str) -> ConnectionLost:
        if self.broken is None:
            self.broken = reason
        return ConnectionLost(f"{self.peer}: {reason}")

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.broken is None:
                self.broken = "closed"
            self._room.set()
            if self._sender_parked:
                self._sender_parked = False
                trio.lowlevel.reschedule(self._sender, outcome.Error(ConnectionLost("closed")))
            self.transport.close()
