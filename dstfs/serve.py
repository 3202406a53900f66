"""`dstfs serve`: export a file or block device over NBD until SIGINT/SIGTERM."""

from __future__ import annotations

import logging
import os
import signal

import trio

from dstfs.backends.file import FileBackend
from dstfs.nbd.server import Export, NbdServer

log = logging.getLogger(__name__)


def parse_listen(text: str) -> tuple[str, int]:
    """`HOST:PORT`, `[V6]:PORT` or `:PORT` (all addresses)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"--listen wants HOST:PORT, not {text!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


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


async def run_server(
    backend: FileBackend,
    *,
    listen: tuple[str, int] | None,
    unix: str | None,
    export: str,
    read_only: bool,
    max_connections: int = 256,
    handshake_timeout: float = 10.0,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    server = NbdServer(
        [Export(export, backend, read_only=read_only)],
        max_connections=max_connections,
        handshake_timeout=handshake_timeout,
    )
    try:
        async with trio.open_nursery() as nursery:
            if unix is not None:
                listeners = await nursery.start(server.serve_unix, unix)
                log.info("serving %s as %r on unix:%s", backend.path, export, unix)
            else:
                assert listen is not None
                listeners = await nursery.start(server.serve_tcp, *listen)
                addrs = ", ".join(str(lst.socket.getsockname()[:2]) for lst in listeners)
                log.info("serving %s as %r on %s", backend.path, export, addrs)
            task_status.started(listeners)
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    log.info("signal %s: stopping", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    break
    finally:
        with trio.CancelScope(shield=True):
            if not read_only:
                try:
                    await backend.flush()
                except OSError as e:
                    log.error("%s: final flush failed: %s", backend.path, e)
            await backend.aclose()
