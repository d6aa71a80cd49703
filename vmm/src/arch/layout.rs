//! Every fixed guest-physical address the VMM uses.
//!
//! Low memory (below 1 MiB) holds what the VMM builds for the guest: the GDT,
//! TSS, boot page tables, Linux zero page and command line, and the MP table.
//! The flat-payload contract (see `vm::boot::flat`) promises payloads that
//! page tables and the GDT live below `FLAT_RESERVED_END`.

/// Size of a guest page for dirty tracking (x86 base page).
pub const PAGE_SIZE: u64 = 4096;

/// Global descriptor table (flat and Linux boot).
pub const GDT_ADDR: u64 = 0x500;
/// Task-state segment, needed for a usable TR and for ring-3 payloads.
pub const TSS_ADDR: u64 = 0x1000;
/// Linux `boot_params` ("zero page").
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Top-level page table (PML4).
pub const PML4_ADDR: u64 = 0x9000;
/// Page-directory-pointer table: one, so RAM is mapped up to 512 GiB.
pub const PDPT_ADDR: u64 = 0xa000;
/// First page directory; one more follows for every GiB of RAM.
pub const PD_START_ADDR: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Longest command line the VMM accepts (the 6.x boot protocol limit is 2 KiB
/// on old kernels; modern ones report `cmdline_size` in the setup header).
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// End of the area the page tables may use (PD pages stop below this).
pub const PAGE_TABLES_END: u64 = 0x20000;
/// Flat payloads: everything the VMM builds lives below this address.
pub const FLAT_RESERVED_END: u64 = 0x80000;
/// Flat payloads: the harness command block (see `devices::flat_harness`).
pub const FLAT_CMD_ADDR: u64 = 0x80000;
/// Flat payloads: end of the command block.
pub const FLAT_CMD_END: u64 = 0x9f000;
/// Start of the Extended BIOS Data Area: conventional RAM ends here.
pub const EBDA_START: u64 = 0x9fc00;
/// MP floating pointer and configuration table (in the EBDA, where the
/// kernel's MP-table scan looks).
pub const MPTABLE_START: u64 = 0x9fc00;
/// Where high memory (and the kernel, and flat payloads) start.
pub const HIMEM_START: u64 = 0x10_0000;
/// Flat payload load and entry address; also its initial RSP.
pub const FLAT_ENTRY_ADDR: u64 = HIMEM_START;
/// Start of the 32-bit MMIO hole (LAPIC, IOAPIC, ...).
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Where KVM puts the three TSS pages it needs on Intel (inside the hole).
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// Local APIC base.
pub const APIC_ADDR: u64 = 0xfee0_0000;
/// I/O APIC base.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;

/// ldt-pv: where the dirty-frame bitmap lives (its own memslot at the
/// start of the 32-bit MMIO hole, e820-reserved; never guest RAM, so
/// migration, snapshots and digests never see it).
pub const LDT_PV_BITMAP_ADDR: u64 = MMIO_GAP_START;
/// ldt-pv: the most bytes of bitmap the hole gives it (2^31 frames, 8 TiB).
pub const LDT_PV_BITMAP_MAX: u64 = 256 << 20;

// The reserved low-memory areas must not overlap.
const _: () = {
    assert!(GDT_ADDR + 8 * 8 <= TSS_ADDR);
    assert!(TSS_ADDR + (super::gdt::TSS_LIMIT as u64) < ZERO_PAGE_ADDR);
    assert!(ZERO_PAGE_ADDR + PAGE_SIZE <= PML4_ADDR);
    assert!(PD_START_ADDR < PAGE_TABLES_END);
    assert!(CMDLINE_ADDR + CMDLINE_MAX_SIZE as u64 <= FLAT_RESERVED_END);
    assert!(FLAT_CMD_END <= EBDA_START);
};

/// Guest RAM as (start, length) ranges for `mem_size` bytes: one range up to
/// the MMIO hole, the rest above 4 GiB.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_size - MMIO_GAP_START),
        ]
    }
}

/// The ldt-pv bitmap for `mem_size` bytes of RAM: (frames it covers,
/// bytes), one bit per 4 KiB frame from GPA 0 to the end of the highest
/// RAM range (frames in the MMIO hole included, never set), the size
/// rounded up to whole pages. `None` if it would not fit its window.
pub fn ldt_pv_bitmap(mem_size: u64) -> Option<(u64, u64)> {
    let end = ram_ranges(mem_size)
        .last()
        .map(|&(start, len)| start + len)?;
    let frames = end / PAGE_SIZE;
    let bytes = frames.div_ceil(8).next_multiple_of(PAGE_SIZE);
    (bytes <= LDT_PV_BITMAP_MAX && LDT_PV_BITMAP_ADDR + bytes <= IOAPIC_ADDR)
        .then_some((frames, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_ram_is_one_range() {
        assert_eq!(ram_ranges(256 << 20), vec![(0, 256 << 20)]);
    }

    #[test]
    fn large_ram_skips_the_mmio_hole() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r, vec![(0, MMIO_GAP_START), (MMIO_GAP_END, 1 << 30)]);
        assert_eq!(r.iter().map(|x| x.1).sum::<u64>(), 4 << 30);
    }

    #[test]
    fn the_ldt_pv_bitmap_covers_every_ram_frame_and_fits_the_hole() {
        assert_eq!(ldt_pv_bitmap(256 << 20), Some((65536, 8192)));
        // Above the hole the frames of the hole are covered too.
        let (frames, bytes) = ldt_pv_bitmap(5 << 30).unwrap();
        assert_eq!(frames, (MMIO_GAP_END + (2 << 30)) / PAGE_SIZE);
        assert!(bytes * 8 >= frames && bytes % PAGE_SIZE == 0);
        assert!(
            ldt_pv_bitmap(8 << 40).is_none(),
            "8 TiB + the hole is too much"
        );
    }
}
