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
- A number written to a control file is parsed by `parse_number` only:
  ASCII decimal digits with at most one decimal point and up to six
  decimals, no sign, exponent, `inf`/`nan`, `_` or non-ASCII digits, within
  the file's range (`timeout`: 0 to 31536000 s, a year). A number shown
  is written back as it reads.
- `n-*/timeout` is saved with the node in the state dir before it applies.
- This module knows nothing of FUSE: `dstfs.fs` renders it; tests drive it
  directly.
"""

from __future__ import annotations

import errno
import logging
import re
from collections.abc import Awaitable, Callable

import attrs

from dstfs import migrate, state
from dstfs.algorithms import ALGORITHMS
from dstfs.array import Array
from dstfs.metrics import render_metrics
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

#: [0-9] is ASCII only (\d would take "٣"); no sign, so no "-0".
_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]{1,6})?")


def parse_number(value: str, what: str, maximum: float, fraction: bool = True) -> float:
    """`value` (a stripped control-file write) as a number in 0..maximum:
    ASCII decimal, one optional decimal point with up to six decimals if
    `fraction`. ControlError(EINVAL), naming `what`, for anything else."""
    if _NUMBER.fullmatch(value) is None or (not fraction and "." in value):
        kind = "a decimal number" if fraction else "a whole number"
        raise ControlError(errno.EINVAL, f"{what} is {kind} from 0 to {show_number(maximum)}")
    # Compare exactly before converting: a long run of digits stays an int.
    whole, _, decimals = value.partition(".")
    too_long = len(whole.lstrip("0")) > 18  # int() of 4300+ digits raises
    if too_long or int(whole) > maximum or (int(whole) == maximum and decimals.strip("0")):
        raise ControlError(errno.EINVAL, f"{what} is at most {show_number(maximum)}")
    return float(value) if fraction else int(whole)


def show_number(value: float) -> str:
    """A number as parse_number reads it back: no exponent, no trailing zeros."""
    return f"{value:.6f}".rstrip("0").rstrip(".")


def _value(text: str) -> str:
    """The written value: one trailing newline dropped, nothing else odd."""
    if text.endswith("\n"):
        text = text[:-1]
    if not text or "\n" in text or not text.isprintable():
        raise ControlError(errno.EINVAL, f"expected one line of text, got {text!r}")
    return text.strip()


class ControlTree:
    def __init__(self, array: Array):
        self.array = array

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
            "jobs": Attr(show=a.jobs.render),
            "metrics": Attr(show=lambda: render_metrics(a, self._node_state)),
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
            "timeout": Attr(
                show=lambda: show_number(node.timeout) + "\n", store=self._timeout_store(node)
            ),
            "suspend": Attr(
                show=lambda: f"{int(node.suspended)}\n", store=self._suspend_store(node)
            ),
        }
        if self.array.replicas is not None:
            rs = self.array.replicas
            t["dirty"] = Attr(show=lambda: f"{rs.dirty_of(node)}\n")
        t["migrate"] = Attr(
            show=lambda: migrate.status(self.array, node),
            store=lambda v: migrate.migrate(self.array, node, v),
        )
        t["target"] = Attr(
            show=lambda: node.spec.uri + "\n",
            store=lambda v: migrate.repoint(self.array, node, v),
        )
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
            seconds = parse_number(value, "timeout", state.MAX_TIMEOUT)
            a = self.array
            if node not in a.nodes:
                raise ControlError(errno.ENODEV, "the node is gone")
            entries = list(a.entries)
            i = a.nodes.index(node)
            entries[i] = attrs.evolve(entries[i], timeout=seconds)
            old, a.entries = a.entries, entries
            try:  # saved first: a timeout the state dir does not hold is not set
                a.persist()
            except OSError:
                a.entries = old
                raise
            node.timeout = seconds

        return store
