"""The mounted array as an NBD export (`dstfs mount --export ADDR`).

Rules:
- A request through the export is an array request like one through
  disk.img: the same map, suspend, migration, mirror and failover rules.
- FLUSH and FUA reach every node (Array.flush); TRIM and WRITE_ZEROES both
  become zeroes on every node that holds the range, so replicas of a mirror
  read the same afterwards.
- Block status is passed through where the array is one node, or a mirror,
  and that node (the first in-sync replica) answers it; otherwise the export
  does not offer it.
- The backend never closes the array: the daemon does, after the server.
- An export address is `unix:PATH` or `HOST:PORT`. A TCP address must be
  loopback (127.0.0.0/8, ::1, `localhost`) unless `any_address` is set
  (`--export-any-address`): the export has no authentication yet, so
  anything that can connect can read and write the whole array.
- A unix socket path is taken over only from a stale socket: a file there,
  or a socket something listens on, fails the mount (EEXIST, EADDRINUSE).
- `ExportOptions` gathers everything the export is told on the command line
  (addresses now; TLS and `--allow` belong there too), so adding an option
  touches the parser, this class and `serve_exports` only.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import math
import os
import socket
import stat

import attrs
import trio

from dstfs.array import Array
from dstfs.backends.base import BackendBase
from dstfs.iotypes import Buffer
from dstfs.nbd.server import Export, NbdServer

log = logging.getLogger(__name__)


@attrs.frozen
class ExportAddress:
    """Where the export listens: a unix socket `path`, or TCP `host`:`port`."""

    path: str | None = None
    host: str | None = None
    port: int = 0

    def uri(self) -> str:
        """The NBD URI a client uses to reach this address."""
        if self.path is not None:
            return f"nbd+unix:///?socket={self.path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"nbd://{host}:{self.port}"


def parse_export_address(text: str, any_address: bool = False) -> ExportAddress:
    """`unix:PATH` or `HOST:PORT` (`[V6]:PORT`); ValueError with the reason."""
    if text.startswith("unix:"):
        path = text[5:]
        if not path.startswith("/"):
            raise ValueError(f"--export unix:PATH wants an absolute path, not {path!r}")
        return ExportAddress(path=path)
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--export wants unix:PATH or HOST:PORT (port 1-65535), not {text!r}")
    host = host.removeprefix("[").removesuffix("]")
    if not any_address and not _loopback(host):
        raise ValueError(
            f"--export {text}: {host} is not a loopback address; the export has no "
            "authentication, so listening beyond this host needs --export-any-address"
        )
    return ExportAddress(host=host, port=int(port))


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve anywhere


@attrs.frozen
class ExportOptions:
    """What `dstfs mount --export ...` asked for (TLS and --allow go here too)."""

    addresses: tuple[ExportAddress, ...] = ()


def _check_unix_path(path: str) -> None:
    """The server replaces what is at `path`: only ever a stale socket, never
    a file, nor a socket something still listens on."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(path)
        except OSError:
            return  # nobody listens: a leftover, safe to replace
    raise OSError(errno.EADDRINUSE, f"{path}: a server already listens there")


async def serve_exports(
    array: Array,
    options: ExportOptions,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `array` on every address of `options` until cancelled; started
    once all listen, with the URIs they answer on. An address that cannot be
    bound raises OSError before `started`."""
    server = NbdServer([Export("", ArrayBackend(array), description=f"dstfs {array.name}")])
    try:
        async with trio.open_nursery() as nursery:
            uris = []
            for addr in options.addresses:
                if addr.path is not None:
                    _check_unix_path(addr.path)
                    await nursery.start(server.serve_unix, addr.path)
                    uris.append(addr.uri())
                else:
                    assert addr.host is not None
                    listeners = await nursery.start(server.serve_tcp, addr.host, addr.port)
                    port = listeners[0].socket.getsockname()[1]
                    uris.append(attrs.evolve(addr, port=port).uri())
            log.info("%s: exported over NBD on %s", array.name, ", ".join(uris))
            task_status.started(uris)
            await trio.sleep(math.inf)
    except BaseExceptionGroup as group:
        # The nursery wraps a failed bind: give the caller the OSError itself.
        leaf = _only(group)
        if isinstance(leaf, OSError):
            raise leaf from None
        raise


def _only(group: BaseExceptionGroup) -> BaseException | None:
    """The one exception in a (nested) group of one; None otherwise."""
    while len(group.exceptions) == 1:
        inner = group.exceptions[0]
        if not isinstance(inner, BaseExceptionGroup):
            return inner
        group = inner
    return None


class ArrayBackend(BackendBase):
    """The array seen through the Backend interface, for the NBD server."""

    #: Every request waits on network nodes: serve a connection's requests
    #: side by side, not one at a time.
    concurrent_requests = True

    def __init__(self, array: Array) -> None:
        self.array = array
        self.name = f"array {array.name}"

    @property
    def size(self) -> int:
        return self.array.size

    async def pread(self, offset: int, length: int) -> Buffer:
        return await self.array.read(offset, length)

    async def pread_into(self, offset: int, views: list[memoryview]) -> None:
        for view in views:
            n = await self.array.readinto(offset, view)
            if n < len(view):
                raise OSError(errno.EINVAL, "read past the end of the disk")
            offset += n

    async def pwrite(self, offset: int, data: Buffer, fua: bool = False) -> None:
        await self.array.write(offset, data)
        if fua:
            await self.array.flush()

    async def flush(self) -> None:
        await self.array.flush()

    async def trim(self, offset: int, length: int) -> None:
        await self.array.write_zeroes(offset, length)

    async def write_zeroes(self, offset: int, length: int, may_trim: bool = True) -> None:
        await self.array.write_zeroes(offset, length)

    def _status_node(self):  # type: ignore[no-untyped-def]
        a = self.array
        if a.replicas is not None:
            good = [r.node for r in a.replicas.replicas if r.in_sync and r.node.ready]
            return good[0] if good else None
        return a.nodes[0] if len(a.nodes) == 1 else None

    @property
    def can_block_status(self) -> bool:
        node = self._status_node()
        return node is not None and node.can_block_status

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        node = self._status_node()
        if node is None or not node.can_block_status:
            raise OSError(errno.EOPNOTSUPP, "no block status for this array")
        return await node.block_status(offset, length)

    async def aclose(self) -> None:
        pass  # the daemon closes the array
