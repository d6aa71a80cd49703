#!/usr/bin/env bash
# images/build.sh: build images/guest.img, the LDT guest: a Linux 6.12 bzImage
# (Debian's linux-source-6.12 + guest-kernel-patch/) with a built-in initramfs
# (busybox, images/initramfs/{init,cmdline-param}, tests/guest/*.c as
# /bin/ldt-<name>).
#
# Usage: images/build.sh [--print-cache-dir | --print-kernel-dir]
#   --print-cache-dir   print the image's cache directory for the current
#                       inputs and exit (vmlinux is <dir>/vmlinux once built)
#   --print-kernel-dir  print the kernel tree's cache directory and exit
#
# Two cached steps in ${LDT_CACHE:-~/.cache/ldt-vmm}, outside the checkout,
# each keyed by a hash of its inputs (see images/lib.sh):
#   kernel-<kernel key>/linux  the patched, configured, built kernel tree;
#   image-<image key>/         the staged initramfs, and the bzImage and
#                              vmlinux made by relinking it into that tree.
# So a change to tests/guest/ or /init stages a new initramfs and relinks
# (make rebuilds usr/ and links vmlinux again), a change to the kernel's
# inputs builds a new tree, and a second run with the same inputs only
# copies the finished image.  Builds of different images over one tree take
# turns (flock on the tree's lock); the newest $LDT_CACHE_KEEP (default 3)
# finished builds of each kind are kept (images/lib.sh: ldt_prune_cache).
# Writes images/guest.img and images/guest.manifest (committed; checked by
# images/check-manifest.sh).  LDT_VERBOSE=1 streams the kernel build output.
set -euo pipefail

# shellcheck source=images/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

IMAGES=$LDT_ROOT/images
PATCHES=$LDT_ROOT/guest-kernel-patch
JOBS=${LDT_JOBS:-2}
export ARCH=x86_64

# Busybox applets linked into /bin (the init script and tests use these).
APPLETS="[ [[ ash awk basename cat chmod cmp cp cttyhack cut date dd df diff
dirname dmesg echo env expr false find free grep halt head hexdump hostname id
kill killall less ln ls md5sum mkdir mknod mkswap more mount mv nproc od
pidof poweroff printf ps pwd readlink reboot rm rmdir sed seq setsid sh
sha256sum sleep sort stat swapoff swapon sync sysctl tail taskset tee test
time timeout top touch tr true umount uname uniq uptime vi watch wc which
xargs xxd yes"

case "${1:-}" in
--print-cache-dir)
	echo "$LDT_CACHE/image-$(ldt_image_key)"
	exit 0
	;;
--print-kernel-dir)
	echo "$LDT_CACHE/kernel-$(ldt_kernel_key)"
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

# Build dependencies (Debian 12 names).  lz4 compresses the kernel.
ldt_ensure_packages linux-source-6.12 busybox-static flex bison libelf-dev \
	libssl-dev bc cpio xz-utils kmod rsync gcc make libc6-dev patch lz4
[ -f "$LDT_KERNEL_TARBALL" ] || ldt_die "$LDT_KERNEL_TARBALL missing"

kkey=$(ldt_kernel_key)
ikey=$(ldt_image_key)
kdir=$LDT_CACHE/kernel-$kkey
dir=$LDT_CACHE/image-$ikey
src=$kdir/linux
mkdir -p "$LDT_CACHE"

# One build per image key at a time (fd 8); the tree's lock (fd 9) is taken
# below, only while the tree is configured, built or relinked.
exec 8>"$dir.lock"
flock 8

# Kernel image + manifest into images/, atomically (no half-written image).
publish() {
	cp "$dir/bzImage" "$IMAGES/guest.img.tmp"
	mv "$IMAGES/guest.img.tmp" "$IMAGES/guest.img"
	{
		echo "# guest.manifest: inputs of images/guest.img (written by images/build.sh,"
		echo "# verified by images/check-manifest.sh).  Do not edit by hand."
		ldt_input_lines
		echo "kernel-key: $kkey"
		echo "image-key: $ikey"
		echo "guest.img-sha256: $(sha256sum "$IMAGES/guest.img" | cut -d' ' -f1)"
	} >"$IMAGES/guest.manifest.tmp"
	mv "$IMAGES/guest.manifest.tmp" "$IMAGES/guest.manifest"
	echo "image:    $IMAGES/guest.img ($(stat -c %s "$IMAGES/guest.img") bytes)"
	echo "manifest: $IMAGES/guest.manifest"
	echo "vmlinux:  $dir/vmlinux"
	echo "done in $(($(date +%s) - start)) s"
}

# Older finished builds of every kind (the nested kernels of
# build-nested.sh too: run-nested.sh always runs this script first).
prune() {
	local kind
	for kind in kernel image nested; do
		ldt_prune_cache "$kind"
	done
}

if [ -f "$dir/.done" ]; then
	echo "cache hit: $dir"
	# Mark both steps used, for ldt_prune_cache.
	touch "$dir/.done"
	[ ! -f "$kdir/.done" ] || touch "$kdir/.done"
	publish
	prune
	exit 0
fi

# Unfinished builds of other keys (failed patches, configs or programs,
# interrupted runs; a kernel tree is ~1.5 GB) are never reused: remove those
# no build is holding.
for old in "$LDT_CACHE"/kernel-*/ "$LDT_CACHE"/image-*/; do
	old=${old%/}
	[ -d "$old" ] || continue
	if [ "$old" = "$dir" ] || [ "$old" = "$kdir" ] || [ -f "$old/.done" ]; then
		continue
	fi
	if flock -n "$old.lock" rm -rf "$old" 2>/dev/null; then
		echo "removing unfinished build $old"
	fi
done

echo "building the image in $dir (image key $ikey, kernel key $kkey)"
rm -rf "$dir"
mkdir -p "$dir"

# --- initramfs --------------------------------------------------------------
# Staged files get fixed mtimes; the cpio list gives every entry's mode and
# owner explicitly and the kernel's gen_init_cpio writes them in list order
# with mtime = KBUILD_BUILD_TIMESTAMP, so the archive is byte-for-byte
# reproducible.
stage=$dir/initramfs
mkdir -p "$stage"
install -m 0755 "$IMAGES/initramfs/init" "$stage/init"
install -m 0755 "$IMAGES/initramfs/cmdline-param" "$stage/cmdline-param"
install -m 0755 /bin/busybox "$stage/busybox"
progs=()
for c in "$LDT_ROOT"/tests/guest/*.c; do
	[ -e "$c" ] || continue
	name=ldt-$(basename "$c" .c)
	echo "compiling $name"
	# Static glibc, no AVX (see images/initramfs/init), warnings are errors.
	gcc -O2 -static -mno-avx -mno-avx2 -Wall -Wextra -Werror \
		-ffile-prefix-map="$LDT_ROOT"=. -o "$stage/$name" "$c"
	progs+=("$name")
done
touch -h -d @0 "$stage"/*

list=$dir/initramfs.list
{
	echo "# generated by images/build.sh"
	echo "dir /bin 0755 0 0"
	echo "dir /dev 0755 0 0"
	# The kernel opens /dev/console for init before devtmpfs is mounted.
	echo "nod /dev/console 0600 0 0 c 5 1"
	echo "dir /etc 0755 0 0"
	echo "dir /proc 0555 0 0"
	echo "dir /root 0700 0 0"
	echo "dir /sys 0555 0 0"
	echo "dir /tmp 1777 0 0"
	echo "dir /usr 0755 0 0"
	echo "slink /sbin bin 0777 0 0"
	echo "slink /usr/bin ../bin 0777 0 0"
	echo "slink /usr/sbin ../bin 0777 0 0"
	echo "file /init $stage/init 0755 0 0"
	echo "file /bin/busybox $stage/busybox 0755 0 0"
	echo "file /bin/cmdline-param $stage/cmdline-param 0755 0 0"
	for a in $APPLETS; do
		echo "slink /bin/$a busybox 0777 0 0"
	done
	for p in "${progs[@]}"; do
		echo "file /bin/$p $stage/$p 0755 0 0"
	done
} >"$list"

# --- kernel tree --------------------------------------------------------------
# CONFIG_INITRAMFS_SOURCE names $kdir/initramfs.list, a copy of this image's
# list made under the tree's lock just before make: the .config is the same
# for every image, so make rebuilds only usr/ and relinks.

# Unpack, patch and configure the tree (called under its lock).
prepare_tree() {
	local line opt m missing=()
	echo "preparing the kernel tree in $kdir (kernel key $kkey)"
	rm -rf "$kdir"
	mkdir -p "$src"
	echo "unpacking $LDT_KERNEL_TARBALL"
	tar -xf "$LDT_KERNEL_TARBALL" -C "$src" --strip-components=1

	# series: one patch file name (relative to guest-kernel-patch/) a line;
	# blank lines and lines starting with # are skipped.
	while read -r line || [ -n "$line" ]; do
		case "$line" in '' | '#'*) continue ;; esac
		[ -f "$PATCHES/$line" ] || ldt_die "series names $line, which does not exist"
		echo "applying $line"
		patch -d "$src" -p1 --forward --batch --quiet <"$PATCHES/$line" ||
			ldt_die "patch $line does not apply to linux-source-6.12 $(ldt_pkg_version linux-source-6.12)"
	done <"$PATCHES/series"

	# tinyconfig, then our fragment (+ the initramfs source), then
	# olddefconfig for the dependencies; then check nothing we asked for
	# was dropped.
	echo "configuring (tinyconfig + guest-kernel-patch/ldt-guest.config)"
	echo "CONFIG_INITRAMFS_SOURCE=\"$kdir/initramfs.list\"" >"$kdir/initramfs.config"
	make -C "$src" -s tinyconfig >"$kdir/config.log" 2>&1
	(cd "$src" && scripts/kconfig/merge_config.sh -m .config \
		"$PATCHES/ldt-guest.config" "$kdir/initramfs.config") >>"$kdir/config.log" 2>&1
	make -C "$src" -s olddefconfig >>"$kdir/config.log" 2>&1

	while read -r line; do
		case "$line" in
		CONFIG_*=*)
			grep -qxF "$line" "$src/.config" || missing+=("$line")
			;;
		"# CONFIG_"*" is not set")
			opt=${line#\# }
			opt=${opt%% *}
			if grep -q "^$opt=" "$src/.config"; then missing+=("$line"); fi
			;;
		esac
	done < <(cat "$PATCHES/ldt-guest.config" "$kdir/initramfs.config")
	if [ ${#missing[@]} -gt 0 ]; then
		echo "error: the final .config ($src/.config) lacks these fragment settings" >&2
		echo "(a dependency is off, or the option does not exist in this kernel):" >&2
		for m in "${missing[@]}"; do
			opt=$(grep -oE 'CONFIG_[A-Za-z0-9_]+' <<<"$m")
			echo "  want: $m    have: $(grep -E "(^| )${opt}[= ]" "$src/.config" || echo 'absent')" >&2
		done
		exit 1
	fi
	touch "$kdir/.configured"
}

exec 9>"$kdir.lock"
flock 9
[ -f "$kdir/.configured" ] || prepare_tree

# --- build ------------------------------------------------------------------
cp "$list" "$kdir/initramfs.list"
# The staged files all have mtime 0 (and the list may name the same files
# as the last image's), so make might not see new contents: drop the
# archive and make regenerates it from the list.
rm -f "$src/usr/initramfs_data.cpio"
if [ -f "$kdir/.done" ]; then
	what="relinking bzImage with the new initramfs"
else
	what="building bzImage"
fi
echo "$what: make -j$JOBS (log: $dir/build.log)"
kstart=$(date +%s)
if [ "${LDT_VERBOSE:-0}" = 1 ]; then
	make -C "$src" -j"$JOBS" bzImage 2>&1 | tee "$dir/build.log"
else
	if ! make -C "$src" -j"$JOBS" bzImage >"$dir/build.log" 2>&1; then
		tail -n 40 "$dir/build.log" >&2
		ldt_die "kernel build failed (full log: $dir/build.log)"
	fi
fi
echo "make done in $(($(date +%s) - kstart)) s"

cp "$src/arch/x86/boot/bzImage" "$dir/bzImage"
# vmlinux (ELF, with the PVH entry note) for VMMs that boot it directly and
# for debugging (symbols).
cp "$src/vmlinux" "$dir/vmlinux"
cp "$src/.config" "$dir/config"
touch "$kdir/.done"
flock -u 9
touch "$dir/.done"
publish
prune
