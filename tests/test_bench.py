"""End-to-end smoke test of the benchmark harness: run ``bench/run --quick`` once.

Checks that it prints a table with every row, writes its JSON, leaves nothing mounted or
attached, and exits 0. No timing is asserted: the machines are shared and figures move 2-3x.
Needs root and fio, nbdkit, nbdfuse, nbdcopy, nbdinfo, losetup, fusermount3; skipped otherwise.
Takes about a minute (marked slow: deselect with ``-m "not slow"``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
RUN = REPO / "bench" / "run"
ROW_NAMES = (
    "dstfs linear/nbdkit",
    "dstfs linear/serve",
    "dstfs stripe/nbdkit",
    "dstfs linear/slow nodes",
    "dstfs stripe/slow nodes",
    "dstfs mirror/slow nodes",
    "dstfs linear/one slow node",
    "nbdfuse/nbdkit",
    "pyfuse3 no-op",
    "loop/tmpfs",
    "dstfs export, linear/nbdkit",
    "nbdkit memory directly",
)
EXTRA_TITLES = (
    "nbdcopy read, dstfs serve",
    "nbdcopy read, nbdkit file",
    "nbdcopy write, dstfs serve --workers 2",
    "nbdcopy read, dstfs serve, TLS",
    "nbdcopy write, dstfs serve, TLS",
    "nbdcopy read, dstfs serve --workers 2, TLS",
    "nbdcopy write, dstfs serve --workers 2, TLS",
    "nbdcopy read, nbdkit file, TLS",
    "nbdcopy write, nbdkit file, TLS",
    "nbdcopy read, dstfs export",
    "nbdcopy write, dstfs export",
    "nbdcopy read, nbdkit memory",
    "nbdcopy write, nbdkit memory",
    "migration copy, idle",
    "foreground seq read, during migration",
    "mirror full sync (data), idle",
    "mirror foreground seq read, during sync",
    "mirror 64G sparse: daemon peak RSS",
)
TOOLS = ("fio", "nbdkit", "nbdfuse", "nbdcopy", "nbdinfo", "losetup", "fusermount3", "openssl")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="bench needs root (losetup, mount)"),
    pytest.mark.skipif(
        any(shutil.which(t) is None for t in TOOLS), reason=f"bench needs {', '.join(TOOLS)}"
    ),
]


@pytest.fixture(scope="module")
def quick_run() -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, str(RUN), "--quick"]
    with subprocess.Popen(
        argv,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            out, err = proc.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            # SIGTERM, not SIGKILL: the harness then tears down its mounts and loop devices.
            proc.terminate()
            out, err = proc.communicate(timeout=300)
            pytest.fail(f"bench/run --quick took over 900 s\n{err[-3000:]}")
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def results_of(run: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    m = re.search(r"^results: (\S+\.json)$", run.stdout, re.MULTILINE)
    assert m, run.stdout
    return json.loads(Path(m.group(1)).read_text())


def test_quick_prints_every_row(quick_run: subprocess.CompletedProcess[str]) -> None:
    out = quick_run.stdout
    assert quick_run.returncode in (0, 1), quick_run.stderr[-3000:]
    table = out.split("spread (min-max)")[0]
    for name in ROW_NAMES:
        assert re.search(rf"^{re.escape(name)}\s", table, re.MULTILINE), (name, out)
    for title in EXTRA_TITLES:
        assert title in out, (title, out)
    assert [r["name"] for r in results_of(quick_run)["rows"]] == list(ROW_NAMES)


def test_quick_leaves_nothing_behind(quick_run: subprocess.CompletedProcess[str]) -> None:
    results = results_of(quick_run)
    assert results["leftovers"] == []
    workdir = results["config"]["workdir"]
    assert workdir not in Path("/proc/self/mountinfo").read_text()
    # sysfs, not `losetup -a`: that stats every backing file and hangs on any hung FUSE mount.
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        assert not backing.read_text().startswith(workdir + "/"), backing
    assert not Path(workdir).exists()


def test_quick_exits_zero(quick_run: subprocess.CompletedProcess[str]) -> None:
    assert quick_run.returncode == 0, quick_run.stdout[-3000:]
