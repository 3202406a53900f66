"""Helpers to run real servers (dstfs serve, nbdkit, qemu-nbd, nbd-server) as
child processes in tests, on free loopback ports, always stopped afterwards."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(
    port: int, proc: subprocess.Popen | None = None, timeout: float = 10.0, host: str = "127.0.0.1"
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
