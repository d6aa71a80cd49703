//! The Linux x86 boot protocol: the e820 map and `boot_params` (zero page).

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};

use super::layout::{self, CMDLINE_ADDR, EBDA_START, HIMEM_START};

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
/// `loadflags`: the protected-mode kernel is loaded at 0x100000.
const LOADED_HIGH: u8 = 1;

/// An e820 entry: (start, length, type).
pub type E820Entry = (u64, u64, u32);

/// The memory map for `mem_size` bytes of RAM: conventional memory below the
/// EBDA, the EBDA..1 MiB area reserved, then RAM from 1 MiB around the MMIO
/// hole, and the `reserved` (start, length) ranges (the ldt-pv bitmap), sorted.
pub fn e820_map(mem_size: u64, reserved: &[(u64, u64)]) -> Vec<E820Entry> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    for (start, len) in layout::ram_ranges(mem_size) {
        let (s, l) = if start == 0 {
            (HIMEM_START, len - HIMEM_START)
        } else {
            (start, len)
        };
        map.push((s, l, E820_RAM));
    }
    map.extend(reserved.iter().map(|&(s, l)| (s, l, E820_RESERVED)));
    map.sort_by_key(|e| e.0);
    map
}

/// Where the initrd goes: as high as possible in RAM below 4 GiB and below
/// the kernel's `initrd_addr_max`, page aligned.
pub fn initrd_address(mem_size: u64, initrd_size: u64, initrd_addr_max: u32) -> Option<u64> {
    let low_end = layout::ram_ranges(mem_size)[0].1;
    let limit = if initrd_addr_max == 0 {
        0x37ff_ffff
    } else {
        initrd_addr_max as u64
    };
    let top = low_end.min(limit + 1);
    let addr = top.checked_sub(initrd_size)? & !(layout::PAGE_SIZE - 1);
    (addr >= HIMEM_START).then_some(addr)
}

/// Inputs for the zero page.
#[derive(Debug, Clone, Copy)]
pub struct BootParamsSpec<'a> {
    /// Setup header from a bzImage, or `None` for an ELF vmlinux.
    pub header: Option<setup_header>,
    pub mem_size: u64,
    /// Length of the command line without its NUL.
    pub cmdline_len: usize,
    /// Initrd (address, size).
    pub initrd: Option<(u64, u64)>,
    /// Reserved ranges besides the legacy ones (the ldt-pv bitmap).
    pub reserved: &'a [(u64, u64)],
}

/// Builds the zero page.
pub fn boot_params(spec: &BootParamsSpec) -> boot_params {
    let mut p = boot_params::default();
    if let Some(h) = spec.header {
        p.hdr = h;
    }
    p.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    p.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    p.hdr.header = KERNEL_HDR_MAGIC;
    p.hdr.loadflags |= LOADED_HIGH;
    p.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    p.hdr.cmdline_size = spec.cmdline_len as u32;
    if p.hdr.kernel_alignment == 0 {
        p.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    if let Some((addr, size)) = spec.initrd {
        p.hdr.ramdisk_image = addr as u32;
        p.hdr.ramdisk_size = size as u32;
    }
    let map = e820_map(spec.mem_size, spec.reserved);
    for (i, &(addr, size, type_)) in map.iter().enumerate() {
        p.e820_table[i] = boot_e820_entry {
            addr,
            size,
            r#type: type_,
        };
    }
    p.e820_entries = map.len() as u8;
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::layout::{MMIO_GAP_END, MMIO_GAP_START};

    fn ram_total(map: &[E820Entry]) -> u64 {
        map.iter().filter(|e| e.2 == E820_RAM).map(|e| e.1).sum()
    }

    #[test]
    fn e820_covers_ram_and_reserves_the_legacy_hole() {
        let map = e820_map(256 << 20, &[]);
        assert_eq!(map[0], (0, EBDA_START, E820_RAM));
        assert_eq!(map[1].2, E820_RESERVED);
        assert_eq!(map[2], (HIMEM_START, (256 << 20) - HIMEM_START, E820_RAM));
        assert_eq!(ram_total(&map), (256 << 20) - (HIMEM_START - EBDA_START));
    }

    #[test]
    fn e820_entries_are_sorted_and_disjoint_with_the_mmio_hole() {
        let map = e820_map(5 << 30, &[]);
        for w in map.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0, "{map:?}");
        }
        let last = map.last().unwrap();
        assert_eq!((last.0, last.1), (MMIO_GAP_END, (5 << 30) - MMIO_GAP_START));
        assert!(!map
            .iter()
            .any(|e| e.0 < MMIO_GAP_END && e.0 + e.1 > MMIO_GAP_START));
    }

    #[test]
    fn the_ldt_pv_bitmap_is_reserved_in_the_hole_in_address_order() {
        let bitmap = (MMIO_GAP_START, 0x2000);
        let map = e820_map(5 << 30, &[bitmap]);
        let i = map.iter().position(|e| e.0 == MMIO_GAP_START).unwrap();
        assert_eq!(map[i], (MMIO_GAP_START, 0x2000, E820_RESERVED));
        assert_eq!(map[i + 1].0, MMIO_GAP_END);
        for w in map.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0, "{map:?}");
        }
        assert_eq!(ram_total(&map), ram_total(&e820_map(5 << 30, &[])));
    }

    #[test]
    fn zero_page_points_at_cmdline_initrd_and_map() {
        let p = boot_params(&BootParamsSpec {
            header: None,
            mem_size: 128 << 20,
            cmdline_len: 42,
            initrd: Some((0x700_0000, 0x1234)),
            reserved: &[],
        });
        let hdr = p.hdr;
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!({ hdr.header }, 0x5372_6448);
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_ADDR as u32);
        assert_eq!({ hdr.cmdline_size }, 42);
        assert_eq!(
            ({ hdr.ramdisk_image }, { hdr.ramdisk_size }),
            (0x700_0000, 0x1234)
        );
        assert_eq!(p.e820_entries, 3);
        assert_eq!({ p.e820_table[2].addr }, HIMEM_START);
    }

    #[test]
    fn initrd_goes_high_page_aligned_and_respects_the_kernel_limit() {
        assert_eq!(
            initrd_address(128 << 20, 0x1800, 0),
            Some((128 << 20) - 0x2000)
        );
        let a = initrd_address(2 << 30, 0x1000, 0x37ff_ffff).unwrap();
        assert_eq!(a, 0x3800_0000 - 0x1000);
        assert_eq!(initrd_address(2 << 20, 4 << 20, 0), None);
    }
}
