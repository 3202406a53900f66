"""Test certificates: bench/benchlib/certs.py's openssl CA, server and client
certificates (one implementation for the bench's TLS servers and the tests),
and a client's certificates directory made from them."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from helpers.procs import need

# bench/ is not a package: its benchlib is imported the way tests/test_bench_report.py does.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from benchlib import certs


def make_pki(d: Path, cn: str = "dstfs test CA") -> Path:
    """A CA with a server and a client certificate in `d` (created)."""
    return certs.make_pki(d, cn, openssl=need("openssl"))


def client_dir(pki: Path, d: Path, with_client_cert: bool = True) -> Path:
    """A client's tls-certificates directory from `pki`: the CA, and the
    client certificate and key unless told not to."""
    d.mkdir(parents=True)
    shutil.copy(pki / "ca-cert.pem", d)
    if with_client_cert:
        shutil.copy(pki / "client-cert.pem", d)
        shutil.copy(pki / "client-key.pem", d)
    return d
