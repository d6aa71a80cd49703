#!/usr/bin/env bash
# scripts/bench-migrate-nested.sh: the Linux-guest migration benchmark, in
# the nested machine (images/run-nested.sh --bench-migrate): the project's
# image running ldt-memcheck is live-migrated with ldt-vmm and each dirty
# source, and with QEMU (microvm, KVM, HMP migrate), one after the other on
# the same (nested, TCG-emulated) machine; prints a markdown table.
# `ldt-vmm bench migrate` is the flat-guest counterpart on this machine's
# own KVM, where QEMU cannot boot the kernel (see README).
#
# Usage: scripts/bench-migrate-nested.sh [--log FILE]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
log=$(mktemp)
trap 'rm -f "$log"' EXIT
[ "${1:-}" != --log ] || { [ $# -eq 2 ] || { echo "--log needs a file" >&2; exit 2; }; }

status=0
"$ROOT/images/run-nested.sh" --bench-migrate --timeout 3600 --log "$log" >&2 || status=$?
[ "${1:-}" != --log ] || cp "$log" "$2"

echo "| mode | total ms | downtime ms | rounds | sent MB | guest memcheck on the destination |"
echo "|---|---|---|---|---|---|"
sed -n 's/^bench-migrate-l2: \({.*}\)\r*$/\1/p' "$log" | python3 -c '
import json, sys
for line in sys.stdin:
    r = json.loads(line)
    if "error" in r:
        print("| %s | failed: %s | | | | |" % (r["mode"], r["error"]))
        continue
    print("| %s | %.0f | %.0f | %d | %.1f | %s |" % (
        r["mode"], r["total_ms"], r["downtime_ms"], r["rounds"], r["sent_mb"],
        "PASS" if r["memcheck_pass"] else "FAIL"))
'
exit "$status"
