"""Array commands of the CLI: mount, umount, status, suspend, resume,
migrate, target, verify. Everything but mount works through the control
files of a mounted array, exactly as a user with `cat` and `echo` would, or,
given `--state DIR` (or a state dir as the array), through the daemon's
control socket (`dstfs.ctlsock`): the same tree, for `--no-fuse` arrays.

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
import io
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import attrs
import rich.console
import rich.live
import rich.progress
import rich.text
import trio

from dstfs import mountinfo, registry, state, statelock
from dstfs.algorithms import make_algorithm
from dstfs.ctlsock import SOCKET_NAME, ControlClient, ControlSocketError
from dstfs.defaults import default_config
from dstfs.uri import parse_node, parse_size

if TYPE_CHECKING:
    from dstfs.export import ExportOptions

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
    exports = _export_options(args)
    if args.no_fuse:
        if args.mountpoint is not None:
            raise CliError("--no-fuse mounts nothing: leave out the mount point")
        if not exports.addresses:
            raise CliError("--no-fuse needs at least one --export (the only way to the data)")
        return _mount(args, None, exports)
    if args.mountpoint is None:
        raise CliError("a mount point is needed (or --no-fuse with --export)")
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
    return _mount(args, mountpoint, exports)


def _mount(args: argparse.Namespace, mountpoint: str | None, exports: ExportOptions) -> int:
    state_dir = Path(args.state) if args.state else state.default_state_dir(args.name or "storage")
    state_dir = state_dir.absolute()
    real_state = os.path.realpath(state_dir)
    if mountpoint is not None and (
        real_state == mountpoint or real_state.startswith(mountpoint.rstrip("/") + "/")
    ):
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
    """The `--export*` options, all checked before anything starts."""
    from dstfs.export import export_options  # only mount needs it

    def absolute(path: str | None) -> str | None:
        # The daemon may run from another directory (a systemd unit).
        return os.path.abspath(path) if path else None

    try:
        return export_options(
            args.export or [],
            any_address=args.export_any_address,
            tls_cert=absolute(args.export_tls_cert),
            tls_key=absolute(args.export_tls_key),
            tls_ca=absolute(args.export_tls_ca),
            tls=args.export_tls,
            allow=args.export_allow,
        )
    except ValueError as e:
        raise CliError(str(e)) from None


def _run_daemon(
    args: argparse.Namespace,
    mountpoint: str | None,
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
    args: argparse.Namespace,
    mountpoint: str | None,
    state_dir: Path,
    lock_fd: int,
    exports: ExportOptions,
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
    argv += ["mount", *([mountpoint] if mountpoint else ["--no-fuse"])]
    argv += ["--state", str(state_dir), "--ready-fd", str(wfd)]
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
    for flag, value in (
        ("--export-tls-cert", exports.tls_cert),
        ("--export-tls-key", exports.tls_key),
        ("--export-tls-ca", exports.tls_ca),
        ("--export-tls", exports.tls),
    ):
        if value is not None:
            argv += [flag, value]
    for a in args.export_allow or ():
        argv += ["--export-allow", a]
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
        if mountpoint is None:
            _say_running(state_dir, logfile, exports)
        else:
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
        sys.stdout.write(f"  exported over NBD: {addr.uri(exports.tls_on)}\n")


def _say_running(state_dir: Path, logfile: Path, exports: ExportOptions) -> None:
    w = _Socket(state_dir)
    sectors = int(w.read("size"))
    nodes = sum(1 for n in w.list() if n.startswith("n-"))
    sys.stdout.write(
        f"running array {w.read('name')} without FUSE: {sectors * 512 / 2**30:.2f} GiB, "
        f"{w.read('alg')}, {nodes} node(s); log {logfile}\n"
    )
    for addr in exports.addresses:
        sys.stdout.write(f"  exported over NBD: {addr.uri(exports.tls_on)}\n")
    sys.stdout.write(
        f"  watch it: dstfs status --state {state_dir}\n"
        f"  stop it: dstfs umount --state {state_dir}\n"
    )


def cmd_umount(args: argparse.Namespace) -> int:
    if args.state is not None:
        if args.mountpoint is not None:
            raise CliError("give a mount point or --state DIR, not both")
        return _stop_no_fuse(Path(args.state).absolute())
    if args.mountpoint is None:
        raise CliError("which array? give its mount point, or --state DIR for a --no-fuse one")
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
        while time.monotonic() < deadline and process_alive(pid):
            time.sleep(0.05)
        if process_alive(pid):
            raise CliError(f"daemon {pid} did not exit after unmount")
    return 0


def _stop_no_fuse(state_dir: Path) -> int:
    """Stop the --no-fuse daemon of `state_dir`: it flushes every node and
    exits; return once it has (the state dir's lock is free again)."""
    w = _Socket(state_dir)
    w.request("stop")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            fd = statelock.acquire(state_dir)
        except statelock.StateDirBusy:
            time.sleep(0.05)
            continue
        except OSError as e:
            raise CliError(f"{state_dir}: {e.strerror}") from None
        os.close(fd)
        return 0
    raise CliError(f"the daemon of {state_dir} did not exit after stop")


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


def process_alive(pid: int) -> bool:
    """Running, and not a zombie waiting for a parent to reap it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _read(path: Path) -> str:
    try:
        return path.read_text().rstrip("\n")
    except OSError as e:
        raise CliError(f"{path}: {e.strerror}") from None


class _Fuse:
    """A mounted array, through its control files (as `cat` and `echo`)."""

    def __init__(self, mountpoint: str) -> None:
        real = os.path.realpath(mountpoint)
        found = mountinfo.mount_at(real)
        if found is not None and found.is_dstfs and _dead(real):
            raise CliError(
                f"{real}: the daemon (pid {_daemon_pid(real)}) is dead and its FUSE connection "
                f"is gone; run `dstfs umount {real}` ({RECOVERY})"
            )
        if not Path(mountpoint, "disk.img").exists():
            raise CliError(f"{mountpoint}: no dstfs array mounted there")
        self.label = mountpoint

    def read(self, rel: str) -> str:
        return _read(Path(self.label, rel))

    def exists(self, rel: str) -> bool:
        return Path(self.label, rel).exists()

    def read_if_readable(self, rel: str) -> str | None:
        """The file's content; None for a write-only file."""
        try:
            return Path(self.label, rel).read_text().rstrip("\n")
        except PermissionError:
            return None
        except OSError as e:
            raise CliError(f"{Path(self.label, rel)}: {e.strerror}") from None

    def list(self, rel: str = "") -> list[str]:
        try:
            entries = list(os.scandir(Path(self.label, rel)))
        except OSError as e:
            raise CliError(f"{Path(self.label, rel)}: {e.strerror}") from None
        return [
            e.name + ("/" if e.is_dir() else "") for e in entries if e.name != "disk.img" or rel
        ]

    def write(self, rel: str, value: str) -> None:
        path = Path(self.label, rel)
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


class _Socket:
    """An array's daemon through STATE/control.sock (`dstfs.ctlsock`): the
    way in without FUSE."""

    def __init__(self, state_dir: Path) -> None:
        self.label = str(state_dir)
        path = state_dir / SOCKET_NAME
        try:
            self.client = ControlClient(path)
        except ControlSocketError as e:
            if e.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTDIR):
                raise CliError(f"{state_dir}: no dstfs daemon runs on this state dir") from None
            raise CliError(e.strerror or str(e)) from None

    def request(self, line: str) -> str:
        try:
            return self.client.request(line)
        except ControlSocketError as e:
            raise CliError(f"{self.label}: {line.split(' ', 1)[0]}: {e.strerror}") from None

    def read(self, rel: str) -> str:
        try:
            return self.client.read(rel).rstrip("\n")
        except ControlSocketError as e:
            raise CliError(f"{self.label}: {rel}: {e.strerror}") from None

    def read_if_readable(self, rel: str) -> str | None:
        """The file's content; None for a write-only file."""
        try:
            return self.client.read(rel).rstrip("\n")
        except ControlSocketError as e:
            if e.errno == errno.EACCES:
                return None
            raise CliError(f"{self.label}: {rel}: {e.strerror}") from None

    def exists(self, rel: str) -> bool:
        parent, _, name = rel.rpartition("/")
        try:
            names = self.client.list(parent)
        except ControlSocketError:
            return False
        return name in names or f"{name}/" in names

    def list(self, rel: str = "") -> list[str]:
        try:
            return self.client.list(rel)
        except ControlSocketError as e:
            raise CliError(f"{self.label}: {rel or '/'}: {e.strerror}") from None

    def write(self, rel: str, value: str) -> None:
        try:
            self.client.write(rel, value)
        except ControlSocketError as e:
            raise CliError(
                f"{self.label}: {rel} <- {value!r}: {e.strerror} (see the daemon log)"
            ) from None


_Where = _Fuse | _Socket


def _where(args: argparse.Namespace) -> tuple[_Where, list[str]]:
    """The array a command is about, and its other operands: the first
    operand is a mount point, or a state dir whose daemon runs without FUSE;
    with --state DIR there is no mount point operand."""
    ops = list(args.operands)
    names = args.operand_names
    if args.state is None and not ops:
        raise CliError("which array? give its mount point, or --state DIR")
    where: _Where
    if args.state is not None:
        where = _Socket(Path(args.state).absolute())
    else:
        first = ops.pop(0)
        real = os.path.realpath(first)
        if mountinfo.mount_at(real) is None and Path(real, SOCKET_NAME).exists():
            where = _Socket(Path(real))  # a state dir named as the array
        else:
            where = _Fuse(first)
    if len(ops) != len(names):
        raise CliError(f"expected {' '.join(names) or 'no other operand'} after the array")
    return where, ops


def _node_dir(where: _Where, node: str) -> str:
    name = node if node.startswith("n-") else f"n-{node}"
    if f"{name}/" not in where.list():
        raise CliError(f"{where.label}: no node {name}")
    return name


def _stats(text: str) -> dict[str, int | float]:
    """A stats file as numbers."""
    out: dict[str, int | float] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        try:
            out[key] = int(value)
        except ValueError:
            try:
                out[key] = float(value)
            except ValueError:
                continue
    return out


def _node_names(where: _Where) -> list[str]:
    dirs = [n.rstrip("/") for n in where.list() if n.startswith("n-") and n.endswith("/")]
    return sorted(dirs, key=lambda n: int(n[2:]))


def cmd_status(args: argparse.Namespace) -> int:
    where, _ = _where(args)
    if args.watch:
        if args.json:
            raise CliError("--watch redraws the table; for JSON, run --json repeatedly")
        return _watch(where, args.interval)
    if args.json:
        json.dump(_tree_json(where), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    _write_status(where, sys.stdout)
    return 0


def _watch(where: _Where, interval: float) -> int:
    """Redraw the status every `interval` seconds until Ctrl-C: in place on a
    terminal, as a new block after a blank line and a time stamp otherwise."""
    if not sys.stdout.isatty():
        while True:
            out = io.StringIO()
            _write_status(where, out)
            sys.stdout.write(f"--- {time.strftime('%H:%M:%S')}\n{out.getvalue()}\n")
            sys.stdout.flush()
            time.sleep(interval)
    console = rich.console.Console(file=sys.stdout)

    def frame() -> rich.text.Text:
        out = io.StringIO()
        _write_status(where, out)
        return rich.text.Text(f"{time.strftime('%H:%M:%S')}  every {interval:g}s\n{out.getvalue()}")

    with rich.live.Live(frame(), console=console, auto_refresh=False) as live:
        while True:
            time.sleep(interval)
            live.update(frame(), refresh=True)


#: Files `status --json` leaves out: the disk, and metrics (its own format).
_NOT_JSON = {"disk.img", "metrics"}
#: Files that are text whatever they hold: an array named `007` is "007",
#: not the number 7.
_TEXT = {"name", "alg", "nodes", "type", "target", "state", "migrate", "sync_action"}


def _tree_json(where: _Where, rel: str = "") -> dict[str, object]:
    """Every readable file of the control tree under `rel`: numbers as
    numbers (but names, URIs and states always as text), `stats` files as
    objects of numbers, `jobs` as a list of lines; write-only files are
    left out."""
    out: dict[str, object] = {}
    for entry in where.list(rel):
        name = entry.rstrip("/")
        path = f"{rel}/{name}" if rel else name
        if entry.endswith("/"):
            out[name] = _tree_json(where, path)
            continue
        if name in _NOT_JSON:
            continue
        text = where.read_if_readable(path)
        if text is None:
            continue
        if name == "stats":
            out[name] = _stats(text)
        elif name == "jobs":
            out[name] = text.splitlines()
        elif name in _TEXT:
            out[name] = text
        else:
            out[name] = _scalar(text)
    return out


def _scalar(text: str) -> int | float | str:
    if text.isascii() and text.isdigit():
        return int(text)
    try:
        value = float(text)
    except ValueError:
        return text
    return value if text.isascii() and "." in text and value == value else text


def _write_status(where: _Where, out: TextIO) -> None:
    out.write(f"array  {where.read('name')}\n")
    out.write(f"alg    {where.read('alg')}\n")
    size = int(where.read("size"))
    out.write(f"size   {size} sectors ({size * 512 / 2**30:.2f} GiB)\n")
    mirror = where.exists("degraded")
    if mirror:
        out.write(f"degraded {where.read('degraded')} replica(s) out of sync\n")
        action = where.read("sync_action")
        if action != "idle":
            out.write(f"{action}  {where.read('sync_completed')} sectors\n")
        out.write(f"mismatch_cnt {where.read('mismatch_cnt')}\n")
    head = ("NODE", "STATE", "START", "SIZE", "READS", "WRITES", "ERR", "RECONN")
    rows = [(*head, *(("DIRTY",) if mirror else ()), "TARGET")]
    for d in _node_names(where):
        st = _stats(where.read(f"{d}/stats"))
        rows.append(
            (
                d,
                where.read(f"{d}/state"),
                where.read(f"{d}/start"),
                where.read(f"{d}/size"),
                *(str(st.get(k, "?")) for k in ("reads", "writes", "errors", "reconnects")),
                *((where.read(f"{d}/dirty"),) if mirror else ()),
                where.read(f"{d}/type"),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n")


def cmd_suspend(args: argparse.Namespace) -> int:
    where, (node,) = _where(args)
    where.write(f"{_node_dir(where, node)}/suspend", "1")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    where, (node,) = _where(args)
    where.write(f"{_node_dir(where, node)}/suspend", "0")
    return 0


def cmd_target(args: argparse.Namespace) -> int:
    where, (node, uri) = _where(args)
    where.write(f"{_node_dir(where, node)}/target", uri)
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    where, (node, uri) = _where(args)
    node = _node_dir(where, node)
    where.write(f"{node}/migrate", uri)
    if args.no_wait:
        return 0
    if where.exists(f"{node}/dirty"):
        # A mirror's replica is replaced, not migrated: its migrate file
        # stays `idle`; the full sync shows in its state.
        return _follow_sync(where, node)
    progress = Progress(
        f"migrate {node}", plain=lambda d, t: f"copying {d // 512}/{t // 512} sectors"
    )
    try:
        while True:
            status = where.read(f"{node}/migrate")
            m = _COPYING.fullmatch(status)
            if m:
                progress.update(int(m[1]) * 512, int(m[2]) * 512)
            else:
                progress.say(status)
            if status == "done":
                progress.finish()
                return 0
            if status.startswith("failed") or status == "idle":
                raise CliError(f"migration of {node}: {status}")
            time.sleep(0.5)
    finally:
        progress.close()


_COPYING = re.compile(r"copying ([0-9]+)/([0-9]+) sectors")
_RESYNCING = re.compile(r"resyncing ([0-9]+)/([0-9]+)")


def _follow_sync(where: _Where, node: str) -> int:
    """Show a replaced replica's state until it is in sync."""
    progress = Progress(f"resync {node}", unit="regions", plain=lambda d, t: f"resyncing {d}/{t}")
    try:
        while True:
            status = where.read(f"{node}/state")
            m = _RESYNCING.fullmatch(status)
            if m:
                progress.update(int(m[1]), int(m[2]))
            else:
                progress.say(status)
            if status == "in_sync":
                progress.finish()
                return 0
            if status == "failed":
                raise CliError(f"replacement of {node}: the new target failed (see the daemon log)")
            time.sleep(0.5)
    finally:
        progress.close()


def cmd_verify(args: argparse.Namespace) -> int:
    """md's check/repair through `sync_action`, with its progress; exit 3
    when a check found replicas that differ."""
    where, _ = _where(args)
    action = "repair" if args.repair else "check"
    if not where.exists("sync_action"):
        raise CliError(f"{where.label}: not a mirror ({where.read('alg')}): nothing to verify")
    where.write("sync_action", action)
    progress = Progress(f"{action} {where.label}")
    try:
        while True:
            now = where.read("sync_completed")
            if where.read("sync_action") == "idle" or now == "none":
                break
            done, total = (int(x) for x in now.split("/"))
            progress.update(done * 512, total * 512)
            time.sleep(0.2)
    finally:
        progress.close()
    mismatches = int(where.read("mismatch_cnt"))
    sys.stdout.write(
        f"{action}: {mismatches} mismatched sectors"
        + (" (repaired)" if args.repair and mismatches else "")
        + "\n"
    )
    return 3 if mismatches and not args.repair else 0


class Progress:
    """A long job's progress. On a terminal: a rich progress bar with rate
    and time left. Otherwise (logs, pipes): a plain line when the job starts,
    at each tenth done, and when it ends, so a log shows it without noise.
    `plain(done, total)` words those lines; `unit` "B" shows bytes."""

    def __init__(
        self,
        what: str,
        unit: str = "B",
        plain: Callable[[int, int], str] | None = None,
        tty: bool | None = None,
    ) -> None:
        self.what = what
        self.unit = unit
        self.plain = plain or self._default_line
        self.tty = sys.stdout.isatty() if tty is None else tty
        self.t0 = time.monotonic()
        self.last_tenth = -1
        self.last_line = ""
        self.total = 0
        self.bar: rich.progress.Progress | None = None
        if self.tty:
            rate: rich.progress.ProgressColumn = (
                rich.progress.TransferSpeedColumn() if unit == "B" else _RateColumn(unit)
            )
            self.bar = rich.progress.Progress(
                rich.progress.TextColumn("{task.description}"),
                rich.progress.BarColumn(),
                rich.progress.TaskProgressColumn(),
                rate,
                rich.progress.TextColumn("left"),
                rich.progress.TimeRemainingColumn(),
                console=rich.console.Console(file=sys.stdout),
                transient=False,
            )
            self.bar.start()
            self.task = self.bar.add_task(what, total=None)

    def _default_line(self, done: int, total: int) -> str:
        frac = done / total if total else 1.0
        elapsed = time.monotonic() - self.t0
        rate = done / elapsed if elapsed > 0 else 0.0
        left = f"{(total - done) / rate:.0f}s" if rate > 0 else "?"
        speed = f"{rate / 1e6:.1f} MB/s" if self.unit == "B" else f"{rate:.0f} {self.unit}/s"
        return f"{self.what}: {frac:.0%} ({speed}, left {left})"

    def finish(self) -> None:
        """The job is done: a full bar (if it ever had a size)."""
        if self.bar is not None and self.total:
            self.bar.update(self.task, completed=self.total, total=self.total)

    def update(self, done: int, total: int) -> None:
        self.total = total
        if self.bar is not None:
            self.bar.update(self.task, completed=done, total=total)
            return
        tenth = int(done * 10 / total) if total else 10
        if tenth != self.last_tenth:
            self.last_tenth = tenth
            self.say(self.plain(done, total))

    def say(self, line: str) -> None:
        """A line of its own (a state change), above the bar on a terminal."""
        if line == self.last_line:
            return
        self.last_line = line
        if self.bar is not None:
            self.bar.console.print(line, markup=False, highlight=False)
        else:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


class _RateColumn(rich.progress.ProgressColumn):
    """Speed in `unit`s per second (regions, for a mirror's resync)."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: rich.progress.Task) -> rich.text.Text:
        speed = task.finished_speed or task.speed
        return rich.text.Text("?" if speed is None else f"{speed:.1f} {self.unit}/s")


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.05 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r}: expected seconds from 0.05 to 3600")
    return value


def _replica_index(text: str) -> int:
    digits = text[2:] if text.startswith("n-") else text
    if not (digits.isascii() and digits.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a replica like n-1")
    return int(digits)


def add_access_arguments(p: argparse.ArgumentParser, prefix: str = "", what: str = "") -> None:
    """The TLS and allow-list options of an NBD server: `dstfs serve`'s, and
    with `prefix` "export-" those of `dstfs mount --export`."""
    of = f" ({what})" if what else ""
    p.add_argument(f"--{prefix}tls-cert", metavar="FILE", help=f"TLS certificate (chain), PEM{of}")
    p.add_argument(f"--{prefix}tls-key", metavar="FILE", help=f"TLS private key, PEM{of}")
    p.add_argument(
        f"--{prefix}tls-ca",
        metavar="FILE",
        help=f"require client certificates signed by this CA (PEM){of}",
    )
    p.add_argument(
        f"--{prefix}tls",
        choices=["require", "allow", "off"],
        help=f"require (the default with --{prefix}tls-cert): no data without TLS; "
        "allow: TLS is the client's choice; off",
    )
    p.add_argument(
        f"--{prefix}allow",
        action="append",
        metavar="ADDR[/PREFIX]",
        help=f"serve only TCP clients from these addresses (repeatable; IPv4 or IPv6){of}",
    )


def add_parsers(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("mount", help="mount an array (returns once mounted)")
    m.add_argument("mountpoint", nargs="?", help="where disk.img appears (none with --no-fuse)")
    m.add_argument(
        "--no-fuse",
        action="store_true",
        help="mount nothing: run the array for its --export only (no /dev/fuse needed)",
    )
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
        help="let --export listen on a non-loopback address without client "
        "certificates (--export-tls-ca)",
    )
    add_access_arguments(m, "export-", "for the export")
    m.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    m.add_argument("--lock-fd", type=int, help=argparse.SUPPRESS)
    m.set_defaults(func=cmd_mount)

    u = sub.add_parser("umount", help="flush every node and unmount (or stop a --no-fuse daemon)")
    u.add_argument("mountpoint", nargs="?")
    u.add_argument("--state", metavar="DIR", help="stop the --no-fuse daemon of this state dir")
    u.set_defaults(func=cmd_umount)

    st = _array_parser(sub, "status", cmd_status, "show the array and its nodes")
    st.add_argument(
        "--json", action="store_true", help="every file of the control tree, as one JSON object"
    )
    st.add_argument("--watch", action="store_true", help="redraw the status until Ctrl-C")
    st.add_argument(
        "--interval", type=_interval, default=2.0, metavar="SECONDS", help="for --watch (default 2)"
    )

    _array_parser(
        sub, "suspend", cmd_suspend, "freeze one node's I/O (returns once drained)", "NODE"
    )
    _array_parser(sub, "resume", cmd_resume, "resume a suspended node", "NODE")
    _array_parser(
        sub, "target", cmd_target, "repoint a suspended node without copying", "NODE", "URI"
    )
    g = _array_parser(
        sub, "migrate", cmd_migrate, "live-copy a node to a new target, then switch", "NODE", "URI"
    )
    g.add_argument("--no-wait", action="store_true", help="start it and return")
    v = _array_parser(
        sub, "verify", cmd_verify, "mirror: compare every replica (md's check), with progress"
    )
    v.add_argument("--repair", action="store_true", help="rewrite differing replicas")


def _array_parser(
    sub: argparse._SubParsersAction, name: str, func: object, helptext: str, *operands: str
) -> argparse.ArgumentParser:
    """A command about one running array: `MOUNTPOINT OPERANDS...`, or
    `--state DIR OPERANDS...` (a --no-fuse array, over its control socket).
    A node is its directory (n-0) or its number."""
    p = sub.add_parser(
        name,
        help=helptext,
        usage=f"dstfs {name} [-h] (MOUNTPOINT | --state DIR) {' '.join(operands)}".rstrip(),
    )
    p.add_argument(
        "operands",
        nargs="*",
        metavar="MOUNTPOINT " + " ".join(operands),
        help="the array's mount point (or its state dir), then "
        + (", ".join(operands) or "nothing else"),
    )
    p.add_argument(
        "--state", metavar="DIR", help="reach the daemon of this state dir over its control socket"
    )
    p.set_defaults(func=func, operand_names=operands)
    return p
