#!/usr/bin/env bash
# tests/image-ldt-vmm.sh: boot images/guest.img under target/release/ldt-vmm
# directly on this machine's /dev/kvm and check what the guest reports.
#   1. truncated, corrupted: a cut or damaged copy of guest.img gives a
#      clear error and status 1 before anything runs;
#   2. syscheck: ldt.run=/bin/ldt-syscheck -> status 0, "ldt-syscheck: PASS"
#      (fork/exec, mmap, file I/O, pipe, SSE registers across context
#      switches);
#   3. smp: --vcpus 2, both CPUs come up ("smp: Brought up 1 node, 2 CPUs"),
#      user space sees 2 CPUs, and a guest status other than 0 (7) comes
#      back as ldt-vmm's exit status; smp-placement: the vCPU threads (one
#      --vcpu-cpus each) and every other thread (--vmm-cpus) run where the
#      options put them;
#   4. panic: the guest panics on purpose (sysrq c); its pvpanic report
#      (guest-kernel-patch/vmm-0001) ends ldt-vmm with status 3 and the
#      one-line message, not with the reset's 0.
# On a PVM host (see ../shared/DESIGN.md) guest ring 0 is interpreted, so a
# boot takes minutes: the console is streamed with a case prefix so progress
# is visible, and every case has a timeout (LDT_VMM_TIMEOUT, seconds).
# Prints one line per case and "image-ldt-vmm: P passed, F failed"; exits
# non-zero if any case failed.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TIMEOUT=${LDT_VMM_TIMEOUT:-1800}
VMM=$ROOT/target/release/ldt-vmm
IMAGE=$ROOT/images/guest.img

[ -e /dev/kvm ] || { echo "image-ldt-vmm: no /dev/kvm on this machine" >&2; exit 1; }
"$ROOT/images/build.sh"
if [ ! -x "$VMM" ]; then
	echo "image-ldt-vmm: building ldt-vmm (cargo build --release)"
	(cd "$ROOT" && cargo build --release)
fi

# shellcheck source=tests/lib.sh
source "$ROOT/tests/lib.sh"

logdir=$(mktemp -d)
trap 'rm -rf "$logdir"' EXIT

# run_case NAME EXPECTED_STATUS "LDT-VMM OPTIONS" CMDLINE_APPEND [REQUIRED_OUTPUT...]
run_case() {
	local name=$1 want=$2 opts=$3 append=$4 log=$logdir/$1.log status=0 printed t0
	shift 4
	echo "=== $name: ldt-vmm run $opts --cmdline-append '$append' (timeout ${TIMEOUT}s, expecting status $want)"
	t0=$(date +%s)
	# Console to the terminal (prefixed, for progress) and to the log.
	# set +e: a non-zero guest status must not end this script.
	set +e
	# shellcheck disable=SC2086 # opts are words on purpose
	timeout "$TIMEOUT" "$VMM" run "$IMAGE" $opts --cmdline-append "$append" \
		</dev/null 2>&1 | tee "$log" | sed -u "s/^/[$name] /"
	status=${PIPESTATUS[0]}
	set -e
	echo "=== $name: ldt-vmm exited with $status after $(($(date +%s) - t0)) s"
	printed=$(sed -n 's/^ldt-init: exit status \([0-9]*\)\r*$/\1/p' "$log" | tail -n1)
	why=
	if [ "$status" -eq 124 ]; then
		why="timed out after ${TIMEOUT}s; last console line: '$(grep -v '^\s*$' "$log" | tail -n1 | tr -d '\r')'"
	elif grep -q 'Kernel panic' "$log"; then
		# panic=-1 resets the guest, which ldt-vmm reports as status 0.
		why="guest kernel panicked: $(grep -m1 'Kernel panic' "$log" | tr -d '\r')"
	elif [ "$status" -ne "$want" ]; then
		why="status $status, expected $want"
	elif [ "${printed:-none}" != "$want" ]; then
		# Status 0 also means "guest reset"; 1 also means "ldt-vmm error".
		why="init printed exit status '${printed:-nothing}', expected $want"
	fi
	require_output "$log" "$@"
	record "$name"
}

# bad_image NAME EXPECTED_ERROR: a damaged copy of guest.img (made by the
# caller in $logdir/NAME.img) must be refused before it runs: status 1 and
# a one-line error naming the problem.
bad_image() {
	local name=$1 want=$2 out status=0
	out=$(timeout 60 "$VMM" run "$logdir/$name.img" </dev/null 2>&1) || status=$?
	why=
	if [ "$status" -ne 1 ] || ! grep -qF -- "$want" <<<"$out"; then
		why="status $status, expected 1 and '$want'; output: $(tail -n 3 <<<"$out")"
	fi
	record "$name" "$out"
}
size=$(stat -c %s "$IMAGE")
head -c $((size / 2)) "$IMAGE" >"$logdir/truncated.img"
bad_image truncated "is a truncated bzImage"
cp "$IMAGE" "$logdir/corrupted.img"
# The setup header's "HdrS" magic at 0x202.
printf 'XXXX' | dd of="$logdir/corrupted.img" bs=1 seek=$((0x202)) conv=notrunc status=none
bad_image corrupted "is not a loadable x86-64 kernel"

# earlyprintk: the kernel prints from its first instructions, so a hang is
# visible at once instead of after the (slow, interpreted) serial probe.
run_case syscheck 0 '' 'earlyprintk=ttyS0 ldt.run=/bin/ldt-syscheck' \
	'ldt-init: user space reached' 'ok 8 xmm_regs_across_context_switches' \
	'ldt-syscheck: PASS' 'ldt-init: exit status 0'
# `[ $(nproc) = 2 ] && exit 7`: 7 proves the guest saw 2 CPUs and that a
# non-zero status reaches ldt-vmm's exit code; a failed test exits 1.
# It also places the threads, one --vcpu-cpus per vCPU in reverse order:
# vcpu0 on the last CPU this script may use, vcpu1 and every other thread
# (main, API, KVM's worker) on the first; a watcher lists them meanwhile.
cpus=$(sed -n 's/^Cpus_allowed_list:\s*//p' /proc/self/status | tr ',-' '\n\n')
first=$(head -n1 <<<"$cpus") last=$(tail -n1 <<<"$cpus")
watch_threads() {
	local pid t i
	for i in $(seq 600); do
		pid=$(pgrep -f "^$VMM run .*$logdir/smp.api" || true)
		[ -n "$pid" ] && [ -e "/proc/$pid/task" ] && grep -qx vcpu1 /proc/"$pid"/task/*/comm 2>/dev/null && break
		sleep 0.5
	done
	[ -n "$pid" ] || return 0
	sleep 1
	for t in /proc/"$pid"/task/*; do
		echo "$(cat "$t/comm") $(sed -n 's/^Cpus_allowed_list:\s*//p' "$t/status")"
	done >"$logdir/smp.threads"
}
watch_threads &
watcher=$!
# shellcheck disable=SC2016 # $(nproc) is for the guest's shell
run_case smp 7 "--vcpus 2 --vcpu-cpus $last --vcpu-cpus $first --vmm-cpus $first --api $logdir/smp.api" \
	'earlyprintk=ttyS0 ldt.run=[%20$(nproc)%20=%202%20]%20&&%20exit%207' \
	'smp: Brought up 1 node, 2 CPUs' 'ldt-init: user space reached' \
	'ldt-init: exit status 7'
wait "$watcher" || true
why=
threads=$(cat "$logdir/smp.threads" 2>/dev/null || true)
[ -n "$threads" ] || why="no thread list of the smp run"
while read -r name placed; do
	case $name in vcpu0) want=$last ;; *) want=$first ;; esac
	[ "$placed" = "$want" ] || why="${why:+$why; }thread $name on CPUs $placed, expected $want"
done <<<"$threads"
record smp-placement "$(tr '\n' ' ' <<<"$threads")"

# panic_case NAME CMDLINE_APPEND: the guest kernel panics; ldt-vmm must end
# with status 3 and say so (the reset that panic=-1 makes comes too late).
panic_case() {
	local name=$1 append=$2 log=$logdir/$1.log status=0
	echo "=== $name: ldt-vmm run --cmdline-append '$append' (timeout ${TIMEOUT}s, expecting status 3)"
	set +e
	timeout "$TIMEOUT" "$VMM" run "$IMAGE" --cmdline-append "$append" \
		</dev/null 2>&1 | tee "$log" | sed -u "s/^/[$name] /"
	status=${PIPESTATUS[0]}
	set -e
	why=
	[ "$status" -eq 3 ] || why="status $status, expected 3 (guest panic)"
	require_output "$log" 'Kernel panic - not syncing: sysrq triggered crash' \
		'ldt-vmm: the guest kernel panicked (pvpanic event on port 0x505)'
	record "$name"
}
panic_case panic 'earlyprintk=ttyS0 ldt.run=echo%20c%20>%20/proc/sysrq-trigger'

summary image-ldt-vmm
