"""`dstfs mount --export`: the mounted array served over NBD beside disk.img
(issue 16), checked with real NBD clients (nbdcopy, nbdinfo, qemu-img, fio)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from helpers.mounts import mounted
from helpers.procs import DSTFS, need

from dstfs.commands import process_alive

MiB = 1 << 20


def sh(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=True)


def node_files(tmp_path: Path, count: int = 2, size: int = 160 * MiB) -> list[str]:
    paths = []
    for i in range(count):
        p = tmp_path / f"n{i}.img"
        with open(p, "wb") as f:
            f.truncate(size)
        paths.append(str(p))
    return paths


def random_file(path: Path, size: int) -> Path:
    with open(path, "wb") as f, open("/dev/urandom", "rb") as r:
        left = size
        while left:
            chunk = r.read(min(left, 8 * MiB))
            f.write(chunk)
            left -= len(chunk)
    return path


def test_nbdcopy_through_the_export_equals_disk_img_both_ways(tmp_path: Path) -> None:
    need("nbdcopy")
    sock = tmp_path / "e.sock"
    uri = f"nbd+unix:///?socket={sock}"
    src = random_file(tmp_path / "src", 256 * MiB)
    with mounted(tmp_path, node_files(tmp_path), extra=["--export", f"unix:{sock}"]) as mnt:
        info = sh("nbdinfo", "--json", uri).stdout
        assert '"can_multi_conn": true' in info
        sh("nbdcopy", str(src), uri)
        sh("cmp", "-n", str(256 * MiB), str(src), str(mnt / "disk.img"))
        # The other way round: written through disk.img, read through the export.
        back = random_file(tmp_path / "back", 256 * MiB)
        sh("dd", f"if={back}", f"of={mnt / 'disk.img'}", "bs=4M", "conv=notrunc,fsync")
        out = tmp_path / "out"
        sh("nbdcopy", uri, str(out))
        sh("cmp", "-n", str(256 * MiB), str(back), str(out))


def test_export_on_a_non_loopback_address_is_refused_without_the_flag(tmp_path: Path) -> None:
    res = subprocess.run(
        [
            *DSTFS,
            "mount",
            str(tmp_path),
            "--state",
            str(tmp_path / "st"),
            "--export",
            "0.0.0.0:10809",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 1
    assert "--export-any-address" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "st").exists()  # refused before anything was created


@pytest.mark.parametrize("addr", ["unix:relative.sock", "localhost", "127.0.0.1:0", "[::1]:x"])
def test_a_malformed_export_address_is_one_line(tmp_path: Path, addr: str) -> None:
    res = subprocess.run(
        [*DSTFS, "mount", str(tmp_path), "--state", str(tmp_path / "st"), "--export", addr],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 1
    assert res.stderr.startswith("dstfs mount: --export")


def _lock_pid(state: Path) -> int | None:
    try:
        return int((state / "lock").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


@contextlib.contextmanager
def no_fuse(
    state: Path,
    nodes: Sequence[str],
    exports: Sequence[str],
    prefix: Sequence[str] = (),
    extra: Sequence[str] = (),
) -> Iterator[subprocess.CompletedProcess]:
    """`dstfs mount --no-fuse` (run under `prefix`, e.g. unshare; `extra`
    arguments at the end); stopped afterwards with `dstfs umount --state`,
    or killed if that fails."""
    argv = [*DSTFS, "mount", "--no-fuse", "--state", str(state)]
    for n in nodes:
        argv += ["--node", n]
    for e in exports:
        argv += ["--export", e]
    argv += extra
    res = subprocess.run([*prefix, *argv], capture_output=True, text=True, timeout=60)
    try:
        yield res
    finally:
        pid = _lock_pid(state)
        subprocess.run([*DSTFS, "umount", "--state", str(state)], capture_output=True, timeout=60)
        if (
            pid is not None
            and process_alive(pid)
            and b"dstfs" in Path(f"/proc/{pid}/cmdline").read_bytes()
        ):
            os.kill(pid, signal.SIGKILL)


def test_no_fuse_export_on_a_host_without_dev_fuse_and_status_through_the_socket(
    tmp_path: Path,
) -> None:
    need("unshare")
    need("nbdcopy")
    state, sock = tmp_path / "st", tmp_path / "e.sock"
    uri = f"nbd+unix:///?socket={sock}"
    # A mount namespace whose /dev/fuse is /dev/null: FUSE cannot work there.
    hide = 'mount --bind /dev/null /dev/fuse && stat -c "fuse=%t:%T" /dev/fuse && exec "$@"'
    prefix = ["unshare", "-m", "--propagation", "private", "sh", "-c", hide, "sh"]
    nodes = node_files(tmp_path, size=16 * MiB)
    with no_fuse(state, nodes, [f"unix:{sock}"], prefix) as res:
        assert res.returncode == 0, res.stderr
        assert "fuse=1:3" in res.stdout  # /dev/fuse really was /dev/null for the daemon
        assert "dstfs status --state" in res.stdout
        assert not (tmp_path / "mnt").exists()
        assert (state / "control.sock").stat().st_mode & 0o777 == 0o600
        status = sh(*DSTFS, "status", "--state", str(state)).stdout
        assert "alg_linear" in status
        assert status.count(" online ") == 2, status
        assert sh(*DSTFS, "status", str(state)).stdout == status  # the state dir as the array
        data = random_file(tmp_path / "data", 8 * MiB)
        sh("nbdcopy", str(data), uri)
        out = tmp_path / "out"
        sh("nbdcopy", uri, str(out))
        assert out.read_bytes()[: 8 * MiB] == data.read_bytes()
        reads = _stat_of(state, "n-0", "reads")
        assert reads > 0
        # Suspend and resume through the socket.
        sh(*DSTFS, "suspend", "--state", str(state), "n-0")
        assert "suspended" in sh(*DSTFS, "status", "--state", str(state)).stdout
        sh(*DSTFS, "resume", "--state", str(state), "0")
        # One daemon per state dir, FUSE or not.
        again = subprocess.run(
            [*DSTFS, "mount", "--no-fuse", "--state", str(state), "--export", f"unix:{sock}2"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert again.returncode == 1
        assert "running without FUSE" in again.stderr
        pid = _lock_pid(state)
        assert pid is not None
        sh(*DSTFS, "umount", "--state", str(state))
        assert not process_alive(pid)
        assert not (state / "control.sock").exists()
        assert not sock.exists()
        gone = subprocess.run(
            [*DSTFS, "status", "--state", str(state)], capture_output=True, text=True
        )
        assert gone.returncode == 1
        assert "no dstfs daemon" in gone.stderr


def _stat_of(state: Path, node: str, key: str) -> int:
    text = sh(*DSTFS, "status", "--state", str(state)).stdout
    head, *rows = [line.split() for line in text.splitlines() if line.startswith(("NODE", "n-"))]
    row = next(r for r in rows if r[0] == node)
    return int(row[head.index({"reads": "READS"}[key])])


def _ask(path: Path, *lines: str) -> list[bytes]:
    """Raw requests on a control socket; the raw answers."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(path))
        f = s.makefile("rb")
        answers = []
        for line in lines:
            s.sendall(line.encode() + b"\n")
            head = f.readline()
            if head.startswith(b"ok "):
                head += f.read(int(head.split()[1]))
            answers.append(head)
        return answers


def test_control_socket_protocol_and_bad_requests(tmp_path: Path) -> None:
    state, sock = tmp_path / "st", tmp_path / "e.sock"
    with mounted(
        tmp_path, node_files(tmp_path, 1, 8 * MiB), state=state, extra=["--export", f"unix:{sock}"]
    ) as mnt:
        ctl = state / "control.sock"
        assert (ctl.stat().st_mode & 0o777) == 0o600
        ok_name, listing, bad_num, no_file, unknown, stop, good = _ask(
            ctl,
            "read name",
            "list",
            "write n-0/timeout abc",
            "read n-0/nope",
            "frobnicate",
            "stop",
            "write n-0/timeout 7",
        )
        assert ok_name == b"ok 8\nstorage\n"
        assert b"disk.img" not in listing and b"n-0/\n" in listing and b"stats\n" in listing
        assert bad_num.startswith(b"err 22 timeout is a decimal number")
        assert no_file.startswith(b"err 2 ")
        assert unknown.startswith(b"err 22 unknown request")
        assert stop.startswith(b"err 16 mounted on")  # a mounted array stops by unmounting
        assert good == b"ok 0\n"
        assert (mnt / "n-0" / "timeout").read_text() == "7\n"  # same tree as FUSE shows
        # The CLI through the socket: one line and exit 1 for a refused write.
        res = subprocess.run(
            [*DSTFS, "migrate", "--state", str(state), "n-0", "nbd://"],
            capture_output=True,
            text=True,
        )
        assert res.returncode == 1
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
        refused = subprocess.run(
            [*DSTFS, "umount", "--state", str(state)], capture_output=True, text=True
        )
        assert refused.returncode == 1
        assert f"dstfs umount {mnt}" in refused.stderr
        status_fuse = sh(*DSTFS, "status", str(mnt)).stdout
        assert sh(*DSTFS, "status", "--state", str(state)).stdout == status_fuse


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--no-fuse", "--export", "unix:/tmp/x.sock", "MNT"], "leave out the mount point"),
        (["--no-fuse"], "needs at least one --export"),
        ([], "a mount point is needed"),
    ],
)
def test_no_fuse_flags_that_do_not_fit_are_one_line(
    tmp_path: Path, args: list[str], says: str
) -> None:
    argv = [a.replace("MNT", str(tmp_path)) for a in args]
    res = subprocess.run(
        [*DSTFS, "mount", "--state", str(tmp_path / "st"), *argv],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 1
    assert says in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "st").exists()


def _writes(mnt: Path) -> int:
    return int(
        next(
            line.split()[1]
            for line in (mnt / "stats").read_text().splitlines()
            if line.startswith("writes ")
        )
    )


@pytest.mark.parametrize("event", ["suspend", "migrate"])
def test_qemu_img_and_fio_through_the_export_across_suspend_and_migration(
    tmp_path: Path, event: str
) -> None:
    """A stripe of two nbdkit memory nodes: qemu-img writes [0, 48M), fio
    writes and verifies [64M, 128M); both ranges lie on both nodes. Meanwhile
    n-0 is suspended and resumed, or n-1 migrated to a third node."""
    need("qemu-img")
    need("fio")
    from helpers.procs import nbdkit

    sock = tmp_path / "e.sock"
    uri = f"nbd+unix:///?socket={sock}"
    src = random_file(tmp_path / "src", 48 * MiB)
    with (
        nbdkit("memory", "64M") as a,
        nbdkit("memory", "64M") as b,
        nbdkit("memory", "64M") as c,
        mounted(tmp_path, [a, b], alg="stripe", extra=["--export", f"unix:{sock}"]) as mnt,
    ):
        qemu = subprocess.Popen(
            ["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        fio = subprocess.Popen(
            [
                "fio",
                "--name=export",
                "--ioengine=nbd",
                f"--uri={uri}",
                "--rw=randwrite",
                "--bs=64k",
                "--iodepth=8",
                "--offset=64M",
                "--size=64M",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
            ],
            cwd=tmp_path,  # fio leaves its verify state file in the working dir
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 60
            while _writes(mnt) == 0 and time.monotonic() < deadline:
                time.sleep(0.01)  # wait for the first write through the export
            assert _writes(mnt) > 0
            # Both are still at work as the node is suspended or migrated.
            assert [p.poll() for p in (qemu, fio)] == [None, None]
            if event == "suspend":
                sh(*DSTFS, "suspend", str(mnt), "n-0")
                assert (mnt / "n-0" / "suspend").read_text() == "1\n"
                sh(*DSTFS, "resume", str(mnt), "n-0")
            else:
                out = sh(*DSTFS, "migrate", str(mnt), "n-1", c).stdout
                assert out.strip().endswith("done")
                assert (mnt / "n-1" / "target").read_text().strip() == c
            _, q_err = qemu.communicate(timeout=120)
            f_out, f_err = fio.communicate(timeout=120)
        finally:
            for p in (qemu, fio):
                if p.poll() is None:
                    p.kill()
                    p.wait()
        assert qemu.returncode == 0, q_err
        assert fio.returncode == 0, f_out + f_err
        assert "verify" not in f_err
        sh("cmp", "-n", str(48 * MiB), str(src), str(mnt / "disk.img"))
        out = tmp_path / "out"
        sh("nbdcopy", uri, str(out))  # the export reads what disk.img reads
        sh("cmp", str(out), str(mnt / "disk.img"))


def test_status_json_and_metrics_parse_through_fuse_and_the_socket(tmp_path: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    state = tmp_path / "st"
    with mounted(tmp_path, node_files(tmp_path, 2, 8 * MiB), alg="mirror", state=state) as mnt:
        with open(mnt / "disk.img", "r+b") as f:
            f.write(b"x" * 65536)
            os.fsync(f.fileno())
        outputs = []
        for where in ([str(mnt)], ["--state", str(state)]):
            text = sh(*DSTFS, "status", *where, "--json").stdout
            check = subprocess.run(
                ["python3", "-m", "json.tool"], input=text, capture_output=True, text=True
            )
            assert check.returncode == 0, check.stderr
            outputs.append(json.loads(text))
        via_fuse, via_socket = outputs
        for doc in outputs:
            assert doc["name"] == "storage" and doc["alg"] == "alg_mirror"
            assert doc["size"] == 8 * MiB // 512
            assert doc["degraded"] == 0 and doc["sync_completed"] == "none"
            assert doc["stats"]["writes"] >= 1 and doc["stats"]["write_bytes"] >= 65536
            assert set(doc) >= {"n-0", "n-1", "jobs", "mismatch_cnt", "nodes"}
            assert "add_node" not in doc and "metrics" not in doc  # write-only / own format
            node = doc["n-0"]
            assert node["state"] == "in_sync" and node["dirty"] == 0
            assert node["timeout"] == 30 and node["suspend"] == 0
            assert isinstance(node["stats"]["latency_avg_us"], float)
            assert node["stats"]["writes"] >= 1
        assert via_fuse["n-1"]["type"] == via_socket["n-1"]["type"]

        sh(*DSTFS, "suspend", str(mnt), "n-1")
        families = {
            f.name: f for f in text_string_to_metric_families((mnt / "metrics").read_text())
        }
        via_socket_metrics = _ask(state / "control.sock", "read metrics")[0]
        assert via_socket_metrics.startswith(b"ok ")
        sh(*DSTFS, "resume", str(mnt), "n-1")

        def sample(family: str, **labels: str) -> float:
            return next(
                s.value
                for s in families[family].samples
                if all(s.labels.get(k) == v for k, v in labels.items())
                and not s.name.endswith("_created")
            )

        assert families["dstfs_array_writes"].type == "counter"
        assert sample("dstfs_array_writes", array="storage") >= 1
        assert sample("dstfs_array_write_bytes", array="storage") >= 65536
        assert sample("dstfs_node_writes", node="n-0") >= 1
        assert families["dstfs_node_latency_seconds"].type == "summary"
        assert sample("dstfs_node_latency_seconds", node="n-0") > 0
        assert sample("dstfs_node_state", node="n-0", state="in_sync") == 1
        assert sample("dstfs_node_state", node="n-1", state="suspended") == 1
        assert sample("dstfs_node_state", node="n-1", state="in_sync") == 0
        assert sample("dstfs_mirror_degraded", array="storage") == 1
        assert sample("dstfs_node_dirty_regions", node="n-0") == 0
        assert sample("dstfs_mirror_sync_action", action="idle") == 1
        assert "dstfs_mirror_sync_done_sectors" in families


def test_status_watch_repeats_plain_blocks_when_not_a_tty_and_stops_on_ctrl_c(
    tmp_path: Path,
) -> None:
    with mounted(tmp_path, node_files(tmp_path, 1, 8 * MiB)) as mnt:
        proc = subprocess.Popen(
            [*DSTFS, "status", str(mnt), "--watch", "--interval", "0.1"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            # A suite started in the background (`cmd &` without job control)
            # inherits SIGINT ignored, and Python then keeps it ignored.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        try:
            assert proc.stdout is not None
            blocks = 0
            deadline = time.monotonic() + 30
            while blocks < 3 and time.monotonic() < deadline:
                line = proc.stdout.readline()
                assert line, proc.stderr.read() if proc.stderr else ""
                blocks += line.startswith("array  storage")
                assert "\x1b" not in line  # no terminal control codes in a pipe
            assert blocks == 3
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=30) == 130
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_the_example_systemd_unit_is_valid_and_its_commands_parse(tmp_path: Path) -> None:
    import shlex
    import sys

    from dstfs.cli import build_parser

    unit = (Path(__file__).parent.parent / "examples" / "dstfs@.service").read_text()
    lines = dict(
        line.split("=", 1)
        for line in unit.splitlines()
        if line.startswith(("ExecStart=", "ExecStop="))
    )
    for key, want in (("ExecStart", "mount"), ("ExecStop", "umount")):
        argv = shlex.split(lines[key].replace("%i", "vm1").replace("$DSTFS_OPTS", ""))
        assert argv[0] == "/usr/local/bin/dstfs"
        args = build_parser().parse_args(argv[1:])
        assert args.command == want
    assert "--state /var/lib/dstfs/%i" in lines["ExecStart"]
    if need("systemd-analyze"):
        # Verified with the dstfs of this venv in place of /usr/local/bin/dstfs.
        exe = str(Path(sys.executable).parent / "dstfs")
        path = tmp_path / "dstfs@vm1.service"
        path.write_text(unit.replace("/usr/local/bin/dstfs", exe))
        res = subprocess.run(
            ["systemd-analyze", "verify", "--man=no", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert res.returncode == 0 and "dstfs@vm1" not in res.stderr, res.stderr


def test_an_export_address_in_use_or_a_file_fails_the_mount_and_is_left_alone(
    tmp_path: Path,
) -> None:
    from helpers.mounts import MountFailed

    def mount_exporting(addr: str, says: str) -> None:
        nodes = node_files(tmp_path, 1, MiB)
        with (
            pytest.raises(MountFailed, match=says),
            mounted(tmp_path, nodes, extra=["--export", addr]),
        ):
            pass

    victim = tmp_path / "precious"
    victim.write_text("keep me")
    mount_exporting(f"unix:{victim}", "exists and is not a socket")
    assert victim.read_text() == "keep me"
    live = tmp_path / "live.sock"
    with socket.socket(socket.AF_UNIX) as other, socket.socket() as tcp:
        other.bind(str(live))
        other.listen(1)
        mount_exporting(f"unix:{live}", "already listens")
        assert live.is_socket()
        tcp.bind(("127.0.0.1", 0))
        tcp.listen(1)
        mount_exporting(f"127.0.0.1:{tcp.getsockname()[1]}", "cannot export: .*in use")


def test_status_for_scripts_keeps_names_as_text_and_stops_quietly_on_a_closed_pipe(
    tmp_path: Path,
) -> None:
    """`status --json` gave an array named 007 as the number 7 (1.50 as
    1.5); `dstfs status | head -1` ended in a BrokenPipeError traceback."""
    state, sock = tmp_path / "st", tmp_path / "e.sock"
    nodes = node_files(tmp_path, 1, 8 * MiB)
    with no_fuse(state, nodes, [f"unix:{sock}"], extra=["--name", "007"]) as res:
        assert res.returncode == 0, res.stderr
        doc = json.loads(sh(*DSTFS, "status", "--state", str(state), "--json").stdout)
        assert doc["name"] == "007" and doc["size"] == 8 * MiB // 512
        assert doc["n-0"]["target"] == f"file://{nodes[0]}" and doc["n-0"]["timeout"] == 30
        for args in (["--json"], []):
            # A reader that is gone before anything is written (`| head`
            # that has seen enough): EPIPE on the first write.
            r, w = os.pipe()
            os.close(r)
            with os.fdopen(w, "wb") as gone:
                res = subprocess.run(
                    [*DSTFS, "status", "--state", str(state), *args],
                    stdout=gone,
                    stderr=subprocess.PIPE,
                    text=True,
                    timeout=60,
                )
            assert res.stderr == "" and res.returncode == 141  # as a tool SIGPIPE ends


def test_an_array_with_a_long_name_is_still_reachable_over_nbd(tmp_path: Path) -> None:
    """The export's description is "dstfs NAME": for a name of 4200 bytes it
    went over the spec's 4096, and nbdinfo (libnbd) dropped the server."""
    need("nbdinfo")
    state, sock = tmp_path / "st", tmp_path / "e.sock"
    name = "\u00e9" * 2100
    nodes = node_files(tmp_path, 1, 8 * MiB)
    with no_fuse(state, nodes, [f"unix:{sock}"], extra=["--name", name]) as res:
        assert res.returncode == 0, res.stderr
        uri = f"nbd+unix:///?socket={sock}"
        (export,) = json.loads(sh("nbdinfo", "--json", uri).stdout)["exports"]
        assert export["export-size"] == 8 * MiB
        assert f"dstfs {name}".startswith(export["description"].removesuffix("..."))
        assert len(export["description"].encode()) <= 256
        (listed,) = json.loads(sh("nbdinfo", "--list", "--json", uri).stdout)["exports"]
        assert listed["export-name"] == "" and listed["description"] == export["description"]


def _allocated(path: str, offset: int, length: int) -> bool:
    """Whether [offset, offset+length) of `path` is all data, no hole."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, offset, os.SEEK_DATA) == offset and (
            os.lseek(fd, offset, os.SEEK_HOLE) >= offset + length
        )
    except OSError:  # ENXIO: nothing but a hole from there
        return False
    finally:
        os.close(fd)


@pytest.mark.parametrize("alg", ["linear", "mirror"])
def test_write_zeroes_with_no_hole_through_the_export_leaves_the_nodes_allocated(
    tmp_path: Path, alg: str
) -> None:
    """NO_HOLE: the range MUST stay provisioned (the spec). The export
    dropped the flag, and the file nodes punched holes."""
    need("qemu-io")
    state, sock = tmp_path / "st", tmp_path / "e.sock"
    nodes = node_files(tmp_path, 2, 8 * MiB)
    with no_fuse(state, nodes, [f"unix:{sock}"], extra=["--alg", alg]) as res:
        assert res.returncode == 0, res.stderr
        uri = f"nbd+unix:///?socket={sock}"
        # qemu sends WRITE_ZEROES with NO_HOLE unless told it may unmap (-u).
        sh("qemu-io", "-f", "raw", uri, "-c", "write -P 7 0 4M", "-c", "write -z 0 1M")
        sh("qemu-io", "-f", "raw", uri, "-c", "write -z -u 2M 1M", "-c", "read -P 0 0 1M")
        sh("qemu-io", "-f", "raw", uri, "-c", "read -P 0 2M 1M", "-c", "read -P 7 1M 1M")
        sh(*DSTFS, "umount", "--state", str(state))  # flushed, files final
    written = nodes if alg == "mirror" else nodes[:1]
    for node in written:
        assert _allocated(node, 0, MiB), f"NO_HOLE zeroes punched in {node}"
        assert not _allocated(node, 2 * MiB, MiB), f"zeroes that may trim were not in {node}"
        with open(node, "rb") as f:
            assert f.read(MiB) == bytes(MiB)
