//! QEMU's ISA pvpanic device (`-device pvpanic`, I/O port 0x505): reading
//! the port returns the events the device reports, the guest writes an
//! event when it happens. Linux's pvpanic driver writes `PANICKED` from its
//! panic notifier, before the kernel reboots; the guest finds the port
//! through the platform CPUID leaf (`arch::cpuid::platform_leaves`).

/// The port, as QEMU's default.
pub const PVPANIC_PORT: u16 = 0x505;
/// Event bit: the guest kernel panicked.
pub const PVPANIC_PANICKED: u8 = 1 << 0;
/// What this device reports. Not `CRASH_LOADED` (bit 1): a guest with a
/// crash kernel loaded then keeps running it, and has nothing to tell.
pub const PVPANIC_CAPABILITIES: u8 = PVPANIC_PANICKED;

/// Whether a byte the guest wrote reports a panic.
pub fn reports_panic(byte: u8) -> bool {
    byte & PVPANIC_CAPABILITIES & PVPANIC_PANICKED != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_panicked_bit_reports_a_panic() {
        assert!(reports_panic(1));
        assert!(reports_panic(0x81));
        assert!(!reports_panic(0));
        assert!(!reports_panic(2), "crash-loaded is not offered");
    }
}
