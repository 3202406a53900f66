"""`dstfs serve`: export a file or block device over NBD until SIGINT/SIGTERM/SIGHUP.

Rules: the access options (`--tls*`, `--allow`) are checked before anything
listens, a bad one is a ValueError for the CLI; a server that may talk plain
text on an address other than loopback says so in its log at start. The
address is bound before the export is opened or created (`bound`), so an
address that cannot be bound changes nothing; one process or `--workers N`
(dstfs/workers.py) then serve on the same bound sockets, with the same
`ServeConfig`.
"""

from __future__ import annotations

import contextlib
import enum
import ipaddress
import logging
import os
import signal
import socket
import ssl
from collections.abc import Iterator

import attrs
import trio

from dstfs.backends.file import FileBackend
from dstfs.nbd.server import Export, NbdServer, Network, bind_tcp, bind_unix
from dstfs.nbd.tls import describe_ssl_error, server_context

log = logging.getLogger(__name__)


def parse_listen(text: str) -> tuple[str, int]:
    """`HOST:PORT`, `[V6]:PORT` or `:PORT` (all addresses)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"--listen wants HOST:PORT, not {text!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


class TLSMode(enum.Enum):
    REQUIRE = "require"
    ALLOW = "allow"
    OFF = "off"


def parse_allow(text: str, flag: str = "--allow") -> Network:
    """`ADDR` or `ADDR/PREFIX`, IPv4 or IPv6 (host bits may be set); `flag`
    names the option in the error (`dstfs mount` has `--export-allow`)."""
    try:
        return ipaddress.ip_network(text.strip().replace("[", "").replace("]", ""), strict=False)
    except ValueError:
        raise ValueError(
            f"{flag} wants ADDR[/PREFIX] (e.g. 192.0.2.0/24, ::1), not {text!r}"
        ) from None


def tls_mode(cert: str | None, mode: str | None) -> TLSMode:
    """The mode asked for: require by default when a certificate is given, else off."""
    return TLSMode(mode) if mode else TLSMode.REQUIRE if cert else TLSMode.OFF


def tls_setup(
    cert: str | None, key: str | None, ca: str | None, mode: str | None, flag: str = "--tls"
) -> tuple[ssl.SSLContext | None, bool]:
    """The server's TLS context (None: no TLS) and whether TLS is required
    (see `tls_mode`); `flag` prefixes the option names in errors
    (`dstfs mount` has `--export-tls`, `--export-tls-cert`, ...)."""
    mode_ = tls_mode(cert, mode)
    if mode_ is TLSMode.OFF:
        if cert or key or ca:
            raise ValueError(f"{flag} off takes no {flag}-cert, {flag}-key or {flag}-ca")
        return None, False
    if not cert or not key:
        raise ValueError(f"{flag} {mode_.value} needs {flag}-cert and {flag}-key")
    try:
        ctx = server_context(cert, key, ca)
    except ssl.SSLError as e:
        raise ValueError(f"TLS certificate or key not usable: {describe_ssl_error(e)}") from None
    except OSError as e:
        raise ValueError(f"TLS files: {e.strerror or e}: {e.filename or cert}") from None
    return ctx, mode_ is TLSMode.REQUIRE


def warn_if_plain_text(hosts: list[str], tls_required: bool, flag: str = "--tls") -> bool:
    """Log a warning (and say True) when a server that does not require TLS
    listens on an address other than loopback."""
    if tls_required:
        return False
    exposed = [h for h in hosts if not ipaddress.ip_address(h.split("%", 1)[0]).is_loopback]
    allow = "--allow" if flag == "--tls" else flag.removesuffix("tls") + "allow"
    for host in exposed:
        log.warning(
            "serving on %s without requiring TLS: whoever reaches it reads and writes"
            " the export in plain text (see %s-cert, %s-key, %s)",
            host,
            flag,
            flag,
            allow,
        )
    return bool(exposed)


@contextlib.contextmanager
def bind_errors_unwrapped() -> Iterator[None]:
    """A nursery wraps a failed bind in an exception group of one: the
    caller gets the OSError itself (one line for the CLI)."""
    try:
        yield
    except BaseExceptionGroup as group:
        while len(group.exceptions) == 1 and isinstance(group.exceptions[0], BaseExceptionGroup):
            group = group.exceptions[0]
        if len(group.exceptions) == 1 and isinstance(group.exceptions[0], OSError):
            raise group.exceptions[0] from None
        raise


def open_export(path: str, size: int | None, read_only: bool) -> FileBackend:
    """Open PATH; with `size`, create a sparse file of that size if it is missing."""
    if size is not None and not os.path.exists(path):
        if read_only:
            raise ValueError(f"{path} does not exist (a read-only export cannot create it)")
        log.info("%s: creating a sparse file of %d bytes", path, size)
        return FileBackend.create(path, size)
    backend = FileBackend(path, read_only=read_only)
    if size is not None and size != backend.size:
        real = backend.size
        backend.close()
        raise ValueError(f"{path} exists with {real} bytes, not the {size} asked by --size")
    return backend


@attrs.frozen
class ServeConfig:
    """What `dstfs serve` serves, and how: the same for one process and for
    each of `--workers N`."""

    backend: FileBackend
    export: str = ""
    read_only: bool = False
    max_connections: int = 256
    handshake_timeout: float = 10.0
    tls: ssl.SSLContext | None = None
    tls_required: bool = False
    allow: list[Network] | None = None

    def server(self, *, accepts: bool = True, serves: bool = True) -> NbdServer:
        """An NbdServer of the export: one that `accepts` applies the access
        and connection limits, one that `serves` speaks TLS."""
        return NbdServer(
            [Export(self.export, self.backend, read_only=self.read_only)],
            max_connections=self.max_connections,
            handshake_timeout=self.handshake_timeout,
            tls=self.tls if serves else None,
            tls_required=self.tls_required and serves,
            allow=self.allow if accepts else None,
        )


async def close_export(cfg: ServeConfig) -> None:
    """The last thing a serving process does, even when cancelled: flush
    what it wrote, close the file."""
    with trio.CancelScope(shield=True):
        if not cfg.read_only:
            try:
                await cfg.backend.flush()
            except OSError as e:
                log.error("%s: final flush failed: %s", cfg.backend.path, e)
        await cfg.backend.aclose()


#: What stops `dstfs serve` cleanly. SIGHUP too: a terminal that closes
#: must not kill a server that has not flushed (nbdkit does the same).
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


@contextlib.contextmanager
def bound(listen: tuple[str, int] | None, unix: str | None) -> Iterator[list[socket.socket]]:
    """The listening sockets of `dstfs serve`, bound before the export is
    opened (a bad address creates no file) and before any trio run (the
    workers are forked after). STOP_SIGNALS wait blocked from the bind
    until a trio run receives them (it unblocks them): a stop that comes
    as soon as the socket accepts is still a clean one. On the way out the
    sockets close, a unix socket's path goes and the signal mask is back.
    OSError when the address cannot be bound."""
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        socks = [bind_unix(unix)] if unix is not None else bind_tcp(*listen)  # type: ignore[misc]
        try:
            yield socks
        finally:
            for sock in socks:
                sock.close()
            if unix is not None:
                with contextlib.suppress(OSError):
                    os.unlink(unix)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


async def run_server(
    cfg: ServeConfig,
    socks: list[socket.socket],
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """`dstfs serve` in one process on `socks` (see `bound`), until
    a STOP_SIGNAL."""
    try:
        await accept_until_stopped(cfg.server(), cfg, socks, task_status=task_status)
    finally:
        await close_export(cfg)


async def accept_until_stopped(
    server: NbdServer,
    cfg: ServeConfig,
    socks: list[socket.socket],
    *,
    how: str = "",
    stopping: str = "stopping",
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept on `socks` with `server` until a STOP_SIGNAL: one process's
    serving, or `--workers`' parent handing out (`how` ends its line saying
    so, `stopping` says what a stop does).
    Takes the stop signals that `bound` blocked."""
    async with trio.open_nursery() as nursery:
        listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in socks]
        await nursery.start(server.serve_listeners, listeners)
        log.info("serving %s as %r on %s%s", cfg.backend.path, cfg.export, where(socks), how)
        if socks[0].family != socket.AF_UNIX:
            warn_if_plain_text([s.getsockname()[0] for s in socks], cfg.tls_required)
        task_status.started(listeners)
        with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # one that came: now
            async for signum in signals:
                log.info("signal %s: %s", signal.Signals(signum).name, stopping)
                nursery.cancel_scope.cancel()
                break


def where(socks: list[socket.socket]) -> str:
    """The addresses of listening sockets, for the log."""
    if socks[0].family == socket.AF_UNIX:
        return f"unix:{socks[0].getsockname()}"
    return ", ".join(str(s.getsockname()[:2]) for s in socks)
