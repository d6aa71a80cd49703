#!/usr/bin/env bash
# images/build-redis.sh: a second initrd for images/guest.img holding
# Debian's Redis server (from the redis-tools package: /usr/bin/redis-server
# is the same binary as redis-check-rdb, which picks its role from argv[0])
# with the shared libraries it needs and the dynamic loader, at their Debian
# paths.  ldt-bench's redis experiment runs it; the kernel unpacks this
# initrd over its built-in initramfs (pass it with `ldt-vmm run --initrd`
# or QEMU's -initrd).  An uncompressed newc cpio: the guest kernel has no
# decompressors.  Kept out of guest.img because every MB of initramfs costs
# seconds of interpreted boot on this machine.
#
# Usage: images/build-redis.sh [--print-path]
# Builds (or reuses) ${LDT_CACHE:-~/.cache/ldt-vmm}/redis-<key>/redis.cpio,
# keyed by the redis-tools and libc6 versions and this script; prints the
# path on its last line.
set -euo pipefail

# shellcheck source=images/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source=images/pack.sh
source "$LDT_ROOT/images/pack.sh"

ldt_ensure_packages redis-tools cpio || ldt_die "cannot install redis-tools"
key=$({
	echo "redis-tools: $(ldt_pkg_version redis-tools)"
	echo "libc6: $(ldt_pkg_version libc6)"
	sha256sum "$LDT_ROOT/images/build-redis.sh" | cut -d' ' -f1
} | sha256sum | cut -c1-16)
dir=$LDT_CACHE/redis-$key
out=$dir/redis.cpio

case "${1:-}" in
--print-path)
	echo "$out"
	exit 0
	;;
-h | --help)
	awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0"
	exit 0
	;;
"") ;;
*) ldt_die "unknown argument: $1 (try --help)" ;;
esac

if [ -f "$out" ]; then
	echo "cache hit: $out"
	echo "$out"
	exit 0
fi

server=/usr/bin/redis-check-rdb
[ -x "$server" ] || ldt_die "$server missing after installing redis-tools"
mkdir -p "$LDT_CACHE"
stage=$(mktemp -d "$LDT_CACHE/redis-stage.XXXXXX")
trap 'rm -rf "$stage"' EXIT

install -D -m 0755 "$server" "$stage/usr/bin/redis-server"
pack_libs "$server" "$stage" || ldt_die "cannot copy the libraries of $server"

# Fixed mtimes and owners: the same inputs give the same archive.
find "$stage" -exec touch -h -d @0 {} +
mkdir -p "$dir"
(cd "$stage" && find . -mindepth 1 | LC_ALL=C sort |
	cpio -o -H newc --quiet -R 0:0 --reproducible) >"$out.tmp" ||
	ldt_die "cpio failed"
mv "$out.tmp" "$out"
echo "built $out ($(du -h "$out" | cut -f1))"
echo "$out"
