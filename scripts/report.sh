#!/usr/bin/env bash
# scripts/report.sh: measure what this machine can run and draw the
# project's figures.
#
# Usage: scripts/report.sh [--quick | --full] [--out DIR] [--nested-kernel FILE]
#        scripts/report.sh --replot DIR
#   --quick   (default) a few minutes with the image built: `ldt-vmm bench
#             dirty` on this machine's /dev/kvm, ldt-bench --short in the
#             guest under QEMU TCG (Redis included), and bench dirty in the
#             nested machine if its kernel is built already
#   --full    the paper's experiments in full (ldt-bench under QEMU TCG, up
#             to an hour), bench dirty in the nested machine (building its
#             kernel if needed), and the nested live-migration comparison
#             (scripts/bench-migrate-nested.sh --json)
#   --out DIR where to write (default results/): DIR/raw/*.json (every raw
#             result with date, machine, git revision, kernel and image),
#             DIR/raw/*.log (the console logs), DIR/*.png and *.svg, and
#             DIR/index.html, the page that shows them
#   --nested-kernel FILE  boot this nested host kernel (run-nested.sh
#             --kernel) instead of images/build-nested.sh's
#   --replot DIR  only redraw DIR's figures and page from DIR/raw/*.json
#
# A result that cannot be measured here is not fatal: DIR/raw/NAME.skipped
# says why and the page lists it.  Exit status: 0, or 1 if a benchmark
# failed or a result did not fit what the figures read.  Prints the page's
# path on its last line.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# Debian's python3 (python3-matplotlib is a Debian package, scripts/setup.sh).
PY=/usr/bin/python3
REPORT=$ROOT/scripts/report

mode=quick
out=$ROOT/results
nested_kernel=
replot=
while [ $# -gt 0 ]; do
	case "$1" in
	--quick) mode=quick; shift ;;
	--full) mode=full; shift ;;
	--out | --nested-kernel | --replot)
		[ $# -ge 2 ] || { echo "report: $1 needs a value" >&2; exit 2; }
		case "$1" in
		--out) out=$2 ;;
		--nested-kernel) nested_kernel=$2 ;;
		--replot) replot=$2 ;;
		esac
		shift 2
		;;
	-h | --help) awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0"; exit 0 ;;
	*) echo "report: unknown argument $1 (try --help)" >&2; exit 2 ;;
	esac
done
if [ -n "$replot" ]; then
	"$PY" "$REPORT/plot.py" "$replot"
	exit
fi

"$ROOT/scripts/setup.sh" >/dev/null
cargo build --release -p ldt-vmm --manifest-path "$ROOT/Cargo.toml"
vmm=$ROOT/target/release/ldt-vmm
mkdir -p "$out"
out=$(cd "$out" && pwd)
raw=$out/raw
# A fresh set: nothing of an earlier run mixes into this one.
rm -rf "$raw"
mkdir -p "$raw"
failed=0
t0=$SECONDS

# skip NAME WHY: record that NAME was not measured, and why.
skip() {
	echo "report: $1 not measured: $2"
	echo "$2" >"$raw/$1.skipped"
}
# fail NAME WHY: a benchmark that should have worked did not.
fail() {
	skip "$1" "FAILED: $2"
	failed=1
}

# The guest image's identity, for the meta of results measured in it.
image_id() {
	local m=$ROOT/images/guest.manifest
	echo "images/guest.img sha256 $(sed -n 's/^guest.img-sha256: //p' "$m" | cut -c1-16)," \
		"image key $(sed -n 's/^image-key: //p' "$m")"
}
kernel_id() {
	echo "guest Linux 6.12 (linux-source-6.12 $(sed -n 's/^linux-source-6.12: //p' \
		"$ROOT/images/guest.manifest") + guest-kernel-patch/), kernel key" \
		"$(sed -n 's/^kernel-key: //p' "$ROOT/images/guest.manifest")"
}

# --- 1. ldt-vmm bench dirty on this machine -----------------------------------
echo "report: [1/4] ldt-vmm bench dirty on this machine's /dev/kvm"
log=$raw/dirty-host.log
if [ ! -c /dev/kvm ]; then
	skip dirty-host "no /dev/kvm on this machine"
elif "$vmm" bench dirty --json >"$log" 2>&1; then
	"$PY" "$REPORT/collect.py" dirty --where host --kernel "host $(uname -r)" \
		--image "ldt-vmm's flat ring-3 writer payload" "$log" "$raw/dirty-host.json" ||
		fail dirty-host "its output did not fit (see $log)"
else
	fail dirty-host "ldt-vmm bench dirty failed (see $log)"
fi

# --- 2. ldt-bench in the guest under QEMU TCG ------------------------------------
log=$raw/ldt-bench.log
if [ "$mode" = full ]; then
	bench_cmd='ldt.run=/bin/ldt-bench' bench_timeout=3600
else
	bench_cmd='ldt.run=/bin/ldt-bench%20--short' bench_timeout=900
fi
echo "report: [2/4] ldt-bench ($mode) in the guest under QEMU TCG"
if ! "$ROOT/images/build.sh" >"$raw/build.log" 2>&1; then
	fail ldt-bench "images/build.sh failed (see raw/build.log)"
elif ! redis=$("$ROOT/images/build-redis.sh" 2>>"$raw/build.log" | tail -n1); then
	fail ldt-bench "images/build-redis.sh failed (see raw/build.log)"
elif "$ROOT/images/run-qemu.sh" --initrd "$redis" --timeout "$bench_timeout" \
	--append "$bench_cmd" --log "$log" "$ROOT/images/guest.img" </dev/null >/dev/null 2>&1; then
	"$PY" "$REPORT/collect.py" ldt-bench --kernel "$(kernel_id)" \
		--image "$(image_id), under QEMU TCG (images/run-qemu.sh, 1 vCPU, 256 MiB)" \
		"$log" "$raw/ldt-bench.json" || fail ldt-bench "its output did not fit (see $log)"
else
	fail ldt-bench "the guest run failed (see raw/ldt-bench.log)"
fi

# --- 3. ldt-vmm bench dirty in the nested machine --------------------------------
echo "report: [3/4] ldt-vmm bench dirty in the nested machine"
log=$raw/dirty-nested.log
if [ -z "$nested_kernel" ]; then
	ndir=$("$ROOT/images/build-nested.sh" --print-cache-dir)
	if [ -f "$ndir/.done" ] || [ "$mode" = full ]; then
		nested_kernel=$ndir/bzImage
		"$ROOT/images/build-nested.sh" >>"$raw/build.log" 2>&1 || nested_kernel=
	fi
fi
if [ -z "$nested_kernel" ]; then
	if [ "$mode" = full ]; then
		fail dirty-nested "images/build-nested.sh failed (see raw/build.log)"
	else
		skip dirty-nested "the nested kernel is not built (--full builds it: 5-20 min of both cores)"
	fi
elif "$ROOT/images/run-nested.sh" --bench-dirty --kernel "$nested_kernel" \
	--timeout 1800 --log "$log" </dev/null >/dev/null 2>&1; then
	"$PY" "$REPORT/collect.py" dirty --where nested \
		--kernel "nested host: $(basename "$(dirname "$nested_kernel")") (the guest's 6.12 + KVM_AMD)" \
		--image "ldt-vmm's flat ring-3 writer payload, level 2" "$log" "$raw/dirty-nested.json" ||
		fail dirty-nested "its output did not fit (see $log)"
else
	fail dirty-nested "images/run-nested.sh --bench-dirty failed (see raw/dirty-nested.log)"
fi

# --- 4. live migration in the nested machine (ldt-vmm's sources and QEMU) --------
echo "report: [4/4] nested live-migration comparison"
bench_migrate=$ROOT/scripts/bench-migrate-nested.sh
if [ "$mode" != full ]; then
	skip migrate-nested "--full only (the nested migrations take tens of minutes of both cores)"
elif "$bench_migrate" --json "$raw/migrate-nested.json" </dev/null >"$raw/migrate-nested.log" 2>&1; then
	"$PY" "$REPORT/collect.py" check migrate-nested.json "$raw/migrate-nested.json" ||
		{ mv "$raw/migrate-nested.json" "$raw/migrate-nested.json.bad"; fail migrate-nested \
			"its --json output did not fit the schema (raw/migrate-nested.json.bad)"; }
else
	fail migrate-nested "scripts/bench-migrate-nested.sh failed (see raw/migrate-nested.log)"
fi

echo "report: measured in $((SECONDS - t0)) s; drawing"
"$PY" "$REPORT/plot.py" "$out" || failed=1
echo "report: $out/index.html"
exit "$failed"
