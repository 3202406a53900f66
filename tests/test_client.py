"""The dstfs NBD client against an in-process dstfs server, nbdkit (its error
and delay filters make failures on demand) and a hand-written old-style
server that knows no NBD_OPT_GO."""

from __future__ import annotations

import contextlib
import errno
import logging
import random
import signal
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing
from helpers.aio import poll
from helpers.procs import nbdkit_proc

from dstfs.backends.base import BackendFilter
from dstfs.backends.file import FileBackend
from dstfs.iotypes import Buffer, ConnectionLost
from dstfs.nbd.client import NbdClient, NbdError, open_client
from dstfs.nbd.server import Export, NbdServer

KiB, MiB = 1024, 1024 * 1024
SIZE = 16 * MiB

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
OPT_EXPORT_NAME, OPT_GO, OPT_LIST_META_CONTEXT = 1, 7, 9
REP_ERR_UNSUP = 2**31 + 1
CMD_READ, CMD_WRITE, CMD_DISC = 0, 1, 2


class Faulty(BackendFilter):
    """Fails reads at offsets >= 8 MiB with the errno `fail`; flushes wait for `gate`."""

    def __init__(self, inner: FileBackend) -> None:
        super().__init__(inner)
        self.fail = errno.EIO
        self.gate: trio.Event | None = None

    async def pread(self, offset: int, length: int) -> Buffer:
        if offset >= 8 * MiB:
            raise OSError(self.fail, "injected")
        return await self.inner.pread(offset, length)

    async def flush(self) -> None:
        if self.gate is not None:
            await self.gate.wait()
        await self.inner.flush()


@asynccontextmanager
async def dstfs_server(
    tmp_path: Path,
) -> AsyncIterator[tuple[str, NbdServer, Faulty, trio.CancelScope]]:
    """An in-process server on a free port; cancel the scope yielded to stop it."""
    inner = FileBackend.create(str(tmp_path / "disk.img"), SIZE)
    backend = Faulty(inner)
    server = NbdServer([Export("", backend), Export("ro", inner, read_only=True)])
    stop = trio.CancelScope()

    async def run(task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        with stop:
            await server.serve_tcp("127.0.0.1", 0, task_status=task_status)

    try:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(run)
            port = listeners[0].socket.getsockname()[1]
            try:
                yield f"nbd://127.0.0.1:{port}", server, backend, stop
            finally:
                stop.cancel()
    finally:
        await inner.aclose()


# ---------------------------------------------------------------- errors


async def test_request_errors_are_oserror_with_errno(tmp_path: Path) -> None:
    async with dstfs_server(tmp_path) as (uri, _, backend, _), open_client(uri) as c:
        assert c.size == SIZE
        for err in (errno.EIO, errno.ENOSPC, errno.EPERM):
            backend.fail = err
            with pytest.raises(OSError) as e:
                await c.pread(8 * MiB, 4096)
            assert e.value.errno == err and not isinstance(e.value, ConnectionLost)
        # Local errnos outside the NBD set arrive mapped by the spec's rules.
        for local, wire in ((errno.EROFS, errno.EPERM), (errno.EDQUOT, errno.ENOSPC)):
            backend.fail = local
            with pytest.raises(OSError) as e:
                await c.pread(8 * MiB, 4096)
            assert e.value.errno == wire
        with pytest.raises(OSError) as e:
            await c.pread(SIZE - 1, 2)
        assert e.value.errno == errno.EINVAL
        with pytest.raises(OSError) as e:
            await c.pwrite(SIZE - 1, b"ab")
        assert e.value.errno == errno.ENOSPC
        # The connection outlives its errors.
        await c.pwrite(0, b"ok" * 100)
        assert bytes(await c.pread(0, 200)) == b"ok" * 100
        async with open_client(uri + "/ro") as ro:
            with pytest.raises(OSError) as e:
                await ro.pwrite(0, b"x")
            assert e.value.errno == errno.EPERM
            assert bytes(await ro.pread(0, 200)) == b"ok" * 100


@pytest.mark.parametrize("name", ["EIO", "ENOSPC", "EPERM", "EINVAL", "ENOMEM"])
async def test_nbdkit_injected_errors(name: str) -> None:
    with nbdkit_proc("--filter=error", "memory", "4M", f"error={name}", "error-rate=100%") as (
        uri,
        _,
    ):
        async with open_client(uri) as c:
            for call in (
                lambda: c.pread(0, 4096),
                lambda: c.pwrite(0, b"w" * 4096),
                lambda: c.trim(0, 4096),
            ):
                with pytest.raises(OSError) as e:
                    await call()
                assert e.value.errno == getattr(errno, name)


async def test_nbdkit_errors_per_command_keep_the_connection() -> None:
    args = [
        "--filter=error",
        "memory",
        "4M",
        "error-pwrite=ENOSPC",
        "error-pwrite-rate=100%",
        "error-trim=EPERM",
        "error-trim-rate=100%",
        "error-zero=EINVAL",
        "error-zero-rate=100%",
    ]
    with nbdkit_proc(*args) as (uri, _):
        async with open_client(uri) as c:
            for call, err in (
                (lambda: c.pwrite(0, b"w" * 512), errno.ENOSPC),
                (lambda: c.trim(0, 4096), errno.EPERM),
                (lambda: c.write_zeroes(0, 4096), errno.EINVAL),
            ):
                with pytest.raises(OSError) as e:
                    await call()
                assert e.value.errno == err
            assert bytes(await c.pread(0, 4096)) == bytes(4096)
            await c.flush()


async def test_unknown_export_raises_oserror(tmp_path: Path) -> None:
    async with dstfs_server(tmp_path) as (uri, server, _, _):
        async with trio.open_nursery() as nursery:
            with pytest.raises(NbdError) as e:
                await NbdClient.connect(uri + "/nope", nursery)
        assert isinstance(e.value, OSError) and e.value.errno == errno.ENOENT
        assert "nope" in str(e.value)
        await poll(lambda: server.stats.active == 0)


async def test_open_client_raises_plain_oserror(tmp_path: Path) -> None:
    async with dstfs_server(tmp_path) as (uri, *_):
        with pytest.raises(OSError) as e:
            async with open_client(uri + "/nope"):
                pass
        assert e.value.errno == errno.ENOENT
        with pytest.raises(OSError) as e:
            async with open_client(uri) as c:
                await c.pread(SIZE, 1)
        assert e.value.errno == errno.EINVAL


# ---------------------------------------------------------------- old server


async def _old_server(
    listener: trio.SocketListener, offer_no_zeroes: bool, content: bytes, seen: dict
) -> None:
    """One client: GO is unknown (ERR_UNSUP), EXPORT_NAME is, then READs and DISC."""
    stream = await listener.accept()
    buf = bytearray()

    async def recv(n: int) -> bytes:
        while len(buf) < n:
            chunk = await stream.receive_some(65536)
            if not chunk:
                raise EOFError
            buf.extend(chunk)
        out = bytes(buf[:n])
        del buf[:n]
        return out

    async with stream:
        await stream.send_all(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 1 | (2 * offer_no_zeroes)))
        (cflags,) = struct.unpack(">I", await recv(4))
        seen["client_flags"] = cflags
        while True:
            magic, opt, length = struct.unpack(">QII", await recv(16))
            assert magic == IHAVEOPT
            data = await recv(length)
            seen.setdefault("options", []).append(opt)
            if opt == OPT_EXPORT_NAME:
                seen["name"] = data.decode()
                break
            await stream.send_all(struct.pack(">QIII", OPT_REPLY_MAGIC, opt, REP_ERR_UNSUP, 0))
        reply = struct.pack(">QH", len(content), 1 | 4)  # HAS_FLAGS | SEND_FLUSH
        if not cflags & 2:
            reply += bytes(124)
        await stream.send_all(reply)
        while True:
            magic, _, cmd, cookie, offset, length = struct.unpack(">IHHQQI", await recv(28))
            assert magic == REQUEST_MAGIC
            if cmd == CMD_DISC:
                seen["disc"] = True
                return
            assert cmd == CMD_READ
            await stream.send_all(
                struct.pack(">IIQ", SIMPLE_MAGIC, 0, cookie) + content[offset : offset + length]
            )


@pytest.mark.parametrize("offer_no_zeroes", [True, False], ids=["no-zeroes", "zeroes"])
async def test_go_unsupported_falls_back_to_export_name(offer_no_zeroes: bool) -> None:
    content = random.randbytes(1 * MiB)
    seen: dict = {}
    async with trio.open_nursery() as nursery:
        (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
        nursery.start_soon(_old_server, listener, offer_no_zeroes, content, seen)
        port = listener.socket.getsockname()[1]
        with trio.fail_after(30):
            async with open_client(f"nbd://127.0.0.1:{port}/old") as c:
                assert c.size == len(content)
                assert c.flags == 1 | 4
                reads = {}

                async def read(off: int) -> None:
                    reads[off] = bytes(await c.pread(off, 64 * KiB))

                async with trio.open_nursery() as inner:
                    for off in range(0, len(content), 64 * KiB):
                        inner.start_soon(read, off)
                for off, data in reads.items():
                    assert data == content[off : off + 64 * KiB]
                await c.trim(0, 4096)  # not advertised: a no-op, nothing sent
    assert seen["options"] == [OPT_LIST_META_CONTEXT, OPT_GO, OPT_EXPORT_NAME]
    assert seen["name"] == "old"
    assert bool(seen["client_flags"] & 2) == offer_no_zeroes
    assert seen["disc"]


# ---------------------------------------------------------------- connection loss


@pytest.mark.parametrize("n", [1, 8])
async def test_server_killed_fails_requests_in_flight(n: int) -> None:
    with nbdkit_proc("--filter=delay", "memory", "4M", "rdelay=20") as (uri, proc):
        with trio.fail_after(30):
            async with open_client(uri) as c:
                results: list[BaseException] = []

                async def read(off: int) -> None:
                    try:
                        await c.pread(off, 4096)
                    except BaseException as e:
                        results.append(e)

                async with trio.open_nursery() as nursery:
                    for i in range(n):
                        nursery.start_soon(read, i * 4096)
                    await poll(lambda: c.in_flight == n)  # all sent, none answered
                    proc.send_signal(signal.SIGKILL)
                assert len(results) == n
                assert all(type(e) is ConnectionLost for e in results), results
                assert c.lost is not None
                with pytest.raises(ConnectionLost):
                    await c.pwrite(0, b"late")
        assert proc.wait(30) == -signal.SIGKILL


@pytest.mark.parametrize("n", [1, 5])
async def test_server_stopping_fails_requests_in_flight(tmp_path: Path, n: int) -> None:
    async with dstfs_server(tmp_path) as (uri, _, backend, stop):
        backend.gate = trio.Event()  # flushes hang
        async with trio.open_nursery() as nursery:
            c = await NbdClient.connect(uri, nursery)
            errors: list[BaseException] = []

            async def flush() -> None:
                try:
                    await c.flush()
                except BaseException as e:
                    errors.append(e)

            for _ in range(n):
                nursery.start_soon(flush)
            await poll(lambda: c.in_flight == n)
            # A read goes past the hanging flushes and is answered.
            assert bytes(await c.pread(0, 512)) == bytes(512)
            with trio.fail_after(30):
                stop.cancel()  # the server stops: its sockets close
                await poll(lambda: len(errors) == n)
            assert all(type(e) is ConnectionLost for e in errors), errors
            assert c.in_flight == 0
            await c.aclose()


# ---------------------------------------------------------------- clean close


async def test_aclose_sends_disc_after_requests_in_flight(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dstfs.nbd.server")
    async with dstfs_server(tmp_path) as (uri, server, backend, _):
        backend.gate = trio.Event()
        async with trio.open_nursery() as nursery:
            c = await NbdClient.connect(uri, nursery)
            nursery.start_soon(c.flush)
            await poll(lambda: c.in_flight == 1)
            closing = trio.Event()

            async def close() -> None:
                await c.aclose()
                closing.set()

            nursery.start_soon(close)
            await trio.testing.wait_all_tasks_blocked()
            assert not closing.is_set()  # it waits for the flush in flight
            backend.gate.set()
            with trio.fail_after(30):
                await closing.wait()
        await poll(lambda: server.stats.active == 0)
        with pytest.raises(ConnectionLost):
            await c.pread(0, 1)
    messages = [r.getMessage() for r in caplog.records]
    assert any("client sent DISC" in m for m in messages), messages
    assert not any("protocol error" in m or "client gone" in m for m in messages), messages
    assert server.stats.protocol_errors == 0


async def _shutting_down_server(listener: trio.SocketListener, seen: dict) -> None:
    """One client: GO accepted; of two READs in flight the first is answered
    NBD_ESHUTDOWN, the second with data; then every command is recorded."""
    stream = await listener.accept()
    buf = bytearray()

    async def recv(n: int) -> bytes:
        while len(buf) < n:
            chunk = await stream.receive_some(65536)
            if not chunk:
                raise EOFError
            buf.extend(chunk)
        out = bytes(buf[:n])
        del buf[:n]
        return out

    async with stream:
        await stream.send_all(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3))
        await recv(4)
        while True:  # anything before GO is unknown here
            magic, opt, length = struct.unpack(">QII", await recv(16))
            await recv(length)
            if opt == OPT_GO:
                break
            await stream.send_all(struct.pack(">QIII", OPT_REPLY_MAGIC, opt, REP_ERR_UNSUP, 0))
        assert magic == IHAVEOPT
        info = struct.pack(">HQH", 0, 1 * MiB, 1 | 4)  # NBD_INFO_EXPORT
        await stream.send_all(
            struct.pack(">QIII", OPT_REPLY_MAGIC, OPT_GO, 3, len(info))  # NBD_REP_INFO
            + info
            + struct.pack(">QIII", OPT_REPLY_MAGIC, OPT_GO, 1, 0)  # NBD_REP_ACK
        )
        cookies = []
        for _ in range(2):
            _, _, cmd, cookie, _, _ = struct.unpack(">IHHQQI", await recv(28))
            assert cmd == CMD_READ
            cookies.append(cookie)
        await stream.send_all(struct.pack(">IIQ", SIMPLE_MAGIC, errno.ESHUTDOWN, cookies[0]))
        await seen["answer_second"].wait()
        await stream.send_all(struct.pack(">IIQ", SIMPLE_MAGIC, 0, cookies[1]) + b"s" * 512)
        seen["commands"] = []
        with contextlib.suppress(EOFError):
            while True:
                _, _, cmd, _, _, _ = struct.unpack(">IHHQQI", await recv(28))
                seen["commands"].append(cmd)


async def test_eshutdown_reply_is_a_lost_connection_then_soft_disconnect() -> None:
    """NBD_ESHUTDOWN: that request gets ConnectionLost (a node resends it
    elsewhere), new ones are refused without being sent, the one in flight is
    still answered, and only then the client sends NBD_CMD_DISC."""
    seen: dict = {"answer_second": trio.Event()}
    async with trio.open_nursery() as nursery:
        (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
        nursery.start_soon(_shutting_down_server, listener, seen)
        port = listener.socket.getsockname()[1]
        with trio.fail_after(10):
            async with open_client(f"nbd://127.0.0.1:{port}") as c:
                results: dict[int, object] = {}

                async def read(off: int) -> None:
                    try:
                        results[off] = bytes(await c.pread(off, 512))
                    except OSError as e:
                        results[off] = e

                nursery.start_soon(read, 0)
                await poll(lambda: c.in_flight == 1)
                nursery.start_soon(read, 512)
                await poll(lambda: 0 in results)
                assert type(results[0]) is ConnectionLost, results
                assert "NBD_ESHUTDOWN" in str(results[0])
                assert c.shutting_down
                with pytest.raises(ConnectionLost):
                    await c.pwrite(0, b"not sent")
                seen["answer_second"].set()
                await poll(lambda: 512 in results)
                assert results[512] == b"s" * 512
                await poll(lambda: "commands" in seen and seen["commands"] == [CMD_DISC])
    assert seen["commands"] == [CMD_DISC]  # the refused write never reached it


async def test_nbdkit_injected_eshutdown_is_a_lost_connection(tmp_path: Path) -> None:
    log = tmp_path / "nbdkit.log"
    args = ["-v", "--filter=error", "memory", "4M", "error=ESHUTDOWN", "error-rate=100%"]
    with log.open("wb") as err, nbdkit_proc(*args, stderr=err) as (uri, proc):
        async with open_client(uri) as c:
            with pytest.raises(ConnectionLost):
                await c.pread(0, 4096)
            with pytest.raises(ConnectionLost):
                await c.pwrite(0, b"w" * 4096)
            await poll(lambda: c.lost is not None)
        proc.send_signal(signal.SIGTERM)
        proc.wait(5)
    assert "client sent NBD_CMD_DISC" in log.read_text(errors="replace")


@pytest.mark.parametrize("n", [1, 8])
async def test_nbdkit_sigterm_fails_requests_in_flight_as_lost(n: int) -> None:
    """nbdkit answers the requests in flight with NBD_ESHUTDOWN on SIGTERM."""
    with nbdkit_proc("--filter=delay", "memory", "4M", "rdelay=10") as (uri, proc):
        with trio.fail_after(10):
            async with open_client(uri) as c:
                results: list[BaseException] = []

                async def read(off: int) -> None:
                    try:
                        await c.pread(off, 4096)
                    except BaseException as e:
                        results.append(e)

                async with trio.open_nursery() as nursery:
                    for i in range(n):
                        nursery.start_soon(read, i * 4096)
                    await poll(lambda: c.in_flight == n)
                    proc.send_signal(signal.SIGTERM)
                assert len(results) == n
                assert all(type(e) is ConnectionLost for e in results), results
        assert proc.wait(5) == 0


async def test_aclose_sends_disc_to_nbdkit(tmp_path: Path) -> None:
    log = tmp_path / "nbdkit.log"
    with log.open("wb") as err, nbdkit_proc("-v", "memory", "1M", stderr=err) as (uri, proc):
        async with open_client(uri) as c:
            await c.pwrite(0, b"bye")
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert "client sent NBD_CMD_DISC" in log.read_text(errors="replace")


async def test_a_client_gone_is_logged_in_words_without_an_errno(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The "client gone" line says what broke; it once read "[Errno 104]
    ...: Broken pipe", a reset that was not one."""
    caplog.set_level(logging.INFO, logger="dstfs.nbd.server")
    async with dstfs_server(tmp_path) as (uri, server, _, _):
        port = int(uri.rsplit(":", 1)[1])
        sock = await trio.open_tcp_stream("127.0.0.1", port)
        greeting = b""
        while len(greeting) < 18:
            greeting += await sock.receive_some(18 - len(greeting))
        await sock.aclose()
        await poll(lambda: server.stats.active == 0)
    gone = [r.getMessage() for r in caplog.records if "client gone" in r.getMessage()]
    assert len(gone) == 1, gone
    assert "closed by the peer" in gone[0] and "Errno" not in gone[0], gone
