"""Real dstfs mounts for tests, always torn down.

`mounted()` runs `dstfs mount` and yields the mount dir. On exit, whatever
happened, it unmounts every filesystem mounted from a loop device over that
disk.img, detaches those loop devices, runs `dstfs umount`, and if that fails
lazily unmounts with `fusermount3 -u -z` and aborts the FUSE connection.

Teardown never stats the mount point (a hung daemon would hang us too): the
loop devices come from /sys/block/loop*/loop/backing_file (what `losetup -j`
shows, without a stat of disk.img), the FUSE connection from the major:minor
in /proc/self/mountinfo.

While `dstfs mount` runs, this process is a child subreaper, so the daemon it
leaves behind becomes our child, and a thread waits for it and reaps it the
moment it exits: otherwise it stays a zombie until PID 1 reaps it (here about
1.5 s later), and `dstfs umount`, which waits for the daemon's pid to
disappear, waits for that too.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from helpers.procs import DSTFS, need

PR_SET_CHILD_SUBREAPER = 36
FUSECTL = Path("/sys/fs/fuse/connections")
_libc = ctypes.CDLL(None, use_errno=True)


class MountFailed(AssertionError):
    def __init__(self, res: subprocess.CompletedProcess) -> None:
        super().__init__(f"dstfs mount failed ({res.returncode}): {res.stderr.strip()}")
        self.result = res


def _unescape(field: str) -> str:
    """Undo mountinfo's octal escapes (\\040 for a space...)."""
    return field.encode().decode("unicode_escape")


def mountinfo() -> list[tuple[str, str, str, str]]:
    """(major:minor, mount point, fs type, source) of every mount."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        f, r = left.split(), right.split()
        out.append((f[2], _unescape(f[4]), r[0], _unescape(r[1])))
    return out


def is_mounted(path: str | Path) -> bool:
    """Whether something is mounted on `path` (from mountinfo, no stat)."""
    return any(mp == str(path) for _, mp, _, _ in mountinfo())


def loops_over(path: str | Path) -> list[str]:
    """/dev/loopN devices whose backing file is `path`."""
    devs = []
    for bf in Path("/sys/block").glob("loop*/loop/backing_file"):
        with contextlib.suppress(OSError):
            name = bf.read_text().rstrip("\n").removesuffix(" (deleted)")
            if name == str(path):
                devs.append(f"/dev/{bf.parent.parent.name}")
    return devs


def _run(argv: Sequence[str], timeout: float = 30.0) -> subprocess.CompletedProcess | None:
    """Run `argv`; None if it takes longer than `timeout`. Then it is killed
    but not waited for: stuck on a hung FUSE mount it may be in D state
    (unkillable) until the connection is aborted."""
    proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        for pipe in (proc.stdout, proc.stderr):
            with contextlib.suppress(OSError):
                pipe.close()  # type: ignore[union-attr]
        return None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _subreaper(on: bool) -> None:
    _libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0)


def _wait_for(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def adopt(pid: int | None) -> None:
    """Reap daemon `pid` as soon as it exits, if it is our child."""
    try:
        ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return
    if ppid == os.getpid():
        threading.Thread(target=_wait_for, args=(pid,), daemon=True).start()


def is_daemon_of(pid: int, mnt: Path) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"dstfs" in cmdline and str(mnt).encode() in cmdline


def _registry(mnt: Path) -> Path:
    """dstfs.registry.registry_path without its realpath(), which would stat
    the mount point."""
    from dstfs.registry import runtime_dir

    return runtime_dir() / (str(mnt).strip("/").replace("/", "_") + ".json")


def daemon_pid(mnt: Path) -> int | None:
    """The daemon's pid from its registry file."""
    try:
        return int(json.loads(_registry(mnt).read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return None


def abort_fuse(mnt: Path) -> None:
    """Abort the FUSE connection mounted on `mnt`: the daemon and every
    waiter get ENOTCONN, whatever state the daemon is in."""
    minors = [d.split(":")[1] for d, mp, fs, _ in mountinfo() if mp == str(mnt) and "fuse" in fs]
    if not minors:
        return
    if not any(FUSECTL.iterdir()):
        _run(["mount", "-t", "fusectl", "none", str(FUSECTL)])
    for minor in minors:
        with contextlib.suppress(OSError):
            (FUSECTL / minor / "abort").write_text("1")


def _unstack(mnt: Path, patience: float) -> bool:
    """Unmount what sits on loop devices over mnt/disk.img and detach them;
    False if a step timed out (the daemon may be hung)."""
    ok = True
    for dev in loops_over(mnt / "disk.img"):
        for _, mp, _, source in mountinfo():
            if source == dev and _run(["umount", mp], patience) is None:
                ok = False
                _run(["umount", "-l", mp], patience)
        if _run(["losetup", "-d", dev], patience) is None:
            ok = False
    return ok


def teardown(mnt: Path, pid: int | None = None, patience: float = 20.0) -> None:
    """Unmount what sits on the array at `mnt`, then the array itself. If a
    step hangs or fails, abort the FUSE connection (every request then
    fails at once), clear up again, and unmount lazily."""
    ok = _unstack(mnt, patience)
    if ok and is_mounted(mnt):
        res = _run([*DSTFS, "umount", str(mnt)], patience)
        ok = res is not None and res.returncode == 0
    if not ok or is_mounted(mnt):
        abort_fuse(mnt)
        _unstack(mnt, patience)
        _run(["fusermount3", "-u", "-z", str(mnt)], patience)
        deadline = time.monotonic() + patience  # a stuck umount of ext4 ends now
        while loops_over(mnt / "disk.img") and time.monotonic() < deadline:
            _unstack(mnt, patience)
            time.sleep(0.1)
    if pid is not None:
        deadline = time.monotonic() + (30 if ok else 1)
        while is_daemon_of(pid, mnt) and time.monotonic() < deadline:
            time.sleep(0.02)
        if is_daemon_of(pid, mnt):
            os.kill(pid, 9)
            _registry(mnt).unlink(missing_ok=True)  # the daemon cannot now


def new_dir(base: Path, stem: str) -> Path:
    """A fresh directory `base/stem`, or `stem-1`, `stem-2`... if taken."""
    path, i = base / stem, 0
    while path.exists():
        i += 1
        path = base / f"{stem}-{i}"
    path.mkdir(parents=True)
    return path


def mount_cmd(
    mnt: Path,
    state: Path,
    nodes: Sequence[str] = (),
    alg: str | None = None,
    name: str | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    argv = [*DSTFS, "mount", str(mnt), "--state", str(state)]
    if alg:
        argv += ["--alg", alg]
    if name:
        argv += ["--name", name]
    for n in nodes:
        argv += ["--node", n]
    return argv + list(extra)


@contextlib.contextmanager
def mounted(
    tmp_path: Path,
    nodes: Sequence[str] = (),
    alg: str | None = None,
    state: Path | None = None,
    name: str | None = None,
    extra: Sequence[str] = (),
    mnt: Path | None = None,
) -> Iterator[Path]:
    """`dstfs mount` an array under `tmp_path`; yields the mount dir. Raises
    MountFailed (with the CLI's result) if the mount fails."""
    need("fusermount3")
    mnt = (mnt or new_dir(tmp_path, "mnt")).resolve()
    state = state or tmp_path / f"state-{mnt.name}"
    argv = mount_cmd(mnt, state, nodes, alg, name, extra)
    pid = None
    try:
        _subreaper(True)
        try:
            res = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        finally:
            _subreaper(False)
        pid = daemon_pid(mnt)
        adopt(pid)
        if res.returncode != 0:
            raise MountFailed(res)
        yield mnt
    finally:
        teardown(mnt, pid or daemon_pid(mnt))


@contextlib.contextmanager
def loop(path: str | Path) -> Iterator[str]:
    """A loop device over `path` with direct I/O; detached afterwards (if
    that hangs on a hung daemon, `mounted()`'s teardown finishes the job)."""
    res = subprocess.run(
        ["losetup", "-f", "--show", "--direct-io=on", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    dev = res.stdout.strip()
    try:
        yield dev
    finally:
        _run(["losetup", "-d", dev])


@contextlib.contextmanager
def ext4(dev: str, where: Path) -> Iterator[Path]:
    """Mount the filesystem on `dev` at `where` (created); unmounted afterwards."""
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", dev, str(where)], capture_output=True, text=True, check=True)
    try:
        yield where
    finally:
        if _run(["umount", str(where)]) is None:
            _run(["umount", "-l", str(where)])
