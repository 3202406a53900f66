"""The mirror issue's acceptance (issue 13), end to end: real `dstfs serve`
and nbdkit servers, a real FUSE mount, loop devices, fio, ext4.

1. A replica's server is killed -9 under fio verify (crc32c) and restarted:
   no I/O error, the resync copies only regions fio could have dirtied, the
   backing files end byte-identical.
2. A replica behind nbdkit's error filter fails 30% of its reads: readers
   get the right data and no error; errors and repairs are counted.
3. A replica suspended under fio: fio's completion latency stays under 1 s;
   resume resyncs; replicas identical.
4. A dead replica is replaced (`migrate`) by an empty server under ext4:
   holes are not sent, e2fsck -fn is clean, replicas identical.
5. The daemon is killed -9 during mirrored writes (all in sync, and while
   degraded): a difference planted in a region written just before the kill
   is repaired by the resync of the next mount.
6. `check` finds a planted difference, `repair` fixes it, `check` then
   finds none.
Plus: a version 1 state dir mounts and is rewritten as version 2, and bad
mirror flags are refused with one line.

The issue's outages last 10 s; here 3 s, to keep CI short: long enough for
the array to notice (a broken connection is seen at once) and for writes to
land while the replica is away, which is what the checks need.

The backing files are compared only once every replica is `in_sync` and
the load has stopped: each acknowledged write is then on both (dstfs serve
writes through the page cache, which `cmp` reads too).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import random
import subprocess
import time
from collections.abc import Iterator, Sequence
from errno import ENOTCONN
from pathlib import Path

import pytest
from helpers.load import (
    BLOCK,
    RangeWriter,
    ctl,
    ctl_write,
    verify_blocks,
    wait_for,
    watchdog,
)
from helpers.mounts import abort_fuse, daemon_pid, ext4, loop, mounted
from helpers.procs import DSTFS, Server, nbdkit_proc, need

MiB = 1 << 20
REGION = MiB  # the default --region
DISK = 128 * MiB
REGIONS = DISK // REGION
OUTAGE = 3.0  # the issue says 10 s (see the module docstring)


@contextlib.contextmanager
def servers(tmp_path: Path, *names: str) -> Iterator[list[Server]]:
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(Server(tmp_path / f"{n}.img", size=DISK)) for n in names]


@contextlib.contextmanager
def mirror(
    tmp_path: Path, uris: Sequence[str], state: Path, extra: Sequence[str] = ()
) -> Iterator[Path]:
    """A mirror mounted over `uris`, its first sync done."""
    with mounted(tmp_path, uris, alg="mirror", state=state, extra=extra) as mnt:
        wait_in_sync(mnt, len(uris))
        yield mnt


def replica_states(mnt: Path, n: int) -> list[str]:
    return [ctl(mnt, f"n-{i}", "state") for i in range(n)]


def wait_in_sync(mnt: Path, n: int = 2, timeout: float = 60.0) -> None:
    def done() -> bool:
        return ctl(mnt, "degraded") == "0" and replica_states(mnt, n) == ["in_sync"] * n

    try:
        wait_for(done, "every replica in sync", timeout, step=0.05)
    except AssertionError as e:
        e.add_note(f"states {replica_states(mnt, n)}, degraded {ctl(mnt, 'degraded')}")
        raise


def mstats(mnt: Path) -> dict[str, int]:
    """The array's stats (the mirror's counters among them)."""
    return {k: int(float(v)) for k, v in (ln.split() for ln in ctl(mnt, "stats").splitlines())}


def differ(a: Path, b: Path) -> str:
    """'' when the files are byte-identical, else cmp's first difference."""
    res = subprocess.run(["cmp", str(a), str(b)], capture_output=True, text=True)
    return "" if res.returncode == 0 else (res.stdout + res.stderr).strip()


def plant(path: Path, offset: int, length: int = 4096) -> None:
    """Overwrite bytes of a backing file behind the array's back."""
    old = path.read_bytes()[offset : offset + length]
    new = bytes(b ^ 0x5A for b in old)
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, new, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def bitmap_regions(path: Path) -> set[int]:
    """The regions marked in a write-intent bitmap file (bit r of byte
    r // 8, low bit first: the format dstfs/bitmap.py documents)."""
    data = path.read_bytes()
    return {i * 8 + b for i, byte in enumerate(data) for b in range(8) if byte >> b & 1}


class Fio:
    """fio on a device (O_DIRECT, json report), running until `stop()`:
    fio ends cleanly when its trigger file appears (its verify state goes
    to `workdir`). `runtime` only caps a run whose test failed to stop it."""

    def __init__(self, dev: str, workdir: Path, *args: str, runtime: float = 90.0) -> None:
        self.trigger = workdir / "fio.stop"
        self.trigger.unlink(missing_ok=True)
        argv = [
            need("fio"),
            "--name=mirror",
            f"--filename={dev}",
            "--direct=1",
            "--ioengine=psync",
            "--time_based",
            f"--runtime={runtime:g}",
            f"--trigger-file={self.trigger}",
            "--output-format=json",
            *args,
        ]
        self.proc = subprocess.Popen(
            argv, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 60.0) -> dict:
        """Stop fio; its job report. Fails on any fio error (I/O or verify)."""
        self.trigger.touch()
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            raise AssertionError(f"fio still running {timeout}s after it was stopped") from None
        assert self.proc.returncode == 0, f"fio failed ({self.proc.returncode}): {err[-2000:]}"
        job = json.loads(out)["jobs"][0]
        assert job["error"] == 0, job["error"]
        return job

    def __enter__(self) -> Fio:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.running():
            self.trigger.touch()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# fio's write load with verification: random 4 KiB writes in the first
# FIO_SPAN bytes (so only a few regions can get dirty), each batch read back
# and checked (crc32c) while the job runs.
FIO_SPAN = 16 * MiB
FIO_VERIFY = (
    "--rw=randwrite",
    "--bs=4k",
    "--offset=0",
    f"--size={FIO_SPAN}",
    "--verify=crc32c",
    "--verify_fatal=1",
    "--verify_backlog=64",
)


def test_replica_server_killed_and_restarted_under_fio_resyncs_only_dirty_regions(
    tmp_path: Path,
) -> None:
    with (
        servers(tmp_path, "a", "b") as (s0, s1),
        mirror(tmp_path, [s0.uri, s1.uri], tmp_path / "state") as mnt,
        watchdog(mnt, 300),
        loop(mnt / "disk.img") as dev,
    ):
        before = mstats(mnt)
        with Fio(dev, tmp_path, *FIO_VERIFY) as job:
            wait_for(lambda: mstats(mnt)["writes"] > before["writes"] + 50, "fio writing")
            s1.kill()
            t_kill = time.monotonic()
            wait_for(lambda: ctl(mnt, "degraded") == "1", "n-1 out of sync", 60)
            seen, w_kill = [0], mstats(mnt)["writes"]

            def away() -> bool:  # writes landed while n-1 was away, for OUTAGE s at least
                seen.append(int(ctl(mnt, "n-1", "dirty")))
                return mstats(mnt)["writes"] > w_kill + 50 and time.monotonic() >= t_kill + OUTAGE

            wait_for(away, "fio writing while n-1 is away", 60, step=0.05)
            dirty = max(seen)
            s1.start()
            wait_in_sync(mnt)  # the resync runs under fio
            assert job.running()
            report = job.stop()
        after = mstats(mnt)
    assert report["write"]["total_ios"] > 0 and report["read"]["total_ios"] > 0
    assert after["degraded_writes"] > before["degraded_writes"]
    assert dirty > 0
    copied = after["resync_regions"] - before["resync_regions"]
    sent = after["resync_bytes"] - before["resync_bytes"]
    zeroes = after["resync_zero_bytes"] - before["resync_zero_bytes"]
    print(f"dirty {dirty} regions seen, {copied} copied ({sent} bytes, {zeroes} as zeroes)")
    # Only regions fio could have written were copied: 16 of 128.
    assert 0 < copied <= FIO_SPAN // REGION
    assert sent + zeroes <= copied * REGION
    assert differ(s0.path, s1.path) == ""


def test_reads_from_a_replica_failing_30_percent_get_right_data_and_are_repaired(
    tmp_path: Path,
) -> None:
    (tmp_path / "b.img").write_bytes(b"")
    os.truncate(tmp_path / "b.img", DISK)
    with (
        Server(tmp_path / "a.img", size=DISK) as s0,
        nbdkit_proc(
            "--filter=error",
            "file",
            str(tmp_path / "b.img"),
            "error=EIO",
            "error-pread-rate=30%",
            stderr=subprocess.DEVNULL,  # a line per injected error
        ) as (flaky, _),
        # The new mirror syncs b from a: its reads go to a, never to b.
        mirror(tmp_path, [s0.uri, flaky], tmp_path / "state") as mnt,
        watchdog(mnt, 300),
    ):
        disk = mnt / "disk.img"
        data = random.Random(2).randbytes(8 * MiB)
        fd = os.open(disk, os.O_RDWR)
        try:
            os.pwrite(fd, data, 3 * MiB)
            os.fsync(fd)
        finally:
            os.close(fd)
        want = hashlib.sha256(data).hexdigest()
        fd = os.open(disk, os.O_RDONLY | os.O_DIRECT)
        buf = mmap.mmap(-1, len(data))  # page aligned, for O_DIRECT
        try:
            for _ in range(4):
                got = hashlib.sha256()
                for off in range(0, len(data), 64 * 1024):
                    n = os.preadv(fd, [memoryview(buf)[off : off + 64 * 1024]], 3 * MiB + off)
                    assert n == 64 * 1024
                got.update(buf)
                assert got.hexdigest() == want
        finally:
            os.close(fd)
            buf.close()
        s = mstats(mnt)
        assert replica_states(mnt, 2) == ["in_sync", "in_sync"]
    print(f"read_errors {s['read_errors']}, read_repairs {s['read_repairs']}")
    assert s["read_errors"] > 0
    assert s["read_repairs"] > 0
    assert differ(s0.path, tmp_path / "b.img") == ""


def test_a_replica_suspended_under_fio_holds_no_io_and_resyncs_on_resume(
    tmp_path: Path,
) -> None:
    with (
        servers(tmp_path, "a", "b") as (s0, s1),
        mirror(tmp_path, [s0.uri, s1.uri], tmp_path / "state") as mnt,
        watchdog(mnt, 300),
        loop(mnt / "disk.img") as dev,
        Fio(dev, tmp_path, *FIO_VERIFY) as job,
    ):
        before = mstats(mnt)
        wait_for(lambda: mstats(mnt)["writes"] > before["writes"] + 50, "fio writing")
        t0 = time.monotonic()
        assert ctl_write(mnt, "n-1", "suspend", value="1") == 0
        suspended_in = time.monotonic() - t0
        t_suspended = time.monotonic()
        writes = mstats(mnt)["writes"]

        def held() -> bool:  # fio goes on while n-1 is suspended, for OUTAGE s at least
            assert ctl(mnt, "n-1", "state") == "suspended"
            return mstats(mnt)["writes"] > writes + 50 and time.monotonic() >= t_suspended + OUTAGE

        wait_for(held, "fio writing while n-1 is suspended", 60, step=0.1)
        dirty = int(ctl(mnt, "n-1", "dirty"))
        assert ctl(mnt, "degraded") == "1"
        assert ctl_write(mnt, "n-1", "suspend", value="0") == 0
        wait_in_sync(mnt)  # under fio
        assert job.running()
        report = job.stop()
        after = mstats(mnt)
    clat_max = max(report[d]["clat_ns"]["max"] for d in ("read", "write")) / 1e9
    print(f"suspend took {suspended_in:.2f} s; {dirty} dirty regions; clat max {clat_max:.3f} s")
    assert clat_max < 1.0
    assert 0 < dirty <= FIO_SPAN // REGION
    assert 0 < after["resync_regions"] - before["resync_regions"] <= FIO_SPAN // REGION
    assert differ(s0.path, s1.path) == ""


def nonzero(path: Path, unit: int) -> int:
    """Bytes of `path` in `unit`-sized pieces that are not all zero."""
    zero = bytes(unit)
    count = 0
    with path.open("rb") as f:
        while piece := f.read(unit):
            count += piece != zero[: len(piece)]
    return count * unit


@pytest.mark.parametrize("how", ["control-file", "cli"])
def test_a_dead_replica_replaced_by_an_empty_server_gets_only_data_and_ext4_stays_clean(
    tmp_path: Path, how: str
) -> None:
    for tool in ("mkfs.ext4", "e2fsck"):
        need(tool)
    files = {}
    with (
        servers(tmp_path, "a", "b", "c") as (s0, s1, s2),
        mirror(tmp_path, [s0.uri, s1.uri], tmp_path / "state") as mnt,
        watchdog(mnt, 300),
        loop(mnt / "disk.img") as dev,
    ):
        res = subprocess.run(["mkfs.ext4", "-q", "-F", dev], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        with ext4(dev, tmp_path / "data") as data:

            def write_file(name: str, size: int) -> None:
                content = random.Random(name).randbytes(size)
                with open(data / name, "wb") as f:
                    f.write(content)
                    f.flush()
                    os.fsync(f.fileno())
                files[name] = hashlib.sha256(content).hexdigest()

            for k in range(4):
                write_file(f"f{k}", 2 * MiB)
            s1.kill()  # dead for good: its replacement is c
            write_file("after-kill", MiB)
            wait_for(lambda: ctl(mnt, "degraded") == "1", "n-1 out of sync", 60)
            before = mstats(mnt)
            if how == "cli":  # returns once the new replica is in sync
                res = subprocess.run(
                    [*DSTFS, "migrate", str(mnt), "n-1", s2.uri],
                    capture_output=True,
                    text=True,
                    timeout=120,
                )
                assert res.returncode == 0, res.stderr
                assert replica_states(mnt, 2) == ["in_sync", "in_sync"]
                write_file("after-sync", MiB)
            else:
                assert ctl_write(mnt, "n-1", "migrate", value=s2.uri) == 0
                write_file("while-syncing", MiB)
                wait_in_sync(mnt)
            assert ctl(mnt, "n-1", "target") == s2.uri
            after = mstats(mnt)
            got = {n: hashlib.sha256((data / n).read_bytes()).hexdigest() for n in files}
            assert got == files
        res = subprocess.run(["e2fsck", "-fn", dev], capture_output=True, text=True)
        assert res.returncode == 0, res.stdout + res.stderr
        sent = after["resync_bytes"] - before["resync_bytes"]
        zeroes = after["resync_zero_bytes"] - before["resync_zero_bytes"]
        assert differ(s0.path, s2.path) == ""
    data_bytes = nonzero(s0.path, 4096)
    print(f"sent {sent} bytes, {zeroes} as zeroes; the source holds {data_bytes} bytes of data")
    assert zeroes > DISK // 2  # the empty part went as WRITE_ZEROES
    assert sent <= data_bytes + REGION
    assert sent + zeroes >= DISK  # every region was synced, one way or the other
    assert saved_uris(tmp_path / "state")[1] == s2.uri


def saved_uris(state: Path) -> list[str]:
    return [n["uri"] for n in json.loads((state / "array.json").read_text())["nodes"]]


def kill_daemon(mnt: Path) -> None:
    """kill -9 the daemon of `mnt`, then clear its dead mount as an admin
    would: abort the FUSE connection, unmount lazily."""
    from helpers.mounts import _registry, is_daemon_of, is_mounted

    pid = daemon_pid(mnt)
    assert pid is not None
    os.kill(pid, 9)
    wait_for(lambda: not is_daemon_of(pid, mnt), "the daemon gone", 60)
    abort_fuse(mnt)
    subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True, check=True)
    assert not is_mounted(mnt)
    _registry(mnt).unlink(missing_ok=True)  # the dead daemon left it


@pytest.mark.parametrize("degraded", [False, True], ids=["in-sync", "degraded"])
def test_a_daemon_killed_during_mirrored_writes_resyncs_what_was_written_at_remount(
    tmp_path: Path, degraded: bool
) -> None:
    state = tmp_path / "state"
    planted = 5  # a region the writer loops over, so written just before the kill
    lap = 8 * REGION // BLOCK + 1  # writes that cover the writer's 8 regions
    with servers(tmp_path, "a", "b") as (s0, s1):
        with mirror(tmp_path, [s0.uri, s1.uri], state) as mnt:
            disk = mnt / "disk.img"
            writer = RangeWriter(disk, 0, 8 * REGION, "w")
            writer.start()
            try:
                # Once round the range: every region was written just now.
                writer.wait_writes(lap)
                if degraded:
                    assert ctl_write(mnt, "n-1", "suspend", value="1") == 0
                    writer.wait_writes(lap, since=time.monotonic())  # all dirty for n-1
                    assert int(ctl(mnt, "n-1", "dirty")) == 8
                t_kill = time.monotonic()
                kill_daemon(mnt)
            finally:
                writer.stop_event.set()
                writer.join(20)
            assert not writer.is_alive()
            # Its I/O after the kill fails (ENOTCONN), its close too.
            assert writer.crashed is None or getattr(writer.crashed, "errno", 0) == ENOTCONN
            assert writer.errors(until=t_kill) == []
        marked = bitmap_regions(state / ("bitmap-n-1" if degraded else "bitmap-active"))
        assert planted in marked, marked
        plant(s1.path, planted * REGION + 8192)
        assert differ(s0.path, s1.path) != ""
        with mounted(tmp_path, state=state) as mnt:
            wait_in_sync(mnt)
            resynced = mstats(mnt)["resync_regions"]
            assert verify_blocks(mnt / "disk.img", [writer]) == []
        print(f"marked {sorted(marked)}; resynced {resynced} regions")
        assert planted in marked and 0 < resynced <= len(marked)
        assert differ(s0.path, s1.path) == ""


def test_check_counts_a_planted_difference_and_repair_fixes_it(tmp_path: Path) -> None:
    with (
        servers(tmp_path, "a", "b") as (s0, s1),
        mirror(tmp_path, [s0.uri, s1.uri], tmp_path / "state") as mnt,
        watchdog(mnt, 300),
    ):
        fd = os.open(mnt / "disk.img", os.O_WRONLY)
        try:
            os.pwrite(fd, random.Random(6).randbytes(4 * MiB), 2 * MiB)
            os.fsync(fd)
        finally:
            os.close(fd)

        def run(action: str) -> int:
            assert ctl_write(mnt, "sync_action", value=action) == 0
            wait_for(lambda: ctl(mnt, "sync_action") == "idle", f"{action} done", 60, 0.05)
            return int(ctl(mnt, "mismatch_cnt"))

        assert run("check") == 0
        plant(s1.path, 5 * MiB + 512, 512)
        assert run("check") > 0
        assert differ(s0.path, s1.path) != ""  # check changes nothing
        assert run("repair") > 0
        assert differ(s0.path, s1.path) == ""
        assert run("check") == 0
        assert replica_states(mnt, 2) == ["in_sync", "in_sync"]

        # The same through `dstfs verify`: exit 3 when a check finds a difference.
        def verify(*flags: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                [*DSTFS, "verify", *flags, str(mnt)], capture_output=True, text=True, timeout=120
            )

        plant(s1.path, 3 * MiB, 512)
        res = verify()
        assert res.returncode == 3 and "mismatched sectors" in res.stdout, res
        assert verify("--repair").returncode == 0
        res = verify()
        assert res.returncode == 0 and "check: 0 mismatched sectors" in res.stdout, res
        assert differ(s0.path, s1.path) == ""


def test_a_version_1_state_dir_mounts_and_is_rewritten_as_version_2(tmp_path: Path) -> None:
    paths = [tmp_path / "a.img", tmp_path / "b.img"]
    content = [random.Random(i).randbytes(16 * MiB) for i in range(2)]
    for p, c in zip(paths, content, strict=True):
        p.write_bytes(c)
    state = tmp_path / "state"
    state.mkdir()
    old = {  # as the release before the mirror wrote it
        "version": 1,
        "name": "old",
        "alg": "alg_linear",
        "options": {},
        "nodes": [{"uri": f"file://{p}"} for p in paths],
    }
    (state / "array.json").write_text(json.dumps(old, indent=2) + "\n")
    with mounted(tmp_path, state=state) as mnt:
        assert ctl(mnt, "alg") == "alg_linear"
        assert (mnt / "disk.img").read_bytes() == b"".join(content)
        doc = json.loads((state / "array.json").read_text())
    assert doc["version"] == 2
    assert doc["name"] == "old" and doc["alg"] == "alg_linear"
    assert [n["uri"] for n in doc["nodes"]] == [n["uri"] for n in old["nodes"]]
    assert doc["generation"] == 0  # a linear array: no replica state


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--node", "file:///dev/null"], "at least two"),
        (["--node", "file:///x", "--node", "file:///y", "--region", "100K"], "power of two"),
    ],
    ids=["one-node", "region-100K"],
)
def test_bad_mirror_flags_get_one_line_and_change_nothing(
    tmp_path: Path, flags: list[str], says: str
) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    state = tmp_path / "state"
    res = subprocess.run(
        [*DSTFS, "mount", str(mnt), "--state", str(state), "--alg", "mirror", *flags],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], res.stderr
    assert not (state / "array.json").exists()
    assert not os.path.ismount(mnt)
