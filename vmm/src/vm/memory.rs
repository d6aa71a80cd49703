//! Guest RAM (vm-memory with a dirty bitmap of the VMM's own writes) and the
//! KVM memslots that map it, backed by 4 KiB anonymous pages, transparent
//! huge pages or hugetlbfs (`--mem-backing`).

use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use serde::{Deserialize, Serialize};
use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
use vm_memory::mmap::{FromRangesError, MmapRegionBuilder};
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

use crate::arch::layout::{self, PAGE_SIZE};

/// The huge page size both huge backings use (x86-64 PMD).
pub const HUGE_PAGE_SIZE: u64 = 2 << 20;

/// Where this host's 2 MiB hugetlbfs pool is counted.
const HUGETLB_SYSFS: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB";
const THP_ENABLED: &str = "/sys/kernel/mm/transparent_hugepage/enabled";

/// What backs guest RAM. A property of this host, chosen on each side's
/// command line: never sent in a migration stream or snapshot, so a guest
/// may move between backings.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum MemBacking {
    /// Private anonymous memory (4 KiB pages unless THP is `always`).
    #[default]
    Anon,
    /// Private anonymous memory on 2 MiB boundaries with `MADV_HUGEPAGE`.
    Thp,
    /// 2 MiB hugetlbfs pages (`MAP_HUGETLB | MAP_HUGE_2MB`), reserved
    /// from the host's pool when mapped.
    Hugetlbfs,
}

impl MemBacking {
    pub fn name(self) -> &'static str {
        match self {
            MemBacking::Anon => "anon",
            MemBacking::Thp => "thp",
            MemBacking::Hugetlbfs => "hugetlbfs",
        }
    }

    /// Backed by 2 MiB pages, so zeroing part of one must not drop it.
    pub fn is_huge(self) -> bool {
        self != MemBacking::Anon
    }
}

impl std::fmt::Display for MemBacking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Guest memory whose regions record every write made through vm-memory
/// (by the VMM and its devices) in an `AtomicBitmap`.
pub type GuestMemory = GuestMemoryMmap<AtomicBitmap>;

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory size must be a non-zero multiple of 2 MiB (got {0} bytes)")]
    BadSize(u64),
    #[error("cannot map {0} bytes of guest memory: {1}")]
    Mmap(u64, FromRangesError),
    #[error(
        "--mem-backing hugetlbfs: {mib} MiB of guest memory needs {need} free 2 MiB huge \
         pages, this host has {free} (raise /proc/sys/vm/nr_hugepages)"
    )]
    TooFewHugePages { mib: u64, need: u64, free: u64 },
    #[error(
        "--mem-backing hugetlbfs: this host has no 2 MiB huge page pool ({HUGETLB_SYSFS}: {0})"
    )]
    NoHugetlb(std::io::Error),
    #[error("--mem-backing thp: transparent huge pages are off on this host ({THP_ENABLED}: {0})")]
    ThpOff(String),
    #[error("--mem-backing thp: MADV_HUGEPAGE failed: {0}")]
    Madvise(std::io::Error),
    #[error(
        "--mem-backing thp: the kernel mapped guest memory at {0:#x}, not on a 2 MiB boundary \
         (Linux 6.7 and later align such mappings), so KVM could not map it huge; \
         use --mem-backing hugetlbfs"
    )]
    ThpUnaligned(u64),
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

/// Makes `len` bytes of guest memory from `gpa` read as zero without
/// populating any page: a range that is zero already costs nothing however
/// large it is. With 4 KiB pages the pages go back to the kernel
/// (`MADV_DONTNEED`; a page that was not becomes the shared zero page again,
/// and KVM's MMU notifier unmaps it from the guest). With huge pages only
/// whole 2 MiB pages are dropped so: `MADV_DONTNEED` on part of a THP would
/// split it, and on part of a hugetlbfs page does nothing (or fails), so the
/// partial rest is zeroed in place where populated and not zero already.
/// The range must lie within one region.
pub fn discard(
    memory: &GuestMemory,
    backing: MemBacking,
    gpa: u64,
    len: u64,
) -> Result<(), GuestMemoryError> {
    let slice = memory.get_slice(GuestAddress(gpa), len as usize)?;
    let guard = slice.ptr_guard_mut();
    let start = guard.as_ptr() as u64;
    let end = start + len;
    if !backing.is_huge() {
        return dont_need(start, len);
    }
    let (a, b) = (
        start.next_multiple_of(HUGE_PAGE_SIZE),
        end & !(HUGE_PAGE_SIZE - 1),
    );
    if a < b {
        dont_need(a, b - a)?;
        // SAFETY: [start, a) and [b, end) lie in the slice above.
        unsafe {
            zero_in_place(start, a - start);
            zero_in_place(b, end - b);
        }
    } else {
        // SAFETY: the slice above.
        unsafe { zero_in_place(start, len) };
    }
    Ok(())
}

/// `MADV_DONTNEED` on guest memory (whole huge pages when huge).
fn dont_need(addr: u64, len: u64) -> Result<(), GuestMemoryError> {
    // SAFETY: `addr` is `len` bytes of a private mapping owned by guest
    // memory (vm-memory's `MmapRegion`); MADV_DONTNEED only makes those
    // bytes read as zero from now on, which is what `discard` asks.
    let rc = unsafe { libc::madvise(addr as *mut libc::c_void, len as usize, libc::MADV_DONTNEED) };
    if rc != 0 {
        return Err(GuestMemoryError::IOError(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Zeroes the pages of `[addr, addr + len)` that are populated and not zero
/// already; an untouched page reads zero and stays untouched (writing it
/// would allocate a whole huge page), a zero page is not written (it may be
/// the shared zero page).
///
/// # Safety
/// `addr` must be `len` page-aligned bytes of guest memory that nothing
/// else writes meanwhile (the destination's vCPUs do not run yet).
unsafe fn zero_in_place(addr: u64, len: u64) {
    let pages = len / PAGE_SIZE;
    if pages == 0 {
        return;
    }
    let untouched = untouched_pages(addr as *const u8, pages);
    for p in 0..pages {
        if untouched.as_ref().is_some_and(|u| u[p as usize]) {
            continue;
        }
        let page = (addr + p * PAGE_SIZE) as *mut u8;
        // SAFETY: a page of the range (caller's guarantee).
        unsafe {
            if !crate::migration::page_is_zero(page) {
                std::ptr::write_bytes(page, 0, PAGE_SIZE as usize);
            }
        }
    }
}

/// Which of `pages` 4 KiB pages from host address `host` were never
/// populated (neither present nor swapped out, per /proc/self/pagemap): in
/// guest RAM, a private mapping (anonymous or hugetlbfs), those read as
/// zero, and reading one would fault in a page for nothing. Each 4 KiB
/// entry of a THP or hugetlbfs page is present when the huge page is.
/// `None` if the pagemap cannot be read.
pub fn untouched_pages(host: *const u8, pages: u64) -> Option<Vec<bool>> {
    use std::os::unix::fs::FileExt;
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    static PAGEMAP: OnceLock<Option<File>> = OnceLock::new();
    let pagemap = PAGEMAP
        .get_or_init(|| File::open("/proc/self/pagemap").ok())
        .as_ref()?;
    let mut raw = vec![0u8; pages as usize * 8];
    pagemap
        .read_exact_at(&mut raw, (host as u64 / PAGE_SIZE) * 8)
        .ok()?;
    Some(
        raw.chunks_exact(8)
            .map(|e| u64::from_le_bytes(e.try_into().unwrap()) & (PRESENT | SWAPPED) == 0)
            .collect(),
    )
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

/// Maps `mem_size` bytes of guest RAM around the MMIO hole, backed as
/// `backing` says. Nothing stays mapped when it fails.
pub fn create(mem_size: u64, backing: MemBacking) -> Result<GuestMemory, MemoryError> {
    if mem_size == 0 || !mem_size.is_multiple_of(HUGE_PAGE_SIZE) {
        return Err(MemoryError::BadSize(mem_size));
    }
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_ranges(mem_size)
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect();
    let anon = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    let mmap_err = |e| MemoryError::Mmap(mem_size, e);
    match backing {
        MemBacking::Anon => GuestMemory::from_ranges(&ranges).map_err(mmap_err),
        MemBacking::Thp => {
            check_thp_enabled()?;
            let memory = map_regions(&ranges, anon, false).map_err(mmap_err)?;
            for r in memory.iter() {
                let addr = r.as_ptr() as u64;
                // KVM maps a guest page huge only where guest-physical and
                // host addresses agree modulo 2 MiB.
                if !addr.is_multiple_of(HUGE_PAGE_SIZE) {
                    return Err(MemoryError::ThpUnaligned(addr));
                }
                // SAFETY: advice on the region just mapped; changes no contents.
                if unsafe { libc::madvise(r.as_ptr().cast(), r.size(), libc::MADV_HUGEPAGE) } != 0 {
                    return Err(MemoryError::Madvise(std::io::Error::last_os_error()));
                }
            }
            Ok(memory)
        }
        MemBacking::Hugetlbfs => {
            check_free_huge_pages(mem_size)?;
            // Private: MADV_DONTNEED frees a page (it reads zero again, and
            // its reservation returns), and a page never touched is absent
            // from the pagemap, as with anonymous memory. No MAP_NORESERVE:
            // mmap reserves every page at once or fails, so the guest never
            // meets an empty pool later (SIGBUS).
            let flags =
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB | libc::MAP_HUGE_2MB;
            map_regions(&ranges, flags, true).map_err(mmap_err)
        }
    }
}

/// One vm-memory region per range, mapped with `flags`.
fn map_regions(
    ranges: &[(GuestAddress, usize)],
    flags: i32,
    hugetlbfs: bool,
) -> Result<GuestMemory, FromRangesError> {
    let regions = ranges
        .iter()
        .map(|&(addr, len)| {
            let mapping = MmapRegionBuilder::new_with_bitmap(len, AtomicBitmap::with_len(len))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(flags)
                .with_hugetlbfs(hugetlbfs)
                .build()?;
            GuestRegionMmap::new(mapping, addr).ok_or(FromRangesError::InvalidGuestRegion)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(GuestMemory::from_regions(regions)?)
}

/// THP must not be `never`: MADV_HUGEPAGE would then do nothing.
fn check_thp_enabled() -> Result<(), MemoryError> {
    let mode =
        std::fs::read_to_string(THP_ENABLED).map_err(|e| MemoryError::ThpOff(e.to_string()))?;
    if mode.contains("[never]") {
        return Err(MemoryError::ThpOff(mode.trim().to_string()));
    }
    Ok(())
}

/// Huge pages of this host's 2 MiB pool that a new mapping can reserve:
/// free ones less those other mappings reserved and did not touch yet.
pub fn available_huge_pages() -> std::io::Result<u64> {
    let read = |name: &str| -> std::io::Result<u64> {
        let s = std::fs::read_to_string(format!("{HUGETLB_SYSFS}/{name}"))?;
        s.trim()
            .parse()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    };
    Ok(read("free_hugepages")?.saturating_sub(read("resv_hugepages")?))
}

/// Refuses hugetlbfs guest memory the pool cannot hold, before mapping any
/// (mmap would fail with a bare ENOMEM, maybe after a first region).
fn check_free_huge_pages(mem_size: u64) -> Result<(), MemoryError> {
    let free = available_huge_pages().map_err(MemoryError::NoHugetlb)?;
    let need = mem_size / HUGE_PAGE_SIZE;
    if free < need {
        return Err(MemoryError::TooFewHugePages {
            mib: mem_size >> 20,
            need,
            free,
        });
    }
    Ok(())
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

/// Raises this host's 2 MiB hugetlbfs pool (`/proc/sys/vm/nr_hugepages`)
/// by what a test needs, for as long as it lives, and lowers it by as much
/// again when dropped; one at a time per process (held across the test).
/// For tests: needs root, and a host with the memory free to make them.
pub struct HugePagePool {
    added: u64,
    _one_at_a_time: std::sync::MutexGuard<'static, ()>,
}

impl HugePagePool {
    const NR: &'static str = "/proc/sys/vm/nr_hugepages";

    /// Makes `pages` more huge pages available, or says why it cannot
    /// (the pool is left as it was).
    pub fn reserve(pages: u64) -> Result<HugePagePool, String> {
        static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let guard = ONE.lock().unwrap_or_else(|e| e.into_inner());
        let nr = || -> Result<u64, String> {
            let s = std::fs::read_to_string(Self::NR).map_err(|e| format!("{}: {e}", Self::NR))?;
            s.trim().parse().map_err(|e| format!("{}: {e}", Self::NR))
        };
        let before = available_huge_pages().map_err(|e| format!("{HUGETLB_SYSFS}: {e}"))?;
        let now = nr()?;
        std::fs::write(Self::NR, (now + pages).to_string())
            .map_err(|e| format!("cannot raise {}: {e}", Self::NR))?;
        let pool = HugePagePool {
            added: nr()?.saturating_sub(now),
            _one_at_a_time: guard,
        };
        let after = available_huge_pages().map_err(|e| format!("{HUGETLB_SYSFS}: {e}"))?;
        if after < before + pages {
            return Err(format!(
                "the kernel made {} of {pages} huge pages (memory too fragmented or short)",
                after.saturating_sub(before)
            ));
        }
        Ok(pool)
    }
}

impl Drop for HugePagePool {
    fn drop(&mut self) {
        if let Ok(s) = std::fs::read_to_string(Self::NR) {
            if let Ok(nr) = s.trim().parse::<u64>() {
                let _ = std::fs::write(Self::NR, nr.saturating_sub(self.added).to_string());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn rejects_sizes_kvm_cannot_map() {
        assert!(matches!(
            create(0, MemBacking::Anon),
            Err(MemoryError::BadSize(0))
        ));
        assert!(matches!(
            create(4097, MemBacking::Anon),
            Err(MemoryError::BadSize(4097))
        ));
    }

    #[test]
    fn vmm_writes_are_recorded_in_the_region_bitmap() {
        let mem = create(8 << 20, MemBacking::Anon).unwrap();
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
        let mem = create(64 << 20, MemBacking::Anon).unwrap();
        mem.write_slice(&[0x5a; 8192], GuestAddress(0x10_0000))
            .unwrap();
        discard(&mem, MemBacking::Anon, 0x10_0000, 4096).unwrap();
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
        assert!(
            discard(&mem, MemBacking::Anon, 63 << 20, 2 << 20).is_err(),
            "beyond RAM"
        );
    }

    #[test]
    fn slots_cover_every_region() {
        let mem = create(64 << 20, MemBacking::Anon).unwrap();
        let s = slots(&mem);
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].slot, s[0].guest_addr, s[0].size), (0, 0, 64 << 20));
        assert_eq!(s[0].pages(), (64 << 20) / 4096);
        assert_eq!(s[0].kvm_region(true).flags, KVM_MEM_LOG_DIRTY_PAGES);
    }
    /// A huge pool for a test, or `None` with the reason printed.
    fn pool(pages: u64) -> Option<HugePagePool> {
        match HugePagePool::reserve(pages) {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("skipped: no hugetlbfs pages: {e}");
                None
            }
        }
    }

    /// The `VmFlags` line of the mapping that contains `addr`.
    fn vm_flags(addr: u64) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((a, b)) = range.split_once('-') {
                    if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16))
                    {
                        inside = (a..b).contains(&addr);
                        continue;
                    }
                }
            }
            if inside && line.starts_with("VmFlags:") {
                return line.to_string();
            }
        }
        panic!("no mapping at {addr:#x}");
    }

    #[test]
    fn thp_memory_is_2_mib_aligned_and_advised_huge() {
        let mem = create(8 << 20, MemBacking::Thp).unwrap();
        for r in mem.iter() {
            let addr = r.as_ptr() as u64;
            assert_eq!(addr % HUGE_PAGE_SIZE, 0, "{addr:#x}");
            let flags = vm_flags(addr);
            assert!(flags.split_whitespace().any(|f| f == "hg"), "{flags}");
        }
        let anon = create(8 << 20, MemBacking::Anon).unwrap();
        let flags = vm_flags(anon.iter().next().unwrap().as_ptr() as u64);
        assert!(
            !flags.split_whitespace().any(|f| f == "hg"),
            "anon is unchanged: {flags}"
        );
    }

    #[test]
    fn hugetlbfs_memory_is_refused_up_front_when_the_pool_is_short() {
        // No other test of this process changes the pool meanwhile.
        let _lock = HugePagePool::reserve(0);
        let free = available_huge_pages().unwrap_or(0);
        let size = (free + 1) * HUGE_PAGE_SIZE;
        let e = create(size, MemBacking::Hugetlbfs).unwrap_err().to_string();
        assert!(
            e.contains(&format!(
                "needs {} free 2 MiB huge pages, this host has {free}",
                free + 1
            )),
            "{e}"
        );
        assert_eq!(
            available_huge_pages().unwrap_or(0),
            free,
            "nothing reserved"
        );
        assert!(matches!(
            create(3 << 20, MemBacking::Hugetlbfs),
            Err(MemoryError::BadSize(_))
        ));
    }

    /// Fills 6 MiB from 1 MiB with 0x5a, discards `[gpa, gpa + len)` and
    /// checks that exactly that reads zero.
    fn discard_zeroes_exactly(mem: &GuestMemory, backing: MemBacking, gpa: u64, len: u64) {
        let (from, to) = (1u64 << 20, 7u64 << 20);
        mem.write_slice(&vec![0x5a; (to - from) as usize], GuestAddress(from))
            .unwrap();
        discard(mem, backing, gpa, len).unwrap();
        let mut all = vec![0u8; (to - from) as usize];
        mem.read_slice(&mut all, GuestAddress(from)).unwrap();
        for (i, page) in all.chunks(PAGE_SIZE as usize).enumerate() {
            let at = from + i as u64 * PAGE_SIZE;
            let want = if (gpa..gpa + len).contains(&at) {
                0
            } else {
                0x5a
            };
            assert!(page.iter().all(|b| *b == want), "{backing}: page {at:#x}");
        }
    }

    /// Zero ranges inside one huge page, across one, and over whole ones.
    fn discards_on(backing: MemBacking) {
        let mem = create(16 << 20, backing).unwrap();
        discard_zeroes_exactly(&mem, backing, (2 << 20) + 0x1000, 0x1000);
        discard_zeroes_exactly(&mem, backing, 2 << 20, 0x1000);
        discard_zeroes_exactly(&mem, backing, (1 << 20) + 0x3000, (3 << 20) + 0x2000);
        // Whole huge pages dropped are untouched again (checked before
        // anything reads them): zero ranges over them cost nothing from now on.
        mem.write_slice(&[0x5a; 0x1000], GuestAddress(3 << 20))
            .unwrap();
        discard(&mem, backing, 2 << 20, 4 << 20).unwrap();
        let host = mem.get_host_address(GuestAddress(2 << 20)).unwrap();
        let untouched = untouched_pages(host, 1024).unwrap();
        assert!(
            untouched.iter().all(|u| *u),
            "{backing}: 4 MiB from 2 MiB dropped"
        );
        assert!(
            discard(&mem, backing, 15 << 20, 2 << 20).is_err(),
            "beyond RAM"
        );
    }

    #[test]
    fn discarding_on_thp_zeroes_exactly_the_range() {
        discards_on(MemBacking::Thp);
    }

    #[test]
    fn discarding_on_hugetlbfs_zeroes_exactly_the_range() {
        let Some(_pool) = pool(8) else { return };
        let before = available_huge_pages().unwrap();
        discards_on(MemBacking::Hugetlbfs);
        assert_eq!(
            available_huge_pages().unwrap(),
            before,
            "every page given back"
        );
    }

    #[test]
    fn a_never_populated_huge_page_reads_as_untouched_and_a_written_one_as_populated() {
        for backing in [MemBacking::Thp, MemBacking::Hugetlbfs] {
            let _pool = match backing {
                MemBacking::Hugetlbfs => match pool(4) {
                    Some(p) => Some(p),
                    None => continue,
                },
                _ => None,
            };
            let mem = create(8 << 20, backing).unwrap();
            let host = mem.get_host_address(GuestAddress(2 << 20)).unwrap();
            assert!(
                untouched_pages(host, 512).unwrap().iter().all(|u| *u),
                "{backing}"
            );
            mem.write_obj(1u8, GuestAddress((2 << 20) + 0x5000))
                .unwrap();
            let u = untouched_pages(host, 512).unwrap();
            if backing == MemBacking::Hugetlbfs {
                // The whole 2 MiB page is there now, every 4 KiB of it.
                assert!(u.iter().all(|u| !*u), "{backing}");
            } else {
                assert!(!u[5], "{backing}: the written page is populated");
            }
        }
    }
}
