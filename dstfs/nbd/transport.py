"""The byte stream under `SocketIO`: a plain socket here, TLS in nbd/tls.py.

Rules:
- A transport is non-blocking. `send`, `recv_into` and `recvmsg_into` raise
  BlockingIOError when they would block; the caller then awaits
  `wait_writable()` / `wait_readable()`, which know what the stream really
  waits for (a TLS stream may hold decrypted bytes the socket does not show).
- `send` sends a prefix of a sequence of buffers and says how many bytes;
  `recv_into` / `recvmsg_into` return the bytes received, 0 at end of stream.
- `can_sendfile` says whether `sendfile` may move file bytes to the peer
  without passing through Python; when False, the caller reads and sends.
- Other OSErrors are the stream's failure; the caller decides what they mean.
- The plain socket transport binds the socket's own methods as attributes:
  the hot path pays no extra call for the indirection.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections.abc import Sequence
from typing import Protocol

import trio

from dstfs.iotypes import Buffer


class Transport(Protocol):
    #: True when `sendfile` works (the kernel sends file pages itself).
    can_sendfile: bool

    def send(self, bufs: Sequence[Buffer], /) -> int: ...
    def recv_into(self, buf: memoryview, /) -> int: ...
    def recvmsg_into(self, bufs: list[memoryview], /) -> int: ...
    def sendfile(self, fd: int, offset: int, count: int) -> int: ...
    async def wait_readable(self) -> None: ...
    async def wait_writable(self) -> None: ...
    def shutdown(self) -> None: ...
    def close(self) -> None: ...
    def fileno(self) -> int: ...


class SocketTransport:
    """A plain connected stream socket (TCP or unix), made non-blocking."""

    can_sendfile = True

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.send = sock.sendmsg
        self.recv_into = sock.recv_into
        self.fileno = sock.fileno

    def recvmsg_into(self, bufs: list[memoryview], /) -> int:
        return self.sock.recvmsg_into(bufs)[0]

    def sendfile(self, fd: int, offset: int, count: int) -> int:
        return os.sendfile(self.sock.fileno(), fd, offset, count)

    async def wait_readable(self) -> None:
        await trio.lowlevel.wait_readable(self.sock)

    async def wait_writable(self) -> None:
        await trio.lowlevel.wait_writable(self.sock)

    def shutdown(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        trio.lowlevel.notify_closing(self.sock)
        self.sock.close()


async def connect_tcp(host: str, port: int) -> SocketTransport:
    """A connected TCP transport, tuned with `tune_tcp`."""
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    last: OSError | None = None
    for family, type_, proto, _, addr in infos:
        sock = socket.socket(family, type_, proto)
        try:
            await _connect(sock, addr)
        except OSError as e:
            sock.close()
            last = e
            continue
        except BaseException:
            sock.close()
            raise
        tune_tcp(sock)
        return SocketTransport(sock)
    raise last or OSError(errno.EHOSTUNREACH, f"no address for {host}")


#: A link that swallows our packets for this long counts as broken (the
#: kernel's own default is about 15 minutes of retransmissions).
USER_TIMEOUT_MS = 5000


def tune_tcp(sock: socket.socket) -> None:
    """No Nagle delay; notice a dead peer or a cut link within seconds, also
    while we only wait for replies (keepalive probes count as unacked data)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 2)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)


async def connect_unix(path: str) -> SocketTransport:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await _connect(sock, path)
    except BaseException:
        sock.close()
        raise
    return SocketTransport(sock)


async def _connect(sock: socket.socket, addr: object) -> None:
    sock.setblocking(False)
    err = sock.connect_ex(addr)
    if err in (errno.EINPROGRESS, errno.EAGAIN):
        await trio.lowlevel.wait_writable(sock)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, f"connect to {addr}: {os.strerror(err)}")
