# shellcheck shell=bash
# images/lib.sh: shared by build.sh, check-manifest.sh and run-qemu.sh.
# Sourced, not run.  Defines what the guest image is built from (its inputs)
# and how to make sure Debian packages are present.
#
# The inputs section of guest.manifest is exactly the output of
# ldt_input_lines; the cache key is the sha256 of that text.  So whatever
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

# Files whose content goes into the image, relative to LDT_ROOT, sorted.
# guest-kernel-patch/: everything except documentation (*.md), so the series,
# every patch (listed or not) and the config fragment; not hidden or editor
# backup files.  tests/guest/*.c: the in-guest programs, each installed as
# /bin/ldt-<name>.
ldt_input_files() {
	(
		cd "$LDT_ROOT" || exit 1
		printf '%s\n' images/build.sh images/lib.sh images/initramfs/init
		find guest-kernel-patch -type f ! -name '*.md' ! -name '.*' ! -name '*~' -print
		find tests/guest -maxdepth 1 -type f -name '*.c' -print
	) | LC_ALL=C sort
}

# The compiler used for the kernel and the in-guest programs.
ldt_gcc_version() {
	gcc --version | head -n1
}

# "key: value" lines describing every input of the image.
ldt_input_lines() {
	local f
	echo "linux-source-6.12: $(ldt_pkg_version linux-source-6.12)"
	echo "busybox-static: $(ldt_pkg_version busybox-static)"
	echo "busybox-sha256: $(sha256sum /bin/busybox 2>/dev/null | cut -d' ' -f1)"
	echo "libc6-dev: $(ldt_pkg_version libc6-dev)"
	echo "gcc: $(ldt_gcc_version)"
	while read -r f; do
		echo "sha256 $f: $(sha256sum "$LDT_ROOT/$f" | cut -d' ' -f1)"
	done < <(ldt_input_files)
}

ldt_cache_key() {
	ldt_input_lines | sha256sum | cut -c1-16
}
