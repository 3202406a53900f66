"""bench/benchlib/report.py with fixed inputs: the tables bench/run prints
(medians, min-max spreads, ratios to the nbdfuse row or for the NBD rows to
nbdkit directly, CPU µs per request of the daemon and the nodes or of
nbdcopy's servers, error cells, the daemon's RSS) and the JSON it writes,
down to the character."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from benchlib.config import JOBS, ROW_SPECS
from benchlib.extras import Measure
from benchlib.processes import cpu_seconds
from benchlib.report import (
    extras_json,
    extras_table,
    fmt_ratio,
    main_tables,
    render,
    rows_json,
    summary,
)
from benchlib.rows import Row, add_cpu

SPEC = {s.key: s for s in ROW_SPECS}


def row(
    key: str,
    values: dict[str, list[float]],
    cpu: dict[str, list[tuple[float | None, float | None]]] | None = None,
    **kw: object,
) -> Row:
    """A row with samples; ``cpu`` gives each sample's (daemon, nodes) µs per request."""
    r = Row(SPEC[key], **kw)  # type: ignore[arg-type]
    r.samples = {k: [{"value": v} for v in vs] for k, vs in values.items()}
    for k, pairs in (cpu or {}).items():
        for sample, (d, n) in zip(r.samples[k], pairs, strict=True):
            sample["cpu_us_per_request"] = {"daemon": d, "nodes": n}
    return r


def rows() -> list[Row]:
    anchor = row(
        "nbdfuse",
        {"seqwrite": [100, 300, 200], "seqread": [400], "randwrite": [1000], "randread": [2000]},
        cpu={"randread": [(30.4, 9.6)]},
    )
    linear = row(
        "linear-nbdkit",
        {"seqwrite": [50, 150, 100], "seqread": [800], "randwrite": [500], "randread": [3000]},
        cpu={
            "seqwrite": [(400.0, 90.0), (200.0, 110.0), (300.0, 100.0)],
            "randread": [(56.2, 12.0)],
        },
        peak_rss_mib={"linear-nbdkit": 61.4},
    )
    linear.daemon = type("P", (), {"name": "linear-nbdkit"})()  # only its name is read
    linear.job_errors = {"randread": ["fio randread rc=1: boom"]}
    broken = row("stripe-nbdkit", {}, error="nbdkit exited rc=1: cannot bind")
    half = row("tmpfs", {"seqwrite": [10]}, cpu={"seqwrite": [(None, None)]})
    half.job_errors = {"seqread": ["fio seqread timed out after 31s"]}
    return [linear, broken, half, anchor]


def test_summary_and_ratio() -> None:
    assert summary([3, 1, 2]) == {"median": 2, "min": 1, "max": 3}
    assert summary([]) == {"median": None, "min": None, "max": None}
    assert fmt_ratio(150, 100) == "1.50x"
    assert fmt_ratio(None, 100) == fmt_ratio(1, None) == fmt_ratio(1, 0) == "-"


def test_render_aligns_and_spans_messages() -> None:
    text = render(
        ["row", "a", "b"], [["x", "1", "22"], "long name\terror: it broke", ["yy", "333", "4"]]
    )
    assert text.splitlines() == [
        "row          a   b",
        "---------  ---  --",
        "x            1  22",
        "long name  error: it broke",
        "yy         333   4",
    ]


def test_main_tables() -> None:
    assert [j.key for j in JOBS] == ["seqwrite", "seqread", "randwrite", "randread"]
    assert main_tables(rows()).splitlines() == [
        "row                  seq write MB/s  ratio  µs/req d/n                seq read MB/s  ratio"
        "  µs/req d/n  rand write IOPS  ratio  µs/req d/n  rand read IOPS  ratio  µs/req d/n"
        "  RSS MiB",
        "-------------------  --------------  -----  ----------  ---------------------------  -----"
        "  ----------  ---------------  -----  ----------  --------------  -----  ----------"
        "  -------",
        "dstfs linear/nbdkit             100  0.50x     300/100                          800  2.00x"
        "         -/-              500  0.50x         -/-           3000*  1.50x       56/12"
        "       61",
        "dstfs stripe/nbdkit  error: nbdkit exited rc=1: cannot bind",
        "loop/tmpfs                       10  0.05x         -/-  error: fio seqread timed...      -"
        "         -/-                -      -         -/-               -      -         -/-"
        "        -",
        "nbdfuse/nbdkit                  200  1.00x         -/-                          400  1.00x"
        "         -/-             1000  1.00x         -/-            2000  1.00x       30/10"
        "        -",
        "",
        "spread (min-max)     seq write MB/s  seq read MB/s  rand write IOPS  rand read IOPS",
        "-------------------  --------------  -------------  ---------------  --------------",
        "dstfs linear/nbdkit          50-150        800-800          500-500       3000-3000",
        "dstfs stripe/nbdkit  error",
        "loop/tmpfs                    10-10              -                -               -",
        "nbdfuse/nbdkit              100-300        400-400        1000-1000       2000-2000",
    ]


def test_rows_json_ratios_and_errors() -> None:
    out = {r["key"]: r for r in rows_json(rows())}
    lin = out["linear-nbdkit"]["jobs"]
    assert lin["seqwrite"]["median"] == 100
    assert lin["seqwrite"]["ratio"] == pytest.approx(0.5)
    assert lin["seqwrite"]["ratio_to"] == "nbdfuse"
    assert lin["randread"]["ratio"] == pytest.approx(1.5)
    assert lin["randread"]["errors"] == ["fio randread rc=1: boom"]
    assert out["linear-nbdkit"]["daemon_peak_rss_mib"] == 61.4
    assert lin["seqwrite"]["cpu_us_per_request"] == {
        "daemon": {"median": 300.0, "min": 200.0, "max": 400.0},
        "nodes": {"median": 100.0, "min": 90.0, "max": 110.0},
    }
    assert lin["seqread"]["cpu_us_per_request"]["daemon"]["median"] is None
    assert out["stripe-nbdkit"]["error"] == "nbdkit exited rc=1: cannot bind"
    assert out["stripe-nbdkit"]["jobs"]["seqread"]["ratio"] is None
    assert out["nbdfuse"]["jobs"]["seqread"]["ratio"] == 1.0


def nbd_rows() -> list[Row]:
    direct = row(
        "nbdkit-nbd",
        {"seqwrite": [1000], "seqread": [2000], "randwrite": [40000], "randread": [60000]},
        cpu={"randread": [(None, 14.2)]},
    )
    export = row(
        "export",
        {"seqwrite": [250], "seqread": [1000], "randwrite": [4000], "randread": [3000]},
        cpu={"randread": [(230.0, 45.0)]},
        peak_rss_mib={"dstfs-export": 40.2},
    )
    export.daemon = type("P", (), {"name": "dstfs-export"})()
    return [export, direct]


def test_nbd_rows_get_their_own_table_and_anchor() -> None:
    """The NBD rows (fio's nbd engine) are compared with nbdkit directly, not nbdfuse."""
    lines = main_tables([rows()[-1], *nbd_rows()]).splitlines()
    assert lines[2].startswith("nbdfuse/nbdkit") and lines[3] == ""
    assert lines[4].split()[:4] == ["NBD", "row", "(fio", "nbd"]
    assert lines[6].startswith("dstfs export, linear/nbdkit ")
    export = " ".join(lines[6].split()[3:])
    assert export == "250 0.25x -/- 1000 0.50x -/- 4000 0.10x -/- 3000 0.05x 230/45 40"
    assert lines[7].split()[3:7] == ["1000", "1.00x", "-/-", "2000"]
    assert lines[9].startswith("spread (min-max)")
    assert [ln.split("  ")[0] for ln in lines[11:]] == [
        "nbdfuse/nbdkit",
        "dstfs export, linear/nbdkit",
        "nbdkit memory directly",
    ]
    out = {r["key"]: r for r in rows_json([rows()[-1], *nbd_rows()])}
    assert out["export"]["jobs"]["randread"]["ratio_to"] == "nbdkit-nbd"
    assert out["export"]["jobs"]["randread"]["ratio"] == pytest.approx(0.05)


def extras() -> dict[str, Measure]:
    tls = Measure("tls", "nbdcopy read, dstfs serve, TLS", ratio_to="tls-ref")
    tls.add(150.0, 500.0)
    tls.add(210.0, 300.0)
    ref = Measure("tls-ref", "nbdcopy read, nbdkit file, TLS")
    ref.add(200.0, 400.0)
    ms = [
        tls,
        ref,
        Measure("mig-idle", "migration copy, idle", samples=[200.0, 100.0, 300.0]),
        Measure(
            "mig-load",
            "migration copy, under load",
            ratio_to="mig-idle",
            samples=[50.0],
            errors=["one run failed"],
        ),
        Measure("copy", "nbdcopy read", errors=["nbdcopy rc=1: refused"]),
        Measure("rss", "mirror 64G sparse: daemon peak RSS", unit="MiB", samples=[93.4]),
    ]
    return {m.key: m for m in ms}


def test_extras_table_and_json() -> None:
    ms = extras()
    assert extras_table(ms).splitlines() == [
        "measurement                           MB/s  min-max  n  µs/req  ratio  ratio to",
        "----------------------------------  ------  -------  -  ------  -----"
        "  ------------------------------",
        "nbdcopy read, dstfs serve, TLS         180  150-210  2     400  0.90x"
        "  nbdcopy read, nbdkit file, TLS",
        "nbdcopy read, nbdkit file, TLS         200  200-200  1     400",
        "migration copy, idle                   200  100-300  3",
        "migration copy, under load             50*    50-50  1          0.25x"
        "  migration copy, idle",
        "nbdcopy read                        error: nbdcopy rc=1: refused",
        "mirror 64G sparse: daemon peak RSS  93 MiB    93-93  1",
    ]
    out = extras_json(ms)
    assert out["tls"]["ratio"] == pytest.approx(0.9)
    assert out["tls"]["cpu_us_per_request"] == {"median": 400.0, "min": 300.0, "max": 500.0}
    assert out["tls"]["samples"][0] == {"value": 150.0, "cpu_us_per_request": 500.0}
    assert out["mig-idle"]["cpu_us_per_request"] is None
    assert out["mig-load"]["ratio"] == pytest.approx(0.25)
    assert out["mig-idle"]["ratio"] is None
    assert out["copy"]["median"] is None and out["copy"]["errors"] == ["nbdcopy rc=1: refused"]


def test_cpu_per_request() -> None:
    sample: dict[str, object] = {"ios": 500}
    add_cpu(sample, {"daemon": 1.0, "nodes": 2.0}, {"daemon": 1.5, "nodes": None}, 100, 10100)
    assert sample["requests"] == 10000
    assert sample["cpu_us_per_request"] == {"daemon": pytest.approx(50.0), "nodes": None}
    # No sysfs count: fio's own.
    add_cpu(sample, {"daemon": 0.0}, {"daemon": 0.01}, None, None)
    assert sample["cpu_us_per_request"]["daemon"] == pytest.approx(20.0)  # type: ignore[index]
    own = cpu_seconds(os.getpid())
    assert own is not None and own > 0
