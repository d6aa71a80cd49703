//! KVM objects: the VM with its memory slots and in-kernel irqchip, and vCPUs.

pub mod fault_scan;
pub mod kvm_stats;
pub mod memory;
pub mod prefault;
pub mod state;
pub mod vcpu;

use std::sync::Arc;

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};

use crate::arch::layout;
use crate::devices::ldt_pv::LdtPv;
pub use memory::{GuestMemory, MemBacking, MemorySlot};

/// Errors creating or configuring the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(kvm_ioctls::Error),
    #[error("KVM API version {0} is not supported (need 12)")]
    ApiVersion(i32),
    #[error("{0} failed: {1}")]
    Ioctl(&'static str, kvm_ioctls::Error),
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
}

/// A VM: the KVM handles, guest memory and its memslots.
pub struct Vm {
    pub kvm: Kvm,
    pub fd: Arc<VmFd>,
    pub memory: GuestMemory,
    /// What backs `memory` on this host.
    pub backing: MemBacking,
    pub slots: Vec<MemorySlot>,
    /// The ldt-pv device (`run --ldt-pv`): its bitmap is a memslot of its
    /// own, not in `slots`, so no dirty source, migration or digest sees it.
    pub ldt_pv: Option<Arc<LdtPv>>,
}

impl Vm {
    /// Creates a VM with `mem_size` bytes of RAM, an in-kernel irqchip
    /// (PIC, IOAPIC, LAPICs) and PIT, memory backed as `backing` says.
    pub fn new(mem_size: u64, backing: MemBacking) -> Result<Vm, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let api = kvm.get_api_version();
        if api != 12 {
            return Err(VmError::ApiVersion(api));
        }
        let fd = kvm
            .create_vm()
            .map_err(|e| VmError::Ioctl("KVM_CREATE_VM", e))?;
        fd.set_tss_address(layout::KVM_TSS_ADDR as usize)
            .map_err(|e| VmError::Ioctl("KVM_SET_TSS_ADDR", e))?;
        fd.create_irq_chip()
            .map_err(|e| VmError::Ioctl("KVM_CREATE_IRQCHIP", e))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit)
            .map_err(|e| VmError::Ioctl("KVM_CREATE_PIT2", e))?;
        let memory = memory::create(mem_size, backing)?;
        let slots = memory::slots(&memory);
        let vm = Vm {
            kvm,
            fd: Arc::new(fd),
            memory,
            backing,
            slots,
            ldt_pv: None,
        };
        vm.set_dirty_logging(false)?;
        Ok(vm)
    }

    /// RAM size in bytes.
    pub fn mem_size(&self) -> u64 {
        self.slots.iter().map(|s| s.size).sum()
    }

    /// (Re-)registers every memslot, with `KVM_MEM_LOG_DIRTY_PAGES` when
    /// `enabled`. KVM starts or stops write-tracking the slot accordingly.
    pub fn set_dirty_logging(&self, enabled: bool) -> Result<(), VmError> {
        for slot in &self.slots {
            let region = slot.kvm_region(enabled);
            // SAFETY: the region describes memory owned by `self.memory`,
            // which lives as long as the VM fd that maps it.
            unsafe { self.fd.set_user_memory_region(region) }
                .map_err(|e| VmError::Ioctl("KVM_SET_USER_MEMORY_REGION", e))?;
        }
        Ok(())
    }
}
