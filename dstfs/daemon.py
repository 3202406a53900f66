"""The mount daemon: opens the nodes, mounts the filesystem, runs until
unmounted or signalled, then flushes and disconnects every node.

Rules:
- Readiness is reported once, after the kernel mount exists: "ok", or one
  line saying why not. `dstfs mount` waits for it, so it returns only once
  the filesystem is usable, or fails with that line.
- The built-in default array: nodes whose state entry says `serve` are files
  this daemon exports itself over NBD on loopback, on a new port each mount.
- A registry file in the runtime dir (`dstfs.registry`) names the daemon
  of each mount point, for `dstfs umount`.
- The state dir's lock (`dstfs.statelock`) is taken by `dstfs mount` before
  this runs and held by this process until it exits.
- A node entry's saved `timeout` is applied when the node is opened.
- The control tree is also served on STATE/control.sock (`dstfs.ctlsock`),
  mounted or not; without FUSE (`--no-fuse`) it is the only way in, and its
  `stop` request ends the daemon like SIGTERM (SIGINT and SIGHUP do too). A no-fuse daemon has no
  registry entry: the state dir's lock alone keeps it unique.
- `--export` servers listen before readiness is reported (a failed bind is
  the mount's failure) and stop before the array is closed, so no request
  through them meets a closed node.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pyfuse3
import trio

from dstfs import mountinfo, state
from dstfs.array import Array, ArrayError
from dstfs.backends.file import FileBackend
from dstfs.backends.nbd import NbdBackend
from dstfs.control import ControlTree
from dstfs.ctlsock import SOCKET_NAME, serve_control
from dstfs.export import ExportOptions, serve_exports
from dstfs.fs import DstFs
from dstfs.nbd.server import Export, NbdServer
from dstfs.registry import registry_path, remove_registry, write_registry
from dstfs.serve import STOP_SIGNALS
from dstfs.uri import parse_node

log = logging.getLogger(__name__)


async def _serve_embedded(nursery: trio.Nursery, path: str) -> str:
    backend = FileBackend(path)
    server = NbdServer([Export("", backend)])
    listeners = await nursery.start(server.serve_tcp, "127.0.0.1", 0)
    port = listeners[0].socket.getsockname()[1]
    log.info("serving %s on nbd://127.0.0.1:%d", path, port)
    return f"nbd://127.0.0.1:{port}"


async def run(
    mountpoint: str | None,
    config: state.ArrayConfig,
    state_dir: Path,
    ready: Callable[[str], None],
    connections: int = 1,
    force_replica: int | None = None,
    exports: ExportOptions | None = None,
) -> None:
    """Mount `config` on `mountpoint` and serve until unmounted; with
    `exports`, serve the array over NBD too. With no `mountpoint` (`--no-fuse`)
    nothing is mounted: the array runs until a signal or a `stop` on the
    control socket."""
    async with trio.open_nursery() as nursery:
        array = Array(
            config.name,
            nursery,
            alg=config.alg,
            options=config.options,
            state_dir=None,  # do not rewrite the state while loading it
            connections=connections,
            # now: never stat it once mounted
            mountpoint=os.path.realpath(mountpoint) if mountpoint is not None else None,
        )

        services: _Services | None = None

        async def give_up(message: str) -> None:
            ready(message)
            if services is not None:
                await services.stop()
            await array.aclose()
            nursery.cancel_scope.cancel()

        try:
            for entry in config.nodes:
                if entry.serve is not None:
                    uri = await _serve_embedded(nursery, entry.serve)
                    spec = parse_node(uri).with_size(entry.size)
                else:
                    assert entry.uri is not None
                    spec = parse_node(entry.uri)
                try:
                    await array.add_node(spec, entry)
                except ArrayError as e:
                    if not (array.alg.redundant and spec.is_remote and _unreachable(e)):
                        raise
                    backend = NbdBackend(spec, nursery, connections)
                    array.add_unreachable_replica(spec, entry, backend, e.strerror or str(e))
            if array.nodes and all(not n.ready for n in array.nodes):
                raise ArrayError(errno.EHOSTUNREACH, "no replica of the mirror is reachable")
            if array.replicas is not None:
                for node in array.nodes:  # known now: the disk's size
                    if isinstance(node.backend, NbdBackend) and not node.ready:
                        node.backend.min_size = array.size
            for node, entry in zip(array.nodes, array.entries, strict=True):
                if entry.timeout is not None:  # saved through n-*/timeout
                    node.timeout = entry.timeout
        except (ArrayError, OSError, ValueError) as e:
            await give_up(f"cannot open node: {e.strerror if isinstance(e, OSError) else e}")
            return
        array.state_dir = state_dir
        array.generation = config.generation
        try:
            array.persist()  # also upgrades an older state format in place
            if array.replicas is not None:
                array.replicas.start(config.generation, list(array.entries), force_replica)
        except ArrayError as e:
            await give_up(f"cannot write the state in {state_dir}: {e.strerror}")
            return
        except (ValueError, OSError) as e:
            await give_up(f"{config.name}: {e}")
            return
        services = _Services(nursery)
        if exports is not None and exports.addresses:
            try:
                await services.start(serve_exports, array, exports)
            except OSError as e:
                await give_up(f"cannot export: {e.strerror or e}")
                return
        control = ControlTree(array)
        stop = trio.Event()
        try:
            await services.start(
                serve_control,
                state_dir / SOCKET_NAME,
                control,
                stop.set if mountpoint is None else None,
                f"mounted on {mountpoint}: stop it with `dstfs umount {mountpoint}`",
            )
        except OSError as e:
            await give_up(f"cannot open the control socket in {state_dir}: {e.strerror or e}")
            return
        if mountpoint is None:
            try:
                ready("ok")
                log.info("%s: running without FUSE (%d bytes)", config.name, array.size)
                nursery.start_soon(_stop_on_signal, stop.set)
                await stop.wait()
            finally:
                with trio.CancelScope(shield=True):
                    log.info("%s: stopping: flushing and disconnecting nodes", config.name)
                    await services.stop()
                    await array.aclose()
                nursery.cancel_scope.cancel()
            log.info("%s: stopped", config.name)
            return
        ops = DstFs(array, control)
        options = set(pyfuse3.default_options) | {
            f"fsname=dstfs:{config.name}",
            "subtype=dstfs",
        }
        if os.getuid() == 0:
            options.add("allow_other")
        # Resolve paths now: once mounted, a stat of the mount point from this
        # process would wait for this process (a deadlock).
        real_mountpoint = os.path.realpath(mountpoint)
        reg = registry_path(real_mountpoint)
        # `dstfs mount` checked this already; checked again right before
        # mounting, so two racing mounts rarely stack (the kernel would).
        if mountinfo.mount_at(real_mountpoint) is not None:
            await give_up(f"{mountpoint}: already a mount point (busy)")
            return
        try:
            pyfuse3.init(ops, mountpoint, options)
        except RuntimeError as e:
            await give_up(f"cannot mount on {mountpoint}: {e}")
            return
        try:
            write_registry(reg, os.getpid(), state_dir, mountpoint)
            _raise_max_background(real_mountpoint)
            ready("ok")
            log.info("%s: mounted on %s (%d bytes)", config.name, mountpoint, array.size)
            nursery.start_soon(_stop_on_signal, pyfuse3.terminate)
            await pyfuse3.main(min_tasks=4, max_tasks=128)
        finally:
            with trio.CancelScope(shield=True):
                log.info("%s: unmounting: flushing and disconnecting nodes", config.name)
                await services.stop()
                await array.aclose()
                pyfuse3.close(unmount=True)
                remove_registry(reg)
            nursery.cancel_scope.cancel()
    log.info("%s: stopped", config.name)


class _Services:
    """Servers beside the FUSE mount (the NBD export, the control socket),
    each in one cancel scope, so they can all be stopped, and waited for,
    before the array is closed."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.scopes: list[trio.CancelScope] = []
        self.stopped = False
        self.running = 0
        self.idle = trio.Event()
        self.idle.set()

    async def start(self, fn, *args):  # type: ignore[no-untyped-def]
        """Start `fn(*args, task_status=...)` like nursery.start; its value."""
        return await self.nursery.start(self._run, fn, *args)

    async def _run(self, fn, *args, task_status=trio.TASK_STATUS_IGNORED):  # type: ignore[no-untyped-def]
        self.running += 1
        self.idle = trio.Event()
        scope = trio.CancelScope()
        self.scopes.append(scope)
        if self.stopped:
            scope.cancel()
        try:
            with scope:
                await fn(*args, task_status=task_status)
        finally:
            self.running -= 1
            if self.running == 0:
                self.idle.set()

    async def stop(self) -> None:
        with trio.CancelScope(shield=True):
            self.stopped = True
            for scope in self.scopes:
                scope.cancel()
            await self.idle.wait()


def _unreachable(e: OSError) -> bool:
    """A server that is down or cut off, as opposed to one that answered
    with something wrong (too small, read-only, bad URI)."""
    return e.errno in (
        errno.ECONNREFUSED,
        errno.ETIMEDOUT,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ECONNRESET,
        errno.ENOENT,  # a unix socket not there (yet)
    )


async def _stop_on_signal(stop: Callable[[], object]) -> None:
    # SIGHUP too: a --foreground daemon whose terminal closes unmounts cleanly.
    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        async for signum in signals:
            log.info("signal %s: stopping", signal.Signals(signum).name)
            stop()
            return


MAX_BACKGROUND = 128


def _raise_max_background(real_mountpoint: str) -> None:
    """Let the kernel keep more async requests (loop's direct I/O) in flight
    than its default 12. Found via /proc/self/mountinfo: statting the mount
    point from this process could deadlock it."""
    if os.getuid() != 0:
        return
    found = mountinfo.mount_at(real_mountpoint)
    try:
        mountinfo.ensure_fusectl()
        if found is not None and found.is_fuse:
            conn = mountinfo.FUSECTL / found.minor
            (conn / "max_background").write_text(str(MAX_BACKGROUND))
            (conn / "congestion_threshold").write_text(str(MAX_BACKGROUND * 3 // 4))
            log.debug("fuse connection %s: max_background %d", found.minor, MAX_BACKGROUND)
    except OSError as e:
        log.info("could not raise max_background: %s", e)
