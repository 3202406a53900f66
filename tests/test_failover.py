"""Acceptance: a node server dies and comes back, under load.

A two-node linear array over `dstfs serve` nodes on fixed loopback ports;
node 0's server is killed (SIGKILL, its file kept) and restarted on the same
port. Writers use plain O_DIRECT pwrite/pread on disk.img (tests/load.py), so
every error is one request's and reaches the test as it happened.

- Back within the node's timeout: no error reaches any writer, the node
  reconnects (stats) and is `online` again.
- Away for longer than its timeout: `failed`, EIO for its range only while
  the other node's range goes on; back: `online`, and its range works again.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from load import (
    RangeWriter,
    ctl,
    outage_past_timeout,
    outage_within_timeout,
    stats,
    verify_blocks,
    watchdog,
    writing,
)
from mounts import mounted
from procs import DSTFS, free_port, stop, wait_port

MiB = 1 << 20


class Server:
    """`dstfs serve PATH` on a fixed port, to kill and start again."""

    def __init__(self, path: Path, port: int, size: str = "64M") -> None:
        self.argv = [*DSTFS, "serve", str(path), "--size", size, "--listen", f"127.0.0.1:{port}"]
        self.port = port
        self.uri = f"nbd://127.0.0.1:{port}"
        self.log = path.with_suffix(".log")
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=log)
        wait_port(self.port, self.proc)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop(self.proc)


def test_node_server_killed_and_restarted(tmp_path: Path) -> None:
    with (
        Server(tmp_path / "a.img", free_port()) as s0,
        Server(tmp_path / "b.img", free_port()) as s1,
        mounted(tmp_path, [s0.uri, s1.uri]) as mnt,
        watchdog(mnt, 120),
    ):
        disk = mnt / "disk.img"
        w0 = RangeWriter(disk, 0, 64 * MiB, "n-0")
        w1 = RangeWriter(disk, 64 * MiB, 64 * MiB, "n-1")
        with writing(w0, w1):
            assert ctl(mnt, "n-0", "timeout") == "30"
            states = outage_within_timeout(mnt, "n-0", [w0, w1], s0.kill, s0.start, outage=2.0)
            print(f"n-0 showed {sorted(states)} while its server was down")
            assert "reconnecting" in states
            assert stats(mnt, "n-0")["reconnects"] >= 1
            assert ctl(mnt, "n-0", "state") == "online"

            outage_past_timeout(mnt, "n-0", w0, [w1], s0.kill, s0.start, timeout=3)
            assert ctl(mnt, "n-0", "state") == "online"
            assert stats(mnt, "n-0")["reconnects"] >= 2
        assert verify_blocks(disk, [w0, w1]) == []
