#!/usr/bin/env python3
"""Turn ldt-bench's JSON lines (a guest console log) into markdown tables.

Usage: scripts/ldt-bench-table.py LOG

One table per experiment, trackers side by side; ratios are against the
untracked run of the same experiment in the same log (one run, one
machine).  Lines that are not ldt-bench JSON objects are ignored.
"""
import json
import statistics
import sys
from collections import defaultdict

TRACKERS = ["untracked", "soft-dirty", "pagemap-scan", "pagemap-scan-sd", "ldt"]


def load(path):
    rows = defaultdict(list)
    with open(path, errors="replace") as f:
        for line in f:
            line = line.strip().replace("\r", "")
            start = line.find('{"bench":')
            if start < 0:
                continue
            try:
                obj = json.loads(line[start:])
            except json.JSONDecodeError:
                continue
            rows[obj["bench"]].append(obj)
    return rows


def trackers(rows):
    seen = {r["tracker"] for r in rows}
    return [t for t in TRACKERS if t in seen]


def table(header, body):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    return "\n".join(out)


def write_table(rows):
    ts = trackers(rows)
    sizes = sorted({r["ws_mib"] for r in rows})
    best = {(r["tracker"], r["ws_mib"]): r["write_ms_best"] for r in rows}
    body = []
    for mib in sizes:
        base = best.get(("untracked", mib))
        cells = [mib]
        for t in ts:
            ms = best.get((t, mib))
            if ms is None:
                cells.append("–")
            elif base and t != "untracked":
                cells.append(f"{ms:.1f} ({ms / base:.1f}x)")
            else:
                cells.append(f"{ms:.1f}")
        body.append(cells)
    return ("Experiment 1, write: best ms to write 4096 bytes to every page "
            "(tracking reset before each pass)\n\n"
            + table(["MiB"] + ts, body))


def timeline_table(rows):
    body = []
    for t in trackers(rows):
        rs = [r for r in rows if r["tracker"] == t]
        ops = [r["ops_per_s"] for r in rs]
        body.append([t, len(rs), f"{statistics.mean(ops):.0f}", f"{min(ops):.0f}",
                     f"{statistics.mean(r['collect_ms'] for r in rs):.2f}"])
    return ("Experiment 2, timeline: operations/s per 100 ms interval, "
            "collecting after each\n\n"
            + table(["tracker", "intervals", "mean ops/s", "min ops/s",
                     "collect ms"], body))


def periodic_table(rows, name):
    base = [r["ops_per_s"] for r in rows if r["tracker"] == "untracked"]
    base = base[0] if base else None
    body = []
    for t in trackers(rows):
        for r in (r for r in rows if r["tracker"] == t):
            rel = f"{r['ops_per_s'] / base:.2f}" if base else "–"
            body.append([t, r["period_s"] or "–", f"{r['ops_per_s']:.0f}", rel,
                         r["rounds"], f"{r['collect_ms_mean']:.2f}",
                         f"{r['dirty_pages_mean']:.0f}"])
    return (f"Experiment 3, {name}: throughput while a tracker collects "
            "periodically\n\n"
            + table(["tracker", "period s", "ops/s", "vs untracked", "rounds",
                     "collect ms", "dirty pages"], body))


def collect_table(rows):
    ts = [t for t in trackers(rows) if t != "untracked"]
    pcts = sorted({r["written_pct"] for r in rows})
    ms = {(r["tracker"], r["written_pct"]): r["collect_ms"] for r in rows}
    body = [[p] + [f"{ms[(t, p)]:.2f}" if (t, p) in ms else "–" for t in ts]
            for p in pcts]
    mib = rows[0]["region_mib"]
    return (f"Experiment 4, collect: ms to collect the dirty information of a "
            f"{mib} MiB region after writing a share of it\n\n"
            + table(["% written"] + ts, body))


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__.strip())
    rows = load(sys.argv[1])
    if not rows:
        sys.exit(f"{sys.argv[1]}: no ldt-bench JSON lines")
    parts = []
    if rows.get("write"):
        parts.append(write_table(rows["write"]))
    if rows.get("timeline"):
        parts.append(timeline_table(rows["timeline"]))
    for name in ("kv", "redis"):
        if rows.get(name):
            parts.append(periodic_table(rows[name], name))
    if rows.get("collect"):
        parts.append(collect_table(rows["collect"]))
    print("\n\n".join(parts))


if __name__ == "__main__":
    main()
