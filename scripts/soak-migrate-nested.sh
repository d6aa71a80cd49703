#!/usr/bin/env bash
# scripts/soak-migrate-nested.sh: the live-migration soak (not in CI).
# In the nested machine (kmod/run-nested-kmod.sh: QEMU TCG with SVM+NPT,
# the ldt_kvm module loaded), the guest image running ldt-memcheck is
# migrated back and forth between ldt-vmm processes, --verify each time,
# with kvm-bitmap, kvm-clear, host-ldt and kvm-ring in turn
# (images/nested/soak-l2); each guest's ldt-memcheck checks at its end that
# no write of any of its migrations was lost.
#
# Usage: scripts/soak-migrate-nested.sh [--per-source N] [--log FILE]
#   --per-source N  migrations per dirty source (default 25: 125 in all)
#   --sources LIST  comma-separated dirty sources (default kvm-bitmap,
#                   kvm-clear,host-ldt,kvm-ring,guest-ldt; guest-ldt guests
#                   run with --ldt-pv)
#   --backing B     guest RAM backing on both sides (ldt-vmm --mem-backing:
#                   anon, the default, thp or hugetlbfs)
#   --log FILE      keep the nested machine's console output
# Prints every migration's line and then a summary:
#   soak: R migrations, F failed; G guests, H failed
#   soak: downtime ms p50 X p95 Y; total ms p50 X p95 Y   (all, then per source)
# Exit status 0 iff nothing failed.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
per=25
log=
sources=
backing=
while [ $# -gt 0 ]; do
	case "$1" in
	--per-source) per=$2; shift 2 ;;
	--sources) sources=$2; shift 2 ;;
	--backing) backing=$2; shift 2 ;;
	--log) log=$2; shift 2 ;;
	-h | --help) awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0"; exit 0 ;;
	*) echo "soak: unknown argument $1 (try --help)" >&2; exit 2 ;;
	esac
done
[[ "$per" =~ ^[1-9][0-9]*$ ]] || { echo "soak: --per-source needs a positive number" >&2; exit 2; }

out=$(mktemp)
trap 'rm -f "$out"' EXIT
echo "soak: start $(date -u +%FT%TZ), $per migrations per source"
# 5-40 s a migration in the nested machine (the copy is emulated: it
# depends on the load of this host), plus a guest boot every few
# migrations: the timeout allows 30 s each and 15 min besides.
"$ROOT/kmod/run-nested-kmod.sh" --soak "$per" ${sources:+--soak-sources "$sources"} \
	${backing:+--soak-backing "$backing"} --timeout $((per * 4 * 30 + 900)) 2>&1 |
	tee "$out" | grep --line-buffered -E '^soak:|not ok|Kernel panic|triple fault'
rc=${PIPESTATUS[0]}
[ -z "$log" ] || cp "$out" "$log"
tr -d '\r' <"$out" | PYTHONPATH="$ROOT/scripts/report" python3 -c '
import re, sys
from stats import pct
rows = []
for line in sys.stdin:
    m = re.match(r"soak: migration \d+ (\S+) (ok|FAIL)(.*)", line)
    if m:
        kv = dict(re.findall(r"(\w+_ms) ([0-9.]+)", m.group(3)))
        rows.append((m.group(1), m.group(2), kv))
    m = re.match(r"soak: migrations (\d+) failed (\d+) guests (\d+) failed (\d+)", line)
    if m:
        total = tuple(map(int, m.groups()))
if not rows:
    sys.exit("soak: no migration ran")
def line(name, sel):
    ok = [kv for s, r, kv in sel if r == "ok" and "downtime_ms" in kv]
    if not ok:
        return f"soak: {name}: no successful migration"
    d = [float(kv["downtime_ms"]) for kv in ok]
    t = [float(kv["total_ms"]) for kv in ok]
    failed = sum(1 for _, r, _ in sel if r != "ok")
    return (f"soak: {name}: {len(sel)} migrations, {failed} failed; "
            f"downtime ms p50 {pct(d, 50):.1f} p95 {pct(d, 95):.1f}; "
            f"total ms p50 {pct(t, 50):.0f} p95 {pct(t, 95):.0f}")
print(line("all", rows))
for src in dict.fromkeys(s for s, _, _ in rows):
    print(line(src, [r for r in rows if r[0] == src]))
try:
    m, f, g, h = total
    print(f"soak: {m} migrations, {f} failed; {g} guests, {h} failed")
except NameError:
    print("soak: the nested machine printed no summary")
'
echo "soak: end $(date -u +%FT%TZ), nested machine status $rc"
[ "$rc" -eq 0 ]
