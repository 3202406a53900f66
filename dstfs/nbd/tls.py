"""TLS for NBD (STARTTLS): contexts for both ends and a `Transport` that
speaks TLS over the connection's own socket.

Rules:
- Only connections that negotiated TLS pay for it: the plain socket
  transport is untouched; after NBD_OPT_STARTTLS is acknowledged,
  `start_tls()` wraps the same socket and `SocketIO` gets the TLS transport
  in its place (the byte stream has no bytes in flight at that moment: the
  codec refuses plain bytes buffered past STARTTLS).
- The TLS transport is a non-blocking `ssl.SSLSocket` driven like the plain
  one: what it would block on (the handshake, a key update) is remembered,
  so `wait_readable()` / `wait_writable()` wait for what TLS really needs,
  and decrypted bytes already held are returned without waiting.
- It has no sendfile: file slices are read and sent as bytes (sockio).
  Small buffers are joined up to a TLS record; large ones go as they are.
- TLS 1.2 or later, no renegotiation. A server with a CA verifies and
  requires client certificates; a client verifies the server's chain and
  name unless told not to.
- Failures: a certificate not trusted (either way), an alert or a broken
  TLS record are `tls_error` on the transport (kept, so the handshake code
  can tell them from a peer that merely went away) and an OSError(EPROTO)
  to the caller; an end of stream is 0 bytes, as on a plain socket.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import ssl
from collections.abc import Sequence

import trio

from dstfs.iotypes import Buffer, ConnectionLost
from dstfs.nbd.transport import SocketTransport

#: Small buffers are joined into one TLS write up to this many bytes (a
#: full TLS record).
_JOIN = 16 * 1024
#: The certificate files of a client's `tls-certificates=DIR` (GnuTLS names,
#: as nbdkit, qemu and libnbd use them).
CA_CERT, CLIENT_CERT, CLIENT_KEY = "ca-cert.pem", "client-cert.pem", "client-key.pem"


def describe_ssl_error(e: ssl.SSLError) -> str:
    """One line for a user: the verification message or OpenSSL's reason."""
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {e.verify_message}"
    if e.reason:
        return e.reason.lower().replace("_", " ")
    return str(e)


def server_context(cert: str, key: str, ca: str | None = None) -> ssl.SSLContext:
    """The server's context: its certificate chain and key; with `ca`,
    client certificates are required and verified against it. OSError or
    ssl.SSLError for files that are missing or do not fit."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    ctx.load_cert_chain(cert, key)
    if ca is not None:
        ctx.load_verify_locations(cafile=ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(certificates: str | None, verify: bool, check_name: bool) -> ssl.SSLContext:
    """The client's context. `certificates` is a directory that may hold
    ca-cert.pem (trusted instead of the system's CAs) and client-cert.pem
    with client-key.pem (presented to a server that asks)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    ca = os.path.join(certificates, CA_CERT) if certificates else None
    if certificates is not None and not os.path.isdir(certificates):
        raise FileNotFoundError(errno.ENOENT, f"tls-certificates: no directory {certificates}")
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif ca is not None and os.path.exists(ca):
        ctx.load_verify_locations(cafile=ca)
    else:
        ctx.load_default_certs()
    ctx.check_hostname = verify and check_name
    if certificates is not None:
        cert = os.path.join(certificates, CLIENT_CERT)
        key = os.path.join(certificates, CLIENT_KEY)
        if os.path.exists(cert):
            ctx.load_cert_chain(cert, key)
    return ctx


def _next_write(bufs: Sequence[Buffer], i: int, off: int) -> tuple[Buffer, int, int]:
    """The bytes of one TLS write starting at byte `off` of bufs[i], and
    where the next one starts. A large buffer goes as it is; small ones are
    joined with each other and with the head of the next large one up to one
    TLS record, so a reply's header costs no record (and system call) of its
    own. Writes depend only on the bytes from their start: a write that
    would block is retried by the caller from that byte, and comes out the
    same, as OpenSSL requires."""
    first = bufs[i] if not off else memoryview(bufs[i])[off:]
    if len(first) >= _JOIN or i + 1 == len(bufs):
        return first, i + 1, 0
    parts, size = [first], len(first)
    i += 1
    while i < len(bufs) and size < _JOIN:
        b = bufs[i]
        take = _JOIN - size
        if take < len(b):
            parts.append(memoryview(b)[:take])
            return b"".join(parts), i, take
        parts.append(b)
        size += len(b)
        i += 1
    return b"".join(parts), i, 0


class TLSTransport:
    """A TLS stream over a connected non-blocking socket (see the rules)."""

    can_sendfile = False

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.fileno = sock.fileno
        #: What the last read / write would have blocked on ("r" or "w").
        self._read_needs = "r"
        self._write_needs = "w"
        #: Set once TLS itself failed (alert, verification, bad record).
        self.tls_error: str | None = None
        self._cork = sock.family in (socket.AF_INET, socket.AF_INET6)

    def describe(self) -> str:
        """The protocol version and cipher, for the log."""
        cipher = self.sock.cipher()
        return f"{self.sock.version()} {cipher[0] if cipher else '?'}"

    def _failed(self, e: ssl.SSLError) -> OSError:
        self.tls_error = describe_ssl_error(e)
        return OSError(errno.EPROTO, f"TLS: {self.tls_error}")

    def send(self, bufs: Sequence[Buffer], /) -> int:
        """Send a prefix of `bufs`, one TLS write per large buffer or per
        run of small ones, until all is sent or TLS would block."""
        sock = self.sock
        # Only worth two more system calls when it is more than one record.
        cork = self._cork and sum(len(b) for b in bufs) > _JOIN
        if cork:
            # One TLS record per write(2) (OpenSSL's way): corked, the
            # kernel sends them as full segments, not one each.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
        try:
            return self._send(bufs, sock)
        finally:
            if cork:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)

    def _send(self, bufs: Sequence[Buffer], sock: ssl.SSLSocket) -> int:
        sent = 0
        i, off, n = 0, 0, len(bufs)
        while i < n:
            data, i, off = _next_write(bufs, i, off)
            if not len(data):
                continue
            try:
                sent += sock.send(data)
                continue
            except ssl.SSLWantWriteError:
                self._write_needs = "w"
            except ssl.SSLWantReadError:
                self._write_needs = "r"
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                raise BrokenPipeError(errno.EPIPE, "TLS stream closed by the peer") from None
            except ssl.SSLError as e:
                raise self._failed(e) from None
            if sent:
                return sent
            raise BlockingIOError
        return sent

    def recv_into(self, buf: memoryview, /) -> int:
        """Up to len(buf) bytes: keeps reading TLS records while they are
        there, so a large payload is not one trip through SocketIO per
        16 KiB record."""
        got, want = 0, len(buf)
        sock = self.sock
        while got < want:
            try:
                n = sock.recv_into(buf[got:] if got else buf)
            except ssl.SSLWantReadError:
                self._read_needs = "r"
            except ssl.SSLWantWriteError:
                self._read_needs = "w"
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return got  # the end of the stream: 0 once nothing is left
            except ssl.SSLError as e:
                if got:
                    return got
                raise self._failed(e) from None
            else:
                if n == 0:
                    return got
                got += n
                continue
            if got:
                return got
            raise BlockingIOError
        return got

    def recvmsg_into(self, bufs: list[memoryview], /) -> int:
        total = 0
        for b in bufs:
            try:
                n = self.recv_into(b)
            except BlockingIOError:
                if total:
                    return total
                raise
            total += n
            if n < len(b):
                break
        return total

    def sendfile(self, fd: int, offset: int, count: int) -> int:
        raise OSError(errno.EOPNOTSUPP, "no sendfile over TLS")

    async def wait_readable(self) -> None:
        if self.sock.pending():
            await trio.lowlevel.checkpoint()
        else:
            await self._wait(self._read_needs)

    async def wait_writable(self) -> None:
        await self._wait(self._write_needs)

    async def _wait(self, what: str) -> None:
        wait = trio.lowlevel.wait_readable if what == "r" else trio.lowlevel.wait_writable
        try:
            await wait(self.fd)
        except trio.BusyResourceError:
            # TLS made a read wait for writing (a key update) while the
            # sender waits for the same, or the reverse: rare; poll instead.
            await trio.sleep(0.001)

    def shutdown(self) -> None:
        # The plain socket's shutdown: SSLSocket.shutdown would drop TLS and
        # let later reads see raw bytes.
        with contextlib.suppress(OSError):
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)

    def close(self) -> None:
        if self.sock.fileno() < 0:
            return
        # Best effort close_notify (never waits): a peer can tell a clean
        # end from a cut one.
        with contextlib.suppress(OSError, ValueError):
            self.sock.unwrap()
        trio.lowlevel.notify_closing(self.fd)
        self.sock.close()


async def start_tls(
    transport: SocketTransport,
    ctx: ssl.SSLContext,
    *,
    server_side: bool,
    server_hostname: str | None = None,
    peer: str = "",
) -> TLSTransport:
    """Run the TLS handshake on `transport`'s socket, which it takes over
    (closed on failure). ConnectionLost if the peer went away,
    TLSHandshakeError if TLS itself failed (e.g. a certificate not trusted)."""
    sock = ctx.wrap_socket(
        transport.sock,
        server_side=server_side,
        server_hostname=server_hostname,
        do_handshake_on_connect=False,
    )
    tls = TLSTransport(sock)
    try:
        while True:
            try:
                sock.do_handshake()
                return tls
            except ssl.SSLWantReadError:
                await trio.lowlevel.wait_readable(tls.fd)
            except ssl.SSLWantWriteError:
                await trio.lowlevel.wait_writable(tls.fd)
    except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
        tls.close()
        raise ConnectionLost(f"{peer}: closed during the TLS handshake") from None
    except ssl.SSLError as e:
        tls.close()
        raise TLSHandshakeError(describe_ssl_error(e)) from None
    except OSError as e:
        tls.close()
        raise ConnectionLost(f"{peer}: TLS handshake: {e.strerror or e}") from None
    except BaseException:
        tls.close()
        raise


class TLSHandshakeError(OSError):
    """The TLS handshake failed for TLS's own reasons (a certificate not
    trusted, no common protocol, an alert): `reason` says which."""

    def __init__(self, reason: str) -> None:
        super().__init__(errno.EPROTO, f"TLS handshake failed: {reason}")
        self.reason = reason
