"""Load for the suspend, migration and failover tests, and its verification.

- `RangeWriter`: a thread that loops over one byte range of a disk (disk.img
  or a loop device over it) with O_DIRECT (page-aligned mmap buffers, so
  every pwrite/pread is one request and its error is that request's),
  writing 64 KiB blocks whose bytes name their offset and generation, and
  reading each back at once (also after a failed write). Every operation is
  recorded with its start and end time and errno, so a test can ask "how
  many writes completed on this range between t0 and t1" and "which errors
  did this range see". `expected` remembers, per block, the last
  acknowledged generation and the generations whose write failed since (a
  failed write may or may not have landed); `verify_blocks` accepts exactly
  those.
- `FileWriter`: a thread writing files of random bytes into a mounted
  filesystem (fsync each), remembering their sha256; `verify_files` checks
  them.
- `writing(...)`: start writers, and always stop them.
- `watchdog(mnt, seconds)`: abort the array's FUSE connection if the block
  is still running after `seconds`, so a hung daemon fails the test (every
  waiter gets ENOTCONN) instead of hanging it.
- Small helpers for control files: `ctl`, `ctl_write` (returns 0 or the
  errno), `stats`, `wait_for`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import mmap
import os
import random
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from helpers.mounts import abort_fuse

BLOCK = 64 * 1024
MAGIC = b"dstfsBLK"
_HEAD = struct.Struct("<8sQQ")


def pattern(offset: int, gen: int, block: int = BLOCK) -> bytes:
    """The bytes of the block at `offset` written in generation `gen`."""
    unit = _HEAD.pack(MAGIC, offset, gen) + b"\xa5" * 8
    return unit * (block // len(unit))


def gen_of(data: bytes | memoryview, offset: int) -> int | None:
    """The generation a block read back carries: 0 for zeros, None for garbage."""
    data = bytes(data)  # iterating an mmap gives 1-byte bytes, all true
    magic, off, gen = _HEAD.unpack_from(data, 0)
    if magic == MAGIC and off == offset and data == pattern(offset, gen, len(data)):
        return gen
    if not any(data):
        return 0
    return None


def describe(data: bytes | memoryview) -> str:
    """What a block that is not one whole pattern holds, 4 KiB page by page."""
    pages = []
    for pos in range(0, len(data), 4096):
        page = bytes(data[pos : pos + 4096])
        magic, off, gen = _HEAD.unpack_from(page, 0)
        if magic == MAGIC:
            pages.append(f"{off + 0}:{gen}" if page == pattern(off, gen, 4096) else "torn")
        else:
            pages.append("0" if not any(page) else "?")
    return "pages [" + " ".join(pages) + "]"


@dataclass
class Op:
    kind: str  # "w" or "r"
    offset: int
    gen: int
    t0: float
    t1: float
    err: int = 0


@dataclass
class Expected:
    ok: int = 0  # last acknowledged generation (0: never written)
    maybe: set[int] = field(default_factory=set)  # failed writes since then


class RangeWriter(threading.Thread):
    """Write (and read back) blocks in [start, start+length) of `disk` until stopped."""

    def __init__(
        self, disk: Path, start: int, length: int, name: str, readback: bool = True
    ) -> None:
        super().__init__(name=f"writer-{name}", daemon=True)
        self.disk, self.start_off, self.nblocks = disk, start, length // BLOCK
        self.label = name
        self.readback = readback
        self.ops: list[Op] = []
        self.bad: list[str] = []  # read back something other than just written
        self.expected: dict[int, Expected] = {}
        self.stop_event = threading.Event()
        self.crashed: BaseException | None = None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as e:  # reported by stop()
            self.crashed = e

    def _run(self) -> None:
        fd = os.open(self.disk, os.O_RDWR | os.O_DIRECT)
        wbuf, rbuf = mmap.mmap(-1, BLOCK), mmap.mmap(-1, BLOCK)
        try:
            i = 0
            while not self.stop_event.is_set():
                off = self.start_off + (i % self.nblocks) * BLOCK
                i += 1
                gen = i
                wbuf[:] = pattern(off, gen)
                exp = self.expected.setdefault(off, Expected())
                t0 = time.monotonic()
                try:
                    os.pwrite(fd, wbuf, off)
                except OSError as e:
                    self.ops.append(Op("w", off, gen, t0, time.monotonic(), e.errno or -1))
                    exp.maybe.add(gen)
                    written = False
                else:
                    self.ops.append(Op("w", off, gen, t0, time.monotonic()))
                    exp.ok, exp.maybe = gen, set()
                    written = True
                if self.readback:
                    t0 = time.monotonic()
                    try:
                        os.preadv(fd, [rbuf], off)
                    except OSError as e:
                        self.ops.append(Op("r", off, gen, t0, time.monotonic(), e.errno or -1))
                        written = False
                    else:
                        self.ops.append(Op("r", off, gen, t0, time.monotonic()))
                        if written and rbuf[:] != wbuf[:]:
                            self.bad.append(f"{self.label}: block {off}: {describe(rbuf)}")
                if not written:
                    time.sleep(0.05)  # failing at once: do not spin
        finally:
            os.close(fd)
            wbuf.close()
            rbuf.close()

    # -- what happened

    def writes(self, since: float = 0.0, until: float = float("inf"), ok: bool = True) -> int:
        """Writes that ended in [since, until): successful ones, or failed ones."""
        return sum(
            1
            for op in list(self.ops)
            if op.kind == "w" and (op.err == 0) == ok and since <= op.t1 < until
        )

    def errors(self, since: float = 0.0, until: float = float("inf")) -> list[Op]:
        return [op for op in list(self.ops) if op.err and since <= op.t1 < until]

    def wait_writes(self, n: int, since: float = 0.0, timeout: float = 60.0) -> None:
        """Wait until `n` writes succeeded after `since`."""
        wait_for(lambda: self.writes(since) >= n, f"{n} writes on {self.label}", timeout)

    def stop(self, timeout: float = 20.0) -> None:
        self.stop_event.set()
        self.join(timeout)
        if self.is_alive():
            raise AssertionError(f"{self.name} still stuck in I/O after {timeout}s")
        if self.crashed is not None:
            raise AssertionError(f"{self.name} crashed: {self.crashed!r}")


class FileWriter(threading.Thread):
    """Write files of random bytes under `root` (fsync each), keeping at most
    `keep` of them (the oldest are deleted), until stopped."""

    def __init__(self, root: Path, keep: int = 40, seed: int = 1) -> None:
        super().__init__(name="file-writer", daemon=True)
        self.root = root
        self.keep = keep
        self.rng = random.Random(seed)
        self.files: dict[str, str] = {}  # name -> sha256 of its content
        self.count = 0
        self.errors: list[str] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        order: list[str] = []
        try:
            while not self.stop_event.is_set():
                name = f"f{self.count:05d}"
                data = self.rng.randbytes(self.rng.randrange(16, 257) * 4096)
                with open(self.root / name, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                self.files[name] = hashlib.sha256(data).hexdigest()
                order.append(name)
                self.count += 1
                if len(order) > self.keep:
                    old = order.pop(0)
                    (self.root / old).unlink()
                    del self.files[old]
        except OSError as e:
            self.errors.append(f"after {self.count} files: {e}")

    def stop(self, timeout: float = 30.0) -> None:
        self.stop_event.set()
        self.join(timeout)
        if self.is_alive():
            raise AssertionError(f"{self.name} still stuck in I/O after {timeout}s")
        dfd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def verify_files(root: Path, files: dict[str, str]) -> list[str]:
    """Files under `root` whose content is not the recorded sha256."""
    bad = []
    for name, digest in sorted(files.items()):
        try:
            got = hashlib.sha256((root / name).read_bytes()).hexdigest()
        except OSError as e:
            bad.append(f"{name}: {e}")
            continue
        if got != digest:
            bad.append(f"{name}: sha256 {got[:12]}, wrote {digest[:12]}")
    return bad


def verify_blocks(disk: Path, writers: Sequence[RangeWriter]) -> list[str]:
    """Read every block the writers touched (O_DIRECT); what does not match."""
    bad: list[str] = []
    fd = os.open(disk, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, BLOCK)
    try:
        for w in writers:
            bad += w.bad
            for off, exp in sorted(w.expected.items()):
                os.preadv(fd, [buf], off)
                gen = gen_of(buf, off)
                if gen != exp.ok and gen not in exp.maybe:
                    got = describe(buf) if gen is None else f"generation {gen}"
                    bad.append(f"{w.label}: block {off}: {got}; wrote {exp.ok}")
    finally:
        os.close(fd)
        buf.close()
    return bad


@contextlib.contextmanager
def writing(*writers: threading.Thread) -> Iterator[None]:
    """Run the writers for the block; always stop them (errors after the block's own)."""
    for w in writers:
        w.start()
    try:
        yield
    except BaseException:
        for w in writers:
            w.stop_event.set()  # type: ignore[attr-defined]
        for w in writers:
            w.join(5)
        raise
    for w in writers:
        w.stop()  # type: ignore[attr-defined]


@contextlib.contextmanager
def watchdog(mnt: Path, seconds: float) -> Iterator[None]:
    done = threading.Event()
    fired: list[float] = []

    def guard() -> None:
        if not done.wait(seconds):
            fired.append(time.monotonic())
            abort_fuse(mnt)

    thread = threading.Thread(target=guard, name="watchdog", daemon=True)
    thread.start()
    try:
        yield
    except BaseException as e:
        if fired:
            e.add_note(f"watchdog: aborted the FUSE connection of {mnt} after {seconds}s")
        raise
    finally:
        done.set()
        thread.join()
    if fired:
        raise AssertionError(f"watchdog: aborted the FUSE connection of {mnt} after {seconds}s")


# -- control files


def ctl(mnt: Path, *parts: str) -> str:
    return Path(mnt, *parts).read_text().rstrip("\n")


def ctl_write(mnt: Path, *parts: str, value: str) -> int:
    """Write `value` to a control file: 0, or the errno the write got."""
    fd = os.open(Path(mnt, *parts), os.O_WRONLY)
    try:
        os.write(fd, value.encode() + b"\n")
    except OSError as e:
        return e.errno or errno.EIO
    finally:
        os.close(fd)
    return 0


def stats(mnt: Path, node: str) -> dict[str, float]:
    return {k: float(v) for k, v in (ln.split() for ln in ctl(mnt, node, "stats").splitlines())}


def wait_for(cond: Callable[[], object], what: str, timeout: float = 60.0, step: float = 0.02):
    """Poll `cond` until it is true; its value, or AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} after {timeout}s")
        time.sleep(step)


def wait_state(mnt: Path, node: str, state: str, timeout: float = 60.0) -> None:
    wait_for(lambda: ctl(mnt, node, "state") == state, f"{node} {state}", timeout)


# -- failover scenarios (shared by test_failover and test_netns_failover)


def outage_within_timeout(
    mnt: Path,
    node: str,
    writers: Sequence[RangeWriter],
    down: Callable[[], None],
    up: Callable[[], None],
    noticed: bool = True,
    outage: float = 0.0,
    timeout: int = 300,
) -> set[str]:
    """Take `node` away under load and bring it back, within its timeout
    (set to `timeout` s for the outage, far beyond what a busy machine
    needs, and restored after): no writer may see an error, and every
    writer must complete writes afterwards. The outage lasts until the node
    shows `reconnecting` (with `noticed`; a cut link may only be noticed
    seconds later) and at least `outage` s (more only makes it longer).
    Returns the states `node` showed meanwhile."""
    before = ctl(mnt, node, "timeout")
    assert ctl_write(mnt, node, "timeout", value=str(timeout)) == 0
    for w in writers:
        w.wait_writes(20, timeout=60)
    states: set[str] = set()

    def away() -> bool:
        states.add(ctl(mnt, node, "state"))
        return (not noticed or "reconnecting" in states) and time.monotonic() >= t_down + outage

    down()
    t_down = time.monotonic()
    try:
        wait_for(away, f"{node} reconnecting", 60, step=0.05)
    finally:
        up()
    wait_state(mnt, node, "online", 60)
    t_up = time.monotonic()
    for w in writers:
        w.wait_writes(20, since=t_up, timeout=60)
    for w in writers:
        assert not w.errors(), f"{w.label}: {w.errors()[:3]}"
    assert ctl_write(mnt, node, "timeout", value=before) == 0
    return states


def outage_past_timeout(
    mnt: Path,
    node: str,
    lost: RangeWriter,
    others: Sequence[RangeWriter],
    down: Callable[[], None],
    up: Callable[[], None],
    timeout: int,
    hold: int = 20,
) -> None:
    """Set `node`'s timeout, take it away until it is `failed`, and hold it
    down until its range has got EIO for reads and writes and each other
    range has completed `hold` writes since: the lost range gets EIO and
    nothing else, the other ranges go on. Bring it back: `online` again and
    its range works again."""
    assert ctl_write(mnt, node, "timeout", value=str(timeout)) == 0
    assert ctl(mnt, node, "timeout") == str(timeout)
    failures = stats(mnt, node)["failures"]
    for w in (lost, *others):
        w.wait_writes(20, timeout=60)
    t_down = time.monotonic()
    down()
    try:
        wait_state(mnt, node, "failed", timeout + 60)
        t_failed = time.monotonic()

        def held() -> bool:
            kinds = {op.kind for op in lost.errors(t_failed)}
            return kinds == {"w", "r"} and all(w.writes(t_failed) >= hold for w in others)

        wait_for(held, f"EIO on {lost.label} and {hold} writes on the others", 60)
        t_hold = time.monotonic()
    finally:
        up()
    print(f"{node}: failed {t_failed - t_down:.1f} s after it went away")
    eio = lost.errors(t_failed, t_hold)
    assert {op.kind for op in eio} == {"w", "r"}, f"{lost.label}: {eio[:3]} while failed"
    assert lost.writes(t_failed, t_hold) == 0
    for w in others:
        assert w.writes(t_failed, t_hold) >= hold, f"{w.label} stalled while {node} was failed"
    wait_state(mnt, node, "online", 60)
    t_up = time.monotonic()
    print(f"{node}: online {t_up - t_hold:.1f} s after it came back")
    lost.wait_writes(20, since=t_up, timeout=60)
    assert stats(mnt, node)["failures"] >= failures + 1
    errs = lost.errors()
    assert {op.err for op in errs} == {errno.EIO}, errs[:3]
    assert all(op.t1 >= t_down and op.t0 <= t_up for op in errs), errs[:3]  # while away
    for w in others:
        assert not w.errors(), f"{w.label}: {w.errors()[:3]}"
