//! The flat-payload harness: runs the built-in `writer` payload one round at
//! a time, telling it which pages to write, so tests and benchmarks know the
//! exact set of pages the guest wrote in every round.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use crate::arch::cpuid::CpuProfile;
use crate::arch::layout::{FLAT_CMD_ADDR, FLAT_CMD_END, PAGE_SIZE};
use crate::builder::{self, BootSource, BuildError, Machine, VmResources};
use crate::devices::console::ConsoleOut;
use crate::vm::vcpu::{VcpuError, VcpuEvent};
use crate::vm::MemBacking;

/// The writer payload (see `payloads/writer.S`).
pub const WRITER_PAYLOAD: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/writer.bin"));
/// A payload that prints a line from ring 3 and resets.
pub const HELLO_PAYLOAD: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/hello.bin"));
/// A payload that increments a counter at 0x300000 forever.
pub const SPIN_PAYLOAD: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/spin.bin"));
/// Prints a counter and dirties ~16 pages per line (migration tests).
pub const COUNTER_SLOW_PAYLOAD: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/counter-slow.bin"));
/// Prints a counter and dirties 4096 pages per line without pause.
pub const COUNTER_FAST_PAYLOAD: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/counter-fast.bin"));
/// A payload that finds the pvpanic port in CPUID and reports a panic.
pub const PVPANIC_PAYLOAD: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/pvpanic.bin"));
/// The ldt-pv guest driver (`payloads/ldt-pv.S`): announces, answers
/// every request, keeps writing its working set.
pub const LDT_PV_PAYLOAD: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ldt-pv.bin"));
/// The ldt-pv driver writing the pages the harness lists (like `writer`).
pub const LDT_PV_HARNESS_PAYLOAD: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/ldt-pv-harness.bin"));
/// The ldt-pv driver's failure modes: never announces; never answers
/// HARVEST; answers it with a wrong sequence number; with an error status;
/// leaves (ANNOUNCE 0) after its second harvest.
pub const LDT_PV_NOANNOUNCE_PAYLOAD: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/ldt-pv-noannounce.bin"));
pub const LDT_PV_NOHARVEST_PAYLOAD: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/ldt-pv-noharvest.bin"));
pub const LDT_PV_BADSEQ_PAYLOAD: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/ldt-pv-badseq.bin"));
pub const LDT_PV_BADSTATUS_PAYLOAD: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/ldt-pv-badstatus.bin"));
pub const LDT_PV_WITHDRAW_PAYLOAD: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/ldt-pv-withdraw.bin"));
/// The ldt-pv driver that writes a page it never reports (`HIDE=1`).
pub const LDT_PV_HIDE_PAYLOAD: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ldt-pv-hide.bin"));
/// A payload that triple-faults.
pub const TRIPLE_FAULT_PAYLOAD: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/triple-fault.bin"));

const OP_STOP: u32 = 0;
const OP_WRITE: u32 = 1;
const HEADER_BYTES: u64 = 16;

/// Most pages one command can list.
pub const MAX_PAGES_PER_COMMAND: usize =
    ((FLAT_CMD_END - FLAT_CMD_ADDR - HEADER_BYTES) / 4) as usize;

/// Errors of the harness.
#[derive(Debug, thiserror::Error)]
pub enum FlatError {
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("writing the command block: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    #[error("cannot write the payload to a temporary file: {0}")]
    Io(#[from] std::io::Error),
    #[error("payload ended the VM before its sync point")]
    UnexpectedReset,
    #[error("command lists {0} pages, at most {MAX_PAGES_PER_COMMAND} fit")]
    TooManyPages(usize),
    #[error("bytes per page must be 1..=4096 (got {0})")]
    BadBytes(u32),
    #[error("the ldt-pv harness payload: {0}")]
    Harness(String),
}

/// A VM running the writer payload, stopped at its sync point between rounds.
pub struct WriterVm {
    pub machine: Machine,
    pub console: Arc<Mutex<Vec<u8>>>,
    rounds: u32,
}

/// Writes an embedded payload to a file (the loader takes a path, like the CLI).
pub fn payload_file(bytes: &[u8], name: &str) -> std::io::Result<tempfile_path::TempPath> {
    tempfile_path::TempPath::create(bytes, name)
}

impl WriterVm {
    /// Boots the writer with `mem_mib` MiB of RAM and runs it to its first
    /// sync point. `dirty_ring` enables KVM's dirty ring with that many entries.
    pub fn new(mem_mib: u64, dirty_ring: Option<u32>) -> Result<Self, FlatError> {
        Self::with_backing(mem_mib, dirty_ring, MemBacking::Anon)
    }

    /// `new`, with guest RAM backed as `mem_backing` says.
    pub fn with_backing(
        mem_mib: u64,
        dirty_ring: Option<u32>,
        mem_backing: MemBacking,
    ) -> Result<Self, FlatError> {
        let file = payload_file(WRITER_PAYLOAD, "writer")?;
        let (out, console) = ConsoleOut::buffer();
        let res = VmResources {
            mem_mib,
            vcpus: 1,
            cpu_profile: CpuProfile::detect(),
            boot: BootSource::Flat(file.path().to_path_buf()),
            dirty_ring_entries: dirty_ring,
            console: out,
            mem_backing,
            ldt_pv: false,
        };
        let machine = builder::build(&res)?;
        let mut vm = WriterVm {
            machine,
            console,
            rounds: 0,
        };
        vm.resume_to_sync()?;
        Ok(vm)
    }

    /// Guest-physical pages (4 KiB aligned) of the command block that a
    /// command listing `pages` pages occupies: the VMM writes them.
    pub fn command_pages(pages: usize) -> Vec<u64> {
        let end = FLAT_CMD_ADDR + HEADER_BYTES + 4 * pages as u64;
        (FLAT_CMD_ADDR..end).step_by(PAGE_SIZE as usize).collect()
    }

    /// Runs one round: the payload writes `bytes` bytes of `value` at the
    /// start of each page in `pages` (guest-physical, page aligned), then
    /// stops at its sync point. Returns the time the vCPU ran.
    pub fn write_round(
        &mut self,
        pages: &[u64],
        bytes: u32,
        value: u8,
    ) -> Result<Duration, FlatError> {
        if pages.len() > MAX_PAGES_PER_COMMAND {
            return Err(FlatError::TooManyPages(pages.len()));
        }
        if bytes == 0 || bytes as u64 > PAGE_SIZE {
            return Err(FlatError::BadBytes(bytes));
        }
        let mut block = Vec::with_capacity(HEADER_BYTES as usize + 4 * pages.len());
        for w in [OP_WRITE, pages.len() as u32, bytes, value as u32] {
            block.extend_from_slice(&w.to_le_bytes());
        }
        for p in pages {
            block.extend_from_slice(&((p / PAGE_SIZE) as u32).to_le_bytes());
        }
        self.machine
            .vm
            .memory
            .write_slice(&block, GuestAddress(FLAT_CMD_ADDR))?;
        let t = Instant::now();
        self.resume_to_sync()?;
        Ok(t.elapsed())
    }

    /// Tells the payload to stop; it resets the VM.
    pub fn stop(mut self) -> Result<(), FlatError> {
        self.machine
            .vm
            .memory
            .write_obj(OP_STOP, GuestAddress(FLAT_CMD_ADDR))?;
        match self.machine.vcpus[0].run()? {
            VcpuEvent::Reset => Ok(()),
            other => Err(VcpuError::Unexpected {
                cpu: 0,
                exit: format!("{other:?} instead of the reset"),
            }
            .into()),
        }
    }

    /// Rounds completed so far.
    pub fn rounds(&self) -> u32 {
        self.rounds
    }

    fn resume_to_sync(&mut self) -> Result<(), FlatError> {
        loop {
            match self.machine.vcpus[0].run()? {
                VcpuEvent::FlatSync(n) => {
                    self.rounds = n;
                    return Ok(());
                }
                VcpuEvent::Kicked => continue,
                VcpuEvent::Reset | VcpuEvent::GuestPanic => return Err(FlatError::UnexpectedReset),
            }
        }
    }
}

/// Where `LdtPvWriterVm`'s payload keeps its own record of the frames it
/// wrote (one bit a frame, `payloads/ldt-pv.S`).
pub const LDT_PV_RECORD_ADDR: u64 = 0x18_0000;
/// The harness payload's command block starts with a generation word.
const LDT_PV_GEN_BYTES: u64 = 4;

/// The ldt-pv harness payload on its own vCPU thread (a guest-ldt harvest
/// waits for the guest's answer, so the guest must run meanwhile), told
/// which pages to write each round, as `WriterVm` tells the writer.
pub struct LdtPvWriterVm {
    pub vm: Arc<crate::vm::Vm>,
    pub console: Arc<Mutex<Vec<u8>>>,
    generation: u32,
    synced: std::sync::mpsc::Receiver<Result<u32, String>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LdtPvWriterVm {
    /// Boots the payload with the ldt-pv device and waits (at most 60 s)
    /// until its driver announced itself.
    pub fn new(mem_mib: u64) -> Result<Self, FlatError> {
        let file = payload_file(LDT_PV_HARNESS_PAYLOAD, "ldt-pv-harness")?;
        let (out, console) = ConsoleOut::buffer();
        let machine = builder::build(&VmResources {
            mem_mib,
            vcpus: 1,
            cpu_profile: CpuProfile::detect(),
            boot: BootSource::Flat(file.path().to_path_buf()),
            dirty_ring_entries: None,
            console: out,
            ldt_pv: true,
            mem_backing: crate::vm::MemBacking::Anon,
        })?;
        let vm = machine.vm.clone();
        let mut vcpu = machine.vcpus.into_iter().next().expect("one vCPU");
        let (tx, synced) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("ldt-pv-vcpu".into())
            .spawn(move || loop {
                let sent = match vcpu.run() {
                    Ok(VcpuEvent::FlatSync(g)) => tx.send(Ok(g)),
                    Ok(VcpuEvent::Kicked) => continue,
                    Ok(VcpuEvent::Reset) => return,
                    other => {
                        let _ = tx.send(Err(format!("{other:?}")));
                        return;
                    }
                };
                if sent.is_err() {
                    return;
                }
            })?;
        let device = vm.ldt_pv.clone().expect("built with ldt-pv");
        let t = Instant::now();
        while device.announced().is_err() {
            if t.elapsed() > Duration::from_secs(60) {
                return Err(FlatError::Harness("never announced".into()));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(LdtPvWriterVm {
            vm,
            console,
            generation: 0,
            synced,
            thread: Some(thread),
        })
    }

    /// Pages of the command block a command listing `pages` pages
    /// occupies (the VMM writes them), and the payload's record pages
    /// (it reports them in every harvest): the pages a harvest may hold
    /// besides those written.
    pub fn named_pages(&self, pages: usize) -> Vec<u64> {
        let frames = self.vm.ldt_pv.as_ref().map_or(0, |d| d.frames());
        Self::named_pages_for(frames, pages)
    }

    /// `named_pages` for a VM whose bitmap covers `frames` frames.
    pub fn named_pages_for(frames: u64, pages: usize) -> Vec<u64> {
        let end = FLAT_CMD_ADDR + LDT_PV_GEN_BYTES + HEADER_BYTES + 4 * pages as u64;
        let record_end = LDT_PV_RECORD_ADDR + frames.div_ceil(8);
        (FLAT_CMD_ADDR..end)
            .step_by(PAGE_SIZE as usize)
            .chain((LDT_PV_RECORD_ADDR..record_end).step_by(PAGE_SIZE as usize))
            .collect()
    }

    /// Most pages one round can list.
    pub const MAX_PAGES: usize = MAX_PAGES_PER_COMMAND - 1;

    /// One round: the payload writes `bytes` bytes of `value` at the start
    /// of each page in `pages` (guest-physical, page aligned, at 2 MiB or
    /// above) and signals. Returns the time from the command to the signal.
    pub fn write_round(
        &mut self,
        pages: &[u64],
        bytes: u32,
        value: u8,
    ) -> Result<Duration, FlatError> {
        if pages.len() > Self::MAX_PAGES {
            return Err(FlatError::TooManyPages(pages.len()));
        }
        if bytes == 0 || bytes as u64 > PAGE_SIZE {
            return Err(FlatError::BadBytes(bytes));
        }
        let mut block = Vec::with_capacity(HEADER_BYTES as usize + 4 * pages.len());
        for w in [OP_WRITE, pages.len() as u32, bytes, value as u32] {
            block.extend_from_slice(&w.to_le_bytes());
        }
        for p in pages {
            block.extend_from_slice(&((p / PAGE_SIZE) as u32).to_le_bytes());
        }
        self.command(&block)
    }

    /// Tells the payload to stop; it resets the VM and its thread ends.
    pub fn stop(mut self) -> Result<(), FlatError> {
        self.generation += 1;
        let mut block = self.generation.to_le_bytes().to_vec();
        block.extend_from_slice(&OP_STOP.to_le_bytes());
        self.write_block(&block)?;
        if let Some(t) = self.thread.take() {
            t.join()
                .map_err(|_| FlatError::Harness("vCPU thread panicked".into()))?;
        }
        Ok(())
    }

    fn write_block(&self, block: &[u8]) -> Result<(), FlatError> {
        // The generation word last: the payload acts when it changes.
        let gen = LDT_PV_GEN_BYTES as usize;
        self.vm
            .memory
            .write_slice(&block[gen..], GuestAddress(FLAT_CMD_ADDR + gen as u64))?;
        self.vm
            .memory
            .write_slice(&block[..gen], GuestAddress(FLAT_CMD_ADDR))?;
        Ok(())
    }

    fn command(&mut self, body: &[u8]) -> Result<Duration, FlatError> {
        self.generation += 1;
        let mut block = self.generation.to_le_bytes().to_vec();
        block.extend_from_slice(body);
        let t = Instant::now();
        self.write_block(&block)?;
        match self.synced.recv_timeout(Duration::from_secs(60)) {
            Ok(Ok(g)) if g == self.generation => Ok(t.elapsed()),
            Ok(Ok(g)) => Err(FlatError::Harness(format!(
                "signalled generation {g}, expected {}",
                self.generation
            ))),
            Ok(Err(e)) => Err(FlatError::Harness(e)),
            Err(e) => Err(FlatError::Harness(format!("no signal: {e}"))),
        }
    }
}

/// A file holding an embedded payload, removed when dropped.
pub mod tempfile_path {
    use std::path::{Path, PathBuf};

    pub struct TempPath(PathBuf);

    impl TempPath {
        pub fn create(bytes: &[u8], name: &str) -> std::io::Result<TempPath> {
            static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let path =
                std::env::temp_dir().join(format!("ldt-vmm-{}-{n}-{name}.bin", std::process::id()));
            std::fs::write(&path, bytes)?;
            Ok(TempPath(path))
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

/// Counter values printed by the counter payloads ("c%016x" lines).
pub fn counter_values(console: &[u8]) -> Vec<u64> {
    String::from_utf8_lossy(console)
        .lines()
        .filter_map(|l| l.strip_prefix('c'))
        .filter(|h| h.len() == 16)
        .filter_map(|h| u64::from_str_radix(h, 16).ok())
        .collect()
}
