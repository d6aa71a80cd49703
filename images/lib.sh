# shellcheck shell=bash
# images/lib.sh: shared by build.sh, check-manifest.sh and run-qemu.sh.
# Sourced, not run.  Defines what the guest image is built from (its inputs)
# and how to make sure Debian packages are present.
#
# The inputs section of guest.manifest is exactly the output of
# ldt_input_lines; the cache keys are hashes of those lines.  So whatever
# changes the image must show up in ldt_input_lines, and check-manifest.sh
# can recompute it from the tree and compare.

LDT_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LDT_CACHE=${LDT_CACHE:-$HOME/.cache/ldt-vmm}
# shellcheck disable=SC2034 # used by build.sh
LDT_KERNEL_TARBALL=/usr/src/linux-source-6.12.tar.xz

# Reproducible kernel build: fixed identity and time, fixed locale/zone
# (gen_initramfs.sh turns KBUILD_BUILD_TIMESTAMP into the cpio mtimes with
# `date -d`, which depends on TZ).
export KBUILD_BUILD_TIMESTAMP='1970-01-01'
export KBUILD_BUILD_USER=ldt
export KBUILD_BUILD_HOST=ldt
export KBUILD_BUILD_VERSION=1
export SOURCE_DATE_EPOCH=0
export TZ=UTC
export LC_ALL=C

ldt_die() {
	echo "error: $*" >&2
	exit 1
}

# Installed version of a Debian package, or "not-installed".
ldt_pkg_version() {
	local status
	status=$(dpkg-query -W -f '${db:Status-Abbrev}' "$1" 2>/dev/null || true)
	if [ "$status" = "ii " ]; then
		dpkg-query -W -f '${Version}' "$1"
	else
		echo not-installed
	fi
}

# ldt_ensure_packages PKG...: apt-get install the ones dpkg does not list as
# installed; `apt-get update` only when something is missing.
ldt_ensure_packages() {
	local missing=() pkg sudo=
	for pkg in "$@"; do
		[ "$(ldt_pkg_version "$pkg")" = not-installed ] && missing+=("$pkg")
	done
	[ ${#missing[@]} -eq 0 ] && return 0
	[ "$(id -u)" -eq 0 ] || sudo=sudo
	echo "installing missing packages: ${missing[*]}"
	$sudo apt-get update
	DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends "${missing[@]}"
}

# The image is built in two cached steps with separate keys (build.sh):
#   kernel-<kernel key>/  the configured and built kernel tree: the kernel
#                         source package, the compiler, build.sh, lib.sh and
#                         guest-kernel-patch/ (everything but *.md);
#   image-<image key>/    the initramfs staged from busybox, /init and
#                         tests/guest/ (*.c, *.h), and the bzImage and
#                         vmlinux relinked with it over that tree.
# The image key covers the kernel key, so the manifest's input lines (kernel
# lines, then image lines) name everything guest.img is made of, and a change
# to an in-guest program or /init only relinks the initramfs.

# ldt__hash_files FILE...: "sha256 FILE: HASH" lines (paths relative to
# LDT_ROOT, in the order given).
ldt__hash_files() {
	local f
	for f in "$@"; do
		echo "sha256 $f: $(sha256sum "$LDT_ROOT/$f" | cut -d' ' -f1)"
	done
}

# Files the kernel tree is built from, relative to LDT_ROOT, sorted:
# build.sh and lib.sh (the recipe) and guest-kernel-patch/ except
# documentation (*.md), hidden and editor backup files (so the series, every
# patch, listed or not, and the config fragments).
ldt_kernel_input_files() {
	(
		cd "$LDT_ROOT" || exit 1
		printf '%s\n' images/build.sh images/lib.sh
		find guest-kernel-patch -type f ! -name '*.md' ! -name '.*' ! -name '*~' -print
	) | LC_ALL=C sort
}

# Files the initramfs is staged from: images/initramfs/ (/init and
# /bin/cmdline-param) and the in-guest programs with the headers they share
# (tests/guest/*.c, each /bin/ldt-<name>; *.h).
ldt_initramfs_input_files() {
	(
		cd "$LDT_ROOT" || exit 1
		printf '%s\n' images/initramfs/init images/initramfs/cmdline-param
		find tests/guest -maxdepth 1 -type f \( -name '*.c' -o -name '*.h' \) -print
	) | LC_ALL=C sort
}

# The compiler used for the kernel and the in-guest programs.
ldt_gcc_version() {
	gcc --version | head -n1
}

# "key: value" lines describing every input of the kernel tree.
ldt_kernel_input_lines() {
	local files
	echo "linux-source-6.12: $(ldt_pkg_version linux-source-6.12)"
	echo "gcc: $(ldt_gcc_version)"
	mapfile -t files < <(ldt_kernel_input_files)
	ldt__hash_files "${files[@]}"
}

# "key: value" lines describing what the initramfs adds to the kernel tree.
ldt_initramfs_input_lines() {
	local files
	echo "busybox-static: $(ldt_pkg_version busybox-static)"
	echo "busybox-sha256: $(sha256sum /bin/busybox 2>/dev/null | cut -d' ' -f1)"
	echo "libc6-dev: $(ldt_pkg_version libc6-dev)"
	mapfile -t files < <(ldt_initramfs_input_files)
	ldt__hash_files "${files[@]}"
}

# Every input line of guest.img: the kernel's, then the initramfs'.
ldt_input_lines() {
	ldt_kernel_input_lines
	ldt_initramfs_input_lines
}

ldt_kernel_key() {
	ldt_kernel_input_lines | sha256sum | cut -c1-16
}

# The image key: the kernel key and the initramfs inputs.
ldt_image_key() {
	{
		echo "kernel-key: $(ldt_kernel_key)"
		ldt_initramfs_input_lines
	} | sha256sum | cut -c1-16
}

# ldt_prune_cache PREFIX [KEEP]: remove all but the KEEP (default
# $LDT_CACHE_KEEP, 3) most recently used finished builds
# $LDT_CACHE/PREFIX-*/ (finished: a .done file; used: the mtime of .done,
# which a cache hit touches).  0 keeps everything.  A dir whose lock
# (PREFIX-KEY.lock) another build holds is skipped.
ldt_prune_cache() {
	local prefix=$1 keep=${2:-${LDT_CACHE_KEEP:-3}} d n=0
	[ "$keep" -gt 0 ] 2>/dev/null || return 0
	while read -r d; do
		n=$((n + 1))
		[ "$n" -gt "$keep" ] || continue
		d=${d%/.done}
		# flock -n on the dir's lock: held means a build is using it.
		# (The empty lock file stays: a build may be waiting on it.)
		if flock -n "$d.lock" rm -rf "$d" 2>/dev/null; then
			echo "cache: removed $d (keeping the $keep most recently used $prefix builds)"
		fi
	done < <(ls -1t "$LDT_CACHE"/"$prefix"-*/.done 2>/dev/null)
}
