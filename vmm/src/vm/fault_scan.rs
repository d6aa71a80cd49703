//! What a triple fault leaves to look at: KVM resets the vCPU before it
//! returns `KVM_EXIT_SHUTDOWN` (on SVM), so the guest's registers are gone,
//! but its memory is not. With `LDT_VMM_FAULT_SCAN=1` in the environment the
//! VMM prints, on a triple fault, the x86-64 page-table roots it finds in
//! guest memory and how this host's memory management moved pages while the
//! VM ran. Compared with a CR3 taken elsewhere (an emulator's log), this
//! tells whether the root the guest faulted on still holds its entries in
//! the VMM's memory (then the translation of that page was stale) or not
//! (then the memory itself lost them). A debugging aid for issue #13.12,
//! off unless asked for.

use std::collections::HashMap;

use vm_memory::{Bytes, GuestAddress};

use super::memory::{GuestMemory, MemorySlot};

/// The environment variable that turns the scan on.
pub const ENV: &str = "LDT_VMM_FAULT_SCAN";

/// The /proc/vmstat counters of page moves that could leave a stale mapping.
const VMSTAT_KEYS: &[&str] = &[
    "thp_collapse_alloc",
    "thp_fault_alloc",
    "thp_split_pmd",
    "thp_migration_success",
    "pgmigrate_success",
    "compact_success",
    "compact_isolated",
    "pswpin",
    "pswpout",
    "ksm_swpin_copy",
    "numa_pte_updates",
];

const PAGE: u64 = 4096;
/// The physical-address bits of an x86-64 page-table entry (51:12).
const ENTRY_ADDR: u64 = 0x000f_ffff_ffff_f000;
/// PGD slot of the kernel image mapping (`__START_KERNEL_map`), the same
/// page-directory-pointer page in every root of a 4-level Linux guest.
const KERNEL_SLOT: usize = 511;

/// Whether the scan was asked for.
pub fn enabled() -> bool {
    std::env::var_os(ENV).is_some_and(|v| v != "0")
}

/// The counters of `VMSTAT_KEYS` now (absent ones are left out).
pub fn vmstat() -> HashMap<String, u64> {
    parse_vmstat(&std::fs::read_to_string("/proc/vmstat").unwrap_or_default())
}

fn parse_vmstat(text: &str) -> HashMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            VMSTAT_KEYS
                .contains(&k)
                .then(|| Some((k.to_string(), v.trim().parse().ok()?)))?
        })
        .collect()
}

/// What one pass over guest memory finds: the page-table roots (the
/// kernel-slot value they share and their frames) and the all-zero frames.
struct Scan {
    roots: (u64, Vec<u64>),
    zeros: Vec<(u64, u64)>,
}

fn scan(memory: &GuestMemory, slots: &[MemorySlot]) -> Scan {
    let ram_end: u64 = slots
        .iter()
        .map(|s| s.guest_addr + s.size)
        .max()
        .unwrap_or(0);
    let mut by_value: HashMap<u64, Vec<u64>> = HashMap::new();
    let mut zeros: Vec<(u64, u64)> = Vec::new();
    let mut page = [0u8; PAGE as usize];
    for slot in slots {
        for gpa in (slot.guest_addr..slot.guest_addr + slot.size).step_by(PAGE as usize) {
            let frame = gpa / PAGE;
            if memory.read_slice(&mut page, GuestAddress(gpa)).is_err() {
                continue;
            }
            if page.iter().all(|&b| b == 0) {
                match zeros.last_mut() {
                    Some((_, end)) if *end + 1 == frame => *end = frame,
                    _ => zeros.push((frame, frame)),
                }
                continue;
            }
            let off = KERNEL_SLOT * 8;
            let k = u64::from_le_bytes(page[off..off + 8].try_into().unwrap());
            let target = k & ENTRY_ADDR;
            // A table entry as Linux writes them (_KERNPG_TABLE 0x063 or
            // _PAGE_TABLE 0x067 in the low bits: data that merely looks
            // present does not count), inside RAM.
            if matches!(k & 0xfff, 0x063 | 0x067) && target != 0 && target < ram_end {
                by_value.entry(k).or_default().push(frame);
            }
        }
    }
    let roots = by_value
        .into_iter()
        .filter(|(_, frames)| frames.len() >= 2)
        .max_by_key(|(_, frames)| frames.len())
        .unwrap_or((0, Vec::new()));
    Scan { roots, zeros }
}

/// Guest frames that look like page-table roots of a 4-level Linux guest:
/// pages whose kernel-image slot holds a table entry of the value most such
/// pages share (pointing into guest RAM). Returns that value and the frames.
pub fn page_table_roots(memory: &GuestMemory, slots: &[MemorySlot]) -> (u64, Vec<u64>) {
    scan(memory, slots).roots
}

/// The guest frames that read as all zeros, as inclusive ranges.
pub fn zero_ranges(memory: &GuestMemory, slots: &[MemorySlot]) -> Vec<(u64, u64)> {
    scan(memory, slots).zeros
}

/// Linux's fixed x86-64 mappings that delivering an exception reads (the
/// IDT, CPU 0's GDT and TSS in the cpu_entry_area): a triple fault whose
/// last #PF is on one of these while memory maps it was not the guest's.
const DELIVERY_ADDRESSES: &[(&str, u64)] = &[
    ("IDT", 0xffff_fe00_0000_0000),
    ("GDT", 0xffff_fe00_0000_1000),
    ("TSS", 0xffff_fe00_0000_3000),
];

/// Where a 4-level walk of `va` from the root at `root` ends: the leaf
/// entry's value and its level (3: 1 GiB, 2: 2 MiB, 1: 4 KiB), or the
/// level (4 = PGD .. 1 = PTE) whose entry is not present (or lies outside
/// guest memory).
fn walk_level(memory: &GuestMemory, root: u64, va: u64) -> Result<(u64, u32), u32> {
    let mut table = root;
    for level in (1..=4u32).rev() {
        let index = (va >> (12 + 9 * (level - 1))) & 0x1ff;
        let entry: u64 = memory
            .read_obj(GuestAddress(table + index * 8))
            .map_err(|_| level)?;
        if entry & 1 == 0 {
            return Err(level);
        }
        // PS in a PDPT or PD entry: a 1 GiB or 2 MiB leaf.
        if level == 1 || (level <= 3 && entry & 0x80 != 0) {
            return Ok((entry, level));
        }
        table = entry & ENTRY_ADDR;
    }
    unreachable!("level 1 always returns")
}

/// One line per delivery address: in how many roots memory maps it, and
/// the roots (with the level) where it does not.
fn delivery_walks(memory: &GuestMemory, roots: &[u64]) -> Vec<String> {
    DELIVERY_ADDRESSES
        .iter()
        .map(|(name, va)| {
            let missing: Vec<String> = roots
                .iter()
                .filter_map(|f| {
                    let level = walk_level(memory, f * PAGE, *va).err()?;
                    Some(format!("{:#x}@L{level}", f * PAGE))
                })
                .collect();
            format!(
                "ldt-vmm: fault scan: {name} {va:#x} mapped in {} of {} roots{}{}",
                roots.len() - missing.len(),
                roots.len(),
                if missing.is_empty() { "" } else { "; not in " },
                missing.join(" ")
            )
        })
        .collect()
}

/// Linux's x86-64 kernel image mapping starts here (`__START_KERNEL`, no
/// KASLR in this project's configs); the scan prints how far it is mapped.
const KERNEL_IMAGE: u64 = 0xffff_ffff_8100_0000;
/// And looks at most this far (the text, data and bss of a small kernel).
const KERNEL_IMAGE_MAX: u64 = 64 << 20;

/// How many bytes from `start` (at most `max`) the root at `root` maps
/// without a hole, stepping by each leaf's size.
fn mapped_extent(memory: &GuestMemory, root: u64, start: u64, max: u64) -> u64 {
    let mut off = 0;
    while off < max {
        let va = start + off;
        let Ok((_, level)) = walk_level(memory, root, va) else {
            break;
        };
        let size = 1u64 << (12 + 9 * (level - 1));
        off += size - (va & (size - 1));
    }
    off.min(max)
}

/// The kernel image line: how far the first root maps it (every root
/// found shares that part of the tables, by how roots are found).
fn kernel_image_extent(memory: &GuestMemory, roots: &[u64]) -> String {
    match roots.first() {
        Some(f) => format!(
            "ldt-vmm: fault scan: kernel image {KERNEL_IMAGE:#x}-{:#x} mapped",
            KERNEL_IMAGE + mapped_extent(memory, f * PAGE, KERNEL_IMAGE, KERNEL_IMAGE_MAX)
        ),
        None => "ldt-vmm: fault scan: kernel image: no root".to_string(),
    }
}

/// The lines the scan prints: the roots found, whether they map what
/// exception delivery reads and the kernel image, and the host's page
/// moves since `before`.
pub fn report(memory: &GuestMemory, slots: &[MemorySlot], before: &HashMap<String, u64>) -> String {
    let Scan {
        roots: (value, roots),
        zeros,
    } = scan(memory, slots);
    let frames: Vec<String> = roots.iter().map(|f| format!("{:#x}", f * PAGE)).collect();
    let now = vmstat();
    let mut moves: Vec<String> = VMSTAT_KEYS
        .iter()
        .filter_map(|k| {
            let (a, b) = (before.get(*k)?, now.get(*k)?);
            Some(format!("{k} +{}", b.saturating_sub(*a)))
        })
        .collect();
    if moves.is_empty() {
        moves.push("no /proc/vmstat".into());
    }
    let zeros: Vec<String> = zeros
        .iter()
        .map(|(a, b)| format!("{a:#x}-{b:#x}"))
        .collect();
    format!(
        "ldt-vmm: fault scan: {} page-table roots in guest memory (PGD[{KERNEL_SLOT}] = {value:#x}): {}\n\
         ldt-vmm: fault scan: all-zero guest frames: {}\n\
         {}\n\
         {}\n\
         ldt-vmm: fault scan: host page moves while the VM ran: {}",
        roots.len(),
        frames.join(" "),
        zeros.join(" "),
        delivery_walks(memory, &roots).join("\n"),
        kernel_image_extent(memory, &roots),
        moves.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory(size: u64) -> (GuestMemory, Vec<MemorySlot>) {
        let m = super::super::memory::create(size, super::super::MemBacking::Anon).unwrap();
        let s = super::super::memory::slots(&m);
        (m, s)
    }

    fn set_entry(m: &GuestMemory, table_gpa: u64, slot: usize, value: u64) {
        m.write_slice(
            &value.to_le_bytes(),
            GuestAddress(table_gpa + slot as u64 * 8),
        )
        .unwrap();
    }

    #[test]
    fn finds_the_pages_that_share_a_kernel_slot_and_nothing_else() {
        let (m, slots) = memory(4 << 20);
        let kernel_pud = 0x20_0000u64;
        for root in [0x10_0000u64, 0x13_0000, 0x30_0000] {
            set_entry(&m, root, KERNEL_SLOT, kernel_pud | 0x63);
            set_entry(&m, root, 0, 0x12_3000 | 0x67);
        }
        // A lone page with a different value there is not a root, nor is a
        // non-present entry or one pointing outside RAM.
        set_entry(&m, 0x31_0000, KERNEL_SLOT, 0x25_0000 | 0x63);
        set_entry(&m, 0x32_0000, KERNEL_SLOT, kernel_pud);
        set_entry(&m, 0x33_0000, KERNEL_SLOT, (8 << 20) | 0x63);
        // Nor do pages that share a value without a table entry's flags.
        for data in [0x34_0000u64, 0x35_0000, 0x36_0000, 0x37_0000] {
            set_entry(&m, data, KERNEL_SLOT, 0x84_1f0f);
        }
        let (value, roots) = page_table_roots(&m, &slots);
        assert_eq!(value, kernel_pud | 0x63);
        let mut roots = roots;
        roots.sort();
        assert_eq!(roots, vec![0x100, 0x130, 0x300]);
    }

    #[test]
    fn walks_report_the_leaf_or_the_level_that_is_missing() {
        let (m, slots) = memory(4 << 20);
        let va = DELIVERY_ADDRESSES[0].1; // PGD 508, PUD 0, PMD 0, PTE 0
        let (pud, pmd, pt) = (0x20_0000u64, 0x21_0000u64, 0x22_0000u64);
        for root in [0x10_0000u64, 0x11_0000, 0x12_0000] {
            set_entry(&m, root, KERNEL_SLOT, 0x30_0000 | 0x63);
            set_entry(&m, root, 508, pud | 0x67);
        }
        set_entry(&m, pud, 0, pmd | 0x63);
        set_entry(&m, pmd, 0, pt | 0x63);
        set_entry(&m, pt, 0, 0x8000_0000_0033_4161);
        // The GDT's PTE (slot 1) is not present; the third root lost its
        // PGD entry; a 2 MiB leaf ends a walk at the PMD.
        set_entry(&m, 0x12_0000, 508, 0);
        assert_eq!(
            walk_level(&m, 0x10_0000, va),
            Ok((0x8000_0000_0033_4161, 1))
        );
        assert_eq!(walk_level(&m, 0x10_0000, va + 0x1000), Err(1));
        assert_eq!(walk_level(&m, 0x12_0000, va), Err(4));
        set_entry(&m, pmd, 1, 0x40_0000 | 0xe3);
        assert_eq!(
            walk_level(&m, 0x10_0000, va + (2 << 20) + 5),
            Ok((0x40_00e3, 2))
        );
        // A table outside guest memory ends the walk at that level.
        set_entry(&m, pmd, 2, (1 << 40) | 0x63);
        assert_eq!(walk_level(&m, 0x10_0000, va + (4 << 20)), Err(1));

        // The kernel image: 4 KiB pages, then a 2 MiB leaf, then a hole.
        // 0xffffffff81000000: PGD 511 (the roots' 0x300000), PUD 510, PMD 8.
        let (kpmd, kpt) = (0x24_0000u64, 0x25_0000u64);
        set_entry(&m, 0x30_0000, 510, kpmd | 0x63);
        set_entry(&m, kpmd, 8, kpt | 0x63);
        for i in 0..512 {
            set_entry(&m, kpt, i, (0x1000 + i as u64) << 12 | 0x163);
        }
        set_entry(&m, kpmd, 9, 0x40_0000 | 0x1e3);
        assert_eq!(
            mapped_extent(&m, 0x10_0000, KERNEL_IMAGE, KERNEL_IMAGE_MAX),
            4 << 20
        );
        set_entry(&m, kpt, 7, 0);
        assert_eq!(
            mapped_extent(&m, 0x10_0000, KERNEL_IMAGE + 0x1234, KERNEL_IMAGE_MAX),
            0x7000 - 0x1234
        );

        let (_, roots) = page_table_roots(&m, &slots);
        let lines = delivery_walks(&m, &roots);
        assert_eq!(
            lines[0],
            "ldt-vmm: fault scan: IDT 0xfffffe0000000000 mapped in 2 of 3 roots; not in 0x120000@L4"
        );
        assert!(
            lines[1].contains("mapped in 0 of 3 roots; not in 0x100000@L1 0x110000@L1 0x120000@L4")
        );
    }

    #[test]
    fn zero_frames_come_as_ranges() {
        let (m, slots) = memory(2 << 20);
        m.write_slice(&[1], GuestAddress(0x3000)).unwrap();
        m.write_slice(&[1], GuestAddress(0x4fff)).unwrap();
        m.write_slice(&[1], GuestAddress(0x1f_f000)).unwrap();
        assert_eq!(zero_ranges(&m, &slots), vec![(0, 2), (5, 0x1fe)]);
    }

    #[test]
    fn memory_without_roots_reports_none() {
        let (m, slots) = memory(2 << 20);
        assert_eq!(page_table_roots(&m, &slots), (0, Vec::new()));
    }

    #[test]
    fn vmstat_keeps_only_the_page_move_counters() {
        let v = parse_vmstat("nr_free_pages 12\nthp_collapse_alloc 3\npswpout 7\nbogus x\n");
        assert_eq!(v.len(), 2);
        assert_eq!(v["thp_collapse_alloc"], 3);
        assert_eq!(v["pswpout"], 7);
    }
}
