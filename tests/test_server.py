"""The dstfs NBD server, in process, driven by raw sockets whose bytes are packed
here from the protocol spec (nothing borrowed from dstfs.nbd.protocol), and by
the dstfs client. Every bad-input test also checks that a client connected
before keeps working and that the server task is still alive. Two tests run
`dstfs serve` as a child process to watch its memory (VmRSS) under abuse."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import random
import socket
import struct
import subprocess
import termios
import time
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
import trio.testing
from helpers.aio import poll
from helpers.procs import DSTFS, dstfs_server, rss_kib

from dstfs.backends.base import BackendFilter
from dstfs.backends.file import FileBackend
from dstfs.iotypes import Buffer
from dstfs.nbd.client import NbdClient, open_client
from dstfs.nbd.server import Export, NbdServer

KiB, MiB = 1024, 1024 * 1024
SIZE = 128 * MiB  # sparse; large enough that a 65 MiB request is not past the end
RO_SIZE = 1 * MiB

# -- the protocol, from the spec
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
STRUCTURED_MAGIC = 0x668E33EF
FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2  # handshake and client flags
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS = 1, 2, 3, 5
OPT_INFO, OPT_GO, OPT_STRUCTURED = 6, 7, 8
REP_ACK, REP_SERVER, REP_INFO = 1, 2, 3
REP_ERR_UNSUP, REP_ERR_INVALID, REP_ERR_UNKNOWN, REP_ERR_TOO_BIG = (2**31 + n for n in (1, 3, 6, 9))
INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE = 0, 1, 2, 3
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_WRITE_ZEROES = 0, 1, 2, 3, 4, 6
CMD_FLAG_FUA, CMD_FLAG_NO_HOLE = 1, 2
T_HAS_FLAGS, T_READ_ONLY, T_SEND_FLUSH, T_SEND_FUA = 1, 2, 4, 8
T_SEND_TRIM, T_SEND_WRITE_ZEROES, T_CAN_MULTI_CONN = 32, 64, 256
REPLY_FLAG_DONE, REPLY_OFFSET_DATA, REPLY_ERROR = 1, 1, 2**15 + 1


class Closed(Exception):
    """The server closed the connection."""


class Raw:
    """A hand-driven NBD client over a trio stream."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buf = bytearray()

    @classmethod
    async def connect(cls, port: int) -> Raw:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def send(self, *parts: Buffer) -> None:
        for part in parts:
            await self.stream.send_all(part)

    async def recv(self, n: int) -> bytes:
        while len(self.buf) < n:
            try:
                chunk = await self.stream.receive_some(max(n - len(self.buf), 64 * KiB))
            except trio.BrokenResourceError:
                chunk = b""
            if not chunk:
                raise Closed(f"closed with {len(self.buf)} of {n} bytes")
            self.buf += chunk
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def until_closed(self, timeout: float = 30.0) -> bytes:
        """Everything the server sends until it closes (TooSlowError after `timeout`)."""
        with trio.fail_after(timeout):
            while True:
                try:
                    chunk = await self.stream.receive_some(64 * KiB)
                except trio.BrokenResourceError:
                    chunk = b""
                if not chunk:
                    out, self.buf = bytes(self.buf), bytearray()
                    return out
                self.buf += chunk

    async def aclose(self) -> None:
        await self.stream.aclose()

    # -- handshake

    async def greet(self, flags: int = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) -> int:
        magic, ihaveopt, hflags = struct.unpack(">QQH", await self.recv(18))
        assert (magic, ihaveopt) == (NBDMAGIC, IHAVEOPT)
        await self.send(struct.pack(">I", flags))
        return hflags

    async def option(self, opt: int, data: bytes = b"") -> None:
        await self.send(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)

    async def opt_reply(self, opt: int) -> tuple[int, bytes]:
        magic, ropt, rep, n = struct.unpack(">QIII", await self.recv(20))
        assert (magic, ropt) == (OPT_REPLY_MAGIC, opt)
        return rep, await self.recv(n)

    async def opt_replies(self, opt: int) -> list[tuple[int, bytes]]:
        """Replies to `opt` up to and including the final one."""
        out = [await self.opt_reply(opt)]
        while out[-1][0] in (REP_SERVER, REP_INFO):
            out.append(await self.opt_reply(opt))
        return out

    async def go(self, name: str = "", infos: tuple[int, ...] = (), opt: int = OPT_GO) -> dict:
        """GO (or INFO): the NBD_REP_INFO payloads by type; asserts the ACK."""
        raw = name.encode()
        data = (
            struct.pack(">I", len(raw)) + raw + struct.pack(f">H{len(infos)}H", len(infos), *infos)
        )
        await self.option(opt, data)
        replies = await self.opt_replies(opt)
        assert replies[-1][0] == REP_ACK, replies[-1]
        info = {}
        for rep, payload in replies[:-1]:
            assert rep == REP_INFO
            (kind,) = struct.unpack_from(">H", payload)
            info[kind] = payload[2:]
        size, flags = struct.unpack(">QH", info[INFO_EXPORT])
        info["size"], info["flags"] = size, flags
        return info

    # -- transmission

    async def request(
        self,
        cmd: int,
        cookie: int,
        offset: int = 0,
        length: int = 0,
        flags: int = 0,
        data: Buffer = b"",
    ) -> None:
        await self.send(struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, cookie, offset, length))
        if data:
            await self.send(data)

    async def reply(self, read_length: int = 0) -> tuple[int, int, bytes]:
        """A simple reply: (cookie, error, data); data only for a good READ."""
        magic, err, cookie = struct.unpack(">IIQ", await self.recv(16))
        assert magic == SIMPLE_MAGIC, hex(magic)
        data = await self.recv(read_length) if read_length and not err else b""
        return cookie, err, data

    async def call(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0, data=b""):
        """One request, one simple reply: (error, data)."""
        n = length or len(data)
        await self.request(cmd, 77, offset, n, flags, data)
        cookie, err, out = await self.reply(n if cmd == CMD_READ else 0)
        assert cookie == 77
        return err, out


@dataclass
class Srv:
    server: NbdServer
    path: Path
    port: int = 0
    alive: bool = True
    backends: list = field(default_factory=list)

    @property
    def uri(self) -> str:
        return f"nbd://127.0.0.1:{self.port}"

    async def raw(self, name: str = "") -> Raw:
        """A raw client past GO on export `name`."""
        r = await Raw.connect(self.port)
        await r.greet()
        await r.go(name)
        return r


@asynccontextmanager
async def serving(*exports: Export, path: Path) -> AsyncIterator[Srv]:
    """NbdServer.serve_tcp on a free loopback port for the block's duration."""
    srv = Srv(NbdServer(list(exports)), path)

    async def run(task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await srv.server.serve_tcp("127.0.0.1", 0, task_status=task_status)
        finally:
            srv.alive = False

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(run)
        srv.port = listeners[0].socket.getsockname()[1]
        try:
            yield srv
        finally:
            nursery.cancel_scope.cancel()


@pytest.fixture
async def srv(tmp_path: Path) -> AsyncIterator[Srv]:
    """Export "" (the default): a sparse 64 MiB file; "ro": a 1 MiB file, read-only."""
    path = tmp_path / "disk.img"
    ro_path = tmp_path / "ro.img"
    ro_path.write_bytes(random.randbytes(RO_SIZE))
    rw = FileBackend.create(str(path), SIZE)
    ro = FileBackend(str(ro_path), read_only=True)
    exports = [Export("", rw, description="the disk"), Export("ro", ro, read_only=True)]
    try:
        async with serving(*exports, path=path) as s:
            yield s
    finally:
        await rw.aclose()
        await ro.aclose()


@asynccontextmanager
async def bystander(srv: Srv) -> AsyncIterator[NbdClient]:
    """A dstfs client connected before the abuse; on exit it must still work,
    as must a new client, and the server task must be running."""
    async with open_client(srv.uri) as other:
        await check_client(other, 60 * MiB)
        yield other
        await check_client(other, 61 * MiB)
    assert srv.alive
    async with open_client(srv.uri) as fresh:
        await check_client(fresh, 62 * MiB)
    assert srv.alive


async def check_client(c: NbdClient, offset: int) -> None:
    data = random.randbytes(64 * KiB)
    with trio.fail_after(30):
        await c.pwrite(offset, data)
        assert bytes(await c.pread(offset, len(data))) == data


def file_bytes(path: Path, offset: int, length: int) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(length)


# ---------------------------------------------------------------- handshake


async def test_greeting_and_go(srv: Srv) -> None:
    r = await Raw.connect(srv.port)
    hflags = await r.greet()
    assert hflags == FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
    info = await r.go("", (INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE))
    assert info["size"] == SIZE
    want = T_HAS_FLAGS | T_SEND_FLUSH | T_SEND_FUA | T_SEND_TRIM | T_SEND_WRITE_ZEROES
    assert info["flags"] & want == want
    assert not info["flags"] & T_READ_ONLY
    assert info[INFO_NAME] == b""
    assert info[INFO_DESCRIPTION] == b"the disk"
    minimum, preferred, maximum = struct.unpack(">III", info[INFO_BLOCK_SIZE])
    assert (minimum, preferred, maximum) == (1, 4096, 64 * MiB)  # nbdkit's limit
    assert await r.call(CMD_READ, 0, 4096) == (0, bytes(4096))
    await r.request(CMD_DISC, 1)
    assert await r.until_closed() == b""


async def test_can_multi_conn_advertised(srv: Srv) -> None:
    for name, opt in (("", OPT_GO), ("ro", OPT_INFO), ("ro", OPT_GO)):
        r = await Raw.connect(srv.port)
        await r.greet()
        info = await r.go(name, opt=opt)
        assert info["flags"] & T_CAN_MULTI_CONN
        await r.aclose()
    async with open_client(srv.uri) as c:
        assert c.flags & T_CAN_MULTI_CONN


async def test_info_then_go(srv: Srv) -> None:
    r = await Raw.connect(srv.port)
    await r.greet()
    info = await r.go("ro", (INFO_NAME,), opt=OPT_INFO)
    assert info["size"] == RO_SIZE and info["flags"] & T_READ_ONLY
    assert info[INFO_NAME] == b"ro"
    assert not info["flags"] & (T_SEND_TRIM | T_SEND_WRITE_ZEROES)
    # INFO leaves the handshake open: an unknown name is refused, then GO works.
    raw = b"nope"
    await r.option(OPT_INFO, struct.pack(">I", 4) + raw + struct.pack(">H", 0))
    assert (await r.opt_reply(OPT_INFO))[0] == REP_ERR_UNKNOWN
    await r.option(OPT_GO, struct.pack(">I", 4) + raw + struct.pack(">H", 0))
    assert (await r.opt_reply(OPT_GO))[0] == REP_ERR_UNKNOWN
    assert (await r.go(""))["size"] == SIZE
    assert await r.call(CMD_READ, 0, 512) == (0, bytes(512))


async def test_go_malformed_data_is_err_invalid(srv: Srv) -> None:
    r = await Raw.connect(srv.port)
    await r.greet()
    for data in (b"", b"\0\0\0\x09abc\0\0", struct.pack(">IH", 0, 2) + b"\0\1"):
        await r.option(OPT_GO, data)
        assert (await r.opt_reply(OPT_GO))[0] == REP_ERR_INVALID
    assert (await r.go(""))["size"] == SIZE


async def test_list(srv: Srv) -> None:
    r = await Raw.connect(srv.port)
    await r.greet()
    await r.option(OPT_LIST)
    replies = await r.opt_replies(OPT_LIST)
    assert replies[-1] == (REP_ACK, b"")
    names = {}
    for rep, data in replies[:-1]:
        assert rep == REP_SERVER
        (n,) = struct.unpack_from(">I", data)
        names[data[4 : 4 + n].decode()] = data[4 + n :].decode()
    assert names == {"": "the disk", "ro": ""}
    await r.option(OPT_LIST, b"junk")
    assert (await r.opt_reply(OPT_LIST))[0] == REP_ERR_INVALID
    await r.option(OPT_ABORT)
    assert await r.opt_reply(OPT_ABORT) == (REP_ACK, b"")
    assert await r.until_closed() == b""


@pytest.mark.parametrize("no_zeroes", [True, False], ids=["no-zeroes", "zeroes"])
async def test_export_name(srv: Srv, no_zeroes: bool) -> None:
    r = await Raw.connect(srv.port)
    await r.greet(FLAG_FIXED_NEWSTYLE | (FLAG_NO_ZEROES if no_zeroes else 0))
    await r.option(OPT_EXPORT_NAME, b"ro")
    size, flags = struct.unpack(">QH", await r.recv(10))
    assert size == RO_SIZE
    assert flags & (T_HAS_FLAGS | T_READ_ONLY | T_CAN_MULTI_CONN) == (
        T_HAS_FLAGS | T_READ_ONLY | T_CAN_MULTI_CONN
    )
    if not no_zeroes:
        assert await r.recv(124) == bytes(124)
    # The next bytes are the reply to our first request, nothing in between.
    err, data = await r.call(CMD_READ, 4096, 4096)
    assert err == 0 and data == file_bytes(srv.path.parent / "ro.img", 4096, 4096)


async def test_export_name_default_and_unknown(srv: Srv) -> None:
    r = await Raw.connect(srv.port)
    await r.greet()
    await r.option(OPT_EXPORT_NAME, b"")
    assert struct.unpack(">QH", await r.recv(10))[0] == SIZE
    r = await Raw.connect(srv.port)
    await r.greet()
    await r.option(OPT_EXPORT_NAME, b"nope")
    assert await r.until_closed() == b""  # no reply is possible: just a disconnect


async def test_requests_pipelined_behind_the_handshake(srv: Srv) -> None:
    """A client may send its first requests without waiting for GO's ACK (or
    the EXPORT_NAME reply): they wait in the buffer and are served after it."""
    read = struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_READ, 5, 0, 512)
    r = await Raw.connect(srv.port)
    await r.recv(18)
    go = struct.pack(">QII", IHAVEOPT, OPT_GO, 6) + struct.pack(">IH", 0, 0)
    await r.send(struct.pack(">I", FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) + go + read)
    assert (await r.opt_replies(OPT_GO))[-1][0] == REP_ACK
    assert await r.reply(512) == (5, 0, bytes(512))
    r = await Raw.connect(srv.port)
    await r.recv(18)
    name = struct.pack(">QII", IHAVEOPT, OPT_EXPORT_NAME, 0)
    await r.send(struct.pack(">I", FLAG_FIXED_NEWSTYLE) + name + read)
    assert struct.unpack(">QH", await r.recv(10))[0] == SIZE
    assert await r.recv(124) == bytes(124)
    assert await r.reply(512) == (5, 0, bytes(512))


async def test_structured_reply_read_is_offset_data_chunk(srv: Srv) -> None:
    r = await Raw.connect(srv.port)
    await r.greet()
    await r.option(OPT_STRUCTURED)
    assert await r.opt_reply(OPT_STRUCTURED) == (REP_ACK, b"")
    await r.option(OPT_STRUCTURED)  # a second time is an error, not a disconnect
    assert (await r.opt_reply(OPT_STRUCTURED))[0] == REP_ERR_INVALID
    await r.go()
    data = random.randbytes(10000)
    await r.request(CMD_WRITE, 1, 12345, len(data), data=data)
    assert await r.reply() == (1, 0, b"")  # simple replies stay allowed for writes
    await r.request(CMD_READ, 2, 12345, len(data))
    magic, flags, rtype, cookie, length = struct.unpack(">IHHQI", await r.recv(20))
    assert (magic, rtype, cookie, length) == (STRUCTURED_MAGIC, REPLY_OFFSET_DATA, 2, 8 + len(data))
    assert flags & REPLY_FLAG_DONE
    assert struct.unpack(">Q", await r.recv(8))[0] == 12345
    assert await r.recv(len(data)) == data
    # An error is an ERROR chunk carrying the errno and a message.
    await r.request(CMD_READ, 3, SIZE, 512)
    magic, flags, rtype, cookie, length = struct.unpack(">IHHQI", await r.recv(20))
    assert (magic, rtype, cookie) == (STRUCTURED_MAGIC, REPLY_ERROR, 3)
    assert flags & REPLY_FLAG_DONE
    err, msglen = struct.unpack_from(">IH", payload := await r.recv(length))
    assert err == errno.EINVAL and len(payload) == 6 + msglen


# ---------------------------------------------------------------- transmission


async def test_read_write_flush_fua(srv: Srv) -> None:
    r = await srv.raw()
    data = random.randbytes(300 * KiB + 7)
    assert await r.call(CMD_WRITE, 5 * MiB + 3, data=data) == (0, b"")
    assert await r.call(CMD_READ, 5 * MiB + 3, len(data)) == (0, data)
    assert await r.call(CMD_FLUSH) == (0, b"")
    fua = random.randbytes(64 * KiB)
    assert await r.call(CMD_WRITE, 9 * MiB, flags=CMD_FLAG_FUA, data=fua) == (0, b"")
    assert await r.call(CMD_READ, 9 * MiB, len(fua)) == (0, fua)
    assert file_bytes(srv.path, 5 * MiB + 3, len(data)) == data
    assert file_bytes(srv.path, 9 * MiB, len(fua)) == fua
    # Zero-length requests are answered (any way), never a disconnect.
    for cmd in (CMD_READ, CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES):
        await r.request(cmd, 9, 4096, 0)
        assert (await r.reply())[0] == 9
    assert await r.call(CMD_READ, 9 * MiB, 16) == (0, fua[:16])


async def test_trim_reads_zeroes_and_punches_a_hole(srv: Srv) -> None:
    r = await srv.raw()
    data = random.randbytes(4 * MiB)
    assert await r.call(CMD_WRITE, 1 * MiB, data=data) == (0, b"")
    assert await r.call(CMD_FLUSH) == (0, b"")
    before = srv.path.stat().st_blocks
    assert before * 512 >= 4 * MiB
    assert await r.call(CMD_TRIM, 2 * MiB, 2 * MiB) == (0, b"")
    assert await r.call(CMD_READ, 1 * MiB, 4 * MiB) == (
        0,
        data[: 1 * MiB] + bytes(2 * MiB) + data[3 * MiB :],
    )
    after = srv.path.stat().st_blocks
    assert (before - after) * 512 >= 2 * MiB - 8 * KiB
    assert srv.path.stat().st_size == SIZE
    assert await r.call(CMD_TRIM, 0, SIZE, flags=CMD_FLAG_FUA) == (0, b"")
    assert srv.path.stat().st_blocks * 512 < 64 * KiB


@pytest.mark.parametrize("no_hole", [False, True], ids=["may-trim", "no-hole"])
async def test_write_zeroes(srv: Srv, no_hole: bool) -> None:
    r = await srv.raw()
    data = random.randbytes(4 * MiB)
    assert await r.call(CMD_WRITE, 8 * MiB, data=data) == (0, b"")
    assert await r.call(CMD_FLUSH) == (0, b"")
    before = srv.path.stat().st_blocks
    flags = CMD_FLAG_FUA | (CMD_FLAG_NO_HOLE if no_hole else 0)
    assert await r.call(CMD_WRITE_ZEROES, 9 * MiB, 2 * MiB + 5, flags) == (0, b"")
    want = data[: 1 * MiB] + bytes(2 * MiB + 5) + data[3 * MiB + 5 :]
    assert await r.call(CMD_READ, 8 * MiB, 4 * MiB) == (0, want)
    assert file_bytes(srv.path, 8 * MiB, 4 * MiB) == want
    after = srv.path.stat().st_blocks
    if no_hole:
        assert after >= before  # still allocated: zeroes were written
    else:
        assert (before - after) * 512 >= 2 * MiB - 8 * KiB


async def test_pipelined_requests_matched_by_cookie(srv: Srv) -> None:
    r = await srv.raw()
    blocks = {i: random.randbytes(random.randrange(1, 256 * KiB)) for i in range(64)}
    for i, b in blocks.items():
        await r.request(CMD_WRITE, 1000 + i, i * 256 * KiB, len(b), data=b)
    # All writes and reads go out before a single reply is read.
    reads: dict[int, int] = {}
    for i, b in blocks.items():
        reads[2000 + i] = len(b)
        await r.request(CMD_READ, 2000 + i, i * 256 * KiB, len(b))
        if i % 8 == 0:
            await r.request(CMD_FLUSH, 3000 + i)
    want = set(reads) | {1000 + i for i in blocks} | {3000 + i for i in range(0, 64, 8)}
    with trio.fail_after(30):
        while want:
            # A simple reply does not say whether data follows: we know by the cookie.
            magic, err, cookie = struct.unpack(">IIQ", await r.recv(16))
            assert magic == SIMPLE_MAGIC and err == 0 and cookie in want
            want.remove(cookie)
            if cookie in reads:
                assert await r.recv(reads[cookie]) == blocks[cookie - 2000]


async def test_many_clients_at_once(srv: Srv) -> None:
    n, chunk = 24, 256 * KiB
    blocks = [random.randbytes(chunk) for _ in range(n)]

    async def one(i: int) -> None:
        async with open_client(srv.uri) as c:
            for j in range(4):
                await c.pwrite((i * 4 + j) * chunk, blocks[i])
            await c.flush()
            for j in range(4):
                assert bytes(await c.pread((i * 4 + j) * chunk, chunk)) == blocks[i]

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(one, i)
    assert srv.server.stats.connections >= n
    async with open_client(srv.uri) as c:  # multi-conn: every write is visible to others
        whole = bytes(await c.pread(0, n * 4 * chunk))
    assert whole == b"".join(b * 4 for b in blocks)


async def test_read_only_export_refuses_writes(srv: Srv) -> None:
    ro_path = srv.path.parent / "ro.img"
    before = ro_path.read_bytes()
    r = await srv.raw("ro")
    assert await r.call(CMD_WRITE, 0, data=b"x" * 4096) == (errno.EPERM, b"")
    assert await r.call(CMD_WRITE, 0, flags=CMD_FLAG_FUA, data=b"x" * 512) == (errno.EPERM, b"")
    assert await r.call(CMD_TRIM, 0, 4096) == (errno.EPERM, b"")
    assert await r.call(CMD_WRITE_ZEROES, 0, 4096) == (errno.EPERM, b"")
    assert await r.call(CMD_READ, 0, 4096) == (0, before[:4096])
    assert (await r.call(CMD_FLUSH))[0] in (0, errno.EPERM)
    async with open_client(srv.uri + "/ro") as c:
        assert c.flags & T_READ_ONLY
        with pytest.raises(OSError) as e:
            await c.pwrite(0, b"y" * 512)
        assert e.value.errno == errno.EPERM
    assert ro_path.read_bytes() == before


# ---------------------------------------------------------------- bad input


async def test_bad_client_flags(srv: Srv) -> None:
    async with bystander(srv):
        errors = srv.server.stats.protocol_errors
        r = await Raw.connect(srv.port)
        await r.greet(FLAG_FIXED_NEWSTYLE | 0x80000000)
        assert await r.until_closed() == b""
        assert srv.server.stats.protocol_errors == errors + 1


async def test_bad_option_magic(srv: Srv) -> None:
    async with bystander(srv):
        r = await Raw.connect(srv.port)
        await r.greet()
        await r.send(struct.pack(">QII", 0x1234567890ABCDEF, OPT_GO, 6) + bytes(6))
        assert await r.until_closed() == b""


@pytest.mark.parametrize("opt", [OPT_STARTTLS, 11, 4, 99, 0xFFFFFFFF])
async def test_unknown_option_then_go(srv: Srv, opt: int) -> None:
    async with bystander(srv):
        r = await Raw.connect(srv.port)
        await r.greet()
        await r.option(opt, random.randbytes(1000))  # its data is skipped
        rep, _ = await r.opt_reply(opt)
        assert rep == REP_ERR_UNSUP
        assert (await r.go())["size"] == SIZE
        assert await r.call(CMD_READ, 0, 512) == (0, bytes(512))


async def test_oversized_option_is_refused_and_skipped(srv: Srv) -> None:
    async with bystander(srv):
        r = await Raw.connect(srv.port)
        await r.greet()
        length = 40 * MiB
        await r.send(struct.pack(">QII", IHAVEOPT, OPT_GO, length))
        junk = random.randbytes(1 * MiB)
        for _ in range(length // len(junk)):
            await r.send(junk)
        rep, _ = await r.opt_reply(OPT_GO)
        assert rep == REP_ERR_TOO_BIG
        assert (await r.go())["size"] == SIZE  # the handshake goes on
        assert await r.call(CMD_READ, 0, 512) == (0, bytes(512))


async def test_oversized_export_name_disconnects(srv: Srv) -> None:
    async with bystander(srv):
        r = await Raw.connect(srv.port)
        await r.greet()
        await r.option(OPT_EXPORT_NAME, b"n" * (64 * KiB + 1))
        # A client now waits for 10 bytes of size and flags; an option reply
        # would be read as an export size of 0x0003e889045565a9.
        assert await r.until_closed() == b""


async def test_writes_and_reads_up_to_64_mib(srv: Srv) -> None:
    """The advertised maximum payload is served (it was 32 MiB)."""
    async with bystander(srv):
        r = await srv.raw()
        data = random.randbytes(1 * MiB) * 48
        assert await r.call(CMD_WRITE, 1 * MiB, data=data) == (0, b"")
        assert file_bytes(srv.path, 1 * MiB, len(data)) == data
        assert await r.call(CMD_READ, 0, 50 * MiB) == (0, bytes(MiB) + data + bytes(MiB))


async def test_write_over_64_mib_is_refused_and_discarded(srv: Srv) -> None:
    async with bystander(srv):
        r = await srv.raw()
        length = 65 * MiB
        await r.request(CMD_WRITE, 5, 0, length)
        junk = random.randbytes(1 * MiB)
        for _ in range(length // len(junk)):
            await r.send(junk)
        cookie, err, _ = await r.reply()
        assert cookie == 5 and err in (errno.EINVAL, errno.EOVERFLOW)
        # Nothing was written, and the stream is still in step.
        assert await r.call(CMD_READ, 0, 1 * MiB) == (0, bytes(1 * MiB))
        data = random.randbytes(4096)
        assert await r.call(CMD_WRITE, 0, data=data) == (0, b"")
        assert await r.call(CMD_READ, 0, 4096) == (0, data)
        assert file_bytes(srv.path, 4096, 1 * MiB) == bytes(1 * MiB)


async def test_read_over_64_mib_is_einval(srv: Srv) -> None:
    async with bystander(srv):
        r = await srv.raw()
        assert await r.call(CMD_READ, 0, 64 * MiB + 1) == (errno.EINVAL, b"")
        assert await r.call(CMD_READ, 0, 512) == (0, bytes(512))


async def test_requests_past_the_end(srv: Srv) -> None:
    async with bystander(srv):
        r = await srv.raw()
        assert await r.call(CMD_READ, SIZE - 512, 1024) == (errno.EINVAL, b"")
        assert await r.call(CMD_READ, 2**64 - 1, 1) == (errno.EINVAL, b"")
        # The payload of a refused write is still consumed.
        assert await r.call(CMD_WRITE, SIZE - 512, data=b"z" * 1024) == (errno.ENOSPC, b"")
        assert await r.call(CMD_WRITE, 2**63, data=b"z" * 10) == (errno.ENOSPC, b"")
        # WRITE and WRITE_ZEROES past the end are ENOSPC (the spec's SHOULD,
        # nbdkit's answer); TRIM is EINVAL.
        assert await r.call(CMD_TRIM, SIZE, 1) == (errno.EINVAL, b"")
        assert await r.call(CMD_WRITE_ZEROES, SIZE - 1, 2) == (errno.ENOSPC, b"")
        assert await r.call(CMD_READ, SIZE - 512, 512) == (0, bytes(512))
        assert await r.call(CMD_WRITE, SIZE - 512, data=b"e" * 512) == (0, b"")
        assert file_bytes(srv.path, SIZE - 1024, 1024) == bytes(512) + b"e" * 512


async def test_unknown_command_is_einval(srv: Srv) -> None:
    async with bystander(srv):
        r = await srv.raw()
        for cmd in (7, 8, 200):
            assert (await r.call(cmd, 0, 512))[0] == errno.EINVAL
        assert await r.call(CMD_READ, 0, 512) == (0, bytes(512))


async def test_bad_request_magic(srv: Srv) -> None:
    async with bystander(srv):
        r = await srv.raw()
        await r.send(struct.pack(">IHHQQI", 0x25609514, 0, CMD_READ, 1, 0, 512))
        assert await r.until_closed() == b""


@pytest.mark.parametrize(
    "cut",
    ["greeting", "flags", "option-header", "option-data", "header", "write-payload", "read"],
)
async def test_client_vanishes_mid_message(srv: Srv, cut: str) -> None:
    async with bystander(srv):
        active = srv.server.stats.active
        r = await Raw.connect(srv.port)
        if cut == "greeting":
            pass  # gone before reading the greeting
        elif cut == "flags":
            await r.recv(18)
            await r.send(b"\0\0")
        elif cut.startswith("option"):
            await r.greet()
            if cut == "option-header":
                await r.send(struct.pack(">QII", IHAVEOPT, OPT_GO, 100)[:9])
            else:
                await r.send(struct.pack(">QII", IHAVEOPT, OPT_GO, 100) + bytes(40))
        else:
            await r.greet()
            await r.go()
            if cut == "header":
                await r.send(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_WRITE, 1, 0, 4096)[:14])
            elif cut == "write-payload":
                await r.request(CMD_WRITE, 1, 0, 1 * MiB)
                await r.send(b"w" * (300 * KiB))
            else:  # requests whose replies are never read
                for i in range(8):
                    await r.request(CMD_READ, i, 0, 1 * MiB)
        await poll(lambda: srv.server.stats.active == active + 1)
        await r.aclose()
        await poll(lambda: srv.server.stats.active == active)
    assert file_bytes(srv.path, 0, 4096) == bytes(4096)  # no half write applied


# ---------------------------------------------------------------- bounded memory


class GatedFlush(BackendFilter):
    """Flushes wait until `gate` opens (a very slow disk); counts them."""

    def __init__(self, inner: FileBackend) -> None:
        super().__init__(inner)
        self.gate = trio.Event()
        self.waiting = 0

    async def flush(self) -> None:
        self.waiting += 1
        await self.gate.wait()


@pytest.fixture
async def gated(tmp_path: Path) -> AsyncIterator[tuple[Srv, GatedFlush]]:
    path = tmp_path / "gated.img"
    inner = FileBackend.create(str(path), SIZE)
    backend = GatedFlush(inner)
    try:
        async with serving(Export("", backend), path=path) as s:
            yield s, backend
    finally:
        await inner.aclose()


async def _pending_durable_memory(
    srv: Srv, backend: GatedFlush, n: int, flags: int, payload: bytes
) -> int:
    """Send `n` requests (FUA writes of `payload`, or FLUSHes) while flushes
    hang; return the bytes the process allocated once the server can do no more.
    Then open the gate and check every request is answered."""
    r = await srv.raw()
    cmd = CMD_WRITE if payload else CMD_FLUSH
    header = [
        struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, i, (i % 60) * MiB, len(payload))
        for i in range(n)
    ]
    tracing = tracemalloc.is_tracing()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]

        async def sender() -> None:
            for h in header:
                await r.send(h, *([payload] if payload else []))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            with trio.fail_after(20):
                await trio.testing.wait_all_tasks_blocked(0.05)
            held = tracemalloc.get_traced_memory()[0] - base
            if not tracing:
                tracemalloc.stop()
            backend.gate.set()
            with trio.fail_after(20):
                for _ in range(n):
                    assert (await r.reply())[1] == 0
    finally:
        if not tracing:
            tracemalloc.stop()
    return held


async def test_fua_writes_do_not_pile_up_while_flush_is_slow(gated) -> None:
    srv, backend = gated
    payload = random.randbytes(1 * MiB)
    held = await _pending_durable_memory(srv, backend, 48, CMD_FLAG_FUA, payload)
    assert held < 8 * MiB, f"{held / MiB:.0f} MiB held for 48 pending 1 MiB FUA writes"


async def test_flushes_do_not_pile_up_while_flush_is_slow(gated) -> None:
    srv, backend = gated
    held = await _pending_durable_memory(srv, backend, 6000, 0, b"")
    assert held < 4 * MiB, f"{held / MiB:.1f} MiB held for 6000 pending FLUSHes"


def _blocking_handshake(sock: socket.socket) -> None:
    """Greeting, flags and GO on a blocking socket."""
    assert len(sock.recv(18, socket.MSG_WAITALL)) == 18
    sock.sendall(struct.pack(">I", FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
    sock.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, 6) + struct.pack(">IH", 0, 0))
    while True:
        magic, _, rep, n = struct.unpack(">QIII", sock.recv(20, socket.MSG_WAITALL))
        assert magic == OPT_REPLY_MAGIC
        if n:
            sock.recv(n, socket.MSG_WAITALL)
        if rep != REP_INFO:
            assert rep == REP_ACK
            return


def _blocking_read_ok(uri_port: int) -> None:
    with socket.create_connection(("127.0.0.1", uri_port), timeout=10) as s:
        _blocking_handshake(s)
        s.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_READ, 1, 0, 4096))
        assert s.recv(16, socket.MSG_WAITALL) == struct.pack(">IIQ", SIMPLE_MAGIC, 0, 1)
        assert len(s.recv(4096, socket.MSG_WAITALL)) == 4096


def test_oversized_option_memory_stays_bounded(tmp_path: Path) -> None:
    """200 MiB of option data streams through `dstfs serve` without being kept."""
    with dstfs_server(tmp_path / "d.img", "64M") as (uri, proc):
        port = int(uri.rsplit(":", 1)[1].split("/")[0])
        base = peak = rss_kib(proc.pid)
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
            assert len(s.recv(18, socket.MSG_WAITALL)) == 18
            s.sendall(struct.pack(">I", FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
            length = 200 * MiB
            s.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, length))
            junk = os.urandom(4 * MiB)
            for _ in range(length // len(junk)):
                s.sendall(junk)
                peak = max(peak, rss_kib(proc.pid))
            magic, opt, rep, n = struct.unpack(">QIII", s.recv(20, socket.MSG_WAITALL))
            assert (magic, opt, rep) == (OPT_REPLY_MAGIC, OPT_GO, REP_ERR_TOO_BIG)
            s.recv(n, socket.MSG_WAITALL)
            peak = max(peak, rss_kib(proc.pid))
            s.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, 6) + struct.pack(">IH", 0, 0))
            while (rep := struct.unpack(">QIII", s.recv(20, socket.MSG_WAITALL)))[2] == REP_INFO:
                s.recv(rep[3], socket.MSG_WAITALL)
            assert rep[2] == REP_ACK
        assert (peak - base) < 40 * 1024, f"RSS grew by {(peak - base) // 1024} MiB"
        _blocking_read_ok(port)
        assert proc.poll() is None


def test_unread_replies_do_not_grow_server_memory(tmp_path: Path) -> None:
    """2000 pipelined 1 MiB READs whose replies are never read: the server stops
    reading requests when the socket is full instead of queueing 2000 MiB."""
    with dstfs_server(tmp_path / "d.img", "64M") as (uri, proc):
        port = int(uri.rsplit(":", 1)[1].split("/")[0])
        base = rss_kib(proc.pid)
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
            _blocking_handshake(s)
            reqs = b"".join(
                struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_READ, i, (i % 64) * MiB, 1 * MiB)
                for i in range(2000)
            )
            s.sendall(reqs)
            # Wait until the server stops sending: our receive queue stops growing.
            deadline = time.monotonic() + 20
            queued, still = -1, 0
            while still < 15:
                assert time.monotonic() < deadline, "the server never stopped sending"
                now = struct.unpack("i", fcntl.ioctl(s, termios.FIONREAD, b"\0" * 4))[0]
                still = still + 1 if now == queued and now > 0 else 0
                queued = now
                time.sleep(0.02)
            grown = rss_kib(proc.pid) - base
            assert grown < 40 * 1024, f"RSS grew by {grown // 1024} MiB"
        _blocking_read_ok(port)  # and it serves others after that client left
        assert proc.poll() is None


# ---------------------------------------------------------------- metadata contexts, block status

OPT_STRUCTURED, OPT_LIST_META, OPT_SET_META = 8, 9, 10
REP_META_CONTEXT = 4
CMD_BLOCK_STATUS = 7
STRUCTURED_MAGIC = 0x668E33EF


def meta_query(export: str, *queries: str) -> bytes:
    out = struct.pack(">I", len(export)) + export.encode() + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q)) + q.encode()
    return out


async def meta_replies(r: Raw, opt: int) -> list[tuple[int, bytes]]:
    out = [await r.opt_reply(opt)]
    while out[-1][0] == REP_META_CONTEXT:
        out.append(await r.opt_reply(opt))
    return out


async def chunk(r: Raw) -> tuple[int, int, int, bytes]:
    """One structured reply chunk: (flags, type, cookie, payload)."""
    magic, flags, type_, cookie, n = struct.unpack(">IHHQI", await r.recv(20))
    assert magic == STRUCTURED_MAGIC, hex(magic)
    return flags, type_, cookie, await r.recv(n)


@pytest.mark.parametrize(
    ("queries", "listed"),
    [((), True), (("base:",), True), (("base:allocation",), True), (("qemu:dirty",), False)],
)
async def test_list_meta_context(srv: Srv, queries: tuple, listed: bool) -> None:
    r = await Raw.connect(srv.port)
    await r.greet()
    await r.option(OPT_LIST_META, meta_query("", *queries))
    replies = await meta_replies(r, OPT_LIST_META)
    assert replies[-1] == (REP_ACK, b"")
    names = [payload[4:] for rep, payload in replies[:-1]]
    assert names == ([b"base:allocation"] if listed else [])


@pytest.mark.parametrize(
    ("structured", "data", "rep"),
    [
        (False, meta_query("", "base:allocation"), REP_ERR_INVALID),  # needs structured replies
        (True, b"garbage", REP_ERR_INVALID),
        (True, meta_query("nope", "base:allocation"), 0x80000006),  # ERR_UNKNOWN
    ],
)
async def test_set_meta_context_refused_then_go(
    srv: Srv, structured: bool, data: bytes, rep: int
) -> None:
    r = await Raw.connect(srv.port)
    await r.greet()
    if structured:
        await r.option(OPT_STRUCTURED)
        assert await r.opt_reply(OPT_STRUCTURED) == (REP_ACK, b"")
    await r.option(OPT_SET_META, data)
    assert (await r.opt_reply(OPT_SET_META))[0] == rep
    assert (await r.go())["size"] == SIZE


@pytest.mark.parametrize("failing", [meta_query("nope", "base:allocation"), b"garbage"])
async def test_a_failed_set_meta_context_drops_the_earlier_selection(
    srv: Srv, failing: bytes
) -> None:
    """SET_META_CONTEXT replaces what was selected, even when it fails (the
    spec): BLOCK_STATUS after it is EINVAL (it was answered)."""
    r = await Raw.connect(srv.port)
    await r.greet()
    await r.option(OPT_STRUCTURED)
    assert await r.opt_reply(OPT_STRUCTURED) == (REP_ACK, b"")
    await r.option(OPT_SET_META, meta_query("", "base:allocation"))
    assert [rep for rep, _ in await meta_replies(r, OPT_SET_META)] == [REP_META_CONTEXT, REP_ACK]
    await r.option(OPT_SET_META, failing)
    assert (await r.opt_reply(OPT_SET_META))[0] in (REP_ERR_INVALID, 0x80000006)
    await r.go()
    await r.request(CMD_BLOCK_STATUS, 1, 0, 4096)
    flags, type_, cookie, payload = await chunk(r)
    assert (flags, type_, cookie) == (1, 0x8001, 1)  # a final ERROR chunk
    assert struct.unpack_from(">I", payload)[0] == 22


async def test_block_status_of_a_sparse_file(srv: Srv) -> None:
    """Holes are HOLE|ZERO (3), data 0; REQ_ONE gives one extent; without a
    selected context, or past the end, EINVAL (as an error chunk)."""
    async with open_client(srv.uri) as c:
        await c.pwrite(1 * MiB, b"d" * 65536)
        await c.flush()
    r = await Raw.connect(srv.port)
    await r.greet()
    await r.option(OPT_STRUCTURED)
    assert await r.opt_reply(OPT_STRUCTURED) == (REP_ACK, b"")
    await r.option(OPT_SET_META, meta_query("", "base:allocation"))
    replies = await meta_replies(r, OPT_SET_META)
    assert [rep for rep, _ in replies] == [REP_META_CONTEXT, REP_ACK]
    (context,) = struct.unpack_from(">I", replies[0][1])
    assert replies[0][1][4:] == b"base:allocation"
    await r.go()
    await r.request(CMD_BLOCK_STATUS, 1, 0, 4 * MiB)
    flags, type_, cookie, payload = await chunk(r)
    assert (flags, type_, cookie) == (1, 5, 1)
    assert struct.unpack_from(">I", payload)[0] == context
    extents = [struct.unpack_from(">II", payload, i) for i in range(4, len(payload), 8)]
    assert extents == [(1 * MiB, 3), (65536, 0), (3 * MiB - 65536, 3)]
    await r.request(CMD_BLOCK_STATUS, 2, 512, 4 * MiB, flags=8)  # REQ_ONE
    assert (await chunk(r))[3] == struct.pack(">III", context, 1 * MiB - 512, 3)
    await r.request(CMD_BLOCK_STATUS, 3, SIZE - 512, 1024)
    flags, type_, cookie, payload = await chunk(r)
    assert (type_, cookie) == (0x8001, 3) and struct.unpack_from(">I", payload)[0] == 22


async def test_block_status_without_a_context_is_einval(srv: Srv) -> None:
    r = await srv.raw()
    assert await r.call(CMD_BLOCK_STATUS, 0, 4096) == (22, b"")
    assert await r.call(CMD_READ, 0, 512) == (0, bytes(512))


# ---------------------------------------------------------------- concurrent requests


class Slow(BackendFilter):
    """A backend like the array's: requests wait on something slow, so the
    server runs them side by side. A READ at `hold` waits until `gate`
    opens; a WRITE opens it. `reading`/`writing` count requests inside."""

    concurrent_requests = True

    def __init__(self, inner: FileBackend, hold: int = 0) -> None:
        super().__init__(inner)
        self.gate = trio.Event()
        self.hold = hold
        self.reading = self.writing = 0

    async def pread(self, offset: int, length: int) -> Buffer:
        self.reading += 1
        try:
            if offset == self.hold:
                await self.gate.wait()
            return await self.inner.pread(offset, length)
        finally:
            self.reading -= 1

    async def pwrite(self, offset: int, data: Buffer, fua: bool = False) -> None:
        self.writing += 1
        try:
            if offset == self.hold:
                await self.gate.wait()
            else:
                self.gate.set()
            await self.inner.pwrite(offset, data, fua)
        finally:
            self.writing -= 1


@pytest.fixture
async def slow(tmp_path: Path) -> AsyncIterator[tuple[Srv, Slow]]:
    path = tmp_path / "slow.img"
    inner = FileBackend.create(str(path), SIZE)
    backend = Slow(inner)
    try:
        async with serving(Export("", backend), path=path) as s:
            yield s, backend
    finally:
        await inner.aclose()


async def test_requests_run_side_by_side_on_a_concurrent_backend(slow) -> None:
    """A READ that waits for a WRITE sent after it on the same connection:
    one request at a time, this never finishes."""
    srv, _backend = slow
    r = await srv.raw()
    data = random.randbytes(4 * KiB)
    await r.request(CMD_READ, 1, 0, 4 * KiB)
    await r.request(CMD_WRITE, 2, 1 * MiB, len(data), data=data)
    with trio.fail_after(20):
        assert await r.reply() == (2, 0, b"")
        assert await r.reply(4 * KiB) == (1, 0, bytes(4 * KiB))
        assert await r.call(CMD_READ, 1 * MiB, len(data)) == (0, data)


async def test_disc_waits_for_requests_in_flight(slow) -> None:
    srv, backend = slow
    r = await srv.raw()
    data = random.randbytes(4 * KiB)
    await r.request(CMD_READ, 1, 0, 4 * KiB)
    await r.request(CMD_WRITE, 2, 0, len(data), data=data)  # waits too (offset 0)
    await r.request(CMD_DISC, 3)
    await poll(lambda: backend.reading == 1 and backend.writing == 1)
    await trio.testing.wait_all_tasks_blocked(0.05)
    backend.gate.set()
    rest = await r.until_closed()
    cookies = {struct.unpack_from(">IIQ", rest, 0)[2]}
    at = 16 if cookies == {2} else 16 + 4 * KiB
    cookies.add(struct.unpack_from(">IIQ", rest, at)[2])
    assert cookies == {1, 2} and len(rest) == 32 + 4 * KiB
    assert file_bytes(srv.path, 0, len(data)) == data


async def test_requests_in_flight_per_connection_are_bounded(slow) -> None:
    """Past MAX_IN_FLIGHT requests, or IN_FLIGHT_BYTES of them, the server
    reads no more from the connection; all are answered once they go on."""
    srv, backend = slow
    r = await srv.raw()
    for i in range(100):  # small reads: bounded by the count
        await r.request(CMD_READ, i, 0, 512)
    await poll(lambda: backend.reading == 64)
    await trio.testing.wait_all_tasks_blocked(0.05)
    assert backend.reading == 64
    backend.gate.set()
    with trio.fail_after(20):
        assert sorted([(await r.reply(512))[0] for _ in range(100)]) == list(range(100))
    backend.gate = trio.Event()
    payload = bytes(1 * MiB)

    async def writes() -> None:
        for i in range(20):
            await r.request(CMD_WRITE, 100 + i, 0, MiB, 0, payload)

    async with trio.open_nursery() as nursery:  # 1 MiB writes: bounded by the bytes
        nursery.start_soon(writes)
        await poll(lambda: backend.writing == 8)
        await trio.testing.wait_all_tasks_blocked(0.05)
        assert backend.writing == 8
        backend.gate.set()
    with trio.fail_after(20):
        assert sorted([(await r.reply())[0] for _ in range(20)]) == list(range(100, 120))


async def test_a_client_gone_lets_its_requests_finish(slow) -> None:
    srv, backend = slow
    async with bystander(srv):
        backend.gate = trio.Event()  # the bystander's write opened it
        active = srv.server.stats.active
        r = await srv.raw()
        data = random.randbytes(4 * KiB)
        await r.request(CMD_WRITE, 1, 0, len(data), data=data)
        await poll(lambda: backend.writing == 1)
        await r.aclose()
        await trio.testing.wait_all_tasks_blocked(0.05)
        assert srv.server.stats.active == active + 1  # still finishing the WRITE
        backend.gate.set()
        await poll(lambda: srv.server.stats.active == active)
    assert file_bytes(srv.path, 0, len(data)) == data


# ---------------------------------------------------------------- unix socket paths


async def test_serve_unix_takes_over_only_a_stale_socket(tmp_path: Path) -> None:
    backend = FileBackend.create(str(tmp_path / "d.img"), 1 * MiB)
    server = NbdServer([Export("", backend)])
    victim = tmp_path / "precious"
    victim.write_text("keep me")
    with pytest.raises(FileExistsError, match="not a socket"):
        await server.serve_unix(str(victim))
    assert victim.read_text() == "keep me"
    live, stale = tmp_path / "live.sock", tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as other:
        other.bind(str(live))
        other.listen(1)
        with pytest.raises(OSError, match="already listens") as e:
            await server.serve_unix(str(live))
        assert e.value.errno == errno.EADDRINUSE and live.is_socket()
    with socket.socket(socket.AF_UNIX) as gone:
        gone.bind(str(stale))  # closed: a leftover nobody listens on
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve_unix, str(stale))
        async with open_client(f"nbd+unix:///?socket={stale}") as c:
            await check_client(c, 0)
        nursery.cancel_scope.cancel()
    await backend.aclose()


@pytest.mark.parametrize("what", ["file", "listening socket"])
def test_dstfs_serve_unix_refuses_a_file_or_a_live_socket(tmp_path: Path, what: str) -> None:
    path = tmp_path / "there"
    other = socket.socket(socket.AF_UNIX)
    try:
        if what == "file":
            path.write_text("keep me")
        else:
            other.bind(str(path))
            other.listen(1)
        res = subprocess.run(
            [*DSTFS, "serve", str(tmp_path / "d.img"), "--size", "1M", "--unix", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert res.returncode == 1
        lines = res.stderr.strip().splitlines()
        says = "exists and is not a socket" if what == "file" else "already listens"
        assert len(lines) == 1 and lines[0].startswith("dstfs serve: --unix") and says in lines[0]
        assert path.read_text() == "keep me" if what == "file" else path.is_socket()
        assert not (tmp_path / "d.img").exists()
    finally:
        other.close()


async def test_unread_read_replies_are_bounded_over_all_connections(
    slow, caplog: pytest.LogCaptureFixture
) -> None:
    """Clients that pipeline large READs and never read the replies: the READ
    data the server holds over all connections stays within its read memory
    (it was bounded per connection only: 16 such clients held ~1 GiB of the
    array daemon), and a client that reads nothing for the stall time is
    dropped, so a well-behaved one is then served."""
    caplog.set_level(logging.INFO, logger="dstfs.nbd.server")
    srv, backend = slow
    backend.file_slice = lambda offset, length: None  # bytes, as the array answers
    server = srv.server
    server.read_memory.budget = 4 * MiB
    server.reply_stall = 2.0
    tracing = tracemalloc.is_tracing()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        greedy = []
        for _ in range(4):
            r = await srv.raw()
            for i in range(64):  # offset 0 would wait for the backend's gate
                await r.request(CMD_READ, i, (i % 32 + 1) * MiB, MiB)
            greedy.append(r)
        with trio.fail_after(60):
            await trio.testing.wait_all_tasks_blocked(0.2)  # every sender is stuck
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        if not tracing:
            tracemalloc.stop()
    # The cap, plus what the kernel's socket buffers took off the server.
    assert held < 4 * MiB + 2 * MiB, f"{held / MiB:.1f} MiB held"
    await poll(lambda: server.stats.active == 0)  # each dropped for its stall
    assert server.read_memory.bytes == 0
    gone = [r.getMessage() for r in caplog.records if "client gone" in r.getMessage()]
    assert len(gone) == 4 and all("read nothing for 2 s" in m for m in gone), gone
    for r in greedy:
        await r.until_closed()
    good = await srv.raw()
    assert await good.call(CMD_READ, MiB, 4 * KiB) == (0, bytes(4 * KiB))
