//! The KVM dirty-log ioctls kvm-ioctls does not wrap.

use kvm_bindings::{kvm_clear_dirty_log, kvm_clear_dirty_log__bindgen_ty_1, kvm_enable_cap};
use kvm_ioctls::VmFd;
use vmm_sys_util::errno;
use vmm_sys_util::ioctl::{ioctl, ioctl_with_ref};
use vmm_sys_util::{ioctl_io_nr, ioctl_iowr_nr};

const KVMIO: u32 = 0xae;

ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);
ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);

/// `KVM_CLEAR_DIRTY_LOG`: clear (and re-protect) the pages set in `bitmap`,
/// which covers `num_pages` pages of `slot` starting at `first_page`
/// (a multiple of 64).
pub fn clear_dirty_log(
    vm: &VmFd,
    slot: u32,
    first_page: u64,
    num_pages: u32,
    bitmap: &mut [u64],
) -> errno::Result<()> {
    assert!(bitmap.len() as u64 * 64 >= num_pages as u64);
    let arg = kvm_clear_dirty_log {
        slot,
        num_pages,
        first_page,
        __bindgen_anon_1: kvm_clear_dirty_log__bindgen_ty_1 {
            dirty_bitmap: bitmap.as_mut_ptr().cast(),
        },
    };
    // SAFETY: `arg` points at a bitmap of at least `num_pages` bits that
    // outlives the call; KVM only reads it.
    let ret = unsafe { ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &arg) };
    if ret < 0 {
        return Err(errno::Error::last());
    }
    Ok(())
}

/// `KVM_RESET_DIRTY_RINGS`: re-protect every page whose ring entry was
/// marked harvested. Returns how many entries KVM reset.
pub fn reset_dirty_rings(vm: &VmFd) -> errno::Result<u32> {
    // SAFETY: the ioctl takes no argument and only touches KVM's own state.
    let ret = unsafe { ioctl(vm, KVM_RESET_DIRTY_RINGS()) };
    if ret < 0 {
        return Err(errno::Error::last());
    }
    Ok(ret as u32)
}

/// `KVM_ENABLE_CAP` on the VM with one argument.
pub fn enable_vm_cap(vm: &VmFd, cap: u32, arg0: u64) -> errno::Result<()> {
    let mut c = kvm_enable_cap {
        cap,
        ..Default::default()
    };
    c.args[0] = arg0;
    vm.enable_cap(&c).map_err(|e| errno::Error::new(e.errno()))
}

/// `KVM_CHECK_EXTENSION` on the VM for a capability number kvm-ioctls may
/// not name.
pub fn check_vm_extension(vm: &VmFd, cap: u32) -> i32 {
    vm.check_extension_raw(cap as libc::c_ulong)
}
