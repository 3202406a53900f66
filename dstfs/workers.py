"""`dstfs serve --workers N`: one listening address, N server processes.

Why: one trio thread serves every connection of a process, and with TLS it
also decrypts and encrypts every byte, so one core is the limit. Threads do
not lift it: they share the GIL, and a worker thread that decrypted large
payloads doubled the CPU per request (bench/RESULTS.md). Processes do.

Rules:
- The parent has bound (serve.bound) before anything else ran (no trio run
  and no thread exists yet, so nothing half made crosses fork()), forks
  the workers, and from then on only accepts. `--allow` and `--max-connections` are applied
  there, over all workers; a connection that passes goes, with its peer's
  name, to the worker serving the fewest (SCM_RIGHTS over a socketpair per
  worker), and is served there to its end by that worker's own NbdServer
  (its own payload pool: PAYLOAD_MEMORY holds per worker). A worker out
  of descriptors gets the peer's name without the connection (the kernel
  closes it): it logs the refusal and tells the parent it ended.
- SIGINT, SIGTERM and SIGHUP stop the parent cleanly from the moment it binds
  (serve.bound blocks them until its trio run receives them).
- Every process shares the export's one open file, so a FLUSH (fdatasync)
  on any connection covers the writes completed by every worker, and
  CAN_MULTI_CONN still holds.
- Workers ignore those signals (a Ctrl-C, a hangup or systemd reaches the whole
  group): they stop when their channel to the parent ends (an end of file,
  or ECONNRESET when the parent left messages unread), which is how the
  parent stops them, and what happens when the parent dies, even by
  SIGKILL. A worker that stops ends its connections, flushes the export
  and exits.
- A worker that dies on its own is an error (its channel ends, with
  ECONNRESET if it left connections unread): the parent logs which one and
  how it ended, stops the others and exits with status 1 (its clients lost
  their connections; a supervisor restarts the server). So does a stop that
  had to kill a worker after STOP_GRACE (it may not have flushed).
- A connection goes to the next least busy worker when one cannot take it
  (its channel full: stopped, or far behind); refused only when none can.
- Log lines from a worker start with `worker N:`.
"""

from __future__ import annotations

import array
import contextlib
import logging
import os
import signal
import socket
import time

import attrs
import trio

from dstfs.nbd.server import NbdServer
from dstfs.serve import (
    STOP_SIGNALS,
    ServeConfig,
    accept_until_stopped,
    close_export,
)

log = logging.getLogger(__name__)

#: The most workers `--workers` takes.
MAX_WORKERS = 64
#: Seconds the parent waits for stopped workers before it kills them.
STOP_GRACE = 30.0
_FD_SIZE = array.array("i").itemsize


@attrs.define
class _Worker:
    number: int
    pid: int
    #: The parent's end of the socketpair (SOCK_SEQPACKET).
    channel: socket.socket
    #: Connections handed to it that have not ended.
    active: int = 0


def run_workers(cfg: ServeConfig, workers: int, socks: list[socket.socket]) -> int:
    """Fork `workers` workers, accept on `socks` (see serve.bound) until a stop signal or a
    worker's death; the exit status (0, or 1 when a worker died or had to
    be killed at the stop, so it may not have flushed)."""
    pool: list[_Worker] = []
    failed = unclean = False
    try:
        for number in range(1, workers + 1):
            pool.append(_fork_worker(number, cfg, socks, pool))
        failed = trio.run(_accept, cfg, socks, pool)
    finally:
        for sock in socks:
            sock.close()  # no connection comes that no one takes
        unclean = not _stop(pool)
        cfg.backend.close()  # each worker flushed what it wrote
    return 1 if failed or unclean else 0


def _fork_worker(
    number: int, cfg: ServeConfig, socks: list[socket.socket], pool: list[_Worker]
) -> _Worker:
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:  # the worker: never returns
        status = 1
        for handler in logging.getLogger().handlers:  # first: its failure says who
            handler.addFilter(_Prefix(f"worker {number}: "))
        try:
            parent_end.close()
            for sock in socks:
                sock.close()
            for other in pool:
                other.channel.close()
            status = _worker_main(child_end, cfg)
        except BaseException:
            log.exception("failed")
        finally:
            logging.shutdown()
            os._exit(status)
    child_end.close()
    log.info("worker %d: started, pid %d", number, pid)
    return _Worker(number, pid, parent_end)


async def _accept(cfg: ServeConfig, socks: list[socket.socket], pool: list[_Worker]) -> bool:
    """The parent's trio run: True when a worker died."""
    server = cfg.server(serves=False)
    server.hand_off = lambda raw, peer: _hand_off(pool, raw, peer)
    died: list[_Worker] = []
    async with trio.open_nursery() as nursery:
        for w in pool:
            nursery.start_soon(_watch, w, server, died, nursery.cancel_scope)
        how, stopping = f" with {len(pool)} workers", "stopping the workers"
        await accept_until_stopped(server, cfg, socks, how=how, stopping=stopping)
        nursery.cancel_scope.cancel()  # the watchers: a stop is no worker's death
    return bool(died)


def _hand_off(pool: list[_Worker], raw: socket.socket, peer: str) -> bool:
    """Send `raw` to the worker serving the fewest connections that takes
    it; False when none does."""
    fds = array.array("i", [raw.fileno()])
    for w in sorted(pool, key=lambda w: w.active):  # stable: the lowest number on a tie
        try:
            w.channel.sendmsg([peer.encode()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        except OSError as e:  # BlockingIOError: the worker stopped reading its channel
            log.warning("%s: worker %d cannot take it: %s", peer, w.number, e.strerror or e)
            continue
        w.active += 1
        return True
    log.error("%s: refused: no worker takes it", peer)
    return False


async def _watch(
    w: _Worker, server: NbdServer, died: list[_Worker], scope: trio.CancelScope
) -> None:
    """Count the connections `w` says have ended; its channel's end means
    the worker is gone: stop everything."""
    channel = trio.socket.from_stdlib_socket(w.channel)
    with contextlib.suppress(ConnectionResetError):  # it went with connections unread
        while await channel.recv(64):
            w.active -= 1
            server.handed_connection_ended()
    pid, status = await trio.to_thread.run_sync(os.waitpid, w.pid, 0)
    w.pid = 0  # reaped
    log.error(
        "worker %d (pid %d) ended on its own (%s): stopping the server",
        w.number,
        pid,
        _describe(status),
    )
    died.append(w)
    scope.cancel()


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


def _stop(pool: list[_Worker]) -> bool:
    """Close every channel (the workers' signal to stop) and reap them;
    SIGKILL for one that is still there after STOP_GRACE. True when every
    worker ended by itself with status 0."""
    clean = True
    for w in pool:
        w.channel.close()
    deadline = time.monotonic() + STOP_GRACE
    for w in pool:
        killed = False  # one grace for all; each one still there is killed
        while w.pid:
            pid, status = os.waitpid(w.pid, os.WNOHANG)
            if pid:
                if status:
                    log.warning("worker %d: %s", w.number, _describe(status))
                    clean = False
                w.pid = 0
            elif not killed and time.monotonic() > deadline:
                log.error("worker %d (pid %d): still running, killing it", w.number, w.pid)
                os.kill(w.pid, signal.SIGKILL)
                killed = True
            else:
                time.sleep(0.02)
    return clean


class _Prefix(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = f"{self.prefix}{record.msg}"
        return True


def _worker_main(channel: socket.socket, cfg: ServeConfig) -> int:
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked by serve.bound
    server = cfg.server(accepts=False)
    trio.run(_serve_handed, server, channel, cfg)
    return 0


async def _serve_handed(server: NbdServer, channel: socket.socket, cfg: ServeConfig) -> None:
    """A worker's trio run: serve what the parent hands over until the
    channel ends; then flush the export."""
    tchannel = trio.socket.from_stdlib_socket(channel)
    sending = trio.Lock()  # one sender at a time on the channel

    async def ended() -> None:
        """Tell the parent one connection handed here has ended."""
        with contextlib.suppress(OSError):
            async with sending:
                await tchannel.send(b"e")

    async def serve(raw: socket.socket, peer: str) -> None:
        try:
            await server.serve_one(raw, peer)
        finally:
            await ended()

    try:
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    msg, anc, flags, _ = await tchannel.recvmsg(1024, socket.CMSG_SPACE(_FD_SIZE))
                except ConnectionResetError:
                    break  # the parent went with our word of an ended connection unread
                fds = [
                    fd
                    for level, kind, data in anc
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
                    for fd in array.array("i", data[: len(data) - len(data) % _FD_SIZE])
                ]
                if not msg and not fds:
                    break  # the parent stops us, or is gone
                peer = msg.decode(errors="replace")
                if not fds:
                    # A worker with no descriptor free gets the message but not
                    # the connection: the kernel closed it (MSG_CTRUNC). Refused,
                    # as accept() out of descriptors refuses in a single server;
                    # the parent still counts it until told.
                    server.stats.refused += 1
                    log.error(
                        "%s: refused: no descriptor free to take the connection%s",
                        peer,
                        " (MSG_CTRUNC)" if flags & socket.MSG_CTRUNC else "",
                    )
                    nursery.start_soon(ended)
                for fd in fds:
                    nursery.start_soon(serve, socket.socket(fileno=fd), peer)
            log.info("stopping: the parent closed the channel")
            nursery.cancel_scope.cancel()
    finally:
        await close_export(cfg)
