#!/usr/bin/env bash
# tests/report.sh: the results report (scripts/report.sh).
#   1. example: the hand-written raw files of tests/report/example/raw
#      (every figure's input, the nested migration one in the schema of
#      scripts/bench-migrate-nested.sh --json) are redrawn (--replot): the
#      page exists, each figure is on it, every image it references exists
#      and is a valid PNG / SVG (scripts/report/check.py);
#   2. bad-input: the same with a field of the migration file of the wrong
#      type, one missing and one of the wrong length: the plotter refuses
#      it with an error naming the file and each field;
#   3. quick: scripts/report.sh --quick (bench dirty here, ldt-bench --short
#      under QEMU TCG): the page, its images, the raw JSON against what the
#      plots read, and the figures of what this machine can run.
# Cost: 1-2 s for cases 1-2; case 3 is the quick report, 45 s measured with the
# image built and the cores shared (it builds the image if needed).
# LDT_REPORT_QUICK=0 skips case 3.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=tests/lib.sh
source "$ROOT/tests/lib.sh"
PY=/usr/bin/python3

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
ALL="ldt-write ldt-timeline ldt-periodic ldt-collect vm-dirty migrate-timeline migrate-times migrate-timeline-max migrate-times-max"

echo "=== example: redraw the example raw results"
why=
mkdir -p "$work/example"
cp -r "$ROOT/tests/report/example/raw" "$work/example/"
# shellcheck disable=SC2086 # figure names are words
if ! "$ROOT/scripts/report.sh" --replot "$work/example" >"$work/example.log" 2>&1; then
	why="--replot failed: $(tail -n1 "$work/example.log")"
elif ! "$PY" "$ROOT/scripts/report/check.py" "$work/example" $ALL >"$work/check.log" 2>&1; then
	why="check: $(tr '\n' ' ' <"$work/check.log")"
fi
record example

echo "=== bad-input: a migration file that does not fit the schema"
why=
mkdir -p "$work/bad/raw"
"$PY" - "$ROOT/tests/report/example/raw/migrate-nested.json" "$work/bad/raw/migrate-nested.json" <<'PYEOF'
import json, sys
d = json.load(open(sys.argv[1]))
d["runs"][1]["downtime_ms"] = "fast"
del d["runs"][2]["throughput"]["pages_s"]
# interval_s is optional, but one per sample when present.
d["runs"][3]["throughput"]["interval_s"] = [0.1]
# A failed migration is its error only, and that must be a string.
d["runs"].append({"mode": "qemu", "run": 7, "rate": 0, "error": 3})
json.dump(d, open(sys.argv[2], "w"))
PYEOF
if "$ROOT/scripts/report.sh" --replot "$work/bad" >"$work/bad.log" 2>&1; then
	why="the plotter accepted it"
else
	require_output "$work/bad.log" "migrate-nested.json does not match" \
		'$.runs[1].downtime_ms: expected number, got str' \
		'$.runs[2].throughput: missing "pages_s"' \
		'$.runs[3].throughput: t_s has 20 values, interval_s 1' \
		'$.runs[20].error: expected string, got int'
	[ "$(wc -l <"$work/bad.log")" -eq 1 ] || why="${why:+$why; }more than one line of error"
fi
[ ! -e "$work/bad/index.html" ] || why="${why:+$why; }a page was written anyway"
record bad-input

if [ "${LDT_REPORT_QUICK:-1}" = 1 ]; then
	echo "=== quick: scripts/report.sh --quick"
	why=
	if ! "$ROOT/scripts/report.sh" --quick --out "$work/quick" >"$work/quick.log" 2>&1; then
		why="report.sh failed: $(grep 'not measured' "$work/quick.log" | tr '\n' ' ')"
	fi
	figs="ldt-write ldt-timeline ldt-periodic ldt-collect"
	[ ! -c /dev/kvm ] || figs="$figs vm-dirty"
	# shellcheck disable=SC2086 # figure names are words
	"$PY" "$ROOT/scripts/report/check.py" "$work/quick" $figs >"$work/check.log" 2>&1 ||
		why="${why:+$why; }check: $(tr '\n' ' ' <"$work/check.log")"
	[ -z "$why" ] || sed 's/^/  /' "$work/quick.log"
	record quick "$(tail -n1 "$work/check.log")"
fi

summary report
