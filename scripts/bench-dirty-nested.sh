#!/usr/bin/env bash
# scripts/bench-dirty-nested.sh: `ldt-vmm bench dirty` with a Linux guest,
# in the nested machine (images/run-nested.sh --bench-dirty-linux, where the
# hardware's dirty bits are the guest's own): ldt-writer in the level-2
# guest rewrites a locked working set each round, untracked and under each
# dirty source (guest-ldt included) in one boot, kvm-ring in a second one
# (images/nested/bench-dirty-l2).  Prints a markdown table: the guest's
# write time per round (p50/p95) and its ratio to the untracked rounds of
# the same boot, the harvest time, pages reported against pages written
# (the excess: false positives, kernel and page-table pages included) and
# the pages missed (checked against the working set's frames each round:
# must be 0).
#
# Usage: scripts/bench-dirty-nested.sh [--rounds N] [--ws PAGES] [--bytes B]
#                                      [--json FILE] [--log FILE] [--from-log FILE]
#   --rounds N      rounds per mode (default 7)
#   --ws PAGES      working-set pages, all written each round (default 8192)
#   --bytes B       bytes written per page (default 1)
#   --json FILE     write every round as JSON (schema below)
#   --log FILE      keep the nested machine's console output
#   --from-log FILE do not run: tabulate a console output kept with --log
#
# JSON schema (--json):
#   {"meta": {"date", "machine", "git", "image"},
#    "rounds": [{"boot": int, "mode": str, "round": int (0: warm-up, not
#                tabulated), "write_us": num,
#                "written": int, "harvest_ms": num, "reported": int,
#                "missed": int, "first_missed": str|null}]}
#   (harvest_ms, reported, missed absent for untracked rounds)
# Exit status: 0, or the number of modes that failed or missed a page.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
rounds=7
ws=8192
bytes=1
json=
keep_log=
from_log=
while [ $# -gt 0 ]; do
	case "$1" in
	--rounds | --ws | --bytes | --json | --log | --from-log)
		[ $# -ge 2 ] || { echo "$1 needs a value" >&2; exit 2; }
		case "$1" in
		--rounds) rounds=$2 ;;
		--ws) ws=$2 ;;
		--bytes) bytes=$2 ;;
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
for v in "$rounds" "$ws" "$bytes"; do
	[[ "$v" =~ ^[1-9][0-9]*$ ]] || { echo "not a positive number: $v" >&2; exit 2; }
done
[ "$bytes" -le 4096 ] || { echo "--bytes must be 1..4096" >&2; exit 2; }
log=$(mktemp)
trap 'rm -f "$log"' EXIT

started=$(date -u +%Y-%m-%dT%H:%M:%SZ)
machine="$(hostname), $(nproc) CPUs ($(sed -n 's/^model name[^:]*: //p' /proc/cpuinfo | head -n1)), load $(cut -d' ' -f1-3 /proc/loadavg) at start"
gitrev="$(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet HEAD || echo +dirty)"
status=0
if [ -n "$from_log" ]; then
	cp "$from_log" "$log"
else
	LDT_BENCH_ROUNDS=$rounds LDT_BENCH_WS=$ws LDT_BENCH_BYTES=$bytes \
		"$ROOT/images/run-nested.sh" --bench-dirty-linux --timeout 7200 --log "$log" >&2 || status=$?
fi
[ -z "$keep_log" ] || cp "$log" "$keep_log"
image="guest.img sha256 $(sha256sum "$ROOT/images/guest.img" | cut -c1-16)"

sed -n 's/^bench-dirty-l2: \({.*}\)\r*$/\1/p' "$log" |
	DATE=$started MACHINE=$machine GIT=$gitrev IMAGE=$image JSON=$json \
	PYTHONPATH="$ROOT/scripts/report" python3 -c '
import json, os, sys
from stats import pct

rows = [json.loads(l) for l in sys.stdin]
# Round 0 of each mode is its warm-up (kept in the JSON, not in the table).
measured = [r for r in rows if r["round"] > 0]
meta = {k.lower(): os.environ[k] for k in ("DATE", "MACHINE", "GIT", "IMAGE")}
if os.environ["JSON"]:
    with open(os.environ["JSON"], "w") as f:
        json.dump({"meta": meta, "rounds": rows}, f, indent=1)

print("Nested Linux-guest dirty tracking (ldt-writer), %s, %s, git %s" % (meta["date"], meta["machine"], meta["git"]))
print()
print("| boot | mode | rounds | write ms p50 | p95 | vs untracked | harvest ms p50 | p95 | reported p50 | written | excess p50 | missed |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
keys = []
for r in measured:
    if (r["boot"], r["mode"]) not in keys:
        keys.append((r["boot"], r["mode"]))
for boot, mode in keys:
    rs = [r for r in measured if r["boot"] == boot and r["mode"] == mode]
    base = [r["write_us"] / 1e3 for r in measured if r["boot"] == boot and r["mode"] == "untracked"]
    w = [r["write_us"] / 1e3 for r in rs]
    cells = [str(boot), mode, str(len(rs)), "%.2f" % pct(w, 50), "%.2f" % pct(w, 95),
             "%.2fx" % (pct(w, 50) / pct(base, 50))]
    if mode == "untracked":
        cells += ["", "", "", str(rs[0]["written"]), "", ""]
    else:
        h = [r["harvest_ms"] for r in rs]
        cells += ["%.2f" % pct(h, 50), "%.2f" % pct(h, 95),
                  "%.0f" % pct([r["reported"] for r in rs], 50), str(rs[0]["written"]),
                  "%.0f" % pct([r["reported"] - r["written"] for r in rs], 50),
                  str(sum(r["missed"] for r in rs))]
    print("| " + " | ".join(cells) + " |")
'
exit "$status"
