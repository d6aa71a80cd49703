#!/usr/bin/env bash
# tests/image-nested.sh: the guest image as a level-2 guest in the nested
# machine (images/run-nested.sh: QEMU TCG with SVM+NPT, the nested host
# kernel, a static ldt-vmm on its /dev/kvm with --cpu-profile host).
#   1. syscheck: ldt.run=/bin/ldt-syscheck in the level-2 guest -> status 0,
#      "ldt-syscheck: PASS", and the nested machine reported the verdict.
#   2. smp: the same with --vcpus 2: both level-2 CPUs come up.
#   3. selftest: ldt-selftest (the LDT never-miss selftests of the guest
#      kernel) under ldt-vmm, on 2 vCPUs (TLB shootdowns between real
#      CPUs: the nested machine has 2, run by two host threads).
#   4. panic: the level-2 guest panics on purpose (sysrq c); its pvpanic
#      report (guest-kernel-patch/vmm-0001) ends ldt-vmm with status 3.
#   5. migrate-<source>: the level-2 guest, while ldt-memcheck rewrites
#      pages of a 32 MiB region in it, is live-migrated between two ldt-vmm
#      processes with that dirty source and --verify (SHA-256 of all guest
#      memory equal on both sides); on the destination the region's
#      checksum from memory must equal the one from the writer's record (no
#      write lost), ldt-syscheck must pass, and the status must be 0.
#   6. migrate-guest-ldt: the same with guest-ldt (the guest kernel's own
#      record, ldt-pv device), audited against KVM's log round by round
#      (0 missed pages), with ldt-stress working the kernel beside it;
#      the guest's direct map has no 2 MiB page left before the migration
#      (the driver split it at boot, not at the session's start).
#   7. dirty-linux: every dirty source's harvests against the frames a
#      Linux guest's ring-3 writer rewrote (0 missed).
#   0. fault-verdict (first): the triple-fault verdict behind the RETRY
#      below, on synthetic QEMU records made with this nested kernel.
# Progress is streamed by run-nested.sh; LDT_NESTED_TIMEOUT (seconds) bounds
# each run.  Prints "image-nested: P passed, F failed"; exits non-zero if a
# case failed.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TIMEOUT=${LDT_NESTED_TIMEOUT:-1800}
# shellcheck source=tests/lib.sh
source "$ROOT/tests/lib.sh"

logdir=$(mktemp -d)
trap 'rm -rf "$logdir"' EXIT

# emulator_fault LOG: when the run in LOG met the emulator's level-2 triple
# fault that run_case repeats ("before any migration", "on tables memory
# maps"); nothing for any other failure.
emulator_fault() {
	grep -q 'guest triple fault' "$1" || return 0
	if ! grep -q 'ldt-migrate-l2: migrating' "$1"; then
		echo 'before any migration'
	elif grep -q "fault verdict: not the guest's" "$1"; then
		echo 'on tables memory maps'
	fi
}

# run_case NAME EXPECTED_STATUS RUN_CMD 'RUN-NESTED OPTIONS' [REQUIRED_OUTPUT...]
# (%20 in the options stands for a space inside one option value)
run_case() {
	local name=$1 want=$2 run=$3 opts=() log=$logdir/$1.log status=0 o
	for o in $4; do opts+=("${o//%20/ }"); done
	shift 4
	echo "=== $name: level-2 ldt.run=$run ${opts[*]}, expecting status $want (timeout ${TIMEOUT}s)"
	# Seen about once in 10-30 nested boots (in CI: at the level-2 kernel's
	# first instructions, or as ldt-memcheck starts), before any migration
	# or dirty tracking: the level-2 guest triple-faults with no oops.  Not
	# root-caused (QEMU's TCG emulation of SVM, 7.2 and 10.0 alike; see
	# README, Known problems).  Such a run is repeated, loudly, and only
	# for that failure, at most twice (CI met it twice in a row once in a
	# dozen runs); run-nested.sh prints QEMU's exception log up to the
	# shutdown (images/nested/lib.sh: nested_fault_digest), so a failure in
	# CI leaves the faults that led to it in the CI output.
	# Repeated too, whenever it happens: a triple fault whose last #PF is on
	# an address the guest's intact page tables map in ldt-vmm's memory
	# (nested_fault_root_verdict: nothing the guest, its dirty tracking or
	# a migration did can make that #PF), or whose state is level 1's own
	# as a #VMEXIT leaves it (RIP after level 1's VMRUN: the emulator ran
	# the host's state as the guest's).  A fault on tables the memory no
	# longer holds is not repeated: that could be ours.
	local attempt when
	for attempt in 1 2 3; do
		status=0
		"$ROOT/images/run-nested.sh" --timeout "$TIMEOUT" --run "$run" --log "$log" "${opts[@]}" \
			</dev/null || status=$?
		[ "$status" -ne "$want" ] || break
		when=$(emulator_fault "$log")
		[ -n "$when" ] && [ "$attempt" -lt 3 ] || break
		echo "=== $name: RETRY $attempt of 2: level-2 triple fault $when (status $status)"
		grep -a 'fault verdict\|fault address' "$log" | sed 's/^/=== /'
		grep -m3 'triple fault\|ldt-init: running' "$log" | sed 's/^/=== /'
	done
	why=
	[ "$status" -eq "$want" ] || why="status $status, expected $want"
	require_output "$log" "$@"
	record "$name"
}

# The verdict that decides a RETRY above, on synthetic logs shaped like
# QEMU's record of CI's 2026-12-02 fault, with this nested kernel's own
# VMRUN return address: it must name level 1's post-#VMEXIT state run as
# level 2, and nothing near it.
verdict_case() {
	local dir=$logdir/verdict kernel vmlinux sym ret v
	mkdir -p "$dir"
	why=
	if ! "$ROOT/images/build-nested.sh" >"$dir/build.log" 2>&1; then
		why="images/build-nested.sh failed"
		record fault-verdict
		return
	fi
	kernel=$("$ROOT/images/build-nested.sh" --print-cache-dir)/bzImage
	vmlinux=${kernel%/bzImage}/linux/vmlinux
	sym=$(awk '$3 == "__svm_vcpu_run" { print $1 }' "${vmlinux%/vmlinux}/System.map")
	ret=$(objdump -d --start-address="0x$sym" --stop-address="$(printf '0x%x' $((0x$sym + 0x400)))" \
		"$vmlinux" | awk 'f && r == "" { r = $1 } /\tvmrun/ { f = 1 } END { sub(":", "", r); print r }')
	if [ -z "$sym" ] || [ ${#ret} -ne 16 ]; then
		why="no VMRUN in __svm_vcpu_run of $vmlinux"
		record fault-verdict
		return
	fi
	# fault_log RIP CR3: QEMU's -d int lines of a #PF, #DF, shutdown chain.
	fault_log() {
		printf '%s\n' 'check_exception old: 0xffffffff new 0xe' \
			"1: v=0e e=0010 i=0 cpl=0 IP=0010:$1 pc=$1 SP=0018:ffff88803ec5fcf8 CR2=$1" \
			"RIP=$1 RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=0" \
			"CR0=80050033 CR2=$1 CR3=$2 CR4=003506b0" \
			'check_exception old: 0xe new 0xe' \
			"2: v=08 e=0000 i=0 cpl=0 IP=0010:$1 pc=$1 SP=0018:ffff88803ec5fcf8" \
			"RIP=$1 RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=0" \
			"CR0=80050033 CR2=fffffe00000000e0 CR3=$2 CR4=003506b0" \
			'check_exception old: 0x8 new 0xe'
	}
	printf '%s\n' 'ldt-vmm: vCPU 0: guest triple fault (KVM_EXIT_SHUTDOWN) at RIP 0xfff0' \
		'ldt-vmm: fault scan: 2 page-table roots in guest memory (PGD[511] = 0x2a0d067): 0x5b0000 0x2015000' \
		'ldt-vmm: fault scan: all-zero guest frames: 0x2-0x2 0x700-0x7ff' >"$dir/out"
	fault_log "$ret" 0000000000763000 >"$dir/q1"
	v=$(nested_fault_root_verdict "$dir/q1" "$dir/out" "$kernel") || true
	grep -q "^fault verdict: not the guest's: the emulator ran level 1's state" <<<"$v" ||
		why="no verdict for RIP $ret (the VMRUN return) under a non-level-2 root: $v"
	grep -q "__svm_vcpu_run+0x" <<<"$v" || why="${why:+$why; }the verdict does not name the VMRUN: $v"
	# The same kernel named by its tree's bzImage (kmod/run-nested-kmod.sh).
	v=$(nested_fault_root_verdict "$dir/q1" "$dir/out" "${kernel%/bzImage}/linux/arch/x86/boot/bzImage") || true
	grep -q "^fault verdict: not the guest's" <<<"$v" || why="${why:+$why; }no verdict with the tree's bzImage: $v"
	# One byte off, or no level-1 kernel to check against: no verdict.
	fault_log "$(printf '%x' $((0x$ret + 1)))" 0000000000763000 >"$dir/q2"
	v=$(nested_fault_root_verdict "$dir/q2" "$dir/out" "$kernel") || true
	! grep -q 'fault verdict' <<<"$v" || why="${why:+$why; }a verdict for RIP $ret+1: $v"
	v=$(nested_fault_root_verdict "$dir/q1" "$dir/out") || true
	! grep -q 'fault verdict' <<<"$v" || why="${why:+$why; }a verdict without the level-1 kernel: $v"
	# Under a level-2 root the scan found, it is a level-2 state: this
	# rule says nothing (and the IDT page is not in the scan: no verdict).
	fault_log "$ret" 00000000005b0000 >"$dir/q3"
	v=$(nested_fault_root_verdict "$dir/q3" "$dir/out" "$kernel") || true
	! grep -q 'fault verdict\|fault state' <<<"$v" || why="${why:+$why; }a verdict under a level-2 root: $v"
	# The tenth record's shape: a level-2 kernel fault under an intact
	# root whose last #PF is on the IDT in the kernel image (early boot),
	# which the scan maps.  Called as nested_boot calls it, in a pipeline
	# under errexit (which the pipeline inherits, unlike $(...)): the
	# greps that find no IDT/GDT/TSS line must not end it.
	sed -e "s/CR2=fffffe00000000e0/CR2=ffffffff820700e0/" -e "s/$ret/ffffffff81027fd1/g" \
		"$dir/q3" >"$dir/q4"
	echo 'ldt-vmm: fault scan: kernel image 0xffffffff81000000-0xffffffff82400000 mapped' >>"$dir/out"
	# A shell of its own: errexit is off for anything under this `|| true`.
	v=$(bash -c 'set -euo pipefail; source "$1/images/lib.sh"; source "$1/images/nested/lib.sh"
		nested_fault_root_verdict "$2" "$3" "$4" | cat' _ "$ROOT" "$dir/q4" "$dir/out" "$kernel") || true
	grep -q "^fault verdict: not the guest's: its intact tables map" <<<"$v" ||
		why="${why:+$why; }no verdict for a fault on the kernel image's IDT under errexit: $v"
	record fault-verdict "VMRUN return $ret"
}
# shellcheck source=images/lib.sh
source "$ROOT/images/lib.sh"
# shellcheck source=images/nested/lib.sh
source "$ROOT/images/nested/lib.sh"
verdict_case

run_case syscheck 0 /bin/ldt-syscheck '' \
	'ldt-nested: level-1 user space reached' 'ldt-init: user space reached' \
	'ldt-syscheck: PASS' 'ldt-nested: level-2 exit status 0'
run_case smp 0 /bin/ldt-syscheck '--l2-opts --vcpus%202' \
	'smp: Brought up 1 node, 2 CPUs' 'ldt-syscheck: PASS' 'ldt-init: exit status 0'
run_case selftest 0 /bin/ldt-selftest '--l2-opts --vcpus%202' \
	'ldt-init: running: /bin/ldt-selftest' 'ldt-selftest: PASS' 'ldt-init: exit status 0'
run_case panic 3 'echo%20c%20>%20/proc/sysrq-trigger' '' \
	'Kernel panic - not syncing: sysrq triggered crash' \
	'ldt-vmm: the guest kernel panicked (pvpanic event on port 0x505)' \
	'ldt-nested: level-2 exit status 3'

for src in kvm-bitmap kvm-clear kvm-ring; do
	extra=
	[ "$src" != kvm-ring ] || extra='--l2-opts --dirty-ring%204096'
	# ldt.run= empty: migrate-l2's standard workload (ldt-memcheck, then
	# ldt-syscheck).
	run_case "migrate-$src" 0 '' "--migrate $src $extra" \
		'[src] ldt-memcheck: 32 MiB, checksum before' \
		"ldt-migrate-l2: migrating with --dirty-source $src --verify" \
		'ldt-migrate-l2: source ldt-vmm exited with 0' '[dst] ldt-memcheck: PASS' \
		'MiB of received memory mapped into KVM' \
		'[dst] ldt-syscheck: PASS' '[dst] ldt-init: exit status 0' \
		'ldt-nested: level-2 exit status 0'
done

# guest-ldt: the guest kernel's own record (gldt-*.patch) through the ldt-pv
# device, audited against KVM's log in every pre-copy round (no page KVM saw
# written may be missing from the guest's reports), while ldt-stress works
# the kernel paths where entries, page tables and pages go away (fork/exec,
# tmpfs churn, THP zaps, zram swap in a small memory cgroup) beside
# ldt-memcheck.  Before any of it the guest shows its direct map: the
# driver split it to 4 KiB pages at boot (lwdt_vm_prepare()), so no huge
# page is left in it and the migration's start does not pay for the split.
# After it, on the destination, the driver's statistics (they migrate with
# the guest) show that the source's harvests left direct-map page tables
# out (gldt-0006: the ones no CPU used since the previous harvest), so the
# audit's 0 misses are of harvests that skipped.
run_case migrate-guest-ldt 0 \
	'grep%20DirectMap2M%20/proc/meminfo;%20/bin/ldt-memcheck%20--until-uptime%2040%20&%20/bin/ldt-stress%20--until-uptime%2040;%20wait;%20mount%20-t%20debugfs%20none%20/sys/kernel/debug;%20grep%20-q%20kernel_tables_skipped:.[1-9]%20/sys/kernel/debug/ldt_pv_stats%20&&%20echo%20ldt-pv-skip:%20yes;%20/bin/ldt-syscheck' \
	'--migrate guest-ldt --l2-opts --ldt-pv%20--ldt-pv-audit' \
	'ldt-pv: protocol 1, 65536 frames' '[src] DirectMap2M:           0 kB' \
	'[src] ldt-memcheck: 32 MiB, checksum before' \
	'[src] ldt-stress: 4 workers' \
	'ldt-migrate-l2: migrating with --dirty-source guest-ldt --verify' \
	'"missed_pages":0' \
	'ldt-migrate-l2: source ldt-vmm exited with 0' '[dst] ldt-memcheck: PASS' \
	'[dst] ldt-stress: PASS' '[dst] ldt-pv-skip: yes' '[dst] ldt-syscheck: PASS' \
	'[dst] ldt-init: exit status 0' 'ldt-nested: level-2 exit status 0'

# Every dirty source against ground truth in a Linux guest: ldt-writer
# rewrites a locked working set each round and every one of its frames
# must be in that round's harvest (images/nested/bench-dirty-l2; a miss or
# a failed mode makes the status non-zero).  The timing figures are the
# benchmark's (scripts/bench-dirty-nested.sh), not asserted here.
LDT_BENCH_ROUNDS=2 LDT_BENCH_WS=2048 run_case dirty-linux 0 '' '--bench-dirty-linux' \
	'bench-dirty-l2: boot 1: ldt-writer: frames 2048 in' \
	'bench-dirty-l2: boot 2: ldt-writer: frames 2048 in' \
	'"mode":"kvm-bitmap","round":2' '"mode":"kvm-clear","round":2' \
	'"mode":"guest-ldt","round":2' '"mode":"kvm-ring","round":2' \
	'bench-dirty-l2: boot 1: ldt-writer: frames unchanged' \
	'bench-dirty-l2: boot 2: ldt-writer: frames unchanged' 'bench-dirty-l2: done, 0 failed' \
	'ldt-nested: level-2 exit status 0'

summary image-nested
