//! The receiving side: builds an empty VM from the source's Hello, fills its
//! memory, restores its state, and hands it to the runner on Commit.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{Scope, ScopedJoinHandle};
use std::time::Duration;

use ldt_migration::{
    decode_memory, decode_memory_table, memory_table_len, MemoryRange, MessageKind, PayloadReader,
    ProtocolError,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::digest::PageHashes;
use super::priority;
use super::transport::{Connection, Listener};
use super::{parse, Hello, MachineState, MigrationError, Ready};
use crate::arch::layout::PAGE_SIZE;
use crate::builder::{self, Machine};
use crate::devices::console::ConsoleOut;
use crate::vm::prefault::{self, PrefaultError, Prefaulted};
use crate::vm::MemBacking;

/// How long the destination waits for any one frame (or for its peer to
/// take one) once a source connected, unless `run --incoming-timeout` says
/// otherwise: a source that goes silent or trickles cannot hold it longer.
pub const DEFAULT_FRAME_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a refused connection gets to send its first frame and read the
/// answer.
const REFUSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Tells a peer why it is refused (bounded: a peer that does not read
/// cannot hold the destination).
fn refuse(conn: &mut Connection, why: &str) {
    eprintln!("ldt-vmm: refused a connection: {why}; still waiting");
    conn.send_abort(why, REFUSE_TIMEOUT);
}

/// Waits on `listener` for a source, reads its Hello and builds the VM.
/// A connection that closes before its Hello (a port probe) or sends
/// something else is answered (if it is still there) and dropped; the
/// destination keeps waiting. `frame_timeout` bounds every later receive.
pub fn accept(
    listener: &Listener,
    console: ConsoleOut,
    dirty_ring_entries: Option<u32>,
    mem_backing: MemBacking,
    frame_timeout: Duration,
) -> Result<(Connection, Hello, Machine), MigrationError> {
    let (mut conn, hello) = loop {
        let mut conn = listener.accept()?;
        conn.set_timeout(Some(frame_timeout))?;
        match conn.recv() {
            Ok(f) if f.kind == MessageKind::Hello => match parse::<Hello>("Hello", &f.payload) {
                Ok(h) => break (conn, h),
                Err(e) => refuse(&mut conn, &e.to_string()),
            },
            Ok(f) => refuse(&mut conn, &format!("expected Hello, got {:?}", f.kind)),
            Err(ProtocolError::Closed) => {
                eprintln!("ldt-vmm: a connection closed before its Hello; still waiting")
            }
            Err(e) => refuse(&mut conn, &format!("not a migration: {e}")),
        }
    };
    let res = hello.resources(console, dirty_ring_entries, mem_backing);
    match builder::build(&res) {
        Ok(machine) => {
            conn.send(MessageKind::HelloAck, &[])?;
            conn.flush()?;
            Ok((conn, hello, machine))
        }
        Err(e) => {
            conn.send_abort(
                &format!("destination cannot build the VM: {e}"),
                REFUSE_TIMEOUT,
            );
            Err(MigrationError::Build(e.to_string()))
        }
    }
}

/// The whole incoming side: waits for a source, builds the VM and receives
/// it. While one migration runs, every other connection gets an Abort
/// frame saying so (and never ends this one). The receiving runs on a
/// thread of its own at nice value `nice` (0: the VMM's), which ends with
/// it: the vCPUs, started later from the caller's, keep the VMM's priority.
pub fn incoming(
    listener: &Listener,
    console: ConsoleOut,
    dirty_ring_entries: Option<u32>,
    mem_backing: MemBacking,
    frame_timeout: Duration,
    nice: u8,
) -> Result<(Hello, Machine), MigrationError> {
    let (mut conn, hello, machine) = accept(
        listener,
        console,
        dirty_ring_entries,
        mem_backing,
        frame_timeout,
    )?;
    let done = AtomicBool::new(false);
    let received = std::thread::scope(|s| {
        s.spawn(|| refuse_while_busy(listener, &done));
        let r = priority::run_at_nice("incoming", nice, |n| {
            if n > 0 {
                eprintln!("ldt-vmm: receiving the migration at nice {n}");
            }
            receive(&mut conn, &hello, &machine)
        });
        done.store(true, Ordering::Relaxed);
        r
    });
    received.map(|_| (hello, machine))
}

/// Answers every connection with "busy" until `done`.
fn refuse_while_busy(listener: &Listener, done: &AtomicBool) {
    const POLL: Duration = Duration::from_millis(20);
    while !done.load(Ordering::Relaxed) {
        match listener.try_accept() {
            Ok(Some(mut conn)) => {
                // Read what the peer sent first (its Hello) so that closing
                // does not reset the connection before it reads the answer.
                let _ = conn.set_timeout(Some(REFUSE_TIMEOUT));
                let _ = conn.recv();
                refuse(
                    &mut conn,
                    "busy: this destination is already receiving a migration",
                );
            }
            Ok(None) => std::thread::sleep(POLL),
            Err(e) => {
                eprintln!("ldt-vmm: accepting a second connection: {e}");
                std::thread::sleep(POLL);
            }
        }
    }
}

/// Receives memory and state into `machine` until the source commits.
/// Returns the number of rounds received.
///
/// Once round 0 (all of the guest's memory) has arrived, a thread maps what
/// it received into KVM's EPT/NPT (`vm::prefault`) while later rounds
/// stream in, so the guest does not resume into one nested page fault per
/// page; it stops when the state arrives.
pub fn receive(
    conn: &mut Connection,
    hello: &Hello,
    machine: &Machine,
) -> Result<u32, MigrationError> {
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let r = receive_in(scope, &stop, conn, hello, machine);
        // Also after an error: the scope waits for the pre-fault thread.
        stop.store(true, Ordering::Relaxed);
        r
    })
}

fn receive_in<'s, 'e>(
    scope: &'s Scope<'s, 'e>,
    stop: &'e AtomicBool,
    conn: &mut Connection,
    hello: &Hello,
    machine: &Machine,
) -> Result<u32, MigrationError> {
    let mut prefault: Option<ScopedJoinHandle<'s, _>> = None;
    let mut rounds = 0;
    let mut restored = false;
    let mut received = hello.verify.then(|| PageHashes::zeroed(&machine.vm.slots));
    // The non-zero ranges of round 0, to pre-fault.
    let mut round0 = Some(Vec::new());
    loop {
        let start = conn.recv_start()?;
        if start.kind() == Some(MessageKind::Memory) && !restored {
            // Straight from the socket into guest memory: no buffer, no copy.
            receive_memory(
                machine,
                conn.payload(&start),
                received.as_mut(),
                round0.as_mut(),
            )?;
            continue;
        }
        let frame = conn.recv_rest(start)?;
        match frame.kind {
            MessageKind::Pages if !restored => receive_pages(
                machine,
                conn,
                &frame.payload,
                received.as_mut(),
                round0.as_mut(),
            )?,
            MessageKind::RoundEnd if !restored => {
                rounds += 1;
                if let (Some(ranges), Some(vcpu)) = (round0.take(), machine.vcpus.first()) {
                    let fd = vcpu.fd.as_raw_fd();
                    prefault = Some(scope.spawn(move || prefault::prefault(fd, &ranges, stop)));
                }
            }
            MessageKind::State if !restored => {
                // The vCPU's state is next: the pre-fault ends here.
                stop.store(true, Ordering::Relaxed);
                if let Some(t) = prefault.take() {
                    report_prefault(t.join().expect("the pre-fault thread does not panic"));
                }
                // Of what arrived (restoring MSR_KVM_WALL_CLOCK_NEW makes
                // KVM write the wall clock into guest memory at once).
                let digest = received.as_ref().map(PageHashes::digest);
                let t = std::time::Instant::now();
                restore_state(machine, &frame.payload, hello.binary_state)?;
                let restore_ms = Some(t.elapsed().as_secs_f64() * 1e3);
                restored = true;
                conn.send(
                    MessageKind::Ready,
                    &serde_json::to_vec(&Ready { digest, restore_ms }).expect("ready serializes"),
                )?;
                conn.flush()?;
            }
            MessageKind::Commit if restored => {
                conn.send(MessageKind::Resumed, &[])?;
                conn.flush()?;
                return Ok(rounds);
            }
            MessageKind::Abort => {
                return Err(MigrationError::Aborted(
                    String::from_utf8_lossy(&frame.payload).into_owned(),
                ))
            }
            k => return Err(MigrationError::Unexpected(k)),
        }
    }
}

/// One line on what the pre-fault did (it never fails the migration).
fn report_prefault(r: Result<Prefaulted, PrefaultError>) {
    match r {
        Ok(p) => eprintln!(
            "ldt-vmm: incoming: {} MiB of received memory mapped into KVM's page tables in {:.1} ms{}",
            p.bytes >> 20,
            p.ms,
            if p.stopped { " (stopped by the state)" } else { "" }
        ),
        Err(e) => eprintln!("ldt-vmm: incoming: no pre-fault: {e}"),
    }
}

/// Writes the pages of one memory message into guest memory.
pub fn apply_memory(machine: &Machine, payload: &[u8]) -> Result<(), MigrationError> {
    apply_memory_into(machine, payload, None)
}

/// `apply_memory`, recording each page in `hashes` (--verify).
pub fn apply_memory_into(
    machine: &Machine,
    payload: &[u8],
    mut hashes: Option<&mut PageHashes>,
) -> Result<(), MigrationError> {
    let (ranges, data) = decode_memory(payload)?;
    let mut off = 0usize;
    for r in ranges {
        let len = check_in_ram(machine, &r)?;
        if r.is_zero() {
            apply_zero_range(machine, &r, hashes.as_deref_mut())?;
        } else {
            let bytes = &data[off..off + len as usize];
            machine.vm.memory.write_slice(bytes, GuestAddress(r.gpa))?;
            if let Some(h) = hashes.as_mut() {
                record_pages(h, r.gpa, bytes);
            }
            off += len as usize;
        }
    }
    Ok(())
}

/// Receives one memory message from the stream into guest memory: the
/// table first (checked), then each non-zero range read in place. The
/// checksum is checked at the end; a frame that fails it fails the
/// migration, so the pages it wrote are never run.
fn receive_memory(
    machine: &Machine,
    mut payload: PayloadReader<'_, impl std::io::Read>,
    hashes: Option<&mut PageHashes>,
    filled: Option<&mut Vec<(u64, u64)>>,
) -> Result<(), MigrationError> {
    let mut count = [0u8; 4];
    payload.read_exact(&mut count)?;
    let table_len = memory_table_len(count, payload.left() + 4)?;
    let mut table = vec![0u8; table_len - 4];
    payload.read_exact(&mut table)?;
    let ranges = decode_memory_table(&table, payload.left())?;
    fill_ranges(machine, &ranges, hashes, filled, |bytes| {
        Ok(payload.read_exact(bytes)?)
    })?;
    payload.finish()?;
    Ok(())
}

/// Receives the data of a `Pages` message whose table is `table` from the
/// stream, each range straight into guest memory.
fn receive_pages(
    machine: &Machine,
    conn: &mut Connection,
    table: &[u8],
    hashes: Option<&mut PageHashes>,
    filled: Option<&mut Vec<(u64, u64)>>,
) -> Result<(), MigrationError> {
    let (ranges, _) = ldt_migration::decode_pages_table(table)?;
    fill_ranges(machine, &ranges, hashes, filled, |bytes| {
        populate(bytes);
        Ok(conn.recv_unframed(bytes)?)
    })
}

/// Applies `ranges` to guest memory, all checked to be guest RAM before
/// any is touched: a zero range is discarded, every other one filled in
/// place by `read`, in order; `hashes` records what each page now holds,
/// `filled` the (gpa, bytes) of each filled range.
fn fill_ranges(
    machine: &Machine,
    ranges: &[MemoryRange],
    mut hashes: Option<&mut PageHashes>,
    mut filled: Option<&mut Vec<(u64, u64)>>,
    mut read: impl FnMut(&mut [u8]) -> Result<(), MigrationError>,
) -> Result<(), MigrationError> {
    for r in ranges {
        check_in_ram(machine, r)?;
    }
    for r in ranges {
        if r.is_zero() {
            apply_zero_range(machine, r, hashes.as_deref_mut())?;
            continue;
        }
        // SAFETY: checked above to be guest RAM; see `guest_bytes`.
        let bytes = unsafe { guest_bytes(machine, r)? };
        read(bytes)?;
        if let Some(h) = hashes.as_mut() {
            record_pages(h, r.gpa, bytes);
        }
        if let Some(f) = filled.as_mut() {
            prefault::push_range(f, r.gpa, bytes.len() as u64);
        }
    }
    Ok(())
}

/// Allocates the pages of `bytes` in one system call, instead of one page
/// fault each while the socket's data is copied in (a fresh destination
/// populates all of the guest's non-zero memory in round 0). Best effort:
/// a kernel without MADV_POPULATE_WRITE (5.14) faults them in as before.
fn populate(bytes: &mut [u8]) {
    // SAFETY: advice on memory this process maps (guest RAM); populating
    // changes no contents.
    unsafe {
        libc::madvise(
            bytes.as_mut_ptr().cast(),
            bytes.len(),
            libc::MADV_POPULATE_WRITE,
        );
    }
}

/// The guest memory of range `r`, to fill.
///
/// # Safety
/// `r` must lie within one memslot (`check_in_ram`), and the VM must not
/// run (the destination's vCPUs do not before the state is restored), so
/// nothing else touches the bytes while the slice lives, and the slice must
/// not outlive `machine`.
unsafe fn guest_bytes<'a>(
    machine: &Machine,
    r: &MemoryRange,
) -> Result<&'a mut [u8], MigrationError> {
    let len = r.pages as usize * PAGE_SIZE as usize;
    let slice = machine.vm.memory.get_slice(GuestAddress(r.gpa), len)?;
    let ptr = slice.ptr_guard_mut().as_ptr();
    // SAFETY: `len` bytes mapped for the VM's lifetime; exclusive per
    // the caller.
    Ok(unsafe { std::slice::from_raw_parts_mut(ptr, len) })
}

/// The range's length in bytes, if it lies within one memslot of guest RAM.
fn check_in_ram(machine: &Machine, r: &MemoryRange) -> Result<u64, MigrationError> {
    let len = r.pages as u64 * PAGE_SIZE;
    let valid = machine
        .vm
        .slots
        .iter()
        .any(|s| r.gpa >= s.guest_addr && r.gpa + len <= s.guest_addr + s.size);
    if !valid {
        return Err(MigrationError::BadMessage(
            "Memory",
            format!("range {:#x}+{len:#x} is not guest RAM", r.gpa),
        ));
    }
    Ok(len)
}

fn apply_zero_range(
    machine: &Machine,
    r: &MemoryRange,
    hashes: Option<&mut PageHashes>,
) -> Result<(), MigrationError> {
    if let Some(h) = hashes {
        for p in 0..r.pages as u64 {
            h.set_zero(r.gpa + p * PAGE_SIZE);
        }
    }
    // Dropped, not written: costs nothing where the pages are zero
    // already (most of a fresh destination's RAM, in round 0), and
    // allocates nothing.
    crate::vm::memory::discard(
        &machine.vm.memory,
        machine.vm.backing,
        r.gpa,
        r.pages as u64 * PAGE_SIZE,
    )?;
    Ok(())
}

fn record_pages(h: &mut PageHashes, gpa: u64, bytes: &[u8]) {
    for (p, page) in bytes.chunks_exact(PAGE_SIZE as usize).enumerate() {
        h.set(gpa + p as u64 * PAGE_SIZE, page);
    }
}

/// Restores VM, vCPU and device state from a State message.
pub fn restore_state(
    machine: &Machine,
    payload: &[u8],
    binary: bool,
) -> Result<(), MigrationError> {
    let state = MachineState::decode(payload, binary)?;
    if state.vcpus.len() != machine.vcpus.len() {
        return Err(MigrationError::BadMessage(
            "State",
            format!(
                "{} vCPUs for a VM with {}",
                state.vcpus.len(),
                machine.vcpus.len()
            ),
        ));
    }
    for (i, s) in state.vcpus.iter().enumerate() {
        s.check(i)?;
    }
    match (&machine.vm.ldt_pv, &state.ldt_pv) {
        (Some(d), Some(s)) => d.restore(s),
        (None, Some(_)) => {
            return Err(MigrationError::BadMessage(
                "State",
                "ldt-pv device state for a VM without the device".into(),
            ))
        }
        // A device the source's state does not mention has no driver yet.
        _ => {}
    }
    state.vm.restore(&machine.vm.fd)?;
    for (v, s) in machine.vcpus.iter().zip(&state.vcpus) {
        s.restore(&v.fd)?;
    }
    machine
        .devices
        .lock()
        .unwrap()
        .restore(&state.devices)
        .map_err(|e| MigrationError::Build(e.to_string()))?;
    // The session that tracked the guest for the source (migration or
    // snapshot chain) ended there: the guest's driver is told to stop
    // (pending when it first runs here; a new session starts with START).
    if let Some(d) = machine.vm.ldt_pv.as_ref().filter(|d| d.announced().is_ok()) {
        d.post_stop();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::cpuid::CpuProfile;
    use crate::dirty::DirtySourceKind;
    use ldt_migration::{encode_memory_header, MemoryRange, RANGE_ZERO};

    fn message(gpa: u64, flags: u32, fill: u8) -> Vec<u8> {
        let mut m = encode_memory_header(&[MemoryRange {
            gpa,
            pages: 2,
            flags,
        }]);
        if flags & RANGE_ZERO == 0 {
            m.extend_from_slice(&[fill; 2 * PAGE_SIZE as usize]);
        }
        m
    }

    fn page(machine: &Machine, gpa: u64) -> Vec<u8> {
        let mut p = vec![0u8; PAGE_SIZE as usize];
        machine
            .vm
            .memory
            .read_slice(&mut p, GuestAddress(gpa))
            .unwrap();
        p
    }

    /// A destination's VM before any memory arrived.
    fn empty_machine(mem_mib: u64) -> Machine {
        empty_machine_on(mem_mib, MemBacking::Anon)
    }

    fn empty_machine_on(mem_mib: u64, backing: MemBacking) -> Machine {
        let hello = Hello {
            mem_mib,
            vcpus: 1,
            cpu_profile: CpuProfile::detect(),
            dirty_source: DirtySourceKind::KvmBitmap,
            verify: false,
            binary_state: true,
            snapshot: None,
            ldt_pv: false,
        };
        let (console, _out) = ConsoleOut::buffer();
        builder::build(&hello.resources(console, None, backing)).unwrap()
    }

    #[test]
    fn prefault_maps_memory_where_kvm_has_two_dimensional_paging_and_says_why_not_elsewhere() {
        let machine = empty_machine(4);
        let supported = machine
            .vm
            .kvm
            .check_extension_raw(kvm_bindings::KVM_CAP_PRE_FAULT_MEMORY.into())
            > 0;
        let stop = AtomicBool::new(false);
        let fd = machine.vcpus[0].fd.as_raw_fd();
        let r = prefault::prefault(fd, &[(0x10_0000, 0x4000), (0x20_0000, 0x10_0000)], &stop);
        if supported {
            let p = r.unwrap();
            assert_eq!((p.bytes, p.stopped), (0x10_4000, false));
            // Outside every memslot: an error naming where, not a hang.
            let e = prefault::prefault(fd, &[(1 << 40, 0x1000)], &stop).unwrap_err();
            assert!(
                matches!(e, PrefaultError::Failed { gpa, .. } if gpa == 1 << 40),
                "{e}"
            );
        } else {
            assert!(matches!(r, Err(PrefaultError::Unsupported(_))), "{r:?}");
        }
    }

    #[test]
    fn a_zero_range_clears_pages_written_before_and_leaves_zero_ones() {
        let machine = empty_machine(4);
        apply_memory(&machine, &message(0x10_0000, 0, 0xab)).unwrap();
        assert!(page(&machine, 0x10_1000).iter().all(|b| *b == 0xab));
        // A later round says the pages are zero now, and two never touched.
        apply_memory(&machine, &message(0x10_0000, RANGE_ZERO, 0)).unwrap();
        apply_memory(&machine, &message(0x20_0000, RANGE_ZERO, 0)).unwrap();
        for gpa in [0x10_0000, 0x10_1000, 0x20_0000, 0x20_1000] {
            assert!(page(&machine, gpa).iter().all(|b| *b == 0), "{gpa:#x}");
        }
    }

    /// Receives one framed memory message from `stream` as `receive` does.
    fn receive_framed(machine: &Machine, stream: &[u8]) -> Result<(), MigrationError> {
        let mut r = stream;
        let start = ldt_migration::read_frame_start(&mut r)?;
        receive_memory(machine, start.payload(&mut r), None, None)
    }

    fn framed(payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        ldt_migration::write_frame(&mut v, MessageKind::Memory, payload).unwrap();
        v
    }

    #[test]
    fn memory_received_in_place_lands_where_the_table_says() {
        let machine = empty_machine(4);
        receive_framed(&machine, &framed(&message(0x10_0000, 0, 0xcd))).unwrap();
        assert!(page(&machine, 0x10_0000).iter().all(|b| *b == 0xcd));
        assert!(page(&machine, 0x10_1000).iter().all(|b| *b == 0xcd));
        assert!(page(&machine, 0x10_2000).iter().all(|b| *b == 0));
        receive_framed(&machine, &framed(&message(0x10_0000, RANGE_ZERO, 0))).unwrap();
        assert!(page(&machine, 0x10_1000).iter().all(|b| *b == 0));
    }

    #[test]
    fn a_corrupted_or_misplaced_message_received_in_place_is_refused() {
        let machine = empty_machine(4);
        let mut bad = framed(&message(0x10_0000, 0, 0xcd));
        *bad.last_mut().unwrap() ^= 0x40;
        assert!(matches!(
            receive_framed(&machine, &bad),
            Err(MigrationError::Protocol(ProtocolError::Checksum))
        ));
        // Past the end of RAM: refused before any page is written.
        let outside = framed(&message(4 << 20, 0, 0xcd));
        assert!(matches!(
            receive_framed(&machine, &outside),
            Err(MigrationError::BadMessage(..))
        ));
        // A table announcing more data than the frame holds.
        let mut short = message(0x10_0000, 0, 0xcd);
        short.truncate(short.len() - 1);
        assert!(receive_framed(&machine, &framed(&short)).is_err());
    }

    /// Minor page faults taken by this thread so far.
    fn minor_faults() -> i64 {
        // SAFETY: getrusage fills the struct it is given.
        unsafe {
            let mut u: libc::rusage = std::mem::zeroed();
            assert_eq!(libc::getrusage(libc::RUSAGE_THREAD, &mut u), 0);
            u.ru_minflt
        }
    }

    #[test]
    fn a_zero_range_over_untouched_memory_costs_no_page_faults() {
        zero_ranges_over_untouched_memory_cost_no_page_faults(MemBacking::Anon);
        zero_ranges_over_untouched_memory_cost_no_page_faults(MemBacking::Thp);
        match crate::vm::memory::HugePagePool::reserve(32) {
            Ok(_pool) => {
                zero_ranges_over_untouched_memory_cost_no_page_faults(MemBacking::Hugetlbfs)
            }
            Err(e) => eprintln!("hugetlbfs skipped: {e}"),
        }
    }

    #[test]
    fn a_zero_range_clears_pages_on_huge_pages_too() {
        for backing in [MemBacking::Thp, MemBacking::Hugetlbfs] {
            let _pool = match backing {
                MemBacking::Hugetlbfs => match crate::vm::memory::HugePagePool::reserve(2) {
                    Ok(p) => Some(p),
                    Err(e) => {
                        eprintln!("hugetlbfs skipped: {e}");
                        continue;
                    }
                },
                _ => None,
            };
            let machine = empty_machine_on(4, backing);
            apply_memory(&machine, &message(0x10_0000, 0, 0xab)).unwrap();
            apply_memory(&machine, &message(0x10_2000, 0, 0xcd)).unwrap();
            // One of the two written ranges is zero now, inside a huge page.
            apply_memory(&machine, &message(0x10_0000, RANGE_ZERO, 0)).unwrap();
            for gpa in [0x10_0000, 0x10_1000] {
                assert!(
                    page(&machine, gpa).iter().all(|b| *b == 0),
                    "{backing} {gpa:#x}"
                );
            }
            for gpa in [0x10_2000, 0x10_3000] {
                assert!(
                    page(&machine, gpa).iter().all(|b| *b == 0xcd),
                    "{backing} {gpa:#x}"
                );
            }
        }
    }

    fn zero_ranges_over_untouched_memory_cost_no_page_faults(backing: MemBacking) {
        let machine = empty_machine_on(64, backing);
        // All of RAM above 1 MiB (the builder wrote nothing there), twice:
        // a peer may repeat a range as often as it likes.
        let pages = (63 << 20) / PAGE_SIZE as u32;
        let m = encode_memory_header(&[MemoryRange {
            gpa: 0x10_0000,
            pages,
            flags: RANGE_ZERO,
        }]);
        let before = minor_faults();
        apply_memory(&machine, &m).unwrap();
        apply_memory(&machine, &m).unwrap();
        let faults = minor_faults() - before;
        assert!(
            faults < 16,
            "{backing}: {faults} page faults for {pages} zero pages"
        );
        assert!(page(&machine, 0x20_0000).iter().all(|b| *b == 0));
    }
}
