"""The mirror attacked from outside, with servers nobody here wrote: faults
a replica's server injects (nbdkit's error filter) while its connection
stays up. Each test is a bug found that way, and fails on the code before
its fix.

- A replica that fails writes (EIO, its link up) leaves the in-sync set;
  the writer sees no error; once the errors stop it resyncs on its own
  (before: it stayed `degraded` until its connection broke, for ever).
"""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

from helpers.load import ctl, watchdog
from helpers.procs import Server, nbdkit_proc
from test_mirror_e2e import DISK, MiB, differ, mirror, mstats, wait_in_sync


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
