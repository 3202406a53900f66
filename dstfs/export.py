"""The mounted array as an NBD export (`dstfs mount --export ADDR`).

Rules:
- A request through the export is an array request like one through
  disk.img: the same map, suspend, migration, mirror and failover rules.
- FLUSH and FUA reach every node (Array.flush); TRIM and WRITE_ZEROES both
  become zeroes on every node that holds the range, so replicas of a mirror
  read the same afterwards; WRITE_ZEROES with NO_HOLE stays NO_HOLE on the
  nodes (allocated, never punched).
- Block status is passed through where the array is one node, or a mirror,
  and that node (the first in-sync replica) answers it; otherwise the export
  does not offer it.
- The backend never closes the array: the daemon does, after the server.
- An export address is `unix:PATH` or `HOST:PORT`. A TCP address must be
  loopback (127.0.0.0/8, ::1, `localhost`) unless the export authenticates
  its clients (TLS required, with client certificates checked against
  `--export-tls-ca`) or `any_address` is set (`--export-any-address`):
  anything that can connect can read and write the whole array. `--export-
  allow` narrows who may connect but proves nothing (an address can be
  borrowed on a LAN), so alone it does not lift the rule. An export that
  does not require TLS on an address other than loopback logs a warning
  when it starts.
- TLS and `--export-allow` behave as `dstfs serve`'s `--tls*` and
  `--allow` (the same checks, dstfs/serve.py): TLS over a unix socket
  too; `allow` filters TCP peers only.
- A unix socket path is taken over only from a stale socket (see
  NbdServer.serve_unix): a file there, or a socket something listens on,
  fails the mount (EEXIST, EADDRINUSE).
- `ExportOptions` gathers everything the export is told on the command line
  (addresses, TLS files and mode, allowed networks), checked by
  `export_options` before anything starts, so adding an option touches the
  parser, this class and `serve_exports` only. The daemon builds the TLS
  context from the same files again when it starts serving.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import math
import ssl

import attrs
import trio

from dstfs.array import Array
from dstfs.backends.base import BackendBase
from dstfs.iotypes import Buffer
from dstfs.nbd.server import Export, NbdServer, Network
from dstfs.serve import (
    TLSMode,
    bind_errors_unwrapped,
    parse_allow,
    tls_mode,
    tls_setup,
    warn_if_plain_text,
)

log = logging.getLogger(__name__)


@attrs.frozen
class ExportAddress:
    """Where the export listens: a unix socket `path`, or TCP `host`:`port`."""

    path: str | None = None
    host: str | None = None
    port: int = 0

    def uri(self, tls: bool = False) -> str:
        """The NBD URI a client uses to reach this address (`nbds` with TLS)."""
        s = "s" if tls else ""
        if self.path is not None:
            return f"nbd{s}+unix:///?socket={self.path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"nbd{s}://{host}:{self.port}"


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
            f"--export {text}: {host} is not a loopback address; listening beyond this "
            "host needs clients authenticated by TLS (--export-tls-cert, --export-tls-key, "
            "--export-tls-ca) or --export-any-address"
        )
    return ExportAddress(host=host, port=int(port))


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve anywhere


#: How the export's TLS options are named (errors, warnings).
TLS_FLAG = "--export-tls"


@attrs.frozen
class ExportOptions:
    """What `dstfs mount --export ...` asked for (see `export_options`)."""

    addresses: tuple[ExportAddress, ...] = ()
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    #: require, allow or off; None: require with a certificate, else off.
    tls: str | None = None
    #: TCP peers allowed (None: all).
    allow: tuple[Network, ...] | None = None

    def tls_context(self) -> tuple[ssl.SSLContext | None, bool]:
        """The TLS context (None: plain) and whether TLS is required;
        ValueError with the reason."""
        return tls_setup(self.tls_cert, self.tls_key, self.tls_ca, self.tls, TLS_FLAG)

    @property
    def tls_on(self) -> bool:
        return tls_mode(self.tls_cert, self.tls) is not TLSMode.OFF

    @property
    def authenticates(self) -> bool:
        """Every client proves who it is: TLS required, client certificates checked."""
        return self.tls_ca is not None and tls_mode(self.tls_cert, self.tls) is TLSMode.REQUIRE


def export_options(
    addresses: list[str],
    *,
    any_address: bool = False,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    tls_ca: str | None = None,
    tls: str | None = None,
    allow: list[str] | None = None,
) -> ExportOptions:
    """Check the `--export*` options of `dstfs mount`, all of them before
    anything starts: ValueError with the reason (one line for the CLI)."""
    options = ExportOptions(
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_ca=tls_ca,
        tls=tls,
        allow=tuple(parse_allow(a, "--export-allow") for a in allow) if allow else None,
    )
    options.tls_context()  # the files are read and must fit together
    exposed_ok = any_address or options.authenticates
    addrs = tuple(parse_export_address(a, exposed_ok) for a in addresses)
    paths = [a.path for a in addrs if a.path is not None]
    if len(set(paths)) < len(paths) or len(set(addrs)) < len(addrs):
        raise ValueError("--export: the same address twice")
    return attrs.evolve(options, addresses=addrs)


async def serve_exports(
    array: Array,
    options: ExportOptions,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `array` on every address of `options` until cancelled; started
    once all listen, with the URIs they answer on. An address that cannot be
    bound raises OSError before `started`."""
    try:
        tls, tls_required = options.tls_context()
    except ValueError as e:  # the files changed since the mount checked them
        raise OSError(errno.EINVAL, str(e)) from None
    server = NbdServer(
        [Export("", ArrayBackend(array), description=f"dstfs {array.name}")],
        tls=tls,
        tls_required=tls_required,
        allow=options.allow,
    )
    with bind_errors_unwrapped():
        async with trio.open_nursery() as nursery:
            uris, hosts = [], []
            for addr in options.addresses:
                if addr.path is not None:
                    await nursery.start(server.serve_unix, addr.path)
                    uris.append(addr.uri(tls is not None))
                else:
                    assert addr.host is not None
                    listeners = await nursery.start(server.serve_tcp, addr.host, addr.port)
                    port = listeners[0].socket.getsockname()[1]
                    uris.append(attrs.evolve(addr, port=port).uri(tls is not None))
                    hosts += [lst.socket.getsockname()[0] for lst in listeners]
            log.info(
                "%s: exported over NBD on %s (TLS %s)",
                array.name,
                ", ".join(uris),
                "required" if tls_required else "allowed" if tls else "off",
            )
            warn_if_plain_text(hosts, tls_required, TLS_FLAG)
            task_status.started(uris)
            await trio.sleep(math.inf)


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
        # NO_HOLE (may_trim False) reaches the nodes: the range stays allocated.
        await self.array.write_zeroes(offset, length, may_trim)

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
