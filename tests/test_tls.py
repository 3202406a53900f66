"""TLS (NBD_OPT_STARTTLS) and `--allow`, both ways and with programs written
elsewhere: nbdinfo, nbdcopy and qemu-img against `dstfs serve --tls-cert`,
the dstfs client and a dstfs mount against `nbdkit --tls=require`, client
certificates with `--tls-ca`, plain clients and untrusted servers refused,
a node whose server is not trusted failed at once. Certificates are made by
the openssl command line (tests/helpers/certs.py)."""

from __future__ import annotations

import errno
import ipaddress
import json
import logging
import os
import random
import socket
import ssl
import struct
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from helpers.certs import client_dir, make_pki
from helpers.mounts import MountFailed, mounted
from helpers.procs import DSTFS, dstfs_server, nbdkit_proc, need
from test_server import (
    CMD_READ,
    OPT_EXPORT_NAME,
    OPT_GO,
    OPT_INFO,
    OPT_LIST,
    OPT_STARTTLS,
    OPT_STRUCTURED,
    REP_ACK,
    REP_ERR_INVALID,
    Closed,
    Raw,
)

from dstfs.backends.file import FileBackend
from dstfs.backends.nbd import NbdBackend
from dstfs.iotypes import NotRetryable
from dstfs.nbd.client import open_client
from dstfs.nbd.server import Export, NbdServer
from dstfs.nbd.tls import TLSTransport, server_context
from dstfs.node import Node, State
from dstfs.serve import parse_allow, warn_if_plain_text
from dstfs.uri import parse_uri

KiB, MiB = 1024, 1024 * 1024
SIZE = 64 * MiB
REP_ERR_TLS_REQD = 2**31 + 5


@pytest.fixture(scope="module")
def untrusted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Certificates from another CA, which the clients do not trust."""
    return make_pki(tmp_path_factory.mktemp("tls") / "other", cn="untrusted CA")


def run(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    need(argv[0])
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def tls_args(pki: Path, ca: bool = False, mode: str | None = None) -> list[str]:
    args = ["--tls-cert", str(pki / "server-cert.pem"), "--tls-key", str(pki / "server-key.pem")]
    if ca:
        args += ["--tls-ca", str(pki / "ca-cert.pem")]
    if mode:
        args += ["--tls", mode]
    return args


def nbds(uri: str, certs: Path | None = None, **params: str) -> str:
    """The nbds:// form of a dstfs_server / nbdkit nbd:// URI."""
    assert uri.startswith("nbd://")
    query = {**({"tls-certificates": str(certs)} if certs else {}), **params}
    tail = "?" + "&".join(f"{k}={v}" for k, v in query.items()) if query else ""
    base = uri.replace("nbd://", "nbds://", 1)
    return base + ("" if base.count("/") > 2 else "/") + tail


# ---------------------------------------------------------------- in-process servers


@asynccontextmanager
async def serving(server: NbdServer, port: int = 0) -> AsyncIterator[int]:
    """`server` on 127.0.0.1 for the block's duration; yields the port."""
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(server.serve_tcp, "127.0.0.1", port)
        try:
            yield listeners[0].socket.getsockname()[1]
        finally:
            nursery.cancel_scope.cancel()


@pytest.fixture
async def backend(tmp_path: Path) -> AsyncIterator[FileBackend]:
    b = FileBackend.create(str(tmp_path / "disk.img"), SIZE)
    yield b
    await b.aclose()


def tls_server(backend: FileBackend, pki: Path, **kw: object) -> NbdServer:
    ctx = server_context(str(pki / "server-cert.pem"), str(pki / "server-key.pem"))
    kw.setdefault("tls_required", True)
    return NbdServer([Export("", backend)], tls=ctx, **kw)  # type: ignore[arg-type]


def client_ssl(pki: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki / "ca-cert.pem"))
    return ctx


async def raw_starttls(r: Raw, pki: Path) -> None:
    """STARTTLS on a raw client past the client flags, then TLS under it."""
    await r.option(OPT_STARTTLS)
    assert (await r.opt_reply(OPT_STARTTLS))[0] == REP_ACK
    assert not r.buf
    r.stream = trio.SSLStream(r.stream, client_ssl(pki), server_hostname="127.0.0.1")
    await r.stream.do_handshake()


# ---------------------------------------------------------------- tools -> dstfs serve


def test_nbdinfo_and_nbdcopy_over_tls(tmp_path: Path, pki: Path, cdir: Path) -> None:
    need("nbdcopy")
    src, out = tmp_path / "src.bin", tmp_path / "out.bin"
    data = os.urandom(32 * MiB)
    src.write_bytes(data)
    with dstfs_server(tmp_path / "d.img", "64M", tls_args(pki)) as (uri, _):
        turi = nbds(uri, cdir)
        text = run("nbdinfo", turi).stdout
        assert "with TLS" in text, text
        (export,) = json.loads(run("nbdinfo", "--json", turi).stdout)["exports"]
        assert export["export-size"] == SIZE
        assert run("nbdcopy", str(src), turi).returncode == 0
        assert run("nbdcopy", turi, str(out)).returncode == 0
        # A plain client gets nothing: the server requires TLS.
        plain = run("nbdinfo", uri)
        assert plain.returncode != 0 and "export-size" not in plain.stdout
    assert out.read_bytes()[: len(data)] == data


def test_qemu_img_over_tls(tmp_path: Path, pki: Path, cdir: Path) -> None:
    need("qemu-img")
    src, exported, out = tmp_path / "src.bin", tmp_path / "export.img", tmp_path / "out.raw"
    data = os.urandom(16 * MiB)
    src.write_bytes(data)
    creds = f"tls-creds-x509,id=tls0,dir={cdir},endpoint=client"
    with dstfs_server(exported, "16M", tls_args(pki)) as (uri, _):
        port = uri.split(":")[2].split("/")[0]
        opts = f"driver=nbd,host=127.0.0.1,port={port},tls-creds=tls0"
        w = run("qemu-img", "convert", "-n", "--object", creds, "-f", "raw", str(src),
                "--target-image-opts", opts)  # fmt: skip
        assert w.returncode == 0, w.stderr
        r = run("qemu-img", "convert", "--object", creds, "--image-opts", opts, "-O", "raw",
                str(out))  # fmt: skip
        assert r.returncode == 0, r.stderr
        # Without TLS credentials qemu gets no export.
        bad = run("qemu-img", "info", uri)
        assert bad.returncode != 0
    assert exported.read_bytes() == data
    assert out.read_bytes() == data


def test_client_certificates_required_with_tls_ca(
    tmp_path: Path, pki: Path, cdir: Path, cdir_no_cert: Path
) -> None:
    need("nbdinfo")
    with dstfs_server(tmp_path / "d.img", "64M", tls_args(pki, ca=True)) as (uri, _):
        ok = run("nbdinfo", "--json", nbds(uri, cdir))
        assert ok.returncode == 0, ok.stderr
        refused = run("nbdinfo", "--json", nbds(uri, cdir_no_cert))
        assert refused.returncode != 0 and "export-size" not in refused.stdout

        async def dstfs_client(certs: Path) -> None:
            async with open_client(nbds(uri, certs)) as c:
                assert bytes(await c.pread(0, 4096)) == bytes(4096)

        trio.run(dstfs_client, cdir)
        with pytest.raises(OSError):  # the server's verdict: no certificate
            trio.run(dstfs_client, cdir_no_cert)


# ---------------------------------------------------------------- the protocol, raw


async def test_require_mode_refuses_every_option_but_starttls(
    backend: FileBackend, pki: Path
) -> None:
    server = tls_server(backend, pki)
    async with serving(server) as port:
        r = await Raw.connect(port)
        await r.greet()
        go = struct.pack(">IH", 0, 0)
        for opt, data in [(OPT_LIST, b""), (OPT_INFO, go), (OPT_GO, go), (OPT_STRUCTURED, b""),
                          (99, b"x")]:  # fmt: skip
            await r.option(opt, data)
            assert (await r.opt_reply(opt))[0] == REP_ERR_TLS_REQD, opt
        # EXPORT_NAME cannot be refused: the connection closes, no data.
        await r.option(OPT_EXPORT_NAME, b"")
        assert await r.until_closed() == b""
        # A dstfs client with a plain URI is told why, and does not retry.
        with pytest.raises(NotRetryable, match="requires TLS"):
            async with open_client(f"nbd://127.0.0.1:{port}"):
                pass
        # With TLS the same server serves.
        r = await Raw.connect(port)
        await r.greet()
        await raw_starttls(r, pki)
        assert (await r.go())["size"] == SIZE
        assert await r.call(CMD_READ, 0, 512) == (0, bytes(512))


async def test_starttls_details(backend: FileBackend, pki: Path) -> None:
    """TLS by choice (allow): plain clients are served; STARTTLS with data
    or twice is ERR_INVALID; what was negotiated before TLS is forgotten."""
    server = tls_server(backend, pki, tls_required=False)
    async with serving(server) as port:
        async with open_client(f"nbd://127.0.0.1:{port}") as plain:
            assert isinstance(plain.io.transport, TLSTransport) is False
            await plain.pwrite(0, b"p" * 4096)
        r = await Raw.connect(port)
        await r.greet()
        await r.option(OPT_STARTTLS, b"junk")
        assert (await r.opt_reply(OPT_STARTTLS))[0] == REP_ERR_INVALID
        await r.option(OPT_STRUCTURED)
        assert (await r.opt_reply(OPT_STRUCTURED))[0] == REP_ACK
        await raw_starttls(r, pki)
        await r.option(OPT_STARTTLS)
        assert (await r.opt_reply(OPT_STARTTLS))[0] == REP_ERR_INVALID
        await r.go()
        # Structured replies were negotiated before TLS only: a simple reply.
        assert await r.call(CMD_READ, 0, 4096) == (0, b"p" * 4096)


async def test_plain_bytes_behind_starttls_close_the_connection(
    backend: FileBackend, pki: Path
) -> None:
    """Bytes sent in plain text after STARTTLS, before the handshake, would
    be read as if inside TLS (an injection): the server closes instead."""
    server = tls_server(backend, pki)
    async with serving(server) as port:
        r = await Raw.connect(port)
        await r.greet()
        go = struct.pack(">QII", 0x49484156454F5054, OPT_GO, 6) + bytes(6)
        await r.send(struct.pack(">QII", 0x49484156454F5054, OPT_STARTTLS, 0) + go)
        with pytest.raises(Closed):
            await r.opt_reply(OPT_STARTTLS)
            await r.recv(1)
        assert server.stats.protocol_errors == 1


# ---------------------------------------------------------------- the dstfs client


async def test_dstfs_client_over_tls_batches_and_scatters(
    backend: FileBackend, pki: Path, cdir: Path, tmp_path: Path
) -> None:
    server = tls_server(backend, pki)
    async with serving(server) as port:
        uri = nbds(f"nbd://127.0.0.1:{port}", cdir)
        async with open_client(uri) as c:
            assert isinstance(c.io.transport, TLSTransport)
            blobs = [random.randbytes(random.choice((512, 4 * KiB, 300 * KiB))) for _ in range(64)]
            async with trio.open_nursery() as n:  # many requests in flight at once
                for i, b in enumerate(blobs):
                    n.start_soon(c.pwrite, i * MiB, b)
            got: dict[int, bytes] = {}

            async def read(i: int) -> None:
                got[i] = bytes(await c.pread(i * MiB, len(blobs[i])))

            async with trio.open_nursery() as n:
                for i in range(len(blobs)):
                    n.start_soon(read, i)
            assert all(got[i] == b for i, b in enumerate(blobs))
            big = random.randbytes(8 * MiB)
            await c.pwrite(40 * MiB, big)
            views = [memoryview(bytearray(n)) for n in (1, 4095, 3 * MiB, 5 * MiB - 4096)]
            await c.pread_into(40 * MiB, views)  # scattered, received in place
            assert b"".join(bytes(v) for v in views) == big
            await c.flush()
        # Block status has a connection of its own: TLS too.
        async with trio.open_nursery() as nursery:
            nb = await NbdBackend.open(parse_uri(uri), nursery)
            assert nb.can_block_status
            assert (await nb.block_status(40 * MiB, MiB))[0][1] == 0  # data
            # Past the end of blob 49 (at most 300 KiB): a hole.
            assert (await nb.block_status(49 * MiB + 512 * KiB, 256 * KiB))[0][1] & 1
            await nb.aclose()


async def test_nbds_unix(backend: FileBackend, pki: Path, cdir: Path, tmp_path: Path) -> None:
    server = tls_server(backend, pki)
    sock = str(tmp_path / "s")
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve_unix, sock)
        base = f"nbds+unix:///?socket={sock}&tls-certificates={cdir}"
        for extra in ("", "&tls-hostname=localhost"):  # no name to check, or this one
            async with open_client(base + extra) as c:
                assert isinstance(c.io.transport, TLSTransport)
                assert bytes(await c.pread(0, 512)) == bytes(512)
        with pytest.raises(NotRetryable, match="certificate verify failed"):
            async with open_client(base + "&tls-hostname=wrong.test"):
                pass
        nursery.cancel_scope.cancel()


async def test_dstfs_client_refuses_an_untrusted_server(
    backend: FileBackend, untrusted: Path, cdir: Path, pki: Path
) -> None:
    server = tls_server(backend, untrusted)
    async with serving(server) as port:
        base = f"nbd://127.0.0.1:{port}"
        with pytest.raises(NotRetryable, match="certificate verify failed") as info:
            async with open_client(nbds(base, cdir)):
                pass
        assert info.value.errno == errno.EACCES
        # Trusted CA, wrong name: refused too.
        good = tls_server(backend, pki)
        async with serving(good) as port2:
            uri = nbds(f"nbd://127.0.0.1:{port2}", cdir, **{"tls-hostname": "other.test"})
            with pytest.raises(NotRetryable, match="certificate verify failed"):
                async with open_client(uri):
                    pass
        # Told not to verify, it connects (still TLS).
        async with open_client(nbds(base, cdir, **{"tls-verify-peer": "false"})) as c:
            assert isinstance(c.io.transport, TLSTransport)
        # nbds never falls back to plain text with a server without TLS.
        plain = NbdServer([Export("", backend)])
        async with serving(plain) as port3:
            with pytest.raises(NotRetryable, match="refuses TLS"):
                async with open_client(nbds(f"nbd://127.0.0.1:{port3}", cdir)):
                    pass


async def test_node_fails_at_once_when_its_server_is_no_longer_trusted(
    backend: FileBackend, pki: Path, untrusted: Path, cdir: Path, caplog
) -> None:
    """The server comes back with a certificate the client does not trust:
    the node is `failed` at once (not after its 30 s timeout), says why, and
    does not keep retrying."""
    async with trio.open_nursery() as nursery:
        async with serving(tls_server(backend, pki)) as port:
            spec = parse_uri(nbds(f"nbd://127.0.0.1:{port}", cdir))
            nb = await NbdBackend.open(spec, nursery)
            node = Node(spec, nb, nb.size, nursery)
            await node.write(0, b"t" * 4096)
            nb._clients[0].abort()  # the server goes away
        async with serving(tls_server(backend, untrusted), port):
            node.lost("the server restarted")
            with trio.fail_after(10):
                while node.state != State.FAILED:
                    await trio.sleep(0.02)
            with pytest.raises(OSError) as info:
                await node.read(0, 4096)
            assert info.value.errno == errno.EIO
            assert "certificate verify failed" in str(info.value)
            await trio.sleep(0.5)
            assert node._reconnecting is False  # no retry loop left behind
        assert any("not retrying" in r.getMessage() for r in caplog.records)
        await nb.aclose()
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------- dstfs -> nbdkit


def test_dstfs_mounts_an_nbdkit_tls_node(
    tmp_path: Path, pki: Path, cdir: Path, untrusted: Path
) -> None:
    with nbdkit_proc(
        "--tls=require", f"--tls-certificates={pki}", "--tls-verify-peer", "memory", "64M"
    ) as (uri, _):
        tls_uri = nbds(uri, cdir)

        async def check() -> None:
            async with open_client(tls_uri) as c:
                await c.pwrite(MiB, b"k" * 8192)
                assert bytes(await c.pread(MiB, 8192)) == b"k" * 8192
            with pytest.raises(NotRetryable, match="requires TLS"):
                async with open_client(uri):
                    pass

        trio.run(check)
        with mounted(tmp_path, nodes=[tls_uri]) as mnt:
            disk = mnt / "disk.img"
            data = os.urandom(MiB)
            with disk.open("r+b") as f:
                f.seek(3 * MiB)
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            with disk.open("rb") as f:
                f.seek(MiB)
                assert f.read(8192) == b"k" * 8192
                f.seek(3 * MiB)
                assert f.read(MiB) == data
            assert "R: 127.0.0.1:" in (mnt / "n-0" / "type").read_text()
        # A server the client does not trust: the mount fails, one line.
        other = client_dir(untrusted, tmp_path / "other-client")
        with pytest.raises(MountFailed) as info, mounted(tmp_path, nodes=[nbds(uri, other)]):
            pass
        lines = info.value.result.stderr.strip().splitlines()
        assert len(lines) == 1 and "certificate verify failed" in lines[0], lines


# ---------------------------------------------------------------- --allow


async def test_allow_closes_other_peers_before_the_greeting(backend: FileBackend) -> None:
    server = NbdServer([Export("", backend)], allow=[parse_allow("127.0.0.2/32")])
    async with serving(server) as port:
        r = await Raw.connect(port)
        assert await r.until_closed() == b""
        assert server.stats.disallowed == 1 and server.stats.connections == 0
    server = NbdServer(
        [Export("", backend)], allow=[parse_allow("::1"), parse_allow("127.0.0.0/8")]
    )
    async with serving(server) as port:
        async with open_client(f"nbd://127.0.0.1:{port}") as c:
            assert bytes(await c.pread(0, 512)) == bytes(512)
        assert server.stats.disallowed == 0


def test_allow_matches_addresses() -> None:
    server = NbdServer(
        [Export("", object())],  # type: ignore[arg-type]
        allow=[parse_allow("192.0.2.0/24"), parse_allow("[2001:db8::]/32")],
    )
    assert server.allowed("192.0.2.77")
    assert server.allowed("::ffff:192.0.2.1")  # IPv4 on a dual-stack socket
    assert server.allowed("2001:db8::1")
    assert not server.allowed("192.0.3.1")
    assert not server.allowed("2001:db9::1")
    assert not server.allowed("not an address")
    assert parse_allow("10.1.2.3/8") == ipaddress.ip_network("10.0.0.0/8")
    with pytest.raises(ValueError, match="ADDR"):
        parse_allow("example.com")


def test_serve_allow_from_the_command_line(tmp_path: Path) -> None:
    need("nbdinfo")
    with dstfs_server(
        tmp_path / "d.img", "1M", ["--allow", "127.0.0.2/32"], stderr=subprocess.PIPE, text=True
    ) as (uri, proc):
        assert run("nbdinfo", uri).returncode != 0
    assert "refused: not in --allow" in proc.stderr.read()  # type: ignore[union-attr]
    with dstfs_server(tmp_path / "d.img", None, ["--allow", "::1", "--allow", "127.0.0.0/8"]) as (
        uri,
        _,
    ):
        assert run("nbdinfo", uri).returncode == 0


def test_ipv6_allow(tmp_path: Path) -> None:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")

    async def main() -> None:
        backend = FileBackend.create(str(tmp_path / "d.img"), MiB)
        for allow, served in (("::1/128", True), ("fe80::/10", False)):
            server = NbdServer([Export("", backend)], allow=[parse_allow(allow)])
            async with trio.open_nursery() as nursery:
                listeners = await nursery.start(server.serve_tcp, "::1", 0)
                port = listeners[0].socket.getsockname()[1]
                if served:
                    async with open_client(f"nbd://[::1]:{port}") as c:
                        assert c.size == MiB
                else:
                    with pytest.raises(OSError):
                        async with open_client(f"nbd://[::1]:{port}"):
                            pass
                    assert server.stats.disallowed == 1
                nursery.cancel_scope.cancel()
        await backend.aclose()

    trio.run(main)


# ---------------------------------------------------------------- the command line


def test_plain_text_warning(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="dstfs.serve"):
        assert not warn_if_plain_text(["127.0.0.1", "::1"], tls_required=False)
        assert not warn_if_plain_text(["0.0.0.0"], tls_required=True)
        assert not caplog.records
        assert warn_if_plain_text(["127.0.0.1", "0.0.0.0"], tls_required=False)
    (record,) = caplog.records
    assert "0.0.0.0" in record.getMessage() and "plain text" in record.getMessage()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tls", "require"], "--tls require needs --tls-cert and --tls-key"),
        (["--tls-cert", "/nonexistent/c.pem", "--tls-key", "/nonexistent/k.pem"], "TLS files"),
        (["--tls", "off", "--tls-cert", "x"], "--tls off takes no"),
        (["--allow", "nope"], "--allow wants ADDR[/PREFIX]"),
        (["--allow", "10.0.0.0/33"], "--allow wants"),
        (["--export", "x" * 4097], "--export NAME is 4097 bytes: NBD allows 4096"),
    ],
)
def test_bad_serve_options_are_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    res = subprocess.run(
        [*DSTFS, "serve", str(tmp_path / "d.img"), "--size", "1M", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dstfs serve: ") and message in lines[0], lines
    assert not (tmp_path / "d.img").exists()


def test_key_that_does_not_fit_the_certificate(tmp_path: Path, pki: Path, untrusted: Path) -> None:
    cert, key = pki / "server-cert.pem", untrusted / "server-key.pem"
    res = subprocess.run(
        [*DSTFS, "serve", str(tmp_path / "d.img"), "--size", "1M",
         "--tls-cert", str(cert), "--tls-key", str(key)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert res.returncode != 0 and "not usable" in res.stderr, res.stderr


async def test_largest_requests_over_tls(backend: FileBackend, pki: Path, cdir: Path) -> None:
    """A 32 MiB read and write (the largest request) over TLS."""
    server = tls_server(backend, pki)
    async with serving(server) as port, open_client(nbds(f"nbd://127.0.0.1:{port}", cdir)) as c:
        data = random.randbytes(32 * MiB)
        await c.pwrite(0, data)
        assert bytes(await c.pread(0, 32 * MiB)) == data
