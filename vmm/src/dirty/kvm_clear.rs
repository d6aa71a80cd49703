//! `kvm-clear`: manual dirty-log protection (QEMU's way). `KVM_GET_DIRTY_LOG`
//! only reads the bitmap; pages are re-protected by `KVM_CLEAR_DIRTY_LOG` in
//! chunks, so a huge slot is never write-protected all at once. With
//! `KVM_DIRTY_LOG_INITIALLY_SET`, enabling logging protects nothing up front.

use kvm_bindings::{
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_INITIALLY_SET,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
};

use super::kvm_bitmap::get_dirty_logs;
use super::kvm_ioctls_ext::{check_vm_extension, clear_dirty_log, enable_vm_cap};
use super::{DirtyBitmap, DirtyError, DirtyOptions, DirtySource, DirtySourceKind};
use crate::vm::Vm;

pub struct KvmClear {
    chunk_pages: u64,
    initially_set: bool,
}

impl KvmClear {
    pub fn new(options: DirtyOptions) -> Result<Self, DirtyError> {
        let c = options.clear_chunk_pages;
        if c == 0 || !c.is_multiple_of(64) || c > u32::MAX as u64 {
            return Err(DirtyError::Config(format!(
                "kvm-clear chunk must be a non-zero multiple of 64 pages (got {c})"
            )));
        }
        Ok(KvmClear {
            chunk_pages: c,
            initially_set: options.initially_set,
        })
    }
}

impl DirtySource for KvmClear {
    fn kind(&self) -> DirtySourceKind {
        DirtySourceKind::KvmClear
    }

    fn start(&mut self, vm: &Vm) -> Result<(), DirtyError> {
        let supported = check_vm_extension(&vm.fd, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) as u32;
        let mut flags = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE;
        if self.initially_set {
            flags |= KVM_DIRTY_LOG_INITIALLY_SET;
        }
        if supported & flags != flags {
            return Err(DirtyError::Unsupported(
                "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 with these flags",
            ));
        }
        // Must precede enabling logging: INITIALLY_SET takes effect when a
        // slot gets KVM_MEM_LOG_DIRTY_PAGES.
        enable_vm_cap(&vm.fd, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, flags as u64)
            .map_err(|e| DirtyError::Ioctl("KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)", e))?;
        vm.set_dirty_logging(true)?;
        Ok(())
    }

    fn harvest_guest_writes(&mut self, vm: &Vm) -> Result<DirtyBitmap, DirtyError> {
        let mut dirty = get_dirty_logs(vm)?;
        for s in &mut dirty.slots {
            let mut first = 0u64;
            while first < s.pages {
                let n = self.chunk_pages.min(s.pages - first);
                let w0 = (first / 64) as usize;
                let w1 = (first + n).div_ceil(64) as usize;
                // Only chunks with dirty pages need clearing.
                if s.words[w0..w1].iter().any(|w| *w != 0) {
                    let mut chunk = s.words[w0..w1].to_vec();
                    clear_dirty_log(&vm.fd, s.slot, first, n as u32, &mut chunk)
                        .map_err(|e| DirtyError::Ioctl("KVM_CLEAR_DIRTY_LOG", e))?;
                }
                first += n;
            }
        }
        Ok(dirty)
    }

    fn stop(&mut self, vm: &Vm) -> Result<(), DirtyError> {
        vm.set_dirty_logging(false)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_must_be_a_multiple_of_64_pages() {
        let o = |c| DirtyOptions {
            clear_chunk_pages: c,
            ..Default::default()
        };
        assert!(KvmClear::new(o(0)).is_err());
        assert!(KvmClear::new(o(100)).is_err());
        assert!(KvmClear::new(o(128)).is_ok());
    }
}
