#!/usr/bin/env bash
# images/run-qemu.sh: boot the guest image under QEMU TCG (no KVM needed),
# serial console on stdio.  The independent reference for the guest image:
# the same image, kernel command line conventions and exit-status path as
# ldt-vmm.
#
# Usage: images/run-qemu.sh [--timeout S] [--append 'words'] [--log FILE]
#                            [--smp N] [--mem SIZE] [--initrd FILE] [IMAGE]
#   --timeout S   kill QEMU after S seconds (default 300)
#   --append W    extra kernel command line words, e.g. 'ldt.run=/bin/ldt-syscheck'
#   --log FILE    also write the console output to FILE
#   --smp N       guest CPUs (default 1; QEMU runs them on N host threads)
#   --mem SIZE    guest memory, as QEMU's -m (default 256M)
#   --initrd FILE a second initramfs, unpacked over the built-in one (e.g.
#                 the Redis server of images/build-redis.sh)
#   IMAGE         bzImage with built-in initramfs (default images/guest.img)
#
# Exit status: the guest command's status N (0..254).  The guest init writes
# N to port 0x501, where QEMU's isa-debug-exit device makes QEMU exit with
# (N << 1) | 1; a guest reboot (reboot=k, i8042 reset) with -no-reboot makes
# QEMU exit 0, which means 0.  QEMU exit codes are 8 bits, so N >= 128 does
# not survive (N << 1) | 1; the status printed by init on the console
# ("ldt-init: exit status N") is used to recover it.
# 255: the harness failed: timeout, guest panic, QEMU error, or an exit code
# that does not match what init printed.
set -euo pipefail

# shellcheck source=images/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Every failure of the harness itself exits 255, never a possible guest status.
harness_fail() {
	echo "run-qemu: $*" >&2
	exit 255
}

timeout_s=300
append=
log=
smp=1
mem=256M
initrd=
image=$LDT_ROOT/images/guest.img
while [ $# -gt 0 ]; do
	case "$1" in
	--timeout | --append | --log | --smp | --mem | --initrd)
		[ $# -ge 2 ] || harness_fail "$1 needs a value"
		case "$1" in
		--timeout) timeout_s=$2 ;;
		--append) append=$2 ;;
		--log) log=$2 ;;
		--smp) smp=$2 ;;
		--mem) mem=$2 ;;
		--initrd) initrd=$2 ;;
		esac
		shift 2
		;;
	-h | --help) awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0"; exit 0 ;;
	-*) harness_fail "unknown option $1 (try --help)" ;;
	*) image=$1; shift ;;
	esac
done
[ -f "$image" ] || harness_fail "no image at $image (run images/build.sh)"
ldt_ensure_packages qemu-system-x86 || harness_fail "cannot install qemu-system-x86"

# microvm: no PCI, no ACPI, legacy ISA UART at 0x3f8, the same shape as the
# machine ldt-vmm builds.  Its qboot firmware boots the bzImage (-kernel;
# qboot finds the MP table the kernel uses without ACPI).
# isa-debug-exit at 0x501 carries the exit status.
# reboot=k: the guest resets by writing 0xfe to the keyboard controller at
# 0x64, as under ldt-vmm.  microvm has no i8042 by default: without one the
# kernel falls back to jumping to the BIOS reset vector, which silently boots
# the kernel again, so add it; its reset plus -no-reboot makes QEMU exit 0.
# panic=-1: a panic resets at once (and run-qemu.sh reports the panic).
# rtc=on: without a CMOS RTC and without kvmclock (TCG has none) the kernel
# spends ~1 s at boot polling for the missing RTC ("Unable to read current
# time from RTC"); with it, user space comes in ~1 s instead of ~2 s.  Under
# ldt-vmm the wall clock comes from kvmclock, so neither pays that second.
cmdline="console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=-1 $append"
# shellcheck disable=SC2054 # the commas are inside -M's argument
qemu=(qemu-system-x86_64
	-M microvm,isa-serial=on,rtc=on,acpi=off
	-accel tcg -cpu max -m "$mem" -smp "$smp"
	-nographic -no-reboot
	-kernel "$image" -append "$cmdline"
	-device isa-debug-exit,iobase=0x501,iosize=1
	-device i8042)
[ -z "$initrd" ] || qemu+=(-initrd "$initrd")

out=$(mktemp)
trap 'rm -f "$out"' EXIT
echo "run-qemu: booting $image (timeout ${timeout_s}s)"
echo "run-qemu: cmdline: $cmdline"
t0=$(date +%s.%N)
# Console to our stdout and to $out (to check what init printed); our stdin
# is the console's input (a terminal, or e.g. commands piped to the shell).
set +e
if [ -t 0 ]; then
	# --foreground: QEMU may read the terminal (it is not put in the background).
	timeout --foreground "$timeout_s" "${qemu[@]}" | tee "$out"
	rc=${PIPESTATUS[0]}
else
	timeout "$timeout_s" "${qemu[@]}" | tee "$out"
	rc=${PIPESTATUS[0]}
fi
set -e
elapsed=$(echo "$(date +%s.%N) - $t0" | bc)
[ -z "$log" ] || cp "$out" "$log"
printf 'run-qemu: QEMU exited with %d after %.1f s\n' "$rc" "$elapsed"

# init's own report of the guest command's status, if any.
printed=$(sed -n 's/^ldt-init: exit status \([0-9]*\)\r*$/\1/p' "$out" | tail -n1)

[ "$rc" -ne 124 ] || harness_fail "timed out after ${timeout_s}s (no guest exit)"
if grep -q 'Kernel panic' "$out"; then
	harness_fail "guest kernel panicked"
fi
if [ $((rc % 2)) -eq 1 ]; then
	# isa-debug-exit: rc = (N << 1) | 1 mod 256.  QEMU also exits 1 on its
	# own errors, so insist that init printed a matching status.
	if [ -n "$printed" ] && [ $((((printed << 1) | 1) & 255)) -eq "$rc" ] && [ "$printed" -le 254 ]; then
		echo "run-qemu: guest status $printed"
		exit "$printed"
	fi
	harness_fail "QEMU exit code $rc does not match a guest status (init printed '${printed:-nothing}'); QEMU error?"
fi
if [ "$rc" -eq 0 ]; then
	# Guest reset without writing a status (e.g. the interactive shell exited).
	[ -z "$printed" ] || harness_fail "init printed status $printed but QEMU did not get it on port 0x501"
	echo "run-qemu: guest rebooted, status 0"
	exit 0
fi
harness_fail "QEMU failed with exit code $rc"
