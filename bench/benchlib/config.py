"""Bench configuration: paths, tools, the fio jobs, the rows, the run's Config,
and the error types every measurement reports through (BenchError: the message
goes into the table; BenchTimeout: the row is given up)."""

from __future__ import annotations

import argparse
import logging
import re
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("bench")


BENCH_DIR = Path(__file__).resolve().parent.parent


REPO_DIR = BENCH_DIR.parent


NOOP_FS = BENCH_DIR / "noop_fs.py"


KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


LOOPBACK = "127.0.0.1"


POLL_S = 0.02


TOOLS = ("fio", "nbdkit", "nbdfuse", "nbdcopy", "nbdinfo", "losetup", "fusermount3", "mount")


PR_SET_PDEATHSIG = 1


class BenchError(Exception):
    """A setup step or a measurement failed; the message goes into the table."""


class BenchTimeout(BenchError):
    """A measurement hung; the row is given up."""


def describe(e: BaseException) -> str:
    """The message for a table cell: BenchError as is, anything else with its type."""
    return str(e) if isinstance(e, BenchError) else f"{type(e).__name__}: {e}"


@dataclass(frozen=True)
class Job:
    """One fio job: pattern, block size, queue depth, and the figure reported for it."""

    key: str
    title: str
    rw: str
    bs: str
    iodepth: int
    unit: str  # "MB/s" (bytes/s / 1e6) or "IOPS"

    @property
    def reads(self) -> bool:
        return "read" in self.rw


JOBS = (
    Job("seqwrite", "seq write", "write", "1M", 16, "MB/s"),
    Job("seqread", "seq read", "read", "1M", 16, "MB/s"),
    Job("randwrite", "rand write", "randwrite", "4k", 32, "IOPS"),
    Job("randread", "rand read", "randread", "4k", 32, "IOPS"),
)


FILL_JOB = Job("fill", "fill (first write)", "write", "1M", 16, "MB/s")


FG_JOB = Job("fg-seqread", "foreground seq read", "read", "1M", 16, "MB/s")


@dataclass(frozen=True)
class RowSpec:
    key: str
    name: str

    @property
    def dstfs(self) -> bool:
        return self.key in DSTFS_ROWS

    @property
    def nbd(self) -> bool:
        """fio speaks NBD to the row (``--ioengine=nbd``): no loop device, no FUSE."""
        return self.key in NBD_ROWS

    @property
    def anchor(self) -> str:
        """The row every ratio of this row is to."""
        return NBD_ANCHOR if self.nbd else ANCHOR


DSTFS_ROWS = (
    "linear-nbdkit",
    "linear-serve",
    "stripe-nbdkit",
    "linear-slow",
    "stripe-slow",
    "mirror-slow",
    "one-slow",
    "export",
)


#: Rows that fio reaches with its nbd engine, over a unix socket (issue 16): the
#: array through ``dstfs mount --no-fuse --export`` against its node directly.
NBD_ROWS = ("export", "nbdkit-nbd")


#: Mirror rows: a mirror of two slow nodes against one slow node (issue 13: reads
#: >= 1.8x, writes >= 0.9x), each node holding the whole disk.
WHOLE_DISK_NODES = {"mirror-slow": 2, "one-slow": 1}


#: The sparse mirror whose daemon RSS is measured under a fio job (issue 13: < 256 MiB).
SPARSE_MIRROR_NODE = 64 * (1 << 30)


#: nbdkit's rate filter on each node of the *-slow rows: nodes, not the daemon,
#: are then the limit, as with real disks on a network, and a stripe's spread shows.
SLOW_NODE_RATE = "800M"  # bits/s: 100 MB/s per node


ROW_SPECS = (
    RowSpec("linear-nbdkit", "dstfs linear/nbdkit"),
    RowSpec("linear-serve", "dstfs linear/serve"),
    RowSpec("stripe-nbdkit", "dstfs stripe/nbdkit"),
    RowSpec("linear-slow", "dstfs linear/slow nodes"),
    RowSpec("stripe-slow", "dstfs stripe/slow nodes"),
    RowSpec("mirror-slow", "dstfs mirror/slow nodes"),
    RowSpec("one-slow", "dstfs linear/one slow node"),
    RowSpec("nbdfuse", "nbdfuse/nbdkit"),
    RowSpec("noop", "pyfuse3 no-op"),
    RowSpec("tmpfs", "loop/tmpfs"),
    RowSpec("export", "dstfs export, linear/nbdkit"),
    RowSpec("nbdkit-nbd", "nbdkit memory directly"),
)


ANCHOR = "nbdfuse"


NBD_ANCHOR = "nbdkit-nbd"


@dataclass
class Config:
    quick: bool
    repeat: int
    runtime: float
    ramp: float
    disk_size: int
    mig_size: int
    copy_size: int
    chunk: int | None
    rows: list[RowSpec]
    extras: tuple[str, ...]  # the groups of extra measurements (benchlib.extras.EXTRA_GROUPS)
    dstfs: str | None
    workdir: Path

    @property
    def slack(self) -> float:
        """Seconds a fio job or copy may overrun its expected time before it counts as hung."""
        return 30.0 if self.quick else 120.0

    @property
    def node_size(self) -> int:
        return self.disk_size // 2

    @property
    def logdir(self) -> Path:
        return self.workdir / "logs"

    @property
    def tmpfs(self) -> Path:
        return self.workdir / "tmpfs"

    @property
    def tmpfs_bytes(self) -> int:
        need = self.disk_size + 2 * self.node_size
        if self.extras:
            # nbdcopy: the two servers' files and the source (plain and TLS servers
            # share them), and the source copied into the NBD rows.
            need += 3 * self.copy_size + self.disk_size
        return need + 256 * MiB


def parse_size(text: str) -> int:
    """Parse ``67108864``, ``64K``, ``512M``, ``1G`` (powers of 1024) into bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:I?B)?\s*", text.upper())
    if not m:
        raise argparse.ArgumentTypeError(f"bad size: {text!r}")
    value = int(m.group(1)) * {"": 1, "K": KiB, "M": MiB, "G": GiB, "T": 1 << 40}[m.group(2)]
    if value <= 0 or value % MiB:
        raise argparse.ArgumentTypeError(f"size must be a positive multiple of 1 MiB: {text!r}")
    return value


def fmt_size(n: int) -> str:
    for unit, factor in (("G", GiB), ("M", MiB), ("K", KiB)):
        if n % factor == 0:
            return f"{n // factor}{unit}"
    return str(n)
