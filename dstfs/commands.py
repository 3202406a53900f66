"""Array commands of the CLI: mount, umount, status, suspend, resume,
migrate, target. Everything but mount works through the control files of
a mounted array, exactly as a user with `cat` and `echo` would.

Rules:
- A failure raises CliError: one line for the user, exit status 1.
  `dstfs.cli` builds the parser and prints it; this module never imports
  `dstfs.cli` (no import cycle).
- A mount point is recognised from /proc/self/mountinfo, not by statting
  it: a dstfs mount whose daemon died answers every stat with ENOTCONN.
  `status` says so, `umount` cleans it up, `mount` refuses it with the way
  out (README "Recovery after the daemon died"): cleaning it up silently
  would hide that the filesystem on top needs e2fsck.
- `mount` locks the state dir (`dstfs.statelock`) before it reads or
  creates anything there, and the daemon holds that lock while it runs.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import attrs
import trio

from dstfs import mountinfo, registry, state, statelock
from dstfs.algorithms import make_algorithm
from dstfs.defaults import default_config
from dstfs.export import ExportOptions, parse_export_address
from dstfs.uri import parse_node, parse_size

log = logging.getLogger(__name__)

RECOVERY = 'README "Recovery after the daemon died"'


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


def _alg_name(text: str) -> str:
    return text if text.startswith("alg_") else f"alg_{text}"


def _resolve_config(args: argparse.Namespace, state_dir: Path) -> state.ArrayConfig:
    """What to mount: the state dir's array, or a new one from the flags."""
    try:
        saved = state.load(state_dir)
    except ValueError as e:
        raise CliError(str(e)) from None
    except OSError as e:
        raise CliError(f"{state_dir}: {e.strerror}") from None
    alg = _alg_name(args.alg) if args.alg else None
    options = {"chunk": parse_size(args.chunk)} if args.chunk else {}
    if args.region:
        options["region"] = parse_size(args.region)
    if saved is not None:
        if args.node:
            wanted = [parse_node(n).to_text() for n in args.node]
            have = [e.uri for e in saved.nodes]
            if wanted != have:
                raise CliError(
                    f"{state_dir} already holds array {saved.name!r} with other nodes; "
                    "mount it without --node, or choose another --state"
                )
        if alg and alg != saved.alg:
            raise CliError(f"{state_dir} holds a {saved.alg} array, not {alg}")
        if args.name and args.name != saved.name:
            raise CliError(f"{state_dir} holds array {saved.name!r}, not {args.name!r}")
        if options and options != saved.options:
            raise CliError(
                f"{state_dir} holds a {saved.alg} array {saved.options or ''}; "
                "--chunk/--region cannot change it"
            )
        if args.force_replica is not None and saved.alg != "alg_mirror":
            raise CliError("--force-replica applies only to a mirror")
        return saved
    name = args.name or "storage"
    alg = alg or "alg_linear"
    if args.chunk and alg != "alg_stripe":
        raise CliError("--chunk applies only to --alg stripe")
    if args.region and alg != "alg_mirror":
        raise CliError("--region applies only to --alg mirror")
    if args.force_replica is not None:
        raise CliError("--force-replica applies only to a mirror saved in the state dir")
    if alg == "alg_mirror" and args.node and len(args.node) < 2:
        raise CliError("a mirror needs at least two --node")
    try:  # the algorithm fills in its defaults (a stripe's chunk)
        options = make_algorithm(alg, [], **options).options()
    except (ValueError, TypeError) as e:
        raise CliError(str(e)) from None
    if not args.node:
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
            return _first_generation(default_config(name, state_dir, alg, options))
        except OSError as e:
            raise CliError(f"{state_dir}: {e.strerror}") from None
    try:
        entries = tuple(state.NodeEntry(uri=parse_node(n).to_text()) for n in args.node)
    except ValueError as e:
        raise CliError(str(e)) from None
    return _first_generation(state.ArrayConfig(name=name, alg=alg, options=options, nodes=entries))


def _first_generation(config: state.ArrayConfig) -> state.ArrayConfig:
    """A new mirror: its first replica is the one the others are synced
    from (md's initial resync); holes and zeroes are not sent."""
    if config.alg != "alg_mirror" or not config.nodes:
        return config
    first = attrs.evolve(config.nodes[0], synced=1)
    return attrs.evolve(config, generation=1, nodes=(first, *config.nodes[1:]))


def _dead(mountpoint: str) -> bool:
    """Whether the FUSE mount on `mountpoint` lost its daemon: the kernel
    answers ENOTCONN. (A live daemon answers the stat at once.)"""
    try:
        os.stat(mountpoint)
    except OSError as e:
        return e.errno == errno.ENOTCONN
    return False


def _daemon_pid(mountpoint: str) -> str:
    reg = registry.read_registry(mountpoint)
    return str(reg.get("pid", "?")) if reg else "?"


def cmd_mount(args: argparse.Namespace) -> int:
    mountpoint = os.path.realpath(args.mountpoint)
    found = mountinfo.mount_at(mountpoint)
    if found is not None:
        if found.is_dstfs and _dead(mountpoint):
            raise CliError(
                f"{mountpoint}: a mount whose daemon died is still there; "
                f"run `dstfs umount {mountpoint}` first ({RECOVERY})"
            )
        raise CliError(f"{mountpoint}: already a mount point ({found.fstype}; busy)")
    if not os.path.isdir(mountpoint):
        raise CliError(f"{mountpoint}: not a directory")
    exports = _export_options(args)
    state_dir = Path(args.state) if args.state else state.default_state_dir(args.name or "storage")
    state_dir = state_dir.absolute()
    real_state = os.path.realpath(state_dir)
    if real_state == mountpoint or real_state.startswith(mountpoint.rstrip("/") + "/"):
        # The daemon would write its state through its own mount: a deadlock.
        raise CliError(f"{state_dir}: the state dir cannot be under the mount point {mountpoint}")
    if args.lock_fd is not None:
        lock_fd = args.lock_fd  # taken by the `dstfs mount` that started us
    else:
        try:
            lock_fd = statelock.acquire(state_dir)
        except statelock.StateDirBusy as e:
            raise CliError(str(e)) from None
        except OSError as e:
            raise CliError(f"{state_dir}: {e.strerror}") from None
    try:
        config = _resolve_config(args, state_dir)
    except ValueError as e:
        raise CliError(str(e)) from None
    if args.foreground or args.ready_fd is not None:
        return _run_daemon(args, mountpoint, config, state_dir, lock_fd, exports)
    return _spawn_daemon(args, mountpoint, state_dir, lock_fd, exports)


def _export_options(args: argparse.Namespace) -> ExportOptions:
    """`--export` addresses (checked before anything starts)."""
    try:
        addrs = [parse_export_address(a, args.export_any_address) for a in args.export or ()]
    except ValueError as e:
        raise CliError(str(e)) from None
    paths = [a.path for a in addrs if a.path is not None]
    if len(set(paths)) < len(paths) or len(set(addrs)) < len(addrs):
        raise CliError("--export: the same address twice")
    return ExportOptions(addresses=tuple(addrs))


def _run_daemon(
    args: argparse.Namespace,
    mountpoint: str,
    config: state.ArrayConfig,
    state_dir: Path,
    lock_fd: int,
    exports: ExportOptions,
) -> int:
    from dstfs import daemon
    from dstfs.malloc import keep_freed_memory

    # Held until this process exits; no child of ours may inherit it.
    os.set_inheritable(lock_fd, False)
    statelock.record(lock_fd, os.getpid(), mountpoint)
    failure: list[str] = []

    def ready(message: str) -> None:
        if message != "ok":
            failure.append(message)
            log.error("%s", message)
        if args.ready_fd is not None:
            try:
                os.write(args.ready_fd, message.encode() + b"\n")
                os.close(args.ready_fd)
            except OSError:
                pass
            args.ready_fd = None

    keep_freed_memory()
    trio.run(
        lambda: daemon.run(
            mountpoint,
            config,
            state_dir,
            ready,
            connections=args.connections,
            force_replica=args.force_replica,
            exports=exports,
        )
    )
    if failure:
        raise CliError(failure[0])
    return 0


def _spawn_daemon(
    args: argparse.Namespace, mountpoint: str, state_dir: Path, lock_fd: int, exports: ExportOptions
) -> int:
    """Start the daemon in the background with the state dir's lock; return
    once it has mounted."""
    logfile = state_dir / "daemon.log"
    try:
        logfile.touch()
    except OSError as e:
        raise CliError(f"{state_dir}: {e.strerror}") from None
    rfd, wfd = os.pipe()
    argv = [sys.executable, "-m", "dstfs"]
    argv += ["-v"] * max(args.verbose, 1)
    argv += ["mount", mountpoint, "--state", str(state_dir), "--ready-fd", str(wfd)]
    argv += ["--lock-fd", str(lock_fd), "--connections", str(args.connections)]
    if args.name:
        argv += ["--name", args.name]
    if args.alg:
        argv += ["--alg", args.alg]
    if args.chunk:
        argv += ["--chunk", args.chunk]
    if args.region:
        argv += ["--region", args.region]
    if args.force_replica is not None:
        argv += ["--force-replica", f"n-{args.force_replica}"]
    for n in args.node or ():
        argv += ["--node", n]
    for a in args.export or ():
        argv += ["--export", a]
    if args.export_any_address:
        argv += ["--export-any-address"]
    with open(logfile, "ab") as log_out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_out,
            stderr=log_out,
            pass_fds=(wfd, lock_fd),
            start_new_session=True,
        )
    os.close(wfd)
    os.close(lock_fd)  # the daemon's copy holds the lock now
    # One line: "ok" or why not; nothing if the daemon died first.
    with os.fdopen(rfd, "rb") as r:
        message = r.readline().strip()
    if message == b"ok":
        _say_mounted(mountpoint, logfile, exports)
        return 0
    proc.wait(10) if proc.poll() is None else None
    if message:
        raise CliError(message.decode(errors="replace"))
    raise CliError(f"the daemon exited with status {proc.returncode}; see {logfile}")


def _say_mounted(mountpoint: str, logfile: Path, exports: ExportOptions) -> None:
    sectors = int(_read(Path(mountpoint, "size")))
    nodes = len(list(Path(mountpoint).glob("n-*")))
    disk = f"{mountpoint}/disk.img"
    sys.stdout.write(
        f"mounted {disk}: {sectors * 512 / 2**30:.2f} GiB, {_read(Path(mountpoint, 'alg'))}, "
        f"{nodes} node(s); log {logfile}\n"
        f"  put a filesystem on it:\n"
        f"    LOOP=$(losetup -f --show --direct-io=on {disk})\n"
        f"    mkfs.ext4 $LOOP && mkdir -p /mnt/data && mount $LOOP /mnt/data\n"
        f"  watch it: dstfs status {mountpoint}; cat {mountpoint}/nodes\n"
        f"  tear down: umount /mnt/data; losetup -d $LOOP; dstfs umount {mountpoint}\n"
    )
    for addr in exports.addresses:
        sys.stdout.write(f"  exported over NBD: {addr.uri()}\n")


def cmd_umount(args: argparse.Namespace) -> int:
    mountpoint = os.path.realpath(args.mountpoint)
    found = mountinfo.mount_at(mountpoint)
    if found is None:
        raise CliError(f"{mountpoint}: not mounted")
    if not found.is_dstfs:
        raise CliError(f"{mountpoint}: not a dstfs mount ({found.fstype})")
    if _dead(mountpoint):
        return _umount_dead(mountpoint, found)
    reg = registry.read_registry(mountpoint)
    res = subprocess.run(["fusermount3", "-u", mountpoint], capture_output=True, text=True)
    if res.returncode != 0:
        detail = res.stderr.strip()
        if "busy" in detail.lower():
            raise CliError(
                f"{mountpoint} is busy: detach loop devices (losetup -d) and close disk.img first"
            )
        raise CliError(f"fusermount3 -u failed: {detail}")
    if reg is not None:
        pid = int(reg["pid"])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.05)
        if _alive(pid):
            raise CliError(f"daemon {pid} did not exit after unmount")
    return 0


def _umount_dead(mountpoint: str, found: mountinfo.Mount) -> int:
    """Clear away a mount whose daemon died: abort its FUSE connection (so
    nothing waits on it), unmount it lazily (a loop device may still hold
    disk.img), forget the daemon."""
    pid = _daemon_pid(mountpoint)
    # Before the unmount: once detached, sysfs names the file "/disk.img".
    held = _loops_over(os.path.join(mountpoint, "disk.img"))
    log.info("%s: daemon %s is dead; aborting FUSE connection %s", mountpoint, pid, found.minor)
    mountinfo.abort_fuse(found)
    res = subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True, text=True)
    if res.returncode != 0 and os.getuid() == 0:
        res = subprocess.run(["umount", "-l", mountpoint], capture_output=True, text=True)
    if res.returncode != 0:
        raise CliError(f"cannot unmount the dead mount {mountpoint}: {res.stderr.strip()}")
    registry.remove_registry(registry.registry_path(mountpoint))
    if held:
        sys.stderr.write(
            f"dstfs umount: {', '.join(held)} still hold the dead disk.img: "
            f"umount what is on them and losetup -d them ({RECOVERY})\n"
        )
    return 0


def _loops_over(path: str) -> list[str]:
    """/dev/loopN devices backed by `path` (from sysfs: no stat of `path`)."""
    devs = []
    for bf in sorted(Path("/sys/block").glob("loop*/loop/backing_file")):
        try:
            name = bf.read_text().rstrip("\n").removesuffix(" (deleted)")
        except OSError:
            continue
        if name == path:
            devs.append(f"/dev/{bf.parent.parent.name}")
    return devs


def _alive(pid: int) -> bool:
    """Running, and not a zombie waiting for a parent to reap it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _control(mountpoint: str, *parts: str) -> Path:
    path = Path(mountpoint, *parts)
    if not Path(mountpoint, "disk.img").exists():
        raise CliError(f"{mountpoint}: no dstfs array mounted there")
    return path


def _read(path: Path) -> str:
    try:
        return path.read_text().rstrip("\n")
    except OSError as e:
        raise CliError(f"{path}: {e.strerror}") from None


def _write(path: Path, value: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError as e:
        raise CliError(f"{path}: {e.strerror}") from None
    try:
        os.write(fd, (value + "\n").encode())
    except OSError as e:
        raise CliError(f"{path} <- {value!r}: {e.strerror} (see the daemon log)") from None
    finally:
        os.close(fd)


def _node_dir(mountpoint: str, node: str) -> str:
    name = node if node.startswith("n-") else f"n-{node}"
    if not _control(mountpoint, name).is_dir():
        raise CliError(f"{mountpoint}: no node {name}")
    return name


def cmd_status(args: argparse.Namespace) -> int:
    mnt = args.mountpoint
    real = os.path.realpath(mnt)
    found = mountinfo.mount_at(real)
    if found is not None and found.is_dstfs and _dead(real):
        raise CliError(
            f"{real}: the daemon (pid {_daemon_pid(real)}) is dead and its FUSE connection "
            f"is gone; run `dstfs umount {real}` ({RECOVERY})"
        )
    _control(mnt)
    out = sys.stdout
    out.write(f"array  {_read(Path(mnt, 'name'))}\n")
    out.write(f"alg    {_read(Path(mnt, 'alg'))}\n")
    size = int(_read(Path(mnt, "size")))
    out.write(f"size   {size} sectors ({size * 512 / 2**30:.2f} GiB)\n")
    mirror = Path(mnt, "degraded").exists()
    if mirror:
        out.write(f"degraded {_read(Path(mnt, 'degraded'))} replica(s) out of sync\n")
        action = _read(Path(mnt, "sync_action"))
        if action != "idle":
            out.write(f"{action}  {_read(Path(mnt, 'sync_completed'))} sectors\n")
        out.write(f"mismatch_cnt {_read(Path(mnt, 'mismatch_cnt'))}\n")
    head = ("NODE", "STATE", "START", "SIZE", "READS", "WRITES", "ERR", "RECONN")
    rows = [(*head, *(("DIRTY",) if mirror else ()), "TARGET")]
    for d in sorted(Path(mnt).glob("n-*"), key=lambda p: int(p.name[2:])):
        st = dict(line.split(" ", 1) for line in _read(d / "stats").splitlines())
        rows.append(
            (
                d.name,
                _read(d / "state"),
                _read(d / "start"),
                _read(d / "size"),
                st.get("reads", "?"),
                st.get("writes", "?"),
                st.get("errors", "?"),
                st.get("reconnects", "?"),
                *((_read(d / "dirty"),) if mirror else ()),
                _read(d / "type"),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n")
    return 0


def cmd_suspend(args: argparse.Namespace) -> int:
    _write(_control(args.mountpoint, _node_dir(args.mountpoint, args.node), "suspend"), "1")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    _write(_control(args.mountpoint, _node_dir(args.mountpoint, args.node), "suspend"), "0")
    return 0


def cmd_target(args: argparse.Namespace) -> int:
    _write(_control(args.mountpoint, _node_dir(args.mountpoint, args.node), "target"), args.uri)
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    node = _node_dir(args.mountpoint, args.node)
    path = _control(args.mountpoint, node, "migrate")
    _write(path, args.uri)
    if args.no_wait:
        return 0
    if _control(args.mountpoint, node, "dirty").exists():
        # A mirror's replica is replaced, not migrated: its migrate file
        # stays `idle`; the full sync shows in its state.
        return _follow_sync(args.mountpoint, node)
    last = ""
    while True:
        status = _read(path)
        if status != last:
            sys.stdout.write(status + "\n")
            sys.stdout.flush()
            last = status
        if status == "done":
            return 0
        if status.startswith("failed") or status == "idle":
            raise CliError(f"migration of {node}: {status}")
        time.sleep(0.5)


def _follow_sync(mountpoint: str, node: str) -> int:
    """Show a replaced replica's state until it is in sync."""
    path = _control(mountpoint, node, "state")
    last = ""
    while True:
        status = _read(path)
        if status != last:
            sys.stdout.write(status + "\n")
            sys.stdout.flush()
            last = status
        if status == "in_sync":
            return 0
        if status == "failed":
            raise CliError(f"replacement of {node}: the new target failed (see the daemon log)")
        time.sleep(0.5)


def cmd_verify(args: argparse.Namespace) -> int:
    """md's check/repair through `sync_action`, with its progress; exit 3
    when a check found replicas that differ."""
    mnt = args.mountpoint
    action = "repair" if args.repair else "check"
    if not _control(mnt, "sync_action").exists():
        raise CliError(f"{mnt}: not a mirror ({_read(Path(mnt, 'alg'))}): nothing to verify")
    _write(_control(mnt, "sync_action"), action)
    progress = Progress(f"{action} {mnt}")
    while True:
        now = _read(Path(mnt, "sync_completed"))
        if _read(Path(mnt, "sync_action")) == "idle" or now == "none":
            break
        done, total = (int(x) for x in now.split("/"))
        progress.show(done * 512, total * 512)
        time.sleep(0.2)
    progress.close()
    mismatches = int(_read(Path(mnt, "mismatch_cnt")))
    sys.stdout.write(
        f"{action}: {mismatches} mismatched sectors"
        + (" (repaired)" if args.repair and mismatches else "")
        + "\n"
    )
    return 3 if mismatches and not args.repair else 0


class Progress:
    """A progress bar with rate and time left on a terminal; a plain line
    per tenth done otherwise (logs, pipes)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.tty = sys.stdout.isatty()
        self.t0 = time.monotonic()
        self.last_tenth = -1

    def show(self, done: int, total: int) -> None:
        frac = done / total if total else 1.0
        elapsed = time.monotonic() - self.t0
        rate = done / elapsed if elapsed > 0 else 0.0
        left = (total - done) / rate if rate > 0 else float("inf")
        eta = f"{left:.0f}s" if left != float("inf") else "?"
        if self.tty:
            bar = "#" * int(frac * 30)
            sys.stdout.write(
                f"\r{self.what} [{bar:<30}] {frac:6.1%} {rate / 1e6:7.1f} MB/s left {eta:>6}"
            )
            sys.stdout.flush()
        elif int(frac * 10) != self.last_tenth:
            self.last_tenth = int(frac * 10)
            sys.stdout.write(f"{self.what}: {frac:.0%} ({rate / 1e6:.1f} MB/s, left {eta})\n")
            sys.stdout.flush()

    def close(self) -> None:
        if self.tty:
            sys.stdout.write("\n")


def _replica_index(text: str) -> int:
    digits = text[2:] if text.startswith("n-") else text
    if not (digits.isascii() and digits.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a replica like n-1")
    return int(digits)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("mount", help="mount an array (returns once mounted)")
    m.add_argument("mountpoint")
    m.add_argument("--name", help="array name (default: storage)")
    m.add_argument("--alg", help="linear (default), stripe or mirror")
    m.add_argument("--chunk", help="stripe chunk size, a power of two >= 4K (default 64K)")
    m.add_argument("--region", help="mirror bitmap region, a power of two >= 64K (default 1M)")
    m.add_argument(
        "--force-replica",
        type=_replica_index,
        metavar="n-X",
        help="mirror: trust replica n-X when no replica is known to be in sync",
    )
    m.add_argument(
        "--node",
        action="append",
        metavar="URI[,size=SECTORS]",
        help="nbd://HOST[:PORT][/EXPORT], nbd+unix:///EXPORT?socket=PATH, file:///PATH or a path",
    )
    m.add_argument("--state", metavar="DIR", help="state dir (default ~/.local/state/dstfs/NAME)")
    m.add_argument("--foreground", action="store_true", help="stay attached, log to stderr")
    m.add_argument("--connections", type=int, default=1, help="NBD connections per node")
    m.add_argument(
        "--export",
        action="append",
        metavar="ADDR",
        help="also serve the array over NBD on unix:PATH or HOST:PORT (loopback; repeatable)",
    )
    m.add_argument(
        "--export-any-address",
        action="store_true",
        help="let --export listen on a non-loopback address (no authentication!)",
    )
    m.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    m.add_argument("--lock-fd", type=int, help=argparse.SUPPRESS)
    m.set_defaults(func=cmd_mount)

    u = sub.add_parser("umount", help="flush every node and unmount")
    u.add_argument("mountpoint")
    u.set_defaults(func=cmd_umount)

    s = sub.add_parser("status", help="show the array and its nodes")
    s.add_argument("mountpoint")
    s.set_defaults(func=cmd_status)

    for name, func, helptext in (
        ("suspend", cmd_suspend, "freeze one node's I/O (returns once drained)"),
        ("resume", cmd_resume, "resume a suspended node"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("mountpoint")
        p.add_argument("node", help="node directory (n-0) or its number")
        p.set_defaults(func=func)
    t = sub.add_parser("target", help="repoint a suspended node without copying")
    t.add_argument("mountpoint")
    t.add_argument("node")
    t.add_argument("uri")
    t.set_defaults(func=cmd_target)
    g = sub.add_parser("migrate", help="live-copy a node to a new target, then switch")
    g.add_argument("mountpoint")
    g.add_argument("node")
    g.add_argument("uri")
    g.add_argument("--no-wait", action="store_true", help="start it and return")
    g.set_defaults(func=cmd_migrate)
    v = sub.add_parser("verify", help="mirror: compare every replica (md's check), with progress")
    v.add_argument("mountpoint")
    v.add_argument("--repair", action="store_true", help="rewrite differing replicas")
    v.set_defaults(func=cmd_verify)
