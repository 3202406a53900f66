"""The array's configuration on disk: STATE_DIR/array.json.

Rules: written atomically (temp file, fsync, rename, fsync of the directory)
so a crash leaves the old or the new file, never a torn one. Read strictly:
a file we cannot understand is an error, not an empty array.

A node entry is either `{"uri": ..., "size": SECTORS|null}` or, for the
built-in default array, `{"serve": PATH, "size": ...}`: a file the daemon
serves itself over NBD on a loopback port at each mount. Either may carry
`"timeout": SECONDS` (the node's timeout, set through its control file); an
absent field means the default (any version).

Versions: 1 had no replica state. 2 adds the array's `generation` and, for a
mirror's replicas, `synced`: the generation at which the replica was last
known in sync (absent: never). A version 1 file loads as generation 0 with no
replica state, and is rewritten as version 2 (atomically) at the first mount.
The mirror's write-intent bitmaps are files beside it (dstfs.bitmap).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import attrs

from dstfs.uri import parse_node

STATE_FILE = "array.json"
VERSION = 2
#: Versions this release reads (older ones are upgraded when next written).
READABLE = (1, 2)
#: The longest node timeout, in seconds (a year): the control file and the
#: state file accept 0 <= timeout <= this.
MAX_TIMEOUT = 86400 * 365


@attrs.frozen
class NodeEntry:
    uri: str | None = None
    serve: str | None = None
    size: int | None = None
    #: Mirror replicas: the array generation at which it was last in sync.
    synced: int | None = None
    #: Seconds I/O waits for this node when lost (None: the default).
    timeout: float | None = None

    def __attrs_post_init__(self) -> None:
        if (self.uri is None) == (self.serve is None):
            raise ValueError("a node entry has exactly one of uri and serve")
        if self.uri is not None:
            parse_node(self.uri)  # validate
        if self.size is not None and self.size <= 0:
            raise ValueError("node size must be positive")
        if self.timeout is not None and (
            isinstance(self.timeout, bool)
            or not isinstance(self.timeout, int | float)
            or not (math.isfinite(self.timeout) and 0 <= self.timeout <= MAX_TIMEOUT)
        ):
            raise ValueError(f"node timeout must be 0..{MAX_TIMEOUT} seconds")


@attrs.frozen
class ArrayConfig:
    name: str
    alg: str = "alg_linear"
    options: dict[str, int] = attrs.field(factory=dict)
    nodes: tuple[NodeEntry, ...] = ()
    #: Goes up each time a mirror's in-sync set shrinks (see NodeEntry.synced).
    generation: int = 0


def default_state_dir(name: str) -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "dstfs" / name


def load(state_dir: Path) -> ArrayConfig | None:
    """The saved config, or None when the directory holds none."""
    path = state_dir / STATE_FILE
    try:
        raw = path.read_text()
    except FileNotFoundError:
        return None
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        if not isinstance(doc.get("options", {}), dict) or not isinstance(doc["nodes"], list):
            raise ValueError("options must be an object and nodes a list")
        if doc.get("version") not in READABLE:
            raise ValueError(f"unknown version {doc.get('version')!r}")
        return ArrayConfig(
            name=str(doc["name"]),
            alg=str(doc["alg"]),
            options={str(k): int(v) for k, v in doc.get("options", {}).items()},
            nodes=tuple(NodeEntry(**n) for n in doc["nodes"]),
            generation=int(doc.get("generation", 0)),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not a dstfs state file: {e}") from None


def save(state_dir: Path, config: ArrayConfig) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    doc = {
        "version": VERSION,
        "name": config.name,
        "alg": config.alg,
        "options": config.options,
        "generation": config.generation,
        "nodes": [
            {k: v for k, v in attrs.asdict(n).items() if v is not None} for n in config.nodes
        ],
    }
    write_atomic(state_dir / STATE_FILE, json.dumps(doc, indent=2) + "\n")


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
