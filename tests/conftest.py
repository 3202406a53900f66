"""Shared fixtures. With DSTFS_REQUIRE_ALL=1 (set by .ci/run) a test that
would skip for a missing tool or privilege fails instead: CI must run them."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

REQUIRE_ALL = os.environ.get("DSTFS_REQUIRE_ALL") == "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_ALL and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"skipped under DSTFS_REQUIRE_ALL=1: {reason}"


@pytest.fixture(scope="session", autouse=True)
def _stale_namespaces() -> None:
    try:
        from helpers.netns import remove_stale_namespaces

        remove_stale_namespaces()
    except Exception:  # no ip(8) or no privilege: the netns tests will say so
        pass


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA with server and client certificates (openssl), per test module."""
    from helpers.certs import make_pki

    return make_pki(tmp_path_factory.mktemp("tls") / "pki")


@pytest.fixture(scope="module")
def cdir(pki: Path) -> Path:
    """A client's tls-certificates directory: the CA and a client certificate."""
    from helpers.certs import client_dir

    return client_dir(pki, pki.parent / "client")


@pytest.fixture(scope="module")
def cdir_no_cert(pki: Path) -> Path:
    """A client's tls-certificates directory with the CA only."""
    from helpers.certs import client_dir

    return client_dir(pki, pki.parent / "client-no-cert", with_client_cert=False)
