"""A trio NBD server exporting one backend (a file or block device).

Rules:
- Fixed newstyle only. Options: EXPORT_NAME, ABORT, LIST, INFO, GO (with
  NBD_INFO_EXPORT, NAME, DESCRIPTION, BLOCK_SIZE), STRUCTURED_REPLY,
  LIST_META_CONTEXT and SET_META_CONTEXT; every other option gets
  NBD_REP_ERR_UNSUP and the handshake goes on.
- The one metadata context is `base:allocation`, offered for a backend that
  can report block status (a file: SEEK_DATA/SEEK_HOLE); NBD_CMD_BLOCK_STATUS
  is answered with one final BLOCK_STATUS chunk covering a prefix of the range.
- Two ways to serve a connection's requests, chosen by the backend's
  `concurrent_requests`:
  - In order (a file: pread/pwrite do not wait on anything worth
    overlapping): one request at a time, so a connection buffers at most
    one request (<= MAX_PAYLOAD) however fast the client sends.
  - Concurrently (the array: every request waits on network nodes): READ,
    WRITE, TRIM, WRITE_ZEROES, CACHE and BLOCK_STATUS each run as their own
    task, at most MAX_IN_FLIGHT per connection holding at most
    IN_FLIGHT_BYTES of payload and read data (one request of any size when
    none is in flight); past either the reader stops reading, so memory
    stays bounded per connection. A payload buffer goes back to the pool
    when its request's task is done. READ data is also bounded over all
    connections (READ_MEMORY, one READ of any size when none holds any):
    it is held from the READ's start until its reply has reached the
    kernel, so clients that do not read their replies cannot make the
    server hold more; one that reads nothing for REPLY_STALL seconds while
    a reply waits is dropped, and what it held goes back.
  Either way FLUSH and FUA writes, which wait on the disk, run as their own
  tasks (at most MAX_DURABLE) so requests behind them go on, and replies
  may leave out of order. On NBD_CMD_DISC every reply still owed (every
  request task, not only FLUSH/FUA) is sent before the connection closes;
  a connection that breaks still lets the requests already started finish
  (their replies are dropped), so no request is cut off half way.
- FLUSH (and FUA) covers every write acknowledged before it arrived, on any
  connection: an acknowledged write has completed at the backend, and the
  backend's flush covers every completed write. A write still in flight
  when the FLUSH arrives may or may not be covered (the spec asks no more).
- What a READ shows: every WRITE (TRIM, WRITE_ZEROES) acknowledged on any
  connection before the READ arrived. In order, a WRITE is also in the file
  before the next request is handled, so a READ shows every WRITE that
  arrived before it on its connection; and a READ of a file is answered
  with sendfile(2), which reads the file when the reply is sent, so it may
  also show a WRITE that arrived after it while its reply waited to be
  sent. Concurrently, a READ may show all, part or none of a WRITE that is
  in flight with it, whichever arrived first. The spec lets a server answer
  requests in flight together in any order; a client that needs a given
  order waits for one reply before it sends the other request.
- A request the server will not do (past the end: ENOSPC for WRITE and
  WRITE_ZEROES, EINVAL otherwise; too big; flags not valid for the
  command; a change to a read-only export; unknown command) gets an NBD
  error reply; a protocol violation (bad magic, unknown client flags)
  drops that connection only. The server never crashes for a client, and
  keeps serving the others.
- TLS (NBD_OPT_STARTTLS) when the server has a TLS context: `tls_required`
  is the spec's FORCEDTLS (every option but STARTTLS and ABORT gets
  NBD_REP_ERR_TLS_REQD before TLS, EXPORT_NAME closes the connection),
  otherwise TLS is the client's choice (SELECTIVETLS with no TLS-only
  export). After STARTTLS nothing negotiated before counts; plain bytes
  that arrived behind it close the connection (no injection). Without a
  context STARTTLS is NBD_REP_ERR_UNSUP.
- `allow` (networks): a TCP peer outside them is closed before the
  greeting, and logged. Unix socket peers are not filtered.
- A unix socket server takes its path over only from a stale socket: a
  file there (EEXIST) or a socket something listens on (EADDRINUSE) is
  left alone and the server does not start.
- CAN_MULTI_CONN is advertised: every connection shares one file descriptor,
  so a FLUSH on one covers writes acknowledged on all.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import ipaddress
import logging
import math
import os
import socket
import ssl
import stat
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

import attrs
import trio

from dstfs.backends.base import Backend
from dstfs.backends.file import FileBackend
from dstfs.iotypes import ConnectionLost, PayloadPool
from dstfs.nbd import protocol as P
from dstfs.nbd.sockio import HIGH_WATER, SocketIO
from dstfs.nbd.tls import TLSHandshakeError, start_tls
from dstfs.nbd.transport import SocketTransport

log = logging.getLogger(__name__)
T = TypeVar("T")

PREFERRED_BLOCK = 4096
#: Seconds a new connection has to finish the handshake (GO or EXPORT_NAME).
HANDSHAKE_TIMEOUT = 10.0
#: Connections served at once; more are closed at once (and logged).
MAX_CONNECTIONS = 256
#: Bytes of large WRITE payloads being received at once, over all
#: connections; more wait for memory (see PayloadPool).
PAYLOAD_MEMORY = 256 << 20
#: Seconds a large WRITE payload (which holds reserved memory) may make no
#: progress before its connection is dropped.
PAYLOAD_STALL = 30.0
#: Bytes of READ data held at once over all connections by a backend that
#: serves concurrently (the array), from the READ's start until its reply
#: has been sent; more READs wait.
READ_MEMORY = 256 << 20
#: Seconds a client may read nothing while a reply waits to be sent before
#: its connection is dropped (the replies it left unread hold memory).
REPLY_STALL = 30.0
#: accept() failing for want of descriptors or memory: first pause, longest pause.
ACCEPT_BACKOFF = (0.05, 1.0)
_ACCEPT_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
#: FLUSH and FUA requests waiting on the disk at once, per connection; past
#: it the reader stops reading, so a client cannot pile them up.
MAX_DURABLE = 16
#: Seconds a session that got DISC waits for the replies it still owes.
DISC_GRACE = 60.0
#: Requests served at once per connection, for a backend that serves
#: requests concurrently; past it the reader stops reading.
MAX_IN_FLIGHT = 64
#: Bytes of WRITE payloads and READ data the requests in flight on one
#: connection may hold (the reply queue has HIGH_WATER more); one request
#: of any size is always let in when none is in flight.
IN_FLIGHT_BYTES = 8 << 20
#: Commands run as their own task when the backend serves concurrently.
_CONCURRENT = frozenset(
    {P.Cmd.READ, P.Cmd.WRITE, P.Cmd.TRIM, P.Cmd.WRITE_ZEROES, P.Cmd.CACHE, P.Cmd.BLOCK_STATUS}
)
#: Request flags valid per command (FUA is valid on all, as the spec says;
#: DF and FAST_ZERO are not advertised, so never valid).
_FLAGS = {
    P.Cmd.WRITE_ZEROES: P.CmdFlag.FUA | P.CmdFlag.NO_HOLE,
    P.Cmd.BLOCK_STATUS: P.CmdFlag.FUA | P.CmdFlag.REQ_ONE,
}
#: The id this server gives the base:allocation metadata context.
BASE_ALLOCATION_ID = 1
_TLS_REQD = b"TLS is required: send NBD_OPT_STARTTLS first"
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@attrs.define
class Export:
    name: str
    backend: Backend
    read_only: bool = False
    description: str = ""

    @property
    def flags(self) -> int:
        T = P.TransmissionFlag
        flags = T.HAS_FLAGS | T.SEND_FLUSH | T.SEND_FUA | T.CAN_MULTI_CONN
        if self.read_only:
            flags |= T.READ_ONLY
        else:
            flags |= T.SEND_TRIM | T.SEND_WRITE_ZEROES
        return int(flags)


@attrs.define
class ServerStats:
    connections: int = 0
    active: int = 0
    requests: int = 0
    errors: int = 0
    protocol_errors: int = 0
    #: Connections closed at once: over the limit, or no descriptor or memory.
    refused: int = 0
    #: Connections closed for not finishing the handshake in time.
    handshake_timeouts: int = 0
    #: TCP peers closed before the greeting: not in `allow`.
    disallowed: int = 0
    tls_failures: int = 0


class NbdServer:
    """Serves `exports` (the first is the default, reached by the empty name)."""

    def __init__(
        self,
        exports: Sequence[Export],
        *,
        max_connections: int = MAX_CONNECTIONS,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        payload_memory: int = PAYLOAD_MEMORY,
        read_memory: int = READ_MEMORY,
        reply_stall: float = REPLY_STALL,
        tls: ssl.SSLContext | None = None,
        tls_required: bool = False,
        allow: Sequence[Network] | None = None,
    ) -> None:
        if not exports:
            raise ValueError("an NBD server needs at least one export")
        if tls_required and tls is None:
            raise ValueError("TLS cannot be required without a TLS context")
        self.exports = {e.name: e for e in exports}
        self.default = exports[0]
        self.stats = ServerStats()
        self.max_connections = max_connections
        self.handshake_timeout = handshake_timeout
        #: WRITE payload buffers, shared by every connection (bounded memory).
        self.pool = PayloadPool(cap=payload_memory)
        self._memory_freed = trio.Event()
        #: Connections waiting for payload memory, served first come first.
        self._memory_queue = trio.StrictFIFOLock()
        self.memory_waiters = 0
        #: READ data held over all connections (see the module's rules).
        self.read_memory = _InFlight(sys.maxsize, read_memory)
        self.reply_stall = reply_stall
        self.tls = tls
        self.tls_required = tls_required
        self.allow = list(allow) if allow is not None else None
        #: Set by a server that only accepts (dstfs/workers.py): a connection
        #: that passed the checks goes to `hand_off(sock, peer)` instead of
        #: being served here; True means handed (counted in `stats.active`
        #: until `handed_connection_ended()`).
        self.hand_off: Callable[[socket.socket, str], bool] | None = None

    def take_buffer(self, n: int) -> memoryview | None:
        """A payload buffer now, or None: the pool is full, or others wait
        (a newcomer does not overtake them)."""
        if self.memory_waiters and n > self.pool.small:
            return None
        return self.pool.take(n)

    def give_buffer(self, buf: memoryview, reuse: bool) -> None:
        """A payload buffer is done with: back to the pool, and wake the
        connections waiting for memory."""
        self.pool.give(buf, reuse)
        self._memory_freed.set()

    async def wait_memory(self, n: int) -> memoryview:
        """A payload buffer of n bytes, once the pool can grant one."""
        self.memory_waiters += 1
        try:
            async with self._memory_queue:
                while (buf := self.pool.take(n)) is None:
                    if self._memory_freed.is_set():
                        self._memory_freed = trio.Event()
                    await self._memory_freed.wait()
        finally:
            self.memory_waiters -= 1
        return buf

    def block_sizes(self, export: Export) -> tuple[int, int, int]:
        """NBD_INFO_BLOCK_SIZE of `export`: any alignment (a file or block
        device takes bytes), 4096 preferred (a page: no read-modify-write
        in the page cache), our payload limit."""
        return 1, PREFERRED_BLOCK, P.MAX_PAYLOAD

    def allowed(self, address: str) -> bool:
        """Whether a TCP peer at `address` may connect (see `allow`)."""
        if self.allow is None:
            return True
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # an IPv4 peer on a dual-stack socket
        return any(ip.version == net.version and ip in net for net in self.allow)

    def find(self, name: str) -> Export | None:
        if name == "":
            return self.default
        return self.exports.get(name)

    async def serve_tcp(
        self,
        host: str,
        port: int,
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host)
        await self.serve_listeners(listeners, task_status=task_status)

    async def serve_unix(
        self,
        path: str,
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        sock = trio.socket.from_stdlib_socket(bind_unix(path))
        try:
            await self.serve_listeners([trio.SocketListener(sock)], task_status=task_status)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)

    async def serve_listeners(
        self,
        listeners: list[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept on listeners already bound (and listening) until cancelled."""
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(self._accept_loop, listener, nursery)
            nursery.start_soon(self._trim_pool)
            task_status.started(listeners)

    async def _trim_pool(self) -> None:
        """Give idle payload memory back to the system."""
        while True:
            await trio.sleep(self.pool.idle / 2)
            self.pool.trim()

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        """Accept for ever. Out of descriptors or memory, a connection is
        refused (accepted with the spare descriptor kept for this, closed),
        logged, and accepting pauses briefly: the server itself goes on."""
        # A plain socket on the listener: trio's accept would end this loop on EMFILE.
        lsock = socket.socket(fileno=os.dup(listener.socket.fileno()))
        lsock.setblocking(False)
        spare: int | None = os.open(os.devnull, os.O_RDONLY)
        backoff = ACCEPT_BACKOFF[0]
        try:
            while True:
                try:
                    raw, addr = lsock.accept()
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(lsock)
                    continue
                except OSError as e:
                    if e.errno not in _ACCEPT_RESOURCE_ERRORS:
                        if e.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                            continue  # that peer gave up already
                        raise
                    spare = self._refuse(lsock, spare, e)
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, ACCEPT_BACKOFF[1])
                    continue
                backoff = ACCEPT_BACKOFF[0]
                if spare is None:
                    with contextlib.suppress(OSError):
                        spare = os.open(os.devnull, os.O_RDONLY)
                try:
                    self._start(raw, addr, nursery)
                except MemoryError:
                    raw.close()
                    log.error("out of memory: refused a connection")
                    await trio.sleep(backoff)
        finally:
            if spare is not None:
                os.close(spare)
            trio.lowlevel.notify_closing(lsock)
            lsock.close()
            with trio.CancelScope(shield=True):
                await listener.aclose()

    def _refuse(self, lsock: socket.socket, spare: int | None, e: OSError) -> int | None:
        """accept() failed for want of resources: free the spare descriptor,
        accept and close the waiting connection so its peer is not left
        hanging, and take the spare back if it can be had."""
        self.stats.refused += 1
        refused = "?"
        if spare is not None:
            os.close(spare)
            spare = None
            with contextlib.suppress(OSError):
                sock, addr = lsock.accept()
                sock.close()
                refused = _peer_name(sock.family, addr)
            with contextlib.suppress(OSError):
                spare = os.open(os.devnull, os.O_RDONLY)
        log.error("accept failed (%s): refused connection from %s", e.strerror, refused)
        return spare

    def _start(self, raw: socket.socket, addr: object, nursery: trio.Nursery) -> None:
        peer = _peer_name(raw.family, addr)
        tcp = raw.family in (socket.AF_INET, socket.AF_INET6)
        if tcp and not self.allowed(addr[0]):  # type: ignore[index]
            self.stats.disallowed += 1
            log.warning("%s: refused: not in --allow", peer)
            raw.close()
            return
        if self.stats.active >= self.max_connections:
            self.stats.refused += 1
            log.warning(
                "%s: refused: %d connections already (--max-connections)", peer, self.stats.active
            )
            raw.close()
            return
        if raw.family in (socket.AF_INET, socket.AF_INET6):
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.hand_off is not None:
            if self.hand_off(raw, peer):
                self.stats.active += 1
            raw.close()  # the receiver has its own descriptor now
            return
        self.stats.active += 1  # counted now: the limit holds for a burst of accepts
        nursery.start_soon(self._handle_counted, SocketIO(SocketTransport(raw), peer))

    def handed_connection_ended(self) -> None:
        """A connection given to `hand_off` has ended where it was served."""
        self.stats.active -= 1

    async def serve_one(self, raw: socket.socket, peer: str) -> None:
        """Serve a connection accepted elsewhere (and checked there: --allow,
        --max-connections) until it ends."""
        await self.handle(SocketIO(SocketTransport(raw), peer))

    async def _handle_counted(self, io: SocketIO) -> None:
        self.stats.active -= 1
        await self.handle(io)

    async def handle(self, io: SocketIO) -> None:
        """Serve one client until it disconnects; never raises for its sake."""
        self.stats.connections += 1
        self.stats.active += 1
        log.info("%s: client connected", io.peer)
        try:
            await _Session(self, io).run()
        except P.ProtocolError as e:
            self.stats.protocol_errors += 1
            log.warning("%s: protocol error, disconnecting: %s", io.peer, e)
        except TLSHandshakeError as e:
            self.stats.tls_failures += 1
            log.warning("%s: %s, disconnecting", io.peer, e.strerror)
        except ConnectionLost as e:
            log.info("%s: client gone: %s", io.peer, e)
        except OSError as e:
            log.warning("%s: I/O error, disconnecting: %s", io.peer, e)
        finally:
            self.stats.active -= 1
            io.close()
            log.info("%s: client disconnected", io.peer)


def check_unix_path(path: str) -> None:
    """A unix socket server replaces what is at `path`: only ever a stale
    socket, never a file (EEXIST), nor a socket something still listens on
    (EADDRINUSE)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(path)
        except OSError:
            return  # nobody listens: a leftover, safe to replace
    raise OSError(errno.EADDRINUSE, f"{path}: a server already listens there")


def bind_tcp(host: str, port: int) -> list[socket.socket]:
    """Listening sockets on every address `host` resolves to (as
    trio.open_tcp_listeners binds them), without trio."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    socks: list[socket.socket] = []
    try:
        for family, type_, proto, _, addr in infos:
            sock = socket.socket(family, type_, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(socket.SOMAXCONN)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def bind_unix(path: str) -> socket.socket:
    """A listening unix socket at `path`, taken over only from a stale
    socket (check_unix_path)."""
    check_unix_path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a stale socket: check_unix_path said so
        sock.bind(path)
        sock.listen(socket.SOMAXCONN)
    except BaseException:
        sock.close()
        raise
    return sock


def _peer_name(family: int, addr: object) -> str:
    if family in (socket.AF_INET, socket.AF_INET6) and isinstance(addr, tuple):
        return f"{addr[0]}:{addr[1]}"
    return f"unix:{addr or '?'}"


class _Disconnect(Exception):
    pass


class _InFlight:
    """Requests under way and the bytes they hold, bounded: the request
    tasks of one connection, or the READ data of every connection (the
    server's `read_memory`, no bound on the count)."""

    def __init__(self, limit: int, budget: int) -> None:
        self.limit, self.budget = limit, budget
        self.count = 0
        self.bytes = 0
        self._changed = trio.Event()

    def room(self, cost: int) -> bool:
        if not self.count:
            return True  # any single request may run
        return self.count < self.limit and self.bytes + cost <= self.budget

    async def admit(self, cost: int) -> None:
        """Wait until a request holding `cost` bytes may start; count it in."""
        while not self.room(cost):
            await self._changed.wait()
        self.count += 1
        self.bytes += cost

    def done(self, cost: int) -> None:
        self.count -= 1
        self.bytes -= cost
        self._changed.set()
        self._changed = trio.Event()

    async def idle(self) -> None:
        """Wait until no request task is left."""
        while self.count:
            await self._changed.wait()


class _Session:
    def __init__(self, server: NbdServer, io: SocketIO) -> None:
        self.server = server
        self.io = io
        io.send_stall = server.reply_stall
        io.on_sent = self._sent
        #: READ replies queued and not yet sent: (queued_total after each, its bytes).
        self._unsent: collections.deque[tuple[int, int]] = collections.deque()
        self.conn = P.ServerConnection()
        self.conn.alloc = server.take_buffer
        self.export: Export | None = None
        self.durable_slots = trio.Semaphore(MAX_DURABLE)
        self.in_flight = _InFlight(MAX_IN_FLIGHT, IN_FLIGHT_BYTES)
        #: The export SET_META_CONTEXT named, and the base:allocation id it selected.
        self.meta_export: str | None = None
        self.meta_id: int | None = None
        #: TLS was initiated on this connection (STARTTLS).
        self.tls = False

    async def run(self) -> None:
        # Until GO or EXPORT_NAME: then the deadline goes (see _option).
        self.handshake = trio.CancelScope(
            deadline=trio.current_time() + self.server.handshake_timeout
        )
        try:
            await self._serve()
        finally:
            self._give_unsent()

    async def _serve(self) -> None:
        error: Exception | None = None
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            nursery.start_soon(self.io.run_sender)
            try:
                try:
                    with self.handshake:
                        await self.io.send_all(self.conn.greeting())
                        await self._loop()
                finally:
                    self._release_payload()
                if self.handshake.cancelled_caught:
                    self._handshake_expired()
                    raise _Disconnect
                # The client's DISC: first every reply still owed.
                await self._drain()
                await self.io.flush()
            except _Disconnect:
                await self._drain()
            except (P.ProtocolError, OSError) as e:
                error = e  # raised outside the nursery, so not wrapped in a group
                await self._drain()  # requests already started finish
            nursery.cancel_scope.cancel()
        if error is not None:
            raise error

    async def _drain(self) -> None:
        """Wait (up to DISC_GRACE) for every request task: the concurrent
        ones first, since a FUA write among them starts a durable task."""
        with trio.move_on_after(DISC_GRACE) as scope:
            await self.in_flight.idle()
            for _ in range(MAX_DURABLE):
                await self.durable_slots.acquire()
            for _ in range(MAX_DURABLE):
                self.durable_slots.release()
        if scope.cancelled_caught:
            log.warning(
                "%s: %d requests still unanswered after %g s, closing",
                self.io.peer,
                self.in_flight.count,
                DISC_GRACE,
            )

    def _handshake_expired(self) -> None:
        self.server.stats.handshake_timeouts += 1
        log.warning(
            "%s: no handshake within %g s, disconnecting",
            self.io.peer,
            self.server.handshake_timeout,
        )

    def _release_payload(self) -> None:
        """The session ends: a WRITE payload half received goes back to the pool."""
        buf = self.conn.take_payload()
        if isinstance(buf, memoryview):
            self.server.give_buffer(buf, reuse=True)

    async def _loop(self) -> None:
        conn = self.conn
        while True:
            ev = conn.next_event()
            if ev is None:
                if conn.payload_wanted:
                    # No memory for this payload now: read nothing more from
                    # this client until another connection gives some back.
                    conn.supply_payload(await self.server.wait_memory(conn.payload_wanted))
                elif conn.payload_pending > self.server.pool.small:
                    # A large payload holds reserved memory: it must keep coming.
                    with trio.move_on_after(PAYLOAD_STALL):
                        await self.io.fill(conn)
                        continue
                    log.warning(
                        "%s: WRITE payload stalled for %g s with %d bytes to come, disconnecting",
                        self.io.peer,
                        PAYLOAD_STALL,
                        conn.payload_pending,
                    )
                    raise _Disconnect
                else:
                    await self.io.fill(conn)
                continue
            if type(ev) is P.Request:
                started = False
                try:
                    if self.io.queued > HIGH_WATER:
                        await self.io.wait_room()  # a client that does not read its replies
                    if self._concurrent(ev):
                        cost = ev.length if ev.type in (P.Cmd.READ, P.Cmd.WRITE) else 0
                        held = ev.length if ev.type == P.Cmd.READ else 0
                        if held:
                            await self.server.read_memory.admit(held)
                        try:
                            await self.in_flight.admit(cost)
                        except BaseException:
                            if held:
                                self.server.read_memory.done(held)
                            raise
                        self.nursery.start_soon(self._request_task, ev, cost, held)
                        started = True  # the task gives the payload back
                    elif not await self._request(ev):
                        return
                finally:
                    if not started:
                        self._give_payload(ev)
            elif type(ev) is P.Option:
                await self._option(ev)
            elif type(ev) is P.OptionTooBig:
                log.warning("%s: option %d with %d bytes refused", self.io.peer, ev.opt, ev.length)
                if self._tls_missing():
                    await self._reply(ev.opt, P.Rep.ERR_TLS_REQD, _TLS_REQD)
                else:
                    await self._reply(ev.opt, P.Rep.ERR_TOO_BIG, b"option data too large")
            elif type(ev) is P.ClientFlags:
                pass

    def _concurrent(self, req: P.Request) -> bool:
        export = self.export
        return export is not None and export.backend.concurrent_requests and req.type in _CONCURRENT

    def _give_payload(self, req: P.Request) -> None:
        if type(req.data) is memoryview:
            # A file keeps no reference to what it wrote; others might.
            reuse = isinstance(self.export and self.export.backend, FileBackend)
            self.server.give_buffer(req.data, reuse)

    async def _request_task(self, req: P.Request, cost: int, held: int) -> None:
        """One request served beside others (see the module's rules); a
        READ's `held` bytes of read memory go back once its reply has left."""
        try:
            await self._request(req)
        except ConnectionLost:
            pass  # the reader sees the same and ends the session
        finally:
            self._give_payload(req)
            self.in_flight.done(cost)
            if held:
                self._replied(held)

    def _replied(self, held: int) -> None:
        # Nothing awaited since the reply was queued: it ends at queued_total.
        io = self.io
        if io.sent_total >= io.queued_total or io.broken is not None:
            self.server.read_memory.done(held)
        else:
            self._unsent.append((io.queued_total, held))

    def _sent(self, sent_total: int) -> None:
        """SocketIO.on_sent: the replies that have left give their memory back."""
        unsent = self._unsent
        while unsent and unsent[0][0] <= sent_total:
            self.server.read_memory.done(unsent.popleft()[1])

    def _give_unsent(self) -> None:
        """The session ended: replies never sent hold nothing any more."""
        while self._unsent:
            self.server.read_memory.done(self._unsent.popleft()[1])

    async def _reply(self, opt: int, rep: int, data: bytes = b"") -> None:
        await self.io.send_all(self.conn.option_reply(opt, rep, data))

    # -- handshake

    def _tls_missing(self) -> bool:
        return self.server.tls_required and not self.tls

    async def _option(self, ev: P.Option) -> None:
        opt, data, peer = ev.opt, ev.data, self.io.peer
        if opt == P.Opt.STARTTLS and self.server.tls is not None:
            await self._starttls(data)
            return
        if self._tls_missing() and opt != P.Opt.ABORT:
            if opt == P.Opt.EXPORT_NAME:  # it has no error reply
                log.warning("%s: EXPORT_NAME without TLS, which is required: disconnecting", peer)
                raise _Disconnect
            log.info("%s: option %d refused: TLS is required", peer, opt)
            await self._reply(opt, P.Rep.ERR_TLS_REQD, _TLS_REQD)
            return
        if opt == P.Opt.EXPORT_NAME:
            export = self.server.find(data.decode(errors="replace"))
            if export is None:
                log.warning("%s: unknown export %r, disconnecting", peer, data)
                raise _Disconnect
            self.export = export
            self.handshake.deadline = math.inf
            await self.io.send_all(self.conn.export_name_reply(export.backend.size, export.flags))
        elif opt == P.Opt.ABORT:
            await self._reply(opt, P.Rep.ACK)
            raise _Disconnect
        elif opt == P.Opt.LIST:
            if data:
                await self._reply(opt, P.Rep.ERR_INVALID, b"LIST takes no data")
                return
            for e in self.server.exports.values():
                await self._reply(opt, P.Rep.SERVER, P.encode_rep_server(e.name, e.description))
            await self._reply(opt, P.Rep.ACK)
        elif opt in (P.Opt.INFO, P.Opt.GO):
            await self._info(opt, data)
        elif opt in (P.Opt.LIST_META_CONTEXT, P.Opt.SET_META_CONTEXT):
            await self._meta_context(opt, data)
        elif opt == P.Opt.STRUCTURED_REPLY:
            if data:
                await self._reply(opt, P.Rep.ERR_INVALID, b"STRUCTURED_REPLY takes no data")
            elif self.conn.structured_replies:
                await self._reply(opt, P.Rep.ERR_INVALID, b"already negotiated")
            else:
                await self._reply(opt, P.Rep.ACK)
        else:
            log.info("%s: option %d not supported", peer, opt)
            await self._reply(opt, P.Rep.ERR_UNSUP)

    async def _starttls(self, data: bytes) -> None:
        opt = P.Opt.STARTTLS
        if data:
            await self._reply(opt, P.Rep.ERR_INVALID, b"STARTTLS takes no data")
            return
        if self.tls:
            await self._reply(opt, P.Rep.ERR_INVALID, b"TLS is already running")
            return
        await self._reply(opt, P.Rep.ACK)
        self.conn.tls_started()  # before the handshake: no plain bytes behind it
        transport = self.io.transport
        assert isinstance(transport, SocketTransport) and self.server.tls is not None
        self.io.transport = await start_tls(
            transport, self.server.tls, server_side=True, peer=self.io.peer
        )
        self.tls = True
        self.meta_export, self.meta_id = None, None
        log.info("%s: TLS %s", self.io.peer, self.io.transport.describe())

    async def _named_export(
        self, opt: int, decode: Callable[[bytes], tuple[str, T]], data: bytes
    ) -> tuple[str, Export, T] | None:
        """Decode an option that names an export; None once the error reply
        (ERR_INVALID for bad data, ERR_UNKNOWN for no such export) is queued."""
        try:
            name, rest = decode(data)
        except (ValueError, UnicodeDecodeError) as e:
            await self._reply(opt, P.Rep.ERR_INVALID, str(e).encode())
            return None
        export = self.server.find(name)
        if export is None:
            await self._reply(opt, P.Rep.ERR_UNKNOWN, f"no export {name!r}".encode())
            return None
        return name, export, rest

    async def _meta_context(self, opt: int, data: bytes) -> None:
        """LIST answers which contexts match the queries (all with none);
        SET selects the matching ones for the export GO will name."""
        selecting = opt == P.Opt.SET_META_CONTEXT
        if selecting:  # replaces what was selected, even when it fails (the spec)
            self.meta_export, self.meta_id = None, None
        if selecting and not self.conn.structured_replies:
            await self._reply(opt, P.Rep.ERR_INVALID, b"negotiate structured replies first")
            return
        found = await self._named_export(opt, P.decode_meta_context_query, data)
        if found is None:
            return
        name, export, queries = found
        if selecting:
            self.meta_export = name
            wanted = P.BASE_ALLOCATION in queries
        else:  # LIST: no query lists everything; "base:" a whole namespace
            wanted = not queries or any(q in ("base:", P.BASE_ALLOCATION) for q in queries)
        if wanted and export.backend.can_block_status:
            reply = P.encode_rep_meta_context(BASE_ALLOCATION_ID, P.BASE_ALLOCATION)
            await self._reply(opt, P.Rep.META_CONTEXT, reply)
            if selecting:
                self.meta_id = BASE_ALLOCATION_ID
        await self._reply(opt, P.Rep.ACK)

    async def _info(self, opt: int, data: bytes) -> None:
        found = await self._named_export(opt, P.decode_go_data, data)
        if found is None:
            return
        name, export, requests = found
        await self._reply(opt, P.Rep.INFO, P.encode_info_export(export.backend.size, export.flags))
        sizes = self.server.block_sizes(export)
        await self._reply(opt, P.Rep.INFO, P.encode_info_block_size(*sizes))
        if P.Info.NAME in requests:
            await self._reply(opt, P.Rep.INFO, P.encode_info_string(P.Info.NAME, export.name))
        if P.Info.DESCRIPTION in requests and export.description:
            await self._reply(
                opt, P.Rep.INFO, P.encode_info_string(P.Info.DESCRIPTION, export.description)
            )
        if opt == P.Opt.GO:
            self.export = export
            self.handshake.deadline = math.inf
            if self.meta_export != name:  # contexts selected for another export
                self.meta_id = None
        await self._reply(opt, P.Rep.ACK)

    # -- transmission

    def _error(self, req: P.Request, err: int, message: str) -> None:
        self.server.stats.errors += 1
        log.info(
            "%s: cmd %d offset %d length %d: %s",
            self.io.peer,
            req.type,
            req.offset,
            req.length,
            message,
        )
        self.io.send_soon(self.conn.error_reply(req.cookie, P.errno_to_nbd(err), message))

    async def _request(self, req: P.Request) -> bool:
        """Serve one request; False once the client disconnected cleanly."""
        export = self.export
        assert export is not None
        self.server.stats.requests += 1
        cmd = req.type
        C = P.Cmd
        if cmd == C.DISC:
            log.info("%s: client sent DISC", self.io.peer)
            return False
        size = export.backend.size
        if req.flags & ~_FLAGS.get(cmd, P.CmdFlag.FUA):
            self._error(req, errno.EINVAL, f"flags {req.flags:#x} not valid for command {cmd}")
            return True
        if cmd in (C.READ, C.WRITE, C.TRIM, C.WRITE_ZEROES, C.CACHE, C.BLOCK_STATUS):
            if req.offset + req.length > size:
                # The spec's codes (nbdkit's too): no room for a write,
                # a bad argument for a read, trim, cache or status.
                err = errno.ENOSPC if cmd in (C.WRITE, C.WRITE_ZEROES) else errno.EINVAL
                self._error(req, err, f"request past the end of the {size}-byte export")
                return True
            if req.length > P.MAX_PAYLOAD and cmd in (C.READ, C.WRITE):
                self._error(req, errno.EINVAL, f"request of {req.length} bytes is too big")
                return True
            # Only what changes the export is refused: READ, CACHE and
            # BLOCK_STATUS read (qemu-img convert asks block status first).
            if export.read_only and cmd not in (C.READ, C.CACHE, C.BLOCK_STATUS):
                self._error(req, errno.EPERM, "export is read-only")
                return True
        backend = export.backend
        try:
            if cmd == C.READ:
                data = backend.file_slice(req.offset, req.length)
                if data is None:
                    data = await backend.pread(req.offset, req.length)
                # A file slice is read when sent: it may show a write that
                # arrived after this read (see the module's rules).
                self.io.send_soon(
                    self.conn.read_data_header(req.cookie, req.offset, req.length), data
                )
                return True
            if cmd == C.WRITE:
                assert req.data is not None
                await backend.pwrite(req.offset, req.data)
            elif cmd == C.FLUSH:
                await self._start_durable(req)
                return True
            elif cmd == C.TRIM:
                await backend.trim(req.offset, req.length)
            elif cmd == C.WRITE_ZEROES:
                await backend.write_zeroes(
                    req.offset, req.length, may_trim=not req.flags & P.CmdFlag.NO_HOLE
                )
            elif cmd == C.CACHE:
                pass
            elif cmd == C.BLOCK_STATUS:
                extents = await self._extents(req)
                if extents is not None:
                    reply = self.conn.block_status_reply(req.cookie, BASE_ALLOCATION_ID, extents)
                    self.io.send_soon(reply)
                return True
            else:
                self._error(req, errno.EINVAL, f"unknown command {cmd}")
                return True
            if req.flags & P.CmdFlag.FUA:
                await self._start_durable(req)
                return True
        except ConnectionLost:
            raise
        except OSError as e:
            self._error(req, e.errno or errno.EIO, os.strerror(e.errno or errno.EIO))
            return True
        self.io.send_soon(self.conn.simple_reply_header(req.cookie))
        return True

    async def _extents(self, req: P.Request) -> list[tuple[int, int]] | None:
        """The extents to report, or None after an error reply was queued."""
        if self.meta_id is None:
            self._error(req, errno.EINVAL, "no metadata context was selected")
            return None
        if req.length == 0:
            self._error(req, errno.EINVAL, "block status of 0 bytes")
            return None
        assert self.export is not None
        extents = await self.export.backend.block_status(req.offset, req.length)
        # A prefix of the range, never past it; REQ_ONE: one extent.
        out, left = [], req.length
        for n, flags in extents[:1] if req.flags & P.CmdFlag.REQ_ONE else extents:
            if left <= 0:
                break
            out.append((min(n, left), flags))
            left -= n
        if not out:
            self._error(req, errno.EIO, "no block status for the range")
            return None
        return out

    async def _start_durable(self, req: P.Request) -> None:
        await self.durable_slots.acquire()
        # The reply needs only the header fields: do not keep the payload.
        self.nursery.start_soon(self._durable, attrs.evolve(req, data=b""))

    async def _durable(self, req: P.Request) -> None:
        """Reply once what was written is on stable storage (FLUSH, FUA)."""
        try:
            assert self.export is not None
            try:
                await self.export.backend.flush()
            except ConnectionLost:
                raise
            except OSError as e:
                self._error(req, e.errno or errno.EIO, f"flush failed: {e}")
                return
            self.io.send_soon(self.conn.simple_reply_header(req.cookie))
        except ConnectionLost:
            pass  # the reader sees the same and ends the session
        finally:
            self.durable_slots.release()
