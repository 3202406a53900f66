"""Extra measurements. While the rows are up: nbdcopy through the NBD rows (the
array's export, nbdkit memory directly). With the rows torn down: nbdcopy
against `dstfs serve` and `nbdkit file`, without and with TLS; a live
migration's copy rate and a mirror replica's full sync rate (a replica
replaced by a fresh node), each idle and under a foreground seq-read load
(with that load's throughput during the copy); and the daemon's peak RSS over
a 64 GiB sparse mirror under a fio job. nbdcopy samples carry the servers' CPU
µs per request."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import statistics
import subprocess
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import certs
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
from .processes import Env, Proc, run_cmd, safe, tree_cpu_seconds, vm_hwm_mib
from .rows import Row

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
    cpu: list[float] = field(default_factory=list)  # the servers' CPU µs per request

    def add(self, value: float, cpu_us: float | None = None, **detail: Any) -> None:
        self.samples.append(value)
        if cpu_us is not None:
            self.cpu.append(cpu_us)
        self.details.append({"value": value, "cpu_us_per_request": cpu_us, **detail})

    def fail(self, err: BaseException | str) -> None:
        text = err if isinstance(err, str) else describe(err)
        self.errors.append(text)
        log.error("%s: %s", self.title, text)


#: nbdcopy's requests: its default, given explicitly so that CPU per request is exact
#: (a copy of N bytes of data is N / COPY_REQUEST requests).
COPY_REQUEST = 256 * KiB


#: The nbdcopy groups: (key prefix, the servers measured, the reference), each read and
#: write; "serve"/"serve-w2"/"nbdkit" are ``dstfs serve`` (one process, and two with
#: ``--workers 2``) and ``nbdkit file`` on the same tmpfs file, plain and (``-tls``) with
#: TLS required; "export"/"memory" are the NBD rows of the main table.
COPY_PAIRS = (
    (
        "copy-{}",
        (("serve", "dstfs serve"), ("serve-w2", "dstfs serve --workers 2")),
        ("nbdkit", "nbdkit file"),
    ),
    (
        "copy-{}-tls",
        (("serve", "dstfs serve, TLS"), ("serve-w2", "dstfs serve --workers 2, TLS")),
        ("nbdkit", "nbdkit file, TLS"),
    ),
    ("copy-{}-nbd", (("export", "dstfs export"),), ("memory", "nbdkit memory")),
)
#: ``dstfs serve`` kinds of the copy group, and their ``--workers``.
SERVE_WORKERS = {"serve": 1, "serve-w2": 2}


def copy_measures() -> list[Measure]:
    ms = []
    for prefix, measured, (ref_kind, ref_title) in COPY_PAIRS:
        for direction in ("read", "write"):
            ref = prefix.format(f"{direction}-{ref_kind}")
            for kind, title in measured:
                ms.append(
                    Measure(
                        prefix.format(f"{direction}-{kind}"),
                        f"nbdcopy {direction}, {title}",
                        ratio_to=ref,
                    )
                )
            ms.append(Measure(ref, f"nbdcopy {direction}, {ref_title}"))
    return ms


#: The groups of extra measurements, for ``bench/run --extras``, in the order they run.
EXTRA_GROUPS = ("nbd-copy", "copy", "migration", "mirror-sync", "mirror-rss")


def group_of(key: str) -> str:
    """The group (EXTRA_GROUPS) a measurement key belongs to."""
    if key.startswith("copy-"):
        return "nbd-copy" if key.endswith("-nbd") else "copy"
    if key.startswith(("mig-", "fg-")):
        return "migration"
    if key.startswith(("msync-", "mfg-")):
        return "mirror-sync"
    return "mirror-rss"


def new_measures(groups: Collection[str] = EXTRA_GROUPS) -> dict[str, Measure]:
    """The measurements of ``groups``, in table order."""
    ms = [
        *copy_measures(),
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
    return {m.key: m for m in ms if group_of(m.key) in groups}


def fill_random(path: Path, size: int) -> None:
    block = os.urandom(MiB)
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(block)


@dataclass
class CopyServer:
    """One side of an nbdcopy pair: the URI, and the processes whose CPU counts."""

    uri: str
    procs: list[Proc]

    def cpu(self) -> float | None:
        # A process's children count too: the workers of ``dstfs serve --workers N``.
        times = [tree_cpu_seconds(p.pid) for p in self.procs]
        return None if None in times else sum(t or 0.0 for t in times)


def time_copies(
    env: Env,
    ms: dict[str, Measure],
    servers: dict[str, CopyServer],
    src: Path,
    size: int,
    rep: int,
) -> None:
    """One round of nbdcopy over ``servers`` (measure key -> server, two per pair): write
    ``src`` to each (first, so that a read finds data), then read each to ``null:``;
    the order within a direction flips every round, so drift hits every server alike."""
    for direction in ("write", "read"):
        keys = [k for k in servers if f"-{direction}-" in k]
        for key in keys if rep % 2 == 0 else reversed(keys):
            server, m = servers[key], ms[key]
            argv = ["nbdcopy", f"--request-size={COPY_REQUEST}"]
            argv += [server.uri, "null:"] if direction == "read" else [str(src), server.uri]
            cpu0, t0 = server.cpu(), time.monotonic()
            try:
                run_cmd(argv, timeout=size / 2e6 + env.cfg.slack)
            except BenchError as e:
                m.fail(e)
                continue
            elapsed, cpu1 = time.monotonic() - t0, server.cpu()
            cpu_us = None
            if cpu0 is not None and cpu1 is not None:
                cpu_us = (cpu1 - cpu0) / (size / COPY_REQUEST) * 1e6
            m.add(size / elapsed / 1e6, cpu_us, seconds=elapsed, argv=argv)
            log.info(
                "%-40s #%d %8.0f MB/s, servers' CPU us/request %s",
                m.title,
                rep + 1,
                m.samples[-1],
                "-" if cpu_us is None else f"{cpu_us:.0f}",
            )


def run_copy(env: Env, ms: dict[str, Measure]) -> None:
    """nbdcopy to ``null:`` and from a tmpfs file, against dstfs serve and nbdkit file on the
    same kind of file, without and with TLS (certificates made now with openssl)."""
    cfg = env.cfg
    with contextlib.ExitStack() as st:
        pki = cfg.workdir / "pki"
        try:
            certs.make_pki(pki, "dstfs bench CA", client=False)
        except (OSError, subprocess.SubprocessError) as e:
            for m in ms.values():
                if m.key.startswith("copy-") and m.key.endswith("-tls"):
                    m.fail(f"cannot make certificates with openssl: {e}")
            pki = None  # the plain copies still run
        src = cfg.tmpfs / "copy-src.img"
        servers: dict[str, CopyServer] = {}
        for kind in (*SERVE_WORKERS, "nbdkit"):
            path = cfg.tmpfs / f"copy-{kind}.img"
            st.callback(safe(f"remove {path}", path.unlink, True))
            fill_random(path, cfg.copy_size)
            # The TLS server serves the same file as the plain one, one copy at a time.
            for suffix, tls in (("", None), ("-tls", pki)):
                if suffix and tls is None:
                    continue
                name = f"copy-{kind}{suffix}"
                try:
                    if kind in SERVE_WORKERS:
                        workers = SERVE_WORKERS[kind]
                        uri, p = env.dstfs_serve(st, name, path, None, tls=tls, workers=workers)
                    else:
                        uri, p = env.nbdkit_file(st, name, path, tls=tls)
                except BenchError as e:
                    for direction in ("read", "write"):
                        ms[f"copy-{direction}-{kind}{suffix}"].fail(e)
                    continue
                for direction in ("read", "write"):
                    servers[f"copy-{direction}-{kind}{suffix}"] = CopyServer(uri, [p])
        st.callback(safe(f"remove {src}", src.unlink, True))
        fill_random(src, cfg.copy_size)
        for rep in range(cfg.repeat):
            time_copies(env, ms, servers, src, cfg.copy_size, rep)


def run_nbd_row_copies(env: Env, rows: list[Row], ms: dict[str, Measure]) -> None:
    """nbdcopy through the NBD rows (the array's export, nbdkit memory directly) while they
    are up: the whole disk written from a tmpfs file, then read to ``null:``. The servers'
    CPU is the daemon's and its node's together for the export. Rows left out by ``--rows``
    leave their measurements out of the table."""
    cfg = env.cfg
    if not any(group_of(k) == "nbd-copy" for k in ms):
        return
    kinds = {"export": "export", "nbdkit-nbd": "memory"}
    present = {r.spec.key: r for r in rows}
    servers: dict[str, CopyServer] = {}
    for key, kind in kinds.items():
        row = present.get(key)
        for direction in ("read", "write"):
            mkey = f"copy-{direction}-{kind}-nbd"
            if row is None:
                ms.pop(mkey)
            elif row.error or row.uri is None:
                ms[mkey].fail(f"{row.spec.name}: {row.error or 'not set up'}")
            else:
                servers[mkey] = CopyServer(row.uri, row.procs)
    if not servers:
        return
    src = cfg.tmpfs / "nbd-copy-src.img"
    try:
        fill_random(src, cfg.disk_size)
        for rep in range(cfg.repeat):
            for key in kinds:
                if key in present:
                    present[key].check_alive()
            time_copies(env, ms, servers, src, cfg.disk_size, rep)
    except Exception as e:
        for mkey in servers:
            ms[mkey].fail(e)
    finally:
        src.unlink(missing_ok=True)


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
    """The extras after the rows, those of groups that have measurements in ``ms``."""
    groups = {group_of(k) for k in ms}
    if "copy" in groups:
        try:
            run_copy(env, ms)
        except Exception as e:
            for key in ms:
                if group_of(key) == "copy":
                    ms[key].fail(e)
    for rep in range(env.cfg.repeat if "migration" in groups else 0):
        for loaded in (False, True):
            try:
                run_migration(env, ms, rep, loaded)
            except Exception as e:
                keys = ("mig-load", "fg-mig") if loaded else ("mig-idle",)
                for key in keys:
                    ms[key].fail(e)
    for rep in range(env.cfg.repeat if "mirror-sync" in groups else 0):
        for loaded in (False, True):
            try:
                run_mirror_sync(env, ms, rep, loaded)
            except Exception as e:
                keys = ("msync-load", "mfg-sync") if loaded else ("msync-idle",)
                for key in keys:
                    ms[key].fail(e)
    if "mirror-rss" in groups:
        try:
            run_sparse_mirror_rss(env, ms)
        except Exception as e:
            ms["mirror-rss"].fail(e)
