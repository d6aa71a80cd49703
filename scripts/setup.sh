#!/usr/bin/env bash
# Installs everything ldt-vmm's build and tests need on a fresh Debian 12
# machine, idempotently: Debian packages, and Debian's packaged kernel
# (linux-image-cloud-amd64) unpacked into the cache for the Linux boot test.
# Prints the cached kernel's directory on its last line.
set -euo pipefail

CACHE=${LDT_CACHE:-$HOME/.cache/ldt-vmm}
PKGS=(binutils gcc make qemu-system-x86 linux-source-6.12 busybox-static
      flex bison bc cpio xz-utils lz4 zstd kmod rsync libelf-dev libssl-dev python3
      python3-matplotlib)

missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}" >&2
    apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi

if ! command -v cargo >/dev/null; then
    echo "setup: cargo (a stable Rust toolchain) is required" >&2
    exit 1
fi

# Debian's cloud kernel: the image package's exact version names the cache
# directory, so a new Debian upload is fetched once and then reused.
if [ -z "$(apt-cache policy linux-image-cloud-amd64 | awk '/Candidate/{print $2}')" ]; then
    apt-get update -q >&2
fi
pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
ver=$(apt-cache policy "$pkg" | awk '/Candidate/{print $2}')
dir="$CACHE/debian-kernel/$pkg-$ver"
if [ ! -f "$dir/done" ]; then
    echo "setup: fetching $pkg $ver" >&2
    rm -rf "$dir" && mkdir -p "$dir/deb"
    (cd "$dir/deb" && apt-get download "$pkg=$ver" >&2)
    dpkg-deb -x "$dir"/deb/*.deb "$dir/root"
    cp "$dir"/root/boot/vmlinuz-* "$dir/bzImage"
    # The ELF vmlinux inside: on a host that interprets guest ring 0, the
    # bzImage decompressor alone would take many minutes.
    python3 "$(dirname "$0")/extract-vmlinux.py" "$dir/bzImage" "$dir/vmlinux"
    rm -rf "$dir/deb" "$dir/root"
    touch "$dir/done"
fi
echo "$dir"
