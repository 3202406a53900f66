"""Extra measurements, with the rows torn down: nbdcopy against `dstfs serve`
and `nbdkit file`, and a live migration's copy rate, idle and under a
foreground seq-read load (with that load's throughput during the migration)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import FG_JOB, FILL_JOB, POLL_S, BenchError, KiB, MiB, describe
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
    timeout = size / 2e6 + slack
    t0 = time.monotonic()
    try:
        with open(ctl, "w") as f:
            f.write(uri + "\n")
    except OSError as e:
        raise BenchError(f"cannot write {ctl}: {e}") from e
    status = ""
    while time.monotonic() - t0 < timeout:
        proc.check()
        try:
            status = read_ctl(ctl)
        except OSError as e:
            status = f"<{e}>"
        if status == "done":
            return time.monotonic() - t0, status
        if status.startswith("failed"):
            raise BenchError(f"migration {status}")
        time.sleep(POLL_S)
    raise BenchError(f"migration not done after {timeout:.0f}s (status {status!r})")


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


def run_migration(env: Env, ms: dict[str, Measure], rep: int, loaded: bool) -> None:
    """One migration of node n-0 of a fresh two-node linear array, idle or under fio load."""
    cfg = env.cfg
    kind = "load" if loaded else "idle"
    m = ms[f"mig-{kind}"]
    with contextlib.ExitStack() as st:
        uris = []
        for i in range(2):
            uri, _ = env.nbdkit_memory(st, f"mig-{kind}{rep}-n{i}", cfg.mig_size)
            uris.append(uri)
        # Started now (idle until the migration) so that it is stopped after the unmount.
        target, _ = env.nbdkit_memory(st, f"mig-{kind}{rep}-new", cfg.mig_size)
        mnt, daemon = env.dstfs_mount(st, f"mig-{kind}{rep}", "linear", uris)
        dev, _ = env.attach_loop(st, mnt / "disk.img")
        run_fio(env.cfg, dev, FILL_JOB, runtime=None, size=cfg.mig_size)
        if loaded:
            base = run_fio(env.cfg, dev, FG_JOB, cfg.runtime)
            ms["fg-base"].add(base["value"], when="before")
        ctl = mnt / "n-0" / "migrate"
        fio: Proc | None = None
        bwlog = cfg.workdir / f"fg-{rep}"
        avg_ms = 100
        if loaded:
            argv = fio_argv(dev, FG_JOB, cfg.workdir / "fg.json", runtime=3600)
            argv += [f"--write_bw_log={bwlog}", f"--log_avg_msec={avg_ms}", "--log_unix_epoch=1"]
            fio = env.spawn(f"fio-fg{rep}", argv)
            st.callback(safe("stop foreground fio", fio.stop))
            time.sleep(1.0)  # fio takes a few hundred ms to start issuing I/O
            fio.check()
        wall0 = time.time()
        seconds, status = migrate(ctl, target, daemon, cfg.mig_size, cfg.slack)
        wall1 = time.time()
        rate = cfg.mig_size / seconds / 1e6
        m.add(rate, seconds=seconds, status=status, rss_mib=vm_hwm_mib(daemon.pid))
        log.info("%-40s #%d %8.0f MB/s (%.2f s)", m.title, rep + 1, rate, seconds)
        if fio is not None:
            fio.popen.send_signal(signal.SIGINT)
            try:
                fio.popen.wait(30)
            except subprocess.TimeoutExpired:
                fio.stop()
            whole = fio_figures(cfg.workdir / "fg.json", FG_JOB)["value"]
            window = bw_log_window(Path(f"{bwlog}_bw.1.log"), wall0, wall1, avg_ms)
            during = window if window is not None else whole
            ms["fg-mig"].add(during, whole_run=whole, from_window=window is not None)
            log.info("%-40s #%d %8.0f MB/s", ms["fg-mig"].title, rep + 1, during)
            base = run_fio(env.cfg, dev, FG_JOB, cfg.runtime)
            ms["fg-base"].add(base["value"], when="after")
            log.info("%-40s #%d %8.0f MB/s", ms["fg-base"].title, rep + 1, base["value"])


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
