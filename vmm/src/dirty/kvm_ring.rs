//! `kvm-ring`: KVM's dirty ring. Each vCPU has a ring of (slot, page)
//! entries KVM pushes as the guest first writes a page; the VMM marks
//! entries harvested and calls `KVM_RESET_DIRTY_RINGS` to re-protect them.
//! A full ring stops its vCPU with `KVM_EXIT_DIRTY_RING_FULL`; the vCPU
//! thread then drains all rings through [`RingCollector`] and resumes.

use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_dirty_gfn, KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
    KVM_DIRTY_LOG_PAGE_OFFSET,
};
use kvm_ioctls::{VcpuFd, VmFd};

use super::kvm_ioctls_ext::{check_vm_extension, enable_vm_cap, reset_dirty_rings};
use super::{DirtyBitmap, DirtyError, DirtySource, DirtySourceKind};
use crate::vm::vcpu::DirtyRingFull;
use crate::vm::{MemorySlot, Vm};

const KVM_DIRTY_GFN_F_DIRTY: u32 = 1;
const KVM_DIRTY_GFN_F_RESET: u32 = 2;
/// Smallest ring KVM accepts: one page of 16-byte entries.
pub const MIN_RING_ENTRIES: u32 = 256;

/// Enables the dirty ring on `vm` with `entries` entries per vCPU. Must run
/// before any vCPU exists.
pub fn enable(vm: &VmFd, entries: u32) -> Result<(), DirtyError> {
    // KVM wants a power-of-two ring of at least one page (256 entries).
    if !entries.is_power_of_two() || entries < MIN_RING_ENTRIES {
        return Err(DirtyError::Config(format!(
            "dirty ring size must be a power of two >= {MIN_RING_ENTRIES} entries (got {entries})"
        )));
    }
    let bytes = entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
    let cap = if check_vm_extension(vm, KVM_CAP_DIRTY_LOG_RING_ACQ_REL) > 0 {
        KVM_CAP_DIRTY_LOG_RING_ACQ_REL
    } else {
        KVM_CAP_DIRTY_LOG_RING
    };
    let max = check_vm_extension(vm, cap);
    if max <= 0 {
        return Err(DirtyError::Unsupported("KVM_CAP_DIRTY_LOG_RING"));
    }
    if bytes > max as usize {
        return Err(DirtyError::Config(format!(
            "dirty ring of {entries} entries ({bytes} bytes) exceeds KVM's maximum of {max} bytes"
        )));
    }
    enable_vm_cap(vm, cap, bytes as u64)
        .map_err(|e| DirtyError::Ioctl("KVM_ENABLE_CAP(DIRTY_LOG_RING)", e))
}

/// One vCPU's ring, mapped from its vCPU fd.
struct Ring {
    entries: NonNull<kvm_dirty_gfn>,
    len: u32,
    /// Next entry to look at (free-running; KVM indexes modulo `len`).
    fetch: u32,
}

// SAFETY: the mapping is shared memory KVM writes concurrently; every access
// to an entry's `flags` goes through an atomic, and `Ring` is only used
// behind the collector's mutex.
unsafe impl Send for Ring {}

impl Ring {
    fn map(vcpu: &VcpuFd, len: u32) -> Result<Ring, DirtyError> {
        // SAFETY: sysconf has no memory-safety preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as i64;
        let bytes = len as usize * std::mem::size_of::<kvm_dirty_gfn>();
        // SAFETY: maps the vCPU's dirty-ring pages at the offset KVM defines;
        // the result is checked before use and unmapped in Drop. The mapping
        // keeps the vCPU file alive even if its fd is closed first.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                KVM_DIRTY_LOG_PAGE_OFFSET as i64 * page,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(DirtyError::Ioctl(
                "mmap(dirty ring)",
                vmm_sys_util::errno::Error::last(),
            ));
        }
        Ok(Ring {
            entries: NonNull::new(addr.cast()).expect("mmap returned a non-null address"),
            len,
            fetch: 0,
        })
    }

    /// Moves every published entry into `dirty` and marks it for reset.
    fn drain(&mut self, dirty: &mut DirtyBitmap) -> u64 {
        let mut n = 0;
        loop {
            // SAFETY: `fetch % len` is inside the mapping of `len` entries.
            let e = unsafe { self.entries.as_ptr().add((self.fetch % self.len) as usize) };
            // SAFETY: `flags` is a naturally aligned u32 in shared memory that
            // KVM publishes with release semantics.
            let flags = unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*e).flags)) };
            if flags.load(Ordering::Acquire) & KVM_DIRTY_GFN_F_DIRTY == 0 {
                return n;
            }
            // SAFETY: the entry is published (DIRTY seen with acquire).
            let (slot, offset) = unsafe { ((*e).slot, (*e).offset) };
            // Address space in the upper 16 bits; the VMM uses only 0.
            dirty.set_slot_page(slot & 0xffff, offset);
            flags.store(KVM_DIRTY_GFN_F_RESET, Ordering::Release);
            self.fetch = self.fetch.wrapping_add(1);
            n += 1;
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        let bytes = self.len as usize * std::mem::size_of::<kvm_dirty_gfn>();
        // SAFETY: unmaps exactly the mapping made in `map`.
        unsafe { libc::munmap(self.entries.as_ptr().cast(), bytes) };
    }
}

struct CollectorState {
    rings: Vec<Ring>,
    /// Pages drained but not yet handed out by a harvest.
    pending: DirtyBitmap,
    entries_total: u64,
    full_exits: u64,
}

/// All vCPU rings of a VM, drained by harvests and by ring-full exits.
pub struct RingCollector {
    vm: Arc<VmFd>,
    slots: Vec<MemorySlot>,
    entries: u32,
    state: Mutex<CollectorState>,
}

impl RingCollector {
    pub fn new(vm: Arc<VmFd>, slots: &[MemorySlot], entries: u32) -> Self {
        RingCollector {
            vm,
            slots: slots.to_vec(),
            entries,
            state: Mutex::new(CollectorState {
                rings: Vec::new(),
                pending: DirtyBitmap::empty(slots),
                entries_total: 0,
                full_exits: 0,
            }),
        }
    }

    /// Maps the ring of a newly created vCPU (in vCPU id order).
    pub fn attach(&self, vcpu: &VcpuFd) -> Result<(), DirtyError> {
        let ring = Ring::map(vcpu, self.entries)?;
        self.state.lock().unwrap().rings.push(ring);
        Ok(())
    }

    /// Drains every ring in vCPU order, then resets them in KVM.
    pub fn collect(&self) -> Result<(), DirtyError> {
        let mut st = self.state.lock().unwrap();
        let CollectorState {
            rings,
            pending,
            entries_total,
            ..
        } = &mut *st;
        let mut n = 0;
        for r in rings.iter_mut() {
            n += r.drain(pending);
        }
        *entries_total += n;
        if n > 0 {
            reset_dirty_rings(&self.vm)
                .map_err(|e| DirtyError::Ioctl("KVM_RESET_DIRTY_RINGS", e))?;
        }
        Ok(())
    }

    /// Collects, then hands out everything pending.
    fn take(&self) -> Result<DirtyBitmap, DirtyError> {
        self.collect()?;
        let mut st = self.state.lock().unwrap();
        Ok(std::mem::replace(
            &mut st.pending,
            DirtyBitmap::empty(&self.slots),
        ))
    }

    /// Ring entries drained so far.
    pub fn entries_total(&self) -> u64 {
        self.state.lock().unwrap().entries_total
    }

    /// `KVM_EXIT_DIRTY_RING_FULL` exits handled so far.
    pub fn full_exits(&self) -> u64 {
        self.state.lock().unwrap().full_exits
    }
}

impl DirtyRingFull for RingCollector {
    fn ring_full(&self) -> Result<(), String> {
        self.state.lock().unwrap().full_exits += 1;
        self.collect().map_err(|e| e.to_string())
    }
}

pub struct KvmRing {
    collector: Arc<RingCollector>,
}

impl KvmRing {
    pub fn new(collector: Arc<RingCollector>) -> Self {
        KvmRing { collector }
    }
}

impl DirtySource for KvmRing {
    fn kind(&self) -> DirtySourceKind {
        DirtySourceKind::KvmRing
    }

    fn start(&mut self, vm: &Vm) -> Result<(), DirtyError> {
        // Anything left from an earlier session is stale; drop it before
        // logging starts so nothing written after `start` is lost.
        self.collector.take()?;
        vm.set_dirty_logging(true)?;
        Ok(())
    }

    fn harvest_guest_writes(&mut self, _vm: &Vm) -> Result<DirtyBitmap, DirtyError> {
        self.collector.take()
    }

    fn stop(&mut self, vm: &Vm) -> Result<(), DirtyError> {
        vm.set_dirty_logging(false)?;
        self.collector.take()?;
        Ok(())
    }
}
