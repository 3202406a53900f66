"""No peer takes `dstfs serve` down or its memory away: the handshake
deadline, the connection limit, running out of descriptors on accept, and
WRITE payloads that wait for memory instead of committing it per header.
In-process servers where the server's own counters tell; `dstfs serve` in a
child process where its VmRSS or its file descriptor limit matter."""

from __future__ import annotations

import contextlib
import random
import resource
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from helpers.procs import dstfs_server, rss_kib
from test_server import (
    CMD_READ,
    CMD_WRITE,
    OPT_LIST,
    REQUEST_MAGIC,
    Raw,
    Srv,
    _blocking_handshake,
    bystander,
    poll,
    serving,
)

from dstfs.backends.file import FileBackend
from dstfs.nbd.server import Export

KiB, MiB = 1024, 1024 * 1024
SYSTEM_PYTHON = "/usr/bin/python3"  # where the libnbd bindings are


@contextlib.asynccontextmanager
async def server(tmp_path: Path, **limits: object):
    backend = FileBackend.create(str(tmp_path / "disk.img"), 128 * MiB)
    try:
        async with serving(Export("", backend), path=tmp_path / "disk.img") as srv:
            for key, value in limits.items():
                setattr(srv.server, key, value)
            yield srv
    finally:
        await backend.aclose()


# ---------------------------------------------------------------- handshake deadline


async def test_a_silent_client_is_closed_at_the_handshake_deadline(tmp_path: Path) -> None:
    async with server(tmp_path, handshake_timeout=0.5) as srv, bystander(srv):
        silent = await Raw.connect(srv.port)
        await silent.recv(18)  # the greeting, then nothing from us
        slow = await Raw.connect(srv.port)
        await slow.greet()
        await slow.option(OPT_LIST)  # options, but never GO
        t0 = trio.current_time()
        assert await silent.until_closed(10) == b""
        await slow.until_closed(10)  # the LIST replies, then the close
        assert trio.current_time() - t0 < 5
        assert srv.server.stats.handshake_timeouts == 2
        # A connection past GO has no deadline.
        done = await srv.raw()
        await trio.sleep(0.7)
        assert await done.call(CMD_READ, 0, 512) == (0, bytes(512))


# ---------------------------------------------------------------- connection limit


async def test_connections_over_the_limit_are_closed_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with server(tmp_path, max_connections=3) as srv:
        first = [await srv.raw() for _ in range(3)]
        extra = await Raw.connect(srv.port)
        assert await extra.until_closed(5) == b""  # not even a greeting
        assert srv.server.stats.refused == 1
        assert "refused: 3 connections already" in caplog.text
        for r in first:  # the three are served as before
            assert await r.call(CMD_READ, 0, 512) == (0, bytes(512))
        await first[0].aclose()
        await poll(lambda: srv.server.stats.active == 2)
        again = await srv.raw()
        assert await again.call(CMD_READ, 0, 512) == (0, bytes(512))


# ---------------------------------------------------------------- memory for payloads


async def _bare_write_headers(srv: Srv, count: int, length: int) -> list[Raw]:
    """`count` connections past GO, each sending a WRITE header whose
    `length`-byte payload does not come; each header is seen by the server
    (given memory or waiting for it) before the next is sent."""
    out = []
    for i in range(count):
        r = await srv.raw()
        seen = srv.server.pool.reserved + srv.server.memory_waiters
        await r.request(CMD_WRITE, i, 0, length)
        await poll(lambda seen=seen: srv.server.pool.reserved + srv.server.memory_waiters > seen)
        out.append(r)
    return out


async def test_large_payloads_wait_for_memory_and_small_ones_go_on(tmp_path: Path) -> None:
    async with server(tmp_path) as srv, bystander(srv):
        pool = srv.server.pool
        pool.cap, pool.idle = 64 * MiB, 0.2
        bare = await _bare_write_headers(srv, 12, 32 * MiB)
        # Two hold the cap (mapped, not committed); ten wait.
        assert pool.reserved == 64 * MiB and srv.server.memory_waiters == 10
        assert pool.mapped < 66 * MiB
        # The first waiter gets memory once a holder finishes.
        data = random.randbytes(32 * MiB)
        await bare[0].send(data)
        assert (await bare[0].reply())[:2] == (0, 0)
        with trio.fail_after(20):
            await bare[2].send(data[::-1])
            assert (await bare[2].reply())[:2] == (2, 0)
        for r in bare:
            await r.aclose()
        # Idle memory is given back: no buffer stays mapped.
        await poll(lambda: pool.reserved == 0 and pool.mapped == 0)


async def test_a_stalled_large_payload_is_dropped(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("dstfs.nbd.server.PAYLOAD_STALL", 0.3)
    async with server(tmp_path) as srv:
        (r,) = await _bare_write_headers(srv, 1, 8 * MiB)
        await r.send(bytes(1 * MiB))
        assert await r.until_closed(5) == b""
        await poll(lambda: srv.server.pool.reserved == 0)


# ---------------------------------------------------------------- dstfs serve under abuse


def _connect_past_go(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    _blocking_handshake(s)
    return s


def _libnbd_read(uri: str) -> None:
    """A normal client (libnbd, strict) reads, with a deadline."""
    if subprocess.run([SYSTEM_PYTHON, "-c", "import nbd"], capture_output=True).returncode:
        pytest.skip("libnbd Python bindings missing")
    code = (
        "import nbd, sys; h = nbd.NBD(); h.connect_uri(sys.argv[1]); "
        "assert h.pread(4096, 4096) == bytes(4096); h.shutdown()"
    )
    subprocess.run([SYSTEM_PYTHON, "-c", code, uri], check=True, timeout=30)


def test_emfile_on_accept_refuses_and_goes_on(tmp_path: Path) -> None:
    """With few descriptors, connections past the limit are refused and
    logged; once they go, the server serves again."""
    log = tmp_path / "serve.log"

    def few_fds() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))

    with (
        log.open("wb") as err,
        dstfs_server(tmp_path / "d.img", "64M", preexec_fn=few_fds, stderr=err) as (
            uri,
            proc,
        ),
    ):
        port = int(uri.rsplit(":", 1)[1].split("/")[0])
        held: list[socket.socket] = []
        try:
            refused = 0
            for _ in range(80):
                s = socket.create_connection(("127.0.0.1", port), timeout=10)
                held.append(s)
                if not s.recv(18, socket.MSG_WAITALL):
                    refused += 1
                    if refused >= 3:
                        break
            assert refused >= 3, "no connection was refused: the limit did not bite"
            assert proc.poll() is None
        finally:
            for s in held:
                s.close()
        deadline = time.monotonic() + 20
        while True:  # the server's refusal back-off ends; it serves again
            try:
                with _connect_past_go(port) as s:
                    break
            except (OSError, AssertionError):
                assert time.monotonic() < deadline, "never served again"
                time.sleep(0.1)
        assert proc.poll() is None
    assert "refused connection" in log.read_text()


@contextlib.contextmanager
def _sockets() -> Iterator[list[socket.socket]]:
    held: list[socket.socket] = []
    try:
        yield held
    finally:
        for s in held:
            s.close()


#: RSS the server may grow by under 1000 idle connections plus 48 bare 32
#: MiB WRITE headers (before: 32 MiB committed per header, 1.5 GB).
RSS_BOUND_MIB = 64


def test_rss_bounded_under_idle_connections_and_bare_write_headers(tmp_path: Path) -> None:
    """Acceptance 4: 1000 idle connections and 48 bare 32 MiB WRITE headers;
    the server stays under RSS_BOUND_MIB of growth and serves libnbd throughout."""
    extra = ["--max-connections", "1100"]
    with dstfs_server(tmp_path / "d.img", "64M", extra=extra) as (uri, proc), _sockets() as held:
        port = int(uri.rsplit(":", 1)[1].split("/")[0])
        _libnbd_read(uri)
        base = peak = rss_kib(proc.pid)
        for i in range(1000):
            held.append(_connect_past_go(port))
            if i % 100 == 0:
                peak = max(peak, rss_kib(proc.pid))
        _libnbd_read(uri)
        header = struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_WRITE, 1, 0, 32 * MiB)
        for s in held[:48]:
            s.sendall(header + bytes(64 * KiB))  # a header and a taste of payload
        time.sleep(0.5)
        peak = max(peak, rss_kib(proc.pid))
        _libnbd_read(uri)
        peak = max(peak, rss_kib(proc.pid))
        grown = (peak - base) // 1024
        print(f"RSS {base // 1024} MiB at start, grew by {grown} MiB")
        assert grown < RSS_BOUND_MIB, f"RSS grew by {grown} MiB"
        assert proc.poll() is None


def test_serve_flags_are_checked() -> None:
    from dstfs.cli import main

    for argv in (["--max-connections", "0"], ["--handshake-timeout", "-1"]):
        with pytest.raises(SystemExit) as e:
            main(["serve", "/nonexistent", *argv])
        assert e.value.code == 2


# ---------------------------------------------------------------- the pool itself


def test_payload_pool_classes_cap_and_trim() -> None:
    from dstfs.iotypes import PayloadPool

    pool = PayloadPool(cap=64 * MiB, small=1 * MiB, idle=1.0)
    a = pool.take(20 * MiB)  # class 32 MiB
    b = pool.take(17 * MiB)
    assert a is not None and b is not None and len(a) == 20 * MiB
    assert pool.reserved == 64 * MiB
    assert pool.take(2 * MiB) is None  # over the cap: wait
    small = pool.take(1 * MiB)  # never refused
    assert small is not None and pool.reserved == 64 * MiB
    pool.give(a)
    c = pool.take(30 * MiB)  # the free 32 MiB buffer serves it
    assert c is not None and pool.mapped == 64 * MiB + 1 * MiB
    for buf in (b, c, small):
        pool.give(buf)
    assert pool.reserved == 0
    assert pool.trim(now=time.monotonic()) == 0  # not idle long enough
    assert pool.trim(now=time.monotonic() + 2) == 65 * MiB and pool.mapped == 0
