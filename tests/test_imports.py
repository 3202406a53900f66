"""No import cycles between dstfs modules (issue 12): every `import` and
`from ... import` in the package, at module level or inside a function, is
an edge; a strongly connected component of more than one module is a cycle.
Read with `ast`, so nothing is imported and a deferred import inside a
function counts too (it is how cycles hide). Imports under `if
TYPE_CHECKING:` are for annotations only, never run, and do not count."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "dstfs"


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()

    def owner(name: str) -> str | None:
        """The dstfs module `name` (a module or a name in one) lives in."""
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        deps: set[str | None] = set()
        for node in _runtime_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps.update(owner(a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                deps.update(owner(f"{base}.{a.name}") or owner(base) for a in node.names)
        graph[mod] = {d for d in deps if d is not None and d != mod}
    return graph


def _type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of `tree` but the bodies of `if TYPE_CHECKING:`."""
    out, todo = [], [tree]
    while todo:
        node = todo.pop()
        out.append(node)
        if _type_checking(node):
            assert isinstance(node, ast.If)
            todo.extend(node.orelse)
        else:
            todo.extend(ast.iter_child_nodes(node))
    return out


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_deferred_and_relative_imports() -> None:
    graph = import_graph()
    assert "dstfs.commands" in graph["dstfs.cli"]
    assert "dstfs.daemon" in graph["dstfs.commands"]  # imported inside a function
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    tree = ast.parse("if TYPE_CHECKING:\n    import x\nelse:\n    import z\nimport y\n")
    names = {a.name for n in _runtime_nodes(tree) if isinstance(n, ast.Import) for a in n.names}
    assert names == {"y", "z"}


def test_no_import_cycles_between_dstfs_modules() -> None:
    assert cycles(import_graph()) == []


def test_registry_and_defaults_live_outside_the_daemon() -> None:
    graph = import_graph()
    assert "dstfs.daemon" not in graph["dstfs.registry"] | graph["dstfs.defaults"]
    assert {"dstfs.registry", "dstfs.defaults"} <= graph["dstfs.commands"]


def test_io_types_import_nothing_of_dstfs() -> None:
    assert import_graph()["dstfs.iotypes"] == set()


def test_nbd_and_backends_are_layered() -> None:
    """The codec, the wire and the client sit below the backends (an
    NbdBackend uses the client) and share the I/O types of dstfs.iotypes;
    only the server, which serves a Backend, imports the backend interface."""
    graph = import_graph()
    for m in ("dstfs.nbd.protocol", "dstfs.nbd.sockio", "dstfs.nbd.transport", "dstfs.nbd.client"):
        assert not {d for d in graph[m] if d.startswith("dstfs.backends")}, m
    assert graph["dstfs.nbd.protocol"] <= {"dstfs.iotypes"}
