"""Property-based fuzzing of `dstfs serve`'s NBD server (hypothesis): option
sequences, requests with edge-case fields, and mutated byte streams of valid
sessions, each sent on a fresh loopback connection to one in-process server
(running in a thread of its own). After every example the server has closed
that connection (or answered it) within a bound, and is alive; after each
test a fresh normal client is served, the payload memory is back to nothing
reserved, the export file has kept its size (no byte past the export) and a
read-only export its bytes. Deterministic for CI: derandomized, bounded
example counts, no deadline (the machine may be busy)."""

from __future__ import annotations

import contextlib
import hashlib
import random
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dstfs.backends.file import FileBackend
from dstfs.nbd.client import open_client
from dstfs.nbd.server import Export, NbdServer

KiB, MiB = 1024, 1024 * 1024
SIZE = 4 * MiB
IHAVEOPT = 0x49484156454F5054
REQUEST_MAGIC = 0x25609513
OPT_GO, OPT_INFO = 7, 6
FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@dataclass
class Running:
    server: NbdServer
    port: int
    path: Path
    ro_path: Path
    ro_digest: str
    alive: threading.Event


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """One server for the module, in a thread with its own trio loop."""
    tmp = tmp_path_factory.mktemp("fuzz")
    path, ro_path = tmp / "disk.img", tmp / "ro.img"
    ro_path.write_bytes(random.Random(1).randbytes(64 * KiB))
    started = threading.Event()
    alive = threading.Event()
    box: dict = {}

    def run() -> None:
        async def main() -> None:
            rw = FileBackend.create(str(path), SIZE)
            ro = FileBackend(str(ro_path), read_only=True)
            server = NbdServer([Export("", rw), Export("ro", ro, read_only=True)])
            server.handshake_timeout = 2.0
            async with trio.open_nursery() as nursery:
                listeners = await nursery.start(server.serve_tcp, "127.0.0.1", 0)
                box["server"], box["port"] = server, listeners[0].socket.getsockname()[1]
                box["cancel"] = nursery.cancel_scope
                box["token"] = trio.lowlevel.current_trio_token()
                alive.set()
                started.set()
            alive.clear()
            await rw.aclose()
            await ro.aclose()

        try:
            trio.run(main)
        finally:
            alive.clear()
            started.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(10) and alive.is_set()
    digest = hashlib.sha256(ro_path.read_bytes()).hexdigest()
    try:
        yield Running(box["server"], box["port"], path, ro_path, digest, alive)
    finally:
        trio.from_thread.run_sync(box["cancel"].cancel, trio_token=box["token"])
        thread.join(10)


def exchange(port: int, data: bytes, limit: float = 10.0) -> None:
    """Send `data`, then our end of the stream; read until the server closes.
    The server must close within `limit` seconds."""
    with socket.create_connection(("127.0.0.1", port), timeout=limit) as s:
        with contextlib.suppress(OSError):  # the server may hang up first
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + limit
        while True:
            assert time.monotonic() < deadline, "the server kept the connection open"
            try:
                if not s.recv(1 << 20):
                    return
            except ConnectionResetError:
                return


def assert_bounded(r: Running) -> None:
    """Alive, and payload memory within its cap (plus one small buffer per connection)."""
    assert r.alive.is_set(), "the server task ended"
    pool = r.server.pool
    assert pool.reserved <= pool.cap and pool.mapped <= pool.cap + 16 * MiB


def check_healthy(r: Running) -> None:
    assert r.alive.is_set(), "the server task ended"

    async def normal_client() -> None:
        with trio.fail_after(10):
            async with open_client(f"nbd://127.0.0.1:{r.port}") as c:
                data = random.randbytes(8 * KiB)
                await c.pwrite(SIZE - len(data), data)
                assert bytes(await c.pread(SIZE - len(data), len(data))) == data

    trio.run(normal_client)
    deadline = time.monotonic() + 10
    while r.server.stats.active or r.server.pool.reserved:
        assert time.monotonic() < deadline, (r.server.stats.active, r.server.pool.reserved)
        time.sleep(0.01)
    assert r.path.stat().st_size == SIZE  # nothing written past the export
    assert hashlib.sha256(r.ro_path.read_bytes()).hexdigest() == r.ro_digest


# ---------------------------------------------------------------- strategies


def option(opt: int, data: bytes) -> bytes:
    return struct.pack(">QII", IHAVEOPT, opt, len(data)) + data


def go_data(name: bytes, infos: list[int]) -> bytes:
    return struct.pack(">I", len(name)) + name + struct.pack(f">H{len(infos)}H", len(infos), *infos)


HANDSHAKE_GO = struct.pack(">I", 3) + option(OPT_GO, go_data(b"", [3]))

options = st.one_of(
    st.builds(
        option,
        st.sampled_from([1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 0, 0xFFFFFFFF]),
        st.binary(max_size=64),
    ),
    st.builds(
        lambda opt, name, infos: option(opt, go_data(name, infos)),
        st.sampled_from([OPT_GO, OPT_INFO]),
        st.sampled_from([b"", b"ro", b"nope", b"\xff\xfe"]),
        st.lists(st.integers(0, 0xFFFF), max_size=4),
    ),
    # A length field that lies about the data behind it.
    st.builds(
        lambda opt, n, data: struct.pack(">QII", IHAVEOPT, opt, n) + data,
        st.sampled_from([3, 6, 7, 9, 10]),
        st.sampled_from([0, 1, 4, 1 << 16, 1 << 17, 0xFFFFFFFF]),
        st.binary(max_size=32),
    ),
)

OFFSETS = st.one_of(
    st.sampled_from([0, 1, 511, 512, SIZE - 4096, SIZE - 1, SIZE, SIZE + 1, 2**63, 2**64 - 1]),
    st.integers(0, 2**64 - 1),
)
LENGTHS = st.one_of(
    st.sampled_from([0, 1, 512, 4096, 65536, SIZE, 32 * MiB, 64 * MiB, 64 * MiB + 1, 2**32 - 1]),
    st.integers(0, 2**32 - 1),
)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    cmd = draw(st.one_of(st.integers(0, 10), st.integers(0, 0xFFFF)))
    flags = draw(st.one_of(st.sampled_from([0, 1, 2, 4, 8, 16]), st.integers(0, 0xFFFF)))
    offset, length = draw(OFFSETS), draw(LENGTHS)
    header = struct.pack(
        ">IHHQQI", REQUEST_MAGIC, flags, cmd, draw(st.integers(0, 2**64 - 1)), offset, length
    )
    # A WRITE carries its payload when it is small, else only a piece of it.
    payload = b""
    if cmd == 1:
        payload = bytes(length) if length <= 64 * KiB else bytes(draw(st.integers(0, 4096)))
    return header + payload


@st.composite
def valid_session(draw: st.DrawFn) -> bytes:
    """A well-formed session: flags, GO, some in-range requests, DISC."""
    out = [HANDSHAKE_GO]
    for i in range(draw(st.integers(1, 6))):
        cmd = draw(st.sampled_from([0, 1, 3, 4, 6]))
        length = draw(st.sampled_from([512, 4096, 8192]))
        offset = draw(st.integers(0, (SIZE - length) // 512)) * 512
        out.append(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, cmd, i, offset, length))
        if cmd == 1:
            out.append(bytes([i + 1]) * length)
    out.append(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, 2, 99, 0, 0))
    return b"".join(out)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(valid_session()))
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "overwrite"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        elif kind == "truncate":
            del data[at:]
        else:
            chunk = draw(st.binary(min_size=1, max_size=8))
            data[at : at + len(chunk)] = chunk
    return bytes(data)


# ---------------------------------------------------------------- the properties


@FUZZ
@given(st.lists(options, max_size=6), st.booleans())
def test_fuzz_options(running: Running, opts: list[bytes], go_after: bool) -> None:
    data = struct.pack(">I", 3) + b"".join(opts)
    if go_after:
        data += option(OPT_GO, go_data(b"", []))
    exchange(running.port, data)
    assert_bounded(running)


@FUZZ
@given(st.lists(requests(), min_size=1, max_size=6))
def test_fuzz_requests(running: Running, reqs: list[bytes]) -> None:
    exchange(running.port, HANDSHAKE_GO + b"".join(reqs))
    assert_bounded(running)


@FUZZ
@given(mutated())
def test_fuzz_mutated_sessions(running: Running, data: bytes) -> None:
    exchange(running.port, data)
    assert_bounded(running)


@pytest.fixture(autouse=True)
def _healthy_after(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "running" in request.fixturenames:
        check_healthy(request.getfixturevalue("running"))
