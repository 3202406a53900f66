"""The FUSE layer: renders the array as `disk.img` plus the control tree.

Rules:
- Only this module knows pyfuse3, and only here do errors become
  FUSEError(errno). Every handler catches everything: an exception escaping
  a pyfuse3 handler would end the filesystem with the request unanswered.
- disk.img is a fixed-size regular file: reads past the end are short,
  writes past the end get ENOSPC (the disk cannot grow by writing), changing
  its size gets EINVAL. fsync flushes every node.
- Control files are snapshotted at open (like sysfs) and served with
  direct_io, so their size does not matter; each write() is one store.
- Nothing here touches the mount point (that can deadlock the daemon).
- disk.img reads land in recycled buffers. A buffer goes back to the pool
  as it is returned: pyfuse3 copies a read's reply into the kernel before it
  awaits anything, so no other task can take the buffer first. A failed
  read's buffer is dropped, since a node may still be filling it.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pyfuse3

from dstfs.array import Array
from dstfs.control import Attr, ControlError, ControlTree
from dstfs.iotypes import BufferPool

log = logging.getLogger(__name__)
T = TypeVar("T")

DISK_NAME = "disk.img"
DISK_INODE = pyfuse3.ROOT_INODE + 1
CONTROL_FILE_SIZE = 4096


def _edge(handler: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """The error boundary of a handler: errnos become FUSEError, anything
    unexpected is logged and becomes EIO (it must never reach pyfuse3). The
    disk.img read/write paths do the same inline, to stay one call shorter."""

    @functools.wraps(handler)
    async def wrapper(self: DstFs, *args: Any) -> T:
        try:
            return await handler(self, *args)
        except pyfuse3.FUSEError:
            raise
        except (OSError, ControlError) as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except Exception:
            log.exception("%s: %s%r failed", self.array.name, handler.__name__, args)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


class _ControlHandle:
    __slots__ = ("content", "path")

    def __init__(self, path: tuple[str, ...], content: bytes) -> None:
        self.path = path
        self.content = content


class DstFs(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, array: Array, control: ControlTree) -> None:
        super().__init__()
        self.array = array
        self.control = control
        self._paths: dict[int, tuple[str, ...]] = {pyfuse3.ROOT_INODE: ()}
        self._inodes: dict[tuple[str, ...], int] = {(): pyfuse3.ROOT_INODE}
        self._next_inode = itertools.count(DISK_INODE + 1)
        self._handles: dict[int, _ControlHandle | None] = {}
        self._next_fh = itertools.count(1)
        #: Read buffers: a zero-filled MiB per request costs as much as its copy.
        self._buffers = BufferPool(keep=32)
        self._mtime = time.time_ns()
        self._uid = os.getuid()
        self._gid = os.getgid()
        array.on_resize = self._disk_resized

    # -- helpers

    def _disk_resized(self) -> None:
        # Tell the kernel the size changed; done after the current request.
        async def notify() -> None:
            try:
                pyfuse3.invalidate_inode(DISK_INODE, attr_only=True)
            except OSError as e:  # e.g. the kernel never looked the file up
                log.debug("%s: invalidate disk.img: %s", self.array.name, e)

        self.array.nursery.start_soon(notify)

    def _inode(self, path: tuple[str, ...]) -> int:
        ino = self._inodes.get(path)
        if ino is None:
            ino = next(self._next_inode)
            self._inodes[path] = ino
            self._paths[ino] = path
        return ino

    def _attrs(self, inode: int, node: Attr | dict | None) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.st_uid, a.st_gid = self._uid, self._gid
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self._mtime
        a.st_blksize = 4096
        if inode == DISK_INODE:
            a.st_mode = stat.S_IFREG | 0o644
            a.st_size = self.array.size
            a.st_blocks = (a.st_size + 511) // 512
            a.st_nlink = 1
            a.attr_timeout = a.entry_timeout = 1.0
        elif isinstance(node, dict):
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_nlink = 2
            a.attr_timeout = a.entry_timeout = 0.0
        else:
            assert node is not None
            a.st_mode = stat.S_IFREG | node.mode
            a.st_size = CONTROL_FILE_SIZE
            a.st_nlink = 1
            a.attr_timeout = a.entry_timeout = 0.0
        return a

    def _resolve(self, inode: int) -> tuple[tuple[str, ...], Attr | dict]:
        path = self._paths.get(inode)
        if path is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        node = self.control.lookup(path)
        if node is None:  # the node directory went away
            raise pyfuse3.FUSEError(errno.ENOENT)
        return path, node

    # -- metadata

    @_edge
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        if parent_inode == pyfuse3.ROOT_INODE and name == DISK_NAME.encode():
            return self._attrs(DISK_INODE, None)
        parent, pnode = self._resolve(parent_inode)
        if not isinstance(pnode, dict):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        key = name.decode(errors="surrogateescape")
        if key not in pnode:
            raise pyfuse3.FUSEError(errno.ENOENT)
        path = (*parent, key)
        return self._attrs(self._inode(path), pnode[key])

    @_edge
    async def getattr(self, inode: int, ctx: Any = None) -> Any:
        if inode == DISK_INODE:
            return self._attrs(inode, None)
        _, node = self._resolve(inode)
        return self._attrs(inode, node)

    @_edge
    async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> Any:
        # O_TRUNC on a control file (echo > file) is fine: nothing to cut.
        if fields.update_size and inode == DISK_INODE and attr.st_size != self.array.size:
            log.warning("%s: refused to resize disk.img to %d bytes", self.array.name, attr.st_size)
            raise pyfuse3.FUSEError(errno.EINVAL)
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise pyfuse3.FUSEError(errno.EPERM)
        return await self.getattr(inode, ctx)

    async def forget(self, inode_list: Any) -> None:
        pass

    @_edge
    async def statfs(self, ctx: Any) -> Any:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = self.array.size // 4096
        s.f_files = len(self._inodes) + 1
        s.f_namemax = 255
        return s

    # -- directories

    @_edge
    async def opendir(self, inode: int, ctx: Any) -> int:
        _, node = self._resolve(inode)
        if not isinstance(node, dict):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @_edge
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        path, node = self._resolve(fh)
        assert isinstance(node, dict)
        entries: list[tuple[str, int, Attr | dict | None]] = []
        if fh == pyfuse3.ROOT_INODE:
            entries.append((DISK_NAME, DISK_INODE, None))
        for name in sorted(node):
            entries.append((name, self._inode((*path, name)), node[name]))
        for i in range(start_id, len(entries)):
            name, ino, child = entries[i]
            if not pyfuse3.readdir_reply(token, name.encode(), self._attrs(ino, child), i + 1):
                break

    async def releasedir(self, fh: int) -> None:
        pass

    # -- files

    @_edge
    async def open(self, inode: int, flags: int, ctx: Any) -> Any:
        fh = next(self._next_fh)
        if inode == DISK_INODE:
            self._handles[fh] = None
            self.array.open_count += 1
            return pyfuse3.FileInfo(fh=fh, keep_cache=True)
        path, node = self._resolve(inode)
        if not isinstance(node, Attr):
            raise pyfuse3.FUSEError(errno.EISDIR)
        accmode = flags & os.O_ACCMODE
        if accmode != os.O_WRONLY and node.show is None:
            raise pyfuse3.FUSEError(errno.EACCES)
        if accmode != os.O_RDONLY and node.store is None:
            raise pyfuse3.FUSEError(errno.EACCES)
        content = b""
        if accmode != os.O_WRONLY:
            content = self.control.read(path).encode()
        self._handles[fh] = _ControlHandle(path, content)
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False, nonseekable=False)

    async def read(self, fh: int, off: int, size: int) -> Any:
        handle = self._handles.get(fh)
        if handle is None:
            buf = self._buffers.take(size)
            try:
                n = await self.array.readinto(off, memoryview(buf))
            except OSError as e:
                # Said here once: the node-level lines may not name it (an
                # error of the array itself, e.g. no in-sync replica).
                log.warning("%s: disk.img read %d+%d: %s", self.array.name, off, size, e)
                raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
            except Exception:
                log.exception("%s: read %d+%d failed", self.array.name, off, size)
                raise pyfuse3.FUSEError(errno.EIO) from None
            self._buffers.give(buf)  # safe: see the module's rules
            return memoryview(buf)[:n]
        return handle.content[off : off + size]

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self._handles.get(fh)
        if handle is None:
            try:
                return await self.array.write(off, buf)
            except OSError as e:
                log.warning("%s: disk.img write %d+%d: %s", self.array.name, off, len(buf), e)
                raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
            except Exception:
                log.exception("%s: write %d+%d failed", self.array.name, off, len(buf))
                raise pyfuse3.FUSEError(errno.EIO) from None
        return await self._store(handle, buf)

    @_edge
    async def _store(self, handle: _ControlHandle, buf: bytes) -> int:
        try:
            text = buf.decode()
        except UnicodeDecodeError:
            log.warning("%s: %s: refused non-UTF-8 input", self.array.name, "/".join(handle.path))
            raise pyfuse3.FUSEError(errno.EINVAL) from None
        await self.control.write(handle.path, text)
        return len(buf)

    async def flush(self, fh: int) -> None:
        pass

    @_edge
    async def fsync(self, fh: int, datasync: bool) -> None:
        if self._handles.get(fh, 0) is None:  # control files have nothing to make durable
            try:
                await self.array.flush()
            except OSError as e:
                log.warning("%s: disk.img fsync: %s", self.array.name, e)
                raise

    async def release(self, fh: int) -> None:
        if self._handles.pop(fh, 0) is None:
            self.array.open_count -= 1

    # -- everything else is refused clearly

    async def create(self, *args: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def mknod(self, *args: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def mkdir(self, *args: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def unlink(self, *args: Any) -> None:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def rmdir(self, *args: Any) -> None:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def rename(self, *args: Any) -> None:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def symlink(self, *args: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def link(self, *args: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EPERM)
