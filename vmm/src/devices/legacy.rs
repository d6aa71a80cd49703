//! The port-I/O bus of legacy devices, shared by all vCPU threads.

use vm_superio::{I8042Device, Serial, Trigger};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use std::sync::Arc;

use super::console::ConsoleOut;
use super::ldt_pv::LdtPv;
use super::pvpanic::{self, PVPANIC_PORT};
use super::{COM1_PORT, EXIT_STATUS_PORT, FLAT_SYNC_PORT, I8042_PORT};

/// An eventfd as a vm-superio interrupt/reset line.
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// What a vCPU must do after a port write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PioAction {
    Continue,
    /// The guest pulsed the i8042 reset line: the VM ends.
    Reset,
    /// A flat payload reached a sync point, passing this value.
    FlatSync(u32),
    /// The guest kernel reported a panic on the pvpanic port: the VM ends.
    GuestPanic,
}

/// COM1, the i8042, the exit-status port and the flat sync port.
pub struct LegacyDevices {
    pub serial: Serial<EventFdTrigger, vm_superio::serial::NoEvents, ConsoleOut>,
    i8042: I8042Device<EventFdTrigger>,
    /// The last byte the guest wrote to `EXIT_STATUS_PORT`.
    pub exit_status: Option<u8>,
    /// Bytes received on stdin that did not fit the UART FIFO yet.
    pending_input: Vec<u8>,
    /// The ldt-pv device, when the VM has it (its own lock: the migration
    /// thread waits on it without holding this bus).
    ldt_pv: Option<Arc<LdtPv>>,
}

/// Device state that migrates with the VM.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DevicesState {
    pub serial_regs: [u8; 9],
    pub serial_input: Vec<u8>,
    pub pending_input: Vec<u8>,
    pub exit_status: Option<u8>,
}

/// Errors creating devices.
#[derive(Debug, thiserror::Error)]
#[error("cannot create an eventfd for {0}: {1}")]
pub struct DeviceError(&'static str, std::io::Error);

impl LegacyDevices {
    pub fn new(out: ConsoleOut) -> Result<Self, DeviceError> {
        let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(|e| DeviceError("COM1", e))?;
        let reset = EventFd::new(EFD_NONBLOCK).map_err(|e| DeviceError("i8042", e))?;
        Ok(LegacyDevices {
            serial: Serial::new(EventFdTrigger(serial_irq), out),
            i8042: I8042Device::new(EventFdTrigger(reset)),
            exit_status: None,
            pending_input: Vec::new(),
            ldt_pv: None,
        })
    }

    /// Puts the ldt-pv device on the bus.
    pub fn attach_ldt_pv(&mut self, dev: Arc<LdtPv>) {
        self.ldt_pv = Some(dev);
    }

    /// The eventfd the UART signals its interrupt with (an irqfd for GSI 4).
    pub fn serial_irq(&self) -> &EventFd {
        &self.serial.interrupt_evt().0
    }

    /// Saves the UART registers and FIFO, queued input and exit status.
    pub fn save(&self) -> DevicesState {
        let s = self.serial.state();
        DevicesState {
            serial_regs: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            serial_input: s.in_buffer,
            pending_input: self.pending_input.clone(),
            exit_status: self.exit_status,
        }
    }

    /// Restores what `save` returned, keeping this side's console and irqfd.
    pub fn restore(&mut self, state: &DevicesState) -> Result<(), DeviceError> {
        let r = state.serial_regs;
        let s = vm_superio::serial::SerialState {
            baud_divisor_low: r[0],
            baud_divisor_high: r[1],
            interrupt_enable: r[2],
            interrupt_identification: r[3],
            line_control: r[4],
            line_status: r[5],
            modem_control: r[6],
            modem_status: r[7],
            scratch: r[8],
            in_buffer: state.serial_input.clone(),
        };
        let irq = self
            .serial
            .interrupt_evt()
            .0
            .try_clone()
            .map_err(|e| DeviceError("COM1", e))?;
        let out = self.serial.writer().clone();
        self.serial =
            Serial::from_state(&s, EventFdTrigger(irq), vm_superio::serial::NoEvents, out)
                .map_err(|_| DeviceError("COM1", std::io::Error::other("invalid UART state")))?;
        self.pending_input = state.pending_input.clone();
        self.exit_status = state.exit_status;
        Ok(())
    }

    /// Handles an `in` from `port`.
    pub fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        if let Some(d) = self.ldt_pv.as_ref().filter(|_| LdtPv::decodes(port)) {
            return d.pio_read(port, data);
        }
        let value = match port {
            p if (COM1_PORT..COM1_PORT + 8).contains(&p) => {
                let v = self.serial.read((p - COM1_PORT) as u8);
                self.refill_serial();
                v
            }
            p if p == I8042_PORT || p == I8042_PORT + 4 => self.i8042.read((p - I8042_PORT) as u8),
            PVPANIC_PORT => pvpanic::PVPANIC_CAPABILITIES,
            _ => 0xff,
        };
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = value;
        }
    }

    /// Handles an `out` of `data` to `port`.
    pub fn pio_write(&mut self, port: u16, data: &[u8]) -> PioAction {
        if let Some(d) = self.ldt_pv.as_ref().filter(|_| LdtPv::decodes(port)) {
            d.pio_write(port, data);
            return PioAction::Continue;
        }
        let byte = data.first().copied().unwrap_or(0);
        match port {
            p if (COM1_PORT..COM1_PORT + 8).contains(&p) => {
                // A failed interrupt trigger only loses an IRQ edge; the
                // guest's next poll still sees the data.
                let _ = self.serial.write((p - COM1_PORT) as u8, byte);
            }
            p if p == I8042_PORT || p == I8042_PORT + 4 => {
                let _ = self.i8042.write((p - I8042_PORT) as u8, byte);
                if self.i8042.reset_evt().0.read().is_ok() {
                    return PioAction::Reset;
                }
            }
            EXIT_STATUS_PORT => self.exit_status = Some(byte),
            PVPANIC_PORT if pvpanic::reports_panic(byte) => return PioAction::GuestPanic,
            FLAT_SYNC_PORT => {
                let mut v = [0u8; 4];
                let n = data.len().min(4);
                v[..n].copy_from_slice(&data[..n]);
                return PioAction::FlatSync(u32::from_le_bytes(v));
            }
            _ => {}
        }
        PioAction::Continue
    }

    /// Queues console input; what the UART FIFO cannot take now goes in
    /// as the guest drains it.
    pub fn queue_input(&mut self, bytes: &[u8]) {
        self.pending_input.extend_from_slice(bytes);
        self.refill_serial();
    }

    fn refill_serial(&mut self) {
        if self.pending_input.is_empty() {
            return;
        }
        let room = self.serial.fifo_capacity();
        let n = room.min(self.pending_input.len());
        if n > 0
            && self
                .serial
                .enqueue_raw_bytes(&self.pending_input[..n])
                .is_ok()
        {
            self.pending_input.drain(..n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn devices() -> (LegacyDevices, std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
        let (out, buf) = ConsoleOut::buffer();
        (LegacyDevices::new(out).unwrap(), buf)
    }

    #[test]
    fn com1_writes_reach_the_console() {
        let (mut d, buf) = devices();
        for b in b"hi\n" {
            assert_eq!(d.pio_write(COM1_PORT, &[*b]), PioAction::Continue);
        }
        assert_eq!(&*buf.lock().unwrap(), b"hi\n");
    }

    #[test]
    fn i8042_reset_command_ends_the_vm() {
        let (mut d, _) = devices();
        assert_eq!(d.pio_write(0x64, &[0x00]), PioAction::Continue);
        assert_eq!(d.pio_write(0x64, &[0xfe]), PioAction::Reset);
    }

    #[test]
    fn exit_status_and_sync_ports() {
        let (mut d, _) = devices();
        assert_eq!(d.pio_write(EXIT_STATUS_PORT, &[7]), PioAction::Continue);
        assert_eq!(d.exit_status, Some(7));
        assert_eq!(
            d.pio_write(FLAT_SYNC_PORT, &[3, 1, 0, 0]),
            PioAction::FlatSync(0x103)
        );
    }

    #[test]
    fn console_input_is_readable_from_the_uart_in_order() {
        let (mut d, _) = devices();
        let input: Vec<u8> = (0..100u8).collect();
        d.queue_input(&input);
        let mut got = Vec::new();
        let mut b = [0u8];
        for _ in 0..100 {
            d.pio_read(COM1_PORT + 5, &mut b); // LSR
            assert_ne!(b[0] & 1, 0, "data ready");
            d.pio_read(COM1_PORT, &mut b);
            got.push(b[0]);
        }
        assert_eq!(got, input);
    }

    #[test]
    fn state_round_trips_with_registers_and_pending_input() {
        let (mut a, _) = devices();
        a.pio_write(COM1_PORT + 7, &[0x42]); // scratch
        a.pio_write(COM1_PORT + 1, &[0x01]); // IER
        a.queue_input(&[b'x'; 100]);
        a.pio_write(EXIT_STATUS_PORT, &[3]);
        let saved = a.save();
        let (mut b, _) = devices();
        b.restore(&saved).unwrap();
        assert_eq!(b.save(), saved);
        let mut v = [0u8];
        b.pio_read(COM1_PORT + 7, &mut v);
        assert_eq!(v[0], 0x42);
        b.pio_read(COM1_PORT, &mut v);
        assert_eq!(v[0], b'x');
        assert_eq!(b.exit_status, Some(3));
    }

    #[test]
    fn pvpanic_offers_panicked_and_ends_the_vm_on_it() {
        let (mut d, _) = devices();
        let mut b = [0u8];
        d.pio_read(PVPANIC_PORT, &mut b);
        assert_eq!(b[0], pvpanic::PVPANIC_PANICKED);
        assert_eq!(d.pio_write(PVPANIC_PORT, &[0]), PioAction::Continue);
        assert_eq!(d.pio_write(PVPANIC_PORT, &[1]), PioAction::GuestPanic);
    }

    #[test]
    fn unknown_ports_read_as_all_ones() {
        let (mut d, _) = devices();
        let mut b = [0u8; 2];
        d.pio_read(0x1234, &mut b);
        assert_eq!(b, [0xff, 0]);
    }
}
