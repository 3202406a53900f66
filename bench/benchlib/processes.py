"""Processes, servers, mounts and loop devices of a bench run.

Every child runs in its own process group with PR_SET_PDEATHSIG, its output in
a log file; everything `Env` sets up registers its teardown on an ExitStack,
so an error or Ctrl-C leaves nothing behind. Small helpers for subprocesses,
mountinfo and loop devices read /proc and /sys and never stat a mount point."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import LOOPBACK, POLL_S, PR_SET_PDEATHSIG, BenchError, Config, fmt_size

log = logging.getLogger("bench")


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago (bind to port 0, then release)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


def one_line(text: str, limit: int = 200) -> str:
    text = " | ".join(part.strip() for part in text.strip().splitlines() if part.strip())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run_proc(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """subprocess.run in a process group of its own, killing the whole group on timeout or
    interrupt (fio forks its job processes; killing only the parent would leave them running).
    """
    with subprocess.Popen(
        args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        process_group=0,
        preexec_fn=_child_setup,
    ) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)


def run_cmd(argv: Sequence[str | Path], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a short command; raise BenchError (with its stderr) if it fails or hangs."""
    args = [str(a) for a in argv]
    log.debug("run: %s", " ".join(args))
    try:
        r = run_proc(args, timeout)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"{args[0]} timed out after {timeout:.0f}s") from e
    except OSError as e:
        raise BenchError(f"{args[0]}: {e}") from e
    if r.returncode != 0:
        raise BenchError(f"{' '.join(args[:3])} failed rc={r.returncode}: {one_line(r.stderr)}")
    return r


def try_cmd(argv: Sequence[str | Path], timeout: float = 60) -> bool:
    """Run a teardown command, logging instead of raising; True when it succeeded."""
    try:
        run_cmd(argv, timeout)
    except BenchError as e:
        log.debug("%s", e)
        return False
    return True


def safe(what: str, fn: Callable[..., Any], *args: Any) -> Callable[[], None]:
    """Wrap a teardown step so that its failure is logged and the other steps still run."""

    def call() -> None:
        try:
            fn(*args)
        except Exception as e:
            log.warning("teardown: %s failed: %s", what, e)

    return call


def unescape_mountinfo(field_text: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field_text)


def mountpoints() -> list[str]:
    """Mount points from /proc/self/mountinfo (no request reaches any FUSE daemon)."""
    with open("/proc/self/mountinfo") as f:
        return [unescape_mountinfo(line.split()[4]) for line in f if line.strip()]


def is_mounted(path: Path) -> bool:
    return str(path) in mountpoints()


def loop_backing_files() -> dict[str, str]:
    out: dict[str, str] = {}
    for bf in Path("/sys/block").glob("loop*/loop/backing_file"):
        with contextlib.suppress(OSError):
            out["/dev/" + bf.parent.parent.name] = bf.read_text().strip()
    return out


def vm_hwm_mib(pid: int) -> float | None:
    """Peak resident set size (VmHWM) of a live process, in MiB."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (which may hold spaces and
    parentheses: split after its last ')'), or None for a process that is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def _cpu(fields: list[str]) -> float:
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_seconds(pid: int) -> float | None:
    """CPU time (utime + stime, every thread's, dead threads included) of a live process."""
    fields = _stat(pid)
    return None if fields is None else _cpu(fields)


def tree_cpu_seconds(pid: int) -> float | None:
    """CPU time of a live process and of its live children (see cpu_seconds)."""
    own = cpu_seconds(pid)
    if own is None:
        return None
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields is not None and int(fields[1]) == pid:
                own += _cpu(fields)
    return own


def loop_requests(dev: str, reads: bool) -> int | None:
    """Requests submitted to a block device so far, one direction (/sys/block/X/stat: completed
    plus merged, so that a merged pair counts as the two I/Os fio issued)."""
    try:
        fields = Path(f"/sys/block/{Path(dev).name}/stat").read_text().split()
    except OSError:
        return None
    done, merged = (0, 1) if reads else (4, 5)
    return int(fields[done]) + int(fields[merged])


def nbd_uri(port: int, tls: Path | None = None) -> str:
    """The URI of a server on loopback ``port``: ``nbds://`` with the client's
    ``tls-certificates`` directory (libnbd reads ca-cert.pem there) when ``tls`` is given."""
    if tls is None:
        return f"nbd://{LOOPBACK}:{port}"
    return f"nbds://{LOOPBACK}:{port}/?tls-certificates={tls}"


class CacheDropper:
    """``echo 3 > /proc/sys/vm/drop_caches`` in a child with a time limit.

    The write walks every superblock and waits for each one's lock; a hung FUSE mount anywhere
    on the machine (not only ours) holds that lock and would leave us in D state for as long
    as it lasts. So the write runs in a child; if it takes over ``timeout`` seconds we go on
    without it, and stop dropping caches for the rest of the run (the loop devices use direct
    I/O, so reads do not come from the page cache anyway).
    """

    def __init__(self, timeout: float = 10.0) -> None:
        self.timeout = timeout
        self.disabled: str | None = None
        self.drops = 0
        self.stuck: list[subprocess.Popen[bytes]] = []

    def __call__(self) -> None:
        if self.disabled:
            return
        child = subprocess.Popen(
            ["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"],
            stdin=subprocess.DEVNULL,
            process_group=0,
        )
        try:
            rc = child.wait(self.timeout)
        except subprocess.TimeoutExpired:
            child.kill()  # delivered once the lock is free; reaped at the end if possible
            self.stuck.append(child)
            self.disabled = f"drop_caches blocked over {self.timeout:.0f}s (hung FUSE mount?)"
            log.warning("%s: not dropping caches for the rest of the run", self.disabled)
            return
        if rc != 0:
            self.disabled = f"drop_caches failed rc={rc}"
            log.warning("%s: not dropping caches for the rest of the run", self.disabled)
            return
        self.drops += 1

    def reap(self) -> list[int]:
        """PIDs of drop_caches writers still stuck in the kernel."""
        return [c.pid for c in self.stuck if c.poll() is None]


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return ""


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """Ignore SIGINT/SIGTERM while tearing down, so a second Ctrl-C cannot leave debris."""
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


_LIBC = ctypes.CDLL(None, use_errno=True)


def _child_setup() -> None:
    # Runs in the child between fork and exec: die with the harness even if it is SIGKILLed.
    _LIBC.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


@dataclass
class Proc:
    name: str
    argv: list[str]
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def check(self) -> None:
        rc = self.popen.poll()
        if rc is not None:
            how = f"exited rc={rc}"
            if rc < 0:
                with contextlib.suppress(ValueError):
                    how = f"killed by {signal.Signals(-rc).name}"
            raise BenchError(f"{self.name} {how}: {one_line(tail(self.log, 1))}".rstrip(": "))

    def stop(self, grace: float = 0.0, timeout: float = 10.0) -> None:
        """Wait ``grace`` s for it to exit alone, then SIGTERM, then SIGKILL after ``timeout``."""
        if grace > 0:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(grace)
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) ignored SIGTERM, killing it", self.name, self.pid)
                self.popen.kill()
                self.popen.wait()

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "pid": self.pid, "argv": self.argv, "log": str(self.log)}


class Env:
    """Starts servers, mounts and loop devices, registering each teardown on an ExitStack."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.procs: list[Proc] = []
        self._seq = 0
        self.drop_caches = CacheDropper()

    def require_dstfs(self) -> str:
        if not self.cfg.dstfs:
            raise BenchError("dstfs executable not found (next to sys.executable or on PATH)")
        return self.cfg.dstfs

    def spawn(self, name: str, argv: Sequence[str | Path]) -> Proc:
        """Start a long-running child in its own process group, output to a log file."""
        self._seq += 1
        args = [str(a) for a in argv]
        logpath = self.cfg.logdir / f"{self._seq:02d}-{name}.log"
        log.debug("spawn %s: %s", name, " ".join(args))
        with open(logpath, "wb") as logf:
            try:
                popen = subprocess.Popen(
                    args,
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    process_group=0,
                    preexec_fn=_child_setup,
                )
            except OSError as e:
                raise BenchError(f"{name}: cannot start {args[0]}: {e}") from e
        proc = Proc(name, args, popen, logpath)
        self.procs.append(proc)
        return proc

    def spawn_server(self, stack: contextlib.ExitStack, name: str, argv: list[str]) -> Proc:
        proc = self.spawn(name, argv)
        stack.callback(safe(f"stop {name}", proc.stop))
        return proc

    def wait_nbd(self, uri: str, proc: Proc, expect: int | None, timeout: float = 30) -> int:
        """Poll with nbdinfo (a full handshake) until the server answers; return its size."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            proc.check()
            try:
                r = run_proc(["nbdinfo", "--size", uri], timeout=15)
            except subprocess.TimeoutExpired:
                last = "nbdinfo timed out"
                continue
            if r.returncode == 0:
                size = int(r.stdout.strip())
                if expect is not None and size != expect:
                    raise BenchError(f"{proc.name}: {uri} has size {size}, expected {expect}")
                return size
            last = one_line(r.stderr)
            time.sleep(0.05)
        raise BenchError(f"{proc.name}: {uri} not answering after {timeout:.0f}s: {last}")

    def nbdkit_memory(
        self,
        stack: contextlib.ExitStack,
        name: str,
        size: int,
        rate: str | None = None,
        unix: Path | None = None,
    ) -> tuple[str, Proc]:
        """``nbdkit memory`` on loopback TCP, or on the unix socket ``unix``."""
        argv = ["nbdkit", "-f", "--exit-with-parent"]
        if unix is None:
            port = free_port()
            argv += ["-p", str(port), "-i", LOOPBACK]
            uri = nbd_uri(port)
        else:
            argv += ["-U", str(unix)]
            uri = f"nbd+unix:///?socket={unix}"
        if rate is None:
            argv += ["memory", str(size)]
        else:
            # One request at a time, each held to the rate: a node with a slow disk
            # (the rate filter alone lets concurrent requests past its limit, and
            # its default 2 s burst after idling would inflate short jobs).
            argv += ["--filter=noparallel", "--filter=rate", "memory", str(size)]
            argv += [f"rate={rate}", "burstiness=0.2", "serialize=requests"]
        proc = self.spawn_server(stack, name, argv)
        self.wait_nbd(uri, proc, size)
        return uri, proc

    def nbdkit_file(
        self, stack: contextlib.ExitStack, name: str, path: Path, tls: Path | None = None
    ) -> tuple[str, Proc]:
        """``nbdkit file`` on loopback TCP; with ``tls`` (a certificates directory, see
        benchlib.certs) it requires TLS and the URI is ``nbds://``."""
        port = free_port()
        argv = ["nbdkit", "-f", "--exit-with-parent", "-p", str(port), "-i", LOOPBACK]
        if tls is not None:
            argv += ["--tls=require", f"--tls-certificates={tls}"]
        proc = self.spawn_server(stack, name, [*argv, "file", str(path)])
        uri = nbd_uri(port, tls)
        self.wait_nbd(uri, proc, path.stat().st_size)
        return uri, proc

    def dstfs_serve(
        self,
        stack: contextlib.ExitStack,
        name: str,
        path: Path,
        size: int | None,
        tls: Path | None = None,
        workers: int = 1,
    ) -> tuple[str, Proc]:
        """``dstfs serve`` on loopback TCP; with ``tls`` (a certificates directory) it
        requires TLS (``--tls-cert``/``--tls-key``) and the URI is ``nbds://``."""
        dstfs = self.require_dstfs()
        port = free_port()
        argv = [dstfs, "serve", str(path), "--listen", f"{LOOPBACK}:{port}"]
        if workers > 1:
            argv += ["--workers", str(workers)]
        if size is not None:
            argv += ["--size", fmt_size(size)]
        if tls is not None:
            argv += ["--tls-cert", str(tls / "server-cert.pem")]
            argv += ["--tls-key", str(tls / "server-key.pem")]
        proc = self.spawn_server(stack, name, argv)
        uri = nbd_uri(port, tls)
        self.wait_nbd(uri, proc, size)
        return uri, proc

    def mount_fuse(
        self,
        stack: contextlib.ExitStack,
        name: str,
        argv: list[str],
        mnt: Path,
        disk: Path,
        umount_first: list[str] | None = None,
        timeout: float = 30,
    ) -> Proc:
        """Start a foreground FUSE daemon and wait until ``mnt`` is mounted and ``disk`` exists."""
        mnt.mkdir(parents=True, exist_ok=True)
        proc = self.spawn(name, argv)
        stack.callback(safe(f"unmount {name}", self.unmount, mnt, proc, umount_first))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc.check()
            if is_mounted(mnt) and disk.exists():
                return proc
            time.sleep(POLL_S)
        raise BenchError(f"{name}: {disk} did not appear within {timeout:.0f}s")

    def unmount(self, mnt: Path, proc: Proc, umount_first: list[str] | None) -> None:
        """Unmount (loop devices must be detached already), then wait for the daemon to exit.

        ``umount_first`` (``dstfs umount MNT``) runs while we keep reaping the daemon: it waits
        for the daemon's PID to go away, and an unreaped child of ours would linger as a zombie.
        """
        try:
            if umount_first and is_mounted(mnt):
                self.run_reaping(umount_first, proc, timeout=30)
            deadline = time.monotonic() + 15
            while is_mounted(mnt) and time.monotonic() < deadline:  # EBUSY just after losetup -d
                if try_cmd(["fusermount3", "-u", mnt], timeout=10):
                    break
                time.sleep(0.25)
            if is_mounted(mnt):
                log.warning("%s: %s still busy, lazy unmount", proc.name, mnt)
                try_cmd(["fusermount3", "-u", "-z", mnt], timeout=10)
        finally:
            proc.stop(grace=10.0, timeout=5.0)

    def run_reaping(self, argv: list[str], proc: Proc, timeout: float) -> None:
        """Run a command to completion while reaping ``proc`` should it exit meanwhile."""
        log.debug("run: %s", " ".join(argv))
        with subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            process_group=0,
            preexec_fn=_child_setup,
        ) as cmd:
            deadline = time.monotonic() + timeout
            while cmd.poll() is None and time.monotonic() < deadline:
                proc.popen.poll()
                time.sleep(POLL_S)
            if cmd.poll() is None:
                log.warning("%s timed out after %.0fs", " ".join(argv[:2]), timeout)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(cmd.pid, signal.SIGKILL)
            _, err = cmd.communicate()
        if cmd.returncode:
            log.warning("%s rc=%s: %s", " ".join(argv[:2]), cmd.returncode, one_line(err))

    def dstfs_mount(
        self, stack: contextlib.ExitStack, name: str, alg: str, uris: list[str]
    ) -> tuple[Path, Proc]:
        dstfs = self.require_dstfs()
        mnt = self.cfg.workdir / f"mnt-{name}"
        state = self.cfg.workdir / f"state-{name}"
        state.mkdir(parents=True, exist_ok=True)
        argv = [dstfs, "mount", str(mnt), "--foreground", "--state", str(state)]
        argv += ["--name", f"bench-{name}", "--alg", alg]
        if alg == "stripe" and self.cfg.chunk:
            argv += ["--chunk", str(self.cfg.chunk)]
        for uri in uris:
            argv += ["--node", uri]
        proc = self.mount_fuse(
            stack, f"dstfs-{name}", argv, mnt, mnt / "disk.img", [dstfs, "umount", str(mnt)]
        )
        return mnt, proc

    def dstfs_export(
        self, stack: contextlib.ExitStack, name: str, alg: str, uris: list[str]
    ) -> tuple[str, Proc]:
        """``dstfs mount --no-fuse --export unix:SOCK``: the array served over NBD only;
        returns the export's URI and the daemon. Stopped with ``dstfs umount --state``."""
        dstfs = self.require_dstfs()
        state = self.cfg.workdir / f"state-{name}"
        state.mkdir(parents=True, exist_ok=True)
        sock = self.cfg.workdir / f"{name}.sock"
        argv = [dstfs, "mount", "--no-fuse", "--foreground", "--state", str(state)]
        argv += ["--name", f"bench-{name}", "--alg", alg, "--export", f"unix:{sock}"]
        for uri in uris:
            argv += ["--node", uri]
        proc = self.spawn(f"dstfs-{name}", argv)
        stop = [dstfs, "umount", "--state", str(state)]
        stack.callback(safe(f"stop dstfs-{name}", self.stop_daemon, proc, stop))
        uri = f"nbd+unix:///?socket={sock}"
        self.wait_nbd(uri, proc, None)
        return uri, proc

    def stop_daemon(self, proc: Proc, stop: list[str]) -> None:
        """Run ``stop`` (which flushes and waits for the daemon), then make sure it is gone."""
        try:
            if proc.alive():
                self.run_reaping(stop, proc, timeout=30)
        finally:
            proc.stop(grace=10.0, timeout=5.0)

    def attach_loop(self, stack: contextlib.ExitStack, path: Path) -> tuple[str, str]:
        """``losetup --direct-io=on --show -f``; returns the device and its dio flag."""
        r = run_cmd(["losetup", "--direct-io=on", "--show", "-f", path], timeout=60)
        dev = r.stdout.strip()
        if not dev.startswith("/dev/loop"):
            raise BenchError(f"losetup printed {dev!r}")
        stack.callback(safe(f"detach {dev}", self.detach_loop, dev))
        if r.stderr.strip():
            log.warning("losetup %s: %s", path, one_line(r.stderr))
        try:
            dio = Path(f"/sys/block/{Path(dev).name}/loop/dio").read_text().strip()
        except OSError:
            dio = "?"
        if dio != "1":
            log.warning("%s over %s runs without direct I/O (dio=%s)", dev, path, dio)
        return dev, dio

    def detach_loop(self, dev: str) -> None:
        run_cmd(["losetup", "-d", dev], timeout=60)
        backing = Path(f"/sys/block/{Path(dev).name}/loop/backing_file")
        deadline = time.monotonic() + 10
        while backing.exists() and time.monotonic() < deadline:
            time.sleep(POLL_S)
