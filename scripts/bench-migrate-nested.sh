#!/usr/bin/env bash
# scripts/bench-migrate-nested.sh: the Linux-guest migration benchmark, in
# the nested machine (images/run-nested.sh --bench-migrate): the project's
# image running ldt-memcheck (32 MiB region; per workload rewritten at a
# fixed rate, or as fast as it can, printing its own throughput every
# 100 ms) is live-migrated with ldt-vmm and each dirty source (host-ldt
# with --host-ldt), and with QEMU (microvm, KVM, HMP migrate), modes
# interleaved, RUNS times each (one boot of the same nested, TCG-emulated
# machine per run); prints a markdown table per workload with p50/p95 per
# mode.
# `ldt-vmm bench migrate` is the flat-guest counterpart on this machine's
# own KVM, where QEMU cannot boot the kernel (see README).
#
# Usage: scripts/bench-migrate-nested.sh [--runs N] [--rates LIST] [--host-ldt]
#                                         [--modes LIST] [--vmm FILE] [--json FILE]
#                                         [--log FILE] [--from-log FILE]
#   --runs N          migrations per mode and workload (default 5), each
#                     run in a boot of the nested machine of its own (a boot
#                     that ends in a level-1 reset is made once more)
#   --rates LIST      the workloads: memcheck rates in pages/s,
#                     comma-separated, 0 = max rate (default 4000,0)
#   --host-ldt        also the host-ldt source (the nested machine loads
#                     kmod/'s module: images/run-nested.sh --host-ldt)
#   --modes LIST      the modes, comma-separated, in their order (default:
#                     every dirty source, then qemu); "SOURCE+nice" is an
#                     ldt-vmm source with its copying threads at nice 19
#                     (migrate --precopy-nice, run --incoming-nice); "+pin"
#                     (also qemu+pin): the vCPU threads alone on one CPU,
#                     every other thread of both VMMs on the other (ldt-vmm:
#                     run --vcpu-cpus 0 --vmm-cpus 1)
#   --vmm FILE        this static ldt-vmm in the nested machine (default:
#                     build one, images/run-nested.sh)
#   --json FILE       write every migration as JSON (schema below)
#   --log FILE        keep the nested machine's console output
#   --from-log FILE   do not run: tabulate a console output kept with --log
#                     (meta then describes the present checkout and host)
#
# JSON schema (--json):
#   {"meta": {"date": str (UTC, ISO 8601), "machine": str (host, CPUs,
#             load at the start), "git": str (commit, "+dirty" if
#             changed), "kernel": str (host kernel; nested kernel and
#             guest image inputs), "image": str (guest.img SHA-256)},
#    "runs": [{"mode": "kvm-bitmap"|"kvm-clear"|"kvm-ring"|"host-ldt"|"guest-ldt"|"qemu"
#              (with "+nice", "+pin": --modes),
#              "run": int (1..N), "rate": int (memcheck pages/s, 0: max),
#              "total_ms": num, "downtime_ms": num,
#              "rounds": int (ldt-vmm: rounds incl. round 0 and the last;
#                         QEMU: its dirty sync count),
#              "sent_mb": num (10^6 bytes), "memcheck_pass": bool,
#              "throughput": {"idle_pages_s": num (mean before the start),
#                             "t_s": [num...], "interval_s": [num...],
#                             "pages_s": [num...]},
#              "events": [{"t_s": num, "what": "migration-start"|"round"|
#                          "switch-over"|"resumed"}],
#              "breakdown_ms": {name: num} (ldt-vmm's downtime breakdown;
#                              QEMU: {"setup": ...})}]}
#   t_s is relative to the migration start: memcheck's progress lines carry
#   the guest's uptime (continuous across the migration), aligned on the
#   uptime of the line after which `migrate` was issued at once (files of
#   before 2026-12-05: of the last line before it, so within 100 ms). A
#   pages_s sample is the page rewrites of memcheck's interval (interval_s,
#   absent in older files) ending at t_s over its length; ldt-vmm round
#   events are at setup + the rounds' cumulative durations. Failed
#   migrations are listed with "error" only.
#
# The table's guest columns are pages the guest wrote in a window, each
# sample counted for the part of its interval inside it, over the window's
# length, relative to idle; p50 (and p95) over the runs. The guest's clock
# is the migration's until the pause (t0 is a progress line's, taken right
# before the start: images/nested/progress-edge); it then stands still for
# part of the downtime (QEMU freezes the guest's kvmclock at the pause;
# ldt-vmm reads it when it saves the state, after the final memory).
#   running  the start to the pause: the rate of the guest while it runs
#            during the migration (what tracking and copying cost it);
#   wall     the same pages over the start to resumed: the downtime
#            counted as no progress;
#   min 100ms  the slowest sample lying mostly before the pause;
#   after    the 3 s after the guest resumed on the destination.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
runs=5
rates=4000,0
host_ldt=
vmm=()
modes=
json=
keep_log=
from_log=
while [ $# -gt 0 ]; do
	case "$1" in
	--host-ldt) host_ldt=--host-ldt; shift; continue ;;
	--runs | --rates | --modes | --vmm | --json | --log | --from-log)
		[ $# -ge 2 ] || { echo "$1 needs a value" >&2; exit 2; }
		case "$1" in
		--runs) runs=$2 ;;
		--rates) rates=$2 ;;
		--modes) modes=$2 ;;
		--vmm) vmm=(--vmm "$2") ;;
		--json) json=$2 ;;
		--log) keep_log=$2 ;;
		--from-log) from_log=$2 ;;
		esac
		shift 2
		;;
	-h | --help) awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0"; exit 0 ;;
	*) echo "unknown argument $1 (try --help)" >&2; exit 2 ;;
	esac
done
log=$(mktemp)
trap 'rm -f "$log"' EXIT

started=$(date -u +%Y-%m-%dT%H:%M:%SZ)
machine="$(hostname), $(nproc) CPUs ($(sed -n 's/^model name[^:]*: //p' /proc/cpuinfo | head -n1)), load $(cut -d' ' -f1-3 /proc/loadavg) at start"
gitrev="$(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet HEAD || echo +dirty)"
status=0
if [ -n "$from_log" ]; then
	cp "$from_log" "$log"
else
	[[ "$rates" =~ ^[0-9]+(,[0-9]+)*$ ]] || { echo "--rates: comma-separated numbers" >&2; exit 2; }
	[[ "$modes" =~ ^([a-z-]+(\+(nice|pin))*(,[a-z-]+(\+(nice|pin))*)*)?$ ]] ||
		{ echo "--modes: comma-separated modes (e.g. host-ldt,host-ldt+nice,qemu)" >&2; exit 2; }
	# One boot of the nested machine per run, every mode once in it: the
	# nested machine's own kernel has died in benches (README,
	# Known problems), and then only that boot's run is lost. A boot that
	# ended in a level-1 reset is made once more, loudly; its partial
	# records stay out of the tables.
	boot_log=$(mktemp)
	trap 'rm -f "$log" "$boot_log"' EXIT
	for run in $(seq 1 "$runs"); do
		for try in 1 2; do
			boot_status=0
			LDT_BENCH_RUNS=1 LDT_BENCH_FIRST=$run LDT_BENCH_RATES=$rates LDT_BENCH_MODES=$modes \
				"$ROOT/images/run-nested.sh" --bench-migrate $host_ldt "${vmm[@]}" \
				--timeout 7200 --log "$boot_log" >&2 || boot_status=$?
			if [ "$boot_status" -ne 0 ] && [ "$try" -eq 1 ] &&
				grep -q 'level 1 reset itself' "$boot_log"; then
				echo "bench-migrate-nested: RETRY: run $run: the nested machine reset itself; its boot again" >&2
				{ grep -a 'BUG\|Oops\|PANIC\|level-1 dmesg' "$boot_log" || true; } |
					tail -n 5 | sed 's/^/bench-migrate-nested: /' >&2
				sed 's/^bench-migrate-l2: {/bench-migrate-l2: lost: {/' "$boot_log" >>"$log"
				continue
			fi
			cat "$boot_log" >>"$log"
			[ "$boot_status" -eq 0 ] || status=$boot_status
			break
		done
	done
fi
[ -z "$keep_log" ] || cp "$log" "$keep_log"
image="guest.img sha256 $(sha256sum "$ROOT/images/guest.img" | cut -c1-16)"
kernel="host $(uname -r); guest and nested kernels: linux-source-6.12 + guest-kernel-patch"

sed -n 's/^bench-migrate-l2: \({.*}\)\r*$/\1/p' "$log" |
	DATE=$started MACHINE=$machine GIT=$gitrev KERNEL=$kernel IMAGE=$image JSON=$json \
	PYTHONPATH="$ROOT/scripts/report" python3 -c '
import json, os, statistics, sys
from stats import pct

def throughput(r):
    t0 = r.get("t0_uptime") or 0
    pts = [p for p in r.get("progress", []) if p]
    idle = [p[1] / p[2] for p in pts if p[0] <= t0 and p[2] > 0]
    return {"idle_pages_s": statistics.mean(idle) if idle else 0.0,
            "t_s": [round(p[0] - t0, 3) for p in pts],
            "interval_s": [p[2] for p in pts],
            "pages_s": [round(p[1] / p[2], 1) if p[2] > 0 else 0.0 for p in pts]}

runs = []
for line in sys.stdin:
    try:
        r = json.loads(line)
    except ValueError as e:
        # One bad record (a console line cut by the switch-over, before
        # bench-migrate-l2 left those out) must not lose the whole run.
        print(f"bench-migrate-nested: skipped a malformed record ({e}): {line[:120]}...",
              file=sys.stderr)
        continue
    # Logs of before the workloads existed ran the fixed rate only.
    rate = r.get("rate", 4000)
    if "error" in r:
        runs.append({"mode": r["mode"], "run": r.get("run", 0), "rate": rate,
                     "error": r["error"]})
        continue
    out = {"mode": r["mode"], "run": r["run"], "rate": rate,
           "memcheck_pass": r["memcheck_pass"], "throughput": throughput(r)}
    if "report" in r:
        rep = r["report"]
        t = rep["setup_ms"]
        events = [{"t_s": 0.0, "what": "migration-start"}]
        for rs in rep["rounds"][:-1]:
            t += rs["duration_ms"]
            events.append({"t_s": round(t / 1e3, 4), "what": "round"})
        sw = (rep["total_ms"] - rep["downtime_ms"]) / 1e3
        events += [{"t_s": round(sw, 4), "what": "switch-over"},
                   {"t_s": round(rep["total_ms"] / 1e3, 4), "what": "resumed"}]
        out.update(total_ms=rep["total_ms"], downtime_ms=rep["downtime_ms"],
                   rounds=len(rep["rounds"]), sent_mb=rep["transferred_bytes"] / 1e6,
                   events=events,
                   breakdown_ms={k[:-3] if k.endswith("_ms") else k: v
                                 for k, v in rep.get("downtime_breakdown", {}).items()})
    else:
        q = r["qemu"]
        sw = (q["total_ms"] - q["downtime_ms"]) / 1e3
        out.update(total_ms=q["total_ms"], downtime_ms=q["downtime_ms"],
                   rounds=q["dirty_syncs"], sent_mb=q["transferred_kib"] * 1.024 / 1e3,
                   events=[{"t_s": 0.0, "what": "migration-start"},
                           {"t_s": round(sw, 4), "what": "switch-over"},
                           {"t_s": round(q["total_ms"] / 1e3, 4), "what": "resumed"}],
                   breakdown_ms={"setup": q["setup_ms"]})
    runs.append(out)

meta = {k.lower(): os.environ[k] for k in ("DATE", "MACHINE", "GIT", "KERNEL", "IMAGE")}
if os.environ["JSON"]:
    with open(os.environ["JSON"], "w") as f:
        json.dump({"meta": meta, "runs": runs}, f, indent=1)

def samples(r):
    # (start, end, pages/s) of each sample, in guest time from t0.
    th = r["throughput"]
    ends = th["t_s"]
    # Files of before interval_s: from the previous sample end (0.1 s for the first).
    ivs = th.get("interval_s") or [e - b for b, e in zip([ends[0] - 0.1] + ends, ends)]
    return [(e - i, e, p) for e, i, p in zip(ends, ivs, th["pages_s"])]

def pages_in(r, lo, hi):
    return sum(p * max(0.0, min(e, hi) - max(b, lo)) for b, e, p in samples(r))

def pause_s(r):
    return (r["total_ms"] - r["downtime_ms"]) / 1e3

def resumed_guest_s(r):
    # The guest clock when it resumed: the pause, plus what of the
    # downtime it saw pass (ldt-vmm: up to its state save).
    b = r.get("breakdown_ms", {})
    seen = sum(b.get(k, 0.0) for k in ("pause", "final_harvest", "final_memory", "state_save"))
    return pause_s(r) + seen / 1e3

def rel(r, x):
    idle = r["throughput"]["idle_pages_s"]
    return x / idle if idle else float("nan")

def running(r):
    return rel(r, pages_in(r, 0.0, pause_s(r)) / max(pause_s(r), 1e-9))

def wall(r):
    return rel(r, pages_in(r, 0.0, pause_s(r)) / max(r["total_ms"] / 1e3, 1e-9))

def slowest(r):
    inside = [p for b, e, p in samples(r) if min(e, pause_s(r)) - max(b, 0.0) >= (e - b) / 2]
    return rel(r, min(inside)) if inside else float("nan")

def after(r):
    t = resumed_guest_s(r)
    return rel(r, pages_in(r, t, t + 3.0) / 3.0)

print("Nested Linux-guest migration, %s, %s, git %s" % (meta["date"], meta["machine"], meta["git"]))
for rate in sorted({r["rate"] for r in runs}, key=lambda x: (x == 0, x)):
    print()
    print("Workload: ldt-memcheck, 32 MiB, %s" % (
        "%d pages/s" % rate if rate else "max rate"))
    print()
    print("| mode | ok/runs | total ms p50 | p95 | downtime ms p50 | p95 | rounds p50 | sent MB p50 "
          "| guest idle pages/s p50 | running/idle p50 | p95 | wall/idle p50 | min 100ms/idle p50 "
          "| after/idle p50 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    modes = []
    for r in runs:
        if r["rate"] == rate and r["mode"] not in modes:
            modes.append(r["mode"])
    for m in modes:
        rs = [r for r in runs if r["rate"] == rate and r["mode"] == m]
        ok = [r for r in rs if "error" not in r and r["memcheck_pass"]]
        if not ok:
            print("| %s | 0/%d |%s" % (m, len(rs), " |" * 12))
            continue
        run_r = [running(r) for r in ok]
        wall_r = [wall(r) for r in ok]
        worst = [slowest(r) for r in ok]
        after_r = [after(r) for r in ok]
        print("| %s | %d/%d | %.0f | %.0f | %.1f | %.1f | %.0f | %.1f | %.0f | %.2f | %.2f | %.2f | %.2f | %.2f |" % (
            m, len(ok), len(rs),
            pct([r["total_ms"] for r in ok], 50), pct([r["total_ms"] for r in ok], 95),
            pct([r["downtime_ms"] for r in ok], 50), pct([r["downtime_ms"] for r in ok], 95),
            pct([r["rounds"] for r in ok], 50), pct([r["sent_mb"] for r in ok], 50),
            pct([r["throughput"]["idle_pages_s"] for r in ok], 50),
            pct(run_r, 50), pct(run_r, 95), pct(wall_r, 50), pct(worst, 50), pct(after_r, 50)))
'
exit "$status"
