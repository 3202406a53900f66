"""Network-namespace topology helper for tests that cut links to NBD nodes.

This is a helper module for tests, not a test file.  It builds a star of network
namespaces: one *client* namespace in the middle and one namespace per storage
node, each node joined to the client by its own veth pair::

    client ns  "to-n<i>"  10.231.<i>.1/24  <== veth ==>  "to-client"  10.231.<i>.2/24  node<i> ns

Rules this module follows (and callers must follow too):

* STRICT NETWORK RULE: only loopback addresses or addresses inside network
  namespaces created by the test may be used.  No address is ever put on an
  interface of the root (initial) network namespace, and no traffic is sent to
  any other address.  Both ends of every veth pair are created directly inside
  the test's namespaces (``ip -n CLIENT link add ... peer ... netns NODE``), so
  no interface ever appears in the root namespace, not even for a moment.
  Never probe a node address from the root namespace: it has no route to
  10.231.0.0/16 except its default route, so such a packet would leave the
  machine.  To show isolation, inspect root routes/addresses (no packets) or
  probe from another namespace created by the test (:meth:`Topology.outsider_cmd`).
* Processes that must see the host's mounts (the dstfs FUSE daemon, anything
  touching the mount point) are started with
  ``nsenter --net=/run/netns/NAME CMD...`` (:meth:`Topology.client_cmd`).
  ``nsenter --net`` switches only the network namespace.  ``ip netns exec``
  would also unshare the mount namespace (to remount /sys), so a FUSE mount
  made under it would be invisible to the host and to the test.  Node servers
  use nsenter too (:meth:`Topology.node_cmd`), for uniformity; nsenter execs
  the command, so the started process is a direct child of the caller and
  ``nbdkit --exit-with-parent`` works as expected.
* ``lo`` is brought up in every namespace.
* Namespace names contain the pid and a per-process sequence number, so
  parallel test runs never collide.  Addresses may repeat between runs: they
  live in separate namespaces and cannot meet.
* Teardown (``close()``/``__exit__``, always run in ``finally``) kills every
  process still inside the namespaces (``ip netns pids``), deletes the
  namespaces (which destroys the veth pairs with them) and checks that nothing
  is left.

Typical use::

    with Topology() as topo:
        addr = topo.add_node(0)
        server = subprocess.Popen(topo.node_cmd(0, ["nbdkit", "-f", "-i", addr, "memory", "16M"]))
        topo.cut(0)
        topo.restore(0)
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

__all__ = [
    "NAME_PREFIX",
    "NETNS_DIR",
    "NetnsError",
    "Topology",
    "list_namespaces",
    "namespace_pids",
    "netns_unavailable_reason",
    "remove_stale_namespaces",
    "topology",
]

log = logging.getLogger(__name__)

NETNS_DIR = "/run/netns"
NAME_PREFIX = "dstfs"
SUBNET_TEMPLATE = "10.231.{index}.0/24"
CLIENT_IFNAME = "to-n{index}"
NODE_IFNAME = "to-client"
# Port probed by restore()/wait_reachable() when the caller gives none.  Nothing needs to
# listen there: a TCP RST ("connection refused") from the node's kernel proves the path works.
DEFAULT_PROBE_PORT = 9

Side = Literal["node", "client"]

_seq = itertools.count()

# Runs inside the client namespace.  Exit 0 if the TCP path to (host, port) works: connected,
# or (when accept_refused is "1") refused by the peer's kernel.  Exit 1 otherwise (timeout, no
# route, unreachable, or refused when a listener is required).
_PROBE_SCRIPT = """
import socket, sys
host, port, timeout, accept_refused = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.settimeout(timeout)
try:
    s.connect((host, port))
except ConnectionRefusedError as e:
    if accept_refused == "1":
        sys.exit(0)
    print(f"{type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(1)
except OSError as e:
    print(f"{type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(1)
finally:
    s.close()
sys.exit(0)
"""


class NetnsError(RuntimeError):
    """A namespace/link operation failed; the message names the command and its stderr."""


def _run(argv: Sequence[str], what: str, timeout: float = 30.0) -> str:
    """Run ``argv`` with check=True; return stdout; raise NetnsError with context on failure."""
    argv = list(argv)
    log.debug("run: %s", " ".join(argv))
    try:
        proc = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as e:
        raise NetnsError(f"{what}: command not found: {argv[0]}") from e
    except subprocess.CalledProcessError as e:
        raise NetnsError(
            f"{what}: `{' '.join(argv)}` exited with {e.returncode}: "
            f"{(e.stderr or '').strip() or '(no stderr)'}"
        ) from e
    except subprocess.TimeoutExpired as e:
        raise NetnsError(f"{what}: `{' '.join(argv)}` timed out after {timeout}s") from e
    return proc.stdout


def list_namespaces() -> list[str]:
    """Names of all named network namespaces (``ip netns list``)."""
    out = _run(["ip", "netns", "list"], "list network namespaces")
    # Lines look like "name" or "name (id: 3)".
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def namespace_pids(name: str) -> list[int]:
    """Pids of processes whose network namespace is ``name`` (``ip netns pids``)."""
    out = _run(["ip", "netns", "pids", name], f"list processes in namespace {name}")
    return [int(tok) for tok in out.split()]


def _kill_namespace_processes(name: str, grace: float = 3.0) -> None:
    """SIGTERM every process in namespace ``name``; SIGKILL whatever is left after ``grace``."""
    me = os.getpid()

    def alive() -> list[int]:
        return [p for p in namespace_pids(name) if p != me]

    pids = alive()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not pids:
            return
        log.info("namespace %s: sending %s to %s", name, sig.name, pids)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while True:
            time.sleep(0.02)
            pids = alive()
            if not pids or time.monotonic() >= deadline:
                break
    if pids:
        raise NetnsError(f"processes {pids} in namespace {name} survive SIGKILL")


def _delete_namespace(name: str) -> None:
    _kill_namespace_processes(name)
    _run(["ip", "netns", "delete", name], f"delete namespace {name}")
    log.info("deleted namespace %s", name)


def netns_unavailable_reason() -> str | None:
    """None if namespaces can be created and entered here, else why not (for pytest.skip)."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "nsenter"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    name = f"{NAME_PREFIX}-{os.getpid()}-probe{next(_seq)}"
    try:
        _run(["ip", "netns", "add", name], "create probe namespace")
    except NetnsError as e:
        return f"`ip netns add` does not work here: {e}"
    try:
        _run(
            ["nsenter", f"--net={NETNS_DIR}/{name}", "ip", "link", "set", "lo", "up"],
            "enter probe namespace",
        )
    except NetnsError as e:
        return f"cannot enter a network namespace with nsenter: {e}"
    finally:
        try:
            _delete_namespace(name)
        except NetnsError:
            log.exception("could not delete probe namespace %s", name)
    return None


def remove_stale_namespaces() -> list[str]:
    """Delete namespaces left by dead test processes (``dstfs-<pid>-...`` whose pid is gone).

    Useful once per session in case an earlier run was SIGKILLed before its teardown.
    Returns the names removed.
    """
    removed = []
    for name in list_namespaces():
        parts = name.split("-")
        if len(parts) < 3 or parts[0] != NAME_PREFIX or not parts[1].isdigit():
            continue
        pid = int(parts[1])
        if pid == os.getpid() or os.path.exists(f"/proc/{pid}"):
            continue
        log.warning("removing stale namespace %s (pid %d is gone)", name, pid)
        _delete_namespace(name)
        removed.append(name)
    return removed


class Topology:
    """A client namespace plus one namespace per node, each joined to the client by a veth.

    Use as a context manager (or call :meth:`close` in ``finally``).  Node ``index`` (0..254)
    gets the subnet 10.231.<index>.0/24: the client end is .1, the node end is .2.
    """

    def __init__(self, tag: str | None = None) -> None:
        base = f"{NAME_PREFIX}-{os.getpid()}-{next(_seq)}"
        if tag:
            base = f"{base}-{tag}"
        self.base = base
        self.client_ns = f"{base}-client"
        self.nodes: dict[int, str] = {}  # index -> namespace name
        self._outsider_ns: str | None = None
        self._created: list[str] = []  # every namespace we made, in creation order
        self._closed = False
        try:
            self._add_namespace(self.client_ns)
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------- context manager

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except Exception:
            # Do not hide the test's own failure behind a teardown failure.
            log.exception("teardown of %s failed while handling another exception", self.base)

    # ----------------------------------------------------------------- addresses and names

    @staticmethod
    def client_address(index: int) -> str:
        """Address of the client namespace on the link to node ``index``."""
        return f"10.231.{index}.1"

    @staticmethod
    def node_address(index: int) -> str:
        """Address of node ``index`` (reachable only from the client namespace)."""
        return f"10.231.{index}.2"

    @staticmethod
    def client_ifname(index: int) -> str:
        """Name of the client-side veth toward node ``index`` (inside the client namespace)."""
        return CLIENT_IFNAME.format(index=index)

    @staticmethod
    def node_ifname(index: int) -> str:
        """Name of the node-side veth (inside the node's namespace)."""
        return NODE_IFNAME

    def node_ns(self, index: int) -> str:
        """Namespace name of node ``index``."""
        try:
            return self.nodes[index]
        except KeyError:
            raise NetnsError(f"node {index} was not added to topology {self.base}") from None

    @property
    def namespaces(self) -> list[str]:
        """All namespaces this topology created and has not deleted yet."""
        return list(self._created)

    # ----------------------------------------------------------------- building

    def _add_namespace(self, name: str) -> None:
        _run(["ip", "netns", "add", name], f"create namespace {name}")
        self._created.append(name)
        _run(["ip", "-n", name, "link", "set", "lo", "up"], f"bring up lo in {name}")
        log.info("created namespace %s", name)

    def add_node(self, index: int) -> str:
        """Create node ``index``'s namespace and its link to the client; return its address."""
        self._check_open()
        if not 0 <= index <= 254:
            raise ValueError(f"node index must be in 0..254, got {index}")
        if index in self.nodes:
            raise NetnsError(f"node {index} already exists in topology {self.base}")
        ns = f"{self.base}-n{index}"
        self._add_namespace(ns)
        self.nodes[index] = ns
        cif, nif = self.client_ifname(index), self.node_ifname(index)
        # Both ends are born inside our namespaces: nothing ever touches the root namespace.
        c_ns, c_addr = self.client_ns, f"{self.client_address(index)}/24"
        peer = ["peer", "name", nif, "netns", ns]
        _run(
            ["ip", "-n", c_ns, "link", "add", cif, "type", "veth", *peer],
            f"create veth pair for node {index}",
        )
        _run(
            ["ip", "-n", c_ns, "addr", "add", c_addr, "dev", cif],
            f"address client end of node {index}",
        )
        _run(
            ["ip", "-n", ns, "addr", "add", f"{self.node_address(index)}/24", "dev", nif],
            f"address node end of node {index}",
        )
        _run(["ip", "-n", self.client_ns, "link", "set", cif, "up"], f"bring up {cif}")
        _run(["ip", "-n", ns, "link", "set", nif, "up"], f"bring up {nif} in {ns}")
        self._wait_operstate_up(index, deadline=time.monotonic() + 10)
        log.info(
            "node %d: %s (%s) <-> %s (%s)",
            index,
            self.node_address(index),
            ns,
            self.client_address(index),
            self.client_ns,
        )
        return self.node_address(index)

    # ----------------------------------------------------------------- running programs

    @staticmethod
    def _nsenter(ns: str, argv: Sequence[str]) -> list[str]:
        if isinstance(argv, str):
            raise TypeError("argv must be a sequence of arguments, not a string")
        return ["nsenter", f"--net={NETNS_DIR}/{ns}", "--", *argv]

    def client_cmd(self, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed to run in the client namespace (host mount namespace kept)."""
        self._check_open()
        return self._nsenter(self.client_ns, argv)

    def node_cmd(self, index: int, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed to run in node ``index``'s namespace."""
        self._check_open()
        return self._nsenter(self.node_ns(index), argv)

    def start_server(
        self, index: int, argv: Sequence[str], port: int, log: Path
    ) -> subprocess.Popen[bytes]:
        """Run ``argv``, a server that will listen on ``port``, in node ``index``'s
        namespace with its output in ``log``; return once it accepts connections
        (AssertionError with its log if it does not)."""
        with log.open("wb") as out:
            proc = subprocess.Popen(self.node_cmd(index, argv), stdout=out, stderr=out)
        try:
            self.wait_reachable(index, port, timeout=10, accept_refused=False)
        except NetnsError:
            proc.kill()
            proc.wait()
            raise AssertionError(
                f"{argv[0]} on node {index} did not start (exit {proc.returncode}): "
                f"{log.read_text()}"
            ) from None
        return proc

    def outsider_cmd(self, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed to run in an extra, unconnected namespace (only ``lo``).

        For isolation checks: a program there must not reach any node.  Use this instead of
        the root namespace, from which a probe of 10.231.x.x would leave the machine.
        """
        self._check_open()
        if self._outsider_ns is None:
            name = f"{self.base}-outsider"
            self._add_namespace(name)
            self._outsider_ns = name
        return self._nsenter(self._outsider_ns, argv)

    # ----------------------------------------------------------------- link control

    def _side(self, index: int, side: Side) -> tuple[str, str]:
        if side == "node":
            return self.node_ns(index), self.node_ifname(index)
        if side == "client":
            self.node_ns(index)  # validates index
            return self.client_ns, self.client_ifname(index)
        raise ValueError(f"side must be 'node' or 'client', got {side!r}")

    def cut(self, index: int, side: Side = "node") -> None:
        """Set one end of node ``index``'s veth down.

        ``side="node"`` (default): the node's end goes down; from the client the node simply
        goes silent (the client end loses carrier; packets are dropped, no RST, no ICMP).
        ``side="client"``: the client's end goes down; its connected route disappears, so new
        connections from the client fail at once with ENETUNREACH.
        """
        self._check_open()
        ns, ifname = self._side(index, side)
        _run(["ip", "-n", ns, "link", "set", ifname, "down"], f"cut link of node {index}")
        log.info("cut node %d (%s side: %s in %s)", index, side, ifname, ns)

    def restore(
        self,
        index: int,
        side: Side | None = None,
        *,
        timeout: float = 10.0,
        probe_port: int = DEFAULT_PROBE_PORT,
    ) -> None:
        """Bring node ``index``'s link back up and wait until TCP gets through.

        With ``side=None`` both ends are set up (safe whichever end was cut).  Returns once a
        TCP connect from the client namespace to the node reaches the node's kernel (connected
        or refused), raising NetnsError if that does not happen within ``timeout`` seconds.
        """
        self._check_open()
        deadline = time.monotonic() + timeout
        sides: tuple[Side, ...] = ("client", "node") if side is None else (side,)
        for s in sides:
            ns, ifname = self._side(index, s)
            _run(["ip", "-n", ns, "link", "set", ifname, "up"], f"restore link of node {index}")
        self._wait_operstate_up(index, deadline)
        self.wait_reachable(index, port=probe_port, timeout=max(0.0, deadline - time.monotonic()))
        log.info("restored node %d", index)

    def link_is_up(self, index: int) -> bool:
        """True if both ends of node ``index``'s veth are operationally up."""
        return all(self._operstate(index, s) == "UP" for s in ("client", "node"))

    def _operstate(self, index: int, side: Side) -> str:
        ns, ifname = self._side(index, side)
        out = _run(["ip", "-n", ns, "-o", "link", "show", "dev", ifname], f"query {ifname}")
        words = out.split()
        return words[words.index("state") + 1] if "state" in words else "UNKNOWN"

    def _wait_operstate_up(self, index: int, deadline: float) -> None:
        while not self.link_is_up(index):
            if time.monotonic() >= deadline:
                raise NetnsError(
                    f"link of node {index} not up: client end "
                    f"{self._operstate(index, 'client')}, node end {self._operstate(index, 'node')}"
                )
            time.sleep(0.02)

    def probe(
        self,
        index: int,
        port: int = DEFAULT_PROBE_PORT,
        timeout: float = 1.0,
        *,
        accept_refused: bool = True,
    ) -> bool:
        """One TCP connect attempt from the client namespace to node ``index``.

        True if the node's kernel answered: connection accepted, or (``accept_refused``, the
        default) refused with RST, which already proves the link works.  With
        ``accept_refused=False`` something must be listening on ``port``.
        """
        self._check_open()
        args = [self.node_address(index), str(port), str(timeout), "1" if accept_refused else "0"]
        argv = self.client_cmd([sys.executable, "-c", _PROBE_SCRIPT, *args])
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 10)
        if proc.returncode != 0:
            log.debug("probe of node %d:%d failed: %s", index, port, proc.stderr.strip())
        return proc.returncode == 0

    def wait_reachable(
        self,
        index: int,
        port: int = DEFAULT_PROBE_PORT,
        timeout: float = 10.0,
        *,
        accept_refused: bool = True,
    ) -> None:
        """Probe node ``index`` from the client until it answers; NetnsError after ``timeout``.

        ``accept_refused=False`` waits for a listener, e.g. a node server that is starting.
        """
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            attempt = min(1.0, max(0.1, remaining))
            if self.probe(index, port, timeout=attempt, accept_refused=accept_refused):
                return
            if time.monotonic() >= deadline:
                what = "listening" if not accept_refused else "reachable"
                raise NetnsError(
                    f"node {index} ({self.node_address(index)}:{port}) not {what} from the "
                    f"client namespace within {timeout:.1f}s"
                )
            time.sleep(0.05)

    # ----------------------------------------------------------------- teardown

    def _check_open(self) -> None:
        if self._closed:
            raise NetnsError(f"topology {self.base} is closed")

    def close(self) -> None:
        """Kill processes inside our namespaces, delete them, check nothing is left.

        Idempotent.  Tries every namespace even if one fails, then raises NetnsError listing
        the failures.
        """
        if self._closed:
            return
        self._closed = True
        errors: list[str] = []
        # Kill everywhere first, so no process holds a link open while its peer vanishes.
        for name in reversed(self._created):
            try:
                _kill_namespace_processes(name)
            except NetnsError as e:
                errors.append(str(e))
        for name in reversed(self._created):
            try:
                _delete_namespace(name)
            except NetnsError as e:
                errors.append(str(e))
        try:
            leftover = sorted(set(self._created) & set(list_namespaces()))
        except NetnsError as e:
            errors.append(str(e))
        else:
            if leftover:
                errors.append(f"namespaces still present after teardown: {leftover}")
        self._created.clear()
        self.nodes.clear()
        self._outsider_ns = None
        if errors:
            raise NetnsError(f"teardown of {self.base} failed: " + "; ".join(errors))

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"nodes={sorted(self.nodes)}"
        return f"<Topology {self.base} {state}>"


@contextlib.contextmanager
def topology(n_nodes: int = 0, tag: str | None = None) -> Iterator[Topology]:
    """Context manager building a Topology with nodes 0..n_nodes-1 already added."""
    with Topology(tag) as topo:
        for i in range(n_nodes):
            topo.add_node(i)
        yield topo
