//! Guest RAM (vm-memory with a dirty bitmap of the VMM's own writes) and the
//! KVM memslots that map it.

use std::sync::atomic::{AtomicU64, Ordering};

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap, GuestMemoryRegion,
};

use crate::arch::layout;

/// Guest memory whose regions record every write made through vm-memory
/// (by the VMM and its devices) in an `AtomicBitmap`.
pub type GuestMemory = GuestMemoryMmap<AtomicBitmap>;

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory size must be a non-zero multiple of 2 MiB (got {0} bytes)")]
    BadSize(u64),
    #[error("cannot map {0} bytes of guest memory: {1}")]
    Mmap(u64, vm_memory::mmap::FromRangesError),
    #[error(
        "{size_mib} MiB of guest memory is more than this host can back: {limit_mib} MiB \
         ({phys_mib} MiB of RAM + {overcommit}% overcommit, see --mem-overcommit)"
    )]
    HostCannotBack {
        size_mib: u64,
        limit_mib: u64,
        phys_mib: u64,
        overcommit: u64,
    },
}

/// Guest RAM allowed beyond this host's physical memory, in percent of it
/// (`run --mem-overcommit`). Process-wide: it is the operator's policy for
/// every VM this process builds, booted, restored or received.
static OVERCOMMIT_PERCENT: AtomicU64 = AtomicU64::new(0);

/// Sets the overcommit allowed by `check_host_can_back`.
pub fn set_overcommit_percent(percent: u64) {
    OVERCOMMIT_PERCENT.store(percent, Ordering::Relaxed);
}

/// This host's physical memory in bytes.
fn physical_memory() -> u64 {
    // SAFETY: sysconf only reads system constants.
    let (pages, page) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    (pages.max(0) as u64).saturating_mul(page.max(0) as u64)
}

/// Refuses a guest larger than physical memory plus the overcommit: the
/// size comes from `--mem` or from a peer's Hello, and guest RAM is mapped
/// with MAP_NORESERVE, so nothing else would stop a size the host cannot
/// back (until the guest or a zero-filling peer touches it). Called before
/// KVM or the VMM allocates anything for the VM.
pub fn check_host_can_back(mem_size: u64) -> Result<(), MemoryError> {
    let phys = physical_memory();
    let overcommit = OVERCOMMIT_PERCENT.load(Ordering::Relaxed);
    let limit = (phys as u128 * (100 + overcommit as u128) / 100).min(u64::MAX as u128) as u64;
    if mem_size > limit {
        return Err(MemoryError::HostCannotBack {
            size_mib: mem_size >> 20,
            limit_mib: limit >> 20,
            phys_mib: phys >> 20,
            overcommit,
        });
    }
    Ok(())
}

/// Makes `len` bytes of guest memory from `gpa` read as zero without reading
/// or writing them: the pages go back to the kernel, so a range that is zero
/// already costs nothing however large it is, and a page that was not
/// becomes the shared zero page again (KVM's MMU notifier unmaps it from the
/// guest). The range must lie within one region.
pub fn discard(memory: &GuestMemory, gpa: u64, len: u64) -> Result<(), GuestMemoryError> {
    let slice = memory.get_slice(GuestAddress(gpa), len as usize)?;
    let guard = slice.ptr_guard_mut();
    // SAFETY: the slice is `len` bytes of a private anonymous mapping owned
    // by `memory` (vm-memory's `MmapRegion::new`); MADV_DONTNEED only makes
    // those bytes read as zero from now on, which is what the caller asks.
    let rc = unsafe { libc::madvise(guard.as_ptr().cast(), len as usize, libc::MADV_DONTNEED) };
    if rc != 0 {
        return Err(GuestMemoryError::IOError(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// One KVM memslot: a contiguous range of guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemorySlot {
    pub slot: u32,
    pub guest_addr: u64,
    pub size: u64,
    pub host_addr: u64,
}

impl MemorySlot {
    /// Number of 4 KiB pages in the slot.
    pub fn pages(&self) -> u64 {
        self.size / layout::PAGE_SIZE
    }

    /// The region to hand to `KVM_SET_USER_MEMORY_REGION`.
    pub fn kvm_region(&self, log_dirty: bool) -> kvm_userspace_memory_region {
        kvm_userspace_memory_region {
            slot: self.slot,
            flags: if log_dirty {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: self.guest_addr,
            memory_size: self.size,
            userspace_addr: self.host_addr,
        }
    }
}

/// Maps `mem_size` bytes of anonymous guest RAM around the MMIO hole.
pub fn create(mem_size: u64) -> Result<GuestMemory, MemoryError> {
    if mem_size == 0 || !mem_size.is_multiple_of(2 << 20) {
        return Err(MemoryError::BadSize(mem_size));
    }
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_ranges(mem_size)
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect();
    GuestMemory::from_ranges(&ranges).map_err(|e| MemoryError::Mmap(mem_size, e))
}

/// One memslot per guest memory region, numbered from 0.
pub fn slots(memory: &GuestMemory) -> Vec<MemorySlot> {
    memory
        .iter()
        .enumerate()
        .map(|(i, r)| MemorySlot {
            slot: i as u32,
            guest_addr: r.start_addr().0,
            size: r.len(),
            host_addr: memory
                .get_host_address(r.start_addr())
                .expect("region start is mapped") as u64,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn rejects_sizes_kvm_cannot_map() {
        assert!(matches!(create(0), Err(MemoryError::BadSize(0))));
        assert!(matches!(create(4097), Err(MemoryError::BadSize(4097))));
    }

    #[test]
    fn vmm_writes_are_recorded_in_the_region_bitmap() {
        let mem = create(8 << 20).unwrap();
        mem.write_obj(0xabu8, GuestAddress(0x5000)).unwrap();
        let region = mem.iter().next().unwrap();
        let bits = vm_memory::MmapRegion::bitmap(region).get_and_reset();
        assert_eq!(bits[0], 1 << 5);
        assert!(bits[1..].iter().all(|w| *w == 0));
        assert!(vm_memory::MmapRegion::bitmap(region)
            .get_and_reset()
            .iter()
            .all(|w| *w == 0));
    }

    #[test]
    fn a_guest_larger_than_the_host_is_refused_unless_overcommitted() {
        let phys = physical_memory();
        assert!(phys > 0);
        assert!(check_host_can_back(phys).is_ok());
        let twice = (phys * 2).next_multiple_of(2 << 20);
        let e = check_host_can_back(twice).unwrap_err().to_string();
        assert!(e.contains("more than this host can back"), "{e}");
        set_overcommit_percent(150);
        assert!(check_host_can_back(twice).is_ok());
        set_overcommit_percent(0);
    }

    #[test]
    fn discarding_zeroes_exactly_the_range() {
        let mem = create(64 << 20).unwrap();
        mem.write_slice(&[0x5a; 8192], GuestAddress(0x10_0000))
            .unwrap();
        discard(&mem, 0x10_0000, 4096).unwrap();
        let mut page = [0xffu8; 8192];
        mem.read_slice(&mut page, GuestAddress(0x10_0000)).unwrap();
        assert!(
            page[..4096].iter().all(|b| *b == 0),
            "discarded page reads zero"
        );
        assert!(
            page[4096..].iter().all(|b| *b == 0x5a),
            "the next page is kept"
        );
        assert!(discard(&mem, 63 << 20, 2 << 20).is_err(), "beyond RAM");
    }

    #[test]
    fn slots_cover_every_region() {
        let mem = create(64 << 20).unwrap();
        let s = slots(&mem);
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].slot, s[0].guest_addr, s[0].size), (0, 0, 64 << 20));
        assert_eq!(s[0].pages(), (64 << 20) / 4096);
        assert_eq!(s[0].kvm_region(true).flags, KVM_MEM_LOG_DIRTY_PAGES);
    }
}
