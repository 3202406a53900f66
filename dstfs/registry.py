"""Which daemon serves which mount point: one small JSON file per mount in
the runtime dir (`/run/dstfs` for root, else `$XDG_RUNTIME_DIR/dstfs`),
holding the daemon's pid, its state dir and the mount point.

Rules: the daemon writes its entry once mounted and removes it when it
stops; `dstfs umount` removes the entry of a daemon that died. A missing or
unreadable entry is "unknown", never an error. The daemon never computes a
path here from its own mount point once mounted (realpath() would stat it
and wait on itself): it resolves the path before mounting.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from dstfs import state


def runtime_dir() -> Path:
    if os.getuid() == 0:
        return Path("/run/dstfs")
    return Path(os.environ.get("XDG_RUNTIME_DIR", f"/tmp/dstfs-{os.getuid()}")) / "dstfs"


def registry_path(mountpoint: str) -> Path:
    """Never call with a path under our own mount from inside the daemon."""
    key = os.path.realpath(mountpoint).strip("/").replace("/", "_") or "_"
    return runtime_dir() / f"{key}.json"


def read_registry(mountpoint: str) -> dict | None:
    try:
        doc = json.loads(registry_path(mountpoint).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def write_registry(path: Path, pid: int, state_dir: Path, mountpoint: str) -> None:
    """Record the daemon `pid` of `mountpoint` at `path` (a registry_path()
    computed before mounting)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"pid": pid, "state": str(state_dir), "mountpoint": mountpoint}
    state.write_atomic(path, json.dumps(doc))


def remove_registry(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()
