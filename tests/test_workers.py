"""`dstfs serve --workers N` as users run it: a real process tree, real
clients (nbdcopy over TLS, the dstfs client, raw sockets), and the ways it
ends: SIGTERM, SIGHUP, the parent killed, a worker killed."""

from __future__ import annotations

import contextlib
import filecmp
import functools
import os
import random
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers.certs import client_dir
from helpers.load import wait_for
from helpers.procs import DSTFS, free_port, need, wait_port, wait_unix

from dstfs.commands import process_alive
from dstfs.nbd.client import open_client

MiB = 1024 * 1024
GREETING = b"NBDMAGIC"


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid`."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(entry))
    return kids


class Served:
    """`dstfs -v serve PATH --workers N ...`, its log in PATH.log, its workers
    found under it; everything is gone when the block ends."""

    def __init__(
        self,
        path: Path,
        workers: int,
        extra: list[str],
        unix: Path | None,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.path, self.log = path, path.with_suffix(".log")
        self.port = None if unix else free_port()
        where = ["--unix", str(unix)] if unix else ["--listen", f"127.0.0.1:{self.port}"]
        argv = [*DSTFS, "-v", "serve", str(path), "--size", "64M", "--workers", str(workers)]
        with self.log.open("w") as out:
            self.proc = subprocess.Popen([*argv, *where, *extra], stderr=out, preexec_fn=preexec_fn)
        try:
            if unix:
                wait_unix(unix, self.proc)
            else:
                wait_port(self.port, self.proc)  # type: ignore[arg-type]
            wait_for(lambda: len(children(self.proc.pid)) == workers, "workers started")
        except BaseException:
            self.close()
            raise
        self.workers = children(self.proc.pid)

    @property
    def uri(self) -> str:
        return f"nbd://127.0.0.1:{self.port}"

    def text(self) -> str:
        return self.log.read_text()

    def close(self) -> None:
        kids = children(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in kids:
            with contextlib.suppress(ProcessLookupError):
                if process_alive(pid):
                    os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def served(
    tmp_path: Path,
    workers: int = 2,
    extra: tuple[str, ...] = (),
    unix: Path | None = None,
    preexec_fn: Callable[[], None] | None = None,
) -> Iterator[Served]:
    s = Served(tmp_path / "d.img", workers, list(extra), unix, preexec_fn)
    try:
        yield s
    finally:
        s.close()


def greeted(port: int) -> socket.socket | None:
    """A connection that got the server's greeting, or None: closed unread."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    got = b""
    while len(got) < len(GREETING):
        chunk = sock.recv(len(GREETING) - len(got))
        if not chunk:
            sock.close()
            return None
        got += chunk
    assert got == GREETING
    return sock


def served_by(log: str) -> set[str]:
    """The workers that logged a client connected."""
    return set(re.findall(r"(worker \d+): \S+: client connected", log))


async def test_two_workers_share_clients_and_the_file(tmp_path: Path) -> None:
    """Two dstfs clients land on different workers; what one writes the
    other reads, and a FLUSH on either reaches the file."""
    with served(tmp_path) as s:
        data = random.randbytes(4 * MiB)
        async with open_client(s.uri) as a, open_client(s.uri) as b:
            await a.pwrite(MiB, data)
            assert bytes(await b.pread(MiB, len(data))) == data
            await b.flush()
        with s.path.open("rb") as f:
            f.seek(MiB)
            assert f.read(len(data)) == data
        wait_for(lambda: len(served_by(s.text())) == 2, "both workers served a client")


def test_nbdcopy_over_tls_through_workers(tmp_path: Path, pki: Path) -> None:
    """nbdcopy (libnbd, GnuTLS) with two connections over TLS: in and out
    again byte for byte."""
    nbdcopy = need("nbdcopy")
    cdir = client_dir(pki, tmp_path / "client", with_client_cert=False)
    tls = ["--tls-cert", str(pki / "server-cert.pem"), "--tls-key", str(pki / "server-key.pem")]
    src, back = tmp_path / "src.img", tmp_path / "back.img"
    src.write_bytes(random.randbytes(64 * MiB))
    with served(tmp_path, extra=tuple(tls)) as s:
        uri = f"nbds://127.0.0.1:{s.port}/?tls-certificates={cdir}"
        subprocess.run([nbdcopy, "-C", "2", str(src), uri], check=True, timeout=300)
        subprocess.run([nbdcopy, "-C", "2", uri, str(back)], check=True, timeout=300)
        assert served_by(s.text()) == {"worker 1", "worker 2"}
    assert filecmp.cmp(src, back, shallow=False)
    assert filecmp.cmp(src, s.path, shallow=False)


def test_max_connections_holds_over_all_workers(tmp_path: Path) -> None:
    with served(tmp_path, extra=("--max-connections", "2")) as s:
        assert s.port is not None
        held: list[socket.socket] = []
        try:
            # The listening probe may still count for a moment: retry until let in.
            while len(held) < 2:
                sock = greeted(s.port)
                if sock is not None:
                    held.append(sock)
            assert greeted(s.port) is None  # a third: closed without a greeting
            held.pop().close()

            def let_in() -> bool:
                sock = greeted(s.port)  # type: ignore[arg-type]
                if sock is not None:
                    held.append(sock)
                return sock is not None

            wait_for(let_in, "a connection let in after one ended")
        finally:
            for sock in held:
                sock.close()
        assert "refused: 2 connections already (--max-connections)" in s.text()


def test_allow_is_applied_by_the_parent(tmp_path: Path) -> None:
    with served(tmp_path, extra=("--allow", "192.0.2.0/24")) as s:
        assert s.port is not None
        assert greeted(s.port) is None
        assert "127.0.0.1" in s.text() and "not in --allow" in s.text()
        assert not served_by(s.text())


def test_sigterm_stops_every_process_and_removes_the_socket(tmp_path: Path) -> None:
    unix = tmp_path / "nbd.sock"
    with served(tmp_path, unix=unix) as s:
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(60) == 0
        wait_for(lambda: not any(process_alive(p) for p in s.workers), "workers gone")
        assert not unix.exists()
        assert s.text().count("stopping: the parent closed the channel") == 2


def test_a_hangup_of_the_whole_group_is_a_clean_stop(tmp_path: Path) -> None:
    """A closing terminal sends SIGHUP to every process of the group: the
    parent stops its workers as on SIGTERM, and no worker dies of it."""
    unix = tmp_path / "nbd.sock"
    with served(tmp_path, unix=unix, preexec_fn=os.setsid) as s:
        os.killpg(s.proc.pid, signal.SIGHUP)
        assert s.proc.wait(60) == 0, s.text()
        wait_for(lambda: not any(process_alive(p) for p in s.workers), "workers gone")
        assert not unix.exists()
        assert "signal SIGHUP: stopping the workers" in s.text()
        assert s.text().count("stopping: the parent closed the channel") == 2
        assert "ended on its own" not in s.text()


def test_a_hangup_stops_one_process_cleanly(tmp_path: Path) -> None:
    unix = tmp_path / "nbd.sock"
    log = tmp_path / "d.log"
    argv = [*DSTFS, "-v", "serve", str(tmp_path / "d.img"), "--size", "1M", "--unix", str(unix)]
    with log.open("w") as out:
        proc = subprocess.Popen(argv, stderr=out, start_new_session=True)
    try:
        wait_unix(unix, proc)
        os.killpg(proc.pid, signal.SIGHUP)
        assert proc.wait(60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "signal SIGHUP: stopping" in log.read_text()
    assert not unix.exists()


def test_workers_stop_when_the_parent_is_killed(tmp_path: Path) -> None:
    with served(tmp_path) as s:
        s.proc.kill()
        s.proc.wait(30)
        wait_for(
            lambda: not any(process_alive(p) for p in s.workers), "workers gone after the parent"
        )


def test_a_dead_worker_stops_the_server(tmp_path: Path) -> None:
    with served(tmp_path) as s:
        victim, other = s.workers
        os.kill(victim, signal.SIGKILL)
        assert s.proc.wait(60) == 1
        wait_for(lambda: not process_alive(other), "the other worker gone")
        assert re.search(
            rf"worker \d \(pid {victim}\) ended on its own \(killed by SIGKILL\)", s.text()
        )


@pytest.mark.parametrize("value", ["0", "65", "two", "-1"])
def test_bad_worker_counts(tmp_path: Path, value: str) -> None:
    res = subprocess.run(
        [*DSTFS, "serve", str(tmp_path / "d.img"), "--size", "1M", "--workers", value],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 2
    assert "--workers: wants a whole number from 1 to 64" in res.stderr
    assert not (tmp_path / "d.img").exists()


def test_sigterm_as_soon_as_it_listens_is_a_clean_stop(tmp_path: Path) -> None:
    """A supervisor or script may stop the server as soon as its socket
    accepts, which is before the parent's trio run can receive signals
    (the workers are forked in between): that stop is still a clean one."""
    unix = tmp_path / "nbd.sock"
    log = tmp_path / "d.log"
    argv = [*DSTFS, "-v", "serve", str(tmp_path / "d.img"), "--size", "1M", "--workers", "4"]
    for _ in range(2):  # the window is short: try it more than once
        with log.open("w") as out:
            proc = subprocess.Popen([*argv, "--unix", str(unix)], stderr=out)
        try:
            while True:  # the signal must come as early as it can
                assert proc.poll() is None, log.read_text()
                with socket.socket(socket.AF_UNIX) as probe, contextlib.suppress(OSError):
                    probe.connect(str(unix))
                    break
                time.sleep(0.001)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0, log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert "signal SIGTERM: stopping the workers" in log.read_text()
        assert not unix.exists()


def test_a_worker_out_of_descriptors_refuses_and_tells_the_parent(tmp_path: Path) -> None:
    """A descriptor handed to a worker whose table is full is closed by the
    kernel on the way (MSG_CTRUNC). As a single server out of descriptors
    does, the worker logs that it refused the connection, and it tells the
    parent the connection ended, or --max-connections would count it for
    ever."""

    def few_fds() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (32, 32))  # a worker keeps about 12

    with served(tmp_path, extra=("--max-connections", "60"), preexec_fn=few_fds) as s:
        assert s.port is not None

        def burst() -> int:
            """Hold 60 connections at once; how many were closed unserved."""
            held = [socket.create_connection(("127.0.0.1", s.port), 30) for _ in range(60)]
            try:
                return sum(not h.recv(len(GREETING), socket.MSG_WAITALL) for h in held)
            finally:
                for h in held:
                    h.close()

        def all_ended() -> bool:
            text = s.text()
            return text.count("client connected") == text.count("client disconnected")

        dropped = burst()
        assert dropped, "no connection was refused: the limit did not bite"
        wait_for(lambda: s.text().count(": refused: ") == dropped, "every refusal logged", 20)
        assert "no descriptor free" in s.text()

        def none_over_max() -> bool:
            """Once the last burst ended, the parent counts none of it."""
            wait_for(all_ended, "the connections of the last burst ended")
            before = s.text().count("(--max-connections)")
            burst()
            return s.text().count("(--max-connections)") == before

        wait_for(none_over_max, "a burst of --max-connections with none refused", 20)
        assert s.proc.poll() is None


def settled(proc: subprocess.Popen, log: Path, port: int) -> bool:
    """Whether `proc` has exited, greets, or refuses for want of descriptors."""
    if proc.poll() is not None or "accept failed" in log.read_text():
        return True
    with contextlib.suppress(OSError):
        sock = greeted(port)
        if sock is not None:
            sock.close()
            return True
    return False


def test_too_few_descriptors_to_start_is_one_line(tmp_path: Path) -> None:
    """`ulimit -n` too small for the parent's trio run, or a worker's, is a
    one-line error and exit status 1, as for a single server (no traceback
    from the CLI); a limit that lets it start serves."""
    argv = [*DSTFS, "-v", "serve", str(tmp_path / "d.img"), "--size", "1M", "--workers", "2"]
    for limit in range(8, 20):
        log, port = tmp_path / f"{limit}.log", free_port()
        with log.open("w") as out:
            proc = subprocess.Popen(
                [*argv, "--listen", f"127.0.0.1:{port}"],
                stderr=out,
                preexec_fn=functools.partial(
                    resource.setrlimit, resource.RLIMIT_NOFILE, (limit, limit)
                ),
            )
        try:
            wait_for(functools.partial(settled, proc, log, port), f"ulimit -n {limit}: settled")
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(60) == 0, log.read_text()
                return
            text = log.read_text()
            assert proc.returncode == 1, text
            # A worker that failed logs its traceback; the CLI says one line.
            assert text.splitlines()[-1].startswith("dstfs serve: cannot serve "), text
            assert "Exception Group" not in text
            assert not re.search(r"worker \d: worker \d:", text)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    pytest.fail("never started, even with 19 descriptors")


def test_stop_kills_every_worker_still_there_after_the_grace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """_stop with two workers that do not stop (here: processes that never
    read a channel, as a stopped or hung worker): both are killed once the
    grace is over, not only the first (the parent then waited for ever)."""
    from dstfs import workers

    monkeypatch.setattr(workers, "STOP_GRACE", 0.2)
    stuck = [subprocess.Popen(["sleep", "600"]) for _ in range(2)]
    pairs = [socket.socketpair() for _ in stuck]
    pool = [
        workers._Worker(n, p.pid, pair[0]) for n, p, pair in zip((1, 2), stuck, pairs, strict=True)
    ]
    clean: list[bool] = []
    stopper = threading.Thread(target=lambda: clean.append(workers._stop(pool)), daemon=True)
    try:
        stopper.start()
        stopper.join(20)
        assert not stopper.is_alive(), "_stop still waits for a worker it did not kill"
        assert [w.pid for w in pool] == [0, 0]
        assert clean == [False]  # killed: they may not have flushed, so exit status 1
    finally:
        for p in stuck:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
        stopper.join(30)
        for pair in pairs:
            pair[1].close()


def unread_news(ss: str, pid: int) -> bool:
    """Whether a channel end of process `pid` holds a message unread (ss -x)."""
    out = subprocess.run([ss, "-xpn"], capture_output=True, text=True, check=True).stdout
    return any(
        line.startswith("u_seq") and f"pid={pid}," in line and int(line.split()[2]) > 0
        for line in out.splitlines()
    )


def test_workers_stop_cleanly_when_the_parent_goes_with_news_unread(tmp_path: Path) -> None:
    """A worker's word that a connection ended may wait unread in the
    parent's end of the channel when the parent goes (here: stopped, then
    killed; or a connection ending during a SIGTERM). The worker then reads
    ECONNRESET, not an end of file: the parent is gone all the same, and
    the worker stops as it does then, not with a traceback and status 1."""
    ss = need("ss")
    with served(tmp_path) as s:
        assert s.port is not None
        sock = greeted(s.port)
        assert sock is not None
        s.proc.send_signal(signal.SIGSTOP)
        try:
            sock.close()
            wait_for(lambda: unread_news(ss, s.proc.pid), "the word waits in the parent's channel")
        finally:
            s.proc.kill()
            s.proc.wait(30)
        wait_for(
            lambda: not any(process_alive(p) for p in s.workers), "workers gone after the parent"
        )
        text = s.text()
        assert text.count("stopping: the parent closed the channel") == 2, text
        assert "Traceback" not in text


def test_a_worker_dying_with_a_connection_unread_stops_the_server(tmp_path: Path) -> None:
    """A worker that dies with a handed connection still unread in its
    channel resets the parent's end (ECONNRESET, not an end of file): that
    is a worker's death all the same, said as such, exit status 1."""
    ss = need("ss")
    with served(tmp_path) as s:
        assert s.port is not None
        for pid in s.workers:
            os.kill(pid, signal.SIGSTOP)
        client = socket.create_connection(("127.0.0.1", s.port), 30)
        try:
            wait_for(
                lambda: any(unread_news(ss, p) for p in s.workers), "a connection waits unread"
            )
            victim = next(p for p in s.workers if unread_news(ss, p))
            os.kill(victim, signal.SIGKILL)
        finally:
            for pid in s.workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
            client.close()
        assert s.proc.wait(60) == 1
        assert re.search(
            rf"worker \d \(pid {victim}\) ended on its own \(killed by SIGKILL\)", s.text()
        ), s.text()


def test_hand_off_goes_to_the_next_worker_when_one_cannot_take_it() -> None:
    """A worker whose channel is full (stopped, or far behind) does not cost
    the client its connection: the next least busy worker gets it; only
    when none can take it is it refused."""
    from dstfs import workers

    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(2)]
    try:
        pool = [workers._Worker(n, 0, pair[0]) for n, pair in zip((1, 2), pairs, strict=True)]
        for w in pool:
            w.channel.setblocking(False)
        with socket.socket() as raw:
            with contextlib.suppress(BlockingIOError):
                while True:  # worker 1, the least busy, never reads
                    pool[0].channel.send(b"x")
            assert workers._hand_off(pool, raw, "192.0.2.7:1234")
            assert (pool[0].active, pool[1].active) == (0, 1)
            msg, anc, _, _ = pairs[1][1].recvmsg(64, socket.CMSG_SPACE(4))
            assert msg == b"192.0.2.7:1234" and anc and anc[0][1] == socket.SCM_RIGHTS
            os.close(int.from_bytes(anc[0][2][:4], sys.byteorder))  # the copy it carried
            with contextlib.suppress(BlockingIOError):
                while True:
                    pool[1].channel.send(b"x")
            assert not workers._hand_off(pool, raw, "192.0.2.7:1235")
    finally:
        for pair in pairs:
            for sock in pair:
                sock.close()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_an_address_that_cannot_be_bound_creates_no_file(tmp_path: Path, workers: str) -> None:
    """Bad input changes nothing: the address is bound before `--size`
    creates the export, so a busy port or a unix socket in a missing
    directory is one line and no new file, with one process or several."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for where in (
            ["--listen", f"127.0.0.1:{port}"],
            ["--unix", str(tmp_path / "no-such-dir" / "nbd.sock")],
        ):
            img = tmp_path / "new.img"
            res = subprocess.run(
                [*DSTFS, "serve", str(img), "--size", "1M", "--workers", workers, *where],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert res.returncode == 1, res.stderr
            lines = res.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("dstfs serve: cannot serve "), lines
            assert not img.exists()
