#!/usr/bin/env bash
# scripts/repro-nested-fault.sh: the nested triple fault (README Known
# problems, issue #13) in a loop, not in CI.  Boots the nested machine with
# images/run-nested.sh --bench-dirty-linux (two level-2 boots of the guest
# image and a few dirty-tracking rounds, ~20 s a run with warm caches) again
# and again until a level-2 or level-1 triple fault, and keeps that run's
# output, which has QEMU's exception records up to the shutdown and the
# fault verdict.  The level-2 guest faults in a boot as often as in a
# migration, so this needs neither migration nor tracking.
#
# Usage: scripts/repro-nested-fault.sh [--runs N] [--load] [--out FILE]
#   --runs N    at most N runs (default 200)
#   --load      keep one host CPU busy meanwhile (the faults were met on a
#               loaded machine; 2026-12-03: run 65, one core busy)
#   --out FILE  where the faulting run's output goes (default
#               ./nested-fault.out)
# The emulator is whatever qemu-system-x86_64 PATH finds first (e.g. a
# rebuilt QEMU with prints).  Exit status 0 if a run faulted, 1 if none
# did, 2 on a bad argument.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
runs=200
load=
out=./nested-fault.out
while [ $# -gt 0 ]; do
	case "$1" in
	--runs) runs=$2; shift 2 ;;
	--load) load=1; shift ;;
	--out) out=$2; shift 2 ;;
	-h | --help) awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0"; exit 0 ;;
	*) echo "repro: unknown argument $1 (try --help)" >&2; exit 2 ;;
	esac
done
[[ "$runs" =~ ^[1-9][0-9]*$ ]] || { echo "repro: --runs needs a positive number" >&2; exit 2; }

cur=$(mktemp)
hog=
cleanup() {
	[ -z "$hog" ] || kill "$hog" 2>/dev/null
	rm -f "$cur"
}
trap cleanup EXIT
if [ -n "$load" ]; then
	(while :; do :; done) &
	hog=$!
fi

for i in $(seq 1 "$runs"); do
	LDT_BENCH_ROUNDS=2 LDT_BENCH_WS=2048 "$ROOT/images/run-nested.sh" --bench-dirty-linux \
		>"$cur" 2>&1
	rc=$?
	echo "repro: run $i exit $rc $(date -u +%T)"
	if grep -aq 'triple fault\|level 1 reset itself' "$cur"; then
		cp "$cur" "$out"
		echo "repro: run $i faulted; output in $out"
		grep -a 'fault verdict\|fault state\|fault root\|level 1 reset' "$cur" | sed 's/^/repro: /'
		exit 0
	fi
done
echo "repro: no fault in $runs runs"
exit 1
