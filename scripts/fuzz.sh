#!/usr/bin/env bash
# Fuzzes the migration receiver's parsers briefly (cargo fuzz, libFuzzer):
# the frame reader, the memory-table decoder and the JSON message bodies.
# FUZZ_SECONDS per target (default 20). cargo fuzz needs the nightly
# toolchain that this machine kind ships; cargo-fuzz is installed from
# crates.io if missing.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${FUZZ_SECONDS:-20}
if ! rustup toolchain list | grep -q '^nightly'; then
    echo "fuzz: no nightly toolchain on this machine; cargo fuzz needs it" >&2
    exit 1
fi
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
failed=0
for t in frames memory_table json_messages; do
    if cargo +nightly fuzz run "$t" -- -max_total_time="$secs" >"/tmp/ldt-fuzz-$t.log" 2>&1; then
        echo "ok $t: $(grep -o 'Done [0-9]* runs' "/tmp/ldt-fuzz-$t.log" | tail -1) in ${secs} s"
    else
        echo "not ok $t (crash input under fuzz/artifacts/$t):"
        tail -30 "/tmp/ldt-fuzz-$t.log"
        failed=$((failed + 1))
    fi
done
echo "fuzz: $((3 - failed)) passed, $failed failed"
[ "$failed" -eq 0 ]
