"""Throwaway certificates made with the openssl command line: a CA, a server
certificate for 127.0.0.1/::1/localhost and (optionally) a client certificate,
laid out as nbdkit, qemu and libnbd expect a certificates directory
(ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem, client-key.pem).

Standard library only and nothing else of the bench imported: bench/run makes
its TLS servers' certificates with it, and tests/helpers/certs.py the tests'.
Failures raise what subprocess raises (OSError, CalledProcessError,
TimeoutExpired); callers turn them into their own errors."""

from __future__ import annotations

import subprocess
from pathlib import Path

EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def _openssl(openssl: str, *args: str, cwd: Path) -> None:
    subprocess.run([openssl, *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _key_and_cert(openssl: str, cwd: Path, name: str, cn: str, ext: str) -> None:
    """A key and a certificate for it signed by the CA in ``cwd``, with extensions ``ext``."""
    _openssl(
        openssl, "req", *EC_KEY, "-keyout", f"{name}-key.pem", "-out", f"{name}.csr",
        "-subj", f"/CN={cn}",
        cwd=cwd,
    )  # fmt: skip
    (cwd / f"{name}.ext").write_text(ext)
    _openssl(
        openssl, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca-cert.pem",
        "-CAkey", "ca-key.pem", "-CAcreateserial", "-out", f"{name}-cert.pem", "-days", "2",
        "-extfile", f"{name}.ext",
        cwd=cwd,
    )  # fmt: skip
    (cwd / f"{name}.csr").unlink()


def make_pki(
    d: Path, cn: str = "dstfs test CA", client: bool = True, openssl: str = "openssl"
) -> Path:
    """A CA and a server certificate (and a client one unless ``client`` is False) in ``d``,
    which is created; returns ``d``."""
    d.mkdir(parents=True)
    _openssl(
        openssl, "req", "-x509", *EC_KEY, "-keyout", "ca-key.pem", "-out", "ca-cert.pem",
        "-days", "2", "-subj", f"/CN={cn}",
        cwd=d,
    )  # fmt: skip
    _key_and_cert(
        openssl,
        d,
        "server",
        "localhost",
        "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1\nextendedKeyUsage=serverAuth\n",
    )
    if client:
        _key_and_cert(openssl, d, "client", "dstfs test client", "extendedKeyUsage=clientAuth\n")
    return d
