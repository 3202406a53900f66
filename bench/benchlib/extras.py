"""Extra measurements, with the rows torn down: nbdcopy against `dstfs serve`
and `nbdkit file`; a live migration's copy rate and a mirror replica's full
sync rate (a replica replaced by a fresh node), each idle and under a
foreground seq-read load (with that load's throughput during the copy); and
the daemon's peak RSS over a 64 GiB sparse mirror under a fio job."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import (
    FG_JOB,
    FILL_JOB,
    JOBS,
    POLL_S,
    SPARSE_MIRROR_NODE,
    BenchError,
    KiB,
    MiB,
    describe,
)
from .fio import fio_argv, fio_figures, run_fio
from .processes import Env, Proc, run_cmd, safe, vm_hwm_mib

log = logging.getLogger("bench")


@dataclass
class Measure:
    key: str
    title: str
    unit: str = "MB/s"
    ratio_to: str | None = None
    samples: list[float] = field(default_factory=list)
    details: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def add(self, value: float, **detail: Any) -> None:
        self.samples.append(value)
        self.details.append({"value": value, **detail})

    def fail(self, err: BaseException | str) -> None:
        text = err if isinstance(err, str) else describe(err)
        self.errors.append(text)
        log.error("%s: %s", self.title, text)


def new_measures() -> dict[str, Measure]:
    ms = [
        Measure("copy-read-serve", "nbdcopy read, dstfs serve", ratio_to="copy-read-nbdkit"),
        Measure("copy-read-nbdkit", "nbdcopy read, nbdkit file"),
        Measure("copy-write-serve", "nbdcopy write, dstfs serve", ratio_to="copy-write-nbdkit"),
        Measure("copy-write-nbdkit", "nbdcopy write, nbdkit file"),
        Measure("mig-idle", "migration copy, idle"),
        Measure("mig-load", "migration copy, under seq-read load", ratio_to="mig-idle"),
        Measure("fg-base", "foreground seq read, no migration"),
        Measure("fg-mig", "foreground seq read, during migration", ratio_to="fg-base"),
        Measure("msync-idle", "mirror full sync (data), idle"),
        Measure("msync-load", "mirror full sync (data), under load", ratio_to="msync-idle"),
        Measure("mfg-base", "mirror foreground seq read, no sync"),
        Measure("mfg-sync", "mirror foreground seq read, during sync", ratio_to="mfg-base"),
        Measure("mirror-rss", "mirror 64G sparse: daemon peak RSS", unit="MiB"),
    ]
    return {m.key: m for m in ms}


def fill_random(path: Path, size: int) -> None:
    block = os.urandom(MiB)
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(block)


def run_copy(env: Env, ms: dict[str, Measure]) -> None:
    """nbdcopy to ``null:`` and from a tmpfs file, against dstfs serve and nbdkit file."""
    cfg = env.cfg
    with contextlib.ExitStack() as st:
        src = cfg.tmpfs / "copy-src.img"
        servers: dict[str, str] = {}
        for kind in ("nbdkit", "serve"):
            path = cfg.tmpfs / f"copy-{kind}.img"
            st.callback(safe(f"remove {path}", path.unlink, True))
            fill_random(path, cfg.copy_size)
            try:
                if kind == "serve":
                    uri, _ = env.dstfs_serve(st, "copy-serve", path, None)
                else:
                    uri, _ = env.nbdkit_file(st, "copy-nbdkit", path)
                servers[kind] = uri
            except BenchError as e:
                ms[f"copy-read-{kind}"].fail(e)
                ms[f"copy-write-{kind}"].fail(e)
        st.callback(safe(f"remove {src}", src.unlink, True))
        fill_random(src, cfg.copy_size)
        for rep in range(cfg.repeat):
            for direction in ("read", "write"):
                for kind in ("serve", "nbdkit") if rep % 2 == 0 else ("nbdkit", "serve"):
                    if kind not in servers:
                        continue
                    uri = servers[kind]
                    argv = ["nbdcopy", uri, "null:"] if direction == "read" else ["nbdcopy"]
                    if direction == "write":
                        argv += [str(src), uri]
                    m = ms[f"copy-{direction}-{kind}"]
                    t0 = time.monotonic()
                    try:
                        run_cmd(argv, timeout=cfg.copy_size / 2e6 + cfg.slack)
                    except BenchError as e:
                        m.fail(e)
                        continue
                    elapsed = time.monotonic() - t0
                    m.add(cfg.copy_size / elapsed / 1e6, seconds=elapsed, argv=argv)
                    log.info("%-40s #%d %8.0f MB/s", m.title, rep + 1, m.samples[-1])


def read_ctl(path: Path) -> str:
    with open(path) as f:
        return f.read().strip()


def migrate(ctl: Path, uri: str, proc: Proc, size: int, slack: float) -> tuple[float, str]:
    """Write the target to ``ctl`` and poll it until ``done``; return (seconds, final status)."""
    try:
        before = read_ctl(ctl)
    except OSError as e:
        raise BenchError(f"cannot read {ctl}: {e}") from e
    if before == "done":
        log.warning("%s reads 'done' before the migration started", ctl)
    seconds, _ = write_and_wait(
        ctl,
        uri,
        ctl,
        proc,
        size / 2e6 + slack,
        "done",
        lambda s: s.startswith("failed"),
        "migration",
    )
    return seconds, "done"


def write_and_wait(
    ctl: Path,
    value: str,
    watch: Path,
    proc: Proc,
    timeout: float,
    done: str,
    failed: Callable[[str], bool],
    what: str,
) -> tuple[float, str]:
    """Write ``value`` to ``ctl``, then poll ``watch`` until it reads ``done``; return
    (seconds, the last other value seen). BenchError if ``failed(value)`` or on timeout."""
    t0 = time.monotonic()
    try:
        with open(ctl, "w") as f:
            f.write(value + "\n")
    except OSError as e:
        raise BenchError(f"cannot write {ctl}: {e}") from e
    seen = ""
    while time.monotonic() - t0 < timeout:
        proc.check()
        try:
            now = read_ctl(watch)
        except OSError as e:
            now = f"<{e}>"
        if now == done:
            return time.monotonic() - t0, seen
        if failed(now):
            raise BenchError(f"{what}: {now}")
        seen = now
        time.sleep(POLL_S)
    raise BenchError(f"{what} not done after {timeout:.0f}s ({watch.name} {seen!r})")


def bw_log_window(path: Path, t0: float, t1: float, avg_ms: int) -> float | None:
    """Mean read bandwidth (MB/s) from a fio bw log (epoch ms) over entries overlapping t0..t1."""
    lo, hi, vals = t0 * 1000, t1 * 1000, []
    with contextlib.suppress(OSError), open(path) as f:
        for line in f:
            parts = [p.strip() for p in line.split(",")]
            if len(parts) < 3 or parts[2] != "0":
                continue
            ts, kib_s = int(parts[0]), int(parts[1])
            if ts > lo and ts - avg_ms < hi:
                vals.append(kib_s)
    return statistics.fmean(vals) * KiB / 1e6 if vals else None


class Foreground:
    """The foreground load of a copy: fio seq read on ``dev``, alone (``base``) or in the
    background with a 100 ms bandwidth log (``start``), read over the copy's window (``stop``).
    """

    AVG_MS = 100

    def __init__(self, env: Env, stack: contextlib.ExitStack, dev: str, name: str) -> None:
        self.env, self.stack, self.dev, self.name = env, stack, dev, name
        self.bwlog = env.cfg.workdir / name
        self.out = env.cfg.workdir / f"{name}.json"
        self.fio: Proc | None = None

    def base(self) -> float:
        return float(run_fio(self.env.cfg, self.dev, FG_JOB, self.env.cfg.runtime)["value"])

    def start(self) -> None:
        argv = fio_argv(self.dev, FG_JOB, self.out, runtime=3600)
        argv += [f"--write_bw_log={self.bwlog}", f"--log_avg_msec={self.AVG_MS}"]
        argv.append("--log_unix_epoch=1")
        self.fio = self.env.spawn(self.name, argv)
        self.stack.callback(safe(f"stop {self.name}", self.fio.stop))
        time.sleep(1.0)  # fio takes a few hundred ms to start issuing I/O
        self.fio.check()

    def stop(self, wall0: float, wall1: float) -> tuple[float, dict[str, Any]]:
        """Stop fio; its mean MB/s over wall0..wall1 (the whole run's if the log has none)."""
        assert self.fio is not None
        self.fio.popen.send_signal(signal.SIGINT)
        try:
            self.fio.popen.wait(30)
        except subprocess.TimeoutExpired:
            self.fio.stop()
        whole = fio_figures(self.out, FG_JOB)["value"]
        window = bw_log_window(Path(f"{self.bwlog}_bw.1.log"), wall0, wall1, self.AVG_MS)
        during = window if window is not None else whole
        return during, {"whole_run": whole, "from_window": window is not None}


def copy_rig(
    env: Env, st: contextlib.ExitStack, name: str, alg: str
) -> tuple[Path, Proc, Path, str]:
    """Two fresh ``nbdkit memory`` nodes joined by ``alg``, a loop device on disk.img filled
    with data, and an idle new target (started now so that it is stopped after the unmount).
    Returns (mount point, daemon, loop device, the target's URI)."""
    cfg = env.cfg
    uris = [env.nbdkit_memory(st, f"{name}-n{i}", cfg.mig_size)[0] for i in range(2)]
    target, _ = env.nbdkit_memory(st, f"{name}-new", cfg.mig_size)
    mnt, daemon = env.dstfs_mount(st, name, alg, uris)
    dev, _ = env.attach_loop(st, mnt / "disk.img")
    run_fio(cfg, dev, FILL_JOB, runtime=None, size=cfg.mig_size)
    return mnt, daemon, dev, target


def run_migration(env: Env, ms: dict[str, Measure], rep: int, loaded: bool) -> None:
    """One migration of node n-0 of a fresh two-node linear array, idle or under fio load."""
    cfg = env.cfg
    kind = "load" if loaded else "idle"
    m = ms[f"mig-{kind}"]
    with contextlib.ExitStack() as st:
        mnt, daemon, dev, target = copy_rig(env, st, f"mig-{kind}{rep}", "linear")
        fg = Foreground(env, st, dev, f"fg-{rep}") if loaded else None
        if fg is not None:
            ms["fg-base"].add(fg.base(), when="before")
            fg.start()
        ctl = mnt / "n-0" / "migrate"
        wall0 = time.time()
        seconds, status = migrate(ctl, target, daemon, cfg.mig_size, cfg.slack)
        wall1 = time.time()
        rate = cfg.mig_size / seconds / 1e6
        m.add(rate, seconds=seconds, status=status, rss_mib=vm_hwm_mib(daemon.pid))
        log.info("%-40s #%d %8.0f MB/s (%.2f s)", m.title, rep + 1, rate, seconds)
        if fg is not None:
            during, detail = fg.stop(wall0, wall1)
            ms["fg-mig"].add(during, **detail)
            log.info("%-40s #%d %8.0f MB/s", ms["fg-mig"].title, rep + 1, during)
            base = fg.base()
            ms["fg-base"].add(base, when="after")
            log.info("%-40s #%d %8.0f MB/s", ms["fg-base"].title, rep + 1, base)


def read_stats(path: Path) -> dict[str, int]:
    """A ``key value`` per line stats file (non-integer values are left out)."""
    out = {}
    for line in read_ctl(path).splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1])
    return out


def full_sync(mnt: Path, uri: str, proc: Proc, size: int, slack: float) -> tuple[float, str]:
    """Replace mirror replica n-1 by ``uri`` and poll its state until ``in_sync``.

    The write returns once the old target has left the in-sync set, so any ``in_sync`` read
    after it means the new one is synced. Returns (seconds, the last progress seen)."""
    return write_and_wait(
        mnt / "n-1" / "migrate",
        uri,
        mnt / "n-1" / "state",
        proc,
        size / 2e6 + slack,
        "in_sync",
        lambda s: s == "failed",
        "full sync of the new replica",
    )


def run_mirror_sync(env: Env, ms: dict[str, Measure], rep: int, loaded: bool) -> None:
    """A fresh mirror of two ``nbdkit memory`` nodes, filled through disk.img; replica n-1 is
    replaced by an empty node and fully synced, idle or under a foreground seq-read load.
    The rate is data sent (``resync_bytes`` in ``stats``) over the time to ``in_sync``."""
    cfg = env.cfg
    kind = "load" if loaded else "idle"
    m = ms[f"msync-{kind}"]
    with contextlib.ExitStack() as st:
        mnt, daemon, dev, target = copy_rig(env, st, f"msync-{kind}{rep}", "mirror")
        fg = Foreground(env, st, dev, f"mfg-{rep}") if loaded else None
        if fg is not None:
            ms["mfg-base"].add(fg.base(), when="before")
            fg.start()
        before = read_stats(mnt / "stats")
        wall0 = time.time()
        seconds, seen = full_sync(mnt, target, daemon, cfg.mig_size, cfg.slack)
        wall1 = time.time()
        after = read_stats(mnt / "stats")
        sent = after.get("resync_bytes", 0) - before.get("resync_bytes", 0)
        zero = after.get("resync_zero_bytes", 0) - before.get("resync_zero_bytes", 0)
        rate = sent / seconds / 1e6
        m.add(rate, seconds=seconds, resync_bytes=sent, resync_zero_bytes=zero, progress=seen)
        log.info(
            "%-40s #%d %8.0f MB/s (%d MiB sent, %d MiB zeroes, %.2f s)",
            m.title,
            rep + 1,
            rate,
            sent // MiB,
            zero // MiB,
            seconds,
        )
        if sent == 0:
            m.fail("the full sync sent no data (stats resync_bytes unchanged)")
        if fg is not None:
            during, detail = fg.stop(wall0, wall1)
            ms["mfg-sync"].add(during, **detail)
            log.info("%-40s #%d %8.0f MB/s", ms["mfg-sync"].title, rep + 1, during)
            ms["mfg-base"].add(fg.base(), when="after")


def run_sparse_mirror_rss(env: Env, ms: dict[str, Measure]) -> None:
    """The daemon's peak RSS over a 64 GiB mirror of sparse ``nbdkit memory`` nodes, after a
    random 4 KiB write job over the whole disk (regions marked all over the bitmap)."""
    cfg = env.cfg
    m = ms["mirror-rss"]
    with contextlib.ExitStack() as st:
        uris = []
        for i in range(2):
            uri, _ = env.nbdkit_memory(st, f"msparse-n{i}", SPARSE_MIRROR_NODE)
            uris.append(uri)
        mnt, daemon = env.dstfs_mount(st, "msparse", "mirror", uris)
        dev, _ = env.attach_loop(st, mnt / "disk.img")
        job = next(j for j in JOBS if j.key == "randwrite")
        fig = run_fio(env.cfg, dev, job, cfg.runtime)
        rss = vm_hwm_mib(daemon.pid)
        if rss is None:
            raise BenchError("cannot read the daemon's VmHWM")
        m.add(rss, randwrite_iops=fig["value"])
        log.info("%-40s %8.0f MiB (randwrite %.0f IOPS)", m.title, rss, fig["value"])


def run_extras(env: Env, ms: dict[str, Measure]) -> None:
    try:
        run_copy(env, ms)
    except Exception as e:
        for key in ("copy-read-serve", "copy-read-nbdkit", "copy-write-serve", "copy-write-nbdkit"):
            ms[key].fail(e)
    for rep in range(env.cfg.repeat):
        for loaded in (False, True):
            try:
                run_migration(env, ms, rep, loaded)
            except Exception as e:
                keys = ("mig-load", "fg-mig") if loaded else ("mig-idle",)
                for key in keys:
                    ms[key].fail(e)
    for rep in range(env.cfg.repeat):
        for loaded in (False, True):
            try:
                run_mirror_sync(env, ms, rep, loaded)
            except Exception as e:
                keys = ("msync-load", "mfg-sync") if loaded else ("msync-idle",)
                for key in keys:
                    ms[key].fail(e)
    try:
        run_sparse_mirror_rss(env, ms)
    except Exception as e:
        ms["mirror-rss"].fail(e)
