//! Port-I/O devices: the COM1 UART, the i8042 (reset line), the exit-status
//! port, the flat-payload sync port, pvpanic and ldt-pv.

pub mod console;
pub mod ldt_pv;
pub mod legacy;
pub mod pvpanic;

pub use legacy::{LegacyDevices, PioAction};

/// COM1 base port.
pub const COM1_PORT: u16 = 0x3f8;
/// COM1 IRQ (GSI).
pub const COM1_IRQ: u32 = 4;
/// i8042 data port; the command port is `I8042_PORT + 4` (0x64).
pub const I8042_PORT: u16 = 0x60;
/// Guest writes its exit status here before resetting (see images/ init).
pub const EXIT_STATUS_PORT: u16 = 0x501;
/// Flat payloads signal "round done" with `out %eax, %dx` (DX = 0x510).
pub const FLAT_SYNC_PORT: u16 = 0x510;
/// The VMM's exit status when the guest kernel reported a panic (pvpanic).
pub const GUEST_PANIC_STATUS: i32 = 3;
