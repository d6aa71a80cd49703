//! `ldt-pv`: the paravirtual dirty-tracking device through which a guest
//! kernel reports the guest-physical frames it wrote (the `guest-ldt` dirty
//! source). Protocol version 1, documented in the README ("The ldt-pv
//! device"); the guest finds it in the platform CPUID leaf
//! (`arch::cpuid::LDT_PV_LEAF`).
//!
//! The VMM posts a request (START, HARVEST, STOP) in the REQUEST register
//! and pulses an ISA IRQ; the guest carries it out and writes COMPLETE with
//! the request's sequence number. For HARVEST that means: every frame the
//! guest wrote since the previous harvest (or START) is ORed into the
//! bitmap, one bit per 4 KiB frame, frame 0 in bit 0 of the first byte.
//! The bitmap is a memslot of its own in the MMIO hole (e820-reserved),
//! outside guest RAM: nothing of it migrates, a destination starts with
//! zeroes. The VMM reads and clears it after COMPLETE, before its next
//! request; the guest touches it only while a request is pending.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use vm_memory::MmapRegion;

use crate::arch::cpuid::LdtPvLeaf;
use crate::arch::layout;

/// The protocol version this VMM speaks (CPUID EAX, highest ANNOUNCE accepted).
pub const LDT_PV_VERSION: u32 = 1;
/// First of the device's three 32-bit registers.
pub const LDT_PV_PORT: u16 = 0x520;
/// Read: `seq << 8 | cmd` of the pending request (cmd 0 when none).
pub const REG_REQUEST: u16 = 0;
/// Write: `seq << 8 | status` (0 = done) of the request the guest carried out.
pub const REG_COMPLETE: u16 = 4;
/// Write: the guest driver's protocol version (ready), or 0 (gone).
/// Read: the VMM's protocol version.
pub const REG_ANNOUNCE: u16 = 8;
/// Ports the device decodes from `LDT_PV_PORT`.
pub const LDT_PV_PORTS: u16 = 12;
/// The ISA IRQ pulsed when a request is posted (a hint: guests may poll).
pub const LDT_PV_IRQ: u8 = 5;
/// KVM memslot of the bitmap (RAM uses 0 and 1).
pub const LDT_PV_SLOT: u32 = 16;
/// Sequence numbers are 24 bits wide (`seq << 8` in a 32-bit register).
const SEQ_MASK: u32 = 0x00ff_ffff;

/// A request the VMM posts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Command {
    /// Start tracking every write to guest RAM; nothing to report yet.
    Start = 1,
    /// OR every frame written since the previous harvest (or START) into the bitmap.
    Harvest = 2,
    /// Stop tracking.
    Stop = 3,
}

impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Command::Start => "START",
            Command::Harvest => "HARVEST",
            Command::Stop => "STOP",
        })
    }
}

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LdtPvError {
    #[error(
        "the guest did not announce guest-ldt (this VM has no ldt-pv device: run it with --ldt-pv)"
    )]
    NoDevice,
    #[error("the guest did not announce guest-ldt (no driver wrote ANNOUNCE to the ldt-pv port {LDT_PV_PORT:#x})")]
    NotAnnounced,
    #[error("guest-ldt: the guest did not complete {cmd} (seq {seq}) within {secs} s")]
    Timeout { cmd: Command, seq: u32, secs: u64 },
    #[error("guest-ldt: the guest completed seq {got} while {cmd} seq {want} was pending")]
    WrongSeq { cmd: Command, want: u32, got: u32 },
    #[error("guest-ldt: the guest failed {cmd} (seq {seq}) with status {status}")]
    Status { cmd: Command, seq: u32, status: u8 },
    #[error("guest-ldt: the guest driver left or re-announced (ANNOUNCE {value}) while tracking")]
    Withdrawn { value: u32 },
    #[error("guest-ldt: pulsing IRQ {LDT_PV_IRQ} failed: {0}")]
    Irq(String),
}

/// Device state that migrates with the VM (the bitmap does not).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LdtPvState {
    /// The protocol version the guest driver announced; 0: none.
    pub driver: u32,
    /// Counts ANNOUNCE writes: a tracking session belongs to one epoch.
    pub epoch: u32,
    /// The last sequence number used.
    pub seq: u32,
}

struct Inner {
    state: LdtPvState,
    /// The last value written to ANNOUNCE.
    announced_value: u32,
    pending: Option<Command>,
    /// (seq, status) the guest wrote to COMPLETE for the pending request.
    completion: Option<(u32, u8)>,
}

/// The device: registers, the bitmap memslot and the IRQ line.
pub struct LdtPv {
    inner: Mutex<Inner>,
    changed: Condvar,
    vm_fd: Arc<VmFd>,
    bitmap: MmapRegion<()>,
    frames: u64,
    /// `run --ldt-pv-audit`: every guest-ldt session of this VM is checked
    /// against KVM's log (`dirty::guest_ldt`, "audit").
    audit: AtomicBool,
}

/// Errors creating the device.
#[derive(Debug, thiserror::Error)]
pub enum LdtPvSetupError {
    #[error("--ldt-pv: {0} MiB of RAM needs a dirty-frame bitmap larger than the {max} MiB window", max = layout::LDT_PV_BITMAP_MAX >> 20)]
    TooMuchMemory(u64),
    #[error("--ldt-pv: cannot map the dirty-frame bitmap: {0}")]
    Mmap(vm_memory::mmap::MmapRegionError),
    #[error("--ldt-pv: KVM_SET_USER_MEMORY_REGION for the bitmap failed: {0}")]
    Memslot(kvm_ioctls::Error),
}

impl LdtPv {
    /// Maps the bitmap for `mem_size` bytes of RAM into the guest at
    /// `LDT_PV_BITMAP_ADDR` (own memslot, zero-filled).
    pub fn new(vm_fd: Arc<VmFd>, mem_size: u64) -> Result<Self, LdtPvSetupError> {
        let (frames, bytes) = layout::ldt_pv_bitmap(mem_size)
            .ok_or(LdtPvSetupError::TooMuchMemory(mem_size >> 20))?;
        let bitmap = MmapRegion::new(bytes as usize).map_err(LdtPvSetupError::Mmap)?;
        let region = kvm_userspace_memory_region {
            slot: LDT_PV_SLOT,
            flags: 0,
            guest_phys_addr: layout::LDT_PV_BITMAP_ADDR,
            memory_size: bytes,
            userspace_addr: bitmap.as_ptr() as u64,
        };
        // SAFETY: `bitmap` is a mapping of `bytes` bytes owned by the
        // device, which the VM fd (and so the memslot) never outlives: the
        // device holds the fd.
        unsafe { vm_fd.set_user_memory_region(region) }.map_err(LdtPvSetupError::Memslot)?;
        Ok(LdtPv {
            inner: Mutex::new(Inner {
                state: LdtPvState::default(),
                announced_value: 0,
                pending: None,
                completion: None,
            }),
            changed: Condvar::new(),
            vm_fd,
            bitmap,
            frames,
            audit: AtomicBool::new(false),
        })
    }

    /// What the CPUID leaf tells the guest.
    pub fn leaf(&self) -> LdtPvLeaf {
        LdtPvLeaf {
            version: LDT_PV_VERSION,
            bitmap_gpa: layout::LDT_PV_BITMAP_ADDR,
            frames: self.frames as u32,
            port: LDT_PV_PORT,
            irq: LDT_PV_IRQ,
        }
    }

    /// Checks every guest-ldt session of this VM against KVM's log.
    pub fn set_audit(&self, on: bool) {
        self.audit.store(on, Ordering::Relaxed);
    }

    /// Whether guest-ldt sessions are audited (`set_audit`).
    pub fn audit(&self) -> bool {
        self.audit.load(Ordering::Relaxed)
    }

    /// Frames the bitmap covers.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// Whether `port` is one of the device's.
    pub fn decodes(port: u16) -> bool {
        (LDT_PV_PORT..LDT_PV_PORT + LDT_PV_PORTS).contains(&port)
    }

    /// An `in` from one of the device's ports.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        let inner = self.inner.lock().unwrap();
        let value = match port - LDT_PV_PORT {
            REG_REQUEST => inner.state.seq << 8 | inner.pending.map_or(0, |c| c as u32),
            REG_ANNOUNCE => LDT_PV_VERSION,
            _ => 0,
        };
        let bytes = value.to_le_bytes();
        for (d, b) in data
            .iter_mut()
            .zip(bytes.iter().chain(std::iter::repeat(&0)))
        {
            *d = *b;
        }
    }

    /// An `out` to one of the device's ports.
    pub fn pio_write(&self, port: u16, data: &[u8]) {
        let mut v = [0u8; 4];
        let n = data.len().min(4);
        v[..n].copy_from_slice(&data[..n]);
        let value = u32::from_le_bytes(v);
        let mut inner = self.inner.lock().unwrap();
        match port - LDT_PV_PORT {
            // An answer to an earlier request (one given up on, or replaced
            // by a STOP) is ignored, as is one when nothing is pending: the
            // guest learns from REQUEST what is due.
            REG_COMPLETE if inner.pending.is_some() && !stale(value >> 8, inner.state.seq) => {
                inner.completion = Some((value >> 8, value as u8));
                inner.pending = None;
            }
            REG_COMPLETE => return,
            REG_ANNOUNCE => {
                inner.announced_value = value;
                inner.state.driver = if (1..=LDT_PV_VERSION).contains(&value) {
                    value
                } else {
                    0
                };
                inner.state.epoch = inner.state.epoch.wrapping_add(1);
                inner.pending = None;
            }
            _ => return,
        }
        drop(inner);
        self.changed.notify_all();
    }

    /// The epoch of the guest driver's announcement, if it announced.
    pub fn announced(&self) -> Result<u32, LdtPvError> {
        let inner = self.inner.lock().unwrap();
        if inner.state.driver == 0 {
            return Err(LdtPvError::NotAnnounced);
        }
        Ok(inner.state.epoch)
    }

    /// Posts `cmd`, pulses the IRQ and waits (at most `deadline`) for the
    /// guest's COMPLETE. `epoch` is the announcement the caller's session
    /// belongs to: a guest that left or re-announced since fails it. On any
    /// failure no request is left pending.
    pub fn request(&self, cmd: Command, epoch: u32, deadline: Duration) -> Result<(), LdtPvError> {
        let until = Instant::now() + deadline;
        let seq = {
            let mut inner = self.inner.lock().unwrap();
            check_epoch(&inner, epoch)?;
            post(&mut inner, cmd)
        };
        let pulse = self.pulse();
        let mut inner = self.inner.lock().unwrap();
        if let Err(e) = pulse {
            inner.pending = None;
            return Err(LdtPvError::Irq(e.to_string()));
        }
        loop {
            // An answer first: a driver may leave right after answering.
            if let Some((got, status)) = inner.completion.take() {
                return match (got == seq, status) {
                    (true, 0) => Ok(()),
                    (true, status) => Err(LdtPvError::Status { cmd, seq, status }),
                    (false, _) => Err(LdtPvError::WrongSeq {
                        cmd,
                        want: seq,
                        got,
                    }),
                };
            }
            if let Err(e) = check_epoch(&inner, epoch) {
                inner.pending = None;
                return Err(e);
            }
            let now = Instant::now();
            if now >= until {
                inner.pending = None;
                return Err(LdtPvError::Timeout {
                    cmd,
                    seq,
                    secs: deadline.as_secs(),
                });
            }
            inner = self.changed.wait_timeout(inner, until - now).unwrap().0;
        }
    }

    /// Posts STOP without waiting (after a failure: the guest may not answer).
    pub fn post_stop(&self) {
        post(&mut self.inner.lock().unwrap(), Command::Stop);
        // Best effort: a guest that polls sees it anyway.
        let _ = self.pulse();
    }

    /// Raises and lowers the IRQ line (an edge for the PIC and IOAPIC).
    fn pulse(&self) -> Result<(), kvm_ioctls::Error> {
        self.vm_fd
            .set_irq_line(LDT_PV_IRQ as u32, true)
            .and_then(|()| self.vm_fd.set_irq_line(LDT_PV_IRQ as u32, false))
    }

    /// Reads and clears `words` 64-bit words of the bitmap from word
    /// `first` (frame `first * 64`); words past the bitmap read as zero.
    pub fn take_words(&self, first: u64, words: u64) -> Vec<u64> {
        let total = self.bitmap.size() as u64 / 8;
        let base = self.bitmap.as_ptr() as *const AtomicU64;
        (first..first + words)
            .map(|i| {
                if i >= total {
                    return 0;
                }
                // SAFETY: word `i` lies within the mapping (checked above),
                // which lives as long as `self`; 8-byte aligned (page
                // aligned base). The guest writes it only while a request
                // is pending, the VMM only between requests.
                unsafe { (*base.add(i as usize)).swap(0, Ordering::AcqRel) }
            })
            .collect()
    }

    /// Clears the whole bitmap.
    pub fn clear(&self) {
        self.take_words(0, self.bitmap.size() as u64 / 8);
    }

    /// State that migrates.
    pub fn save(&self) -> LdtPvState {
        self.inner.lock().unwrap().state
    }

    /// Restores what `save` returned (on a destination: no request pending).
    pub fn restore(&self, state: &LdtPvState) {
        let mut inner = self.inner.lock().unwrap();
        inner.state = *state;
        inner.announced_value = state.driver;
        inner.pending = None;
        inner.completion = None;
    }
}

/// Makes `cmd` the pending request with the next sequence number (never 0).
fn post(inner: &mut Inner, cmd: Command) -> u32 {
    let mut seq = inner.state.seq.wrapping_add(1) & SEQ_MASK;
    if seq == 0 {
        seq = 1;
    }
    inner.state.seq = seq;
    inner.pending = Some(cmd);
    inner.completion = None;
    seq
}

/// Whether `got` is a sequence number from before `current` (24-bit
/// serial-number arithmetic: up to 2^23 behind).
fn stale(got: u32, current: u32) -> bool {
    let behind = current.wrapping_sub(got) & SEQ_MASK;
    behind != 0 && behind < 1 << 23
}

fn check_epoch(inner: &Inner, epoch: u32) -> Result<(), LdtPvError> {
    if inner.state.driver == 0 || inner.state.epoch != epoch {
        return Err(LdtPvError::Withdrawn {
            value: inner.announced_value,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> Arc<LdtPv> {
        let vm = crate::vm::Vm::new(32 << 20, crate::vm::MemBacking::Anon).unwrap();
        Arc::new(LdtPv::new(vm.fd.clone(), 32 << 20).unwrap())
    }

    fn read(d: &LdtPv, reg: u16) -> u32 {
        let mut b = [0u8; 4];
        d.pio_read(LDT_PV_PORT + reg, &mut b);
        u32::from_le_bytes(b)
    }

    fn write(d: &LdtPv, reg: u16, v: u32) {
        d.pio_write(LDT_PV_PORT + reg, &v.to_le_bytes());
    }

    /// A guest on another thread answering the next request with `answer(request)`.
    fn guest(d: &Arc<LdtPv>, answer: fn(u32) -> u32) -> std::thread::JoinHandle<()> {
        let d = d.clone();
        std::thread::spawn(move || loop {
            let r = read(&d, REG_REQUEST);
            if r & 0xff != 0 {
                return write(&d, REG_COMPLETE, answer(r));
            }
            std::thread::yield_now();
        })
    }

    #[test]
    fn requests_need_an_announcement_and_complete_by_sequence_number() {
        let d = device();
        assert_eq!(d.announced(), Err(LdtPvError::NotAnnounced));
        assert_eq!(read(&d, REG_ANNOUNCE), LDT_PV_VERSION);
        write(&d, REG_ANNOUNCE, 1);
        let epoch = d.announced().unwrap();
        assert_eq!(read(&d, REG_REQUEST), 0, "nothing pending");
        let g = guest(&d, |r| r & !0xff);
        d.request(Command::Start, epoch, Duration::from_secs(30))
            .unwrap();
        g.join().unwrap();
        assert_eq!(read(&d, REG_REQUEST), 1 << 8, "seq 1 done, none pending");
        let g = guest(&d, |r| (r & !0xff) + 0x100);
        let e = d
            .request(Command::Harvest, epoch, Duration::from_secs(30))
            .unwrap_err();
        assert_eq!(
            e,
            LdtPvError::WrongSeq {
                cmd: Command::Harvest,
                want: 2,
                got: 3
            }
        );
        g.join().unwrap();
        let g = guest(&d, |r| (r & !0xff) | 7);
        let e = d
            .request(Command::Harvest, epoch, Duration::from_secs(30))
            .unwrap_err();
        assert!(matches!(e, LdtPvError::Status { status: 7, .. }), "{e}");
        g.join().unwrap();
    }

    #[test]
    fn answers_to_earlier_requests_are_ignored() {
        assert!(
            stale(4, 5) && stale(SEQ_MASK, 1),
            "behind, also across the wrap"
        );
        assert!(!stale(5, 5) && !stale(6, 5), "current or ahead: not stale");
        let d = device();
        write(&d, REG_ANNOUNCE, 1);
        let epoch = d.announced().unwrap();
        d.post_stop(); // seq 1, then replaced by the request below (seq 2)
        let g = guest(&d, |r| (r & !0xff) - 0x100);
        let e = d
            .request(Command::Start, epoch, Duration::from_millis(300))
            .unwrap_err();
        // The late answer for seq 1 did not complete seq 2.
        assert!(matches!(e, LdtPvError::Timeout { seq: 2, .. }), "{e}");
        g.join().unwrap();
    }

    #[test]
    fn a_silent_guest_times_out_and_leaves_nothing_pending() {
        let d = device();
        write(&d, REG_ANNOUNCE, 1);
        let epoch = d.announced().unwrap();
        let e = d
            .request(Command::Harvest, epoch, Duration::from_millis(50))
            .unwrap_err();
        assert!(matches!(e, LdtPvError::Timeout { .. }), "{e}");
        assert_eq!(read(&d, REG_REQUEST) & 0xff, 0);
        // A late answer is ignored.
        write(&d, REG_COMPLETE, 1 << 8);
        assert_eq!(read(&d, REG_REQUEST) & 0xff, 0);
    }

    #[test]
    fn leaving_or_reannouncing_ends_a_session_and_bad_versions_do_not_announce() {
        let d = device();
        write(&d, REG_ANNOUNCE, LDT_PV_VERSION + 1);
        assert_eq!(d.announced(), Err(LdtPvError::NotAnnounced));
        write(&d, REG_ANNOUNCE, 1);
        let epoch = d.announced().unwrap();
        write(&d, REG_ANNOUNCE, 1);
        let e = d
            .request(Command::Harvest, epoch, Duration::from_secs(1))
            .unwrap_err();
        assert_eq!(e, LdtPvError::Withdrawn { value: 1 });
        write(&d, REG_ANNOUNCE, 0);
        assert_eq!(d.announced(), Err(LdtPvError::NotAnnounced));
    }

    #[test]
    fn the_bitmap_is_read_and_cleared_word_by_word_and_state_round_trips() {
        let d = device();
        assert_eq!(d.frames(), (32 << 20) / 4096);
        let base = d.bitmap.as_ptr() as *mut u64;
        // SAFETY: words 0 and 3 of the device's own mapping.
        unsafe {
            base.write_volatile(0b101);
            base.add(3).write_volatile(1 << 63);
        }
        assert_eq!(d.take_words(0, 4), vec![0b101, 0, 0, 1 << 63]);
        assert_eq!(d.take_words(0, 4), vec![0; 4], "cleared");
        assert_eq!(d.take_words(1 << 20, 1), vec![0], "past the end");
        write(&d, REG_ANNOUNCE, 1);
        let saved = d.save();
        let other = device();
        other.restore(&saved);
        assert_eq!(other.save(), saved);
        assert!(other.announced().is_ok());
    }
}
