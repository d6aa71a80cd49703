//! Identity-mapped boot page tables with 2 MiB pages.
//!
//! The U/S bit is set at every level so flat payloads may run in ring 3, and
//! the accessed and dirty bits are preset so the CPU never writes the tables
//! during a payload (they would otherwise show up as dirty pages).

use super::layout::{PAGE_SIZE, PAGE_TABLES_END, PDPT_ADDR, PD_START_ADDR, PML4_ADDR};

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const ACCESSED: u64 = 1 << 5;
const DIRTY: u64 = 1 << 6;
const HUGE: u64 = 1 << 7;
const TABLE_FLAGS: u64 = PRESENT | WRITABLE | USER | ACCESSED;
const GIB: u64 = 1 << 30;

/// One page-table page to write into guest memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TablePage {
    pub gpa: u64,
    pub entries: Vec<u64>,
}

/// How many page directories identity-mapping `[0, end)` needs.
pub fn page_directories(end: u64) -> u64 {
    end.div_ceil(GIB).max(1)
}

/// Highest address the boot tables can map with the space reserved for them.
pub fn max_mapped_end() -> u64 {
    (PAGE_TABLES_END - PD_START_ADDR) / PAGE_SIZE * GIB
}

/// The tables identity-mapping `[0, end)` (rounded up to a GiB).
pub fn identity_map(end: u64) -> Vec<TablePage> {
    let pds = page_directories(end);
    assert!(
        end <= max_mapped_end(),
        "boot page tables cannot map {end:#x}"
    );
    let mut pml4 = vec![0u64; 512];
    pml4[0] = PDPT_ADDR | TABLE_FLAGS;
    let mut pdpt = vec![0u64; 512];
    let mut pages = Vec::new();
    for i in 0..pds {
        let pd_gpa = PD_START_ADDR + i * PAGE_SIZE;
        pdpt[i as usize] = pd_gpa | TABLE_FLAGS;
        let entries = (0..512u64)
            .map(|j| (i * GIB + (j << 21)) | TABLE_FLAGS | DIRTY | HUGE)
            .collect();
        pages.push(TablePage {
            gpa: pd_gpa,
            entries,
        });
    }
    pages.insert(
        0,
        TablePage {
            gpa: PDPT_ADDR,
            entries: pdpt,
        },
    );
    pages.insert(
        0,
        TablePage {
            gpa: PML4_ADDR,
            entries: pml4,
        },
    );
    pages
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Walks the tables like the MMU would.
    fn translate(pages: &[TablePage], va: u64) -> Option<(u64, bool)> {
        let find = |gpa: u64| pages.iter().find(|p| p.gpa == gpa).map(|p| &p.entries);
        let pml4e = find(PML4_ADDR)?[((va >> 39) & 511) as usize];
        let pdpte = find(pml4e & !0xfff)?[((va >> 30) & 511) as usize];
        if pdpte & PRESENT == 0 {
            return None;
        }
        let pde = find(pdpte & 0x000f_ffff_ffff_f000)?[((va >> 21) & 511) as usize];
        let user = pml4e & pdpte & pde & USER != 0;
        Some((
            (pde & !0x1f_ffff & 0x000f_ffff_ffff_ffff) | (va & 0x1f_ffff),
            user,
        ))
    }

    #[test]
    fn every_mapped_address_is_identity_and_user() {
        let pages = identity_map(3 << 30);
        for va in [0u64, 0x10_0000, 0x7fff_ffff, (3 << 30) - 1] {
            assert_eq!(translate(&pages, va), Some((va, true)));
        }
        assert_eq!(translate(&pages, 3 << 30), None);
    }

    #[test]
    fn tables_fit_below_the_reserved_end() {
        let pages = identity_map(max_mapped_end());
        assert!(pages.iter().all(|p| p.gpa + PAGE_SIZE <= PAGE_TABLES_END));
        assert_eq!(page_directories(1), 1);
        assert_eq!(page_directories(GIB + 1), 2);
    }
}
