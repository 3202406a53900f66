"""The `metrics` control file: the array in Prometheus text format (0.0.4).

Rules:
- Every family has HELP and TYPE; names start with `dstfs_`; every sample
  has an `array` label, per-node samples a `node` label (the node's
  directory name, `n-0`), so several arrays scrape into one series space.
- Counters end in `_total` and only grow while the daemon runs (they start
  at 0 with it). Latency is a summary (`_sum` and `_count` in seconds) plus
  the largest seen as a gauge.
- A state is a labelled gauge: one sample per known state, 1 for the
  current one, 0 for the others (so `== 1` selects it and a change shows).
- Built from the array each time it is read, like every control file.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs

from dstfs.array import Array
from dstfs.node import State

#: Every state a linear/stripe node or a mirror's replica can show.
NODE_STATES = tuple(s.value for s in State)
REPLICA_STATES = ("in_sync", "degraded", "resyncing", "suspended", "reconnecting", "failed")
SYNC_ACTIONS = ("idle", "check", "repair")

_HELP = {
    "reads": "Read requests",
    "writes": "Write requests",
    "read_bytes": "Bytes read",
    "write_bytes": "Bytes written",
    "flushes": "Flush requests",
    "errors": "Requests that failed",
    "reconnects": "Reconnections to the node",
    "failures": "Times the node was declared failed",
    "degraded_writes": "Writes that missed a replica",
    "read_errors": "Reads that failed on a replica",
    "read_repairs": "Regions rewritten after a read error",
    "resync_regions": "Regions resynced",
    "resync_bytes": "Bytes copied by resyncs",
    "resync_zero_bytes": "Bytes a resync found to be zeroes and did not copy",
}


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: dict[str, str]) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class _Writer:
    def __init__(self) -> None:
        self.families: dict[str, tuple[str, str, list[str]]] = {}

    def add(self, name: str, kind: str, help_: str, labels: dict[str, str], value: float) -> None:
        family = name  # a counter's TYPE line names it with its _total
        if kind == "summary":
            family = name.rsplit("_", 1)[0]  # x_sum, x_count
        _, _, samples = self.families.setdefault(family, (kind, help_, []))
        samples.append(f"dstfs_{name}{_labels(labels)} {_num(value)}")

    def add_one_of(
        self,
        name: str,
        help_: str,
        labels: dict[str, str],
        key: str,
        choices: tuple[str, ...],
        current: str,
    ) -> None:
        """A state as a gauge per choice (label `key`): 1 for `current`, else 0."""
        for choice in choices:
            self.add(name, "gauge", help_, {**labels, key: choice}, int(choice == current))

    def text(self) -> str:
        out = []
        for family, (kind, help_, samples) in self.families.items():
            out.append(f"# HELP dstfs_{family} {help_}.")
            out.append(f"# TYPE dstfs_{family} {kind}")
            out.extend(samples)
        return "\n".join(out) + "\n"


def render_metrics(array: Array, state_of: Callable[..., str]) -> str:
    """The array's metrics; `state_of(node)` is the node's `state` file."""
    w = _Writer()
    a = {"array": array.name}
    w.add("array_size_bytes", "gauge", "Size of the array's disk", a, array.size)
    w.add("array_nodes", "gauge", "Nodes of the array", a, len(array.nodes))
    w.add("array_jobs", "gauge", "Background jobs running", a, len(array.jobs.running))
    for key, value in attrs.asdict(array.stats).items():
        w.add(f"array_{key}_total", "counter", f"{_HELP[key]} to the array", a, value)
    rs = array.replicas
    if rs is not None:
        w.add("mirror_degraded", "gauge", "Replicas out of sync", a, rs.degraded)
        w.add_one_of(
            "mirror_sync_action",
            "The running check/repair (1) or idle",
            a,
            "action",
            SYNC_ACTIONS,
            rs.sync_action,
        )
        idle = rs.sync_action == "idle"
        w.add(
            "mirror_sync_done_sectors",
            "gauge",
            "Sectors done by the running check/repair",
            a,
            0 if idle else rs.sync_done,
        )
        w.add(
            "mirror_sync_total_sectors",
            "gauge",
            "Sectors the running check/repair covers",
            a,
            0 if idle else rs.sync_total,
        )
        w.add(
            "mirror_mismatch_sectors",
            "gauge",
            "Sectors found different by the last check/repair",
            a,
            rs.stats.mismatch_cnt,
        )
        for key, value in attrs.asdict(rs.stats).items():
            if key != "mismatch_cnt":
                w.add(f"mirror_{key}_total", "counter", _HELP[key], a, value)
    for i, node in enumerate(array.nodes):
        n = {**a, "node": array.node_dir_name(i)}
        st = node.stats
        w.add("node_start_sectors", "gauge", "First sector of the node in the array", n, node.start)
        w.add("node_size_sectors", "gauge", "Sectors of the node in use", n, node.sectors)
        for key in ("reads", "writes", "read_bytes", "write_bytes", "flushes", "errors"):
            w.add(f"node_{key}_total", "counter", f"{_HELP[key]} to the node", n, getattr(st, key))
        w.add("node_reconnects_total", "counter", _HELP["reconnects"], n, st.reconnects)
        w.add("node_failures_total", "counter", _HELP["failures"], n, st.failures)
        help_lat = "Time requests to the node took"
        w.add("node_latency_seconds_sum", "summary", help_lat, n, st.latency_ns / 1e9)
        w.add(
            "node_latency_seconds_count", "summary", help_lat, n, st.reads + st.writes + st.flushes
        )
        w.add(
            "node_latency_max_seconds",
            "gauge",
            "Longest request to the node",
            n,
            st.latency_max_ns / 1e9,
        )
        w.add(
            "node_timeout_seconds", "gauge", "How long I/O waits for a lost node", n, node.timeout
        )
        w.add("node_suspended", "gauge", "1 while the node is suspended", n, int(node.suspended))
        state, _, progress = state_of(node).partition(" ")
        states = REPLICA_STATES if rs is not None else NODE_STATES
        w.add_one_of("node_state", "The node's state (1: current)", n, "state", states, state)
        if rs is not None:
            w.add("node_dirty_regions", "gauge", "Regions the replica misses", n, rs.dirty_of(node))
            done, _, total = progress.partition("/")
            resyncing = state == "resyncing" and done.isdigit() and total.isdigit()
            w.add(
                "node_resync_done_regions",
                "gauge",
                "Regions copied by the replica's running resync",
                n,
                int(done) if resyncing else 0,
            )
            w.add(
                "node_resync_total_regions",
                "gauge",
                "Regions the replica's running resync copies",
                n,
                int(total) if resyncing else 0,
            )
    return w.text()
