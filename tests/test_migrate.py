"""Acceptance: live migration of a node under load, its failures, cancel, CLI.

Two-node linear arrays mounted with `dstfs mount`. The load is either an
ext4 filesystem on a loop device with a thread writing files of known
sha256, or O_DIRECT block writers on the loop device (tests/helpers/load.py). After
a migration the old server is stopped before anything is checked, so every
byte read back must come from the new target; remounts read through fresh
loop devices, so nothing comes from a cache.
"""

from __future__ import annotations

import contextlib
import errno
import json
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
from helpers.load import (
    FileWriter,
    RangeWriter,
    ctl,
    ctl_write,
    verify_blocks,
    verify_files,
    wait_for,
    watchdog,
    writing,
)
from helpers.mounts import ext4, is_mounted, loop, mounted
from helpers.procs import dstfs, dstfs_server, free_port, nbdkit_proc, need, stop

from dstfs.uri import parse_node

MiB = 1 << 20
COPYING = re.compile(r"copying (\d+)/(\d+) sectors")


def follow(mnt: Path, node: str = "n-0", timeout: float = 60.0) -> tuple[list[str], set[str]]:
    """Poll `node/migrate` until done or failed: the statuses and states seen."""
    seen: list[str] = []
    states: set[str] = set()
    deadline = time.monotonic() + timeout
    while True:
        status = ctl(mnt, node, "migrate")
        states.add(ctl(mnt, node, "state"))
        if not seen or seen[-1] != status:
            seen.append(status)
        if status == "done" or status.startswith("failed"):
            return seen, states
        assert time.monotonic() < deadline, f"migration still {status!r} after {timeout}s"
        time.sleep(0.02)


def wait_copying(mnt: Path, node: str = "n-0", timeout: float = 60.0) -> str:
    """Wait until the copy has made some progress but is not finished."""

    def midway() -> str | None:
        status = ctl(mnt, node, "migrate")
        m = COPYING.fullmatch(status)
        assert m or status == "idle", f"migration ended early: {status}"
        return status if m and 0 < int(m[1]) < int(m[2]) else None

    return wait_for(midway, "copying half way", timeout)


def port_of(uri: str) -> str:
    return uri.rstrip("/").rsplit(":", 1)[1]


def saved_uris(state: Path) -> list[str]:
    return [n["uri"] for n in json.loads((state / "array.json").read_text())["nodes"]]


def fsck_and_verify(mnt: Path, where: Path, files: dict[str, str]) -> None:
    """e2fsck -fn the array's filesystem, then mount it and check every file."""
    with loop(mnt / "disk.img") as dev:
        res = subprocess.run(["e2fsck", "-fn", dev], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
        with ext4(dev, where):
            assert verify_files(where, files) == []


@contextlib.contextmanager
def unmounted_at_exit(where: Path) -> Iterator[None]:
    """Whatever happens, nothing stays mounted on `where` (a writer stuck in
    the array can keep it busy until the array is torn down, after it)."""
    try:
        yield
    finally:
        if is_mounted(where.resolve()):
            res = subprocess.run(["umount", str(where)], capture_output=True, timeout=60)
            if res.returncode != 0:
                subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=60)


@pytest.mark.parametrize("kind", ["dstfs-serve", "nbdkit-memory"])
def test_live_migration_under_ext4_load(tmp_path: Path, kind: str) -> None:
    need("mkfs.ext4")
    need("e2fsck")
    state = tmp_path / "state"
    data = tmp_path / "data"
    with (
        dstfs_server(tmp_path / "a.img", "128M") as (old, old_proc),
        dstfs_server(tmp_path / "b.img", "64M") as (u1, _),
        (
            dstfs_server(tmp_path / "new.img", "128M")
            if kind == "dstfs-serve"
            else nbdkit_proc("memory", "128M")
        ) as (new, _),
        unmounted_at_exit(data),
    ):
        with mounted(tmp_path, [old, u1], state=state) as mnt, watchdog(mnt, 180):
            with loop(mnt / "disk.img") as dev:
                subprocess.run(["mkfs.ext4", "-q", dev], check=True, timeout=120)
                with ext4(dev, data):
                    writer = FileWriter(data)
                    with writing(writer):
                        wait_for(lambda: writer.count >= 5 or writer.errors, "5 files", 60)
                        start_at = writer.count
                        assert ctl_write(mnt, "n-0", "migrate", value=new) == 0
                        seen, states = follow(mnt)
                        done_at = writer.count
                        assert done_at > start_at, "no file written while copying"
                        wait_for(lambda: writer.count >= done_at + 5 or writer.errors, "5 files")
                    assert not writer.errors, writer.errors
            print(f"migrate showed {seen}; files written: {done_at - start_at} while copying")
            assert seen[-1] == "done", seen
            assert any(COPYING.fullmatch(s) for s in seen), seen
            assert all(int(m[2]) == 128 * MiB // 512 for m in map(COPYING.fullmatch, seen) if m)
            assert "migrating" in states
            # From here on the old node is gone: everything must come from the new one.
            stop(old_proc)
            assert ctl(mnt, "n-0", "type") == f"R: 127.0.0.1:{port_of(new)}"
            assert ctl(mnt, "n-0", "state") == "online"
            assert saved_uris(state)[0] == parse_node(new).to_text()
            fsck_and_verify(mnt, data, writer.files)
            res = dstfs("umount", str(mnt))
            assert res.returncode == 0, res.stderr
        with mounted(tmp_path, state=state) as mnt, watchdog(mnt, 180):
            assert ctl(mnt, "n-0", "type") == f"R: 127.0.0.1:{port_of(new)}"
            fsck_and_verify(mnt, data, writer.files)


@attrs.frozen
class BlockLoad:
    old: str  # n-0's URI
    old_proc: subprocess.Popen
    mnt: Path
    writers: list[RangeWriter]


@contextlib.contextmanager
def block_load(tmp_path: Path, state: Path | None = None) -> Iterator[BlockLoad]:
    """Two 64 MiB `dstfs serve` nodes mounted, and an O_DIRECT writer on each
    node's range through a loop device, writing (20 writes each done) while
    the body runs. After the body, every write must have succeeded and read
    back intact."""
    with (
        dstfs_server(tmp_path / "a.img", "64M") as (old, old_proc),
        dstfs_server(tmp_path / "b.img", "64M") as (u1, _),
        mounted(tmp_path, [old, u1], state=state) as mnt,
        watchdog(mnt, 180),
        loop(mnt / "disk.img") as dev,
    ):
        writers = [
            RangeWriter(Path(dev), 0, 64 * MiB, "n-0"),
            RangeWriter(Path(dev), 64 * MiB, 64 * MiB, "n-1"),
        ]
        with writing(*writers):
            for w in writers:
                w.wait_writes(20)
            yield BlockLoad(old, old_proc, mnt, writers)
        for w in writers:
            assert not w.errors(), f"{w.label}: {w.errors()[:3]}"
        assert verify_blocks(Path(dev), writers) == []


@pytest.mark.parametrize("end", ["target-killed", "cancel"])
def test_migration_that_fails_half_way_loses_nothing(tmp_path: Path, end: str) -> None:
    """The target dies (or the job is cancelled) while copying: `failed: ...`,
    the old node keeps serving, the writers see no error, nothing is lost."""
    with (
        nbdkit_proc(
            "--filter=delay", "memory", "64M", "wdelay=300ms", stderr=subprocess.DEVNULL
        ) as (new, new_proc),
        block_load(tmp_path) as load,
    ):
        mnt = load.mnt
        assert ctl_write(mnt, "n-0", "migrate", value=new) == 0
        midway = wait_copying(mnt)
        if end == "cancel":
            assert ctl_write(mnt, "n-0", "migrate", value="cancel") == 0
        else:
            new_proc.kill()
        seen, _ = follow(mnt)
        t_failed = time.monotonic()
        print(f"at {midway}: {end}; migrate shows {seen[-1]!r}")
        assert seen[-1].startswith("failed: "), seen
        if end == "cancel":
            assert "cancel" in seen[-1]
        assert ctl(mnt, "n-0", "state") == "online"
        assert ctl(mnt, "n-0", "type") == f"R: 127.0.0.1:{port_of(load.old)}"
        for w in load.writers:
            w.wait_writes(20, since=t_failed)
        # Nothing runs any more: cancel is refused.
        assert ctl_write(mnt, "n-0", "migrate", value="cancel") == errno.EINVAL


def test_hung_target_fails_the_migration_within_the_node_timeout(tmp_path: Path) -> None:
    """The target stops answering (SIGSTOP: its kernel still ACKs, so TCP sees
    nothing wrong). After the node's timeout the migration must end `failed`
    and the node's writes go on on the old target."""
    with (
        nbdkit_proc(
            "--filter=delay", "memory", "64M", "wdelay=100ms", stderr=subprocess.DEVNULL
        ) as (new, new_proc),
        block_load(tmp_path) as load,
    ):
        mnt = load.mnt
        assert ctl_write(mnt, "n-0", "timeout", value="3") == 0
        assert ctl_write(mnt, "n-0", "migrate", value=new) == 0
        wait_copying(mnt)
        new_proc.send_signal(signal.SIGSTOP)
        try:
            t_hung = time.monotonic()
            seen, _ = follow(mnt)
            # Failed by the node's timeout (3 s), not by anything else.
            assert seen[-1].startswith("failed: "), seen
            assert "no answer in 3 s" in seen[-1], seen
            load.writers[0].wait_writes(20, since=t_hung)
        finally:
            new_proc.send_signal(signal.SIGCONT)


def test_migration_to_unreachable_target_is_refused(tmp_path: Path) -> None:
    with (
        dstfs_server(tmp_path / "a.img", "16M") as (u0, _),
        dstfs_server(tmp_path / "b.img", "16M") as (u1, _),
        mounted(tmp_path, [u0, u1]) as mnt,
        watchdog(mnt, 180),
    ):
        nowhere = f"nbd://127.0.0.1:{free_port()}"
        assert ctl_write(mnt, "n-0", "migrate", value=nowhere) == errno.ECONNREFUSED
        assert ctl(mnt, "n-0", "migrate") == "idle"
        assert ctl(mnt, "n-0", "state") == "online"
        assert ctl_write(mnt, "n-0", "migrate", value="garbage://x") == errno.EINVAL
        assert ctl_write(mnt, "n-0", "migrate", value=f"{u1}\n{u0}") == errno.EINVAL
        assert ctl_write(mnt, "n-0", "migrate", value=u0) == errno.EINVAL  # its own target
        assert ctl(mnt, "n-0", "migrate") == "idle"


def test_migrate_cli_prints_progress_and_exits_0_when_done(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with (
        dstfs_server(tmp_path / "new.img", "64M") as (new, _),
        block_load(tmp_path, state=state) as load,
    ):
        res = dstfs("migrate", str(load.mnt), "n-0", new, timeout=120)
        t_done = time.monotonic()
        for w in load.writers:
            w.wait_writes(20, since=t_done)
        assert res.returncode == 0, res.stderr
        lines = res.stdout.splitlines()
        print(lines)
        assert COPYING.fullmatch(lines[0]), lines
        assert lines[-1] == "done", lines
        stop(load.old_proc)
        assert ctl(load.mnt, "n-0", "type") == f"R: 127.0.0.1:{port_of(new)}"
        assert saved_uris(state)[0] == parse_node(new).to_text()
