#!/usr/bin/env bash
# kmod/run-nested-kmod.sh: build the ldt_kvm module and its test program and
# run them in the nested machine: QEMU TCG emulating an AMD CPU with SVM and
# NPT (-cpu EPYC,+svm,+npt) booting the project's host-config 6.12 kernel
# (images/build-nested.sh: KVM + KVM_AMD + modules), whose initramfs holds
# busybox, ldt_kvm.ko, ldt_kvm_test and kmod/tests/nested-init.
#
# Usage: kmod/run-nested-kmod.sh [--timeout S] [--log FILE] [--kdir DIR]
#                                [--smp N] [--test-args 'ARGS'] [--soak N]
#   --timeout S      kill QEMU after S seconds (default 1200)
#   --log FILE       also write the console output to FILE
#   --kdir DIR       a configured and built kernel tree to build against and
#                    boot (DIR/arch/x86/boot/bzImage); default: the tree of
#                    images/build-nested.sh (built first if needed), or
#                    $LDT_KMOD_KDIR
#   --smp N          vCPUs of the nested machine (default 2)
#   --test-args A    arguments for ldt_kvm_test inside (%20 = space not
#                    needed: passed through the kernel command line encoded)
#   --soak-sources L the soak's dirty sources, comma-separated (default
#                    kvm-bitmap,kvm-clear,host-ldt,kvm-ring,guest-ldt)
#   --soak-backing B the soak's guest RAM backing (ldt-vmm --mem-backing)
#   --soak N         instead of the tests, the live-migration soak
#                    (images/nested/soak-l2): N migrations per dirty source
#                    (scripts/soak-migrate-nested.sh summarizes it)
#
# Prints everything the nested machine prints.  Exit status: the number of
# failed checks inside (0 = all passed, capped at 127); 255 if the harness
# failed (build error, timeout, panic, no verdict).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=images/lib.sh
source "$ROOT/images/lib.sh"
# shellcheck source=images/nested/lib.sh
source "$ROOT/images/nested/lib.sh"

fail() {
	echo "run-nested-kmod: $*" >&2
	exit 255
}

timeout_s=1200
log=
kdir=${LDT_KMOD_KDIR:-}
smp=2
test_args=
soak=
soak_sources=
soak_backing=
while [ $# -gt 0 ]; do
	case "$1" in
	--timeout | --log | --kdir | --smp | --test-args | --soak | --soak-sources | --soak-backing)
		[ $# -ge 2 ] || fail "$1 needs a value"
		case "$1" in
		--timeout) timeout_s=$2 ;;
		--log) log=$2 ;;
		--kdir) kdir=$2 ;;
		--smp) smp=$2 ;;
		--test-args) test_args=$2 ;;
		--soak) soak=$2 ;;
		--soak-sources) soak_sources=$2 ;;
		--soak-backing) soak_backing=$2 ;;
		esac
		shift 2
		;;
	-h | --help) awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0"; exit 0 ;;
	*) fail "unknown argument $1 (try --help)" ;;
	esac
done

ldt_ensure_packages qemu-system-x86 busybox-static gcc make libc6-dev cpio ||
	fail "cannot install packages"

# 1. The nested machine's kernel tree.
if [ -z "$kdir" ]; then
	echo "run-nested-kmod: building (or reusing) the nested host kernel (images/build-nested.sh)"
	"$ROOT/images/build-nested.sh" >&2 || fail "images/build-nested.sh failed"
	kdir=$("$ROOT/images/build-nested.sh" --print-cache-dir)/linux
fi
kernel=$kdir/arch/x86/boot/bzImage
[ -f "$kernel" ] || fail "no bzImage in $kdir (build the kernel first)"
[ -f "$kdir/vmlinux" ] || fail "no vmlinux in $kdir"
grep -q '^CONFIG_MODULES=y' "$kdir/.config" || fail "$kdir: CONFIG_MODULES is off"
grep -q '^CONFIG_KVM_AMD=[ym]' "$kdir/.config" || fail "$kdir: CONFIG_KVM_AMD is off"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# 2. The module, built out of tree in a scratch copy (images/nested/lib.sh).
ko=$(nested_build_kmod "$kdir" "$work") || fail "module build failed"

# 3. The test program (static: the nested machine has no libraries).
echo "run-nested-kmod: building ldt_kvm_test"
gcc -O2 -static -pthread -mno-avx -mno-avx2 -Wall -Wextra -Werror \
	-o "$work/ldt_kvm_test" "$ROOT/kmod/tests/ldt_kvm_test.c" ||
	fail "test program build failed"

# 4. A static ldt-vmm and its flat counter payload (assembled as
# vmm/build.rs does), for the host-ldt source of ldt-vmm: bench dirty and
# migrate --dirty-source host-ldt inside.
vmm=$(nested_static_vmm) || fail "cannot build a static ldt-vmm"
if ! as --64 -I "$ROOT/vmm/payloads" --defsym PAGES=16 --defsym SPIN=200000 \
	-o "$work/counter.o" "$ROOT/vmm/payloads/counter.S" ||
	! ld -Ttext=0x100000 --oformat binary -o "$work/counter.bin" "$work/counter.o"; then
	fail "cannot assemble the counter payload"
fi

# The guest image, for a Linux guest migrated with host-ldt (its kvmclock
# and the other pages KVM itself writes come from KVM's log).
"$ROOT/images/build.sh" >&2 || fail "images/build.sh failed"

# 5. initramfs (uncompressed cpio, -initrd).
root=$work/root
mkdir -p "$root"/{bin,dev,proc,sys,tmp}
install -m 0755 "$ROOT/kmod/tests/nested-init" "$root/init"
install -m 0755 /bin/busybox "$root/bin/busybox"
for a in sh cat cut date dd dmesg echo grep head insmod kill ls lsmod mkdir mkswap mount \
	printf reboot rm rmmod sed sleep stat swapon sync tail test timeout tr wc [; do
	ln -s busybox "$root/bin/$a"
done
install -m 0644 "$ko" "$root/ldt_kvm.ko"
install -m 0755 "$work/ldt_kvm_test" "$root/bin/ldt_kvm_test"
install -m 0755 "$vmm" "$root/bin/ldt-vmm"
install -m 0644 "$work/counter.bin" "$root/counter.bin"
install -m 0644 "$ROOT/images/guest.img" "$root/guest.img"
install -m 0755 "$ROOT/images/nested/migrate-l2" "$root/bin/migrate-l2"
install -m 0755 "$ROOT/images/nested/soak-l2" "$root/bin/soak-l2"
(cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) >"$work/initramfs.cpio"

# 6. Boot (images/nested/lib.sh).
words=
[ -z "$test_args" ] || words="ldt.kmodtest=${test_args// /%20}"
[ -z "$soak" ] || words="$words ldt.soak=$soak"
[ -z "$soak_sources" ] || words="$words ldt.soak_sources=$soak_sources"
[ -z "$soak_backing" ] || words="$words ldt.soak_backing=$soak_backing"
out=$work/console.log
nested_boot run-nested-kmod "$kernel" "$work/initramfs.cpio" "$words" "$smp" "$timeout_s" "$out"
rc=$NESTED_RC
[ -z "$log" ] || cp "$out" "$log"

[ "$rc" -ne 124 ] || fail "timed out after ${timeout_s}s; last line: '$(nested_last_line "$out")'"
grep -q 'Kernel panic' "$out" && fail "the nested kernel panicked: $(grep -m1 'Kernel panic' "$out" | tr -d '\r')"
verdict=$(sed -n 's/^kmod-nested: failed checks \([0-9]*\)\r*$/\1/p' "$out" | tail -n1)
[ -n "$verdict" ] || fail "no verdict from the nested machine (QEMU exit code $rc)"
[ $(((verdict << 1 | 1) & 255)) -eq "$rc" ] ||
	fail "QEMU exit code $rc does not match the printed verdict $verdict"
exit "$verdict"
