//! `kvm-bitmap`: `KVM_GET_DIRTY_LOG`, which returns a slot's bitmap and
//! write-protects its pages again in one call (Firecracker, Cloud Hypervisor).

use kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2;

use super::kvm_ioctls_ext::{check_vm_extension, enable_vm_cap};
use super::{DirtyBitmap, DirtyError, DirtySource, DirtySourceKind};
use crate::vm::Vm;

pub struct KvmBitmap;

impl KvmBitmap {
    pub fn new() -> Self {
        KvmBitmap
    }
}

impl Default for KvmBitmap {
    fn default() -> Self {
        Self::new()
    }
}

/// `KVM_GET_DIRTY_LOG` of every slot of `vm`.
pub(super) fn get_dirty_logs(vm: &Vm) -> Result<DirtyBitmap, DirtyError> {
    let mut dirty = DirtyBitmap::empty(&vm.slots);
    for (i, slot) in vm.slots.iter().enumerate() {
        let words = vm
            .fd
            .get_dirty_log(slot.slot, slot.size as usize)
            .map_err(|e| {
                DirtyError::Ioctl(
                    "KVM_GET_DIRTY_LOG",
                    vmm_sys_util::errno::Error::new(e.errno()),
                )
            })?;
        dirty.or_words(i, &words);
    }
    Ok(dirty)
}

impl DirtySource for KvmBitmap {
    fn kind(&self) -> DirtySourceKind {
        DirtySourceKind::KvmBitmap
    }

    fn start(&mut self, vm: &Vm) -> Result<(), DirtyError> {
        // kvm-clear and host-ldt leave manual protection on for the VM;
        // KVM_GET_DIRTY_LOG then neither clears the log nor write-protects
        // (every page ever written is reported every round): KVM's default.
        if check_vm_extension(&vm.fd, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) != 0 {
            enable_vm_cap(&vm.fd, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 0).map_err(|e| {
                DirtyError::Ioctl("KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2, 0)", e)
            })?;
        }
        vm.set_dirty_logging(true)?;
        Ok(())
    }

    fn harvest_guest_writes(&mut self, vm: &Vm) -> Result<DirtyBitmap, DirtyError> {
        get_dirty_logs(vm)
    }

    fn stop(&mut self, vm: &Vm) -> Result<(), DirtyError> {
        vm.set_dirty_logging(false)?;
        Ok(())
    }
}
