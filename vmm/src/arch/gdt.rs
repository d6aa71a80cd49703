//! The boot GDT, shared by flat payloads and Linux.
//!
//! Selectors (the flat-payload contract): 0x08 64-bit code DPL0, 0x10 data
//! DPL0, 0x18 data DPL3, 0x20 64-bit code DPL3, 0x28 the 64-bit TSS.

use kvm_bindings::kvm_segment;

pub const CODE64_DPL0: u16 = 0x08;
pub const DATA_DPL0: u16 = 0x10;
pub const DATA_DPL3: u16 = 0x18;
pub const CODE64_DPL3: u16 = 0x20;
pub const TSS64: u16 = 0x28;

/// Offset of the I/O permission bitmap in the TSS (right after the 104-byte TSS).
pub const TSS_IOMAP_OFFSET: u32 = 0x68;
/// TSS limit: the TSS, an I/O bitmap allowing all 65536 ports, and the
/// terminating 0xff byte. Ring-3 payloads rely on it for port I/O on hosts
/// that check the bitmap even with IOPL 3.
pub const TSS_LIMIT: u32 = TSS_IOMAP_OFFSET + 65536 / 8;

/// Builds a legacy 8-byte descriptor from its fields.
/// `flags` holds G, D/B, L, AVL in bits 3..0; `access` is P, DPL, S, type.
pub const fn descriptor(flags: u64, access: u64, base: u64, limit: u64) -> u64 {
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf) << 52)
        | ((limit & 0x000f_0000) << 32)
        | ((access & 0xff) << 40)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// The GDT as 64-bit words, in selector order, with the TSS at `tss_base`.
pub fn table(tss_base: u64) -> [u64; 7] {
    [
        0,
        descriptor(0xa, 0x9b, 0, 0xfffff), // code, L=1, DPL0
        descriptor(0xc, 0x93, 0, 0xfffff), // data, DPL0
        descriptor(0xc, 0xf3, 0, 0xfffff), // data, DPL3
        descriptor(0xa, 0xfb, 0, 0xfffff), // code, L=1, DPL3
        descriptor(0x0, 0x89, tss_base, TSS_LIMIT as u64), // 64-bit TSS, available
        tss_base >> 32,                    // upper half of the 16-byte TSS descriptor
    ]
}

/// The `kvm_segment` KVM expects for a descriptor loaded with `selector`.
pub fn segment(selector: u16, desc: u64) -> kvm_segment {
    let limit = ((desc & 0xffff) | ((desc >> 32) & 0xf_0000)) as u32;
    let g = ((desc >> 55) & 1) as u8;
    kvm_segment {
        base: ((desc >> 16) & 0xff_ffff) | ((desc >> 32) & 0xff00_0000),
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector,
        type_: ((desc >> 40) & 0xf) as u8,
        present: ((desc >> 47) & 1) as u8,
        dpl: ((desc >> 45) & 3) as u8,
        db: ((desc >> 54) & 1) as u8,
        s: ((desc >> 44) & 1) as u8,
        l: ((desc >> 53) & 1) as u8,
        g,
        avl: ((desc >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segments_are_long_mode_with_the_right_dpl() {
        let gdt = table(0x1000);
        let k = segment(CODE64_DPL0, gdt[1]);
        assert_eq!(
            (k.l, k.db, k.dpl, k.s, k.type_, k.present),
            (1, 0, 0, 1, 0xb, 1)
        );
        let u = segment(CODE64_DPL3 | 3, gdt[4]);
        assert_eq!((u.l, u.dpl, u.type_), (1, 3, 0xb));
        assert_eq!(u.limit, 0xffff_ffff);
    }

    #[test]
    fn data_segments_are_writable_flat() {
        let gdt = table(0x1000);
        let d = segment(DATA_DPL3 | 3, gdt[3]);
        assert_eq!((d.dpl, d.type_, d.db, d.g, d.base), (3, 3, 1, 1, 0));
    }

    #[test]
    fn tss_descriptor_carries_its_base_and_limit() {
        let gdt = table(0x1234_5678_9000);
        let t = segment(TSS64, gdt[5]);
        assert_eq!(t.base | (gdt[6] << 32), 0x1234_5678_9000);
        assert_eq!((t.limit, t.type_, t.s, t.present), (TSS_LIMIT, 9, 0, 1));
    }
}
