"""A trio NBD client: one connection, many requests in flight.

Rules:
- Handshake: fixed newstyle; NBD_OPT_GO (asking for BLOCK_SIZE), falling back
  to NBD_OPT_EXPORT_NAME when the server does not know GO. Simple replies
  only: they cost the fewest bytes per read. Before GO, LIST_META_CONTEXT
  asks whether the export offers `base:allocation` (`block_status_offered`).
- Block status needs structured replies, so it has a connection of its own
  (`connect(..., block_status=True)`: STRUCTURED_REPLY and SET_META_CONTEXT
  base:allocation), used for NBD_CMD_BLOCK_STATUS only: the data path keeps
  its simple replies.
- TLS (nbds:// and nbds+unix://): NBD_OPT_STARTTLS is the first option,
  the handshake verifies the server (nbd/tls.py), and every other option
  follows inside TLS. A server that refuses STARTTLS or fails the TLS
  handshake ends the attempt with `NotRetryable`: never plain text, and no
  endless retry of what cannot heal. So does a server that insists on TLS
  (NBD_REP_ERR_TLS_REQD) when the URI is plain nbd://.
- Requests are pipelined and matched to replies by cookie; one reader task
  per connection wakes each waiting caller. A request is sent from the
  caller's task when the line is free (SocketIO.send_now), so a lone
  request costs no hop to a sender task; bursts still share one sendmsg.
- The server's NBD_INFO_BLOCK_SIZE is obeyed, as the spec requires of a
  client that asks for it: READ and WRITE above its maximum payload are
  split; below a minimum block size above 1, a read is widened to whole
  blocks and a write is read-modify-write, with the blocks it touches held
  against other writes meanwhile; TRIM keeps partial blocks, WRITE_ZEROES
  writes them as zero bytes. Without the information: 32 MiB, any alignment.
- A per-request error from the server is an OSError with its errno. A broken
  connection fails every request in flight with `ConnectionLost`; whether to
  reconnect and resend is the node's business, not the client's.
- `aclose()` sends NBD_CMD_DISC once no request is in flight, then closes.
- NBD_ESHUTDOWN in a reply means the server is going away: that request
  fails with `ConnectionLost` (resendable, like a killed server), no new
  request is sent, and the client disconnects softly, as the spec requires:
  it lets the requests in flight finish, then sends NBD_CMD_DISC.
"""

from __future__ import annotations

import errno
import logging
import os
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TypeVar

import trio

from dstfs.iotypes import Buffer, ConnectionLost, NotRetryable, scatter, write_zero_bytes
from dstfs.nbd import protocol as P
from dstfs.nbd.sockio import HIGH_WATER, SocketIO
from dstfs.nbd.tls import TLSHandshakeError, client_context, start_tls
from dstfs.nbd.transport import SocketTransport, connect_tcp, connect_unix
from dstfs.uri import NodeSpec, parse_uri

log = logging.getLogger(__name__)
E = TypeVar("E")

#: Bytes one NBD_CMD_BLOCK_STATUS asks about at most (its length is 32 bits).
MAX_BLOCK_STATUS = 1 << 31


class NbdError(OSError):
    """The server refused something during the handshake."""


class _Waiter:
    """One request's reply slot: cheaper than a trio.Event per request, and
    no Outcome object per reply (`fail` for errors, `set` for values)."""

    __slots__ = ("done", "error", "task", "value")

    def __init__(self) -> None:
        self.task: trio.lowlevel.Task | None = None
        self.done = False
        self.value: object = None
        self.error: BaseException | None = None

    def set(self, value: object) -> None:
        if not self.done:
            self.done = True
            self.value = value
            self._wake()

    def fail(self, error: BaseException) -> None:
        if not self.done:
            self.done = True
            self.error = error
            self._wake()

    def _wake(self) -> None:
        task = self.task
        if task is not None:
            self.task = None
            trio.lowlevel.reschedule(task)

    def _abort(self, _: object) -> trio.lowlevel.Abort:
        self.task = None
        return trio.lowlevel.Abort.SUCCEEDED

    async def wait(self) -> object:
        if not self.done:
            self.task = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(self._abort)
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()
        if self.error is not None:
            raise self.error
        return self.value


class NbdClient:
    """An open NBD connection. Create with `NbdClient.connect()` inside a
    nursery that will run its reader, or with `open_client()`."""

    def __init__(self, io: SocketIO, conn: P.ClientConnection, info: P.ExportInfo, name: str):
        self.io = io
        self.conn = conn
        self.info = info
        self.name = name
        self._pending: dict[int, _Waiter] = {}
        self._next_cookie = 1
        self._closed = False
        self.lost: str | None = None
        #: The server lists base:allocation for the export.
        self.block_status_offered = False
        #: The id of base:allocation, when this connection selected it.
        self.meta_id: int | None = None
        self._chunks: dict[int, list[tuple[int, int]] | OSError] = {}
        #: Cookies of requests whose callers gave up before the reply.
        self._abandoned: set[int] = set()
        #: Set once the server answered NBD_ESHUTDOWN: the soft disconnect runs.
        self.shutting_down = False
        self._nursery: trio.Nursery | None = None
        self._idle = trio.Event()
        self._idle.set()
        #: The server's NBD_INFO_BLOCK_SIZE, as obeyed (see pread/pwrite).
        self.min_block = info.min_block
        self.max_payload = min(info.max_payload, P.MAX_PAYLOAD)
        self._blocks = _RangeLock()

    # -- setup

    @classmethod
    async def connect(
        cls, spec: NodeSpec | str, nursery: trio.Nursery, block_status: bool = False
    ) -> NbdClient:
        """Connect, negotiate, and start the reader in `nursery`. With
        `block_status`, a connection for NBD_CMD_BLOCK_STATUS only."""
        if isinstance(spec, str):
            spec = parse_uri(spec)
        if spec.kind == "nbd+unix":
            assert spec.socket is not None
            transport = await connect_unix(spec.socket)
            peer = f"unix:{spec.socket}"
        elif spec.kind == "nbd":
            assert spec.host is not None and spec.port is not None
            transport = await connect_tcp(spec.host, spec.port)
            peer = f"{spec.host}:{spec.port}"
        else:
            raise ValueError(f"{spec.uri}: not an NBD URI")
        io = SocketIO(transport, peer)
        try:
            conn, info, meta = await _handshake(io, spec, block_status)
        except P.ProtocolError as e:
            io.close()
            raise NbdError(errno.EPROTO, f"{spec.uri}: not an NBD server we can use: {e}") from None
        except OSError as e:
            io.close()
            tls_error = getattr(io.transport, "tls_error", None)
            if tls_error is not None and not isinstance(e, NotRetryable):
                # TLS 1.3: the server judges our certificate after our side
                # of the handshake is done; its verdict is the next read.
                raise NotRetryable(errno.EACCES, f"{peer}: TLS: {tls_error}") from None
            raise
        except BaseException:
            io.close()
            raise
        client = cls(io, conn, info, spec.uri)
        client.block_status_offered = meta is not None
        client.meta_id = meta if block_status else None
        client._nursery = nursery
        nursery.start_soon(client._reader)
        nursery.start_soon(client._sender)
        log.debug("%s: connected, size %d, flags %#x", spec.uri, info.size, info.flags)
        return client

    @property
    def size(self) -> int:
        return self.info.size

    @property
    def flags(self) -> int:
        return self.info.flags

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    # -- requests

    async def _request(
        self,
        cmd: int,
        offset: int,
        length: int,
        flags: int = 0,
        data: Buffer | None = None,
        into: list[memoryview] | None = None,
    ) -> object:
        if self.lost is not None:
            raise ConnectionLost(f"{self.name}: {self.lost}")
        if self._closed:
            reason = "server is shutting down" if self.shutting_down else "client closed"
            raise ConnectionLost(f"{self.name}: {reason}")
        cookie = self._next_cookie
        self._next_cookie = cookie + 1 if cookie < 0xFFFFFFFFFFFFFFFF else 1
        waiter = _Waiter()
        pending = self._pending
        if not pending:
            self._idle = trio.Event()
        pending[cookie] = waiter
        io = self.io
        try:
            if io.queued > HIGH_WATER:
                await io.wait_room()
            header = self.conn.request(cmd, cookie, offset, length, flags, into)
            if data is None:
                io.send_now(header)
            else:
                io.send_now(header, data)
        except BaseException as e:
            self._forget(cookie)
            if isinstance(e, ConnectionLost):
                self._lose(str(e))
            raise
        try:
            return await waiter.wait()
        finally:
            if not waiter.done:
                # Given up before the reply (cancelled): the reply may still
                # come; it is not a stray, and its data is not ours to place.
                self._abandoned.add(cookie)
                if cmd == P.Cmd.READ:
                    self.conn.forget_read(cookie)
            self._forget(cookie)

    def _forget(self, cookie: int) -> None:
        pending = self._pending
        if pending.pop(cookie, None) is not None and not pending:
            self._idle.set()

    # -- block size constraints (NBD_INFO_BLOCK_SIZE): requests above the
    # maximum payload are split; offsets and lengths not multiples of a
    # minimum block size above 1 are widened to whole blocks (a write is
    # then read, modified and written, with the blocks it touches locked).

    def _aligned(self, offset: int, length: int) -> bool:
        mb = self.min_block
        return mb == 1 or (offset % mb == 0 and length % mb == 0)

    async def pread(self, offset: int, length: int) -> Buffer:
        if length <= self.max_payload and self._aligned(offset, length):
            return await self._request(P.Cmd.READ, offset, length)  # type: ignore[return-value]
        buf = bytearray(length)
        await self.pread_into(offset, [memoryview(buf)])
        return buf

    async def pread_into(self, offset: int, views: list[memoryview]) -> None:
        """Read into `views` (in order), received in place: no copy."""
        length = len(views[0]) if len(views) == 1 else sum(len(v) for v in views)
        if length <= self.max_payload and self._aligned(offset, length):
            await self._request(P.Cmd.READ, offset, length, into=views)
            return
        start, end = self._widen(offset, length)
        if (start, end) != (offset, offset + length):
            # Whole blocks into a buffer of ours, then only the bytes asked for.
            buf = bytearray(end - start)
            await self.pread_into(start, [memoryview(buf)])
            scatter(memoryview(buf)[offset - start : offset - start + length], views)
            return
        pos = 0
        while pos < length:
            n = min(self.max_payload, length - pos)
            await self._request(P.Cmd.READ, offset + pos, n, into=_slice_views(views, pos, n))
            pos += n

    def _widen(self, offset: int, length: int) -> tuple[int, int]:
        mb = self.min_block
        return offset - offset % mb, -(-(offset + length) // mb) * mb

    async def pwrite(self, offset: int, data: Buffer, fua: bool = False) -> None:
        flags = P.CmdFlag.FUA if fua and self.flags & P.TransmissionFlag.SEND_FUA else 0
        length = len(data)
        if self.min_block == 1 and length <= self.max_payload:
            await self._request(P.Cmd.WRITE, offset, length, flags, data)
        else:
            start, end = self._widen(offset, length)
            async with self._blocks.locked(start, end):
                if (start, end) != (offset, offset + length):
                    # Read-modify-write of the whole blocks the write touches.
                    buf = bytearray(await self.pread(start, end - start))
                    buf[offset - start : offset - start + length] = data
                    data, offset, length = buf, start, end - start
                mv = memoryview(data)
                for pos in range(0, length, self.max_payload):
                    n = min(self.max_payload, length - pos)
                    await self._request(P.Cmd.WRITE, offset + pos, n, flags, mv[pos : pos + n])
        if fua and not flags:
            await self.flush()

    async def flush(self) -> None:
        if self.flags & P.TransmissionFlag.SEND_FLUSH:
            await self._request(P.Cmd.FLUSH, 0, 0)

    def _inner(self, offset: int, length: int) -> tuple[int, int]:
        """The whole blocks inside a range: (start, end), maybe empty."""
        mb = self.min_block
        return -(-offset // mb) * mb, (offset + length) // mb * mb

    async def trim(self, offset: int, length: int) -> None:
        if self.flags & P.TransmissionFlag.SEND_TRIM:
            # Advisory: partial blocks at the edges are simply kept.
            start, end = self._inner(offset, length)
            if end > start:
                await self._request(P.Cmd.TRIM, start, end - start)

    async def write_zeroes(self, offset: int, length: int, may_trim: bool = True) -> None:
        if not self.flags & P.TransmissionFlag.SEND_WRITE_ZEROES:
            await write_zero_bytes(self.pwrite, offset, length)
            return
        flags = 0 if may_trim else P.CmdFlag.NO_HOLE
        start, end = self._inner(offset, length)
        if end <= start:
            await self.pwrite(offset, bytes(length))
            return
        if start > offset:  # partial blocks at the edges: written as zero bytes
            await self.pwrite(offset, bytes(start - offset))
        if offset + length > end:
            await self.pwrite(end, bytes(offset + length - end))
        if self.min_block == 1:
            await self._request(P.Cmd.WRITE_ZEROES, start, end - start, flags)
        else:
            async with self._blocks.locked(start, end):
                await self._request(P.Cmd.WRITE_ZEROES, start, end - start, flags)

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        """base:allocation extents (length, flags) from `offset`, covering a
        prefix of `length` bytes (clipped to the export and to 2 GiB);
        EOPNOTSUPP unless this connection selected base:allocation."""
        if self.meta_id is None:
            raise OSError(errno.EOPNOTSUPP, f"{self.name}: no base:allocation on this connection")
        length = min(length, self.size - offset, MAX_BLOCK_STATUS)
        if length <= 0:
            return []
        # Asked in whole blocks; the answer is cut back to the range.
        start, end = self._widen(offset, length)
        end = min(end, self.size - self.size % self.min_block, start + MAX_BLOCK_STATUS)
        if end <= offset:
            return [(length, 0)]  # inside the unaddressable tail: say "data"
        extents: list[tuple[int, int]] = await self._request(  # type: ignore[assignment]
            P.Cmd.BLOCK_STATUS, start, end - start
        )
        out, skip, left = [], offset - start, length
        for n, flags in extents:
            if skip >= n:
                skip -= n
                continue
            n, skip = n - skip, 0
            if left <= 0:
                break
            out.append((min(n, left), flags))
            left -= n
        return out

    async def aclose(self) -> None:
        """Wait for requests in flight, send NBD_CMD_DISC, close."""
        if self._closed:
            return
        self._closed = True
        await self._disconnect()

    async def _disconnect(self) -> None:
        try:
            if self.lost is None:
                with trio.move_on_after(5):
                    await self._idle.wait()
                with trio.move_on_after(1):
                    await self.io.send_all(self.conn.request(P.Cmd.DISC, 0, 0, 0))
        except OSError:
            pass
        finally:
            self._lose("client closed")
            self.io.close()

    def abort(self) -> None:
        """Drop the connection at once (no DISC); requests in flight fail."""
        self._closed = True
        self._lose("connection aborted")
        self.io.close()

    # -- sender and reader

    async def _sender(self) -> None:
        await self.io.run_sender()
        if self.io.broken is not None and not self._closed:
            self._lose(self.io.broken)

    def _lose(self, reason: str) -> None:
        if self.lost is None:
            self.lost = reason
        for waiter in list(self._pending.values()):
            # Each waiter raises its own exception (one object raised in many
            # tasks would chain their tracebacks together).
            waiter.fail(ConnectionLost(f"{self.name}: {self.lost}"))

    def _server_shutting_down(self) -> ConnectionLost:
        """The server answered NBD_ESHUTDOWN: begin the soft disconnect once
        (new requests are refused at once; those in flight may still be
        answered), and give the request a resendable error."""
        if not self._closed:
            self.shutting_down = True
            log.warning("%s: server is shutting down (NBD_ESHUTDOWN); disconnecting", self.name)
            self._closed = True
            assert self._nursery is not None
            self._nursery.start_soon(self._disconnect)
        return ConnectionLost(f"{self.name}: server is shutting down (NBD_ESHUTDOWN)")

    def _stray(self, cookie: int) -> None:
        """A reply nobody waits for: fine for a request given up, else the
        server answers what was never asked (a protocol error)."""
        if cookie in self._abandoned:
            self._abandoned.discard(cookie)
            return
        raise P.ProtocolError(f"reply for cookie {cookie}, which no request has")

    def _chunk(self, ev: P.StructuredChunk) -> None:
        """One structured reply chunk (block status connections only)."""
        if ev.cookie not in self._pending and ev.cookie not in self._abandoned:
            raise P.ProtocolError(f"reply chunk for cookie {ev.cookie}, which no request has")
        got = self._chunks.get(ev.cookie)
        if ev.type == P.ReplyType.BLOCK_STATUS:
            context, extents = P.decode_block_status_payload(ev.payload)
            if context != self.meta_id:
                raise P.ProtocolError(f"block status for context {context} that was not selected")
            if got is None:
                self._chunks[ev.cookie] = extents
            elif isinstance(got, list):
                got.extend(extents)
        elif P.reply_type_is_error(ev.type):
            error, message = P.decode_error_chunk_payload(ev.payload)
            err = P.nbd_to_errno(error)
            if err == errno.ESHUTDOWN:
                self._chunks[ev.cookie] = self._server_shutting_down()
            else:
                self._chunks[ev.cookie] = OSError(
                    err, f"{self.name}: {message or os.strerror(err)}"
                )
        elif ev.type != P.ReplyType.NONE:
            raise P.ProtocolError(f"unexpected reply chunk type {ev.type}")
        if ev.flags & P.REPLY_FLAG_DONE:
            result = self._chunks.pop(ev.cookie, None)
            waiter = self._pending.get(ev.cookie)
            if waiter is None:
                self._stray(ev.cookie)
            elif isinstance(result, OSError):
                waiter.fail(result)
            elif not result:
                waiter.fail(P.ProtocolError("block status reply without extents"))
            else:
                waiter.set(result)

    async def _reader(self) -> None:
        io = self.io
        conn = self.conn
        pending = self._pending
        try:
            while True:
                await io.fill(conn)
                while (ev := conn.next_event()) is not None:
                    if type(ev) is P.StructuredChunk and self.meta_id is not None:
                        self._chunk(ev)
                        continue
                    if type(ev) is not P.SimpleReply:
                        raise P.ProtocolError(f"unexpected {type(ev).__name__} from server")
                    waiter = pending.get(ev.cookie)
                    if waiter is None:
                        self._stray(ev.cookie)
                        continue
                    if ev.error:
                        err = P.nbd_to_errno(ev.error)
                        if err == errno.ESHUTDOWN:
                            waiter.fail(self._server_shutting_down())
                            continue
                        waiter.fail(OSError(err, f"{self.name}: {os.strerror(err)}"))
                    else:
                        waiter.set(ev.data)
        except P.ProtocolError as e:
            # Nothing more from this server can be trusted: drop the
            # connection; the node reconnects (or fails) as for any loss.
            log.error("%s: protocol error from the server, disconnecting: %s", self.name, e)
            self._lose(f"protocol error: {e}")
            io.close()
        except (OSError, trio.ClosedResourceError) as e:
            if not self._closed:
                log.warning("%s: connection lost: %s", self.name, e)
            self._lose(str(e) or type(e).__name__)
            io.close()


def _slice_views(views: list[memoryview], start: int, n: int) -> list[memoryview]:
    """The bytes [start, start + n) of the concatenation of `views`, as views."""
    out = []
    for v in views:
        if start >= len(v):
            start -= len(v)
            continue
        piece = v[start : start + n]
        out.append(piece)
        n -= len(piece)
        start = 0
        if not n:
            break
    return out


class _RangeLock:
    """Byte ranges held by writes that must not overlap (a read-modify-write
    and any write to the blocks it rewrites); waiters go once no held range
    overlaps theirs."""

    def __init__(self) -> None:
        self._held: list[tuple[int, int, trio.Event]] = []

    @asynccontextmanager
    async def locked(self, start: int, end: int) -> AsyncIterator[None]:
        while True:
            busy = next((ev for s, e, ev in self._held if s < end and start < e), None)
            if busy is None:
                break
            await busy.wait()
        entry = (start, end, trio.Event())
        self._held.append(entry)
        try:
            yield
        finally:
            self._held.remove(entry)
            entry[2].set()


async def _recv_event(io: SocketIO, conn: P.ClientConnection) -> object:
    buf = memoryview(bytearray(65536))
    while (ev := conn.next_event()) is None:
        n = await io.recv_into(buf)
        if not n:
            raise ConnectionLost(f"{io.peer}: server closed the connection during handshake")
        conn.receive_data(buf[:n])
    return ev


async def _expect(io: SocketIO, conn: P.ClientConnection, kind: type[E]) -> E:
    ev = await _recv_event(io, conn)
    if not isinstance(ev, kind):
        raise P.ProtocolError(f"{type(ev).__name__} from the server, not {kind.__name__}")
    return ev


async def _option(
    io: SocketIO, conn: P.ClientConnection, opt: int, data: bytes
) -> list[P.OptionReply]:
    """Send one option; its replies up to and including the final one."""
    await io.send_all(conn.option(opt, data))
    replies = []
    while True:
        ev = await _expect(io, conn, P.OptionReply)
        replies.append(ev)
        if ev.rep not in (P.Rep.SERVER, P.Rep.INFO, P.Rep.META_CONTEXT):
            return replies


async def _base_allocation(
    io: SocketIO, conn: P.ClientConnection, export: str, select: bool
) -> int | None:
    """The id the server gives base:allocation (LIST, or with `select`
    STRUCTURED_REPLY then SET), or None where it offers none."""
    if select:
        replies = await _option(io, conn, P.Opt.STRUCTURED_REPLY, b"")
        if replies[-1].rep != P.Rep.ACK:
            return None
    opt = P.Opt.SET_META_CONTEXT if select else P.Opt.LIST_META_CONTEXT
    query = P.encode_meta_context_query(export, [P.BASE_ALLOCATION])
    replies = await _option(io, conn, opt, query)
    if replies[-1].rep != P.Rep.ACK:
        return None
    for r in replies[:-1]:
        if r.rep == P.Rep.META_CONTEXT:
            context, name = P.decode_rep_meta_context(r.data)
            if name == P.BASE_ALLOCATION:
                return context
    return None


async def _starttls(io: SocketIO, conn: P.ClientConnection, spec: NodeSpec) -> None:
    """NBD_OPT_STARTTLS and the TLS handshake; NotRetryable when the server
    will not do TLS or TLS refuses it: an nbds URI never goes on in plain
    text, and trying again would fail the same way."""
    # No name to check on a unix socket unless the URI gives one.
    check_name = spec.tls_hostname is not None or spec.kind == "nbd"
    try:
        ctx = client_context(spec.tls_certificates, spec.tls_verify, check_name)
    except (OSError, ssl.SSLError) as e:
        raise NotRetryable(
            e.errno if e.errno and not isinstance(e, ssl.SSLError) else errno.EINVAL,
            f"{spec.uri}: TLS certificates: {e.strerror or e}",
        ) from None
    replies = await _option(io, conn, P.Opt.STARTTLS, b"")
    if replies[-1].rep != P.Rep.ACK:
        raise NotRetryable(
            errno.EPROTO,
            f"{io.peer}: the server refuses TLS ({_rep_name(replies[-1].rep)});"
            " an nbds URI never falls back to plain text",
        )
    conn.tls_started()
    assert isinstance(io.transport, SocketTransport)
    try:
        io.transport = await start_tls(
            io.transport,
            ctx,
            server_side=False,
            server_hostname=spec.tls_hostname or spec.host,
            peer=io.peer,
        )
    except TLSHandshakeError as e:
        raise NotRetryable(errno.EACCES, f"{io.peer}: {e.strerror}") from None
    log.debug("%s: TLS %s", spec.uri, io.transport.describe())


def _rep_name(rep: int) -> str:
    try:
        return P.Rep(rep).name
    except ValueError:
        return hex(rep)


async def _handshake(
    io: SocketIO, spec: NodeSpec, block_status: bool = False
) -> tuple[P.ClientConnection, P.ExportInfo, int | None]:
    export = spec.export
    conn = P.ClientConnection()
    greeting = await _expect(io, conn, P.ServerGreeting)
    if not greeting.flags & P.HandshakeFlag.FIXED_NEWSTYLE:
        raise NbdError(errno.EPROTO, f"{io.peer}: server does not offer fixed newstyle")
    flags = P.ClientFlag.FIXED_NEWSTYLE
    if greeting.flags & P.HandshakeFlag.NO_ZEROES:
        flags |= P.ClientFlag.NO_ZEROES
    await io.send_all(conn.client_flags_message(flags))
    if spec.tls:
        await _starttls(io, conn, spec)
    meta = await _base_allocation(io, conn, export, block_status)
    await io.send_all(conn.option(P.Opt.GO, P.encode_go_data(export, (P.Info.BLOCK_SIZE,))))
    info: P.ExportInfo | None = None
    while True:
        ev = await _expect(io, conn, P.OptionReply)
        if ev.rep == P.Rep.INFO:
            info = P.apply_info(info, ev.data)
        elif ev.rep == P.Rep.ACK:
            if info is None or info.size < 0:
                raise P.ProtocolError("server accepted GO without NBD_INFO_EXPORT")
            return conn, info, meta
        elif ev.rep == P.Rep.ERR_UNSUP:
            break  # an old server: fall back to EXPORT_NAME
        else:
            msg = bytes(ev.data).decode(errors="replace")
            rep = _rep_name(ev.rep)
            if ev.rep == P.Rep.ERR_TLS_REQD:
                # The server insists on TLS: ask for it with nbds:// (GO
                # never goes on without it, so this is not worth retrying).
                raise NotRetryable(
                    errno.EACCES, f"{io.peer}: the server requires TLS (use an nbds:// URI)"
                )
            err = errno.ENOENT if ev.rep == P.Rep.ERR_UNKNOWN else errno.EPROTO
            raise NbdError(err, f"{io.peer}: export {export!r} refused: {rep} {msg}".strip())
    await io.send_all(conn.option(P.Opt.EXPORT_NAME, export.encode()))
    ev = await _expect(io, conn, P.ExportNameReply)
    return conn, P.ExportInfo(size=ev.size, flags=ev.flags), meta


@asynccontextmanager
async def open_client(spec: NodeSpec | str) -> AsyncIterator[NbdClient]:
    """`async with open_client("nbd://host:port/export") as c:` — for tools
    and tests; closes (DISC) on exit."""
    try:
        async with trio.open_nursery() as nursery:
            client = await NbdClient.connect(spec, nursery)
            try:
                yield client
            finally:
                with trio.CancelScope(shield=True):
                    await client.aclose()
    except BaseExceptionGroup as group:
        # The reader never raises: a lone error is the caller's or connect's.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
