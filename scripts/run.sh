#!/usr/bin/env bash
# README's main command: installs dependencies (scripts/setup.sh), builds
# ldt-vmm in release mode and the guest image, then runs the quick results
# report (scripts/report.sh --quick: `ldt-vmm bench dirty` on this
# machine's /dev/kvm and ldt-bench --short in the guest under QEMU TCG,
# figures drawn from their JSON) and prints where its page is on the last
# line.  Arguments go to scripts/report.sh (e.g. --out DIR, --full).
set -euo pipefail
cd "$(dirname "$0")/.."
exec scripts/report.sh --quick "$@"
