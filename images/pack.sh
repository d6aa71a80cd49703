# shellcheck shell=bash
# images/pack.sh: putting a host program into an initramfs tree, for the
# second initrds and the nested machine (images/build-redis.sh,
# images/run-nested.sh).  Sourced; not an input of any kernel build.

# pack_libs BIN ROOT: every shared library ldd resolves for BIN (absolute
# paths) and the loader itself, copied under ROOT with symlinks resolved,
# at the path BIN asks for.  Fails if ldd names none.
pack_libs() {
	local bin=$1 root=$2 libs lib
	libs=$(ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }')
	if [ -z "$libs" ]; then
		echo "pack_libs: ldd found no libraries for $bin" >&2
		return 1
	fi
	for lib in $libs; do
		install -D -m 0755 "$(readlink -f "$lib")" "$root$lib" || return 1
	done
}
