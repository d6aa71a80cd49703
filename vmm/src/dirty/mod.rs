//! Dirty-page sources: who tells the VMM which guest pages changed.
//!
//! Every source reports, per memslot, a bitmap of 4 KiB pages written since
//! the previous harvest, OR'ed with the pages the VMM itself wrote through
//! vm-memory (its `AtomicBitmap`). The invariant every source is tested for:
//! it never misses a write. Extra pages (false positives) are allowed and
//! counted by the tests and benchmarks.

pub mod bitmap;
pub mod guest_ldt;
pub mod host_ldt;
pub mod kvm_bitmap;
pub mod kvm_clear;
pub mod kvm_ioctls_ext;
pub mod kvm_ring;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestMemoryBackend, GuestRegionMmap, MmapRegion};

pub use bitmap::DirtyBitmap;

use crate::vm::{Vm, VmError};

/// The dirty sources a user can choose.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum DirtySourceKind {
    /// `KVM_GET_DIRTY_LOG`: fetch and re-protect the whole bitmap at once.
    KvmBitmap,
    /// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` + chunked `KVM_CLEAR_DIRTY_LOG`.
    KvmClear,
    /// `KVM_CAP_DIRTY_LOG_RING`: per-vCPU rings of dirty GFNs.
    KvmRing,
    /// The ldt_kvm host module: TDP (NPT/EPT) dirty bits, no write faults.
    HostLdt,
    /// The guest kernel's own record, through the ldt-pv device (`run --ldt-pv`).
    GuestLdt,
}

impl DirtySourceKind {
    /// The sources every KVM offers.
    pub const KVM: [DirtySourceKind; 3] = [
        DirtySourceKind::KvmBitmap,
        DirtySourceKind::KvmClear,
        DirtySourceKind::KvmRing,
    ];

    /// The sources this host can use now (host-ldt needs its module).
    pub fn available() -> Vec<DirtySourceKind> {
        let mut v = Self::KVM.to_vec();
        if host_ldt::available() {
            v.push(DirtySourceKind::HostLdt);
        }
        v
    }

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            DirtySourceKind::KvmBitmap => "kvm-bitmap",
            DirtySourceKind::KvmClear => "kvm-clear",
            DirtySourceKind::KvmRing => "kvm-ring",
            DirtySourceKind::HostLdt => "host-ldt",
            DirtySourceKind::GuestLdt => "guest-ldt",
        }
    }
}

impl std::fmt::Display for DirtySourceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Errors of a dirty source.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    #[error("{0} failed: {1}")]
    Ioctl(&'static str, vmm_sys_util::errno::Error),
    #[error("this KVM does not support {0}")]
    Unsupported(&'static str),
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    LdtPv(#[from] crate::devices::ldt_pv::LdtPvError),
}

/// A way of learning which guest pages were written.
///
/// Lifecycle: `start` once (enables tracking; everything written from then
/// on is reported), `harvest` any number of times (each returns the pages
/// written since the previous harvest and re-arms tracking), `stop` once.
pub trait DirtySource: Send {
    fn kind(&self) -> DirtySourceKind;

    /// Enables tracking on every memslot of `vm`.
    fn start(&mut self, vm: &Vm) -> Result<(), DirtyError>;

    /// Pages the guest wrote since the last harvest (or `start`), as KVM saw
    /// them. Does not include the VMM's own writes: see [`harvest`].
    fn harvest_guest_writes(&mut self, vm: &Vm) -> Result<DirtyBitmap, DirtyError>;

    /// Disables tracking.
    fn stop(&mut self, vm: &Vm) -> Result<(), DirtyError>;

    /// Whether a harvest needs the guest's vCPUs running (guest-ldt): its
    /// last harvest before a pause then comes first, with the vCPUs
    /// running, between `begin_final_round` and the pause, and
    /// `harvest_paused` covers the rest.
    fn needs_running_guest(&self) -> bool {
        false
    }

    /// Called while the guest runs, right before its last harvest before a
    /// pause: arms whatever covers the writes from then until the pause.
    fn begin_final_round(&mut self, _vm: &Vm) -> Result<(), DirtyError> {
        Ok(())
    }

    /// The harvest with every vCPU paused. For the KVM sources a plain
    /// harvest; guest-ldt returns KVM's log since `begin_final_round`.
    fn harvest_paused(&mut self, vm: &Vm) -> Result<DirtyBitmap, DirtyError> {
        self.harvest_guest_writes(vm)
    }

    /// With the vCPUs paused after the final harvest: the verdict of a
    /// never-miss audit, if the source runs one (guest-ldt with
    /// `run --ldt-pv-audit`), `exempt` being the pages KVM writes itself.
    /// An error when the audit found a miss.
    fn audit_verdict(
        &mut self,
        _exempt: &[u64],
    ) -> Result<Option<guest_ldt::GuestLdtAudit>, DirtyError> {
        Ok(None)
    }

    /// Disarms what `begin_final_round` armed (tracking goes on).
    fn end_final_round(&mut self, _vm: &Vm) -> Result<(), DirtyError> {
        Ok(())
    }

    /// `stop` for a VM whose vCPUs will not run here again (it migrated):
    /// nothing may wait for the guest.
    fn stop_paused(&mut self, vm: &Vm) -> Result<(), DirtyError> {
        self.stop(vm)
    }
}

/// One round: the guest's writes from `source` OR'ed with the VMM's own.
pub fn harvest(source: &mut dyn DirtySource, vm: &Vm) -> Result<DirtyBitmap, DirtyError> {
    let mut dirty = source.harvest_guest_writes(vm)?;
    or_vmm_writes(&mut dirty, vm);
    Ok(dirty)
}

/// `harvest` with every vCPU paused (`DirtySource::harvest_paused`).
pub fn harvest_paused(source: &mut dyn DirtySource, vm: &Vm) -> Result<DirtyBitmap, DirtyError> {
    let mut dirty = source.harvest_paused(vm)?;
    or_vmm_writes(&mut dirty, vm);
    Ok(dirty)
}

/// The bitmap of VMM writes of one memory region.
fn vmm_bitmap(region: &GuestRegionMmap<AtomicBitmap>) -> &AtomicBitmap {
    MmapRegion::bitmap(region)
}

/// Forgets the VMM's writes so far (tracking starts from now).
pub fn reset_vmm_writes(vm: &Vm) {
    for region in vm.memory.iter() {
        vmm_bitmap(region).reset();
    }
}

/// ORs (and resets) the vm-memory bitmap of writes made by the VMM.
pub fn or_vmm_writes(dirty: &mut DirtyBitmap, vm: &Vm) {
    for (i, region) in vm.memory.iter().enumerate() {
        let words = vmm_bitmap(region).get_and_reset();
        dirty.or_words(i, &words);
    }
}

/// Options of the KVM sources.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirtyOptions {
    /// kvm-clear: pages per `KVM_CLEAR_DIRTY_LOG` call (a multiple of 64).
    pub clear_chunk_pages: u64,
    /// kvm-clear: use `KVM_DIRTY_LOG_INITIALLY_SET`.
    pub initially_set: bool,
    /// kvm-ring: entries per vCPU ring (a power of two).
    pub ring_entries: u32,
}

impl Default for DirtyOptions {
    fn default() -> Self {
        DirtyOptions {
            // QEMU clears in 1 GiB chunks.
            clear_chunk_pages: (1 << 30) / 4096,
            initially_set: true,
            // QEMU's default dirty-ring size.
            ring_entries: 4096,
        }
    }
}

/// Creates the source `kind`. A `kvm-ring` source needs the ring enabled on
/// the VM before its vCPUs were created: pass the collector made then.
pub fn create(
    kind: DirtySourceKind,
    options: DirtyOptions,
    ring: Option<std::sync::Arc<kvm_ring::RingCollector>>,
) -> Result<Box<dyn DirtySource>, DirtyError> {
    Ok(match kind {
        DirtySourceKind::KvmBitmap => Box::new(kvm_bitmap::KvmBitmap::new()),
        DirtySourceKind::KvmClear => Box::new(kvm_clear::KvmClear::new(options)?),
        DirtySourceKind::HostLdt => Box::new(host_ldt::HostLdt::new()),
        DirtySourceKind::GuestLdt => Box::new(guest_ldt::GuestLdt::new(ring)),
        DirtySourceKind::KvmRing => Box::new(kvm_ring::KvmRing::new(ring.ok_or_else(|| {
            DirtyError::Config(
                "kvm-ring needs the dirty ring enabled before the vCPUs are created".into(),
            )
        })?)),
    })
}
