"""Acceptance: the link to a node is cut and restored, under load.

Each node server runs in its own network namespace, joined to a client
namespace by a veth pair (tests/helpers/netns.py); the dstfs daemon runs in the
client namespace (`nsenter --net` keeps the mount namespace, so the FUSE
mount is ours as usual). Cutting a link drops packets silently: TCP only
notices through TCP_USER_TIMEOUT/keepalive (about 5 s), and the node's
timeout runs from then.

- Cut for 3 s: no error reaches the writers, every block is intact.
- Cut past a short node timeout: `failed`, EIO for that node's range only,
  the other range goes on; restored: `online`, its range works again.

Network rule: nothing but loopback and the namespaces made here is
contacted; the only processes outside them are the test and the mount CLI.
"""

from __future__ import annotations

import contextlib
import ctypes
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.load import (
    RangeWriter,
    ctl,
    outage_past_timeout,
    outage_within_timeout,
    verify_blocks,
    watchdog,
    writing,
)
from helpers.mounts import daemon_pid, mount_cmd, new_dir, teardown
from helpers.netns import Topology, netns_unavailable_reason, topology
from helpers.procs import DSTFS, need

MiB = 1 << 20
NBD_PORT = 10809
PR_SET_CHILD_SUBREAPER = 36


@pytest.fixture
def topo() -> Iterator[Topology]:
    reason = netns_unavailable_reason()
    if reason is not None:
        pytest.skip(f"network namespaces unavailable: {reason}")
    need("fusermount3")
    with topology(2, tag="fo") as t:
        yield t


def start_node(topo: Topology, index: int, path: Path) -> subprocess.Popen:
    """`dstfs serve` in node `index`'s namespace, listening on its address."""
    addr = topo.node_address(index)
    argv = [*DSTFS, "serve", str(path), "--size", "64M", "--listen", f"{addr}:{NBD_PORT}"]
    return topo.start_server(index, argv, NBD_PORT, path.with_suffix(".log"))


@contextlib.contextmanager
def mounted_in_client_ns(topo: Topology, tmp_path: Path, nodes: list[str]) -> Iterator[Path]:
    """`dstfs mount` run in the client namespace (its daemon stays there)."""
    mnt = new_dir(tmp_path, "mnt").resolve()
    argv = topo.client_cmd(mount_cmd(mnt, tmp_path / "state", nodes))
    libc = ctypes.CDLL(None, use_errno=True)
    pid = None
    try:
        # The daemon, left behind by the CLI, becomes our child: teardown reaps it.
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        try:
            res = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        finally:
            libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
        pid = daemon_pid(mnt)
        assert res.returncode == 0, f"dstfs mount failed: {res.stderr}"
        yield mnt
    finally:
        teardown(mnt, pid or daemon_pid(mnt))


def test_link_cut_and_restored(topo: Topology, tmp_path: Path) -> None:
    procs = [start_node(topo, i, tmp_path / f"n{i}.img") for i in range(2)]
    uris = [f"nbd://{topo.node_address(i)}:{NBD_PORT}" for i in range(2)]
    try:
        with mounted_in_client_ns(topo, tmp_path, uris) as mnt, watchdog(mnt, 300):
            assert ctl(mnt, "n-0", "type") == f"R: {topo.node_address(0)}:{NBD_PORT}"
            disk = mnt / "disk.img"
            w0 = RangeWriter(disk, 0, 64 * MiB, "n-0")
            w1 = RangeWriter(disk, 64 * MiB, 64 * MiB, "n-1")
            with writing(w0, w1):
                states = outage_within_timeout(
                    mnt,
                    "n-0",
                    [w0, w1],
                    lambda: topo.cut(0),
                    lambda: topo.restore(0),
                    noticed=False,  # TCP may notice a silent link only later
                    outage=3.0,
                )
                print(f"n-0 showed {sorted(states)} during a 3 s cut")
                outage_past_timeout(
                    mnt, "n-0", w0, [w1], lambda: topo.cut(0), lambda: topo.restore(0), timeout=4
                )
                assert ctl(mnt, "n-0", "state") == "online"
            assert verify_blocks(disk, [w0, w1]) == []
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
