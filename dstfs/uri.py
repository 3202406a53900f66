"""Node addresses: NBD URIs (nbd-uri.md) and local paths, parsed once into a
frozen `NodeSpec`.

Rules: parsing is pure and strict. Anything we cannot honour (an unknown
scheme, a missing unix socket, a TLS parameter on a plain URI, a bad port or
size) is a `ValueError` with a message fit for a user, never a silent default.
- `nbds://` and `nbds+unix://` are TLS, never plain text; their query may
  hold `tls-certificates=DIR` (absolute: ca-cert.pem, client-cert.pem,
  client-key.pem), `tls-verify-peer=false` (no verification at all),
  `tls-hostname=NAME` (the name to verify instead of the URI's host; a unix
  socket has none, so without it only the chain is verified) and
  `tls-type=x509` (the only type).
"""

from __future__ import annotations

import os
import re
import urllib.parse

import attrs

DEFAULT_PORT = 10809
SECTOR = 512


@attrs.frozen
class NodeSpec:
    """Where a node's bytes live. `kind` is "nbd" (TCP), "nbd+unix" or "file"."""

    kind: str
    uri: str
    host: str | None = None
    port: int | None = None
    socket: str | None = None
    export: str = ""
    path: str | None = None
    #: Sectors of the node the array may use (None: the whole device).
    size: int | None = None
    #: nbds:// or nbds+unix://: TLS is required (see the module's rules).
    tls: bool = False
    tls_certificates: str | None = None
    tls_verify: bool = True
    tls_hostname: str | None = None

    @property
    def is_remote(self) -> bool:
        return self.kind != "file"

    def describe(self) -> str:
        """The seed's `type` text: `R: host:port` or `L: /path`."""
        if self.kind == "file":
            return f"L: {self.path}"
        if self.kind == "nbd+unix":
            return f"R: unix:{self.socket}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"R: {host}:{self.port}"

    def with_size(self, size: int | None) -> NodeSpec:
        return attrs.evolve(self, size=size)

    def to_text(self) -> str:
        """Round-trips through `parse_node`."""
        return self.uri if self.size is None else f"{self.uri},size={self.size}"


def parse_uri(uri: str) -> NodeSpec:
    """Parse an NBD URI or a local path (`file:///p` or a plain path)."""
    uri = uri.strip()
    if not uri:
        raise ValueError("empty node address")
    if "\x00" in uri or "\n" in uri:
        raise ValueError("node address contains a control character")
    if uri.startswith("/") or uri.startswith("./") or "://" not in uri:
        if ":" in uri.split("/", 1)[0]:
            raise ValueError(f"{uri!r}: not a URI (nbd://HOST:PORT/EXPORT) nor a path")
        path = os.path.abspath(uri)
        quoted = urllib.parse.quote(path, errors="surrogateescape", safe="/")
        return NodeSpec(kind="file", uri=f"file://{quoted}", path=path)
    # A raw comma would read as an option separator in `URI,size=N`.
    uri = uri.replace(",", "%2C")
    parts = urllib.parse.urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"{uri!r}: file URIs name a local path (file:///path)")
        path = urllib.parse.unquote(parts.path, errors="surrogateescape")
        if not path.startswith("/"):
            raise ValueError(f"{uri!r}: file URI needs an absolute path")
        return NodeSpec(kind="file", uri=uri, path=path)
    if scheme not in ("nbd", "nbd+unix", "nbds", "nbds+unix"):
        raise ValueError(
            f"{uri!r}: unknown scheme {scheme!r} (use nbd://, nbds://, nbd+unix://,"
            " nbds+unix:// or file://)"
        )
    tls = scheme.startswith("nbds")
    kind = scheme.replace("nbds", "nbd")
    export = urllib.parse.unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    if len(export.encode()) > 4096:
        raise ValueError(f"{uri!r}: export name longer than 4096 bytes")
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    allowed = {"socket"} if kind == "nbd+unix" else set()
    unknown = sorted(set(query) - allowed - _TLS_PARAMS)
    if unknown:
        raise ValueError(f"{uri!r}: unsupported URI parameter {unknown[0]!r}")
    for key, values in query.items():
        if len(values) > 1:
            raise ValueError(f"{uri!r}: URI parameter {key!r} given twice")
    tls_opts = _tls_options(uri, tls, {k: v[0] for k, v in query.items() if k in _TLS_PARAMS})
    if kind == "nbd+unix":
        sock = query.get("socket", [""])[0]
        if not sock:
            raise ValueError(f"{uri!r}: {scheme} URIs need ?socket=PATH")
        if parts.netloc:
            raise ValueError(f"{uri!r}: {scheme} URIs take no host")
        return NodeSpec(kind="nbd+unix", uri=uri, socket=sock, export=export, **tls_opts)
    host = parts.hostname
    if not host:
        raise ValueError(f"{uri!r}: nbd URIs need a host (nbd://HOST[:PORT]/EXPORT)")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{uri!r}: bad port") from None
    if port is None:
        port = DEFAULT_PORT
    if not 0 < port < 65536:
        raise ValueError(f"{uri!r}: port out of range")
    return NodeSpec(kind="nbd", uri=uri, host=host, port=port, export=export, **tls_opts)


_TLS_PARAMS = {"tls-certificates", "tls-verify-peer", "tls-hostname", "tls-type"}
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def _tls_options(uri: str, tls: bool, params: dict[str, str]) -> dict[str, object]:
    """The NodeSpec fields of the tls-* query parameters."""
    if not tls:
        if params:
            name = sorted(params)[0]
            raise ValueError(f"{uri!r}: {name} needs a TLS URI (nbds:// or nbds+unix://)")
        return {}
    out: dict[str, object] = {"tls": True}
    if "tls-type" in params and params["tls-type"].lower() != "x509":
        raise ValueError(f"{uri!r}: tls-type {params['tls-type']!r} (only x509 is supported)")
    if "tls-certificates" in params:
        certs = params["tls-certificates"]
        if not certs.startswith("/"):
            raise ValueError(f"{uri!r}: tls-certificates needs an absolute directory")
        out["tls_certificates"] = certs
    if "tls-verify-peer" in params:
        value = params["tls-verify-peer"].lower()
        if value not in _TRUE | _FALSE:
            raise ValueError(f"{uri!r}: tls-verify-peer is true or false, not {value!r}")
        out["tls_verify"] = value in _TRUE
    if "tls-hostname" in params:
        if not params["tls-hostname"]:
            raise ValueError(f"{uri!r}: empty tls-hostname")
        out["tls_hostname"] = params["tls-hostname"]
    return out


def parse_node(text: str) -> NodeSpec:
    """Parse `URI[,size=SECTORS]` or `URI size=SECTORS` (add_node syntax)."""
    text = text.strip()
    size: int | None = None
    head, sep, opts = text.partition(",")
    if not sep and " " in text:
        head, _, opts = text.partition(" ")
        sep = " "
    if sep:
        for item in opts.replace(" ", ",").split(","):
            if not item:
                continue
            key, eq, value = item.partition("=")
            if key != "size" or not eq:
                raise ValueError(f"unknown node option {item!r} (only size=SECTORS)")
            if not (value.isascii() and value.isdigit()) or int(value) <= 0:
                raise ValueError(f"size must be a positive number of sectors, not {value!r}")
            size = int(value)
    return parse_uri(head).with_size(size)


def parse_size(text: str) -> int:
    """Bytes from `1G`, `512M`, `64K`, `1GiB`, `4096` (binary units)."""
    m = re.fullmatch(r"(\d+)(?:([KMGT])(?:I?B)?)?", text.strip().upper(), re.ASCII)
    if m is None:
        raise ValueError(f"bad size {text!r} (e.g. 1G, 512M, 65536)")
    value = int(m.group(1)) << (10 * " KMGT".index(m.group(2) or " "))
    if value <= 0:
        raise ValueError(f"size must be positive, not {text!r}")
    return value
