#!/usr/bin/env bash
# The project's whole test suite (README's test command; .ci/run calls it):
# installs dependencies, builds, runs the Rust tests (unit, flat-payload
# dirty-source, CLI, migration and snapshot tests), the Debian kernel boot
# test, the guest image tests (under QEMU TCG, under ldt-vmm on this
# machine's KVM, and in the nested machine: QEMU TCG with SVM+NPT, where
# the image also runs its LDT selftests and is live-migrated), the host
# module's tests in the nested machine, the results report's page and
# figures (tests/report.sh), and a short fuzz run of the
# migration receiver. Ends with one "N passed, N failed" line over the
# suites.
set -uo pipefail
cd "$(dirname "$0")/.."

passed=0
failed=0
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
suite() {
    local name=$1 rc
    shift
    echo "=== $name: $*"
    local t0=$SECONDS
    "$@" 2>&1 | tee "$logs/$name.log"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 0 ]; then
        passed=$((passed + 1))
        echo "=== $name: ok ($((SECONDS - t0)) s)"
        rm -f "$logs/$name.log"
    else
        failed=$((failed + 1))
        echo "=== $name: FAILED ($((SECONDS - t0)) s)"
    fi
}

# recap: each failed suite's failure lines and retries, with the lines
# just before them, again at the very end, where a CI log cut in the
# middle still shows them.
recap() {
    local f
    for f in "$logs"/*.log; do
        [ -e "$f" ] || continue
        echo "=== recap of $(basename "$f" .log): its failures and retries"
        tr -d '\r' <"$f" | grep -a -B6 -A2 -E '^not ok|^FAIL|RETRY|^test .* FAILED|panicked at|^error' |
            cut -c1-300 | tail -n 80
    done
}

scripts/setup.sh >/dev/null || { echo "setup failed"; echo "0 passed, 1 failed"; exit 1; }
suite build cargo build --release --workspace
suite cargo-test cargo test --release --workspace
suite linux-debian-boot env VMM=target/release/ldt-vmm tests/linux-debian-boot.sh
suite image-qemu tests/image-qemu.sh
# The results report: example figures redrawn and checked, then the quick
# report (bench dirty here, ldt-bench --short under QEMU TCG): 45 s measured
# with the image built, four agents on the 2 cores.
suite report tests/report.sh
suite image-ldt-vmm tests/image-ldt-vmm.sh
suite image-nested tests/image-nested.sh
suite kmod-nested tests/kmod-nested.sh
suite fuzz scripts/fuzz.sh

recap
echo "suites: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
