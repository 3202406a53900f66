"""Test certificates made with the openssl command line: a CA, a server
certificate for 127.0.0.1/::1/localhost and a client certificate, laid out
as nbdkit, qemu and libnbd expect a certificates directory (ca-cert.pem,
server-cert.pem, server-key.pem, client-cert.pem, client-key.pem)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from helpers.procs import need


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run([need("openssl"), *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _key_and_csr(cwd: Path, name: str, cn: str) -> None:
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}-key.pem", "-out", f"{name}.csr", "-subj", f"/CN={cn}",
        cwd=cwd,
    )  # fmt: skip


def _sign(cwd: Path, name: str, ext: str) -> None:
    (cwd / f"{name}.ext").write_text(ext)
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
        "-CAcreateserial", "-out", f"{name}-cert.pem", "-days", "2",
        "-extfile", f"{name}.ext",
        cwd=cwd,
    )  # fmt: skip


def make_pki(d: Path, cn: str = "dstfs test CA") -> Path:
    """A CA with a server and a client certificate in `d` (created)."""
    d.mkdir(parents=True)
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", "ca-key.pem", "-out", "ca-cert.pem", "-days", "2",
        "-subj", f"/CN={cn}",
        cwd=d,
    )  # fmt: skip
    _key_and_csr(d, "server", "localhost")
    _sign(
        d,
        "server",
        "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1\nextendedKeyUsage=serverAuth\n",
    )
    _key_and_csr(d, "client", "dstfs test client")
    _sign(d, "client", "extendedKeyUsage=clientAuth\n")
    for f in d.glob("*.csr"):
        f.unlink()
    return d


def client_dir(pki: Path, d: Path, with_client_cert: bool = True) -> Path:
    """A client's tls-certificates directory from `pki`: the CA, and the
    client certificate and key unless told not to."""
    d.mkdir(parents=True)
    shutil.copy(pki / "ca-cert.pem", d)
    if with_client_cert:
        shutil.copy(pki / "client-cert.pem", d)
        shutil.copy(pki / "client-key.pem", d)
    return d
