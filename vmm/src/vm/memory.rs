//! Guest RAM (vm-memory with a dirty bitmap of the VMM's own writes) and the
//! KVM memslots that map it.

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

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
    fn slots_cover_every_region() {
        let mem = create(64 << 20).unwrap();
        let s = slots(&mem);
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].slot, s[0].guest_addr, s[0].size), (0, 0, 64 << 20));
        assert_eq!(s[0].pages(), (64 << 20) / 4096);
        assert_eq!(s[0].kvm_region(true).flags, KVM_MEM_LOG_DIRTY_PAGES);
    }
}
