"""Which storage a node address names, and whether the array may take it.

A new target (add_node, `--node` at mount, migrate, target) is refused:
- ELOOP if it is the array's own disk: a path at or under the mount point
  (or a bind mount of it), a file on the mount's device, a block device
  whose backing file is such a path (a loop device over disk.img), or a
  file on a filesystem stacked on one. Opening those from the daemon waits
  for the daemon itself.
- EEXIST if another member already uses the same storage: two ranges of
  the disk would share bytes. Members are every node's current target, a
  running migration's new target, a file the daemon serves for a node, and
  targets being admitted right now (claims, so two concurrent requests for
  one target cannot both pass).

Rules:
- Identity is a set of keys per address (`member_keys`); two addresses
  alias when their sets meet. Local paths: device and inode of the file
  after resolving symlinks, `st_rdev` of a block device, and a loop
  device's backing file too. TCP: every address the host resolves to, the
  port and the export name. Unix sockets: the socket's inode and export.
- The mount point is never touched: the daemon resolved it before mounting.
  Paths are resolved here one component at a time, and a component at or
  under the mount point is refused before it is looked at (os.path.realpath
  would lstat it, and an lstat on our own mount waits for us).
- Whatever touches the filesystem runs in a worker thread, bounded by the
  open timeout: a path that reaches the mount by a way nobody foresaw then
  costs a thread and ETIMEDOUT, not the daemon.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import stat
import weakref
from collections.abc import AsyncIterator, Hashable
from typing import TYPE_CHECKING

import attrs
import trio

from dstfs.backends import registry
from dstfs.uri import NodeSpec, parse_uri

if TYPE_CHECKING:
    from dstfs.array import Array
    from dstfs.node import Node

log = logging.getLogger(__name__)

#: Storage stacked deeper than this (loop on a file on a loop...) is refused.
MAX_DEPTH = 8
#: Symlinks followed while resolving one path, as the kernel's limit.
MAX_LINKS = 40

Keys = frozenset[Hashable]


class Refused(OSError):
    """A target the array may not take; errno ELOOP or EEXIST."""


@attrs.frozen
class Guard:
    """What a local path must not reach: the mount point and its aliases
    (bind mounts), and the mount's device number."""

    roots: tuple[str, ...] = ()
    dev: int | None = None

    @classmethod
    def for_mount(cls, mountpoint: str | None) -> Guard:
        """From /proc/self/mountinfo, which names mounts without a stat."""
        if not mountpoint:
            return cls()
        roots, dev = [mountpoint], None
        try:
            with open("/proc/self/mountinfo") as f:
                mounts = [_mountinfo_fields(line) for line in f]
        except OSError:
            mounts = []
        for majmin, mp, fstype in mounts:
            if mp == mountpoint and fstype.startswith("fuse"):
                major, minor = (int(x) for x in majmin.split(":"))
                dev = os.makedev(major, minor)
        if dev is not None:
            for majmin, mp, _ in mounts:
                major, minor = (int(x) for x in majmin.split(":"))
                if os.makedev(major, minor) == dev and mp not in roots:
                    roots.append(mp)
        return cls(tuple(roots), dev)

    def inside(self, path: str) -> str | None:
        """The root `path` is at or under, if any (strings only)."""
        for root in self.roots:
            if path == root or path.startswith(root.rstrip("/") + "/"):
                return root
        return None


def _mountinfo_fields(line: str) -> tuple[str, str, str]:
    left, _, right = line.partition(" - ")
    f = left.split()
    mp = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), f[4])  # \040 for a space
    return f[2], mp, right.split()[0]


def _refuse_inside(path: str, guard: Guard) -> None:
    root = guard.inside(path)
    if root is not None:
        raise Refused(errno.ELOOP, f"{path} is inside this array's mount point {root}")


def resolve(path: str, guard: Guard) -> tuple[str, os.stat_result | None]:
    """`path` with symlinks resolved, and its lstat (None if it does not
    exist); Refused(ELOOP) if it is, or passes through, a guarded root. No
    guarded path is ever looked at."""
    if not path.startswith("/"):
        path = os.path.join(os.getcwd(), path)
    # The lexical form first (stricter than needed: `..` after a symlink
    # goes elsewhere); then the walk, where `..` follows the resolved parent
    # as the kernel's does, so a link into the mount then `..` is caught.
    _refuse_inside(os.path.normpath(path), guard)
    parts = [p for p in path.split("/") if p]
    parts.reverse()  # a stack: the next component last
    done, links, st = "/", 0, None
    while parts:
        name = parts.pop()
        if name in (".", ""):
            continue
        if name == "..":
            done = os.path.dirname(done)
            continue
        candidate = os.path.join(done, name)
        _refuse_inside(candidate, guard)
        try:
            st = os.lstat(candidate)
        except (FileNotFoundError, NotADirectoryError):
            rest = os.path.join(candidate, *reversed(parts))
            rest = os.path.normpath(rest)
            _refuse_inside(rest, guard)
            return rest, None
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > MAX_LINKS:
                raise Refused(errno.ELOOP, f"{path}: too many levels of symbolic links")
            target = os.readlink(candidate)
            if target.startswith("/"):
                done = "/"
            parts.extend(reversed([p for p in target.split("/") if p]))
            st = None
            continue
        done = candidate
    if st is None:  # the path was "/" or ended in ".."
        st = os.lstat(done)
    return done, st


def _sysfs_dir(rdev: int) -> str | None:
    path = f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}"
    return os.path.realpath(path) if os.path.exists(path) else None


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _loop_backing(sysdir: str) -> str | None:
    """The backing file of a loop device, as /sys shows it (losetup -j)."""
    text = _read(os.path.join(sysdir, "loop", "backing_file"))
    return text.removesuffix(" (deleted)") if text else None


def _stacked_on(sysdir: str) -> list[str]:
    """The sysfs dirs of the devices a block device is built from: the whole
    disk of a partition, the slaves of a device-mapper or md device."""
    under = []
    if os.path.exists(os.path.join(sysdir, "partition")):
        under.append(os.path.dirname(sysdir))
    with contextlib.suppress(OSError):
        for name in os.listdir(os.path.join(sysdir, "slaves")):
            under.append(os.path.realpath(os.path.join(sysdir, "slaves", name)))
    return under


def _check_device(rdev: int, guard: Guard, depth: int, seen: set[str]) -> None:
    """Refused(ELOOP) if block device `rdev` is built, at any depth, on a
    file that reaches the guarded mount."""
    sysdir = _sysfs_dir(rdev)
    if sysdir is None:
        return
    stack = [sysdir]
    while stack:
        d = stack.pop()
        if d in seen:
            continue
        seen.add(d)
        backing = _loop_backing(d)
        if backing is not None:
            try:
                local_keys(backing, guard, depth + 1)
            except Refused as e:
                if e.errno != errno.ELOOP:
                    raise
                raise Refused(
                    errno.ELOOP, f"{os.path.basename(d)} is backed by {backing}: {e.strerror}"
                ) from None
        stack.extend(_stacked_on(d))


def local_keys(path: str, guard: Guard, depth: int = 0) -> Keys:
    """Identity of a local file or block device (blocking: run in a thread);
    Refused(ELOOP) if it reaches the guarded mount."""
    if depth > MAX_DEPTH:
        raise Refused(errno.ELOOP, f"{path}: storage stacked more than {MAX_DEPTH} deep")
    real, st = resolve(path, guard)
    if st is None:
        return frozenset({("path", real)})  # the open will say ENOENT
    if guard.dev is not None and st.st_dev == guard.dev:
        raise Refused(errno.ELOOP, f"{path} is on this array's own mount")
    if stat.S_ISBLK(st.st_mode):
        _check_device(st.st_rdev, guard, depth, set())
        keys: set[Hashable] = {("blk", st.st_rdev)}
        sysdir = _sysfs_dir(st.st_rdev)
        backing = _loop_backing(sysdir) if sysdir else None
        if backing is not None:  # a loop device is its backing file too
            with contextlib.suppress(OSError):
                keys |= local_keys(backing, guard, depth + 1)
        return frozenset(keys)
    if os.major(st.st_dev):  # a filesystem on a block device: what is it on?
        _check_device(st.st_dev, guard, depth, set())
    return frozenset({("inode", st.st_dev, st.st_ino)})


def _socket_keys(spec: NodeSpec, guard: Guard) -> Keys:
    assert spec.socket is not None
    real, st = resolve(spec.socket, guard)
    if st is None:
        return frozenset({("unix-path", real, spec.export)})
    return frozenset({("unix", st.st_dev, st.st_ino, spec.export)})


async def _tcp_keys(spec: NodeSpec) -> Keys:
    assert spec.host is not None
    try:
        infos = await trio.socket.getaddrinfo(spec.host, spec.port, type=trio.socket.SOCK_STREAM)
        addrs = {str(info[4][0]) for info in infos}
    except OSError:  # unresolvable now: the name is all we know
        addrs = {spec.host.lower()}
    addrs = {a.removeprefix("::ffff:") if "." in a else a for a in addrs}
    return frozenset(("tcp", a, spec.port, spec.export) for a in addrs)


async def member_keys(spec: NodeSpec, guard: Guard = Guard()) -> Keys:
    """The identity of the storage `spec` names (see the module rules);
    Refused(ELOOP) for the array's own disk. Not bounded: callers bound it."""
    keys: Keys = frozenset({("uri", spec.uri)})
    if spec.kind == "file":
        assert spec.path is not None
        found = await trio.to_thread.run_sync(local_keys, spec.path, guard, abandon_on_cancel=True)
    elif spec.kind == "nbd+unix":
        found = await trio.to_thread.run_sync(_socket_keys, spec, guard, abandon_on_cancel=True)
    elif spec.host is not None:
        found = await _tcp_keys(spec)
    else:
        found = frozenset()
    return keys | found


@attrs.frozen
class Member:
    label: str
    spec: NodeSpec


#: Targets being admitted right now, per array (see `admitting`).
_claims: weakref.WeakKeyDictionary[Array, list[tuple[str, Keys]]] = weakref.WeakKeyDictionary()


def members_of(array: Array, replacing: Node | None = None) -> list[Member]:
    """What the array's nodes use: current targets (but `replacing`'s own,
    which a repoint gives up), migration targets, files served for a node."""
    out = []
    for i, node in enumerate(array.nodes):
        name = array.node_dir_name(i)
        if node is not replacing:
            out.append(Member(f"{name} ({node.spec.uri})", node.spec))
        new = getattr(node.migration, "spec", None)
        if isinstance(new, NodeSpec):
            out.append(Member(f"{name}'s migration target ({new.uri})", new))
        entries = getattr(array, "entries", ())
        entry = entries[i] if i < len(entries) else None
        served = getattr(entry, "serve", None)
        if served and node is not replacing:
            out.append(Member(f"{name} (serving {served})", parse_uri(served)))
    return out


async def _check(array: Array, spec: NodeSpec, replacing: Node | None, what: str) -> Keys:
    guard = Guard.for_mount(getattr(array, "mountpoint", None))
    try:
        with trio.fail_after(registry.OPEN_TIMEOUT):
            keys = await member_keys(spec, guard)
            for m in members_of(array, replacing):
                try:
                    theirs = await member_keys(m.spec, guard)
                except OSError:  # gone or odd since: its address must still differ
                    theirs = frozenset({("uri", m.spec.uri)})
                if keys & theirs:
                    _refuse_exists(array, spec, m.label, what)
            for label, theirs in _claims.get(array, ()):
                if keys & theirs:
                    _refuse_exists(array, spec, label, what)
    except trio.TooSlowError:
        raise Refused(
            errno.ETIMEDOUT,
            f"{spec.uri}: could not tell in {registry.OPEN_TIMEOUT:g} s which storage it is",
        ) from None
    except Refused as e:
        if e.errno == errno.ELOOP:
            log.error("%s: %s refused: %s", array.name, what, e.strerror)
        raise
    return keys


def _refuse_exists(array: Array, spec: NodeSpec, label: str, what: str) -> None:
    log.error("%s: %s refused: %s is already used by %s", array.name, what, spec.uri, label)
    raise Refused(errno.EEXIST, f"{spec.uri} is already used by {label}")


@contextlib.asynccontextmanager
async def admitting(
    array: Array, spec: NodeSpec, replacing: Node | None = None, what: str = "add_node"
) -> AsyncIterator[None]:
    """Check that the array may take `spec` (Refused: ELOOP or EEXIST) and
    hold a claim on it until the block ends: by then the caller has made it
    a member, or given up."""
    keys = await _check(array, spec, replacing, what)
    claim = (f"{what} of {spec.uri} in progress", keys)
    claims = _claims.setdefault(array, [])
    claims.append(claim)
    try:
        yield
    finally:
        claims.remove(claim)
