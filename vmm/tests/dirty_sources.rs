//! Never-miss tests of every KVM dirty source with the flat writer payload:
//! in each round the guest (in ring 3) writes a seeded random set of pages;
//! the harvested set must contain every one of them, and anything else must
//! be a page the test can name (the command block the VMM wrote).

use std::collections::BTreeSet;

use ldt_vmm::arch::layout::PAGE_SIZE;
use ldt_vmm::bench::{working_set_page, Rng};
use ldt_vmm::dirty::{self, DirtyOptions, DirtySource, DirtySourceKind};
use ldt_vmm::flat::{WriterVm, MAX_PAGES_PER_COMMAND};
use ldt_vmm::vm::kvm_stats::mapped_pages;
use ldt_vmm::vm::memory::HugePagePool;
use ldt_vmm::vm::MemBacking;
use vm_memory::{Bytes, GuestAddress};

const WORKING_SET: u64 = 4096;
const MEM_MIB: u64 = 32;

struct Outcome {
    rounds: u32,
    written: u64,
    false_positives: u64,
}

fn writer_with(kind: DirtySourceKind, options: DirtyOptions) -> (WriterVm, Box<dyn DirtySource>) {
    writer_on(kind, options, MemBacking::Anon)
}

/// `writer_with` on `backing`; on a huge backing the guest first writes its
/// whole working set, untracked, so that KVM maps it with huge pages
/// before the source starts and must split them.
fn writer_on(
    kind: DirtySourceKind,
    options: DirtyOptions,
    backing: MemBacking,
) -> (WriterVm, Box<dyn DirtySource>) {
    let ring = (kind == DirtySourceKind::KvmRing).then_some(options.ring_entries);
    let mut vm = WriterVm::with_backing(MEM_MIB, ring, backing)
        .expect("writer VM boots to its first sync point");
    if backing.is_huge() {
        let all: Vec<u64> = (0..WORKING_SET).map(working_set_page).collect();
        for chunk in all.chunks(MAX_PAGES_PER_COMMAND) {
            vm.write_round(chunk, 1, 0x11).unwrap();
        }
        eprintln!(
            "{kind} on {backing}: KVM maps {:?} before tracking",
            mapped_pages(&vm.machine.vm.fd).ok()
        );
    }
    let mut source = dirty::create(kind, options, vm.machine.ring.clone()).unwrap();
    dirty::reset_vmm_writes(&vm.machine.vm);
    source.start(&vm.machine.vm).unwrap();
    (vm, source)
}

/// Runs `rounds` rounds of `per_round` random pages with `bytes` bytes each
/// and checks every harvest against the pages written.
fn never_misses(
    kind: DirtySourceKind,
    options: DirtyOptions,
    rounds: u32,
    per_round: u64,
    bytes: u32,
) -> Outcome {
    never_misses_in(kind, options, rounds, per_round, bytes).1
}

fn never_misses_in(
    kind: DirtySourceKind,
    options: DirtyOptions,
    rounds: u32,
    per_round: u64,
    bytes: u32,
) -> (Option<u64>, Outcome) {
    never_misses_on(kind, options, rounds, per_round, bytes, MemBacking::Anon)
}

/// `rounds` rounds of `per_round` random pages with `bytes` bytes each on a
/// started `source`, every harvest checked against the pages written.
fn checked_rounds(
    vm: &mut WriterVm,
    source: &mut dyn DirtySource,
    kind: DirtySourceKind,
    rounds: u32,
    per_round: u64,
    bytes: u32,
) -> Outcome {
    // The first harvest may report everything (INITIALLY_SET); start clean.
    dirty::harvest(source, &vm.machine.vm).unwrap();
    let mut rng = Rng::new(0x1d7 + kind as u64);
    let mut out = Outcome {
        rounds: 0,
        written: 0,
        false_positives: 0,
    };
    for round in 0..rounds {
        let pages: Vec<u64> = rng
            .sample(WORKING_SET, per_round)
            .into_iter()
            .map(working_set_page)
            .collect();
        let value = 0x40 + round as u8;
        vm.write_round(&pages, bytes, value).unwrap();
        let harvested = dirty::harvest(source, &vm.machine.vm).unwrap();

        let written: BTreeSet<u64> = pages.iter().copied().collect();
        let named: BTreeSet<u64> = WriterVm::command_pages(pages.len()).into_iter().collect();
        let got: BTreeSet<u64> = harvested.pages().collect();
        let missed: Vec<_> = written.difference(&got).collect();
        assert!(
            missed.is_empty(),
            "{kind} round {round}: missed {} pages, e.g. {:#x?}",
            missed.len(),
            &missed[..missed.len().min(4)]
        );
        let unexplained: Vec<_> = got
            .difference(&written)
            .filter(|p| !named.contains(p))
            .collect();
        assert!(
            unexplained.is_empty(),
            "{kind} round {round}: reported pages nobody wrote: {unexplained:#x?}"
        );
        out.false_positives += (got.len() - written.len()) as u64;
        out.written += written.len() as u64;
        out.rounds += 1;

        // The guest really wrote what the test asked for.
        for p in pages.iter().take(16) {
            let mut b = vec![0u8; bytes as usize];
            vm.machine
                .vm
                .memory
                .read_slice(&mut b, GuestAddress(*p))
                .unwrap();
            assert!(b.iter().all(|x| *x == value), "{kind}: page {p:#x} content");
        }
    }
    out
}

fn never_misses_on(
    kind: DirtySourceKind,
    options: DirtyOptions,
    rounds: u32,
    per_round: u64,
    bytes: u32,
    backing: MemBacking,
) -> (Option<u64>, Outcome) {
    let (mut vm, mut source) = writer_on(kind, options, backing);
    let out = checked_rounds(&mut vm, source.as_mut(), kind, rounds, per_round, bytes);
    source.stop(&vm.machine.vm).unwrap();
    let full_exits = vm.machine.ring.as_ref().map(|r| r.full_exits());
    vm.stop().unwrap();
    eprintln!(
        "{kind}: {} rounds, {} pages written, {} false positives (command-block pages written by the VMM)",
        out.rounds, out.written, out.false_positives
    );
    (full_exits, out)
}

#[test]
fn kvm_bitmap_reports_every_page_written_in_ring3() {
    let o = never_misses(
        DirtySourceKind::KvmBitmap,
        DirtyOptions::default(),
        6,
        700,
        1,
    );
    assert_eq!(o.written, 6 * 700);
}

#[test]
fn kvm_bitmap_reports_full_page_writes() {
    never_misses(
        DirtySourceKind::KvmBitmap,
        DirtyOptions::default(),
        3,
        300,
        PAGE_SIZE as u32,
    );
}

#[test]
fn kvm_clear_reports_every_page_written_with_initially_set() {
    never_misses(
        DirtySourceKind::KvmClear,
        DirtyOptions::default(),
        6,
        700,
        1,
    );
}

#[test]
fn kvm_clear_reports_every_page_written_without_initially_set_in_small_chunks() {
    let options = DirtyOptions {
        initially_set: false,
        clear_chunk_pages: 64,
        ..Default::default()
    };
    never_misses(DirtySourceKind::KvmClear, options, 6, 700, 1);
}

#[test]
fn kvm_ring_reports_every_page_written_in_ring3() {
    never_misses(DirtySourceKind::KvmRing, DirtyOptions::default(), 6, 700, 1);
}

#[test]
fn kvm_ring_survives_ring_full_exits() {
    // The smallest ring KVM allows and 3000 pages a round: the vCPU fills
    // its ring many times per round and the ring-full exits lose nothing.
    let options = DirtyOptions {
        ring_entries: dirty::kvm_ring::MIN_RING_ENTRIES,
        ..Default::default()
    };
    let (full_exits, _) = never_misses_in(DirtySourceKind::KvmRing, options, 4, 3000, 1);
    assert!(
        full_exits.unwrap() >= 4 * 3000 / 256,
        "ring-full exits: {full_exits:?}"
    );
}

#[test]
fn untouched_rounds_report_only_the_command_block() {
    for kind in DirtySourceKind::KVM {
        let (mut vm, mut source) = writer_with(kind, DirtyOptions::default());
        dirty::harvest(source.as_mut(), &vm.machine.vm).unwrap();
        vm.write_round(&[], 1, 0).unwrap();
        let got: Vec<u64> = dirty::harvest(source.as_mut(), &vm.machine.vm)
            .unwrap()
            .pages()
            .collect();
        assert_eq!(got, WriterVm::command_pages(0), "{kind}");
        source.stop(&vm.machine.vm).unwrap();
        vm.stop().unwrap();
    }
}

#[test]
fn vmm_writes_are_reported_by_every_source() {
    for kind in DirtySourceKind::KVM {
        let (vm, mut source) = writer_with(kind, DirtyOptions::default());
        dirty::harvest(source.as_mut(), &vm.machine.vm).unwrap();
        let gpa = working_set_page(123);
        vm.machine
            .vm
            .memory
            .write_obj(7u8, GuestAddress(gpa))
            .unwrap();
        let b = dirty::harvest(source.as_mut(), &vm.machine.vm).unwrap();
        assert!(b.is_dirty(gpa), "{kind}");
        assert_eq!(b.count(), 1, "{kind}");
        vm.stop().unwrap();
    }
}

#[test]
fn kvm_ring_rejects_a_ring_kvm_cannot_take() {
    let err = WriterVm::new(MEM_MIB, Some(64))
        .err()
        .expect("64 entries is below one page");
    assert!(err.to_string().contains("power of two >= 256"), "{err}");
}

#[test]
fn kvm_ring_cannot_be_created_without_an_enabled_ring() {
    let err = dirty::create(DirtySourceKind::KvmRing, DirtyOptions::default(), None)
        .err()
        .expect("kvm-ring without a ring is an error");
    assert!(err.to_string().contains("dirty ring"), "{err}");
}

#[test]
fn every_source_reports_every_page_written_over_huge_host_pages() {
    // 16 huge pages for the 32 MiB writer, one VM at a time.
    let pool = HugePagePool::reserve(16);
    for backing in [MemBacking::Thp, MemBacking::Hugetlbfs] {
        if let (MemBacking::Hugetlbfs, Err(e)) = (backing, &pool) {
            eprintln!("hugetlbfs skipped: {e}");
            continue;
        }
        for kind in DirtySourceKind::available() {
            let (_, o) = never_misses_on(kind, DirtyOptions::default(), 4, 1500, 1, backing);
            assert_eq!(o.rounds, 4, "{kind} on {backing}");
        }
    }
}

/// One VM, the sources one after another (a failed migration retried with
/// another source, a snapshot chain after a migration): a source must not
/// inherit the KVM log mode the previous one left. kvm-clear leaves manual
/// protection on, and KVM_GET_DIRTY_LOG then neither clears nor
/// write-protects: kvm-bitmap reported every page written since it
/// started, every round (all memory after INITIALLY_SET), and never
/// converged.
#[test]
fn a_source_after_another_on_the_same_vm_reports_each_rounds_writes() {
    use DirtySourceKind::{KvmBitmap, KvmClear};
    let mut vm = WriterVm::new(MEM_MIB, None).expect("writer VM boots");
    let plain = DirtyOptions {
        initially_set: false,
        ..Default::default()
    };
    let runs = [
        (KvmClear, plain),
        (KvmBitmap, DirtyOptions::default()),
        (KvmClear, DirtyOptions::default()),
        (KvmBitmap, DirtyOptions::default()),
    ];
    for (kind, options) in runs {
        let mut source = dirty::create(kind, options, None).unwrap();
        dirty::reset_vmm_writes(&vm.machine.vm);
        source.start(&vm.machine.vm).unwrap();
        let out = checked_rounds(&mut vm, source.as_mut(), kind, 4, 256, 1);
        assert_eq!(out.rounds, 4);
        source.stop(&vm.machine.vm).unwrap();
    }
    vm.stop().unwrap();
}
