"""Helpers to run real servers (dstfs serve, nbdkit, qemu-nbd, nbd-server) as
child processes in tests, on free loopback ports, always stopped afterwards,
and the wrappers every test runs a program through (`run`, `output`, `sh`,
`dstfs`): captured text output and a timeout, so a hung program fails its
test instead of hanging the suite."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

DSTFS = [sys.executable, "-m", "dstfs"]


def need(tool: str) -> str:
    """The path of `tool`, or skip (a failure under DSTFS_REQUIRE_ALL=1)."""
    path = shutil.which(tool) or (
        f"/usr/sbin/{tool}" if os.path.exists(f"/usr/sbin/{tool}") else None
    )
    if path is None:
        pytest.skip(f"{tool} is not installed")
    return path


def run(*argv: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    """Run a program to completion, its output captured as text."""
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def output(*argv: str, timeout: float = 60.0) -> str:
    """Run a program (skipped if not installed); its stdout
    (CalledProcessError if it fails)."""
    need(argv[0])
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=timeout).stdout


def sh(script: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    """Run `script` with bash (whose `echo` reports write(2)'s errno)."""
    return run("bash", "-c", script, timeout=timeout)


def dstfs(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Run the dstfs CLI of this checkout."""
    return run(*DSTFS, *args, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(
    port: int, proc: subprocess.Popen | None = None, timeout: float = 60.0, host: str = "127.0.0.1"
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def running(
    argv: Sequence[str], port: int | None = None, **kw: object
) -> Iterator[subprocess.Popen]:
    """Run `argv` until the block ends; wait for `port` to listen first."""
    proc = subprocess.Popen(list(argv), **kw)  # type: ignore[call-overload]
    try:
        if port is not None:
            wait_port(port, proc)
        yield proc
    finally:
        stop(proc)


@contextlib.contextmanager
def dstfs_serve(
    path: Path, size: str | None = None, port: int | None = None, extra: Sequence[str] = ()
) -> Iterator[str]:
    """`dstfs serve PATH` on a free port; yields its nbd:// URI."""
    port = port or free_port()
    argv = [*DSTFS, "serve", str(path), "--listen", f"127.0.0.1:{port}", *extra]
    if size:
        argv += ["--size", size]
    with running(argv, port):
        yield f"nbd://127.0.0.1:{port}"


@contextlib.contextmanager
def nbdkit(*plugin_args: str, port: int | None = None) -> Iterator[str]:
    """`nbdkit PLUGIN ARGS` on a free port; yields its nbd:// URI."""
    exe = need("nbdkit")
    port = port or free_port()
    argv = [exe, "-f", "--exit-with-parent", "-i", "127.0.0.1", "-p", str(port), *plugin_args]
    with running(argv, port):
        yield f"nbd://127.0.0.1:{port}"


def rss_kib(pid: int) -> int:
    """Resident set size of process `pid`, in KiB (VmRSS of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _poll(ready: Callable[[], bool], what: str, proc: subprocess.Popen | None, timeout: float):
    deadline = time.monotonic() + timeout
    while not ready():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"not {what} after {timeout}s")
        time.sleep(0.02)


def _tcp_listening(port: int) -> bool:
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    return True
    return False


def wait_listening(port: int, proc: subprocess.Popen | None = None, timeout: float = 60.0) -> None:
    """Wait until a TCP socket listens on `port`, without connecting to it
    (for servers such as `nbd-server -d` that take a probe for their one client)."""
    _poll(lambda: _tcp_listening(port), f"listening on port {port}", proc, timeout)


def _unix_listening(path: str) -> bool:
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        # Flags 00010000 is __SO_ACCEPTCON: the socket listens.
        if len(fields) >= 8 and fields[7] == path and int(fields[3], 16) & 0x10000:
            return True
    return False


def wait_unix(
    path: str | Path, proc: subprocess.Popen | None = None, timeout: float = 60.0
) -> None:
    """Wait until a unix socket listens at `path`, without connecting to it."""
    _poll(lambda: _unix_listening(str(path)), f"listening on {path}", proc, timeout)


@contextlib.contextmanager
def dstfs_server(
    path: Path,
    size: str | None = None,
    extra: Sequence[str] = (),
    *,
    export: str = "",
    unix: str | Path | None = None,
    **kw: object,
) -> Iterator[tuple[str, subprocess.Popen]]:
    """`dstfs serve PATH [--export NAME]` on a free port, or on the unix socket
    `unix`; yields its URI (nbd:// or nbd+unix://) and the process."""
    argv = [*DSTFS, "serve", str(path), "--export", export, *extra]
    if size:
        argv += ["--size", size]
    if unix is None:
        port = free_port()
        with running([*argv, "--listen", f"127.0.0.1:{port}"], port, **kw) as proc:
            yield f"nbd://127.0.0.1:{port}/{export}", proc
    else:
        with running([*argv, "--unix", str(unix)], **kw) as proc:
            wait_unix(unix, proc)
            yield f"nbd+unix:///{export}?socket={unix}", proc


@contextlib.contextmanager
def nbdkit_proc(*plugin_args: str, **kw: object) -> Iterator[tuple[str, subprocess.Popen]]:
    """Like `nbdkit()`, but yields the process too (to kill it, read its log)."""
    exe = need("nbdkit")
    port = free_port()
    argv = [exe, "-f", "--exit-with-parent", "-i", "127.0.0.1", "-p", str(port), *plugin_args]
    with running(argv, port, **kw) as proc:
        yield f"nbd://127.0.0.1:{port}", proc


class Server:
    """`dstfs serve PATH` on a fixed port (a free one by default), to kill
    (SIGKILL, its file kept) and start again on the same port; its output
    goes to PATH.log."""

    def __init__(self, path: Path, port: int | None = None, size: int | str = "64M") -> None:
        port = port or free_port()
        self.path = path
        self.argv = [
            *DSTFS,
            "serve",
            str(path),
            "--size",
            str(size),
            "--listen",
            f"127.0.0.1:{port}",
        ]
        self.port = port
        self.uri = f"nbd://127.0.0.1:{port}"
        self.log = path.with_suffix(".log")
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=log)
        wait_port(self.port, self.proc)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop(self.proc)
