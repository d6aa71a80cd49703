//! The receiving side: builds an empty VM from the source's Hello, fills its
//! memory, restores its state, and hands it to the runner on Commit.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ldt_migration::{decode_memory, MessageKind, ProtocolError};
use vm_memory::{Bytes, GuestAddress};

use super::digest::{PageHashes, PageIndex};
use super::transport::{Connection, Listener};
use super::{is_zero, parse, Hello, MachineState, MigrationError, Ready};
use crate::arch::layout::PAGE_SIZE;
use crate::builder::{self, Machine};
use crate::devices::console::ConsoleOut;
use crate::vm::MemorySlot;

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
    let res = hello.resources(console, dirty_ring_entries);
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
/// frame saying so (and never ends this one).
pub fn incoming(
    listener: &Listener,
    console: ConsoleOut,
    dirty_ring_entries: Option<u32>,
    frame_timeout: Duration,
) -> Result<(Hello, Machine), MigrationError> {
    let (mut conn, hello, machine) = accept(listener, console, dirty_ring_entries, frame_timeout)?;
    let done = AtomicBool::new(false);
    let received = std::thread::scope(|s| {
        s.spawn(|| refuse_while_busy(listener, &done));
        let r = receive(&mut conn, &hello, &machine);
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
pub fn receive(
    conn: &mut Connection,
    hello: &Hello,
    machine: &Machine,
) -> Result<u32, MigrationError> {
    let mut rounds = 0;
    let mut restored = false;
    let mut received = hello.verify.then(|| PageHashes::zeroed(&machine.vm.slots));
    let mut written = WrittenPages::new(&machine.vm.slots);
    loop {
        let frame = conn.recv()?;
        match frame.kind {
            MessageKind::Memory if !restored => apply_memory_into(
                machine,
                &frame.payload,
                received.as_mut(),
                Some(&mut written),
            )?,
            MessageKind::RoundEnd if !restored => rounds += 1,
            MessageKind::State if !restored => {
                // Of what arrived (restoring MSR_KVM_WALL_CLOCK_NEW makes
                // KVM write the wall clock into guest memory at once).
                let digest = received.as_ref().map(PageHashes::digest);
                let t = std::time::Instant::now();
                restore_state(machine, &frame.payload)?;
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

/// The pages of a fresh VM the stream has written data to. Every other
/// page is still zero, so a zero range there needs no look at memory (in
/// round 0, most of RAM: each look maps a page, slow in a nested machine).
pub struct WrittenPages {
    index: PageIndex,
    written: Vec<bool>,
}

impl WrittenPages {
    pub fn new(slots: &[MemorySlot]) -> Self {
        let index = PageIndex::new(slots);
        WrittenPages {
            written: vec![false; index.pages()],
            index,
        }
    }

    fn mark(&mut self, gpa: u64) {
        if let Some(i) = self.index.of(gpa) {
            self.written[i] = true;
        }
    }

    fn may_be_nonzero(&self, gpa: u64) -> bool {
        self.index.of(gpa).is_none_or(|i| self.written[i])
    }
}

/// Writes the pages of one memory message into guest memory.
pub fn apply_memory(machine: &Machine, payload: &[u8]) -> Result<(), MigrationError> {
    apply_memory_into(machine, payload, None, None)
}

/// `apply_memory`, recording each page in `hashes` (--verify), and
/// skipping zero pages that `written` knows are zero already.
pub fn apply_memory_into(
    machine: &Machine,
    payload: &[u8],
    mut hashes: Option<&mut PageHashes>,
    mut written: Option<&mut WrittenPages>,
) -> Result<(), MigrationError> {
    let zero = [0u8; PAGE_SIZE as usize];
    let (ranges, data) = decode_memory(payload)?;
    let mut off = 0usize;
    for r in ranges {
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
        if r.is_zero() {
            // Only pages that are not zero already: reading a page never
            // touched maps the shared zero page, writing it would allocate
            // it (most of a fresh destination's RAM, in round 0).
            let mut page = [0u8; PAGE_SIZE as usize];
            for p in 0..r.pages as u64 {
                let at = GuestAddress(r.gpa + p * PAGE_SIZE);
                if let Some(h) = hashes.as_mut() {
                    h.set_zero(at.0);
                }
                if written.as_ref().is_some_and(|w| !w.may_be_nonzero(at.0)) {
                    continue;
                }
                machine.vm.memory.read_slice(&mut page, at)?;
                if !is_zero(&page) {
                    machine.vm.memory.write_slice(&zero, at)?;
                }
            }
        } else {
            let bytes = &data[off..off + len as usize];
            machine.vm.memory.write_slice(bytes, GuestAddress(r.gpa))?;
            if let Some(h) = hashes.as_mut() {
                for (p, page) in bytes.chunks_exact(PAGE_SIZE as usize).enumerate() {
                    h.set(r.gpa + p as u64 * PAGE_SIZE, page);
                }
            }
            if let Some(w) = written.as_mut() {
                for p in 0..r.pages as u64 {
                    w.mark(r.gpa + p * PAGE_SIZE);
                }
            }
            off += len as usize;
        }
    }
    Ok(())
}

/// Restores VM, vCPU and device state from a State message.
pub fn restore_state(machine: &Machine, payload: &[u8]) -> Result<(), MigrationError> {
    let state: MachineState = parse("State", payload)?;
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
    state.vm.restore(&machine.vm.fd)?;
    for (v, s) in machine.vcpus.iter().zip(&state.vcpus) {
        s.restore(&v.fd)?;
    }
    machine
        .devices
        .lock()
        .unwrap()
        .restore(&state.devices)
        .map_err(|e| MigrationError::Build(e.to_string()))
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

    #[test]
    fn a_zero_range_clears_pages_written_before_and_leaves_zero_ones() {
        let hello = Hello {
            mem_mib: 4,
            vcpus: 1,
            cpu_profile: CpuProfile::detect(),
            dirty_source: DirtySourceKind::KvmBitmap,
            verify: false,
            snapshot: None,
        };
        let (console, _out) = ConsoleOut::buffer();
        let machine = builder::build(&hello.resources(console, None)).unwrap();
        apply_memory(&machine, &message(0x10_0000, 0, 0xab)).unwrap();
        assert!(page(&machine, 0x10_1000).iter().all(|b| *b == 0xab));
        // A later round says the pages are zero now, and two never touched.
        apply_memory(&machine, &message(0x10_0000, RANGE_ZERO, 0)).unwrap();
        apply_memory(&machine, &message(0x20_0000, RANGE_ZERO, 0)).unwrap();
        for gpa in [0x10_0000, 0x10_1000, 0x20_0000, 0x20_1000] {
            assert!(page(&machine, gpa).iter().all(|b| *b == 0), "{gpa:#x}");
        }
    }
}
