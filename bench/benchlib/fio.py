"""fio: the argv of one job, running it with a deadline, and its JSON figures
(``value`` in the job's unit: MB/s = 1e6 bytes/s, or IOPS)."""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path
from typing import Any

from .config import BenchError, BenchTimeout, Config, Job
from .processes import one_line, run_proc

log = logging.getLogger("bench")


def is_uri(target: str) -> bool:
    """An NBD URI (fio's nbd engine) rather than a block device or file (libaio)."""
    return "://" in target


def fio_argv(
    target: str,
    job: Job,
    out: Path,
    runtime: float | None,
    size: int | None = None,
    ramp: float = 0.0,
) -> list[str]:
    """fio on a block device (libaio, O_DIRECT) or an NBD URI (fio's nbd engine, one
    connection: libnbd's async API keeps ``iodepth`` requests in flight on it)."""
    if is_uri(target):
        engine = ["--ioengine=nbd", f"--uri={target}"]
    else:
        engine = [f"--filename={target}", "--ioengine=libaio", "--direct=1"]
    argv = [
        "fio",
        f"--name={job.key}",
        *engine,
        f"--rw={job.rw}",
        f"--bs={job.bs}",
        f"--iodepth={job.iodepth}",
        "--numjobs=1",
        "--norandommap",
        "--randrepeat=0",
        "--output-format=json",
        f"--output={out}",
    ]
    if size is not None:
        argv.append(f"--size={size}")
    if runtime is not None:
        argv += ["--time_based", f"--runtime={int(runtime * 1000)}ms"]
        if ramp > 0:
            argv.append(f"--ramp_time={int(ramp * 1000)}ms")
    return argv


def run_fio(
    cfg: Config,
    target: str,
    job: Job,
    runtime: float | None,
    size: int | None = None,
    ramp: float = 0,
) -> dict[str, Any]:
    """Run one fio job on a device or NBD URI to completion and return its figures
    (``value`` in ``job.unit``)."""
    out = cfg.workdir / "fio.json"
    out.unlink(missing_ok=True)
    argv = fio_argv(target, job, out, runtime, size, ramp)
    if runtime is not None:
        timeout = runtime + ramp + cfg.slack
    else:
        timeout = (size or cfg.disk_size) / 5e6 + cfg.slack
    log.debug("run: %s", " ".join(argv))
    try:
        r = run_proc(argv, timeout)
    except subprocess.TimeoutExpired as e:
        raise BenchTimeout(f"fio {job.key} timed out after {timeout:.0f}s") from e
    try:
        result = fio_figures(out, job)
    except BenchError as e:
        raise BenchError(f"fio {job.key} rc={r.returncode}: {e}; {one_line(r.stderr)}") from e
    if r.returncode != 0:
        raise BenchError(f"fio {job.key} rc={r.returncode}: {one_line(r.stderr)}")
    return result


def fio_figures(path: Path, job: Job) -> dict[str, Any]:
    """Parse fio's JSON output (ignoring any text before it) into the figures we keep."""
    try:
        text = path.read_text(errors="replace")
        data = json.loads(text[text.index("{") :])
        j = data["jobs"][0]
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise BenchError(f"no fio JSON output ({e.__class__.__name__})") from e
    if j.get("error"):
        raise BenchError(f"fio job error {j['error']}")
    side = j["read" if job.reads else "write"]
    clat = side.get("clat_ns", {})
    pct = clat.get("percentile", {})
    figures = {
        "bw_bytes": side["bw_bytes"],
        "iops": side["iops"],
        "io_bytes": side["io_bytes"],
        "ios": side.get("total_ios", 0),
        "runtime_ms": side["runtime"],
        "clat_mean_us": clat.get("mean", 0) / 1000,
        "clat_p99_us": pct.get("99.000000", 0) / 1000,
    }
    if side["io_bytes"] == 0:
        raise BenchError("fio did no I/O")
    figures["value"] = side["bw_bytes"] / 1e6 if job.unit == "MB/s" else side["iops"]
    return figures
