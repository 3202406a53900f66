"""The mirror attacked from outside, with servers nobody here wrote: faults
a replica's server injects (nbdkit's error filter) while its connection
stays up. Each test is a bug found that way, and fails on the code before
its fix.

- A replica that fails writes (EIO, its link up) leaves the in-sync set;
  the writer sees no error; once the errors stop it resyncs on its own
  (before: it stayed `degraded` until its connection broke, for ever).
- A replica replaced (`migrate`) while its resync runs gets a full sync to
  its new target (before: the regions the resync had already copied to the
  old target were taken as done on the new one, which was then `in_sync`
  with zeroes where the data was: stale reads).
- The daemon killed -9 while a replica resyncs and writes go to it too: the
  next mount resyncs the regions written just before the kill on that
  replica as well (before: only on the in-sync ones, so a region the resync
  had already done and a write in flight then changed could differ on the
  replica for good, which then went `in_sync`).
- A replica whose server takes connections but answers no request (a hung
  disk: nbdkit's pause filter) holds writes for its timeout once, not on
  every write (before: it was back at each reconnect, at once, and each
  write waited its timeout again).
- A write that fails on the only in-sync replica gets EIO, but a replica
  being resynced may have taken it: that region is resynced there too
  (before: nothing was marked, and the replicas differed for good once the
  resync ended; found with nbdkit's error filter on three replicas). The
  writer's EIO is logged (nothing in the log said which I/O failed).
- A read that failed on one replica and was served by the other returns its
  data even when the rewrite of the bad range then fails to read the whole
  region from the good one (before: the reader got EIO).
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import random
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.load import BLOCK, RangeWriter, ctl, ctl_write, wait_for, watchdog
from helpers.mounts import mounted
from helpers.procs import Server, nbdkit_proc
from test_mirror_e2e import (
    DISK,
    MiB,
    bitmap_regions,
    differ,
    kill_daemon,
    mirror,
    mstats,
    plant,
    wait_in_sync,
)


def flaky_file(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.write_bytes(b"")
    os.truncate(path, DISK)
    return path


def test_a_replica_failing_writes_with_its_link_up_is_resynced_once_they_stop(
    tmp_path: Path,
) -> None:
    b = flaky_file(tmp_path, "b.img")
    errors_on = tmp_path / "errors-on"  # the error filter injects while it exists
    with (
        Server(tmp_path / "a.img", size=DISK) as s0,
        nbdkit_proc(
            "--filter=error",
            "file",
            str(b),
            "error=EIO",
            "error-pwrite-rate=20%",
            f"error-file={errors_on}",
            stderr=subprocess.DEVNULL,  # a line per injected error
        ) as (flaky, _),
        mirror(tmp_path, [s0.uri, flaky], tmp_path / "state") as mnt,
        watchdog(mnt, 120),
    ):
        errors_on.touch()
        rng = random.Random(1)
        fd = os.open(mnt / "disk.img", os.O_RDWR)
        try:
            for i in range(64):  # ~13 fail on n-1; the writer must see none
                os.pwrite(fd, rng.randbytes(64 * 1024), i * 64 * 1024 + (i % 4) * MiB)
            os.fsync(fd)
        finally:
            os.close(fd)
        # (Whether n-1 is out of sync right now is a race with its resync.)
        assert mstats(mnt)["degraded_writes"] > 0
        errors_on.unlink()
        wait_in_sync(mnt, 2, timeout=30)  # with no reconnect to start it
        assert int(ctl(mnt, "n-1", "dirty")) == 0
        assert differ(s0.path, b) == ""


class Pause:
    """nbdkit's pause filter's control socket: `pause()` returns once the
    requests already received are done; later ones wait for `resume()`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock: socket.socket | None = None

    def _say(self, cmd: bytes) -> None:
        if self.sock is None:
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.settimeout(30)
            self.sock.connect(str(self.path))
        self.sock.sendall(cmd)
        assert self.sock.recv(1) == cmd.upper()

    def pause(self) -> None:
        self._say(b"p")

    def resume(self) -> None:
        self._say(b"r")

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.resume()
            self.sock.close()


@contextlib.contextmanager
def pausable(tmp_path: Path, path: Path) -> Iterator[tuple[str, Pause]]:
    """nbdkit serving `path` behind its pause filter (and reads slowed by
    50 ms, so that a test can pause it in the middle of a resync)."""
    ctl_sock = tmp_path / "pause.sock"
    with nbdkit_proc(
        "--filter=pause",
        "--filter=delay",
        "file",
        str(path),
        f"pause-control={ctl_sock}",
        "delay-read=50ms",
    ) as (uri, _):
        wait_for(ctl_sock.exists, "the pause control socket")
        pause = Pause(ctl_sock)
        try:
            yield uri, pause
        finally:
            pause.close()


def resynced(mnt: Path, node: str) -> int:
    """Regions the running resync of `node` has copied (0 if none runs)."""
    state = ctl(mnt, node, "state")
    return int(state.split()[1].split("/")[0]) if state.startswith("resyncing") else 0


def test_a_replica_replaced_while_it_resyncs_gets_every_region_on_its_new_target(
    tmp_path: Path,
) -> None:
    disk = 32 * MiB  # 32 regions, all data: a region not copied cannot pass for one
    a = tmp_path / "a.img"
    a.write_bytes(random.Random(3).randbytes(disk))
    with (
        pausable(tmp_path, a) as (source, pause),
        Server(tmp_path / "b.img", size=disk) as s1,
        Server(tmp_path / "c.img", size=disk) as s2,
        # A new mirror: n-1 gets a full sync from n-0.
        mounted(tmp_path, [source, s1.uri], alg="mirror", state=tmp_path / "state") as mnt,
        watchdog(mnt, 120),
    ):
        wait_for(lambda: resynced(mnt, "n-1") >= 4, "n-1 resyncing", 30, step=0.005)
        # The resync's next reads now wait on the source: regions copied to
        # n-1's old target, nothing in flight there.
        pause.pause()
        assert 4 <= resynced(mnt, "n-1") < 32
        assert ctl_write(mnt, "n-1", "migrate", value=s2.uri) == 0
        pause.resume()
        wait_in_sync(mnt, 2, timeout=60)
        assert ctl(mnt, "n-1", "target") == s2.uri
        assert differ(a, s2.path) == ""


def test_a_daemon_killed_while_a_replica_resyncs_under_writes_resyncs_them_there_too(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    b = flaky_file(tmp_path, "b.img")
    with (
        Server(tmp_path / "a.img", size=DISK) as s0,
        pausable(tmp_path, b) as (replica, pause),
    ):
        with mirror(tmp_path, [s0.uri, replica], state) as mnt:
            # n-1 misses region 100 only...
            assert ctl_write(mnt, "n-1", "suspend", value="1") == 0
            fd = os.open(mnt / "disk.img", os.O_WRONLY)
            try:
                os.pwrite(fd, b"x" * 4096, 100 * MiB)
            finally:
                os.close(fd)
            assert int(ctl(mnt, "n-1", "dirty")) == 1
            # ...and its resync of it waits at its server, as does a write
            # to region 0 sent to both replicas: the daemon dies then.
            pause.pause()
            assert ctl_write(mnt, "n-1", "suspend", value="0") == 0
            wait_for(lambda: ctl(mnt, "n-1", "state").startswith("resyncing"), "n-1 resyncing")
            writer = RangeWriter(mnt / "disk.img", 0, BLOCK, "w", readback=False)
            writer.start()
            try:
                wait_for(lambda: 0 in bitmap_regions(state / "bitmap-active"), "region 0 active")
                kill_daemon(mnt)
            finally:
                writer.stop_event.set()
                writer.join(20)
        assert bitmap_regions(state / "bitmap-n-1") == {100}
        # What the write in flight may have left: region 0 differs on n-1.
        plant(b, MiB // 2)
        pause.resume()
        with mounted(tmp_path, state=state) as mnt:
            wait_in_sync(mnt, 2, timeout=60)
        assert differ(s0.path, b) == ""


def test_a_replica_that_connects_but_never_answers_holds_writes_once_not_each(
    tmp_path: Path,
) -> None:
    timeout = 2.0
    b = flaky_file(tmp_path, "b.img")
    with (
        Server(tmp_path / "a.img", size=DISK) as s0,
        pausable(tmp_path, b) as (replica, pause),
        mirror(tmp_path, [s0.uri, replica], tmp_path / "state") as mnt,
        watchdog(mnt, 120),
    ):
        assert ctl_write(mnt, "n-1", "timeout", value=f"{timeout:g}") == 0
        pause.pause()  # its connections stay up; requests wait there
        fd = os.open(mnt / "disk.img", os.O_WRONLY)
        try:
            took = []
            for i in range(6):
                t0 = time.monotonic()
                os.pwrite(fd, b"w" * 4096, i * MiB)
                took.append(time.monotonic() - t0)
        finally:
            os.close(fd)
        print(f"writes took {[round(t, 2) for t in took]} s")
        assert took[0] >= timeout  # the one that found it hung
        assert max(took[1:]) < timeout, took
        assert ctl(mnt, "degraded") == "1"
        assert int(ctl(mnt, "n-1", "dirty")) >= 5


def test_a_write_failing_on_the_in_sync_replica_is_undone_on_a_resyncing_one(
    tmp_path: Path,
) -> None:
    a = flaky_file(tmp_path, "a.img")
    errors_on = tmp_path / "errors-on"
    with (
        nbdkit_proc(
            "--filter=error",
            "file",
            str(a),
            "error=EIO",
            "error-pread-rate=100%",
            "error-pwrite-rate=100%",
            f"error-file={errors_on}",
            stderr=subprocess.DEVNULL,
        ) as (flaky, _),
        Server(tmp_path / "b.img", size=DISK) as s1,
        mirror(tmp_path, [flaky, s1.uri], tmp_path / "state") as mnt,
        watchdog(mnt, 120),
    ):
        fd = os.open(mnt / "disk.img", os.O_WRONLY)
        try:
            assert ctl_write(mnt, "n-1", "suspend", value="1") == 0
            os.pwrite(fd, b"m" * 4096, 50 * MiB)  # n-1 misses region 50
            # n-0 now fails: n-1's resync cannot read region 50, and n-1
            # stays reachable, out of sync, taking writes.
            errors_on.touch()
            assert ctl_write(mnt, "n-1", "suspend", value="0") == 0
            wait_for(lambda: ctl(mnt, "n-1", "state") != "suspended", "n-1 resumed")
            with pytest.raises(OSError) as e:
                os.pwrite(fd, b"n" * 4096, 0)  # fails on n-0, lands on n-1
            assert e.value.errno == errno.EIO
        finally:
            os.close(fd)
        # The EIO the writer got is in the log (it was nowhere).
        log = tmp_path / "state" / "daemon.log"
        wait_for(lambda: "disk.img write 0+4096: " in log.read_text(), "the EIO logged")
        errors_on.unlink()
        wait_in_sync(mnt, 2, timeout=60)
        assert differ(a, s1.path) == ""


def test_a_read_served_by_the_good_replica_succeeds_when_its_repair_cannot_read(
    tmp_path: Path,
) -> None:
    size = 8 * MiB
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    for f in (a, b):
        f.write_bytes(b"")
        os.truncate(f, size)
    errors_on = tmp_path / "errors-on"
    # n-1: nbdkit's eval plugin over b.img, failing reads above 64 KiB (the
    # repair's whole-region reads) while errors_on exists; n-0 fails every read then.
    big_read_fails = (
        f"if [ $3 -gt 65536 ] && [ -e {errors_on} ]; then echo 'EIO big read' >&2; exit 1; fi; "
        f"dd if={b} skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none"
    )
    with (
        nbdkit_proc(
            "--filter=error",
            "file",
            str(a),
            "error=EIO",
            "error-pread-rate=100%",
            f"error-file={errors_on}",
            stderr=subprocess.DEVNULL,
        ) as (flaky, _),
        nbdkit_proc(
            "eval",
            f"get_size=stat -c %s {b}",
            f"pread={big_read_fails}",
            f"pwrite=dd of={b} seek=$4 conv=notrunc oflag=seek_bytes status=none",
            f"flush=sync {b}",
            stderr=subprocess.DEVNULL,
        ) as (picky, _),
        mirror(tmp_path, [flaky, picky], tmp_path / "state") as mnt,
        watchdog(mnt, 120),
    ):
        fd = os.open(mnt / "disk.img", os.O_RDONLY | os.O_DIRECT)
        buf = mmap.mmap(-1, 4096)
        errors_on.touch()
        try:
            for i in range(4):  # reads alternate: n-0's fail and go to n-1
                assert os.preadv(fd, [buf], i * 4096) == 4096
        finally:
            os.close(fd)
            buf.close()
        assert mstats(mnt)["read_errors"] > 0
