"""Which storage the array may take (dstfs/members.py), and opening it.

Aliasing: add_node, migrate and target naming storage another member uses
(same file by another path, a hard link, a loop device over it, the same
NBD server by another host name, a migration's target, a target being
admitted right now) are EEXIST, with a log line naming the member. Own
disk: a path at or under the mount point, through symlinks or `..`, or a
loop device backed by one, is ELOOP, and nothing under the mount point is
ever looked at. Local opens run in a worker thread, bounded. Unit level
(Array with file nodes in tmp_path, the mount point a plain directory), then
through a real mount: its own disk.img and a loop device over it are
refused by add_node, migrate, target and `--node`, and the daemon goes on.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import pytest
import trio
from helpers.mounts import MountFailed, _run, ext4, loop, mounted
from helpers.procs import need

import dstfs.backends.registry as registry
import dstfs.members as members
from dstfs.array import Array
from dstfs.backends.file import FileBackend
from dstfs.backends.registry import open_backend
from dstfs.control import ControlError, ControlTree
from dstfs.nbd.server import Export, NbdServer
from dstfs.uri import NodeSpec

KiB = 1024
NODE = 64 * KiB


def node_file(path: Path, fill: int = 0) -> Path:
    path.write_bytes(bytes([fill]) * NODE)
    return path


@attrs.define
class Rig:
    array: Array
    tree: ControlTree
    tmp: Path
    files: list[Path]

    async def write(self, text: str, *path: str) -> None:
        await self.tree.write(path, text)

    async def refused(self, text: str, *path: str) -> ControlError:
        before = (self.tree.read(("nodes",)), [n.spec for n in self.array.nodes])
        with trio.fail_after(10), pytest.raises(ControlError) as e:
            await self.write(text, *path)
        assert (self.tree.read(("nodes",)), [n.spec for n in self.array.nodes]) == before
        return e.value


async def make_rig(
    nursery: trio.Nursery, tmp_path: Path, mountpoint: str | None = None, opener=open_backend
) -> Rig:
    files = [node_file(tmp_path / f"n{i}.img", i + 1) for i in range(2)]
    array = Array("m", nursery, mountpoint=mountpoint, opener=opener)
    for f in files:
        await array.add_node(str(f))
    tree = ControlTree(array)
    return Rig(array, tree, tmp_path, files)


@pytest.fixture
async def rig(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Rig]:
    r = await make_rig(nursery, tmp_path)
    yield r
    await r.array.aclose()


async def add_refused(array: Array, text: str) -> OSError:
    before = [n.spec for n in array.nodes]
    with trio.fail_after(10), pytest.raises(OSError) as e:
        await array.add_node(text)
    assert [n.spec for n in array.nodes] == before
    return e.value


# -- aliasing (EEXIST)


@pytest.mark.parametrize("alias", ["same", "uri", "symlink", "dotdot", "hardlink", "dirlink"])
async def test_add_node_of_a_file_another_node_uses_is_eexist(
    rig: Rig, alias: str, caplog: pytest.LogCaptureFixture
) -> None:
    f = rig.files[0]
    if alias == "same":
        text = str(f)
    elif alias == "uri":
        text = f"file://{f},size=64"
    elif alias == "symlink":
        (rig.tmp / "link.img").symlink_to(f)
        text = str(rig.tmp / "link.img")
    elif alias == "dotdot":
        (rig.tmp / "sub").mkdir()
        text = f"{rig.tmp}/sub/../{f.name}"
    elif alias == "hardlink":
        os.link(f, rig.tmp / "hard.img")
        text = str(rig.tmp / "hard.img")
    else:
        (rig.tmp / "dir").symlink_to(rig.tmp)
        text = str(rig.tmp / "dir" / f.name)
    with caplog.at_level(logging.ERROR):
        e = await add_refused(rig.array, text)
    assert e.errno == errno.EEXIST, e
    assert "n-0" in e.strerror
    assert any("already used by n-0" in r.getMessage() for r in caplog.records)


async def test_add_node_of_another_file_still_works(rig: Rig) -> None:
    other = node_file(rig.tmp / "other.img")
    await rig.array.add_node(str(other))
    assert len(rig.array.nodes) == 3


def need_loop() -> None:
    need("losetup")
    if os.getuid() != 0:
        pytest.skip("loop devices need root")


async def test_a_loop_device_over_a_member_file_and_that_file_are_the_same_storage(
    rig: Rig,
) -> None:
    need_loop()
    with loop(rig.files[1]) as dev:
        e = await add_refused(rig.array, dev)
        assert e.errno == errno.EEXIST and "n-1" in e.strerror, e
        spare = node_file(rig.tmp / "spare.img")
        with loop(spare) as dev2:
            await rig.array.add_node(dev2)  # a loop over another file is fine
            e = await add_refused(rig.array, str(spare))
            assert e.errno == errno.EEXIST and "n-2" in e.strerror, e
            e = await add_refused(rig.array, dev2)
            assert e.errno == errno.EEXIST, e
            await rig.array.remove_all_nodes()


async def test_the_same_nbd_server_by_another_host_name_is_eexist(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    a, b = node_file(tmp_path / "a.img"), node_file(tmp_path / "b.img")
    server = NbdServer([Export("a", FileBackend(str(a))), Export("b", FileBackend(str(b)))])
    listeners = await nursery.start(server.serve_tcp, "127.0.0.1", 0)
    port = listeners[0].socket.getsockname()[1]
    sock = str(tmp_path / "nbd.sock")
    await nursery.start(server.serve_unix, sock)
    array = Array("m", nursery)
    await array.add_node(f"nbd://127.0.0.1:{port}/a")
    e = await add_refused(array, f"nbd://localhost:{port}/a")
    assert e.errno == errno.EEXIST and "n-0" in e.strerror, e
    await array.add_node(f"nbd://localhost:{port}/b")  # another export of that server
    await array.add_node(f"nbd+unix:///a?socket={sock}")  # unix and TCP: cannot tell
    (tmp_path / "other.sock").symlink_to(sock)
    e = await add_refused(array, f"nbd+unix:///a?socket={tmp_path}/other.sock")
    assert e.errno == errno.EEXIST and "n-2" in e.strerror, e
    await array.aclose()


async def test_migrate_to_storage_a_member_uses_is_eexist(rig: Rig) -> None:
    (rig.tmp / "n0-link").symlink_to(rig.files[0])
    (rig.tmp / "n1-link").symlink_to(rig.files[1])
    e = await rig.refused(str(rig.tmp / "n0-link"), "n-128", "migrate")
    assert e.errno == errno.EEXIST and "n-0" in e.message, e.message
    # The node's own current target counts too: copying a node onto itself.
    e = await rig.refused(str(rig.tmp / "n1-link"), "n-128", "migrate")
    assert e.errno == errno.EEXIST and "n-128" in e.message, e.message
    # The very same URI stays EINVAL, as before.
    e = await rig.refused(str(rig.files[1]), "n-128", "migrate")
    assert e.errno == errno.EINVAL, e.message
    assert rig.tree.read(("n-128", "migrate")) == "idle\n"


async def test_target_to_storage_another_member_uses_is_eexist_its_own_is_fine(
    rig: Rig,
) -> None:
    (rig.tmp / "n0-link").symlink_to(rig.files[0])
    await rig.write("1", "n-128", "suspend")
    e = await rig.refused(str(rig.tmp / "n0-link"), "n-128", "target")
    assert e.errno == errno.EEXIST and "n-0" in e.message, e.message
    # A repoint to the storage it already uses, by another name: allowed.
    (rig.tmp / "n1-link").symlink_to(rig.files[1])
    await rig.write(str(rig.tmp / "n1-link"), "n-128", "target")
    assert rig.array.nodes[1].spec.path == str(rig.tmp / "n1-link")
    await rig.write("0", "n-128", "suspend")


class HeldFile:
    """An opener whose backends for `path` are held: opening waits for
    `open_ok`, writes for `write_ok` (a migration then stays copying)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.open_ok = trio.Event()
        self.write_ok = trio.Event()
        self.opening = trio.Event()

    async def open(self, spec: NodeSpec, nursery: trio.Nursery, connections: int = 1):
        backend = await open_backend(spec, nursery, connections)
        if spec.path == self.path:
            self.opening.set()
            await self.open_ok.wait()
            inner_pwrite = backend.pwrite

            async def pwrite(offset: int, data: bytes, fua: bool = False) -> None:
                await self.write_ok.wait()
                await inner_pwrite(offset, data, fua)

            backend.pwrite = pwrite  # type: ignore[method-assign]
        return backend


async def test_a_running_migrations_target_is_a_member(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    new = node_file(tmp_path / "new.img")
    held = HeldFile(new)
    held.open_ok.set()
    rig = await make_rig(nursery, tmp_path, opener=held.open)
    await rig.write(str(new), "n-0", "migrate")
    assert rig.tree.read(("n-0", "migrate")).startswith("copying")
    with caplog.at_level(logging.ERROR):
        e = await add_refused(rig.array, str(new))
    assert e.errno == errno.EEXIST and "migration target" in e.strerror, e
    assert any("n-0's migration target" in r.getMessage() for r in caplog.records)
    e = await rig.refused(str(new), "n-128", "migrate")
    assert e.errno == errno.EEXIST, e.message
    held.write_ok.set()
    with trio.fail_after(10):
        while rig.tree.read(("n-0", "migrate")) != "done\n":
            await trio.sleep(0.01)
    assert rig.array.nodes[0].spec.path == str(new)
    e = await add_refused(rig.array, str(new))  # now n-0's current target
    assert e.errno == errno.EEXIST and "n-0" in e.strerror, e
    # The old target is free again.
    await rig.array.add_node(str(rig.files[0]))
    await rig.array.aclose()


async def test_a_target_being_admitted_is_claimed(nursery: trio.Nursery, tmp_path: Path) -> None:
    """Two requests for one new target at once: the second is EEXIST while
    the first still opens it."""
    new = node_file(tmp_path / "new.img")
    held = HeldFile(new)
    held.write_ok.set()
    rig = await make_rig(nursery, tmp_path, opener=held.open)
    nursery.start_soon(rig.write, str(new), "n-0", "migrate")
    with trio.fail_after(10):
        await held.opening.wait()
    e = await add_refused(rig.array, str(new))
    assert e.errno == errno.EEXIST and "in progress" in e.strerror, e
    e = await rig.refused(str(new), "n-128", "migrate")
    assert e.errno == errno.EEXIST and "in progress" in e.message, e.message
    held.open_ok.set()
    with trio.fail_after(10):
        while rig.tree.read(("n-0", "migrate")) != "done\n":
            await trio.sleep(0.01)
    await rig.array.aclose()


# -- the array's own disk (ELOOP)


@pytest.fixture
def lstats(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every path os.lstat is called on (members resolves paths with it)."""
    seen: list[str] = []
    real = os.lstat

    def spy(path, *a, **kw):  # type: ignore[no-untyped-def]
        seen.append(os.fspath(path))
        return real(path, *a, **kw)

    monkeypatch.setattr(members.os, "lstat", spy)
    return seen


@pytest.mark.parametrize(
    "how",
    ["disk.img", "mountpoint", "deeper", "dotdot", "dirlink", "filelink", "relative", "linkdotdot"],
)
async def test_a_path_in_the_mount_point_is_eloop_and_never_looked_at(
    nursery: trio.Nursery,
    tmp_path: Path,
    how: str,
    lstats: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    node_file(mnt / "disk.img")
    rig = await make_rig(nursery, tmp_path, mountpoint=str(mnt))
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "to-mnt").symlink_to(mnt)
    (tmp_path / "to-disk").symlink_to(mnt / "disk.img")
    (mnt / "sub").mkdir()
    (tmp_path / "to-sub").symlink_to(mnt / "sub")
    monkeypatch.chdir(tmp_path / "elsewhere")
    text = {
        "disk.img": f"{mnt}/disk.img",
        "mountpoint": str(mnt),
        "deeper": f"file://{mnt}/a/b/c.img",
        "dotdot": f"{tmp_path}/elsewhere/../mnt/disk.img",
        "dirlink": f"{tmp_path}/to-mnt/disk.img",
        "filelink": f"{tmp_path}/to-disk",
        "relative": "../mnt/disk.img",
        # `..` after a symlink goes up from where the link led, as the
        # kernel resolves it: this is mnt/disk.img, lexically tmp/disk.img.
        "linkdotdot": f"file://{tmp_path}/to-sub/../disk.img",
    }[how]
    lstats.clear()
    e = await add_refused(rig.array, text)
    assert e.errno == errno.ELOOP, e
    assert str(mnt) in e.strerror
    assert not [p for p in lstats if p == str(mnt) or p.startswith(f"{mnt}/")]
    e = await rig.refused(text, "n-0", "migrate")
    assert e.errno == errno.ELOOP, e.message
    await rig.write("1", "n-0", "suspend")
    e = await rig.refused(text, "n-0", "target")
    assert e.errno == errno.ELOOP, e.message
    assert not [p for p in lstats if p == str(mnt) or p.startswith(f"{mnt}/")]
    await rig.write("0", "n-0", "suspend")
    await rig.array.aclose()


async def test_a_loop_device_over_a_file_in_the_mount_point_is_eloop(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    need_loop()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    node_file(mnt / "disk.img")
    rig = await make_rig(nursery, tmp_path, mountpoint=str(mnt))
    with loop(mnt / "disk.img") as dev:
        e = await add_refused(rig.array, dev)
        assert e.errno == errno.ELOOP, e
        assert "backed by" in e.strerror and str(mnt) in e.strerror
        e = await rig.refused(dev, "n-0", "migrate")
        assert e.errno == errno.ELOOP, e.message
    await rig.array.aclose()


async def test_a_file_on_a_filesystem_on_a_loop_over_the_disk_is_eloop(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """ext4 on a loop device over (what stands for) disk.img, and a node
    file inside that ext4: its bytes live on the array itself."""
    need_loop()
    need("mkfs.ext4")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    (mnt / "disk.img").write_bytes(b"")
    os.truncate(mnt / "disk.img", 16 << 20)
    rig = await make_rig(nursery, tmp_path, mountpoint=str(mnt))
    data = tmp_path / "data"
    data.mkdir()
    with loop(mnt / "disk.img") as dev:
        subprocess.run(["mkfs.ext4", "-q", dev], check=True, capture_output=True)
        with ext4(dev, data):
            try:
                inner = node_file(data / "inner.img")
                e = await add_refused(rig.array, str(inner))
                assert e.errno == errno.ELOOP, e
                assert "backed by" in e.strerror, e
            finally:
                await rig.array.aclose()  # a node wrongly taken would keep ext4 busy


# -- opening a local node: in a worker thread, bounded


async def test_a_local_open_that_blocks_is_etimedout_and_its_late_file_is_closed(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    f = node_file(tmp_path / "slow.img")
    release = threading.Event()
    opened: list[FileBackend] = []

    class SlowFileBackend(FileBackend):
        def __init__(self, path: str, **kw: object) -> None:
            release.wait(30)  # an open() stuck in the kernel, in its thread
            super().__init__(path, **kw)  # type: ignore[arg-type]
            opened.append(self)

    monkeypatch.setattr(registry, "FileBackend", SlowFileBackend)
    monkeypatch.setattr(registry, "OPEN_TIMEOUT", 0.3)
    array = Array("m", nursery)
    with trio.fail_after(10):  # the event loop is not the one waiting
        e = await add_refused(array, str(f))
    assert e.errno == errno.ETIMEDOUT, e
    release.set()
    with trio.fail_after(10):
        while not opened or opened[0].fd >= 0:
            await trio.sleep(0.01)
    assert opened[0].fd == -1, "the open that came too late left its file open"


# -- through a real mount


def write_ctl(path: Path, text: str) -> tuple[int, str]:
    """echo TEXT > PATH in bash, bounded: (exit status, error text). A
    daemon waiting on itself shows as a timeout, not a hung test."""
    res = _run(["bash", "-c", 'echo "$1" > "$2"', "-", text, str(path)], timeout=30)
    assert res is not None, f"writing {text!r} to {path} hung: the daemon waits on itself"
    return res.returncode, res.stderr


def test_a_mount_refuses_its_own_disk_and_a_loop_device_over_it(tmp_path: Path) -> None:
    need_loop()
    node = node_file(tmp_path / "node.img", 7)
    with mounted(tmp_path, nodes=[str(node)]) as mnt:
        nodes = (mnt / "nodes").read_text()
        disk = mnt / "disk.img"
        with loop(disk) as dev:
            for text in (str(disk), f"file://{disk}", dev):
                rc, err = write_ctl(mnt / "add_node", text)
                assert rc != 0 and "Too many levels of symbolic links" in err, (text, err)
                rc, err = write_ctl(mnt / "n-0" / "migrate", text)
                assert rc != 0 and "Too many levels of symbolic links" in err, (text, err)
            rc, err = write_ctl(mnt / "n-0" / "suspend", "1")
            assert rc == 0, err
            rc, err = write_ctl(mnt / "n-0" / "target", dev)
            assert rc != 0 and "Too many levels of symbolic links" in err, err
            rc, err = write_ctl(mnt / "n-0" / "suspend", "0")
            assert rc == 0, err
        # A bind mount of the mount is the same mount (mountinfo says so).
        bind = tmp_path / "bind"
        bind.mkdir()
        subprocess.run(["mount", "--bind", str(mnt), str(bind)], check=True, timeout=30)
        try:
            rc, err = write_ctl(mnt / "add_node", str(bind / "disk.img"))
            assert rc != 0 and "Too many levels of symbolic links" in err, err
        finally:
            _run(["umount", "-l", str(bind)])
        # The daemon goes on: same nodes, and disk.img reads the node.
        assert (mnt / "nodes").read_text() == nodes
        with open(disk, "rb") as f:
            assert f.read(4) == bytes([7]) * 4


def test_mount_with_a_node_inside_its_own_mount_point_fails_with_one_line(
    tmp_path: Path,
) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with pytest.raises(MountFailed) as e, mounted(tmp_path, nodes=[f"{mnt}/disk.img"], mnt=mnt):
        pass
    assert "inside this array's mount point" in str(e.value), e.value
    assert e.value.result.stderr.strip().count("\n") == 0, e.value.result.stderr


async def test_two_replicas_of_a_mirror_on_one_file_are_refused(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The worst case of aliasing: a mirror whose two replicas are one file
    would acknowledge a write "twice" and hold it once."""
    a, b = node_file(tmp_path / "a.img"), node_file(tmp_path / "b.img")
    (tmp_path / "a-link").symlink_to(a)
    array = Array("m", nursery, state_dir=tmp_path / "state")
    array.set_alg("alg_mirror")
    await array.add_node(str(a))
    e = await add_refused(array, str(tmp_path / "a-link"))
    assert e.errno == errno.EEXIST and "a.img" in e.strerror, e
    await array.add_node(str(b))
    tree = ControlTree(array)
    with trio.fail_after(10), pytest.raises(ControlError) as ce:
        await tree.write(("n-1", "migrate"), str(tmp_path / "a-link"))
    assert ce.value.errno == errno.EEXIST, ce.value.message
    assert array.nodes[1].spec.path == str(b)
    await array.aclose()
