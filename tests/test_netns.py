"""Tests for tests/helpers/netns.py with real programs: nbdkit in a node namespace, nbdinfo
in the client.

Network rule: only addresses inside namespaces created here are contacted.  Isolation from the
host is shown without sending packets from the root namespace (its only route to 10.231.x.x is
the default route, so a probe would leave the machine): root addresses/links are inspected, and
the reachability probes run from an unconnected "outsider" namespace and from another node.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.load import wait_for
from helpers.netns import (
    NetnsError,
    Topology,
    list_namespaces,
    namespace_pids,
    netns_unavailable_reason,
    remove_stale_namespaces,
)

log = logging.getLogger(__name__)

NBD_PORT = 10809
MEMORY_SIZE = 16 * 1024 * 1024


@pytest.fixture(scope="module")
def netns_ok() -> None:
    reason = netns_unavailable_reason()
    if reason is not None:
        pytest.skip(f"network namespaces unavailable: {reason}")
    for tool in ("nbdkit", "nbdinfo", "timeout"):
        if shutil.which(tool) is None:
            pytest.skip(f"`{tool}` is not installed")


@pytest.fixture
def topo(netns_ok: None) -> Iterator[Topology]:
    with Topology("t") as t:
        names = t.namespaces
        yield t
    assert not set(names) & set(list_namespaces()), "namespaces left after teardown"


def start_nbdkit(topo: Topology, index: int, log_dir: Path) -> subprocess.Popen[bytes]:
    """Start an in-memory nbdkit on node ``index`` and wait until it accepts connections."""
    addr = topo.node_address(index)
    argv = ["nbdkit", "-f", "--exit-with-parent", "-i", addr, "-p", str(NBD_PORT), "memory", "16M"]
    return topo.start_server(index, argv, NBD_PORT, log_dir / f"nbdkit-{index}.log")


def nbdinfo_size(cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run ``timeout T nbdinfo --size URI`` via the namespace prefix already in ``cmd``."""
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 10)


def nbdinfo_argv(addr: str, timeout: float) -> list[str]:
    return ["timeout", str(timeout), "/usr/bin/nbdinfo", "--size", f"nbd://{addr}:{NBD_PORT}"]


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def root_links_and_addrs() -> str:
    """Root-namespace links and addresses (read-only inspection, no packets)."""
    links = subprocess.run(["ip", "-o", "link", "show"], check=True, capture_output=True, text=True)
    addrs = subprocess.run(["ip", "-o", "addr", "show"], check=True, capture_output=True, text=True)
    return links.stdout + addrs.stdout


def assert_root_untouched() -> None:
    text = root_links_and_addrs()
    assert "10.231." not in text, f"root namespace has a 10.231.x.x address:\n{text}"
    assert "to-client" not in text, f"root namespace has a node-side veth:\n{text}"
    assert " to-n" not in text, f"root namespace has a client-side veth:\n{text}"


def test_nbdinfo_through_link_cut_and_restore(topo: Topology, tmp_path: Path) -> None:
    addr = topo.add_node(0)
    assert addr == "10.231.0.2"
    assert_root_untouched()
    nbdkit = start_nbdkit(topo, 0, tmp_path)
    try:
        r = nbdinfo_size(topo.client_cmd(nbdinfo_argv(addr, 30)))
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == str(MEMORY_SIZE)

        # Node side down: the client sees silence (no RST, no ICMP), so only a timeout ends it.
        topo.cut(0)
        assert not topo.link_is_up(0)
        t0 = time.monotonic()
        r = nbdinfo_size(topo.client_cmd(nbdinfo_argv(addr, 3)))
        elapsed = time.monotonic() - t0
        log.info("node-side cut: nbdinfo rc=%d after %.2fs: %s", r.returncode, elapsed, r.stderr)
        assert r.returncode != 0, "nbdinfo reached the node through a cut link"
        assert r.returncode == 124, f"expected a timeout (silence), got {r.returncode}: {r.stderr}"

        t0 = time.monotonic()
        topo.restore(0)
        log.info("restore (node side) took %.3fs", time.monotonic() - t0)
        assert topo.link_is_up(0)
        r = nbdinfo_size(topo.client_cmd(nbdinfo_argv(addr, 30)))
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == str(MEMORY_SIZE)

        # Client side down: the connected route vanishes, connects fail at once (ENETUNREACH).
        topo.cut(0, side="client")
        t0 = time.monotonic()
        r = nbdinfo_size(topo.client_cmd(nbdinfo_argv(addr, 30)))
        elapsed = time.monotonic() - t0
        log.info("client-side cut: nbdinfo rc=%d after %.2fs: %s", r.returncode, elapsed, r.stderr)
        # Not silence: nbdinfo fails by itself, long before `timeout` would end it.
        assert r.returncode not in (0, 124), f"expected a fast failure, got {r.returncode}"
        assert elapsed < 20

        topo.restore(0, side="client", probe_port=NBD_PORT)
        r = nbdinfo_size(topo.client_cmd(nbdinfo_argv(addr, 30)))
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == str(MEMORY_SIZE)
        assert nbdkit.poll() is None, "nbdkit died during cut/restore"
    finally:
        stop(nbdkit)


def test_nodes_isolated_from_host_and_each_other(topo: Topology, tmp_path: Path) -> None:
    addr0 = topo.add_node(0)
    topo.add_node(1)
    nbdkit = start_nbdkit(topo, 0, tmp_path)
    try:
        # Positive control: the client reaches node 0.
        r = nbdinfo_size(topo.client_cmd(nbdinfo_argv(addr0, 30)))
        assert r.returncode == 0, r.stderr

        # The host: no address, no veth, no route through our links (inspection only; a probe
        # from the root namespace would follow its default route off the machine).
        assert_root_untouched()
        route = subprocess.run(
            ["ip", "route", "get", addr0], check=True, capture_output=True, text=True
        ).stdout
        assert "to-n" not in route and "to-client" not in route, route

        # A namespace with no link at all cannot reach the node ...
        r = nbdinfo_size(topo.outsider_cmd(nbdinfo_argv(addr0, 5)))
        assert r.returncode != 0, "node reachable from an unconnected namespace"
        # ... and neither can another node (the client namespace does not forward).
        r = nbdinfo_size(topo.node_cmd(1, nbdinfo_argv(addr0, 5)))
        assert r.returncode != 0, "node 0 reachable from node 1"
    finally:
        stop(nbdkit)


def test_teardown_kills_processes_and_removes_namespaces(netns_ok: None, tmp_path: Path) -> None:
    with Topology("td") as topo:
        topo.add_node(0)
        topo.add_node(1)
        names = topo.namespaces
        assert len(names) == 3
        assert set(names) <= set(list_namespaces())
        # Left running on purpose: teardown must kill them.
        procs = [
            start_nbdkit(topo, 0, tmp_path),
            subprocess.Popen(topo.node_cmd(1, ["sleep", "300"])),
            subprocess.Popen(topo.client_cmd(["sleep", "300"])),
        ]
        for ns in names:
            # `ip netns exec` enters the namespace after it has started: wait
            # for it (a busy machine may take a while), then require it.
            wait_for(lambda ns=ns: namespace_pids(ns), f"a process in {ns}", timeout=30)
    # nbdkit exits 0 on SIGTERM (clean shutdown); sleep dies of the signal.
    assert [p.wait(timeout=30) for p in procs] == [0, -15, -15]
    assert not set(names) & set(list_namespaces())
    assert_root_untouched()
    with pytest.raises(NetnsError, match="closed"):
        topo.client_cmd(["true"])
    topo.close()  # idempotent


def test_teardown_after_exception(netns_ok: None) -> None:
    names: list[str] = []
    with pytest.raises(ZeroDivisionError), Topology("ex") as topo:
        topo.add_node(3)
        names = topo.namespaces
        _ = 1 / 0
    assert names
    assert not set(names) & set(list_namespaces())


def test_remove_stale_namespaces(netns_ok: None) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    name = f"dstfs-{dead.pid}-0-client"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        assert name in remove_stale_namespaces()
        assert name not in list_namespaces()
    finally:
        if name in list_namespaces():
            subprocess.run(["ip", "netns", "delete", name], check=True)


def test_argv_helpers(topo: Topology) -> None:
    topo.add_node(0)
    assert topo.client_cmd(["x", "y"]) == [
        "nsenter",
        f"--net=/run/netns/{topo.client_ns}",
        "--",
        "x",
        "y",
    ]
    assert topo.node_cmd(0, ["x"])[1] == f"--net=/run/netns/{topo.node_ns(0)}"
    with pytest.raises(TypeError):
        topo.client_cmd("echo hi")  # type: ignore[arg-type]
    with pytest.raises(NetnsError, match="not added"):
        topo.node_cmd(7, ["x"])
    with pytest.raises(NetnsError, match="already exists"):
        topo.add_node(0)
