"""dstfs through a real FUSE mount: `cat`, `echo` and `ls` on the control
tree, every bad input with the shell's exit status and error text, disk.img
as a fixed-size file (short reads and ENOSPC at its end, no resizing), the
rest of the namespace refused with EPERM, add_node growing disk.img while it
runs (and persisting across a remount), a stripe laid out as its model says,
one node's errno (nbdkit's error filter) reaching the caller, fsync on
disk.img reaching every node as NBD_CMD_FLUSH (nbdkit's log filter counts
them), and the test helper freeing a hung (SIGSTOPped) daemon.

Error texts are checked with bash, whose `echo` reports write(2)'s errno
(dash, /bin/sh here, prints "I/O error" for any failed write)."""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import re
import signal
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.load import ctl_write, wait_for
from helpers.mounts import daemon_pid, is_daemon_of, is_mounted, loop, loops_over, mounted, teardown
from helpers.patterns import word_pattern
from helpers.procs import free_port, nbdkit, sh

MiB = 1 << 20
NODE = 4 * MiB
SECTORS = NODE // 512


def pattern(tag: int, size: int) -> bytes:
    """The first `size` bytes of node `tag`'s offset pattern."""
    return word_pattern(tag, 0, size)


@pytest.fixture(scope="module")
def arr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[Path]]]:
    """A linear array over two 4 MiB pattern files (file:// nodes)."""
    tmp = tmp_path_factory.mktemp("fs")
    files = []
    for tag in (1, 2):
        files.append(tmp / f"node{tag}.img")
        files[-1].write_bytes(pattern(tag, NODE))
    with mounted(tmp, nodes=[f"file://{f}" for f in files]) as mnt:
        yield mnt, files


@pytest.fixture
def mnt(arr: tuple[Path, list[Path]]) -> Path:
    return arr[0]


@pytest.fixture
def disk(mnt: Path) -> Iterator[int]:
    fd = os.open(mnt / "disk.img", os.O_RDWR)
    try:
        yield fd
    finally:
        os.close(fd)


# -- the tree as ls and cat see it


def ls_l(path: Path) -> dict[str, tuple[str, int]]:
    out = subprocess.run(["ls", "-l", str(path)], capture_output=True, text=True, check=True)
    entries = {}
    for line in out.stdout.splitlines()[1:]:  # skip "total N"
        f = line.split()
        entries[f[-1]] = (f[0], int(f[4]))
    return entries


def test_ls_l_shows_disk_img_and_control_files_with_their_modes(mnt: Path) -> None:
    modes = {name: m for name, (m, _) in ls_l(mnt).items()}
    assert modes == {
        "add_node": "--w-------",
        "alg": "-rw-r--r--",
        "disk.img": "-rw-r--r--",
        "n-0": "drwxr-xr-x",
        f"n-{SECTORS}": "drwxr-xr-x",
        "name": "-r--r--r--",
        "nodes": "-r--r--r--",
        "remove_all_nodes": "--w-------",
        "size": "-r--r--r--",
        "stats": "-r--r--r--",
        "jobs": "-r--r--r--",
        "metrics": "-r--r--r--",
    }
    assert ls_l(mnt)["disk.img"][1] == 2 * NODE
    assert {n: m for n, (m, _) in ls_l(mnt / "n-0").items()} == {
        "size": "-r--r--r--",
        "start": "-r--r--r--",
        "state": "-r--r--r--",
        "stats": "-r--r--r--",
        "suspend": "-rw-r--r--",
        "migrate": "-rw-r--r--",
        "target": "-rw-r--r--",
        "timeout": "-rw-r--r--",
        "type": "-r--r--r--",
    }


def test_cat_shows_the_control_files(arr: tuple[Path, list[Path]]) -> None:
    mnt, files = arr

    def cat(*p: str) -> str:
        return subprocess.run(["cat", str(mnt.joinpath(*p))], capture_output=True, text=True).stdout

    assert cat("name") == "storage\n"
    assert cat("alg") == "alg_linear\n"
    assert cat("size") == f"{2 * SECTORS}\n"
    assert cat("nodes") == f"sectors (start [size]): 0 [{SECTORS}] | {SECTORS} [{SECTORS}]\n"
    assert cat("n-0", "type") == f"L: {files[0]}\n"
    assert cat(f"n-{SECTORS}", "type") == f"L: {files[1]}\n"
    assert cat(f"n-{SECTORS}", "start") == f"{SECTORS}\n"
    assert cat("n-0", "state") == "online\n"
    assert re.fullmatch(r"(?:[a-z_]+ \d+(?:\.\d+)?\n)+", cat("n-0", "stats"))
    assert re.fullmatch(r"(?:[a-z_]+ \d+\n)+", cat("stats"))


def test_good_writes_with_echo_take_effect(mnt: Path) -> None:
    try:
        assert sh(f"echo 7 > {mnt}/n-0/timeout").returncode == 0
        assert (mnt / "n-0" / "timeout").read_text() == "7\n"
        assert sh(f"echo 1 > {mnt}/n-0/suspend").returncode == 0
        assert (mnt / "n-0" / "state").read_text() == "suspended\n"
        assert sh(f"echo 0 > {mnt}/n-0/suspend").returncode == 0
        assert (mnt / "n-0" / "state").read_text() == "online\n"
    finally:
        sh(f"echo 0 > {mnt}/n-0/suspend; echo 30 > {mnt}/n-0/timeout")


# -- bad input through the mount


def control_state(mnt: Path) -> tuple[str, ...]:
    return tuple((mnt / f).read_text() for f in ("alg", "nodes", "size", "n-0/state"))


@pytest.mark.parametrize(
    ("script", "message"),
    [
        ("echo garbage > M/alg", "write error: Invalid argument"),
        ("echo alg_stripe > M/alg", "write error: Device or resource busy"),
        ("echo nbd:// > M/add_node", "write error: Invalid argument"),
        ("echo bogus://x > M/add_node", "write error: Invalid argument"),
        ("echo nbd://127.0.0.1:FREE > M/add_node", "write error: Connection refused"),
        ("echo file:///no/such/file > M/add_node", "write error: No such file or directory"),
        ("echo 2 > M/remove_all_nodes", "write error: Invalid argument"),
        ("echo yes > M/remove_all_nodes", "write error: Invalid argument"),
        # one write(2) holding two lines (bash's own printf writes line by line)
        ("/usr/bin/printf '1\\n1\\n' > M/remove_all_nodes", "write error: Invalid argument"),
        ("/usr/bin/printf 'alg_linear\\nalg_stripe\\n' > M/alg", "write error: Invalid argument"),
        ("printf '\\xff\\xfe\\n' > M/alg", "write error: Invalid argument"),
        ("echo 2 > M/n-0/suspend", "write error: Invalid argument"),
        ("echo -5 > M/n-0/timeout", "write error: Invalid argument"),
        ("echo x > M/name", "M/name: Permission denied"),
        ("echo 1 > M/size", "M/size: Permission denied"),
        ("echo x > M/nodes", "M/nodes: Permission denied"),
        ("echo 0 > M/stats", "M/stats: Permission denied"),
        ("echo x > M/n-0/type", "M/n-0/type: Permission denied"),
        ("echo online > M/n-0/state", "M/n-0/state: Permission denied"),
        ("cat M/add_node", "M/add_node: Permission denied"),
        ("cat M/remove_all_nodes", "M/remove_all_nodes: Permission denied"),
        ("echo 1 > M/nope", "M/nope: Operation not permitted"),
    ],
)
def test_bad_input_fails_with_its_errno_text_and_changes_nothing(
    mnt: Path, script: str, message: str
) -> None:
    before = control_state(mnt)
    script = script.replace("M/", f"{mnt}/").replace("FREE", str(free_port()))
    res = sh(script)
    assert res.returncode == 1
    assert res.stderr.count("\n") == 1 and message.replace("M/", f"{mnt}/") in res.stderr
    assert control_state(mnt) == before


def test_remove_all_nodes_while_disk_img_is_open_is_busy(mnt: Path, disk: int) -> None:
    before = control_state(mnt)
    res = sh(f"echo 1 > {mnt}/remove_all_nodes")
    assert res.returncode == 1 and "Device or resource busy" in res.stderr
    assert control_state(mnt) == before


# -- disk.img: a fixed-size file


def test_disk_img_size_is_the_arrays(mnt: Path) -> None:
    st = os.stat(mnt / "disk.img")
    assert st.st_size == 2 * NODE
    assert (mnt / "size").read_text() == f"{st.st_size // 512}\n"


def test_reads_cross_the_node_boundary(disk: int) -> None:
    assert struct.unpack("<2Q", os.pread(disk, 16, NODE - 8)) == (1 << 48 | NODE - 8, 2 << 48)
    data = os.pread(disk, 2 * MiB, NODE - MiB)
    assert data == pattern(1, NODE)[-MiB:] + pattern(2, MiB)


def test_reads_past_the_end_are_short_or_empty(disk: int) -> None:
    assert os.pread(disk, 8192, 2 * NODE - 4096) == pattern(2, NODE)[-4096:]
    assert os.pread(disk, 4096, 2 * NODE) == b""
    assert os.pread(disk, 4096, 3 * NODE) == b""


def test_write_lands_on_the_node_files(arr: tuple[Path, list[Path]], disk: int) -> None:
    _, files = arr
    payload = os.urandom(8192)
    assert os.pwrite(disk, payload, NODE - 4096) == 8192
    os.fsync(disk)
    with open(files[0], "rb") as a, open(files[1], "rb") as b:
        assert os.pread(a.fileno(), 4096, NODE - 4096) == payload[:4096]
        assert os.pread(b.fileno(), 4096, 0) == payload[4096:]
    os.pwrite(disk, pattern(1, NODE)[-4096:] + pattern(2, 4096), NODE - 4096)


def test_write_past_the_end_is_enospc_and_a_straddling_write_is_short(disk: int) -> None:
    end = 2 * NODE
    tail = os.pread(disk, 4096, end - 4096)
    for offset in (end, end + 4096):
        with pytest.raises(OSError) as e:
            os.pwrite(disk, b"x" * 4096, offset)
        assert e.value.errno == errno.ENOSPC
    assert os.pwrite(disk, b"y" * 8192, end - 4096) == 4096
    assert os.pread(disk, 8192, end - 4096) == b"y" * 4096
    os.pwrite(disk, tail, end - 4096)
    assert os.fstat(disk).st_size == end


def test_truncate_to_another_size_is_einval_and_to_the_same_size_works(mnt: Path) -> None:
    path = mnt / "disk.img"
    for size in (0, 2 * NODE - 512, 2 * NODE + 512):
        with pytest.raises(OSError) as e:
            os.truncate(path, size)
        assert e.value.errno == errno.EINVAL
    res = subprocess.run(["truncate", "-s", "1G", str(path)], capture_output=True, text=True)
    assert res.returncode == 1 and "Invalid argument" in res.stderr
    res = subprocess.run(["truncate", "-s", str(2 * NODE), str(path)], capture_output=True)
    assert res.returncode == 0
    assert path.stat().st_size == 2 * NODE


def test_open_with_o_trunc_leaves_disk_img_whole_like_a_block_device(disk: int, mnt: Path) -> None:
    head = os.pread(disk, 4096, 0)
    fd = os.open(mnt / "disk.img", os.O_WRONLY | os.O_TRUNC)
    os.close(fd)
    assert os.stat(mnt / "disk.img").st_size == 2 * NODE
    assert os.pread(disk, 4096, 0) == head


def test_fsync_of_a_control_file_succeeds_and_flushes_no_node(mnt: Path, disk: int) -> None:
    os.pwrite(disk, os.pread(disk, 4096, 0), 0)  # something a flush would have to carry
    before = [flush_count(mnt, n) for n in ("n-0", f"n-{SECTORS}")]
    array_before = flush_count(mnt)
    for name in ("alg", "nodes", "n-0/state"):
        fd = os.open(mnt / name, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.fdatasync(fd)
        finally:
            os.close(fd)
    assert [flush_count(mnt, n) for n in ("n-0", f"n-{SECTORS}")] == before
    assert flush_count(mnt) == array_before
    # The counters do count: an fsync of disk.img moves them.
    os.fsync(disk)
    assert [flush_count(mnt, n) for n in ("n-0", f"n-{SECTORS}")] == [x + 1 for x in before]
    assert flush_count(mnt) == array_before + 1


def flush_count(mnt: Path, node: str = "") -> int:
    """NBD_CMD_FLUSH (or fsync) sent by a node, or by the array, from its stats file."""
    text = (mnt / node / "stats").read_text()
    return int(re.search(r"^flushes (\d+)$", text, re.M)[1])  # type: ignore[index]


# -- the rest of the namespace is fixed


@pytest.mark.parametrize(
    "op",
    [
        "mkdir M/dir",
        "mkdir M/n-0/dir",
        "touch M/new",
        "echo x > M/new",
        "rm M/disk.img",
        "rm M/alg",
        "rmdir M/n-0",
        "mv M/disk.img M/other.img",
        "ln -s disk.img M/link",
        "ln M/disk.img M/hard",
        "mknod M/fifo p",
        "chmod 600 M/disk.img",
        "chown 1:1 M/alg",
    ],
)
def test_namespace_changes_are_refused_with_eperm(mnt: Path, op: str) -> None:
    before = sorted(os.listdir(mnt))
    res = sh(op.replace("M/", f"{mnt}/"))
    assert res.returncode != 0
    assert "Operation not permitted" in res.stderr, res.stderr
    assert sorted(os.listdir(mnt)) == before


# -- changes while mounted


#: How long the kernel caches disk.img's size (the daemon's attr_timeout).
ATTR_TIMEOUT = 1.0
#: add_node rounds allowed to prove the invalidation (see below).
ROUNDS = 5


def test_add_node_grows_disk_img_before_its_cached_size_expires(tmp_path: Path) -> None:
    """The kernel caches disk.img's size for ATTR_TIMEOUT s; after add_node
    the daemon invalidates it, so the new size shows before that cache
    would have expired. A round proves it only if it takes less than
    ATTR_TIMEOUT s, which a busy machine may deny: then another node is
    added, up to ROUNDS times, and one round must prove it."""
    files = [tmp_path / f"{k}.img" for k in range(ROUNDS + 1)]
    for k, f in enumerate(files):
        f.write_bytes(pattern(k + 1, NODE))
    with mounted(tmp_path, nodes=[f"file://{files[0]}"]) as mnt:
        fd = os.open(mnt / "disk.img", os.O_RDONLY)
        try:
            assert os.pread(fd, 8, NODE) == b""
            took = []
            for k in range(1, ROUNDS + 1):
                # Whatever was cached has expired: the fstat below asks the
                # daemon, and its answer is cached until t0 + ATTR_TIMEOUT or later.
                time.sleep(ATTR_TIMEOUT + 0.1)
                t0 = time.monotonic()
                assert os.fstat(fd).st_size == k * NODE
                assert ctl_write(mnt, "add_node", value=f"file://{files[k]}") == 0
                wait_for(
                    lambda k=k: os.stat(mnt / "disk.img").st_size == (k + 1) * NODE,
                    f"disk.img grown to {k + 1} nodes",
                    60,
                    step=0.01,
                )
                took.append(round(time.monotonic() - t0, 3))
                if took[-1] < ATTR_TIMEOUT:
                    break
            assert took[-1] < ATTR_TIMEOUT, f"the old size stayed cached: rounds took {took} s"
            assert os.fstat(fd).st_size == (len(took) + 1) * NODE
            assert os.pread(fd, 16, NODE - 8) == struct.pack("<2Q", 1 << 48 | NODE - 8, 2 << 48)
            assert (
                (mnt / "nodes")
                .read_text()
                .startswith(f"sectors (start [size]): 0 [{SECTORS}] | {SECTORS} [{SECTORS}]")
            )
            assert f"n-{SECTORS}" in os.listdir(mnt)
        finally:
            os.close(fd)


def test_a_node_added_at_run_time_is_back_after_a_remount_from_the_state_dir(
    tmp_path: Path,
) -> None:
    a, b, state = tmp_path / "a.img", tmp_path / "b.img", tmp_path / "state"
    a.write_bytes(pattern(1, NODE))
    b.write_bytes(pattern(2, NODE))
    payload = os.urandom(8192)
    with mounted(tmp_path, nodes=[f"file://{a}"], state=state) as mnt:
        assert sh(f"echo file://{b} > {mnt}/add_node").returncode == 0
        with open(mnt / "disk.img", "r+b") as f:
            f.seek(NODE - 4096)
            f.write(payload)
    with mounted(tmp_path, state=state) as mnt:
        assert (mnt / "nodes").read_text() == (
            f"sectors (start [size]): 0 [{SECTORS}] | {SECTORS} [{SECTORS}]\n"
        )
        with open(mnt / "disk.img", "rb") as f:
            f.seek(NODE - 4096)
            assert f.read(8192) == payload


def test_remove_all_nodes_empties_the_disk_then_alg_can_change(tmp_path: Path) -> None:
    a = tmp_path / "a.img"
    a.write_bytes(bytes(NODE))
    with mounted(tmp_path, nodes=[f"file://{a}"]) as mnt:
        assert sh(f"echo 1 > {mnt}/remove_all_nodes").returncode == 0
        assert (mnt / "size").read_text() == "0\n"
        assert os.stat(mnt / "disk.img").st_size == 0
        assert not [n for n in os.listdir(mnt) if n.startswith("n-")]
        assert sh(f"echo alg_stripe > {mnt}/alg").returncode == 0
        assert (mnt / "alg").read_text() == "alg_stripe\n"
        assert sh(f"echo file://{a} > {mnt}/add_node").returncode == 0
        assert sorted(n for n in os.listdir(mnt) if n.startswith("n-")) == ["n-0"]


def test_stripe_array_through_the_mount(tmp_path: Path) -> None:
    chunk = 64 * 1024
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    a.write_bytes(pattern(1, NODE))
    b.write_bytes(pattern(2, NODE + 4096))  # the extra bytes are not used
    with mounted(tmp_path, nodes=[f"file://{a}", f"file://{b}"], alg="stripe") as mnt:
        assert (mnt / "alg").read_text() == "alg_stripe\n"
        assert sorted(n for n in os.listdir(mnt) if n.startswith("n-")) == ["n-0", "n-1"]
        assert (
            mnt / "nodes"
        ).read_text() == f"sectors (start [size]): 0 [{SECTORS}] | 0 [{SECTORS}]\n"
        nodes = [pattern(1, NODE), pattern(2, NODE)]
        model = b"".join(nodes[k % 2][(k // 2) * chunk :][:chunk] for k in range(2 * NODE // chunk))
        with open(mnt / "disk.img", "r+b") as f:
            assert f.read() == model
            payload = os.urandom(3 * chunk)
            f.seek(chunk // 2)
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
            # chunk 0 (node 0 row 0), chunks 1 and 3 (node 1 rows 0, 1), chunk 2 (node 0 row 1)
            na, nb = a.read_bytes(), b.read_bytes()
            assert na[chunk // 2 : chunk] == payload[: chunk // 2]
            assert nb[:chunk] == payload[chunk // 2 : chunk // 2 + chunk]
            assert na[chunk : 2 * chunk] == payload[chunk // 2 + chunk : chunk // 2 + 2 * chunk]
            assert nb[chunk : chunk + chunk // 2] == payload[chunk // 2 + 2 * chunk :]
            assert nb[chunk + chunk // 2 : 2 * chunk] == nodes[1][chunk + chunk // 2 : 2 * chunk]
            # a stripe re-lays the disk when a node is added: refused while open
            c = tmp_path / "c.img"  # not a or b: those are EEXIST, members already
            c.write_bytes(pattern(3, NODE))
            res = sh(f"echo file://{c} > {mnt}/add_node")
            assert res.returncode == 1 and "Device or resource busy" in res.stderr


def test_a_node_error_reaches_the_caller_with_its_errno_and_other_nodes_go_on(
    tmp_path: Path,
) -> None:
    a, trigger = tmp_path / "a.img", tmp_path / "fail-now"
    a.write_bytes(pattern(1, NODE))
    failing = nbdkit(
        "--filter=error",
        "memory",
        "4M",
        "error-pread=EIO",
        "error-pread-rate=1",
        "error-pwrite=ENOSPC",
        "error-pwrite-rate=1",
        f"error-file={trigger}",
    )
    with failing as uri, mounted(tmp_path, nodes=[f"file://{a}", uri]) as mnt:
        fd = os.open(mnt / "disk.img", os.O_RDWR | os.O_DIRECT)
        buf = mmap.mmap(-1, 8192)  # page-aligned, as O_DIRECT wants
        try:
            trigger.touch()
            with pytest.raises(OSError) as e:
                os.preadv(fd, [buf], NODE)
            assert e.value.errno == errno.EIO
            buf[:] = b"w" * 8192
            with pytest.raises(OSError) as e:
                os.pwritev(fd, [buf], NODE - 4096)  # half on each node
            assert e.value.errno == errno.ENOSPC
            assert os.preadv(fd, [buf], 0) == 8192 and bytes(buf) == pattern(1, 8192)
            assert a.read_bytes()[NODE - 4096 :] == b"w" * 4096  # node 0's half landed
            stats = (mnt / f"n-{SECTORS}" / "stats").read_text()
            assert re.search(r"^errors [1-9]", stats, re.M), stats
            assert (mnt / f"n-{SECTORS}" / "state").read_text() == "online\n"
            trigger.unlink()
            assert os.preadv(fd, [buf], NODE) == 8192
        finally:
            buf.close()
            os.close(fd)


# -- durability: fsync reaches every node


def flushes(log: Path) -> int:
    """Completed NBD_CMD_FLUSH requests in an nbdkit log filter's file."""
    return len(re.findall(r"\.\.\.Flush id=\d+ return=0", log.read_text()))


def test_fsync_on_disk_img_sends_a_flush_to_every_node(tmp_path: Path) -> None:
    logs = [tmp_path / "n0.log", tmp_path / "n1.log"]
    with contextlib.ExitStack() as stack:
        uris = [
            stack.enter_context(nbdkit("--filter=log", "memory", "64M", f"logfile={log}"))
            for log in logs
        ]
        mnt = stack.enter_context(mounted(tmp_path, nodes=uris))
        fd = os.open(mnt / "disk.img", os.O_RDWR)
        try:
            before = [flushes(log) for log in logs]
            os.pwrite(fd, os.urandom(8192), 64 * MiB - 4096)  # one page on each node
            assert [flushes(log) for log in logs] == before, "a flush without fsync"
            os.fsync(fd)
            # Exactly one each: none came of the write (had one come late,
            # it would be counted here too).
            after = [flushes(log) for log in logs]
            assert [x - y for x, y in zip(after, before, strict=True)] == [1, 1]
            os.fdatasync(fd)
            assert [flushes(log) for log in logs] == [x + 1 for x in after]
        finally:
            os.close(fd)
        for log in logs:
            text = log.read_text()
            # The flush followed the write it makes durable.
            assert 0 <= text.rfind("...Write id=") < text.find("...Flush id="), text


# -- the test helper's own fallback


def test_teardown_frees_a_hung_daemon_with_ext4_on_a_loop_device(tmp_path: Path) -> None:
    a = tmp_path / "a.img"
    a.write_bytes(bytes(32 * MiB))
    with mounted(tmp_path, nodes=[f"file://{a}"]) as mnt:
        pid = daemon_pid(mnt)
        assert pid is not None
        with loop(mnt / "disk.img") as dev:
            assert subprocess.run(["mkfs.ext4", "-q", dev], capture_output=True).returncode == 0
            data = tmp_path / "data"
            data.mkdir()
            subprocess.run(["mount", dev, str(data)], check=True)
            (data / "dirty").write_bytes(os.urandom(MiB))  # not yet written back
            os.kill(pid, signal.SIGSTOP)
            try:
                t0 = time.monotonic()
                teardown(mnt, pid, patience=2)
                # Bounded: its steps time out (2 s each) rather than hang.
                assert time.monotonic() - t0 < 60
            finally:
                if is_daemon_of(pid, mnt):
                    os.kill(pid, signal.SIGKILL)
            assert not is_mounted(data) and not is_mounted(mnt)
            assert loops_over(mnt / "disk.img") == []
