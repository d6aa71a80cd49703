#!/usr/bin/env bash
# README's build-and-run command: installs dependencies, builds ldt-vmm in
# release mode, then runs the main job: the dirty-tracking benchmark, which
# boots a ring-3 flat guest once per dirty source and prints the table.
# Extra arguments are passed to `ldt-vmm bench dirty`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
cargo build --release --workspace
exec target/release/ldt-vmm bench dirty "$@"
