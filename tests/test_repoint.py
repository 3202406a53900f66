"""Issue 12, hole 1: a node repointed while it is reconnecting.

The node's server dies, the node is `reconnecting`; the admin suspends it,
writes a new `target` and resumes. The node must serve from the new target
at once, its reconnect job must stop trying the old address, and when the
old server comes back no connection to it may be (re)opened. Real NBD
servers in this process (dstfs's own, over loopback TCP), real client.
"""

from __future__ import annotations

from pathlib import Path

import trio

from dstfs.array import Array
from dstfs.backends.file import FileBackend
from dstfs.control import ControlTree
from dstfs.nbd.server import Export, NbdServer

MiB = 1 << 20


class Server:
    """An in-process `dstfs serve` of one file that can stop and restart on
    the same port."""

    def __init__(self, path: Path) -> None:
        FileBackend.create(str(path), 4 * MiB).close()
        self.path = path
        self.server = NbdServer([Export("", FileBackend(str(path)))])
        self.port = 0
        self.scope: trio.CancelScope | None = None

    async def start(self, nursery: trio.Nursery) -> None:
        async def run(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
            with trio.CancelScope() as self.scope:
                async with trio.open_nursery() as inner:
                    listeners = await inner.start(self.server.serve_tcp, "127.0.0.1", self.port)
                    task_status.started(listeners[0].socket.getsockname()[1])

        self.port = await nursery.start(run)

    def stop(self) -> None:
        assert self.scope is not None
        self.scope.cancel()

    @property
    def uri(self) -> str:
        return f"nbd://127.0.0.1:{self.port}"


async def wait_for(cond, what: str, timeout: float = 30) -> None:  # type: ignore[no-untyped-def]
    with trio.fail_after(timeout):
        while not cond():
            await trio.sleep(0.02)


async def test_repoint_while_reconnecting_follows_the_new_target(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    old = Server(tmp_path / "old.img")
    new = Server(tmp_path / "new.img")
    await old.start(nursery)
    await new.start(nursery)
    array = Array("t", nursery)
    node = await array.add_node(old.uri)
    tree = ControlTree(array)
    await array.write(0, b"before")

    old.stop()  # the server dies: its connections are reset
    with trio.move_on_after(0.5):
        await array.write(0, b"during")  # meets the lost connection
    await wait_for(lambda: node.state.value == "reconnecting", "reconnecting")

    await tree.write(("n-0", "suspend"), "1\n")
    await tree.write(("n-0", "target"), new.uri + "\n")
    await tree.write(("n-0", "suspend"), "0\n")
    assert tree.read(("n-0", "target")) == new.uri + "\n"
    with trio.fail_after(10):
        await array.write(4096, b"after")  # served by the new target now
    assert tree.read(("n-0", "state")) == "online\n"
    assert (tmp_path / "new.img").read_bytes()[4096:4101] == b"after"

    # The reconnect job ended with the repoint (it kept calling the old
    # target's reconnect until that server came back, and then stayed
    # connected to it); the old server returns and nothing connects to it.
    await wait_for(lambda: not node._reconnecting, "reconnect job over")
    connections = old.server.stats.connections
    await old.start(nursery)
    with trio.fail_after(10):
        await array.write(8192, b"more")
    assert old.server.stats.connections == connections
    assert old.server.stats.active == 0
    assert node.state.value == "online"
    await array.aclose()


async def test_migrating_a_mostly_empty_node_sends_only_its_data(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Issue 14: holes and zeroes go as WRITE_ZEROES; the target (a sparse
    file behind dstfs's NBD server, which punches holes for them) ends up
    with only the source's data allocated."""
    size = 64 * MiB
    src = tmp_path / "src.img"
    FileBackend.create(str(src), size).close()
    with src.open("r+b") as f:
        for off in (0, 20 * MiB, 63 * MiB):
            f.seek(off)
            f.write(b"\xab" * (256 << 10))
    target = Server(tmp_path / "dst.img")
    target.server = NbdServer([Export("", FileBackend.create(str(tmp_path / "big.img"), size))])
    await target.start(nursery)
    array = Array("t", nursery)
    await array.add_node(f"file://{src}")
    tree = ControlTree(array)
    await tree.write(("n-0", "migrate"), target.uri + "\n")
    await wait_for(lambda: tree.read(("n-0", "migrate")) != "copying 0/131072 sectors\n", "start")
    await wait_for(
        lambda: (
            tree.read(("n-0", "migrate")) in ("done\n",)
            or "failed" in tree.read(("n-0", "migrate"))
        ),
        "migration over",
    )
    assert tree.read(("n-0", "migrate")) == "done\n"
    assert (tmp_path / "big.img").read_bytes() == src.read_bytes()
    allocated = (tmp_path / "big.img").stat().st_blocks * 512
    data = 3 * (256 << 10)
    assert allocated <= data + (2 << 20), allocated  # + one 2 MiB chunk at most
    await array.aclose()
