#!/usr/bin/python3
"""Draw the project's figures from the raw results of scripts/report.sh.

Usage: scripts/report/plot.py DIR

Reads only DIR/raw/*.json (see schema.py for what each holds; a file that
does not fit is refused with the first problems found), writes each figure
as DIR/NAME.png and DIR/NAME.svg and the page DIR/index.html, which shows
them with one line each on what was measured and how.  DIR/raw/NAME.skipped
(one line of text) says why a result is missing; the page lists it.  So
any report can be redrawn without rerunning: scripts/report.sh --replot DIR.
"""
import html
import json
import os
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import schema  # noqa: E402
from stats import pct  # noqa: E402

# One colour per tracker / dirty source, the same in every figure.
COLOURS = {
    "untracked": "#555555",
    "soft-dirty": "#d62728",
    "pagemap-scan": "#ff7f0e",
    "pagemap-scan-sd": "#ff7f0e",
    "ldt": "#1f77b4",
    "kvm-bitmap": "#d62728",
    "kvm-clear": "#ff7f0e",
    "kvm-ring": "#9467bd",
    "host-ldt": "#1f77b4",
    "guest-ldt": "#2ca02c",
    "qemu": "#8c564b",
}
ORDER = ["untracked", "soft-dirty", "pagemap-scan", "pagemap-scan-sd", "ldt",
         "kvm-bitmap", "kvm-clear", "kvm-ring", "host-ldt", "guest-ldt",
         "qemu"]

plt.rcParams.update({
    "figure.dpi": 100,
    "savefig.dpi": 110,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "font.size": 9,
    "legend.fontsize": 8,
    "svg.hashsalt": "ldt-vmm",  # stable ids: the same data, the same SVG
})


class BadInput(Exception):
    pass


def colour(name):
    # A mode's variants ("host-ldt+pin") take the colour of the mode.
    return COLOURS.get(name) or COLOURS.get(name.split("+")[0])


def ordered(names):
    # In ORDER by the mode a variant belongs to, unknown names last.
    def key(n):
        base = n.split("+")[0]
        return (ORDER.index(base) if base in ORDER else len(ORDER), n)
    return sorted(set(names), key=key)


def load(raw):
    """{file name: data} of every known raw file present, each checked."""
    found = {}
    for name in schema.FILES:
        path = os.path.join(raw, name)
        if not os.path.exists(path):
            continue
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise BadInput(f"{path}: not JSON: {e}")
        errs = schema.check_file_data(name, data)
        if errs:
            more = f" (and {len(errs) - 5} more)" if len(errs) > 5 else ""
            raise BadInput(f"{path} does not match what the figures read: "
                           + "; ".join(errs[:5]) + more)
        found[name] = data
    return found


def skipped(raw):
    """{result name: reason} from DIR/raw/*.skipped."""
    out = {}
    for f in sorted(os.listdir(raw)):
        if f.endswith(".skipped"):
            with open(os.path.join(raw, f)) as fh:
                out[f[:-len(".skipped")]] = fh.read().strip()
    return out


def save(fig, out, name):
    # No date in the SVG: redrawing the same data gives the same file.
    fig.savefig(os.path.join(out, name + ".png"))
    fig.savefig(os.path.join(out, name + ".svg"), metadata={"Date": None})
    plt.close(fig)


def stamp(fig, meta):
    """Where and when, in small print at the bottom left."""
    fig.text(0.005, 0.005, f"{meta['date']}, git {meta['git']}\n"
             f"{meta['machine']}", fontsize=6, color="#777777",
             ha="left", va="bottom")


def run_kind(data):
    g = data["guest"]
    return f"ldt-bench {g['mode']} run, {g['cpus']} vCPU"


# ---- figure 1: the LDT paper's four experiments (ldt-bench) ---------------

def by_bench(rows, bench):
    return [r for r in rows if r["bench"] == bench]


def tracker_lines(ax, rows, x, y, fmt="o-", scale=1.0, skip=()):
    """One line per tracker of rows: y against x (row keys), sorted by x."""
    for t in ordered(r["tracker"] for r in rows if r["tracker"] not in skip):
        rs = sorted((r for r in rows if r["tracker"] == t), key=lambda r: r[x])
        ax.plot([r[x] for r in rs], [r[y] * scale for r in rs], fmt,
                color=colour(t), label=t)


def finish(fig, out, name, meta):
    """Stamp, lay out and save a figure."""
    stamp(fig, meta)
    fig.tight_layout(rect=(0, 0.045, 1, 1))
    save(fig, out, name)


def fig_ldt_write(data, out):
    rows = by_bench(data["rows"], "write")
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    tracker_lines(ax, rows, "ws_mib", "write_ms_best")
    ax.set_xscale("log", base=2)
    sizes = sorted({r["ws_mib"] for r in rows})
    ax.set_xticks(sizes)
    ax.set_xticklabels([str(m) for m in sizes])
    ax.set_yscale("log")
    ax.set_xlabel("working set (MiB)")
    ax.set_ylabel("time to write every page once (ms, best pass, log)")
    ax.set_title(f"Experiment 1: write cost under each tracker\n({run_kind(data)})")
    ax.legend()
    finish(fig, out, "ldt-write", data["meta"])
    return ("ldt-write", "Experiment 1 (ldt-bench write): in the guest, the "
            "best time of a pass writing 4096 bytes to every page of a working "
            "set, with the tracker reset (collected) before each pass; one line "
            "per tracker.")


def fig_ldt_timeline(data, out):
    rows = by_bench(data["rows"], "timeline")
    if not rows:
        return None
    # Time at the end of each interval, from the measured interval lengths.
    rows = sorted(rows, key=lambda r: (r["tracker"], r["interval"]))
    points = []
    ends = {}
    for r in rows:
        ends[r["tracker"]] = ends.get(r["tracker"], 0.0) + r["interval_ms"] / 1e3
        points.append(dict(r, t_s=ends[r["tracker"]]))
    fig, ax = plt.subplots(figsize=(6, 4))
    tracker_lines(ax, points, "t_s", "ops_per_s", fmt=".-", scale=1e-3)
    ax.set_xlabel("time (s, end of each interval)")
    ax.set_ylabel("throughput (thousand 4 KiB ops/s)")
    ax.set_ylim(bottom=0)
    ax.set_title("Experiment 2: throughput, collecting after each interval\n"
                 f"({run_kind(data)})")
    ax.legend()
    finish(fig, out, "ldt-timeline", data["meta"])
    return ("ldt-timeline", "Experiment 2 (ldt-bench timeline): 4 KiB operations "
            "on random pages (25% reads, 75% writes) per ~100 ms interval, the "
            "tracker collecting and resetting after each interval.")


def fig_ldt_periodic(data, out):
    panels = [(b, by_bench(data["rows"], b)) for b in ("kv", "redis")]
    panels = [(b, rs) for b, rs in panels if rs]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4),
                             squeeze=False)
    for ax, (bench, rows) in zip(axes[0], panels):
        base = [r["ops_per_s"] for r in rows if r["tracker"] == "untracked"]
        if base:
            ax.axhline(base[0] / 1e3, color=colour("untracked"), ls="--",
                       label="untracked")
        tracker_lines(ax, rows, "period_s", "ops_per_s", scale=1e-3,
                      skip=("untracked",))
        ax.set_xticks(sorted({r["period_s"] for r in rows if r["period_s"] > 0}))
        ax.set_xlabel("collection period (s)")
        ax.set_ylabel("throughput (thousand ops/s)")
        ax.set_ylim(bottom=0)
        ax.set_title("in-process key-value store" if bench == "kv"
                     else "Redis server, tracked from outside")
        ax.legend()
    fig.suptitle("Experiment 3: throughput while a tracker collects periodically "
                 f"({run_kind(data)})")
    finish(fig, out, "ldt-periodic", data["meta"])
    return ("ldt-periodic", "Experiment 3 (ldt-bench kv, redis): a YCSB-like load "
            "(zipfian keys, 4 KiB values, 25% gets) on an in-process store and on "
            "Redis, while a tracker collects every period; dashed: untracked.")


def fig_ldt_collect(data, out):
    rows = by_bench(data["rows"], "collect")
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    tracker_lines(ax, rows, "written_pct", "collect_ms")
    ax.set_xlabel(f"share of the {rows[0]['region_mib']} MiB region written (%)")
    ax.set_ylabel("time to collect the dirty pages (ms)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"Experiment 4: collection time\n({run_kind(data)})")
    ax.legend()
    finish(fig, out, "ldt-collect", data["meta"])
    return ("ldt-collect", "Experiment 4 (ldt-bench collect): time to read the "
            "dirty information of a region after writing every (100/p)-th page.")


# ---- figure 2: VM dirty tracking (ldt-vmm bench dirty) --------------------

def fig_dirty(sets, out):
    sets = [d for d in sets if d]
    if not sets:
        return None
    fig, axes = plt.subplots(len(sets), 2, figsize=(10, 3.6 * len(sets)),
                             squeeze=False)
    for row, data in zip(axes, sets):
        cfg = data["config"]
        where = ("this machine's /dev/kvm" if data["where"] == "host"
                 else "the nested machine (QEMU TCG, SVM+NPT)")
        base = [r for r in data["runs"] if r["mode"] == "untracked"]
        base = base[0]["write_ms_median"] if base else None
        ax, hx = row
        runs = {r["mode"]: r for r in data["runs"]}
        for r in (runs[m] for m in ordered(runs)):
            rounds = list(range(1, len(r["write_ms_rounds"]) + 1))
            if base:
                label = r["mode"]
                if r["mode"] == "untracked":
                    label += f" (1 = its median, {base:.3g} ms)"
                ax.plot(rounds, [w / base for w in r["write_ms_rounds"]], "o-",
                        color=colour(r["mode"]), label=label)
            if r["harvest_ms_rounds"]:
                hx.plot(rounds, r["harvest_ms_rounds"], "o-",
                        color=colour(r["mode"]), label=r["mode"])
        ax.set_yscale("log")
        ax.set_xlabel("round")
        ax.set_ylabel("guest write time / untracked median (log)")
        ax.set_title(f"write cost, {where}")
        ax.legend()
        hx.set_xlabel("round")
        hx.set_ylabel("harvest time (ms)")
        hx.set_ylim(bottom=0)
        hx.set_title(f"harvest, {where}")
        if hx.lines:
            hx.legend()
        for a in row:
            a.set_xticks(list(range(1, cfg["rounds"] + 1)))
    cfg = sets[0]["config"]
    fig.suptitle(f"ldt-vmm bench dirty: a ring-3 guest writes {cfg['write_pages']} "
                 f"of {cfg['working_set_pages']} pages, {cfg['bytes_per_page']} B "
                 f"each, per round")
    finish(fig, out, "vm-dirty", sets[0]["meta"])
    return ("vm-dirty", "ldt-vmm bench dirty: a ring-3 flat guest writes pages "
            "of its working set each round, untracked and under each dirty "
            "source in one run; left: each round's guest write time relative to "
            "the untracked median, right: the time of each round's harvest.")


# ---- figure 3: nested live migration --------------------------------------

def representative(runs):
    """The run with the median total time."""
    runs = sorted(runs, key=lambda r: r["total_ms"])
    return runs[(len(runs) - 1) // 2]


def workloads(data):
    """[(suffix, title words, data of that workload's runs)]: one figure pair
    per memcheck rate; the fixed rate keeps the plain names (files of before
    the workloads existed have no "rate": that workload)."""
    rates = sorted({r.get("rate", 4000) for r in data["runs"]}, key=lambda x: (x == 0, x))
    return [("-max" if rate == 0 else ("" if i == 0 else f"-{rate}"),
             "max rate" if rate == 0 else f"{rate} pages/s",
             dict(data, runs=[r for r in data["runs"] if r.get("rate", 4000) == rate]))
            for i, rate in enumerate(rates)]


def completed(data):
    """The runs of a migration file that did not fail (a failed one has
    its "error" only)."""
    return [r for r in data["runs"] if "error" not in r]


def fig_migrate_timeline(data, out, suffix, workload):
    runs = completed(data)
    modes = ordered(r["mode"] for r in runs)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for m in modes:
        r = representative([r for r in runs if r["mode"] == m])
        tp = r["throughput"]
        c = colour(m)
        ys = [p / 1e3 for p in tp["pages_s"]]
        ax.plot(tp["t_s"], ys, "-", color=c, label=f"{m} (run {r['run']})")

        def y_at(t):
            # The throughput sample at or before t (step), for markers.
            best = ys[0] if ys else 0
            for x, y in zip(tp["t_s"], ys):
                if x <= t:
                    best = y
            return best
        for e in r["events"]:
            t = e["t_s"]
            if e["what"] == "round":
                ax.plot([t], [y_at(t)], "o", color=c, ms=4)
            elif e["what"] == "switch-over":
                ax.axvline(t, color=c, ls="--", lw=1)
            elif e["what"] == "resumed":
                ax.plot([t], [y_at(t)], "^", color=c, ms=7)
    idle = [r["throughput"]["idle_pages_s"] for r in runs]
    ax.axhline(statistics.median(idle) / 1e3, color="#999999", ls=":",
               label="idle (no migration)")
    ax.axvline(0, color="black", lw=0.8)
    handles, labels = ax.get_legend_handles_labels()
    handles += [Line2D([], [], marker="o", ls="", color="k", ms=4),
                Line2D([], [], ls="--", color="k"),
                Line2D([], [], marker="^", ls="", color="k", ms=7)]
    labels += ["round starts", "switch-over (guest paused)",
               "resumed on the destination"]
    ax.legend(handles, labels, fontsize=7, loc="lower left")
    ax.set_xlabel("time since the migration started (s)")
    ax.set_ylabel("guest progress (thousand pages written/s)")
    ax.set_ylim(bottom=0)
    ax.set_title("Live migration of a Linux guest: guest throughput, "
                 f"median run of each mode ({workload})")
    finish(fig, out, "migrate-timeline" + suffix, data["meta"])
    return ("migrate-timeline" + suffix, "Nested machine (scripts/bench-migrate-nested.sh): "
            f"the image running ldt-memcheck ({workload}) is live-migrated with ldt-vmm and each "
            "dirty source and with QEMU; the guest's write rate over time in the "
            "run with the median total time of each mode, rounds and switch-over "
            "marked.")


def fig_migrate_bars(data, out, suffix, workload):
    runs = completed(data)
    modes = ordered(r["mode"] for r in runs)
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for ax, key, label in ((axes[0], "total_ms", "total migration time (ms)"),
                           (axes[1], "downtime_ms", "downtime (ms)")):
        p50s, p95s, ticks = [], [], []
        for m in modes:
            vals = [r[key] for r in runs if r["mode"] == m]
            p50s.append(pct(vals, 50))
            p95s.append(pct(vals, 95))
            fails = sum(1 for r in runs if r["mode"] == m
                        and not r["memcheck_pass"])
            lost = sum(1 for r in data["runs"] if r["mode"] == m and "error" in r)
            ticks.append(f"{m}\nn={len(vals)}"
                         + (f", {lost} failed" if lost else "")
                         + (f", {fails} memcheck FAIL" if fails else ""))
        xs = list(range(len(modes)))
        ax.bar(xs, p50s, color=[colour(m) or "#7f7f7f" for m in modes])
        ax.errorbar(xs, p50s, yerr=[[0] * len(modes),
                                    [b - a for a, b in zip(p50s, p95s)]],
                    fmt="none", ecolor="black", capsize=4)
        for x, a, b in zip(xs, p50s, p95s):
            ax.annotate(f"{a:.0f}", (x, b), xytext=(0, 3),
                        textcoords="offset points", ha="center", fontsize=7)
        ax.set_xticks(xs)
        ax.set_xticklabels(ticks, fontsize=7)
        ax.set_ylabel(label)
        ax.set_title(label.split(" (")[0] + ": bar p50, whisker p95")
        ax.margins(y=0.15)
    fig.suptitle(f"Live migration of a Linux guest in the nested machine ({workload})")
    finish(fig, out, "migrate-times" + suffix, data["meta"])
    return ("migrate-times" + suffix, f"The same migrations ({workload}): total time "
            "(start to resumed on the destination) and downtime (guest paused) per mode over all "
            "runs; bar = median, whisker = 95th percentile.")


# ---- the page --------------------------------------------------------------

def meta_line(name, data):
    m = data["meta"]
    return (f"<li><a href=\"raw/{html.escape(name)}\">{html.escape(name)}</a>: "
            f"{html.escape(m['date'])}, git {html.escape(m['git'])}; machine: "
            f"{html.escape(m['machine'])}; kernel: {html.escape(m['kernel'])}; "
            f"image: {html.escape(m['image'])}</li>")


def page(out, figures, found, missing):
    parts = ["<!DOCTYPE html>", "<html><head><meta charset=\"utf-8\">",
             "<title>ldt-vmm results</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:1em auto}"
             "img{max-width:100%;border:1px solid #ddd}figure{margin:1.5em 0}"
             "</style></head><body>",
             "<h1>ldt-vmm results</h1>",
             "<p>Drawn by scripts/report/plot.py from the raw JSON below only "
             "(redraw: <code>scripts/report.sh --replot DIR</code>).</p>"]
    for name, caption in figures:
        parts.append(f"<figure><a href=\"{name}.svg\"><img src=\"{name}.png\" "
                     f"alt=\"{name}\"></a><figcaption>{html.escape(caption)} "
                     f"(<a href=\"{name}.svg\">SVG</a>)</figcaption></figure>")
    if missing:
        parts.append("<h2>Not measured in this run</h2><ul>")
        parts += [f"<li>{html.escape(k)}: {html.escape(v)}</li>"
                  for k, v in missing.items()]
        parts.append("</ul>")
    parts.append("<h2>Raw results</h2><ul>")
    parts += [meta_line(n, d) for n, d in found.items()]
    parts.append("</ul></body></html>")
    with open(os.path.join(out, "index.html"), "w") as f:
        f.write("\n".join(parts) + "\n")


def main(argv):
    if len(argv) != 2 or argv[1].startswith("-"):
        sys.exit(__doc__.strip())
    out = argv[1]
    raw = os.path.join(out, "raw")
    if not os.path.isdir(raw):
        sys.exit(f"plot: no {raw} (run scripts/report.sh first)")
    try:
        found = load(raw)
    except BadInput as e:
        sys.exit(f"plot: {e}")
    missing = skipped(raw)
    if not found:
        sys.exit(f"plot: no raw results in {raw} (expected any of "
                 f"{', '.join(schema.FILES)})")
    figures = []
    if "ldt-bench.json" in found:
        for f in (fig_ldt_write, fig_ldt_timeline, fig_ldt_periodic,
                  fig_ldt_collect):
            figures.append(f(found["ldt-bench.json"], out))
    figures.append(fig_dirty([found.get("dirty-host.json"),
                              found.get("dirty-nested.json")], out))
    if "migrate-nested.json" in found:
        for suffix, workload, data in workloads(found["migrate-nested.json"]):
            figures.append(fig_migrate_timeline(data, out, suffix, workload))
            figures.append(fig_migrate_bars(data, out, suffix, workload))
    figures = [f for f in figures if f]
    page(out, figures, found, missing)
    for name, _ in figures:
        print(f"plot: {os.path.join(out, name)}.png, .svg")
    print(f"plot: {os.path.join(out, 'index.html')}")


if __name__ == "__main__":
    main(sys.argv)
