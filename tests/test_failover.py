"""Acceptance: a node server dies and comes back, under load.

A two-node linear array over `dstfs serve` nodes on fixed loopback ports;
node 0's server is killed (SIGKILL, its file kept) and restarted on the same
port. Writers use plain O_DIRECT pwrite/pread on disk.img (tests/helpers/load.py), so
every error is one request's and reaches the test as it happened.

- Back within the node's timeout (once the node shows `reconnecting`): no
  error reaches any writer, the node reconnects (stats) and is `online`
  again.
- nbdkit stopped with SIGTERM answers NBD_ESHUTDOWN: the node reconnects
  and resends, as for a killed server.
- Away for longer than its timeout: `failed`, EIO for its range only while
  the other node's range goes on; back: `online`, and its range works again.
"""

from __future__ import annotations

import contextlib
import signal
from pathlib import Path

import trio
from helpers.load import (
    RangeWriter,
    ctl,
    outage_past_timeout,
    outage_within_timeout,
    stats,
    verify_blocks,
    watchdog,
    writing,
)
from helpers.mounts import mounted
from helpers.procs import Server, free_port, need, running

from dstfs.backends.nbd import NbdBackend
from dstfs.node import Node, State
from dstfs.uri import parse_uri

MiB = 1 << 20


def test_node_server_killed_and_restarted(tmp_path: Path) -> None:
    with (
        Server(tmp_path / "a.img", free_port()) as s0,
        Server(tmp_path / "b.img", free_port()) as s1,
        mounted(tmp_path, [s0.uri, s1.uri]) as mnt,
        watchdog(mnt, 300),
    ):
        disk = mnt / "disk.img"
        w0 = RangeWriter(disk, 0, 64 * MiB, "n-0")
        w1 = RangeWriter(disk, 64 * MiB, 64 * MiB, "n-1")
        with writing(w0, w1):
            assert ctl(mnt, "n-0", "timeout") == "30"
            states = outage_within_timeout(mnt, "n-0", [w0, w1], s0.kill, s0.start)
            print(f"n-0 showed {sorted(states)} while its server was down")
            assert "reconnecting" in states
            assert stats(mnt, "n-0")["reconnects"] >= 1
            assert ctl(mnt, "n-0", "state") == "online"

            outage_past_timeout(mnt, "n-0", w0, [w1], s0.kill, s0.start, timeout=3)
            assert ctl(mnt, "n-0", "state") == "online"
            assert stats(mnt, "n-0")["reconnects"] >= 2
        assert verify_blocks(disk, [w0, w1]) == []


async def test_node_reconnects_after_nbdkit_sigterm(tmp_path: Path) -> None:
    """nbdkit answers the writes in flight with NBD_ESHUTDOWN on SIGTERM: the
    node treats it as a lost connection, reconnects to the server started
    again on its port and resends, so no write fails."""
    exe = need("nbdkit")
    image = tmp_path / "node.img"
    image.write_bytes(bytes(4 * MiB))
    port = free_port()
    argv = [exe, "-f", "--exit-with-parent", "-i", "127.0.0.1", "-p", str(port), "file", str(image)]
    n = 8
    with running([*argv, "--filter=delay", "wdelay=10"], port) as first:
        async with trio.open_nursery() as nursery:
            spec = parse_uri(f"nbd://127.0.0.1:{port}")
            backend = await NbdBackend.open(spec, nursery)
            node = Node(spec, backend, backend.size, nursery)
            client = backend._clients[0]
            errors: list[BaseException] = []

            async def write(i: int) -> None:
                try:
                    await node.write(i * 4096, bytes([i + 1]) * 4096)
                except BaseException as e:
                    errors.append(e)

            with trio.fail_after(60), contextlib.ExitStack() as later:
                async with trio.open_nursery() as writers:
                    for i in range(n):
                        writers.start_soon(write, i)
                    while client.in_flight < n:
                        await trio.sleep(0.005)
                    first.send_signal(signal.SIGTERM)
                    # Bounded: without a disconnect from the client nbdkit never exits.
                    code = await trio.to_thread.run_sync(first.wait, abandon_on_cancel=True)
                    assert code == 0
                    assert node.state == State.RECONNECTING
                    later.enter_context(running(argv, port))
                assert errors == []
                assert node.state == State.ONLINE and node.stats.reconnects >= 1
                for i in range(n):
                    assert bytes(await node.read(i * 4096, 4096)) == bytes([i + 1]) * 4096
                await backend.aclose()
