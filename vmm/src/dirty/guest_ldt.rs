//! `guest-ldt`: the guest kernel reports the frames it wrote through the
//! ldt-pv device (`devices::ldt_pv`); pre-copy rounds cost the guest no
//! write faults, because nothing on the host write-protects its memory.
//!
//! What the guest cannot see is covered here: the VMM's own writes (the
//! vm-memory bitmap, as for every source), and for the final round
//! (`begin_final_round`) KVM's dirty log, armed only for the short interval
//! from just before the guest's last harvest to the pause, plus the pages
//! of the guest areas KVM writes through MSR registrations
//! (`kvm_msr_area_pages`), sent in the final round whatever they hold.

use std::sync::Arc;
use std::time::Duration;

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;

use super::kvm_bitmap::KvmBitmap;
use super::kvm_ring::{KvmRing, RingCollector};
use super::{DirtyBitmap, DirtyError, DirtySource, DirtySourceKind};
use crate::arch::layout::PAGE_SIZE;
use crate::devices::ldt_pv::{Command, LdtPv, LdtPvError};
use crate::vm::Vm;

/// How long the guest gets to answer one request (generous: a guest
/// kernel whose ring 0 is interpreted walks its page tables slowly).
pub const GUEST_DEADLINE: Duration = Duration::from_secs(10);

pub struct GuestLdt {
    session: Option<Session>,
    /// KVM's log for the final interval: kvm-ring on a VM with the dirty
    /// ring (KVM then has no bitmap), kvm-bitmap otherwise. With an audit
    /// it runs from `start` on and serves both.
    final_log: Box<dyn DirtySource>,
    /// `final_log` is armed.
    kvm_armed: bool,
    audit: Option<Audit>,
}

/// The never-miss audit (`run --ldt-pv-audit`): KVM's log runs beside the
/// pre-copy rounds (which then do write-protect guest memory: a test mode)
/// and is read just *before* each HARVEST is posted, so every page KVM saw
/// written in round r must be in the guest's report of round r or r-1 (a
/// write after the previous COMPLETE and before KVM's read is in either).
/// Pages KVM wrote itself (its MSR-registered areas) are exempt, which is
/// known only with the vCPUs paused: `audit_verdict` decides then.
struct Audit {
    /// The guest's report of the previous round.
    prev_guest: Option<DirtyBitmap>,
    /// KVM's pages in neither report, over all rounds.
    missed: DirtyBitmap,
    report: GuestLdtAudit,
}

/// What an audit found, in the migration report (`guest_ldt_audit`).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct GuestLdtAudit {
    /// Pre-copy rounds compared.
    pub rounds: u64,
    /// Pages KVM's log saw written, summed over the rounds.
    pub kvm_pages: u64,
    /// Pages the guest reported, summed over the rounds.
    pub guest_pages: u64,
    /// Of those, pages KVM did not see in that round or the next: the
    /// guest's false positives (page tables, huge kernel mappings, ...).
    pub guest_only_pages: u64,
    /// Pages KVM saw written that the guest never reported, MSR areas
    /// excluded: must be 0.
    pub missed_pages: u64,
    /// The first missed pages' guest-physical addresses.
    pub first_missed: Vec<u64>,
    /// KVM-written MSR-area pages excused from the check.
    pub exempt_pages: u64,
}

struct Session {
    device: Arc<LdtPv>,
    epoch: u32,
    /// A request failed: the guest is not trusted to answer STOP.
    failed: bool,
}

impl GuestLdt {
    /// `ring`: the VM's dirty-ring collector, if it has the ring.
    pub fn new(ring: Option<Arc<RingCollector>>) -> Self {
        let final_log: Box<dyn DirtySource> = match ring {
            Some(r) => Box::new(KvmRing::new(r)),
            None => Box::new(KvmBitmap::new()),
        };
        GuestLdt {
            session: None,
            final_log,
            kvm_armed: false,
            audit: None,
        }
    }

    /// Compares one round (see [`Audit`]): `kvm` was read before the
    /// guest's HARVEST was posted, `guest` is its report.
    fn audit_round(&mut self, kvm: &DirtyBitmap, guest: DirtyBitmap) {
        let Some(a) = self.audit.as_mut() else {
            return;
        };
        a.report.rounds += 1;
        a.report.kvm_pages += kvm.count();
        a.report.guest_pages += guest.count();
        for gpa in kvm.pages() {
            let in_prev = a.prev_guest.as_ref().is_some_and(|p| p.is_dirty(gpa));
            if !guest.is_dirty(gpa) && !in_prev {
                a.missed.set(gpa);
            }
        }
        if let Some(prev) = a.prev_guest.as_ref() {
            // The previous report's pages KVM saw in neither its round nor this one.
            a.report.guest_only_pages += prev.pages().filter(|&p| !kvm.is_dirty(p)).count() as u64;
        }
        a.prev_guest = Some(guest);
    }
}

/// The device of `vm` if its guest driver announced itself: the up-front
/// check of every user of guest-ldt.
pub fn announced(vm: &Vm) -> Result<(Arc<LdtPv>, u32), DirtyError> {
    let device = vm.ldt_pv.clone().ok_or(LdtPvError::NoDevice)?;
    let epoch = device.announced()?;
    Ok((device, epoch))
}

impl Session {
    fn request(&mut self, cmd: Command) -> Result<(), DirtyError> {
        let r = self.device.request(cmd, self.epoch, GUEST_DEADLINE);
        if r.is_err() {
            self.failed = true;
        }
        Ok(r?)
    }
}

/// ORs the device's bitmap (read and cleared) into a bitmap of `vm`'s slots.
fn take_bitmap(device: &LdtPv, vm: &Vm) -> DirtyBitmap {
    let mut dirty = DirtyBitmap::empty(&vm.slots);
    for (i, slot) in vm.slots.iter().enumerate() {
        // Slots start at 64-frame multiples (0 and 4 GiB), so the words line up.
        let first = slot.guest_addr / PAGE_SIZE / 64;
        let words = device.take_words(first, slot.pages().div_ceil(64));
        dirty.or_words(i, &words);
    }
    dirty
}

impl DirtySource for GuestLdt {
    fn kind(&self) -> DirtySourceKind {
        DirtySourceKind::GuestLdt
    }

    fn start(&mut self, vm: &Vm) -> Result<(), DirtyError> {
        let (device, epoch) = announced(vm)?;
        // What a previous session left is not this one's.
        device.clear();
        let mut s = Session {
            device,
            epoch,
            failed: false,
        };
        let started = s.request(Command::Start);
        if started.is_err() {
            s.device.post_stop();
            return started;
        }
        let audit = s.device.audit();
        self.session = Some(s);
        self.audit = None;
        if audit {
            // Armed after START's COMPLETE: round 1's KVM pages are all
            // writes the guest's first report must have.
            if let Err(e) = self.final_log.start(vm) {
                let _ = self.stop(vm);
                return Err(e);
            }
            self.kvm_armed = true;
            self.audit = Some(Audit {
                prev_guest: None,
                missed: DirtyBitmap::empty(&vm.slots),
                report: GuestLdtAudit::default(),
            });
        }
        Ok(())
    }

    fn harvest_guest_writes(&mut self, vm: &Vm) -> Result<DirtyBitmap, DirtyError> {
        let s = self
            .session
            .as_mut()
            .ok_or_else(|| DirtyError::Config("guest-ldt is not started".into()))?;
        if s.failed {
            return Err(DirtyError::Config(
                "guest-ldt: an earlier request failed; stop and start again".into(),
            ));
        }
        // The audit reads KVM's log before the request (see `Audit`).
        let kvm = if self.audit.is_some() {
            Some(self.final_log.harvest_guest_writes(vm)?)
        } else {
            None
        };
        s.device.clear();
        s.request(Command::Harvest)?;
        let guest = take_bitmap(&s.device, vm);
        if let Some(kvm) = kvm {
            self.audit_round(&kvm, guest.clone());
        }
        Ok(guest)
    }

    fn needs_running_guest(&self) -> bool {
        true
    }

    fn begin_final_round(&mut self, vm: &Vm) -> Result<(), DirtyError> {
        if self.kvm_armed {
            // Audited: the log runs already, and the final harvest reads
            // it before its request (so it is compared like any round);
            // from then on it holds the final interval.
            return Ok(());
        }
        if final_kvm_log_disabled_for_test() {
            return Ok(());
        }
        self.final_log.start(vm)?;
        self.kvm_armed = true;
        Ok(())
    }

    fn audit_verdict(&mut self, exempt: &[u64]) -> Result<Option<GuestLdtAudit>, DirtyError> {
        let Some(a) = self.audit.as_ref() else {
            return Ok(None);
        };
        let mut r = a.report.clone();
        let exempt: std::collections::HashSet<u64> = exempt.iter().copied().collect();
        let (excused, missed): (Vec<u64>, Vec<u64>) =
            a.missed.pages().partition(|p| exempt.contains(p));
        r.exempt_pages = excused.len() as u64;
        r.missed_pages = missed.len() as u64;
        r.first_missed = missed.iter().take(8).copied().collect();
        if let Some(first) = missed.first() {
            return Err(DirtyError::Config(format!(
                "guest-ldt audit: {} page(s) KVM saw written in {} pre-copy round(s) are in no \
                 guest report (first at {first:#x}): the guest missed writes",
                missed.len(),
                r.rounds
            )));
        }
        Ok(Some(r))
    }

    fn harvest_paused(&mut self, vm: &Vm) -> Result<DirtyBitmap, DirtyError> {
        if !self.kvm_armed {
            // Only the test switch gets here: no host record of the interval.
            return Ok(DirtyBitmap::empty(&vm.slots));
        }
        self.final_log.harvest_guest_writes(vm)
    }

    fn end_final_round(&mut self, vm: &Vm) -> Result<(), DirtyError> {
        if std::mem::take(&mut self.kvm_armed) {
            self.final_log.stop(vm)?;
        }
        Ok(())
    }

    fn stop_paused(&mut self, vm: &Vm) -> Result<(), DirtyError> {
        if let Some(s) = self.session.as_mut() {
            s.failed = true;
        }
        self.stop(vm)
    }

    fn stop(&mut self, vm: &Vm) -> Result<(), DirtyError> {
        let disarmed = self.end_final_round(vm);
        let stopped = match self.session.take() {
            Some(s) if s.failed => {
                s.device.post_stop();
                Ok(())
            }
            Some(mut s) => s.request(Command::Stop),
            None => Ok(()),
        };
        disarmed.and(stopped)
    }
}

/// For the tests (`vmm/tests/guest_ldt.rs`, which run on release builds
/// too): `LDT_VMM_TEST_NO_FINAL_KVM_LOG=1` leaves KVM's log off in the
/// final round, to show that a migration then misses the writes between
/// the guest's last harvest and the pause. Unsound on purpose, so it says
/// so on stderr whenever it takes effect.
fn final_kvm_log_disabled_for_test() -> bool {
    let off = std::env::var_os("LDT_VMM_TEST_NO_FINAL_KVM_LOG").is_some();
    if off {
        eprintln!(
            "ldt-vmm: LDT_VMM_TEST_NO_FINAL_KVM_LOG is set: the final round runs without \
             KVM's log and may miss writes (a test switch)"
        );
    }
    off
}

/// For the tests: `LDT_VMM_TEST_FINAL_GAP_MS=N` waits N ms between the
/// guest's last harvest and the pause, so that the guest surely writes in
/// that interval (costs downtime only, never soundness).
pub fn final_gap_for_test() -> Option<Duration> {
    let ms = std::env::var("LDT_VMM_TEST_FINAL_GAP_MS").ok()?;
    ms.parse().ok().map(Duration::from_millis)
}

/// KVM's paravirtual MSRs that register guest memory KVM writes by itself
/// (the guest kernel never sees those writes), with the size of the area.
pub const KVM_MSR_AREAS: &[(u32, &str, u64)] = &[
    (0x4b56_4d01, "MSR_KVM_SYSTEM_TIME_NEW", 32),
    (0x12, "MSR_KVM_SYSTEM_TIME", 32),
    (0x4b56_4d00, "MSR_KVM_WALL_CLOCK_NEW", 12),
    (0x11, "MSR_KVM_WALL_CLOCK", 12),
    (0x4b56_4d03, "MSR_KVM_STEAL_TIME", 64),
    (0x4b56_4d04, "MSR_KVM_PV_EOI_EN", 4),
    (0x4b56_4d02, "MSR_KVM_ASYNC_PF_EN", 64),
];

/// The guest pages of the area an MSR value registers, if it is enabled.
/// Bit 0 is the enable bit of all but the wall clock (whose MSR is just
/// the address, 0 meaning none); the low bits below the area's alignment
/// are flags.
pub fn msr_area_pages(index: u32, value: u64) -> Vec<u64> {
    let Some(&(_, _, size)) = KVM_MSR_AREAS.iter().find(|a| a.0 == index) else {
        return Vec::new();
    };
    let wall_clock = matches!(index, 0x11 | 0x4b56_4d00);
    if value == 0 || (!wall_clock && value & 1 == 0) {
        return Vec::new();
    }
    let flags = match index {
        0x4b56_4d03 | 0x4b56_4d02 => 0x3f,
        0x4b56_4d04 => 0x3,
        _ => 0x1,
    };
    let gpa = value & !flags;
    let first = gpa / PAGE_SIZE;
    let last = (gpa + size - 1) / PAGE_SIZE;
    (first..=last).map(|p| p * PAGE_SIZE).collect()
}

/// The pages of every KVM-written area the vCPUs registered (KVM_GET_MSRS;
/// MSRs this KVM does not know are skipped). The vCPUs must not run.
pub fn kvm_msr_area_pages(vcpus: &[&VcpuFd]) -> Result<Vec<u64>, DirtyError> {
    let mut pages = Vec::new();
    for fd in vcpus {
        for &(index, _, _) in KVM_MSR_AREAS {
            let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
                index,
                ..Default::default()
            }])
            .expect("one MSR fits");
            let n = fd.get_msrs(&mut msrs).map_err(|e| {
                DirtyError::Ioctl("KVM_GET_MSRS", vmm_sys_util::errno::Error::new(e.errno()))
            })?;
            if n == 1 {
                pages.extend(msr_area_pages(index, msrs.as_slice()[0].data));
            }
        }
    }
    pages.sort_unstable();
    pages.dedup();
    Ok(pages)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msr_areas_count_only_when_enabled_and_cover_every_page_they_touch() {
        assert!(msr_area_pages(0x4b56_4d01, 0x5000).is_empty(), "disabled");
        assert_eq!(msr_area_pages(0x4b56_4d01, 0x5001), vec![0x5000]);
        // A 32-byte kvmclock area straddling a page boundary: both pages.
        assert_eq!(msr_area_pages(0x4b56_4d01, 0x5ff1), vec![0x5000, 0x6000]);
        // Steal time and async PF keep flags in their low 6 bits.
        assert_eq!(msr_area_pages(0x4b56_4d03, 0x7_0001), vec![0x7_0000]);
        assert_eq!(msr_area_pages(0x4b56_4d02, 0x8_0007), vec![0x8_0000]);
        assert_eq!(msr_area_pages(0x4b56_4d04, 0x9_0ffd), vec![0x9_0000]);
        // The wall clock MSR is a plain address.
        assert_eq!(msr_area_pages(0x4b56_4d00, 0xa_0010), vec![0xa_0000]);
        assert!(msr_area_pages(0x4b56_4d00, 0).is_empty());
        assert!(msr_area_pages(0x1234, 0x5001).is_empty(), "not an area MSR");
    }
}
