"""The control tree: sysfs-like attributes over a running array.

Rules:
- A file is an `Attr` with `show()` (text, one value, newline-terminated)
  and/or `store(value)`; a directory is a dict. The tree is rebuilt from the
  array on every lookup, so it never disagrees with it.
- A write is one line of printable text; one trailing newline is dropped
  and surrounding blanks stripped, once, before `store(value)` sees it.
  Anything else is EINVAL. Bad input raises `ControlError(errno, reason)`
  before anything changes: EINVAL for garbage, EBUSY/ENODEV/ECONNREFUSED...
  where that is the truth.
- This module knows nothing of FUSE: `dstfs.fs` renders it; tests drive it
  directly.
"""

from __future__ import annotations

import errno
import logging
import math
from collections.abc import Awaitable, Callable

import attrs

from dstfs.algorithms import ALGORITHMS
from dstfs.array import Array
from dstfs.node import Node, render_counters

log = logging.getLogger(__name__)

MAX_WRITE = 4096


class ControlError(Exception):
    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err
        self.message = message


@attrs.frozen
class Attr:
    show: Callable[[], str] | None = None
    store: Callable[[str], Awaitable[None]] | None = None

    @property
    def mode(self) -> int:
        return (0o444 if self.show else 0) | (0o200 if self.store else 0)


Tree = dict[str, "Attr | Tree"]


def _value(text: str) -> str:
    """The written value: one trailing newline dropped, nothing else odd."""
    if text.endswith("\n"):
        text = text[:-1]
    if not text or "\n" in text or not text.isprintable():
        raise ControlError(errno.EINVAL, f"expected one line of text, got {text!r}")
    return text.strip()


class ControlTree:
    def __init__(self, array: Array, extra_node_attrs: Callable[[Node], Tree] | None = None):
        self.array = array
        #: Hook for later features (migration) to add files to n-*/.
        self.extra_node_attrs = extra_node_attrs

    # -- the tree

    def tree(self) -> Tree:
        a = self.array
        root: Tree = {
            "name": Attr(show=lambda: a.name + "\n"),
            "alg": Attr(show=lambda: a.alg_name + "\n", store=self._store_alg),
            "size": Attr(show=lambda: f"{a.size // 512}\n"),
            "nodes": Attr(show=self._show_nodes),
            "add_node": Attr(store=self._store_add_node),
            "remove_all_nodes": Attr(store=self._store_remove_all),
            "stats": Attr(show=self._show_stats),
        }
        if a.replicas is not None:
            rs = a.replicas
            root["degraded"] = Attr(show=lambda: f"{rs.degraded}\n")
            root["sync_action"] = Attr(
                show=lambda: rs.sync_action + "\n", store=self._store_sync_action
            )
            root["sync_completed"] = Attr(show=rs.show_sync)
            root["mismatch_cnt"] = Attr(show=lambda: f"{rs.stats.mismatch_cnt}\n")
        for i, node in enumerate(a.nodes):
            root[a.node_dir_name(i)] = self._node_tree(node)
        return root

    def _node_tree(self, node: Node) -> Tree:
        t: Tree = {
            "type": Attr(show=lambda: node.spec.describe() + "\n"),
            "start": Attr(show=lambda: f"{node.start}\n"),
            "size": Attr(show=lambda: f"{node.sectors}\n"),
            "state": Attr(show=lambda: self._node_state(node) + "\n"),
            "stats": Attr(show=lambda: node.stats.snapshot().render()),
            "timeout": Attr(show=lambda: f"{node.timeout:g}\n", store=self._timeout_store(node)),
            "suspend": Attr(
                show=lambda: f"{int(node.suspended)}\n", store=self._suspend_store(node)
            ),
        }
        if self.array.replicas is not None:
            rs = self.array.replicas
            t["dirty"] = Attr(show=lambda: f"{rs.dirty_of(node)}\n")
        if self.extra_node_attrs is not None:
            t.update(self.extra_node_attrs(node))
        return t

    def _node_state(self, node: Node) -> str:
        if self.array.replicas is not None:
            return self.array.replicas.state_of(node)
        return node.state.value

    def _show_stats(self) -> str:
        text = self.array.stats.render()
        if self.array.replicas is not None:
            text += render_counters(self.array.replicas.stats)
        return text

    def lookup(self, path: tuple[str, ...]) -> Attr | Tree | None:
        cur: Attr | Tree = self.tree()
        for part in path:
            if not isinstance(cur, dict) or part not in cur:
                return None
            cur = cur[part]
        return cur

    def read(self, path: tuple[str, ...]) -> str:
        attr = self.lookup(path)
        if not isinstance(attr, Attr):
            raise ControlError(errno.ENOENT, f"no control file {'/'.join(path)}")
        if attr.show is None:
            raise ControlError(errno.EACCES, f"{'/'.join(path)} is write-only")
        return attr.show()

    async def write(self, path: tuple[str, ...], text: str) -> None:
        attr = self.lookup(path)
        name = "/".join(path)
        if not isinstance(attr, Attr):
            raise ControlError(errno.ENOENT, f"no control file {name}")
        if attr.store is None:
            raise ControlError(errno.EACCES, f"{name} is read-only")
        if len(text) > MAX_WRITE:
            raise ControlError(errno.EINVAL, f"{name}: value too long")
        try:
            await attr.store(_value(text))
        except ControlError as e:
            log.warning("%s: %s: refused %r: %s", self.array.name, name, text, e.message)
            raise
        except OSError as e:  # ArrayError and friends carry the true errno
            log.warning("%s: %s: refused %r: %s", self.array.name, name, text, e.strerror or e)
            raise ControlError(e.errno or errno.EIO, e.strerror or str(e)) from None
        log.info("%s: %s <- %r", self.array.name, name, text.rstrip("\n"))

    # -- show

    def _show_nodes(self) -> str:
        ranges = " | ".join(f"{n.start} [{n.sectors}]" for n in self.array.nodes)
        return f"sectors (start [size]): {ranges}\n"

    # -- store

    async def _store_alg(self, value: str) -> None:
        if value not in ALGORITHMS:
            raise ControlError(errno.EINVAL, f"unknown algorithm {value!r}")
        self.array.set_alg(value)

    async def _store_sync_action(self, value: str) -> None:
        if value not in ("check", "repair", "idle"):
            raise ControlError(errno.EINVAL, "write check, repair or idle")
        assert self.array.replicas is not None
        self.array.replicas.start_verify(value)

    async def _store_add_node(self, value: str) -> None:
        await self.array.add_node(value)

    async def _store_remove_all(self, value: str) -> None:
        if value != "1":
            raise ControlError(errno.EINVAL, "write 1 to remove every node")
        await self.array.remove_all_nodes()

    def _suspend_store(self, node: Node) -> Callable[[str], Awaitable[None]]:
        async def store(value: str) -> None:
            if value == "1":
                await node.suspend()
            elif value == "0":
                node.resume()
            else:
                raise ControlError(errno.EINVAL, "write 1 to suspend, 0 to resume")

        return store

    def _timeout_store(self, node: Node) -> Callable[[str], Awaitable[None]]:
        async def store(value: str) -> None:
            try:
                seconds = float(value)
            except ValueError:
                seconds = -1.0
            if not math.isfinite(seconds) or seconds < 0:
                raise ControlError(errno.EINVAL, "timeout is a number of seconds >= 0")
            node.timeout = seconds

        return store
