"""The dstfs NBD client against a hostile server: a fake server, in the test,
that answers the handshake from the spec and then misbehaves on purpose
(wrong magic, replies for cookies never sent, structured chunks never
negotiated, lengths that overflow, bytes trickled one a second). The client
never writes outside the caller's buffer, drops the connection as a
protocol error logged with the node's name, and the node reconnects (to a
server that behaves) or fails after its timeout; a mount against a server
with bad magic is one line."""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import socket
import struct
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import trio
from test_cli import failed_mount

from dstfs.backends.nbd import NbdBackend
from dstfs.nbd.client import NbdClient, NbdError
from dstfs.node import Node, State
from dstfs.uri import parse_uri

KiB = 1024
SIZE = 1 << 20
NBDMAGIC, IHAVEOPT = 0x4E42444D41474943, 0x49484156454F5054
OPT_REPLY_MAGIC, REQUEST_MAGIC = 0x3E889045565A9, 0x25609513
SIMPLE_MAGIC, STRUCTURED_MAGIC = 0x67446698, 0x668E33EF
OPT_GO, REP_ACK, REP_INFO, REP_ERR_UNSUP = 7, 1, 3, 2**31 + 1
CMD_READ, CMD_WRITE = 0, 1
T_FLAGS = 1 | 4 | 8  # HAS_FLAGS, SEND_FLUSH, SEND_FUA


class Peer:
    """One accepted connection, spoken to by hand."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def recv(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                raise EOFError
            self.buf += chunk
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def handshake(self, block_size: bytes | None = None) -> None:
        """Greeting, flags, then options until GO (the rest: ERR_UNSUP)."""
        await self.send(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3))
        await self.recv(4)
        while True:
            _, opt, n = struct.unpack(">QII", await self.recv(16))
            await self.recv(n)
            if opt != OPT_GO:
                await self.send(struct.pack(">QIII", OPT_REPLY_MAGIC, opt, REP_ERR_UNSUP, 0))
                continue
            infos = [struct.pack(">HQH", 0, SIZE, T_FLAGS)]
            if block_size is not None:
                infos.append(block_size)
            for info in infos:
                await self.send(struct.pack(">QIII", OPT_REPLY_MAGIC, opt, REP_INFO, len(info)))
                await self.send(info)
            await self.send(struct.pack(">QIII", OPT_REPLY_MAGIC, opt, REP_ACK, 0))
            return

    async def request(self) -> tuple[int, int, int, int, bytes]:
        """(cmd, cookie, offset, length, payload)."""
        _, _, cmd, cookie, offset, length = struct.unpack(">IHHQQI", await self.recv(28))
        data = await self.recv(length) if cmd == CMD_WRITE else b""
        return cmd, cookie, offset, length, data

    async def serve_well(self) -> None:
        """Behave: zeroes for every READ, OK for everything else."""
        await self.handshake()
        while True:
            cmd, cookie, _, length, _ = await self.request()
            reply = struct.pack(">IIQ", SIMPLE_MAGIC, 0, cookie)
            await self.send(reply + (bytes(length) if cmd == CMD_READ else b""))


Behaviour = Callable[[Peer], Awaitable[None]]


@contextlib.asynccontextmanager
async def fake_server(*behaviours: Behaviour) -> AsyncIterator[str]:
    """Connection i gets behaviours[i] (the last one for the rest); yields the URI."""
    count = 0

    async def handle(stream: trio.SocketStream) -> None:
        nonlocal count
        behave = behaviours[min(count, len(behaviours) - 1)]
        count += 1
        with contextlib.suppress(EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
            async with stream:
                await behave(Peer(stream))

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, handle, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        yield f"nbd://127.0.0.1:{port}"
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------- misbehaviours after GO


def after_read(reply: Callable[[int, int, int], bytes]) -> Behaviour:
    """Handshake, wait for a READ, send `reply(cookie, offset, length)`,
    then sit there (the client is the one to hang up)."""

    async def behave(peer: Peer) -> None:
        await peer.handshake()
        _, cookie, offset, length, _ = await peer.request()
        await peer.send(reply(cookie, offset, length))
        await trio.sleep_forever()

    return behave


def simple(cookie: int, error: int = 0, magic: int = SIMPLE_MAGIC) -> bytes:
    return struct.pack(">IIQ", magic, error, cookie)


def chunk(cookie: int, rtype: int, payload: bytes, length: int | None = None) -> bytes:
    n = len(payload) if length is None else length
    return struct.pack(">IHHQI", STRUCTURED_MAGIC, 1, rtype, cookie, n) + payload


HOSTILE_REPLIES = {
    "bad-reply-magic": lambda c, o, n: simple(c, magic=0x12345678) + bytes(n),
    "unknown-cookie": lambda c, o, n: simple(c + 1000) + bytes(n),
    # An OFFSET_DATA chunk for a range far outside the request's.
    "chunk-outside-the-range": lambda c, o, n: chunk(c, 1, struct.pack(">Q", o + 10**9) + b"x" * n),
    "chunk-length-overflows": lambda c, o, n: chunk(c, 1, b"", length=0xFFFFFFFF),
    "right-reply-then-garbage": lambda c, o, n: simple(c) + b"y" * n + b"\xff" * 64,
}

GUARD = b"\xaa" * 4096


@pytest.mark.parametrize("case", list(HOSTILE_REPLIES))
async def test_a_hostile_reply_is_a_protocol_error_and_the_node_reconnects(
    case: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    behaviours = (after_read(HOSTILE_REPLIES[case]), Peer.serve_well)
    async with fake_server(*behaviours) as uri, trio.open_nursery() as nursery:
        spec = parse_uri(uri)
        backend = await NbdBackend.open(spec, nursery)
        node = Node(spec, backend, backend.size, nursery)
        node.timeout = 10
        # The caller's buffer, with guards around the bytes it asks for.
        buf = bytearray(GUARD + b"\x55" * (64 * KiB) + GUARD)
        view = memoryview(buf)[len(GUARD) : len(GUARD) + 64 * KiB]
        with trio.fail_after(15):
            await node.read(4096, 64 * KiB, into=[view])
            if case == "right-reply-then-garbage":
                # Answered right; the garbage behind it breaks the connection.
                assert buf == GUARD + b"y" * (64 * KiB) + GUARD
                await node.read(4096, 64 * KiB, into=[view])
        # Resent after the reconnect: the zeroes of the server that behaves.
        assert buf == GUARD + bytes(64 * KiB) + GUARD
        assert node.state == State.ONLINE and node.stats.reconnects == 1
        await backend.aclose()
        nursery.cancel_scope.cancel()
    if case == "right-reply-then-garbage":
        # The read was answered; the garbage behind it breaks the connection.
        assert "bad reply magic" in caplog.text
    errors = [r.getMessage() for r in caplog.records if "protocol error" in r.getMessage()]
    assert errors and all(m.startswith(uri) for m in errors), caplog.text


async def test_a_trickling_server_fails_the_node_after_its_timeout() -> None:
    """One byte a second, after the handshake and then of every greeting: the
    node's timeout drops the connection, the reconnects time out, the node
    is failed and the read gets EIO, all within a bounded time."""

    async def trickle_reply(peer: Peer) -> None:
        await peer.handshake()
        _, cookie, _, length, _ = await peer.request()
        for byte in simple(cookie) + bytes(length):
            await peer.send(bytes([byte]))
            await trio.sleep(1)

    async def trickle_greeting(peer: Peer) -> None:
        for byte in struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3):
            await peer.send(bytes([byte]))
            await trio.sleep(1)

    async with fake_server(trickle_reply, trickle_greeting) as uri, trio.open_nursery() as nursery:
        spec = parse_uri(uri)
        backend = await NbdBackend.open(spec, nursery)
        node = Node(spec, backend, backend.size, nursery)
        node.timeout = 1.5
        t0 = trio.current_time()
        with trio.fail_after(20), pytest.raises(OSError) as e:
            await node.read(0, 4096)
        assert e.value.errno == errno.EIO
        assert node.state == State.FAILED
        assert trio.current_time() - t0 < 10
        backend.abort()
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------- misbehaviours in the handshake


async def _bad_greeting(peer: Peer) -> None:
    await peer.send(struct.pack(">QQH", 0x4E42444D41474944, IHAVEOPT, 3))


async def _huge_option_reply(peer: Peer) -> None:
    await peer.send(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3))
    await peer.recv(4)
    _, opt, _n = struct.unpack(">QII", await peer.recv(16))
    await peer.send(struct.pack(">QIII", OPT_REPLY_MAGIC, opt, REP_INFO, 0xFFFFFFF0))


async def _bad_block_size(peer: Peer) -> None:
    await peer.handshake(block_size=struct.pack(">HIII", 3, 3, 4096, 0))


async def _bad_option_reply_magic(peer: Peer) -> None:
    await peer.send(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3))
    await peer.recv(4)
    _, opt, _n = struct.unpack(">QII", await peer.recv(16))
    await peer.send(struct.pack(">QIII", OPT_REPLY_MAGIC + 1, opt, REP_ACK, 0))


@pytest.mark.parametrize(
    "behave", [_bad_greeting, _huge_option_reply, _bad_block_size, _bad_option_reply_magic]
)
async def test_a_hostile_handshake_is_one_oserror(behave: Behaviour) -> None:
    async with fake_server(behave) as uri, trio.open_nursery() as nursery:
        with trio.fail_after(10), pytest.raises(NbdError) as e:
            await NbdClient.connect(uri, nursery)
        assert e.value.errno == errno.EPROTO and uri in str(e.value)
        nursery.cancel_scope.cancel()


@contextlib.contextmanager
def bad_magic_server() -> Iterator[int]:
    """A thread that answers every connection with a greeting of bad magic."""
    lsock = socket.create_server(("127.0.0.1", 0))
    lsock.settimeout(0.2)
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            try:
                conn, _ = lsock.accept()
            except OSError:
                continue
            with conn, contextlib.suppress(OSError):
                conn.sendall(b"NOTMAGIC" + bytes(10))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield lsock.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        lsock.close()


def test_mount_against_a_server_with_bad_magic_is_one_line(tmp_path: Path) -> None:
    with bad_magic_server() as port:
        line, _ = failed_mount(tmp_path, "--node", f"nbd://127.0.0.1:{port}")
    assert line.startswith("dstfs mount: ") and "bad server magic" in line, line
