"""The export's access options (`dstfs mount --export-tls*`, `--export-allow`)
with real certificates (openssl, tests/helpers/certs.py) and real clients
(nbdinfo, nbdcopy), through `dstfs mount --no-fuse`; and which addresses
beyond loopback they open."""

from __future__ import annotations

import logging
import socket
import subprocess
from pathlib import Path

import pytest
from helpers.procs import DSTFS, need
from test_export import MiB, no_fuse, node_files, random_file

from dstfs.export import export_options
from dstfs.serve import warn_if_plain_text


def tls_args(pki: Path, ca: bool = True) -> list[str]:
    args = ["--export-tls-cert", str(pki / "server-cert.pem")]
    args += ["--export-tls-key", str(pki / "server-key.pem")]
    return args + (["--export-tls-ca", str(pki / "ca-cert.pem")] if ca else [])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    need(argv[0])
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def test_export_over_tls_with_client_certificates(
    tmp_path: Path, pki: Path, cdir: Path, cdir_no_cert: Path
) -> None:
    need("nbdcopy")
    port, sock = free_port(), tmp_path / "e.sock"
    nodes = node_files(tmp_path, 1, 32 * MiB)
    exports = [f"127.0.0.1:{port}", f"unix:{sock}"]
    with no_fuse(tmp_path / "st", nodes, exports, extra=tls_args(pki)) as res:
        assert res.returncode == 0, res.stderr
        assert f"nbds://127.0.0.1:{port}" in res.stdout
        assert f"nbds+unix:///?socket={sock}" in res.stdout
        uri = f"nbds://127.0.0.1:{port}/?tls-certificates={cdir}"
        info = run("nbdinfo", "--json", uri)
        assert info.returncode == 0, info.stderr
        assert '"export-size": 33554432' in info.stdout
        data = random_file(tmp_path / "data", 16 * MiB)
        assert run("nbdcopy", str(data), uri).returncode == 0
        out = tmp_path / "out"
        unix_uri = f"nbds+unix:///?socket={sock}&tls-certificates={cdir}&tls-hostname=localhost"
        got = run("nbdcopy", unix_uri, str(out))
        assert got.returncode == 0, got.stderr
        assert out.read_bytes()[: 16 * MiB] == data.read_bytes()
        # No TLS, or TLS without a client certificate: no data.
        assert run("nbdinfo", f"nbd://127.0.0.1:{port}").returncode != 0
        assert run("nbdinfo", f"nbd+unix:///?socket={sock}").returncode != 0
        no_cert = f"nbds://127.0.0.1:{port}/?tls-certificates={cdir_no_cert}"
        assert run("nbdinfo", no_cert).returncode != 0
        assert run("nbdinfo", "--json", uri).returncode == 0  # still serving


def test_export_allow_closes_other_peers(tmp_path: Path) -> None:
    port = free_port()
    nodes = node_files(tmp_path, 1, 4 * MiB)
    extra = ["--export-allow", "192.0.2.0/24", "--export-allow", "2001:db8::/32"]
    with no_fuse(tmp_path / "st", nodes, [f"127.0.0.1:{port}"], extra=extra) as res:
        assert res.returncode == 0, res.stderr
        assert run("nbdinfo", f"nbd://127.0.0.1:{port}").returncode != 0
        log = (tmp_path / "st" / "daemon.log").read_text()
        assert "refused: not in --allow" in log
    with no_fuse(
        tmp_path / "st2", nodes, [f"127.0.0.1:{port}"], extra=["--export-allow", "127.0.0.0/8"]
    ) as res:
        assert res.returncode == 0, res.stderr
        assert run("nbdinfo", f"nbd://127.0.0.1:{port}").returncode == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--export-tls", "require"], "--export-tls require needs --export-tls-cert and"),
        (
            ["--export-tls-cert", "/nonexistent/c.pem", "--export-tls-key", "/nonexistent/k.pem"],
            "TLS files",
        ),
        (["--export-tls", "off", "--export-tls-cert", "x"], "--export-tls off takes no"),
        (["--export-allow", "nope"], "--export-allow wants ADDR[/PREFIX]"),
        (["--export-allow", "10.0.0.0/33"], "--export-allow wants"),
        (["--export", "192.0.2.1:10809", "--export-allow", "192.0.2.0/24"], "--export-tls-ca"),
    ],
)
def test_bad_export_access_options_are_one_line_and_change_nothing(
    tmp_path: Path, args: list[str], message: str
) -> None:
    state = tmp_path / "st"
    argv = [*DSTFS, "mount", "--no-fuse", "--state", str(state), "--node", str(tmp_path / "n")]
    if "--export" not in args:
        argv += ["--export", f"unix:{tmp_path / 'e.sock'}"]
    res = subprocess.run([*argv, *args], capture_output=True, text=True, timeout=30)
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dstfs mount: ") and message in lines[0], lines
    assert not state.exists() and not (tmp_path / "e.sock").exists()


def test_addresses_beyond_loopback_need_authenticated_clients(pki: Path) -> None:
    cert, key, ca = (str(pki / f) for f in ("server-cert.pem", "server-key.pem", "ca-cert.pem"))
    far = ["192.0.2.1:10809", "[2001:db8::1]:10809"]
    opts = export_options(far, tls_cert=cert, tls_key=key, tls_ca=ca)
    assert [a.host for a in opts.addresses] == ["192.0.2.1", "2001:db8::1"]
    assert opts.authenticates and opts.tls_on
    refused = [
        {},  # plain text
        {"allow": ["192.0.2.0/24"]},  # an address proves nothing
        {"tls_cert": cert, "tls_key": key},  # encrypted, but anyone may connect
        {"tls_cert": cert, "tls_key": key, "tls_ca": ca, "tls": "allow"},  # plain still possible
    ]
    for kw in refused:
        with pytest.raises(ValueError, match="--export-any-address"):
            export_options(far, **kw)  # type: ignore[arg-type]
        export_options(far, any_address=True, **kw)  # type: ignore[arg-type]
        export_options(["127.0.0.1:10809", "unix:/x.sock"], **kw)  # type: ignore[arg-type]


def test_a_plain_text_export_beyond_loopback_warns(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="dstfs.serve"):
        assert warn_if_plain_text(["192.0.2.1"], tls_required=False, flag="--export-tls")
    (record,) = caplog.records
    message = record.getMessage()
    assert "192.0.2.1" in message and "plain text" in message
    assert "--export-tls-cert" in message and "--export-allow" in message
