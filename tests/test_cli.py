"""The `dstfs` command line around arrays: every failure is one clear line on
stderr (no traceback), a non-zero exit, and leaves nothing mounted;
`status` names every node and its state; `umount` refuses while a loop
device holds disk.img and leaves the array mounted."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers.load import wait_for
from helpers.mounts import (
    _subreaper,
    daemon_pid,
    is_mounted,
    loop,
    mount_cmd,
    mounted,
    mountinfo,
    new_dir,
    teardown,
)
from helpers.procs import DSTFS, dstfs, free_port

MiB = 1 << 20


def one_line(res: subprocess.CompletedProcess) -> str:
    """The single stderr line of a failed command."""
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    assert res.stderr.endswith("\n") and res.stderr.count("\n") == 1, res.stderr
    return res.stderr


def node_file(tmp_path: Path, name: str = "a.img") -> Path:
    path = tmp_path / name
    path.write_bytes(bytes(4 * MiB))
    return path


def failed_mount(tmp_path: Path, *args: str) -> tuple[str, Path]:
    """Run a `dstfs mount` expected to fail; its stderr line and the mount dir."""
    mnt = new_dir(tmp_path, "mnt")
    try:
        res = dstfs("mount", str(mnt), "--state", str(tmp_path / f"state-{mnt.name}"), *args)
        line = one_line(res)
        assert not is_mounted(mnt)
        return line, mnt
    finally:
        teardown(mnt, daemon_pid(mnt))


def test_help_lists_the_commands() -> None:
    res = dstfs("--help")
    assert res.returncode == 0
    for cmd in ("serve", "mount", "umount", "status"):
        assert cmd in res.stdout
    res = dstfs("mount", "--help")
    assert res.returncode == 0 and "--node" in res.stdout and "--state" in res.stdout


def test_mount_with_an_unreachable_node_is_one_line_and_mounts_nothing(tmp_path: Path) -> None:
    port = free_port()
    line, mnt = failed_mount(tmp_path, "--node", f"nbd://127.0.0.1:{port}")
    assert line.startswith("dstfs mount: ")
    assert f"127.0.0.1:{port}" in line and "Connection refused" in line
    assert not (tmp_path / f"state-{mnt.name}" / "array.json").exists()


def test_mount_with_a_second_node_unreachable_mounts_nothing(tmp_path: Path) -> None:
    good = node_file(tmp_path)
    line, _ = failed_mount(
        tmp_path, "--node", f"file://{good}", "--node", f"nbd://127.0.0.1:{free_port()}"
    )
    assert "Connection refused" in line


def test_mount_on_a_busy_mount_point_is_one_line(tmp_path: Path) -> None:
    a = node_file(tmp_path)
    with mounted(tmp_path, nodes=[f"file://{a}"]) as mnt:
        res = dstfs("mount", str(mnt), "--state", str(tmp_path / "s2"), "--node", f"file://{a}")
        assert "busy" in one_line(res)
        assert (mnt / "size").read_text() == f"{4 * MiB // 512}\n"  # the first one still works


def test_mount_on_a_missing_directory_is_one_line(tmp_path: Path) -> None:
    res = dstfs("mount", str(tmp_path / "nope"), "--state", str(tmp_path / "s"))
    line = one_line(res)
    assert "nope" in line and "not a directory" in line
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").iterdir())


@pytest.mark.parametrize(
    "uri",
    [
        "nbd://",
        "bogus://x/y",
        "nbd://127.0.0.1:99999",
        "nbd://h/x,size=zero",
        "nbds://h/x?tls-verify-peer=2",
    ],
)
def test_mount_with_a_malformed_node_uri_is_one_line(tmp_path: Path, uri: str) -> None:
    line, _ = failed_mount(tmp_path, "--node", uri)
    assert line.startswith("dstfs mount: ")


def test_mount_with_a_bad_algorithm_or_chunk_is_one_line(tmp_path: Path) -> None:
    a = node_file(tmp_path)
    line, _ = failed_mount(tmp_path, "--alg", "raid5", "--node", f"file://{a}")
    assert "unknown algorithm" in line
    line, _ = failed_mount(tmp_path, "--alg", "stripe", "--chunk", "3000", "--node", str(a))
    assert "power of two" in line


def test_umount_of_something_not_mounted_is_one_line(tmp_path: Path) -> None:
    assert "not mounted" in one_line(dstfs("umount", str(tmp_path)))


def test_umount_while_a_loop_device_holds_disk_img_refuses_and_stays_mounted(
    tmp_path: Path,
) -> None:
    a = node_file(tmp_path)
    with mounted(tmp_path, nodes=[f"file://{a}"]) as mnt:
        with loop(mnt / "disk.img"):
            line = one_line(dstfs("umount", str(mnt)))
            assert "busy" in line and "losetup -d" in line
            assert is_mounted(mnt)
            assert (mnt / "n-0" / "state").read_text() == "online\n"
        res = dstfs("umount", str(mnt))
        assert res.returncode == 0, res.stderr
        assert not is_mounted(mnt)


def test_status_names_every_node_and_its_state(tmp_path: Path) -> None:
    a, b = node_file(tmp_path, "a.img"), node_file(tmp_path, "b.img")
    with mounted(tmp_path, nodes=[f"file://{a}", f"file://{b}"], name="tbl") as mnt:
        assert os.system(f"echo 1 > {mnt}/n-8192/suspend") == 0
        res = dstfs("status", str(mnt))
        os.system(f"echo 0 > {mnt}/n-8192/suspend")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["array", "tbl"]
    assert lines[1].split() == ["alg", "alg_linear"]
    assert lines[2].startswith("size") and "16384 sectors" in lines[2]
    rows = {line.split()[0]: line.split() for line in lines[3:]}
    assert rows["NODE"][:4] == ["NODE", "STATE", "START", "SIZE"]
    assert rows["n-0"][1:4] == ["online", "0", "8192"]
    assert rows["n-8192"][1:4] == ["suspended", "8192", "8192"]
    assert lines[-2].endswith(f"L: {a}") and lines[-1].endswith(f"L: {b}")


def test_status_of_something_not_an_array_is_one_line(tmp_path: Path) -> None:
    assert "no dstfs array" in one_line(dstfs("status", str(tmp_path)))


@pytest.mark.parametrize("content", ["{", "[]\n"], ids=["corrupt", "not-an-object"])
def test_mount_with_a_bad_state_file_is_one_line(tmp_path: Path, content: str) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "array.json").write_text(content)
    mnt = new_dir(tmp_path, "mnt")
    assert "not a dstfs state file" in one_line(dstfs("mount", str(mnt), "--state", str(state)))
    assert not is_mounted(mnt)


def test_mount_with_a_state_path_that_is_a_file_is_one_line(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.write_text("not a directory\n")
    mnt = new_dir(tmp_path, "mnt")
    line = one_line(dstfs("mount", str(mnt), "--state", str(state)))
    assert str(state) in line


def test_mount_with_a_state_dir_that_cannot_be_created_is_one_line(tmp_path: Path) -> None:
    a = node_file(tmp_path)
    mnt = new_dir(tmp_path, "mnt")
    try:
        res = dstfs("mount", str(mnt), "--state", "/proc/dstfs-nope", "--node", f"file://{a}")
        assert "/proc/dstfs-nope" in one_line(res)
    finally:
        teardown(mnt, daemon_pid(mnt))


def test_mount_with_chunk_for_linear_says_chunk_is_for_stripe(tmp_path: Path) -> None:
    a = node_file(tmp_path)
    line, _ = failed_mount(tmp_path, "--chunk", "64K", "--node", f"file://{a}")
    assert "__init__" not in line and "stripe" in line


def test_umount_returns_once_the_daemon_has_exited_even_if_not_yet_reaped(
    tmp_path: Path,
) -> None:
    # Made the daemon's parent by PR_SET_CHILD_SUBREAPER (see helpers/mounts.py), this
    # process does not reap it while `dstfs umount` runs: a non-reaping init.
    a = node_file(tmp_path)
    mnt = new_dir(tmp_path, "mnt")
    pid = None
    try:
        argv = mount_cmd(mnt, tmp_path / "state", [f"file://{a}"])
        _subreaper(True)
        try:
            assert subprocess.run(argv, capture_output=True).returncode == 0
        finally:
            _subreaper(False)
        pid = daemon_pid(mnt)
        assert pid is not None
        # Waiting for the pid to vanish, umount would wait its whole 60 s
        # and then fail: it must return 0 well before that.
        res = dstfs("umount", str(mnt), timeout=45)
        assert res.returncode == 0, res.stderr
        # And the daemon had exited without being reaped: the case under test.
        stat = Path(f"/proc/{pid}/stat").read_text()
        assert stat.rpartition(")")[2].split()[0] == "Z", stat
    finally:
        deadline = time.monotonic() + 60
        while pid is not None and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0]:
                    break
            time.sleep(0.05)
        teardown(mnt, pid)


# -- one daemon per state dir, one mount per mount point (issue 12, hole 5)


def test_a_second_mount_on_the_same_state_dir_is_one_line_and_changes_nothing(
    tmp_path: Path,
) -> None:
    a = node_file(tmp_path)
    state = tmp_path / "state"
    with mounted(tmp_path, nodes=[f"file://{a}"], state=state) as mnt:
        pid = daemon_pid(mnt)
        before = sorted((p.name, p.read_bytes()) for p in state.iterdir() if p.is_file())
        other = new_dir(tmp_path, "other")
        try:
            line = one_line(dstfs("mount", str(other), "--state", str(state), "--node", str(a)))
        finally:
            teardown(other, daemon_pid(other))
        assert str(state) in line and "in use" in line and f"daemon {pid} " in line, line
        assert not is_mounted(other)
        after = sorted((p.name, p.read_bytes()) for p in state.iterdir() if p.is_file())
        assert after == before
        assert (mnt / "n-0" / "state").read_text() == "online\n"  # the first one still works
    # The lock went with the daemon: the same state dir mounts again.
    with mounted(tmp_path, state=state) as mnt:
        assert (mnt / "size").read_text() == f"{4 * MiB // 512}\n"


def test_mount_on_a_bind_mount_is_one_line_and_stacks_nothing(tmp_path: Path) -> None:
    # A bind mount of a directory onto itself: same device and inode as
    # before, so os.path.ismount() does not see it; mountinfo does.
    a = node_file(tmp_path)
    where = new_dir(tmp_path, "bound")
    subprocess.run(["mount", "--bind", str(where), str(where)], check=True)
    try:
        res = dstfs("mount", str(where), "--state", str(tmp_path / "s"), "--node", str(a))
        line = one_line(res)
        assert "already a mount point" in line and str(where) in line
        there = [fs for _, mp, fs, _ in mountinfo() if mp == str(where)]
        assert len(there) == 1 and not there[0].startswith("fuse"), there  # the bind only
    finally:
        teardown(where, daemon_pid(where))
        subprocess.run(["umount", str(where)], check=False)
    assert not is_mounted(where)


def test_a_node_timeout_survives_a_remount(tmp_path: Path) -> None:
    a, b = node_file(tmp_path, "a.img"), node_file(tmp_path, "b.img")
    state = tmp_path / "state"
    with mounted(tmp_path, nodes=[f"file://{a}", f"file://{b}"], state=state) as mnt:
        (mnt / "n-8192" / "timeout").write_text("2.5\n")
        assert (mnt / "n-8192" / "timeout").read_text() == "2.5\n"
    with mounted(tmp_path, state=state) as mnt:
        assert (mnt / "n-8192" / "timeout").read_text() == "2.5\n"
        assert (mnt / "n-0" / "timeout").read_text() == "30\n"


def test_mount_with_the_state_dir_under_the_mount_point_is_one_line(tmp_path: Path) -> None:
    # The daemon would write its state through its own mount (a deadlock).
    a = node_file(tmp_path)
    mnt = new_dir(tmp_path, "mnt")
    res = dstfs("mount", str(mnt), "--state", str(mnt / "state"), "--node", f"file://{a}")
    assert "under the mount point" in one_line(res)
    assert not is_mounted(mnt)
    assert not (mnt / "state").exists()


def test_a_hangup_unmounts_a_foreground_daemon_cleanly(tmp_path: Path) -> None:
    """A closed terminal sends SIGHUP to `dstfs mount --foreground`: it stops
    as on SIGTERM (written data reaches the node, the mount goes), instead of
    dying with its FUSE mount left dead."""
    a = node_file(tmp_path)
    mnt = new_dir(tmp_path, "mnt")
    argv = mount_cmd(mnt, tmp_path / "state", [f"file://{a}"], extra=["--foreground"])
    argv.insert(len(DSTFS), "-v")
    proc = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        wait_for(lambda: is_mounted(mnt) or proc.poll() is not None, "mounted")
        assert proc.poll() is None
        data = os.urandom(64 * 1024)
        fd = os.open(mnt / "disk.img", os.O_WRONLY)
        try:
            os.pwrite(fd, data, MiB)
        finally:
            os.close(fd)
        os.killpg(proc.pid, signal.SIGHUP)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert b"signal SIGHUP: stopping" in err
        assert not is_mounted(mnt)
        with a.open("rb") as f:
            f.seek(MiB)
            assert f.read(len(data)) == data
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        teardown(mnt)


@pytest.mark.parametrize("what", ["missing", "file"])
@pytest.mark.parametrize("command", [["status"], ["status", "--json"], ["suspend", "n-0"]])
def test_an_array_command_on_a_state_dir_that_is_not_one_is_one_line(
    tmp_path: Path, what: str, command: list[str]
) -> None:
    """--state naming nothing, or a file, was a FileNotFoundError traceback."""
    state = tmp_path / "state"
    if what == "file":
        state.write_text("")
    res = dstfs(command[0], "--state", str(state), *command[1:])
    assert "no dstfs daemon runs on this state dir" in one_line(res)
    assert res.returncode == 1 and res.stdout == ""
