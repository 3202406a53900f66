"""A daemon killed with -9 under its mount (issue 12, hole 6): the kernel
keeps the mount, and every access gets ENOTCONN. `dstfs status` says the
daemon is dead (one line, no traceback), `dstfs mount` on it says how to
recover, `dstfs umount` clears it away (mount, registry entry), and the
array mounts again from its state dir with its data. The README's recovery
procedure is run as written with ext4 on a loop device on top."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from helpers.mounts import _registry, daemon_pid, is_mounted, loop, loops_over, mounted, mountinfo
from helpers.procs import dstfs, need, run

MiB = 1 << 20


def one_line(res: subprocess.CompletedProcess) -> str:
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    assert res.stderr.endswith("\n") and res.stderr.count("\n") == 1, res.stderr
    return res.stderr


def kill_daemon(mnt: Path) -> int:
    """kill -9 the daemon of `mnt`; returns once it is gone (mounted()
    reaps it: it is our child)."""
    pid = daemon_pid(mnt)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists():
        assert time.monotonic() < deadline, f"daemon {pid} still there"
        time.sleep(0.02)
    return pid


def pattern(size: int) -> bytes:
    return b"".join(i.to_bytes(8, "little") * 64 for i in range(size // 512))


def test_status_umount_and_mount_recognise_a_dead_daemon(tmp_path: Path) -> None:
    node = tmp_path / "a.img"
    node.write_bytes(bytes(4 * MiB))
    state = tmp_path / "state"
    data = pattern(4 * MiB)
    with mounted(tmp_path, nodes=[f"file://{node}"], state=state) as mnt:
        fd = os.open(mnt / "disk.img", os.O_WRONLY)
        try:
            os.pwrite(fd, data, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        pid = kill_daemon(mnt)
        assert is_mounted(mnt)  # the kernel keeps the dead mount

        line = one_line(dstfs("status", str(mnt)))
        assert "dead" in line and f"pid {pid}" in line and f"dstfs umount {mnt}" in line, line

        line = one_line(dstfs("mount", str(mnt), "--state", str(state)))
        assert "died" in line and f"dstfs umount {mnt}" in line, line
        assert [fs for _, mp, fs, _ in mountinfo() if mp == str(mnt)] == ["fuse.dstfs"]

        res = dstfs("umount", str(mnt))
        assert res.returncode == 0, res.stderr
        assert not is_mounted(mnt)
        assert not _registry(mnt).exists()
        assert "not mounted" in one_line(dstfs("umount", str(mnt)))

        # The state dir's lock went with the daemon: the array comes back.
        with mounted(tmp_path, state=state, mnt=mnt):
            assert (mnt / "disk.img").read_bytes() == data
            res = dstfs("status", str(mnt))
            assert res.returncode == 0 and "online" in res.stdout, res.stderr


def test_umount_of_a_dead_mount_names_the_loop_devices_still_over_it(tmp_path: Path) -> None:
    node = tmp_path / "a.img"
    node.write_bytes(bytes(4 * MiB))
    with mounted(tmp_path, nodes=[f"file://{node}"]) as mnt, loop(mnt / "disk.img") as dev:
        kill_daemon(mnt)
        res = dstfs("umount", str(mnt))
        assert res.returncode == 0, res.stderr
        assert not is_mounted(mnt)
        assert dev in res.stderr and "losetup -d" in res.stderr, res.stderr
        assert "Traceback" not in res.stderr


def test_the_readme_recovery_procedure_brings_back_ext4(tmp_path: Path) -> None:
    """README "Recovery after the daemon died", step by step."""
    need("mkfs.ext4")
    node = tmp_path / "a.img"
    node.write_bytes(bytes(64 * MiB))
    state = tmp_path / "state"
    data = tmp_path / "data"
    data.mkdir()
    payload = os.urandom(3 * MiB)

    with mounted(tmp_path, nodes=[f"file://{node}"], state=state) as mnt:
        disk = mnt / "disk.img"
        loop = run("losetup", "-f", "--show", "--direct-io=on", str(disk)).stdout.strip()
        try:
            assert run("mkfs.ext4", "-q", loop).returncode == 0
            assert run("mount", loop, str(data)).returncode == 0
            (data / "kept").write_bytes(payload)
            assert run("sync", "-f", str(data / "kept")).returncode == 0
            kill_daemon(mnt)

            # 1. umount the filesystem on the loop device (its writes fail now)
            run("umount", str(data))
            assert not is_mounted(data)
            # 2. detach the loop device
            assert run("losetup", "-d", loop).returncode == 0
            # 3. dstfs umount MNT, 4. dstfs mount MNT ... again
            assert dstfs("umount", str(mnt)).returncode == 0
            assert not is_mounted(mnt)
        finally:
            # Only if a step above failed: mounted() clears the rest.
            if is_mounted(data):
                run("umount", "-l", str(data))
        with mounted(tmp_path, state=state, mnt=mnt):
            loop = run("losetup", "-f", "--show", "--direct-io=on", str(disk)).stdout.strip()
            assert loops_over(disk) == [loop]
            # 5. e2fsck -fy replays the journal, then ext4 mounts again
            fsck = run("e2fsck", "-fy", loop)
            assert fsck.returncode in (0, 1), fsck.stdout + fsck.stderr
            assert run("mount", loop, str(data)).returncode == 0
            try:
                assert (data / "kept").read_bytes() == payload
            finally:
                run("umount", str(data))
                run("losetup", "-d", loop)
