#!/usr/bin/env bash
# Boots Debian's packaged kernel (unmodified) under ldt-vmm with the CPU
# profile of this host and checks its banner and early boot log on the
# serial console. On a PVM host an unmodified kernel cannot reach user space
# (see README), so the test stops once the early log is there.
set -euo pipefail
cd "$(dirname "$0")/.."
VMM=${VMM:-target/release/ldt-vmm}
dir=$(scripts/setup.sh | tail -n 1)
log=$(mktemp)
trap 'rm -f "$log"' EXIT

# Up to 300 s for the lines below (every kernel instruction is interpreted
# here, so a loaded machine is much slower); ldt-vmm is killed once they
# are all there.
want=("Linux version 6.1" "Command line: console=ttyS0" "BIOS-e820: \[mem 0x0000000000100000-0x000000000fffffff\] usable"
      "Hypervisor detected: KVM" "kvm-clock: Using msrs" "tsc: Detected")
"$VMM" run "$dir/vmlinux" --mem 256 --cmdline-append "earlyprintk=ttyS0" >"$log" 2>&1 &
pid=$!
ok=0
for _ in $(seq 1 600); do
    ok=1
    for w in "${want[@]}"; do grep -q -- "$w" "$log" || { ok=0; break; }; done
    [ $ok = 1 ] && break
    kill -0 $pid 2>/dev/null || break
    sleep 0.5
done
kill $pid 2>/dev/null || true
wait $pid 2>/dev/null || true
if [ $ok = 1 ]; then
    [ -e /sys/module/kvm_pvm ] && grep -q "Command line:.*noxsave clearcpuid=" "$log" \
        || [ ! -e /sys/module/kvm_pvm ] || { echo "compat profile words missing"; ok=0; }
fi
if [ $ok = 1 ]; then
    echo "ok 1 debian kernel $(basename "$dir") prints its banner and early boot log"
    echo "linux-debian-boot: 1 passed, 0 failed"
else
    echo "not ok 1 debian kernel boot; console was:"; tail -40 "$log"
    echo "linux-debian-boot: 0 passed, 1 failed"
    exit 1
fi
