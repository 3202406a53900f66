"""`dstfs mount --export`: the mounted array served over NBD beside disk.img
(issue 16), checked with real NBD clients (nbdcopy, nbdinfo, qemu-img, fio)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from mounts import mounted
from procs import DSTFS, need

MiB = 1 << 20


def sh(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=True)


def node_files(tmp_path: Path, count: int = 2, size: int = 160 * MiB) -> list[str]:
    paths = []
    for i in range(count):
        p = tmp_path / f"n{i}.img"
        with open(p, "wb") as f:
            f.truncate(size)
        paths.append(str(p))
    return paths


def random_file(path: Path, size: int) -> Path:
    with open(path, "wb") as f, open("/dev/urandom", "rb") as r:
        left = size
        while left:
            chunk = r.read(min(left, 8 * MiB))
            f.write(chunk)
            left -= len(chunk)
    return path


def test_nbdcopy_through_the_export_equals_disk_img_both_ways(tmp_path: Path) -> None:
    need("nbdcopy")
    sock = tmp_path / "e.sock"
    uri = f"nbd+unix:///?socket={sock}"
    src = random_file(tmp_path / "src", 256 * MiB)
    with mounted(tmp_path, node_files(tmp_path), extra=["--export", f"unix:{sock}"]) as mnt:
        info = sh("nbdinfo", "--json", uri).stdout
        assert '"can_multi_conn": true' in info
        sh("nbdcopy", str(src), uri)
        sh("cmp", "-n", str(256 * MiB), str(src), str(mnt / "disk.img"))
        # The other way round: written through disk.img, read through the export.
        back = random_file(tmp_path / "back", 256 * MiB)
        sh("dd", f"if={back}", f"of={mnt / 'disk.img'}", "bs=4M", "conv=notrunc,fsync")
        out = tmp_path / "out"
        sh("nbdcopy", uri, str(out))
        sh("cmp", "-n", str(256 * MiB), str(back), str(out))


def test_export_on_a_non_loopback_address_is_refused_without_the_flag(tmp_path: Path) -> None:
    res = subprocess.run(
        [
            *DSTFS,
            "mount",
            str(tmp_path),
            "--state",
            str(tmp_path / "st"),
            "--export",
            "0.0.0.0:10809",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 1
    assert "--export-any-address" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "st").exists()  # refused before anything was created


@pytest.mark.parametrize("addr", ["unix:relative.sock", "localhost", "127.0.0.1:0", "[::1]:x"])
def test_a_malformed_export_address_is_one_line(tmp_path: Path, addr: str) -> None:
    res = subprocess.run(
        [*DSTFS, "mount", str(tmp_path), "--state", str(tmp_path / "st"), "--export", addr],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 1
    assert res.stderr.startswith("dstfs mount: --export")
