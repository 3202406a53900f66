"""The report: aligned text tables and the JSON of a run. Pure: figures in,
text and dicts out (medians, min-max spreads, ratios to the anchor row: nbdfuse
for the loop-device rows, nbdkit directly for the NBD rows; CPU µs per request
of the daemon and of the nodes), so it is tested with fixed
inputs (tests/test_bench_report.py)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from .config import JOBS, Job
from .extras import Measure
from .processes import one_line
from .rows import Row


def summary(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def fmt_value(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def fmt_ratio(v: float | None, ref: float | None) -> str:
    return "-" if v is None or not ref else f"{v / ref:.2f}x"


def short_error(text: str, limit: int = 44) -> str:
    text = one_line(text)
    return "error: " + (text if len(text) <= limit else text[: limit - 3] + "...")


def render(headers: list[str], body: list[list[str] | str], left: Sequence[int] = (0,)) -> str:
    """Aligned plain-text table: columns in ``left`` are left-aligned, the others right-aligned.

    A str entry in ``body`` is ``"name\tmessage"``: the name, then the message across the row.
    """
    widths = [len(h) for h in headers]
    for line in body:
        if isinstance(line, list):
            widths = [max(w, len(c)) for w, c in zip(widths, line, strict=True)]
        else:
            widths[0] = max(widths[0], len(line.split("\t", 1)[0]))

    def fmt(cells: list[str]) -> str:
        out = [
            c.ljust(w) if i in left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(out).rstrip()

    lines = [fmt(headers), "  ".join("-" * w for w in widths)]
    for line in body:
        if isinstance(line, list):
            lines.append(fmt(line))
        else:
            name, msg = line.split("\t", 1)
            lines.append(name.ljust(widths[0]) + "  " + msg)
    return "\n".join(lines)


def row_cell(row: Row, job: Job) -> str:
    if row.job_errors.get(job.key) and not row.samples.get(job.key):
        return short_error(row.job_errors[job.key][-1], 20)
    if row.error and not row.samples.get(job.key):
        return "error"
    v = summary(row.values(job))["median"]
    mark = "*" if row.job_errors.get(job.key) else ""
    return fmt_value(v) + mark


def cpu_cell(row: Row, job: Job) -> str:
    """Median µs of CPU per request, ``daemon/nodes`` ("-" for a side with no process)."""
    parts = []
    for who in ("daemon", "nodes"):
        med = summary(row.cpu_values(job, who))["median"]
        parts.append("-" if med is None else f"{med:.0f}")
    return "/".join(parts)


def ratio_table(rows: list[Row], anchor: Row | None, first: str) -> str:
    """Medians, each job's ratio to ``anchor``'s median, CPU µs per request, RSS."""
    headers = [first]
    for job in JOBS:
        headers += [f"{job.title} {job.unit}", "ratio", "µs/req d/n"]
    headers.append("RSS MiB")
    body: list[list[str] | str] = []
    for row in rows:
        if row.error and not any(row.samples.values()):
            body.append(f"{row.spec.name}\t{short_error(row.error, 90)}")
            continue
        cells = [row.spec.name]
        for job in JOBS:
            med = summary(row.values(job))["median"]
            ref = summary(anchor.values(job))["median"] if anchor else None
            cells += [row_cell(row, job), fmt_ratio(med, ref), cpu_cell(row, job)]
        rss = row.daemon_rss if row.spec.dstfs else None
        cells.append("-" if rss is None else f"{rss:.0f}")
        body.append(cells)
    return render(headers, body)


def anchor_of(rows: list[Row], row: Row) -> Row | None:
    return next((r for r in rows if r.spec.key == row.spec.anchor), None)


def main_tables(rows: list[Row]) -> str:
    """The loop-device rows with ratios to nbdfuse; the NBD rows (fio's nbd engine) with
    ratios to nbdkit directly; then every row's spread."""
    tables = []
    loop = [r for r in rows if not r.spec.nbd]
    if loop:
        tables.append(ratio_table(loop, anchor_of(rows, loop[0]), "row"))
    nbd = [r for r in rows if r.spec.nbd]
    if nbd:
        tables.append(ratio_table(nbd, anchor_of(rows, nbd[0]), "NBD row (fio nbd engine)"))
    spread: list[list[str] | str] = []
    for row in rows:
        if row.error and not any(row.samples.values()):
            spread.append(f"{row.spec.name}\terror")
            continue
        sp = [row.spec.name]
        for job in JOBS:
            s = summary(row.values(job))
            sp.append("-" if s["min"] is None else f"{s['min']:.0f}-{s['max']:.0f}")
        spread.append(sp)
    spread_headers = ["spread (min-max)"] + [f"{j.title} {j.unit}" for j in JOBS]
    tables.append(render(spread_headers, spread))
    return "\n\n".join(tables)


def extras_table(ms: dict[str, Measure]) -> str:
    """One line per measurement: median, spread, samples, the servers' median CPU µs per
    request (nbdcopy's, when measured), the ratio to its reference."""
    headers = ["measurement", "MB/s", "min-max", "n", "µs/req", "ratio", "ratio to"]
    body: list[list[str] | str] = []
    for m in ms.values():
        s = summary(m.samples)
        if not m.samples and m.errors:
            body.append(f"{m.title}\t{short_error(m.errors[-1], 90)}")
            continue
        ref = ms[m.ratio_to] if m.ratio_to else None
        unit = "" if m.unit == "MB/s" else f" {m.unit}"  # the column is MB/s unless it says
        ref_med = summary(ref.samples)["median"] if ref else None
        body.append(
            [
                m.title,
                fmt_value(s["median"]) + ("*" if m.errors else "") + unit,
                "-" if s["min"] is None else f"{s['min']:.0f}-{s['max']:.0f}",
                str(len(m.samples)),
                fmt_value(summary(m.cpu)["median"]) if m.cpu else "",
                fmt_ratio(s["median"], ref_med) if ref else "",
                ref.title if ref else "",
            ]
        )
    return render(headers, body, left=(0, 6))


def rows_json(rows: list[Row]) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        anchor = anchor_of(rows, row)
        jobs = {}
        for job in JOBS:
            s = summary(row.values(job))
            ref = summary(anchor.values(job))["median"] if anchor else None
            jobs[job.key] = {
                "title": job.title,
                "unit": job.unit,
                **s,
                "ratio_to": row.spec.anchor,
                "ratio": s["median"] / ref if s["median"] is not None and ref else None,
                "cpu_us_per_request": {
                    who: summary(row.cpu_values(job, who)) for who in ("daemon", "nodes")
                },
                "samples": row.samples.get(job.key, []),
                "errors": row.job_errors.get(job.key, []),
            }
        out.append(
            {
                "key": row.spec.key,
                "name": row.spec.name,
                "error": row.error,
                "setup": row.setup,
                "peak_rss_mib": row.peak_rss_mib,
                "daemon_peak_rss_mib": row.daemon_rss,
                "jobs": jobs,
            }
        )
    return out


def extras_json(ms: dict[str, Measure]) -> dict[str, Any]:
    out = {}
    for m in ms.values():
        s = summary(m.samples)
        ref = summary(ms[m.ratio_to].samples)["median"] if m.ratio_to else None
        out[m.key] = {
            "title": m.title,
            "unit": m.unit,
            **s,
            "ratio_to": m.ratio_to,
            "ratio": s["median"] / ref if s["median"] is not None and ref else None,
            "cpu_us_per_request": summary(m.cpu) if m.cpu else None,
            "samples": m.details,
            "errors": m.errors,
        }
    return out
