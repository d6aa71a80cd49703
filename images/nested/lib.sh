# shellcheck shell=bash
# images/nested/lib.sh: what the nested-machine scripts share
# (images/run-nested.sh, kmod/run-nested-kmod.sh).  Sourced after
# images/lib.sh.  Not an input of any kernel build: changing it rebuilds
# nothing.

# nested_tsc_args: kernel parameters the nested machine's kernel needs
# under TCG.  tsc_early_khz: on a loaded host the kernel's PIT calibration
# of the TSC often fails ("tsc: Marking TSC unstable due to could not
# calculate TSC khz"); KVM then has no TSC frequency and every KVM_RUN
# spins forever in vcpu_enter_guest (kvm_guest_time_update() re-requests
# KVM_REQ_CLOCK_UPDATE while get_cpu_tsc_khz() is 0).  TCG's TSC runs at
# the host's rate, so give the kernel that.  tsc=reliable: the clocksource
# watchdog would otherwise often mark the TSC unstable under TCG and fall
# back to jiffies (10 ms resolution: useless timings).
nested_tsc_args() {
	local mhz
	mhz=$(awk -F: '/^cpu MHz/ { printf "%d", $2; exit }' /proc/cpuinfo 2>/dev/null || true)
	[ -n "$mhz" ] && [ "$mhz" -gt 0 ] || mhz=2000
	echo "tsc_early_khz=$((mhz * 1000)) tsc=reliable"
}

# nested_static_vmm: build a static ldt-vmm (the nested machine has no
# shared libraries) and print its path.  musl if that Rust target is
# installed, else glibc with crt-static.  Its own target dir, so it neither
# waits for nor disturbs the normal target/ builds.
nested_static_vmm() {
	local triple rustflags tdir
	if rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl; then
		triple=x86_64-unknown-linux-musl
		rustflags=
	else
		triple=x86_64-unknown-linux-gnu
		rustflags='-C target-feature=+crt-static'
	fi
	tdir=$LDT_ROOT/target/nested-static
	echo "nested: building a static ldt-vmm ($triple${rustflags:+, $rustflags})" >&2
	(cd "$LDT_ROOT" && RUSTFLAGS=$rustflags CARGO_TARGET_DIR=$tdir \
		cargo build --release --quiet --target "$triple" --bin ldt-vmm) >&2 || return 1
	file -L "$tdir/$triple/release/ldt-vmm" 2>/dev/null | grep -q 'statically linked\|static-pie linked' || {
		echo "nested: $tdir/$triple/release/ldt-vmm is not statically linked" >&2
		return 1
	}
	echo "$tdir/$triple/release/ldt-vmm"
}

# nested_build_kmod KDIR WORK: build kmod/'s ldt_kvm.ko out of tree against
# the configured and built kernel tree KDIR, in WORK/kbuild (nothing written
# into the checkout; the tree only gets `make modules_prepare`, under
# images/build-nested.sh's lock), and print the module's path.  The symbol
# versions: KDIR's Module.symvers, or the vmlinux.symvers `make bzImage`
# leaves.
nested_build_kmod() {
	local kdir=$1 work=$2 lock extra=()
	mkdir -p "$work/kbuild/uapi"
	cp "$LDT_ROOT/kmod/Kbuild" "$LDT_ROOT/kmod/ldt_kvm.c" "$work/kbuild/"
	cp "$LDT_ROOT/kmod/uapi/ldt_kvm.h" "$work/kbuild/uapi/"
	# `make bzImage` leaves no scripts/module.lds (every module's linker
	# script): that is `make modules_prepare`, cheap on a built tree.
	if [ ! -f "$kdir/scripts/module.lds" ]; then
		echo "nested: make modules_prepare in $kdir" >&2
		lock=${kdir%/linux}.lock
		[ -f "$lock" ] || lock=$work/none.lock
		flock "$lock" make -C "$kdir" ARCH=x86_64 modules_prepare >"$work/prepare.log" 2>&1 || {
			cat "$work/prepare.log" >&2
			echo "nested: make modules_prepare failed in $kdir" >&2
			return 1
		}
	fi
	if [ ! -f "$kdir/Module.symvers" ]; then
		[ -f "$kdir/vmlinux.symvers" ] || {
			echo "nested: $kdir has neither Module.symvers nor vmlinux.symvers" >&2
			return 1
		}
		extra=(KBUILD_EXTRA_SYMBOLS="$kdir/vmlinux.symvers")
	fi
	echo "nested: building ldt_kvm.ko against $kdir" >&2
	if ! make -C "$kdir" ARCH=x86_64 M="$work/kbuild" "${extra[@]}" modules >"$work/kbuild.log" 2>&1; then
		cat "$work/kbuild.log" >&2
		echo "nested: module build failed" >&2
		return 1
	fi
	grep -E '(warning|error):' "$work/kbuild.log" >&2 || true
	echo "$work/kbuild/ldt_kvm.ko"
}

# nested_boot TAG KERNEL INITRD 'CMDLINE WORDS' SMP TIMEOUT OUT: boot the
# nested machine: QEMU TCG emulating an AMD CPU with SVM and NPT, microvm
# as in images/run-qemu.sh (ISA UART, isa-debug-exit at 0x501 for the
# status, i8042 for reboot=k; rtc=on: TCG has no kvmclock), 1 GiB (room
# for level-2 guests besides the level-1 kernel), the console streamed and
# kept in OUT.  The kernel command line starts with the console, panic and
# TSC words.  Sets NESTED_RC to QEMU's exit code (124: timeout).
nested_boot() {
	local tag=$1 kernel=$2 initrd=$3 smp=$5 timeout_s=$6 out=$7 cmdline t0
	cmdline="console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=-1 $(nested_tsc_args) $4"
	# shellcheck disable=SC2054 # the commas are inside -M's argument
	local qemu=(qemu-system-x86_64
		-M microvm,isa-serial=on,rtc=on,acpi=off
		-accel tcg -cpu EPYC,+svm,+npt -m 1G -smp "$smp"
		-nographic -no-reboot
		-kernel "$kernel" -initrd "$initrd" -append "$cmdline"
		-device isa-debug-exit,iobase=0x501,iosize=1
		-device i8042)
	# QEMU logs every exception and interrupt it delivers, at both levels
	# (about 25 MB a boot, a few per cent slower): when a level-2 guest
	# triple-faults, KVM has already reset that vCPU by the time ldt-vmm
	# sees the exit, so this log is the only record of the faults that led
	# to it (nested_fault_digest).
	local qlog=$out.qemu-int
	qemu+=(-d int -D "$qlog")
	# Debugging aid: more QEMU options, e.g. LDT_NESTED_QEMU_ARGS='-d int,mmu'.
	# shellcheck disable=SC2206 # word splitting wanted
	[ -z "${LDT_NESTED_QEMU_ARGS:-}" ] || qemu+=(${LDT_NESTED_QEMU_ARGS})
	echo "$tag: booting the nested machine (timeout ${timeout_s}s)"
	echo "$tag: cmdline: $cmdline"
	t0=$(date +%s)
	set +e
	timeout "$timeout_s" "${qemu[@]}" </dev/null | tee "$out"
	NESTED_RC=${PIPESTATUS[0]}
	set -e
	echo "$tag: QEMU exited with $NESTED_RC after $(($(date +%s) - t0)) s"
	if grep -q 'guest triple fault' "$out"; then
		nested_fault_digest "$qlog" | sed "s/^/$tag: /"
		# Kept in the console log too: tests/image-nested.sh reads the
		# verdict there.
		nested_fault_root_verdict "$qlog" "$out" "$kernel" | sed "s/^/$tag: /" | tee -a "$out"
	elif [ "$NESTED_RC" -eq 0 ]; then
		# The inits end through isa-debug-exit (an odd status): 0 is
		# QEMU's -no-reboot after level 1 reset itself, a panic
		# (panic=-1) or its own triple fault, which prints nothing.
		echo "$tag: level 1 reset itself (a panic, or a level-1 triple fault if none is printed above)"
		nested_fault_digest "$qlog" | sed "s/^/$tag: /"
	fi
	rm -f "$qlog"
}

# nested_fault_digest QEMU-INT-LOG: what led to a level-2 triple fault, from
# QEMU's -d int log: the last exception records (vector, error code, CPL,
# RIP, CR2, then the registers and segments QEMU dumps) before the double
# fault that ended in the shutdown exit, and the exception chain lines.
nested_fault_digest() {
	# Called in pipelines of scripts that run with errexit, which the
	# pipeline's subshell inherits: a grep that finds nothing must not end
	# it (options local to the function).
	local -
	set +e
	local log=$1 at
	[ -s "$log" ] || { echo "no QEMU exception log"; return; }
	at=$(grep -n 'check_exception old: 0x8 new' "$log" | tail -n1 | cut -d: -f1)
	if [ -z "$at" ]; then
		echo "QEMU logged no double fault that ended in a shutdown; its last records:"
		tail -n 60 "$log"
		return
	fi
	echo "QEMU's exception log up to the shutdown (line $at of $(wc -l <"$log")):"
	head -n "$at" "$log" | tail -n 90
}

# nested_after_vmrun VMLINUX RIP: whether RIP (16 hex digits, no 0x) is the
# address right after a VMRUN instruction of the level-1 kernel VMLINUX;
# prints the instruction's symbol+offset.
nested_after_vmrun() {
	local vmlinux=$1 rip=$2 start line
	command -v objdump >/dev/null || return 1
	[ ${#rip} -eq 16 ] || return 1
	# Two's complement wraps: printf prints the 64-bit address again.
	start=$(printf '%x' $((0x$rip - 3)))
	line=$(objdump -d --start-address="0x$start" --stop-address="0x$rip" "$vmlinux" 2>/dev/null |
		grep -B2 "^$start:.*vmrun" | grep -o "<[^>]*>" | tr -d "<>" | head -n1)
	[ -n "$line" ] || return 1
	printf '%s\n' "$line"
}

# nested_fault_root_verdict QEMU-INT-LOG OUT [KERNEL]: whether the page-table
# root (CR3) of the last exception before the shutdown is among the roots
# ldt-vmm's fault scan (LDT_VMM_FAULT_SCAN, vmm/src/vm/fault_scan.rs) found
# intact in its memory: yes means the level-2 guest read the root through a
# stale translation, no means the memory behind it lost the root (zeroed,
# or reused by the level-2 kernel), or that the state is not level 2's at
# all (checked against KERNEL, the level-1 bzImage: its vmlinux sits in
# linux/ beside it in images/build-nested.sh's cache, or above it in its
# own tree).
nested_fault_root_verdict() {
	# As nested_fault_digest: greps that find nothing are answers here.
	local -
	set +e
	local log=$1 out=$2 kernel=${3:-} at cr3 root scan intact=no
	[ -s "$log" ] || return 0
	at=$(grep -n 'check_exception old: 0x8 new' "$log" | tail -n1 | cut -d: -f1)
	[ -n "$at" ] || return 0
	cr3=$(head -n "$at" "$log" | grep -o 'CR3=[0-9a-f]*' | tail -n1 | cut -d= -f2)
	[ -n "$cr3" ] || return 0
	root=$(printf '%#x' $((0x$cr3 & 0x000ffffffffff000)))
	scan=$(grep -a 'fault scan: .*page-table roots' "$out" | tail -n1 | tr -d '\r')
	if [ -z "$scan" ]; then
		echo "fault root: CR3 $root; ldt-vmm printed no fault scan"
	elif printf '%s\n' "$scan" | tr ' ' '\n' | grep -qx "$root"; then
		intact=yes
		echo "fault root: CR3 $root IS intact in ldt-vmm's memory (a stale translation)"
	else
		local zero=no r gfn=$((root >> 12))
		for r in $(grep -a 'fault scan: all-zero guest frames' "$out" | tail -n1 |
			tr -d '\r' | sed 's/.*frames://'); do
			if [ $((${r%-*})) -le "$gfn" ] && [ "$gfn" -le $((${r#*-})) ]; then
				zero=yes
				break
			fi
		done
		echo "fault root: CR3 $root is NOT among the roots in ldt-vmm's memory; all zeros there: $zero"
		# The faulting state may be level 1's own, as a #VMEXIT leaves it:
		# RIP just after level 1's VMRUN, level 1's CR3 and CR4.  A level-2
		# guest cannot be there (level 1's code and tables are not in its
		# memory), ldt-vmm never sets such a state, and KVM saves only what
		# the processor left in the VMCB; so the emulator ran level 1's
		# state as level 2's (seen in QEMU 7.2 TCG, README Known problems).
		local rip vmlinux at_insn
		rip=$(head -n "$at" "$log" | grep -o 'RIP=[0-9a-f]*' | tail -n1 | cut -d= -f2)
		# The cache's bzImage has its tree in linux/ beside it; a tree's own
		# arch/x86/boot/bzImage (kmod/run-nested-kmod.sh) has it above.
		vmlinux=$(dirname "${kernel:-/nonexistent}")/linux/vmlinux
		[ -f "$vmlinux" ] || vmlinux=${kernel%/arch/x86/boot/bzImage}/vmlinux
		if [ -n "$rip" ] && [ -f "$vmlinux" ] &&
			at_insn=$(nested_after_vmrun "$vmlinux" "$rip"); then
			echo "fault state: RIP 0x$rip is level 1's return from the VMRUN at $at_insn ($vmlinux) under CR3 $root"
			echo "fault verdict: not the guest's: the emulator ran level 1's state after a #VMEXIT as the level-2 guest"
		fi
	fi
	# Where the last #PF was: on a page exception delivery reads (IDT,
	# GDT, TSS) or in the kernel image, whether memory maps it under that
	# root.  Mapped there under an intact root, the walk that faulted did
	# not read this memory: nothing the guest did can make that #PF.
	local cr2 page line name mapped=
	cr2=$(head -n "$at" "$log" | grep -o 'CR2=[0-9a-f]*' | tail -n1 | cut -d= -f2)
	page=$(printf '%#x' $((0x${cr2:-0} & ~0xfff)))
	line=$(grep -a "fault scan: [A-Z]* $page mapped in" "$out" | tail -n1 | tr -d '\r')
	if [ -n "$line" ]; then
		name=$(printf '%s\n' "$line" | sed 's/.*fault scan: \([A-Z]*\) .*/\1/')
		mapped=yes
		printf '%s\n' "$line" | grep -q " $root@L" && mapped=no
	else
		line=$(grep -a 'fault scan: kernel image 0x[0-9a-f]*-0x[0-9a-f]* mapped' "$out" | tail -n1 | tr -d '\r')
		if [ -n "$line" ] && [ ${#cr2} -eq 16 ]; then
			local lo hi
			lo=$(printf '%s\n' "$line" | sed 's/.*kernel image 0x\([0-9a-f]*\)-.*/\1/')
			hi=$(printf '%s\n' "$line" | sed 's/.*kernel image 0x[0-9a-f]*-0x\([0-9a-f]*\).*/\1/')
			# 16 hex digits each: compared as strings (bash's arithmetic is
			# signed, these are above 2^63).
			if [[ ! "$cr2" < "$lo" && "$cr2" < ffffffff85000000 ]]; then
				name="kernel image"
				mapped=no
				[[ "$cr2" < "$hi" ]] && mapped=yes
			fi
		fi
	fi
	# Under a root the scan did not find, the lines say nothing of it.
	if [ -n "$mapped" ] && [ "$intact" = yes ]; then
		echo "fault address: CR2 0x$cr2 ($name) mapped under $root in ldt-vmm's memory: $mapped"
		if [ "$mapped" = yes ]; then
			echo "fault verdict: not the guest's: its intact tables map the address the emulator faulted on"
		fi
	fi
	grep -a 'fault scan: host page moves' "$out" | tail -n1 | tr -d '\r'
}

# nested_last_line OUT: the last non-empty console line (for timeouts).
nested_last_line() {
	grep -v '^\s*$' "$1" | tail -n1 | tr -d '\r'
}
