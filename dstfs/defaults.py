"""The built-in default array: what `dstfs mount` builds with no `--node`
and an empty state dir.

Rules: two 1 GiB sparse files in the state dir, created only if missing
(an existing file is never truncated or resized), each an entry that says
`serve`: the daemon exports it itself over NBD on loopback at every mount.
"""

from __future__ import annotations

from pathlib import Path

from dstfs import state
from dstfs.backends.file import create_sparse

DEFAULT_NODE_SIZE = 1 << 30
DEFAULT_NODES = 2


def default_config(
    name: str, state_dir: Path, alg: str = "alg_linear", options: dict[str, int] | None = None
) -> state.ArrayConfig:
    """The built-in array: two 1 GiB sparse files in the state dir, joined by
    `alg` (linear unless the user asked for another)."""
    entries = []
    for i in range(DEFAULT_NODES):
        path = state_dir / f"node-{i}.img"
        if not path.exists():
            create_sparse(str(path), DEFAULT_NODE_SIZE)
        entries.append(state.NodeEntry(serve=str(path)))
    return state.ArrayConfig(name=name, alg=alg, options=options or {}, nodes=tuple(entries))
