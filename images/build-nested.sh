#!/usr/bin/env bash
# images/build-nested.sh: build the nested machine's kernel: the same Linux
# 6.12 source and patches as images/guest.img, configured as a KVM host
# (tinyconfig + guest-kernel-patch/ldt-guest.config +
# guest-kernel-patch/nested-host.config), without a built-in initramfs
# (images/run-nested.sh passes one with -initrd: it holds ldt-vmm and
# guest.img, which change more often than the kernel).
#
# Usage: images/build-nested.sh [--print-cache-dir]
#   --print-cache-dir  print the cache directory for the current inputs and
#                      exit (the kernel is <dir>/bzImage once built)
#
# Works in ${LDT_CACHE:-~/.cache/ldt-vmm}/nested-<key>/, keyed by its own
# inputs (see nested_input_lines), so a second run with the same inputs
# does nothing; prints the path of the bzImage on its last line.
# LDT_VERBOSE=1 streams the kernel build output.
set -euo pipefail

# shellcheck source=images/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PATCHES=$LDT_ROOT/guest-kernel-patch
JOBS=${LDT_JOBS:-2}

# Everything this kernel is built from: the source package, the compiler,
# this script, lib.sh (build environment), and every file in
# guest-kernel-patch/ except documentation (series, patches, fragments).
nested_input_lines() {
	local f
	echo "linux-source-6.12: $(ldt_pkg_version linux-source-6.12)"
	echo "gcc: $(ldt_gcc_version)"
	while read -r f; do
		echo "sha256 $f: $(sha256sum "$LDT_ROOT/$f" | cut -d' ' -f1)"
	done < <(
		cd "$LDT_ROOT" &&
			{
				printf '%s\n' images/build-nested.sh images/lib.sh
				find guest-kernel-patch -type f ! -name '*.md' ! -name '.*' ! -name '*~' -print
			} | LC_ALL=C sort
	)
}

key=$(nested_input_lines | sha256sum | cut -c1-16)
dir=$LDT_CACHE/nested-$key
src=$dir/linux

case "${1:-}" in
--print-cache-dir)
	echo "$dir"
	exit 0
	;;
-h | --help)
	awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0"
	exit 0
	;;
"") ;;
*) ldt_die "unknown argument: $1 (try --help)" ;;
esac

start=$(date +%s)
ldt_ensure_packages linux-source-6.12 flex bison libelf-dev libssl-dev bc \
	cpio xz-utils kmod gcc make libc6-dev patch lz4
[ -f "$LDT_KERNEL_TARBALL" ] || ldt_die "$LDT_KERNEL_TARBALL missing"
mkdir -p "$LDT_CACHE"

# One build per key at a time.
exec 9>"$dir.lock"
flock 9

if [ -f "$dir/.done" ]; then
	echo "cache hit: $dir"
	echo "$dir/bzImage"
	exit 0
fi

echo "building the nested host kernel in $dir (key $key)"
rm -rf "$dir"
# Unfinished nested builds of other keys are never reused: remove those no
# build is holding (finished ones stay, like build.sh's).
for old in "$LDT_CACHE"/nested-*/; do
	old=${old%/}
	if [ "$old" = "$dir" ] || [ -f "$old/.done" ]; then
		continue
	fi
	if flock -n "$old.lock" true 2>/dev/null; then
		echo "removing unfinished build $old"
		rm -rf "$old" "$old.lock"
	fi
done
mkdir -p "$src"

echo "unpacking $LDT_KERNEL_TARBALL"
tar -xf "$LDT_KERNEL_TARBALL" -C "$src" --strip-components=1

# The same series as the guest image (see build.sh).
while read -r line || [ -n "$line" ]; do
	case "$line" in '' | '#'*) continue ;; esac
	[ -f "$PATCHES/$line" ] || ldt_die "series names $line, which does not exist"
	echo "applying $line"
	patch -d "$src" -p1 --forward --batch --quiet <"$PATCHES/$line" ||
		ldt_die "patch $line does not apply to linux-source-6.12 $(ldt_pkg_version linux-source-6.12)"
done <"$PATCHES/series"

# tinyconfig, the guest fragment, then the host fragment (later fragments
# win), no built-in initramfs; then check the result.
export ARCH=x86_64
echo "configuring (tinyconfig + ldt-guest.config + nested-host.config)"
echo 'CONFIG_INITRAMFS_SOURCE=""' >"$dir/initramfs.config"
make -C "$src" -s tinyconfig >"$dir/config.log" 2>&1
(cd "$src" && scripts/kconfig/merge_config.sh -m .config \
	"$PATCHES/ldt-guest.config" "$PATCHES/nested-host.config" \
	"$dir/initramfs.config") >>"$dir/config.log" 2>&1
make -C "$src" -s olddefconfig >>"$dir/config.log" 2>&1

# Every setting of the host fragment must be in the final .config, and so
# must every guest-fragment setting the host fragment does not override.
missing=()
check_line() {
	local line=$1 opt
	case "$line" in
	CONFIG_*=*)
		grep -qxF "$line" "$src/.config" || missing+=("$line")
		;;
	"# CONFIG_"*" is not set")
		opt=${line#\# }
		opt=${opt%% *}
		grep -q "^$opt=" "$src/.config" && missing+=("$line")
		;;
	esac
	return 0
}
host_opts=$(grep -oE '^(# )?CONFIG_[A-Za-z0-9_]+' "$PATCHES/nested-host.config" | sed 's/^# //')
while read -r line; do
	opt=$(grep -oE 'CONFIG_[A-Za-z0-9_]+' <<<"$line" | head -n1 || true)
	[ -n "$opt" ] && grep -qxF "$opt" <<<"$host_opts" && continue
	# The guest's built-in initramfs options: this kernel has none.
	case "$opt" in CONFIG_INITRAMFS_*) continue ;; esac
	check_line "$line"
done <"$PATCHES/ldt-guest.config"
while read -r line; do
	check_line "$line"
done <"$PATCHES/nested-host.config"
if [ ${#missing[@]} -gt 0 ]; then
	echo "error: the final .config ($src/.config) lacks these fragment settings:" >&2
	printf '  %s\n' "${missing[@]}" >&2
	exit 1
fi

echo "building bzImage with make -j$JOBS (log: $dir/build.log)"
kstart=$(date +%s)
if [ "${LDT_VERBOSE:-0}" = 1 ]; then
	make -C "$src" -j"$JOBS" bzImage 2>&1 | tee "$dir/build.log"
elif ! make -C "$src" -j"$JOBS" bzImage >"$dir/build.log" 2>&1; then
	tail -n 40 "$dir/build.log" >&2
	ldt_die "nested kernel build failed (full log: $dir/build.log)"
fi
echo "kernel built in $(($(date +%s) - kstart)) s"

cp "$src/arch/x86/boot/bzImage" "$dir/bzImage"
cp "$src/.config" "$dir/config"
nested_input_lines >"$dir/inputs"
# The source tree is only needed for the kmod (future): keep it.
touch "$dir/.done"
echo "done in $(($(date +%s) - start)) s"
echo "$dir/bzImage"
