//! `host-ldt`: the host module `ldt_kvm` (kmod/) harvests the hardware dirty
//! bits of the VM's TDP (NPT/EPT) entries: no write-protection faults. The
//! structs and ioctl numbers mirror `kmod/uapi/ldt_kvm.h`.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;

use kvm_bindings::{
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_INITIALLY_SET,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
};
use vmm_sys_util::errno;
use vmm_sys_util::ioctl::{ioctl, ioctl_with_mut_ref};
use vmm_sys_util::{ioctl_io_nr, ioctl_iowr_nr};

use super::kvm_ioctls_ext::{check_vm_extension, clear_dirty_log, enable_vm_cap};
use super::{DirtyBitmap, DirtyError, DirtySource, DirtySourceKind};
use crate::vm::{MemBacking, Vm};

/// The module's character device.
pub const DEVICE: &str = "/dev/ldt-kvm";
/// The uapi version this VMM speaks.
pub const API_VERSION: u32 = 1;

const LDT_KVM_IOC_MAGIC: u32 = b'L' as u32;

/// `LDT_KVM_FEAT_CONSUME_KVM_LOG`: the module can take KVM's own dirty log.
const FEAT_CONSUME_KVM_LOG: u64 = 1 << 4;
/// `LDT_KVM_ATTACH_CONSUME_KVM_LOG`.
const ATTACH_CONSUME_KVM_LOG: u32 = 1 << 0;

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct LdtKvmVersion {
    pub size: u32,
    pub api_version: u32,
    pub features: u64,
    pub reserved: [u64; 6],
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct LdtKvmAttach {
    pub size: u32,
    pub vm_fd: i32,
    pub flags: u32,
    pub reserved0: u32,
    pub reserved: [u64; 6],
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct LdtKvmHarvest {
    pub size: u32,
    pub flags: u32,
    pub slot: u32,
    pub reserved0: u32,
    pub start: u64,
    pub num_pages: u64,
    pub bitmap: u64,
    pub bitmap_size: u64,
    pub dirty_pages: u64,
    pub reserved: [u64; 5],
}

// The sizes the header promises.
const _: () = {
    assert!(std::mem::size_of::<LdtKvmVersion>() == 64);
    assert!(std::mem::size_of::<LdtKvmAttach>() == 64);
    assert!(std::mem::size_of::<LdtKvmHarvest>() == 96);
};

ioctl_iowr_nr!(LDT_KVM_GET_VERSION, LDT_KVM_IOC_MAGIC, 0x80, LdtKvmVersion);
ioctl_iowr_nr!(LDT_KVM_ATTACH, LDT_KVM_IOC_MAGIC, 0x81, LdtKvmAttach);
ioctl_iowr_nr!(LDT_KVM_HARVEST, LDT_KVM_IOC_MAGIC, 0x82, LdtKvmHarvest);
ioctl_io_nr!(LDT_KVM_DETACH, LDT_KVM_IOC_MAGIC, 0x83);

fn check(ret: i32, what: &'static str) -> Result<i32, DirtyError> {
    if ret < 0 {
        Err(DirtyError::Ioctl(what, errno::Error::last()))
    } else {
        Ok(ret)
    }
}

/// Whether this host has the module loaded.
pub fn available() -> bool {
    std::path::Path::new(DEVICE).exists()
}

pub struct HostLdt {
    dev: Option<File>,
    /// KVM's dirty logging is on for the module (CONSUME_KVM_LOG).
    kvm_log: bool,
}

impl HostLdt {
    pub fn new() -> Self {
        HostLdt {
            dev: None,
            kvm_log: false,
        }
    }

    /// Hands KVM's dirty log of every slot to the module, so the writes KVM
    /// itself makes to guest memory (kvmclock, steal time, emulated
    /// instructions), which set no TDP dirty bit, are reported too. With
    /// manual protection and INITIALLY_SET, and nobody calling
    /// KVM_CLEAR_DIRTY_LOG, KVM never write-protects a page for it.
    fn enable_kvm_log(vm: &Vm) -> Result<bool, DirtyError> {
        let flags = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET;
        let supported = check_vm_extension(&vm.fd, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) as u32;
        if supported & flags != flags {
            return Ok(false);
        }
        enable_vm_cap(&vm.fd, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, flags as u64)
            .map_err(|e| DirtyError::Ioctl("KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)", e))?;
        vm.set_dirty_logging(true)?;
        Ok(true)
    }

    /// Makes KVM map guest memory with 4 KiB TDP entries. With INITIALLY_SET
    /// KVM leaves the 2 MiB entries that exist when logging starts, and the
    /// module reports each write under one as all 512 pages, every round
    /// (kmod/UAPI.md): on THP-backed memory host-ldt resent its working set
    /// whole each round and never converged (nested bench, 2026-12-02).
    /// One KVM_CLEAR_DIRTY_LOG of every page, before round 0 reads memory,
    /// splits them (eagerly) and write-protects the 4 KiB pages, which the
    /// module's attach makes writable again, clean, so no write faults for
    /// tracking; the bits it drops were all set by INITIALLY_SET (round 0
    /// sends all memory anyway). A huge mapping KVM could not split stays
    /// write-protected and is split at its first write.
    fn split_huge_mappings(vm: &Vm) -> Result<(), DirtyError> {
        // 1 GiB of pages a call (KVM wants multiples of 64 but at the end).
        const CHUNK: u64 = 1 << 18;
        for s in &vm.slots {
            let mut first = 0u64;
            while first < s.pages() {
                let n = CHUNK.min(s.pages() - first);
                let mut ones = vec![u64::MAX; n.div_ceil(64) as usize];
                clear_dirty_log(&vm.fd, s.slot, first, n as u32, &mut ones)
                    .map_err(|e| DirtyError::Ioctl("KVM_CLEAR_DIRTY_LOG", e))?;
                first += n;
            }
        }
        Ok(())
    }
}

/// Whether guest memory may be mapped with 2 MiB pages on this host: a huge
/// backing, or THP `always` for plain anonymous memory.
fn maybe_huge(backing: MemBacking) -> bool {
    backing != MemBacking::Anon
        || std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .is_ok_and(|m| m.contains("[always]"))
}

impl Default for HostLdt {
    fn default() -> Self {
        Self::new()
    }
}

impl DirtySource for HostLdt {
    fn kind(&self) -> DirtySourceKind {
        DirtySourceKind::HostLdt
    }

    fn start(&mut self, vm: &Vm) -> Result<(), DirtyError> {
        let dev = OpenOptions::new()
            .read(true)
            .write(true)
            .open(DEVICE)
            .map_err(|e| {
                DirtyError::Config(format!(
                    "host-ldt needs the ldt_kvm host module ({DEVICE}: {e}); see kmod/README.md"
                ))
            })?;
        let mut v = LdtKvmVersion {
            size: std::mem::size_of::<LdtKvmVersion>() as u32,
            ..Default::default()
        };
        // SAFETY: `v` is a live, correctly sized struct the module fills.
        check(
            unsafe { ioctl_with_mut_ref(&dev, LDT_KVM_GET_VERSION(), &mut v) },
            "LDT_KVM_GET_VERSION",
        )?;
        if v.api_version != API_VERSION {
            return Err(DirtyError::Config(format!(
                "ldt_kvm speaks API version {}, this VMM {API_VERSION}",
                v.api_version
            )));
        }
        let mut kvm_log = v.features & FEAT_CONSUME_KVM_LOG != 0 && Self::enable_kvm_log(vm)?;
        // Before the attach: KVM_CLEAR_DIRTY_LOG acts only on bits still set
        // in KVM's log, and the module takes them.
        if kvm_log && maybe_huge(vm.backing) {
            Self::split_huge_mappings(vm)?;
        }
        let attach = |flags: u32| {
            let mut a = LdtKvmAttach {
                size: std::mem::size_of::<LdtKvmAttach>() as u32,
                vm_fd: vm.fd.as_raw_fd(),
                flags,
                ..Default::default()
            };
            // SAFETY: as above; the module only reads `a`.
            check(
                unsafe { ioctl_with_mut_ref(&dev, LDT_KVM_ATTACH(), &mut a) },
                "LDT_KVM_ATTACH",
            )
        };
        if kvm_log && attach(ATTACH_CONSUME_KVM_LOG).is_err() {
            // The module refuses the KVM log of a VM with a dirty ring: fall
            // back to TDP dirty bits only.
            vm.set_dirty_logging(false)?;
            kvm_log = false;
        }
        if !kvm_log {
            attach(0)?;
        }
        self.dev = Some(dev);
        self.kvm_log = kvm_log;
        Ok(())
    }

    fn harvest_guest_writes(&mut self, vm: &Vm) -> Result<DirtyBitmap, DirtyError> {
        let dev = self
            .dev
            .as_ref()
            .ok_or_else(|| DirtyError::Config("host-ldt is not started".into()))?;
        let mut dirty = DirtyBitmap::empty(&vm.slots);
        for (i, slot) in vm.slots.iter().enumerate() {
            let mut words = vec![0u64; slot.pages().div_ceil(64) as usize];
            let mut h = LdtKvmHarvest {
                size: std::mem::size_of::<LdtKvmHarvest>() as u32,
                slot: slot.slot,
                start: 0,
                num_pages: slot.pages(),
                bitmap: words.as_mut_ptr() as u64,
                bitmap_size: (words.len() * 8) as u64,
                ..Default::default()
            };
            // SAFETY: `bitmap` points at `bitmap_size` writable bytes that
            // outlive the call.
            check(
                unsafe { ioctl_with_mut_ref(dev, LDT_KVM_HARVEST(), &mut h) },
                "LDT_KVM_HARVEST",
            )?;
            dirty.or_words(i, &words);
        }
        Ok(dirty)
    }

    fn stop(&mut self, vm: &Vm) -> Result<(), DirtyError> {
        if let Some(dev) = self.dev.take() {
            // SAFETY: DETACH takes no argument.
            check(unsafe { ioctl(&dev, LDT_KVM_DETACH()) }, "LDT_KVM_DETACH")?;
        }
        if std::mem::take(&mut self.kvm_log) {
            vm.set_dirty_logging(false)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_uapi_header() {
        // _IOWR('L', 0x80, 64 bytes) = 3 << 30 | 64 << 16 | 'L' << 8 | 0x80
        assert_eq!(LDT_KVM_GET_VERSION(), 0xc040_4c80);
        assert_eq!(LDT_KVM_ATTACH(), 0xc040_4c81);
        assert_eq!(LDT_KVM_HARVEST(), 0xc060_4c82);
        assert_eq!(LDT_KVM_DETACH(), 0x4c83);
    }
}
