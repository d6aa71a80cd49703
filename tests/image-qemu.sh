#!/usr/bin/env bash
# tests/image-qemu.sh: end-to-end test of the guest image under QEMU TCG.
# Builds images/guest.img (or reuses the cached build), then boots it:
#   1. ldt.run=/bin/ldt-syscheck  -> status 0, "ldt-syscheck: PASS", and
#      init reached user space;
#   2. ldt.run=exit%207           -> status 7: the %20 decoding and the
#      exit status path (init -> port 0x501 -> run-qemu.sh) work;
#      ldt.run="uname -a; exit 3" -> status 3 and uname's line: the kernel's
#      own quoting of a value with spaces reaches init whole;
#   3. ldt.run=/bin/ldt-selftest  -> status 0 (= no failed test) and
#      "ldt-selftest: PASS": lightweight dirty tracking never missed a write;
#      once on 1 CPU and once on 2 (TLB shootdowns between CPUs that QEMU
#      runs on two host threads); both with a legacy pmem region
#      (memmap=) and more memory, so that the device-dax cases run;
#   4. ldt.run=/bin/ldt-bench --short, with the Redis initrd of
#      images/build-redis.sh -> status 0 and a JSON line from each of the
#      experiments for LDT, Redis included (the numbers are not checked).
# Before booting: /bin/cmdline-param, run here with busybox's awk (the one
# in the image), splits sample command lines as the kernel does.
# Prints one line per case and "image-qemu: P passed, F failed"; exits
# non-zero if any case failed.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TIMEOUT=${LDT_QEMU_TIMEOUT:-300}

# shellcheck source=tests/lib.sh
source "$ROOT/tests/lib.sh"

# param_case NAME CMDLINE PARAM EXPECTED: cmdline-param's answer (or
# "<absent>" for exit status 1).
param_case() {
	local got status=0
	printf '%s\n' "$2" >"$logdir/cmdline"
	got=$(PATH=$logdir/bb:$PATH "$ROOT/images/initramfs/cmdline-param" "$3" "$logdir/cmdline") || status=$?
	[ "$status" -ne 1 ] || got='<absent>'
	why=
	[ "$got" = "$4" ] || why="got '$got', expected '$4'"
	record "cmdline-param $1"
}

logdir=$(mktemp -d)
trap 'rm -rf "$logdir"' EXIT
mkdir -p "$logdir/bb"
ln -s /bin/busybox "$logdir/bb/awk"
param_case quoted 'console=ttyS0 ldt.run="uname -a; exit 3" reboot=k' ldt.run 'uname -a; exit 3'
param_case percent 'ldt.run=exit%207 x' ldt.run 'exit 7'
param_case literal-%20 'ldt.run=echo%20%2520' ldt.run 'echo %20'
param_case quoted-is-literal 'ldt.run="a%20b c"' ldt.run 'a%20b c'
param_case whole-word-quoted 'a "ldt.run=echo x y" b' ldt.run 'echo x y'
param_case last-wins 'ldt.run=a ldt.run=b' ldt.run 'b'
param_case empty 'ldt.run= x' ldt.run ''
param_case absent 'ldt.runx=1 xldt.run=2' ldt.run '<absent>'

"$ROOT/images/build.sh"
redis=$("$ROOT/images/build-redis.sh" | tail -n1)

# run_case NAME EXPECTED_STATUS APPEND [REQUIRED_OUTPUT...]
# ($opts: extra run-qemu.sh options for the next case)
opts=()
run_case() {
	local name=$1 want=$2 append=$3 log=$logdir/$1.log status=0
	shift 3
	echo "=== $name: ldt.run via '$append' ${opts[*]}, expecting status $want"
	"$ROOT/images/run-qemu.sh" --timeout "$TIMEOUT" --append "$append" \
		--log "$log" "${opts[@]}" "$ROOT/images/guest.img" </dev/null || status=$?
	opts=()
	why=
	[ "$status" -eq "$want" ] || why="status $status, expected $want"
	require_output "$log" "$@"
	record "$name"
}

run_case syscheck 0 'ldt.run=/bin/ldt-syscheck' \
	'ldt-init: user space reached' 'ldt-syscheck: PASS' 'ldt-init: exit status 0'
run_case exit-status 7 'ldt.run=exit%207' \
	'ldt-init: user space reached' 'ldt-init: running: exit 7' 'ldt-init: exit status 7'
run_case quoted-run 3 'ldt.run="uname -a; exit 3"' \
	'ldt-init: running: uname -a; exit 3' 'Linux (none) 6.12' 'ldt-init: exit status 3'
# The selftest's runs only: a 2 GiB legacy pmem region (memmap=2G!256M,
# guest RAM 256M below and 256M above it), which the selftest makes a
# devdax namespace with 1 GiB alignment for its PUD-leaf (dax_pud_*) cases;
# they must run, not skip (their diagnostics are required).
dax_opts=(--mem 2560M)
dax_append='memmap=2G!256M'
opts=("${dax_opts[@]}")
run_case ldt-selftest 0 "$dax_append ldt.run=/bin/ldt-selftest" \
	'ldt-selftest: PASS' 'ldt-init: exit status 0' \
	'# dax_pud_munmap: ' '# memcg_log_charged: memcg slab'
opts=(--smp 2 "${dax_opts[@]}")
run_case ldt-selftest-smp2 0 "$dax_append ldt.run=/bin/ldt-selftest" \
	'smp: Brought up 1 node, 2 CPUs' 'ldt-selftest: PASS' 'ldt-init: exit status 0' \
	'# dax_pud_munmap: ' '# memcg_log_charged: memcg slab'
opts=(--initrd "$redis")
run_case ldt-bench 0 'ldt.run=/bin/ldt-bench%20--short' \
	'"bench":"write","tracker":"ldt"' '"bench":"timeline","tracker":"ldt"' \
	'"bench":"kv","tracker":"ldt"' '"bench":"redis","tracker":"ldt"' \
	'"bench":"collect","tracker":"ldt"' \
	'# ldt-bench: done' 'ldt-init: exit status 0'

summary image-qemu
