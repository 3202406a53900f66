"""Opening a node's storage from its `NodeSpec`: one opener per URI kind.

Rules:
- `open_backend` is the one way the array (and migration, through the
  array) opens storage; the Array takes an opener as a constructor argument,
  this module's `open_backend` by default, so tests can hand in their own.
- Every open is bounded by OPEN_TIMEOUT: a server that accepts and never
  speaks, or a local path whose open() blocks, is ETIMEDOUT, not a hung
  daemon. A local file or device is opened in a worker thread, never on the
  trio thread: that thread serves our own FUSE mount, and an open that
  reaches the mount through a path nobody foresaw would wait for itself.
- Failures are OSError with the true errno.
- A new kind (nbds://, later) registers its opener under its `NodeSpec.kind`.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Awaitable, Callable

import trio

from dstfs.algorithms.base import SECTOR
from dstfs.backends.base import Backend
from dstfs.backends.file import FileBackend
from dstfs.backends.nbd import NbdBackend
from dstfs.uri import NodeSpec

#: Seconds a server may take to accept and negotiate, or a local path to
#: open, when a node is opened.
OPEN_TIMEOUT = 10.0

#: open(spec, nursery, connections) -> an open backend, or OSError.
Opener = Callable[[NodeSpec, trio.Nursery, int], Awaitable[Backend]]


async def _open_file(spec: NodeSpec, nursery: trio.Nursery, connections: int) -> Backend:
    assert spec.path is not None
    path, min_size = spec.path, (spec.size or 0) * SECTOR
    # The worker may outlive us (an abandoned open that returns later): it
    # hands its backend over under the lock, or closes it if nobody waits.
    lock = threading.Lock()
    box: list[FileBackend] = []
    abandoned = False

    def work() -> None:
        backend = FileBackend(path, size=min_size or None)
        with lock:
            if abandoned:
                backend.close()
            else:
                box.append(backend)

    done = False
    try:
        await trio.to_thread.run_sync(work, abandon_on_cancel=True)
        done = True
    finally:
        if not done:
            with lock:
                abandoned = True
                left = box[:]  # it finished, but too late for us
            for b in left:
                b.close()
    return box[0]


async def _open_nbd(spec: NodeSpec, nursery: trio.Nursery, connections: int) -> Backend:
    min_size = (spec.size or 0) * SECTOR
    return await NbdBackend.open(spec, nursery, connections=connections, min_size=min_size)


OPENERS: dict[str, Opener] = {
    "file": _open_file,
    "nbd": _open_nbd,
    "nbd+unix": _open_nbd,
}


def register(kind: str, opener: Opener) -> None:
    """Open specs of `kind` with `opener` from now on."""
    OPENERS[kind] = opener


async def open_backend(spec: NodeSpec, nursery: trio.Nursery, connections: int = 1) -> Backend:
    """Open the storage behind `spec`; OSError with the true errno if not,
    ETIMEDOUT if that takes longer than OPEN_TIMEOUT."""
    opener = OPENERS.get(spec.kind)
    if opener is None:
        raise OSError(errno.EPROTONOSUPPORT, f"{spec.uri}: no backend for {spec.kind!r}")
    try:
        with trio.fail_after(OPEN_TIMEOUT):
            return await opener(spec, nursery, connections)
    except trio.TooSlowError:
        raise OSError(errno.ETIMEDOUT, f"no answer in {OPEN_TIMEOUT:g} s") from None
