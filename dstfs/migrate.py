"""Live migration (placeholder until issue 4's work lands)."""

from __future__ import annotations

from collections.abc import Callable

from dstfs.array import Array
from dstfs.control import Tree
from dstfs.node import Node


def migration_attrs(array: Array) -> Callable[[Node], Tree]:
    def attrs_for(node: Node) -> Tree:
        return {}

    return attrs_for
