"""The main rows: each a disk file behind a loop device (dstfs, nbdfuse, the
pyfuse3 no-op, tmpfs), or an NBD URI that fio's nbd engine opens (the array's
export, nbdkit directly), set up once and kept mounted, and every fio job run on
every live row interleaved, so drift on a shared machine hits all rows alike."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from .config import (
    FILL_JOB,
    JOBS,
    NOOP_FS,
    REPO_DIR,
    SLOW_NODE_RATE,
    WHOLE_DISK_NODES,
    BenchError,
    BenchTimeout,
    Job,
    RowSpec,
    describe,
)
from .fio import run_fio
from .processes import Env, Proc, cpu_seconds, loop_requests, safe, vm_hwm_mib

log = logging.getLogger("bench")


@dataclass
class Row:
    spec: RowSpec
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    dev: str | None = None  # the loop device, or for an NBD row:
    uri: str | None = None  # the URI fio's nbd engine opens
    procs: list[Proc] = field(default_factory=list)
    daemon: Proc | None = None
    setup: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    job_errors: dict[str, list[str]] = field(default_factory=dict)
    peak_rss_mib: dict[str, float | None] = field(default_factory=dict)

    @property
    def target(self) -> str | None:
        """What fio runs on: the loop device, or the NBD URI."""
        return self.uri if self.spec.nbd else self.dev

    def values(self, job: Job) -> list[float]:
        return [s["value"] for s in self.samples.get(job.key, [])]

    def cpu_values(self, job: Job, who: str) -> list[float]:
        """µs of CPU per request of ``who`` ("daemon" or "nodes") in each sample of ``job``."""
        out = []
        for s in self.samples.get(job.key, []):
            v = s.get("cpu_us_per_request", {}).get(who)
            if v is not None:
                out.append(v)
        return out

    @property
    def nodes(self) -> list[Proc]:
        """The node servers (every process of the row but the daemon)."""
        return [p for p in self.procs if p is not self.daemon]

    def cpu_now(self) -> dict[str, float | None]:
        """CPU seconds used so far by the daemon and by all node servers together."""
        out: dict[str, float | None] = {}
        for who, procs in (("daemon", [self.daemon] if self.daemon else []), ("nodes", self.nodes)):
            times = [cpu_seconds(p.pid) for p in procs]
            out[who] = None if not procs or None in times else sum(t or 0.0 for t in times)
        return out

    def check_alive(self) -> None:
        for p in self.procs:
            p.check()

    def record_rss(self) -> None:
        for p in self.procs:
            if p.alive():
                self.peak_rss_mib[p.name] = vm_hwm_mib(p.pid)

    @property
    def daemon_rss(self) -> float | None:
        return self.peak_rss_mib.get(self.daemon.name) if self.daemon else None


def setup_row(env: Env, row: Row) -> None:
    """Start the row's servers and mount, attach the loop device, fill the disk once."""
    cfg, key, st = env.cfg, row.spec.key, row.stack
    mnt = cfg.workdir / f"mnt-{key}"
    if row.spec.nbd:
        setup_nbd_row(env, row)
        return
    if row.spec.dstfs:
        env.require_dstfs()
        uris = []
        count = WHOLE_DISK_NODES.get(key, 2)
        node_size = cfg.disk_size if key in WHOLE_DISK_NODES else cfg.node_size
        for i in range(count):
            name = f"{key}-n{i}"
            if key == "linear-serve":
                uri, p = env.dstfs_serve(st, name, cfg.tmpfs / f"{name}.img", node_size)
            else:
                rate = SLOW_NODE_RATE if key.endswith("-slow") else None
                uri, p = env.nbdkit_memory(st, name, node_size, rate)
            row.procs.append(p)
            uris.append(uri)
        alg = key.split("-")[0] if key.startswith(("stripe", "mirror")) else "linear"
        mnt, row.daemon = env.dstfs_mount(st, key, alg, uris)
        row.procs.append(row.daemon)
        disk = mnt / "disk.img"
    elif key == "nbdfuse":
        uri, p = env.nbdkit_memory(st, f"{key}-node", cfg.disk_size)
        row.procs.append(p)
        disk = mnt / "nbd"
        row.daemon = env.mount_fuse(st, "nbdfuse", ["nbdfuse", str(mnt), uri], mnt, disk)
        row.procs.append(row.daemon)
    elif key == "noop":
        argv = [noop_python(), str(NOOP_FS), str(mnt), str(cfg.disk_size)]
        disk = mnt / "disk.img"
        row.daemon = env.mount_fuse(st, "noop_fs", argv, mnt, disk)
        row.procs.append(row.daemon)
    elif key == "tmpfs":
        disk = cfg.tmpfs / "loop-tmpfs.img"
        with open(disk, "wb") as f:
            f.truncate(cfg.disk_size)
        st.callback(safe(f"remove {disk}", disk.unlink, True))
    else:
        raise BenchError(f"unknown row {key}")
    # Teardown runs in reverse: detach loop, read peak RSS, unmount, stop servers.
    st.callback(row.record_rss)
    row.dev, dio = env.attach_loop(st, disk)
    row.setup.update(
        disk=str(disk),
        disk_bytes=disk.stat().st_size,
        loop=row.dev,
        loop_dio=dio,
        procs=[p.info() for p in row.procs],
    )
    log.info("%s: %s on %s (dio=%s), filling", row.spec.name, disk, row.dev, dio)
    row.setup["fill"] = run_fio(env.cfg, row.dev, FILL_JOB, runtime=None)
    log.info("%s: first write %.0f MB/s", row.spec.name, row.setup["fill"]["value"])


def setup_nbd_row(env: Env, row: Row) -> None:
    """An NBD row: ``nbdkit memory`` of the whole disk on a unix socket, either itself the
    row or the one node of a linear dstfs array served by ``--no-fuse --export unix:``.
    Filled once through its URI, as the loop rows are through their device."""
    cfg, key, st = env.cfg, row.spec.key, row.stack
    sock = cfg.workdir / f"{key}-node.sock"
    uri, node = env.nbdkit_memory(st, f"{key}-node", cfg.disk_size, unix=sock)
    row.procs.append(node)
    if key == "export":
        uri, row.daemon = env.dstfs_export(st, key, "linear", [uri])
        row.procs.append(row.daemon)
    st.callback(row.record_rss)  # runs before the servers stop
    row.uri = uri
    row.setup.update(uri=uri, disk_bytes=cfg.disk_size, procs=[p.info() for p in row.procs])
    log.info("%s: %s, filling", row.spec.name, uri)
    row.setup["fill"] = run_fio(cfg, uri, FILL_JOB, runtime=None)
    log.info("%s: first write %.0f MB/s", row.spec.name, row.setup["fill"]["value"])


def run_rows(env: Env, rows: list[Row]) -> None:
    """Run every job on every live row, interleaved: job J on A, B, C, ... ``repeat`` times."""
    cfg = env.cfg
    for job in JOBS:
        for rep in range(cfg.repeat):
            for row in rows:
                target = row.target
                if row.error or target is None:
                    continue
                try:
                    row.check_alive()
                except BenchError as e:
                    row.error = str(e)
                    log.error("%s: %s", row.spec.name, e)
                    continue
                # NBD rows: no page cache on the way, no loop device to count requests,
                # so no ramp either: fio's count is then of the whole run, the CPU's window.
                nbd = row.spec.nbd
                try:
                    if job.reads and not nbd:
                        env.drop_caches()
                    cpu0, req0 = row.cpu_now(), None if nbd else loop_requests(target, job.reads)
                    ramp = 0.0 if nbd else cfg.ramp
                    sample = run_fio(env.cfg, target, job, cfg.runtime, ramp=ramp)
                    req1 = None if nbd else loop_requests(target, job.reads)
                    add_cpu(sample, cpu0, row.cpu_now(), req0, req1)
                except Exception as e:
                    log.error("%s %s #%d: %s", row.spec.name, job.key, rep + 1, describe(e))
                    row.job_errors.setdefault(job.key, []).append(describe(e))
                    if isinstance(e, BenchTimeout):
                        row.error = f"given up: {e}"
                        continue
                    try:
                        row.check_alive()
                    except BenchError as dead:
                        row.error = str(dead)
                    continue
                sample["t"] = time.time()
                row.samples.setdefault(job.key, []).append(sample)
                cpu = sample["cpu_us_per_request"]
                log.info(
                    "%-20s %-10s #%d %10.0f %s, CPU us/request daemon %s nodes %s",
                    row.spec.name,
                    job.key,
                    rep + 1,
                    sample["value"],
                    job.unit,
                    "-" if cpu["daemon"] is None else f"{cpu['daemon']:.1f}",
                    "-" if cpu["nodes"] is None else f"{cpu['nodes']:.1f}",
                )


def add_cpu(
    sample: dict[str, Any],
    cpu0: dict[str, float | None],
    cpu1: dict[str, float | None],
    req0: int | None,
    req1: int | None,
) -> None:
    """CPU per request over one fio run: the processes' CPU over the whole run (ramp included)
    divided by the requests the loop device took over the same window (fio's own count leaves
    the ramp out, so it would not match the CPU's window); fio's count when sysfs has none."""
    requests = req1 - req0 if req0 is not None and req1 is not None else None
    sample["requests"] = requests
    n = requests or sample.get("ios")
    sample["cpu_s"] = {}
    sample["cpu_us_per_request"] = {}
    for who in ("daemon", "nodes"):
        a, b = cpu0.get(who), cpu1.get(who)
        used = b - a if a is not None and b is not None else None
        sample["cpu_s"][who] = used
        sample["cpu_us_per_request"][who] = used / n * 1e6 if used is not None and n else None


def noop_python() -> str:
    """A Python that can import pyfuse3 and trio: this one, else the repository's venv."""
    if importlib.util.find_spec("pyfuse3") and importlib.util.find_spec("trio"):
        return sys.executable
    venv = REPO_DIR / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable
