"""The control tree over a unix socket in the state dir (`STATE/control.sock`),
for arrays run without FUSE (`dstfs mount --no-fuse`) and for the CLI.

Protocol: the client sends one request per line, the daemon answers each in
order on the same connection:

    read PATH           -> ok LEN\\n + LEN bytes: the file's content
    write PATH VALUE    -> ok 0\\n                (VALUE: the rest of the line)
    list [PATH]         -> ok LEN\\n + names, one a line, a directory with "/"
    stop                -> ok 0\\n, then the daemon flushes and exits
                           (no-fuse only: a mounted array is stopped by
                           unmounting it)
    anything refused    -> err ERRNO MESSAGE\\n  (the errno a control file
                           would give, e.g. 22 for EINVAL)

PATH is the control file's path under the mount point (`n-0/suspend`).

Rules:
- The socket is the owner's only (0600): it is bound under a temporary name,
  chmod'ed, then renamed into place, so it is never reachable with wider
  permissions. Its path may be longer than a sockaddr holds: it is then
  reached through /proc/self/fd/N of the open state dir.
- This module imports the control tree (and so the array) only to serve
  it: the CLI's client stays light.
- A request line is at most MAX_LINE bytes; a longer one, or one that is not
  UTF-8, ends that connection with one `err`. The daemon never fails for a
  client.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from dstfs.control import ControlTree

log = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"
#: A write's value is at most control.MAX_WRITE (4096) characters.
MAX_LINE = 8192
#: What fits in sockaddr_un.sun_path with its terminating NUL.
_SUN_PATH = 107


class ControlSocketError(OSError):
    """The daemon refused a request (errno, message), or cannot be reached."""


def _short(path: Path, dir_fd: int) -> str:
    """A name for `path` that fits a sockaddr, via the open directory fd."""
    return (
        str(path)
        if len(os.fsencode(str(path))) <= _SUN_PATH
        else f"/proc/self/fd/{dir_fd}/{path.name}"
    )


async def serve_control(
    path: Path,
    control: ControlTree,
    stop: Callable[[], None] | None,
    refuse_stop: str = "",
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `control` on the unix socket `path` until cancelled. `stop` is
    called for a `stop` request; without it, `stop` is refused with
    `refuse_stop`."""
    dir_fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_short(tmp, dir_fd))
        await sock.bind(_short(tmp, dir_fd))
        os.chmod(_short(tmp, dir_fd), 0o600)
        sock.listen(16)
        os.rename(_short(tmp, dir_fd), _short(path, dir_fd))
    except BaseException:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(_short(tmp, dir_fd))
        os.close(dir_fd)
        raise
    log.info("%s: control socket %s", control.array.name, path)
    try:
        async with trio.open_nursery() as nursery:
            task_status.started()
            listener = trio.SocketListener(sock)
            while True:
                stream = await listener.accept()
                nursery.start_soon(_session, stream, control, stop, refuse_stop)
    finally:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(_short(path, dir_fd))
        os.close(dir_fd)


async def _session(
    stream: trio.SocketStream,
    control: ControlTree,
    stop: Callable[[], None] | None,
    refuse_stop: str,
) -> None:
    name = control.array.name
    buf = bytearray()
    async with stream:
        try:
            while True:
                nl = buf.find(b"\n")
                if nl < 0:
                    if len(buf) > MAX_LINE:
                        await stream.send_all(b"err 22 request line too long\n")
                        return
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buf += data
                    continue
                line, buf = bytes(buf[:nl]), buf[nl + 1 :]
                try:
                    text = line.decode()
                except UnicodeDecodeError:
                    await stream.send_all(b"err 22 request is not UTF-8\n")
                    return
                reply, stopping = await _answer(text, control, stop, refuse_stop)
                await stream.send_all(reply)
                if stopping:
                    assert stop is not None
                    log.info("%s: stop requested over the control socket", name)
                    stop()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return


def _ok(text: str = "") -> bytes:
    data = text.encode()
    return b"ok %d\n" % len(data) + data


def _err(err: int, message: str) -> bytes:
    return f"err {err} {' '.join(message.split())}\n".encode()


def _parts(path: str) -> tuple[str, ...]:
    return tuple(p for p in path.split("/") if p and p != ".")


async def _answer(
    text: str, control: ControlTree, stop: Callable[[], None] | None, refuse_stop: str
) -> tuple[bytes, bool]:
    # Imported here: the CLI imports this module for its client, and should
    # not pay for the array.
    from dstfs.control import Attr, ControlError

    verb, _, rest = text.partition(" ")
    try:
        if verb == "read":
            return _ok(control.read(_parts(rest))), False
        if verb == "write":
            path, _, value = rest.partition(" ")
            await control.write(_parts(path), value)
            return _ok(), False
        if verb == "list":
            node = control.lookup(_parts(rest))
            if node is None:
                return _err(errno.ENOENT, f"no control file {rest}"), False
            if isinstance(node, Attr):
                return _err(errno.ENOTDIR, f"{rest} is a file"), False
            names = [k + ("/" if isinstance(v, dict) else "") for k, v in node.items()]
            return _ok("".join(n + "\n" for n in names)), False
        if verb == "stop" and not rest:
            if stop is None:
                return _err(errno.EBUSY, refuse_stop or "cannot stop this daemon"), False
            return _ok(), True
        return _err(errno.EINVAL, f"unknown request {verb!r}: read, write, list or stop"), False
    except ControlError as e:
        return _err(e.errno, e.message), False


class ControlClient:
    """A blocking client of a daemon's control socket (for the CLI)."""

    def __init__(self, path: Path, timeout: float | None = None) -> None:
        self.path = path
        try:
            dir_fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:  # no such state dir, or not a directory
            raise ControlSocketError(e.errno or errno.EIO, f"{path}: {e.strerror}") from None
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(_short(path, dir_fd))
        except OSError as e:
            self.sock.close()
            raise ControlSocketError(e.errno or errno.EIO, f"{path}: {e.strerror}") from None
        finally:
            os.close(dir_fd)
        self.file = self.sock.makefile("rb")

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def request(self, line: str) -> str:
        """Send one request; its answer's text, or ControlSocketError."""
        if "\n" in line:
            raise ControlSocketError(errno.EINVAL, "a request is one line")
        try:
            self.sock.sendall(line.encode() + b"\n")
            head = self.file.readline().decode(errors="replace").rstrip("\n")
            kind, _, rest = head.partition(" ")
            if kind == "ok":
                return self.file.read(int(rest)).decode(errors="replace")
        except (OSError, ValueError) as e:
            raise ControlSocketError(errno.EIO, f"{self.path}: {e}") from None
        if kind == "err":
            code, _, message = rest.partition(" ")
            raise ControlSocketError(int(code) if code.isdigit() else errno.EIO, message)
        raise ControlSocketError(errno.EIO, f"{self.path}: the daemon hung up")

    def read(self, path: str) -> str:
        return self.request(f"read {path}")

    def write(self, path: str, value: str) -> None:
        self.request(f"write {path} {value}")

    def list(self, path: str = "") -> list[str]:
        return self.request(f"list {path}".rstrip()).splitlines()
