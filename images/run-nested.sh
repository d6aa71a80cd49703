#!/usr/bin/env bash
# images/run-nested.sh: the nested machine.  QEMU TCG emulates an AMD CPU
# with SVM and NPT (-cpu EPYC,+svm,+npt); in it boots the nested host kernel
# (images/build-nested.sh: the same 6.12 source and patches as guest.img,
# configured with KVM_AMD) with an initramfs holding a static ldt-vmm and
# images/guest.img.  Its init (images/nested/init) runs the guest image as
# a level-2 guest on real KVM/SVM semantics:
#   ldt-vmm run /guest.img --cpu-profile host --cmdline-append 'ldt.run=CMD'
# and reports the level-2 exit status, which this script returns.
#
# Usage: images/run-nested.sh [--timeout S] [--run CMD] [--l2-opts OPTS]
#                             [--migrate SRC] [--bench-migrate] [--bench-dirty]
#                             [--bench-dirty-linux] [--host-ldt]
#                             [--smp N]
#                             [--kernel FILE]
#                             [--vmm FILE] [--log FILE]
#   --timeout S     kill QEMU after S seconds (default 1800)
#   --run CMD       the level-2 guest's ldt.run= command, with spaces as
#                   they are ('uname -a; exit 3', passed in the kernel's
#                   quotes, so no double quote in it) or %20-encoded as for
#                   guest.img; default /bin/ldt-syscheck
#   --l2-opts OPTS  extra ldt-vmm options for the level-2 guest, e.g.
#                   '--vcpus 2'
#   --bench-migrate instead of one guest run: images/nested/bench-migrate-l2,
#                   the same level-2 guest migrated with each ldt-vmm dirty
#                   source and with QEMU (copied into the nested machine
#                   with its libraries and firmware); the status is the
#                   number of failed modes
#   --bench-dirty   instead of a guest: `ldt-vmm bench dirty --json` (the flat
#                   writer as a level-2 guest, each dirty source; --l2-opts
#                   are its options); the status is the benchmark's
#   --bench-dirty-linux  instead of a guest: images/nested/bench-dirty-l2,
#                   the Linux guest running ldt-writer tracked by each dirty
#                   source through the API; LDT_BENCH_ROUNDS, LDT_BENCH_WS
#                   and LDT_BENCH_BYTES in the environment set its rounds
#                   per mode, working-set pages and bytes per page; the
#                   status is the number of failed modes
#   --host-ldt      also build kmod/'s ldt_kvm.ko against the nested
#                   kernel's tree and load it in the nested machine, so
#                   /dev/ldt-kvm is there (the host-ldt rows of the
#                   benchmarks); boots that tree's kernel (not with --kernel)
#   --smp N         CPUs of the nested machine (default 2: MTTCG runs them
#                   on two host threads)
#   --migrate SRC   live-migrate the level-2 guest while CMD runs, between
#                   two ldt-vmm processes, with --dirty-source SRC --verify
#                   (images/nested/migrate-l2); the status is then the
#                   destination's (250: the migration failed)
#   --kernel FILE   boot this nested host kernel instead of building (or
#                   reusing) the one of images/build-nested.sh
#   --vmm FILE      use this static ldt-vmm instead of building one
#   --log FILE      also write the console output to FILE
#
# Exit status: the level-2 guest's status N (0..252; 3 when ldt-vmm saw the
# level-2 kernel panic through pvpanic); 253: the level-2 kernel panicked
# unseen by ldt-vmm; 254: no /dev/kvm in the nested machine; 255: the harness
# failed (timeout, level-1 panic, QEMU error, no verdict).  Everything the
# nested machine and the level-2 guest print is streamed as it comes (both
# kernels use earlyprintk), so progress is visible; a timeout names the
# last line seen.
set -euo pipefail

# shellcheck source=images/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source=images/nested/lib.sh
source "$LDT_ROOT/images/nested/lib.sh"
# shellcheck source=images/pack.sh
source "$LDT_ROOT/images/pack.sh"

harness_fail() {
	echo "run-nested: $*" >&2
	exit 255
}

timeout_s=1800
run=/bin/ldt-syscheck
l2opts=
migrate=
smp=2
bench=
log=
kernel=
vmm=
host_ldt=
while [ $# -gt 0 ]; do
	case "$1" in
	--timeout | --run | --l2-opts | --migrate | --smp | --kernel | --vmm | --log)
		[ $# -ge 2 ] || harness_fail "$1 needs a value"
		case "$1" in
		--timeout) timeout_s=$2 ;;
		--run) run=$2 ;;
		--l2-opts) l2opts=$2 ;;
		--migrate) migrate=$2 ;;
		--smp) smp=$2 ;;
		--kernel) kernel=$2 ;;
		--vmm) vmm=$2 ;;
		--log) log=$2 ;;
		esac
		shift 2
		;;
	--bench-migrate) bench=migrate; shift ;;
	--bench-dirty) bench=dirty; shift ;;
	--bench-dirty-linux) bench=dirty-linux; shift ;;
	--host-ldt) host_ldt=1; shift ;;
	-h | --help) awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0"; exit 0 ;;
	*) harness_fail "unknown argument $1 (try --help)" ;;
	esac
done
[ -z "$host_ldt" ] || [ -z "$kernel" ] ||
	harness_fail "--host-ldt boots the kernel its module is built against: no --kernel"
[[ "$run" != *'"'* ]] || harness_fail "--run: no double quotes (the kernel's quoting cannot hold them)"

ldt_ensure_packages qemu-system-x86 busybox-static cpio || harness_fail "cannot install packages"

# 1. The level-2 guest image and the level-1 kernel (both cached by inputs).
echo "run-nested: building (or reusing) images/guest.img"
"$LDT_ROOT/images/build.sh" || harness_fail "images/build.sh failed"
if [ -z "$kernel" ]; then
	echo "run-nested: building (or reusing) the nested host kernel"
	"$LDT_ROOT/images/build-nested.sh" || harness_fail "images/build-nested.sh failed"
	kernel=$("$LDT_ROOT/images/build-nested.sh" --print-cache-dir)/bzImage
fi
[ -f "$kernel" ] || harness_fail "no nested kernel at $kernel"

# 2. A static ldt-vmm (images/nested/lib.sh).
if [ -z "$vmm" ]; then
	vmm=$(nested_static_vmm) || harness_fail "cannot build a static ldt-vmm"
fi
file -L "$vmm" 2>/dev/null | grep -q 'statically linked\|static-pie linked' ||
	harness_fail "$vmm is not statically linked"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The host module, built against the tree whose bzImage was just chosen.
ko=
if [ -n "$host_ldt" ]; then
	kdir=$("$LDT_ROOT/images/build-nested.sh" --print-cache-dir)/linux
	cmp -s "$kernel" "$kdir/arch/x86/boot/bzImage" ||
		harness_fail "$kernel is not the bzImage of $kdir (rebuild with images/build-nested.sh)"
	ko=$(nested_build_kmod "$kdir" "$work") || harness_fail "cannot build ldt_kvm.ko"
fi

# 3. The nested machine's initramfs (uncompressed cpio, passed with -initrd):
# busybox, init, ldt-vmm, the guest image (and ldt_kvm.ko).
root=$work/root
mkdir -p "$root"/{bin,dev,proc,sys,tmp}
install -m 0755 "$LDT_ROOT/images/nested/init" "$root/init"
install -m 0755 "$LDT_ROOT/images/initramfs/cmdline-param" "$root/bin/cmdline-param"
install -m 0755 "$LDT_ROOT/images/nested/migrate-l2" "$root/bin/migrate-l2"
install -m 0755 "$LDT_ROOT/images/nested/bench-migrate-l2" "$root/bin/bench-migrate-l2"
install -m 0755 "$LDT_ROOT/images/nested/bench-dirty-l2" "$root/bin/bench-dirty-l2"
install -m 0755 "$LDT_ROOT/images/nested/pin-threads" "$root/bin/pin-threads"
install -m 0755 "$LDT_ROOT/images/nested/progress-edge" "$root/bin/progress-edge"
if [ "$bench" = migrate ]; then
	# QEMU for the comparison: the binary, every library ldd names, the
	# loader, and its firmware directory, at their Debian paths.
	qemu_bin=/usr/bin/qemu-system-x86_64
	install -D -m 0755 "$qemu_bin" "$root$qemu_bin"
	pack_libs "$qemu_bin" "$root" || harness_fail "cannot copy the libraries of $qemu_bin"
	mkdir -p "$root/usr/share"
	cp -rL /usr/share/qemu /usr/share/seabios "$root/usr/share/"
fi
install -m 0755 /bin/busybox "$root/bin/busybox"
for a in awk sh cat dd dmesg echo grep head insmod kill mkdir mkfifo mount printf reboot rm sed sleep sync tail tee test tr; do
	ln -s busybox "$root/bin/$a"
done
install -m 0755 "$vmm" "$root/bin/ldt-vmm"
install -m 0644 "$LDT_ROOT/images/guest.img" "$root/guest.img"
[ -z "$ko" ] || install -m 0644 "$ko" "$root/ldt_kvm.ko"
(cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) >"$work/initramfs.cpio"

# 4. Boot (images/nested/lib.sh).
# The kernel's quoting for values with spaces (images/initramfs/cmdline-param).
words="ldt.run=\"$run\""
[[ "$run" == *' '* ]] || words="ldt.run=$run"
[ -z "$l2opts" ] || words="$words ldt.l2=${l2opts// /%20}"
[ -z "$migrate" ] || words="$words ldt.migrate=$migrate"
[ -z "$bench" ] || words="$words ldt.bench=$bench"
# Migrations per mode for --bench-migrate (images/nested/bench-migrate-l2).
[ -z "${LDT_BENCH_RUNS:-}" ] || words="$words ldt.bench_runs=$LDT_BENCH_RUNS"
[ -z "${LDT_BENCH_FIRST:-}" ] || words="$words ldt.bench_first=$LDT_BENCH_FIRST"
# The memcheck rates (workloads) of --bench-migrate, comma-separated.
[ -z "${LDT_BENCH_RATES:-}" ] || words="$words ldt.bench_rates=$LDT_BENCH_RATES"
# Its modes, comma-separated, in their order (bench-migrate-l2).
[ -z "${LDT_BENCH_MODES:-}" ] || words="$words ldt.bench_modes=$LDT_BENCH_MODES"
# Rounds, working set and bytes for --bench-dirty-linux (bench-dirty-l2).
[ -z "${LDT_BENCH_ROUNDS:-}" ] || words="$words ldt.bench_rounds=$LDT_BENCH_ROUNDS"
[ -z "${LDT_BENCH_WS:-}" ] || words="$words ldt.bench_ws=$LDT_BENCH_WS"
[ -z "${LDT_BENCH_BYTES:-}" ] || words="$words ldt.bench_bytes=$LDT_BENCH_BYTES"
out=$work/console.log
nested_boot run-nested "$kernel" "$work/initramfs.cpio" "$words" "$smp" "$timeout_s" "$out"
rc=$NESTED_RC
[ -z "$log" ] || cp "$out" "$log"

verdict=$(sed -n 's/^ldt-nested: level-2 exit status \([0-9]*\)\r*$/\1/p' "$out" | tail -n1)
if [ "$rc" -eq 124 ]; then
	harness_fail "timed out after ${timeout_s}s; last line: '$(nested_last_line "$out")'"
fi
# The first oops lines say where.  A level-2 panic is a verdict: 3 when
# ldt-vmm saw it through pvpanic, 253 when it did not; any other panic
# line is the nested machine's own kernel.
if grep -q 'Kernel panic' "$out"; then
	grep -m4 -E 'BUG:|Oops|RIP:|Kernel panic' "$out" | tr -d '\r' | sed 's/^/run-nested: /' >&2
	case "$verdict" in
	3 | 253) ;;
	*) harness_fail "the nested machine's kernel panicked" ;;
	esac
fi
[ -n "$verdict" ] || harness_fail "no level-2 verdict (QEMU exit code $rc)"
# isa-debug-exit makes QEMU exit with (N << 1) | 1 (8 bits).
[ $(((verdict << 1 | 1) & 255)) -eq "$rc" ] ||
	harness_fail "QEMU exit code $rc does not match the printed status $verdict"
echo "run-nested: level-2 guest status $verdict"
exit "$verdict"
