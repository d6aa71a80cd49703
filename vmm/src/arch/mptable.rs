//! Intel MultiProcessor Specification 1.4 tables, so a Linux guest without
//! ACPI finds its processors, its I/O APIC and the ISA interrupt routing.

use super::layout::{APIC_ADDR, IOAPIC_ADDR};

const MPC_SIGNATURE: &[u8; 4] = b"PCMP";
const MPF_SIGNATURE: &[u8; 4] = b"_MP_";
const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const MP_IRQ_INT: u8 = 0;
const MP_IRQ_NMI: u8 = 1;
const MP_IRQ_EXTINT: u8 = 3;
const APIC_VERSION: u8 = 0x14;
/// Legacy ISA IRQs routed through the I/O APIC.
const ISA_IRQS: u8 = 16;

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// The floating pointer followed by the configuration table, ready to copy to
/// guest-physical `base`.
pub fn build(base: u64, vcpus: u8) -> Vec<u8> {
    let ioapic_id = vcpus;
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..vcpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[MP_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // cpu signature: family 6
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // features: FPU, APIC
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[MP_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[MP_IOAPIC, ioapic_id, APIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    count += 1;
    // ISA IRQ n is I/O APIC pin n, as KVM's default GSI routing wires it;
    // the PIT's IRQ 0 included. Declaring pin 0 ExtINT instead makes Linux
    // take the "ExtINT not setup in hardware" path of check_timer(), which
    // oopses on real KVM (seen with 6.12 under nested SVM).
    for irq in 0..ISA_IRQS {
        entries.extend_from_slice(&[MP_INTSRC, MP_IRQ_INT, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // LINT0 of every local APIC is ExtINT, LINT1 is NMI.
    entries.extend_from_slice(&[MP_LINTSRC, MP_IRQ_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[MP_LINTSRC, MP_IRQ_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_addr = base + 16;
    let mut table = Vec::new();
    table.extend_from_slice(MPC_SIGNATURE);
    table.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"LDT-VMM ");
    table.extend_from_slice(b"000000000000");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(APIC_ADDR as u32).to_le_bytes());
    table.extend_from_slice(&[0; 4]); // extended table length, checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(MPF_SIGNATURE);
    fp.extend_from_slice(&(table_addr as u32).to_le_bytes());
    fp.push(1); // length in 16-byte units
    fp.push(4); // spec revision
    fp.push(0); // checksum, below
    fp.extend_from_slice(&[0; 5]); // feature bytes: configuration table present
    fp[10] = checksum(&fp);
    fp.extend_from_slice(&table);
    fp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_checksums_sum_to_zero() {
        let t = build(0x9fc00, 2);
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(t[0..16].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let len = u16::from_le_bytes([t[20], t[21]]) as usize;
        assert_eq!(&t[16..20], b"PCMP");
        assert_eq!(len, t.len() - 16);
        assert_eq!(t[16..].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        assert_eq!(u32::from_le_bytes(t[4..8].try_into().unwrap()), 0x9fc10);
    }

    #[test]
    fn lists_every_cpu_with_the_first_as_boot_processor() {
        let t = build(0x9fc00, 3);
        let count = u16::from_le_bytes([t[16 + 34], t[16 + 35]]);
        assert_eq!(count, 3 + 1 + 1 + 16 + 2);
        let first = &t[16 + 44..];
        assert_eq!((first[0], first[1], first[3]), (MP_PROCESSOR, 0, 3));
        assert_eq!((first[20], first[21], first[23]), (MP_PROCESSOR, 1, 1));
    }

    #[test]
    fn routes_isa_irq_n_to_ioapic_pin_n_including_the_timer() {
        let vcpus = 2;
        let t = build(0x9fc00, vcpus);
        let intsrc = &t[16 + 44 + 20 * vcpus as usize + 8 + 8..];
        for irq in 0..ISA_IRQS {
            let e = &intsrc[8 * irq as usize..][..8];
            assert_eq!(e[0], MP_INTSRC);
            assert_eq!(e[1], MP_IRQ_INT, "irq {irq} must be a plain INT");
            assert_eq!((e[5], e[6], e[7]), (irq, vcpus, irq));
        }
    }
}
