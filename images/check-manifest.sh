#!/usr/bin/env bash
# images/check-manifest.sh: fail unless images/guest.manifest describes the
# current tree and images/guest.img is the image it names.
#
# Recomputes the input lines (Debian package versions, compiler, sha256 of
# every input file; see images/lib.sh) and the kernel and image cache keys,
# compares them with the manifest, then checks the image's sha256.  A stale image (inputs
# changed since it was built) or a stale manifest therefore cannot pass.
# Usage: images/check-manifest.sh [--inputs-only]
#   --inputs-only  skip the image hash (e.g. a fresh checkout, no image yet)
set -euo pipefail

# shellcheck source=images/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

manifest=$LDT_ROOT/images/guest.manifest
image=$LDT_ROOT/images/guest.img
check_image=1
case "${1:-}" in
--inputs-only) check_image=0 ;;
"") ;;
*) ldt_die "unknown argument: $1" ;;
esac
[ -f "$manifest" ] || ldt_die "no $manifest (run images/build.sh)"

# Manifest value for a key ("key: value" line), empty if absent.
value() {
	sed -n "s|^$1: ||p" "$manifest" | head -n1
}

want=$(
	ldt_input_lines
	echo "kernel-key: $(ldt_kernel_key)"
	echo "image-key: $(ldt_image_key)"
)
have=$(grep -v -e '^#' -e '^guest.img-sha256: ' "$manifest")
if [ "$want" != "$have" ]; then
	echo "check-manifest: guest.manifest does not match the tree (rebuild with images/build.sh):" >&2
	diff <(echo "$have") <(echo "$want") | sed -n 's/^</  manifest:/p; s/^>/  tree:    /p' >&2
	exit 1
fi
echo "check-manifest: inputs match (kernel key $(value kernel-key), image key $(value image-key))"

if [ "$check_image" = 1 ]; then
	[ -f "$image" ] || ldt_die "no $image (run images/build.sh)"
	sum=$(sha256sum "$image" | cut -d' ' -f1)
	if [ "$sum" != "$(value guest.img-sha256)" ]; then
		echo "check-manifest: $image sha256 $sum, manifest says $(value guest.img-sha256)" >&2
		exit 1
	fi
	echo "check-manifest: guest.img matches ($sum)"
fi
