//! The sending side: pre-copy rounds from a dirty source, then the switch-over.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ldt_migration::{encode_memory_header, MemoryRange, MessageKind, RANGE_ZERO};
use serde::{Deserialize, Serialize};

use super::digest::PageHashes;
use super::priority;
use super::report::{
    memcpy_rate_mb_s, DowntimeBreakdown, GuestLdtFinal, MigrationReport, Progress, RoundStats,
};
use super::throttle::Throttle;
use super::transport::{self, Connection, Endpoint, FrameSink};
use super::{page_is_zero, parse, Hello, MachineState, MigrationError, Ready};
use crate::arch::layout::PAGE_SIZE;
use crate::dirty::{self, guest_ldt, DirtyBitmap, DirtySource, DirtySourceKind};
use crate::runner::{RunState, TrackingUser, VmControl};
use crate::vm::state::{msr_index_list, VcpuState, VmState};

/// Data pages per memory message (4 MiB).
const CHUNK_PAGES: u64 = 1024;
/// Pages a memory message covers in all: zero pages cost only a table
/// entry per run, so a mostly zero round 0 needs few messages.
const CHUNK_SPAN_PAGES: u64 = 16 * CHUNK_PAGES;

/// Deadlines. While the guest runs (pre-copy), every send, flush and
/// receive must complete within `PRECOPY_STALL` (longer when a bandwidth
/// limit makes one 4 MiB message slower: 4 × its time at the limit). From the
/// pause on, everything up to the destination's Resumed shares one budget:
///
/// ```text
/// switch-over budget = SWITCHOVER_SLACK + 4 × max(downtime target, expected downtime)
/// ```
///
/// (the expected downtime exceeds the target only under `--policy force`).
/// A destination that stops reading or does not answer in time before
/// Commit ends the migration with the guest running here again; after
/// Commit, the outcome is unknown (see `MigrationError::OutcomeUnknown`).
pub const PRECOPY_STALL: Duration = Duration::from_secs(10);
pub const SWITCHOVER_SLACK: Duration = Duration::from_secs(2);
/// Threads hashing the source's memory after the commit (--verify).
const VERIFY_THREADS: usize = 2;
/// Time the source gives a best-effort Abort to leave.
const ABORT_WITHIN: Duration = Duration::from_millis(200);

/// Switch-over costs besides the last dirty pages, counted in the estimate
/// (measured here: pause, final harvest, restore and the commit round trip
/// take about 1 ms together on a quiet machine; the state is a few KiB of
/// JSON per vCPU, estimated high).
const FIXED_SWITCHOVER_MS: f64 = 2.0;
const STATE_BYTES_PER_VCPU: u64 = 64 << 10;
/// Another round is taken (while the estimate is under the target already)
/// only while it at least halves what the previous round sent, and while
/// the rest is worth a round at all.
const SHRINK_FACTOR: f64 = 0.5;
const MIN_PAGES_WORTH_A_ROUND: u64 = 64;

/// Expected downtime: the rest of memory and the state at the last round's
/// rate, plus the fixed final-round costs.
fn switchover_estimate_ms(remaining_bytes: u64, vcpus: usize, bytes_s: f64) -> f64 {
    let state = STATE_BYTES_PER_VCPU * vcpus as u64;
    (remaining_bytes + state) as f64 / bytes_s.max(1.0) * 1e3 + FIXED_SWITCHOVER_MS
}

/// Whether one more pre-copy round shrinks the final set meaningfully: the
/// pages dirtied while the last round (of `sent_pages`) went out are at
/// most half of it, and enough to be worth it. A guest dirtying at half
/// the link's rate or more gains nothing from more rounds.
fn another_round_pays(dirty_pages: u64, sent_pages: u64) -> bool {
    dirty_pages > MIN_PAGES_WORTH_A_ROUND
        && (dirty_pages as f64) <= sent_pages as f64 * SHRINK_FACTOR
}

/// Whether guest-ldt's final set (of `set_pages`, harvested by the guest
/// with KVM's log armed) is worth sending with the vCPUs still running:
/// only when the guest rewrites less than half of it meanwhile (at the last
/// round's rates). Otherwise it goes in the pause at once: sent running, it
/// costs the guest KVM's write faults for as long as it takes and still
/// leaves most of it to resend.
fn guest_final_send_pays(set_pages: u64, dirty_rate_pages_s: f64, bytes_s: f64) -> bool {
    let send_s = (set_pages * PAGE_SIZE) as f64 / bytes_s.max(1.0);
    dirty_rate_pages_s * send_s < set_pages as f64 * SHRINK_FACTOR
}

/// The per-operation bound while the guest runs.
pub fn precopy_timeout(opts: &MigrateOptions) -> Duration {
    let chunk = (CHUNK_PAGES * PAGE_SIZE) as f64;
    match opts.bandwidth_limit_mbps {
        Some(m) => PRECOPY_STALL.max(Duration::from_secs_f64(
            4.0 * chunk / (m.max(1) as f64 * 1e6),
        )),
        None => PRECOPY_STALL,
    }
}

/// The switch-over budget (formula above).
pub fn switchover_budget(opts: &MigrateOptions, expected_ms: f64) -> Duration {
    let worst_ms = (opts.downtime_ms as f64).max(expected_ms);
    SWITCHOVER_SLACK + Duration::from_secs_f64(4.0 * worst_ms / 1e3)
}

/// What to do when the rounds or the time run out before convergence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ConvergencePolicy {
    /// Give up; the VM keeps running on the source.
    Cancel,
    /// Switch over anyway, with a longer downtime.
    Force,
}

/// Parameters of one migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrateOptions {
    pub to: Endpoint,
    pub dirty_source: DirtySourceKind,
    pub downtime_ms: u64,
    pub max_rounds: u32,
    pub timeout_s: u64,
    pub policy: ConvergencePolicy,
    /// MB/s; `None` for no limit.
    pub bandwidth_limit_mbps: Option<u64>,
    pub verify: bool,
    /// Throttle the vCPUs when rounds do not shrink (see `throttle`).
    #[serde(default)]
    pub auto_converge: bool,
    /// Nice value of the thread that sends the rounds while the vCPUs run
    /// (0: the VMM's own); the switch-over runs at the VMM's priority.
    #[serde(default)]
    pub precopy_nice: u8,
}

/// One memory message being filled: runs of zero and non-zero pages, and
/// where the non-zero ones' data is: runs of guest memory, sent from
/// there, or (`copy`) a copy of each page taken as it was hashed, so that
/// what is sent is what --verify recorded.
struct Chunk {
    ranges: Vec<MemoryRange>,
    /// (host address, bytes) of the data in guest memory.
    runs: Vec<(usize, usize)>,
    data: Vec<u8>,
    copy: bool,
    pages: u64,
    data_pages: u64,
}

impl Chunk {
    fn new(copy: bool) -> Self {
        Chunk {
            ranges: Vec::new(),
            runs: Vec::new(),
            data: Vec::with_capacity(if copy {
                (CHUNK_PAGES * PAGE_SIZE) as usize
            } else {
                0
            }),
            copy,
            pages: 0,
            data_pages: 0,
        }
    }

    /// Appends the page at `gpa` to the table.
    fn push_range(&mut self, gpa: u64, zero: bool) {
        let flags = if zero { RANGE_ZERO } else { 0 };
        match self.ranges.last_mut() {
            Some(r) if r.flags == flags && r.gpa + r.pages as u64 * PAGE_SIZE == gpa => {
                r.pages += 1
            }
            _ => self.ranges.push(MemoryRange {
                gpa,
                pages: 1,
                flags,
            }),
        }
        self.pages += 1;
    }

    /// Appends the non-zero page at `gpa`, mapped at `src`; returns its
    /// bytes as they will be sent.
    ///
    /// # Safety
    /// `src` maps the page for the VM's lifetime, page-aligned.
    unsafe fn push_data(&mut self, gpa: u64, src: *const u8) -> &[u8] {
        let page = PAGE_SIZE as usize;
        self.push_range(gpa, false);
        self.data_pages += 1;
        if self.copy {
            let at = self.data.len();
            // SAFETY: `src` per the caller; the destination is reserved
            // capacity (at most CHUNK_PAGES pages before `full`),
            // initialized by the copy.
            unsafe {
                std::ptr::copy_nonoverlapping(src, self.data.as_mut_ptr().add(at), page);
                self.data.set_len(at + page);
            }
            return &self.data[at..];
        }
        let addr = src as usize;
        match self.runs.last_mut() {
            Some((start, len)) if *start + *len == addr => *len += page,
            _ => self.runs.push((addr, page)),
        }
        // SAFETY: per the caller.
        unsafe { std::slice::from_raw_parts(src, page) }
    }

    fn full(&self) -> bool {
        self.data_pages >= CHUNK_PAGES || self.pages >= CHUNK_SPAN_PAGES
    }

    fn clear(&mut self) {
        self.ranges.clear();
        self.runs.clear();
        self.data.clear();
        self.pages = 0;
        self.data_pages = 0;
    }
}

/// Sends the pages of `dirty`, in messages of up to 4 MiB of data;
/// all-zero pages go as flags.
pub(crate) struct Sender<'a> {
    pub ctl: &'a VmControl,
    /// Set by `migrate-cancel`: checked before every message.
    pub cancel: Option<&'a AtomicBool>,
    /// With --verify: a CRC-32 of every page as last sent.
    pub sent_hashes: Option<PageHashes>,
    pub limit_bytes_s: Option<f64>,
    started: Instant,
    sent_total: u64,
    copy_time: Duration,
    memory_bytes: u64,
    chunk: Chunk,
}

/// Runs this long or longer are probed in the pagemap before being read.
const PROBE_MIN_PAGES: u64 = 64;

impl<'a> Sender<'a> {
    pub fn new(ctl: &'a VmControl, limit_mbps: Option<u64>, sent_total: u64) -> Self {
        Sender {
            ctl,
            cancel: None,
            sent_hashes: None,
            limit_bytes_s: limit_mbps.map(|m| m as f64 * 1e6),
            started: Instant::now(),
            sent_total,
            copy_time: Duration::ZERO,
            memory_bytes: 0,
            chunk: Chunk::new(false),
        }
    }

    /// Records a CRC-32 of every page as sent (--verify); pages are then
    /// copied before they are hashed and sent.
    pub fn record_hashes(&mut self, hashes: PageHashes) {
        self.sent_hashes = Some(hashes);
        self.chunk = Chunk::new(true);
    }

    /// The host address of `gpa` and the number of pages from it up to
    /// `end` that lie in the same memslot.
    fn host_run(&self, gpa: u64, end: u64) -> Result<(*const u8, u64), MigrationError> {
        let slot = self
            .ctl
            .vm
            .slots
            .iter()
            .find(|s| gpa >= s.guest_addr && gpa < s.guest_addr + s.size)
            .ok_or(vm_memory::GuestMemoryError::InvalidGuestAddress(
                vm_memory::GuestAddress(gpa),
            ))?;
        let pages = (end.min(slot.guest_addr + slot.size) - gpa) / PAGE_SIZE;
        Ok((
            (slot.host_addr + (gpa - slot.guest_addr)) as *const u8,
            pages,
        ))
    }

    /// Sends every page of `dirty`, then a RoundEnd.
    pub fn send_round(
        &mut self,
        sink: &mut dyn FrameSink,
        round: u32,
        dirty: &DirtyBitmap,
    ) -> Result<RoundStats, MigrationError> {
        let t = Instant::now();
        let before = sink.bytes_sent();
        let mut stats = RoundStats {
            round,
            ..Default::default()
        };
        // One pass over guest memory: each page is tested for zero where
        // it lies, and a non-zero one goes from there to the socket (or is
        // copied once, with --verify).
        // Scattered dirty runs are packed into full messages: one frame,
        // one checksum and one range table per message, not per run.
        let page = PAGE_SIZE as usize;
        for (start, len) in dirty.ranges() {
            let end = start + len;
            let mut gpa = start;
            while gpa < end {
                let (host, pages) = self.host_run(gpa, end)?;
                // Pages never populated read as zero: not read (that would
                // fault in a page for nothing; most of a fresh guest's RAM
                // in round 0 is such). A page populated after the probe is
                // a write the dirty source reports.
                let never = (pages >= PROBE_MIN_PAGES)
                    .then(|| crate::vm::memory::untouched_pages(host, pages))
                    .flatten();
                for p in 0..pages as usize {
                    let page_gpa = gpa + (p * page) as u64;
                    // SAFETY: `host` maps the memslot's pages from `gpa`
                    // on, `pages` of them (`host_run`), for as long as the
                    // VM lives; page-aligned. vCPUs may write the page
                    // meanwhile: then the dirty source reports it again
                    // and a later round resends it.
                    let src = unsafe { host.add(p * page) };
                    let zero = never.as_ref().is_some_and(|n| n[p]) || unsafe { page_is_zero(src) };
                    if zero {
                        self.chunk.push_range(page_gpa, true);
                        if let Some(h) = self.sent_hashes.as_mut() {
                            h.set_zero(page_gpa)
                        }
                    } else {
                        // SAFETY: as above.
                        let bytes = unsafe { self.chunk.push_data(page_gpa, src) };
                        if let Some(h) = self.sent_hashes.as_mut() {
                            h.set(page_gpa, bytes)
                        }
                    }
                    if self.chunk.full() {
                        self.send_chunk(sink, &mut stats)?;
                    }
                }
                gpa += pages * PAGE_SIZE;
            }
        }
        if self.chunk.pages > 0 {
            self.send_chunk(sink, &mut stats)?;
        }
        sink.send(MessageKind::RoundEnd, &round.to_le_bytes())?;
        sink.flush()?;
        stats.bytes = sink.bytes_sent() - before;
        let secs = t.elapsed().as_secs_f64();
        stats.duration_ms = secs * 1e3;
        stats.bandwidth_mb_s = stats.bytes as f64 / secs.max(1e-9) / 1e6;
        self.copy_time += t.elapsed();
        Ok(stats)
    }

    /// Sends the filled chunk as one message: its table, then its data.
    fn send_chunk(
        &mut self,
        sink: &mut dyn FrameSink,
        stats: &mut RoundStats,
    ) -> Result<(), MigrationError> {
        check_cancel(self.cancel)?;
        for r in &self.chunk.ranges {
            if r.is_zero() {
                stats.zero_pages += r.pages as u64;
            }
        }
        stats.pages += self.chunk.pages;
        let table = encode_memory_header(&self.chunk.ranges);
        let data: Vec<&[u8]> = if self.chunk.copy {
            vec![&self.chunk.data]
        } else {
            self.chunk
                .runs
                .iter()
                // SAFETY: runs of guest memory (`push_data`), mapped for
                // the VM's lifetime.
                .map(|&(addr, len)| unsafe { std::slice::from_raw_parts(addr as *const u8, len) })
                .collect()
        };
        sink.send_memory(&table, &data)?;
        self.memory_bytes += self.chunk.pages * PAGE_SIZE;
        self.chunk.clear();
        self.throttle(sink)?;
        Ok(())
    }

    /// Sleeps as needed to stay under the bandwidth limit.
    fn throttle(&mut self, sink: &mut dyn FrameSink) -> Result<(), MigrationError> {
        let Some(limit) = self.limit_bytes_s else {
            return Ok(());
        };
        let sent = (sink.bytes_sent() - self.sent_total) as f64;
        let due = Duration::from_secs_f64(sent / limit);
        let elapsed = self.started.elapsed();
        if due > elapsed {
            sink.flush()?;
            std::thread::sleep(due - elapsed);
        }
        Ok(())
    }
}

/// Fails with `Cancelled` once `cancel` is set.
fn check_cancel(cancel: Option<&AtomicBool>) -> Result<(), MigrationError> {
    match cancel {
        Some(c) if c.load(Ordering::Relaxed) => Err(MigrationError::Cancelled),
        _ => Ok(()),
    }
}

/// Time since the last lap.
struct Lap(Instant);

impl Lap {
    fn ms(&mut self) -> f64 {
        let now = Instant::now();
        let ms = (now - self.0).as_secs_f64() * 1e3;
        self.0 = now;
        ms
    }
}

/// The pages of the guest areas KVM writes through MSR registrations
/// (kvmclock, steal time, PV EOI, async PF); the VM must be paused.
pub(crate) fn kvm_msr_areas(ctl: &VmControl) -> Result<Vec<u64>, dirty::DirtyError> {
    let vcpus: Vec<_> = ctl.vcpus.iter().map(|v| v.lock().unwrap()).collect();
    let fds: Vec<_> = vcpus.iter().map(|v| &v.fd).collect();
    guest_ldt::kvm_msr_area_pages(&fds)
}

/// Saves VM, vCPU and device state; the VM must be paused.
pub(crate) fn save_machine_state(ctl: &VmControl) -> Result<MachineState, MigrationError> {
    let msr_indices = msr_index_list(&ctl.vm.kvm)?;
    let mut vcpus = Vec::new();
    for (i, v) in ctl.vcpus.iter().enumerate() {
        vcpus.push(VcpuState::save(
            i as u8,
            &v.lock().unwrap().fd,
            &msr_indices,
        )?);
    }
    Ok(MachineState {
        vm: VmState::save(&ctl.vm.fd)?,
        vcpus,
        devices: ctl.devices.lock().unwrap().save(),
        ldt_pv: ctl.vm.ldt_pv.as_ref().map(|d| d.save()),
    })
}

fn expect(frame: ldt_migration::Frame, kind: MessageKind) -> Result<Vec<u8>, MigrationError> {
    match frame.kind {
        k if k == kind => Ok(frame.payload),
        MessageKind::Abort => Err(MigrationError::Aborted(
            String::from_utf8_lossy(&frame.payload).into_owned(),
        )),
        k => Err(MigrationError::Unexpected(k)),
    }
}

/// Migrates the VM behind `ctl` to `opts.to`. On success the caller stops
/// the source VM; on failure the source VM is running as before.
pub fn migrate(
    ctl: &VmControl,
    opts: &MigrateOptions,
    progress: &mut (dyn FnMut(&Progress) + Send),
) -> Result<MigrationReport, MigrationError> {
    migrate_cancellable(ctl, opts, progress, &AtomicBool::new(false))
}

/// `migrate`, ended with `Cancelled` (the VM running here as before) once
/// `cancel` is set, at the next message, round or step of the switch-over
/// before Commit.
pub fn migrate_cancellable(
    ctl: &VmControl,
    opts: &MigrateOptions,
    progress: &mut (dyn FnMut(&Progress) + Send),
    cancel: &AtomicBool,
) -> Result<MigrationReport, MigrationError> {
    ctl.claim_tracking(TrackingUser::Migration)?;
    let result = migrate_claimed(ctl, opts, progress, cancel);
    ctl.release_tracking(TrackingUser::Migration);
    result
}

fn migrate_claimed(
    ctl: &VmControl,
    opts: &MigrateOptions,
    progress: &mut (dyn FnMut(&Progress) + Send),
    cancel: &AtomicBool,
) -> Result<MigrationReport, MigrationError> {
    let started = Instant::now();
    // Up front, before the destination hears of it.
    if opts.dirty_source == DirtySourceKind::GuestLdt {
        guest_ldt::announced(&ctl.vm)?;
    }
    let mut conn = transport::connect(&opts.to)?;
    conn.set_timeout(Some(precopy_timeout(opts)))?;
    let hello = Hello {
        mem_mib: ctl.vm.mem_size() >> 20,
        vcpus: ctl.vcpu_count as u8,
        cpu_profile: ctl.cpu_profile,
        dirty_source: opts.dirty_source,
        verify: opts.verify,
        binary_state: true,
        snapshot: None,
        ldt_pv: ctl.vm.ldt_pv.is_some(),
    };
    conn.send(
        MessageKind::Hello,
        &serde_json::to_vec(&hello).expect("hello serializes"),
    )?;
    expect(conn.recv()?, MessageKind::HelloAck)?;

    let mut source = dirty::create(opts.dirty_source, ctl.dirty_options, ctl.ring.clone())?;
    dirty::reset_vmm_writes(&ctl.vm);
    source.start(&ctl.vm)?;
    let result = run_rounds(
        ctl,
        opts,
        &mut conn,
        source.as_mut(),
        started,
        progress,
        cancel,
    );
    // After a switch-over (Commit sent) the vCPUs never run here again.
    let stopped = match &result {
        Ok(_) | Err(MigrationError::OutcomeUnknown(_)) => source.stop_paused(&ctl.vm),
        Err(_) => source.stop(&ctl.vm),
    };
    match result {
        Ok(mut report) => {
            stopped?;
            // Measured after the fact so it costs the migration nothing.
            report.memcpy_mb_s = memcpy_rate_mb_s();
            Ok(report)
        }
        Err(e @ MigrationError::OutcomeUnknown(_)) => {
            // Commit went out: the destination may run the guest. Running
            // it here too could make two; the operator decides.
            ctl.hold_postmigrate();
            Err(e)
        }
        Err(e) => {
            // Tell the destination (bounded), then let the guest go on here
            // (unless the operator had paused it).
            conn.send_abort(&e.to_string(), ABORT_WITHIN);
            ctl.resume();
            Err(e)
        }
    }
}

fn run_rounds(
    ctl: &VmControl,
    opts: &MigrateOptions,
    conn: &mut Connection,
    source: &mut dyn DirtySource,
    started: Instant,
    progress: &mut (dyn FnMut(&Progress) + Send),
    cancel: &AtomicBool,
) -> Result<MigrationReport, MigrationError> {
    let setup_ms = started.elapsed().as_secs_f64() * 1e3;
    let mut sender = Sender::new(ctl, opts.bandwidth_limit_mbps, conn.bytes_sent);
    sender.cancel = Some(cancel);
    if opts.verify {
        sender.record_hashes(PageHashes::zeroed(&ctl.vm.slots));
    }
    // Round 0 sends all memory, so what the source reports up to here (all
    // of it with INITIALLY_SET) is covered: drop it, or round 1 resends it.
    dirty::harvest(source, &ctl.vm)?;
    let mut rounds = vec![sender.send_round(conn, 0, &DirtyBitmap::full(&ctl.vm.slots))?];
    let target = Duration::from_millis(opts.downtime_ms);
    let mut converged = true;
    let mut expected_ms = 0.0;
    let mut dirty_rate = 0.0;
    let mut bw = 0.0;
    let mut round = 1;
    let throttle = Throttle::default();
    let mut precopy_nice = None;
    let precopy = std::thread::scope(|s| {
        if opts.auto_converge {
            s.spawn(|| throttle.run(ctl));
        }
        // The rounds run on a thread of their own that ends with them, so
        // that its nice value (`priority`) never reaches the switch-over.
        let result = priority::run_at_nice("precopy", opts.precopy_nice, |n| {
            precopy_nice = Some(n);
            loop {
                check_cancel(Some(cancel))?;
                let dirty = dirty::harvest(source, &ctl.vm)?;
                let last = rounds.last().unwrap();
                let remaining = dirty.count() * PAGE_SIZE;
                bw = last.bytes as f64 / (last.duration_ms / 1e3).max(1e-9);
                expected_ms = switchover_estimate_ms(remaining, ctl.vcpu_count, bw);
                dirty_rate = dirty.count() as f64 / (last.duration_ms / 1e3).max(1e-9);
                progress(&Progress {
                    round,
                    remaining_bytes: remaining,
                    dirty_rate_pages_s: dirty_rate,
                    bandwidth_mb_s: bw / 1e6,
                    expected_downtime_ms: expected_ms,
                    throttle_pct: throttle.pct(),
                });
                let out_of_rounds = round > opts.max_rounds;
                let out_of_time = started.elapsed() >= Duration::from_secs(opts.timeout_s);
                if expected_ms <= target.as_secs_f64() * 1e3
                    && (out_of_rounds
                        || out_of_time
                        || !another_round_pays(dirty.count(), last.pages))
                {
                    return Ok(dirty);
                }
                if out_of_rounds || out_of_time {
                    let why = if out_of_rounds {
                        format!("{} rounds done", opts.max_rounds)
                    } else {
                        format!("{} s timeout", opts.timeout_s)
                    };
                    match opts.policy {
                        ConvergencePolicy::Cancel => {
                            return Err(MigrationError::NotConverged(format!(
                                "{why}, expected downtime {expected_ms:.0} ms > target {} ms",
                                opts.downtime_ms
                            )))
                        }
                        ConvergencePolicy::Force => {
                            converged = false;
                            return Ok(dirty);
                        }
                    }
                }
                // Round 1 still includes the first touch; throttle from round 2.
                if opts.auto_converge && round >= 2 {
                    throttle.increase();
                }
                let mut stats = sender.send_round(conn, round, &dirty)?;
                stats.dirty_rate_pages_s = dirty_rate;
                rounds.push(stats);
                round += 1;
            }
        });
        throttle.stop();
        result
    });
    let mut final_dirty = precopy?;

    // A source the guest answers (guest-ldt) harvests one last time while
    // the vCPUs still run, with KVM's log armed just before, so that the
    // log holds every write from before that harvest to the pause (README
    // "The final round of guest-ldt").
    // With it, the set sent while the vCPUs ran.
    let mut guest_final: Option<(GuestLdtFinal, DirtyBitmap)> = None;
    if source.needs_running_guest() {
        let t = Instant::now();
        source.begin_final_round(&ctl.vm)?;
        let guest = dirty::harvest(source, &ctl.vm)?;
        let mut report = GuestLdtFinal {
            guest_harvest_ms: t.elapsed().as_secs_f64() * 1e3,
            guest_pages: guest.count(),
            ..Default::default()
        };
        final_dirty.or(&guest);
        let within_target =
            switchover_estimate_ms(final_dirty.count() * PAGE_SIZE, ctl.vcpu_count, bw)
                <= opts.downtime_ms as f64;
        let pause_now =
            within_target && !guest_final_send_pays(final_dirty.count(), dirty_rate, bw);
        let sent = if pause_now {
            // Paused at once: KVM's log holds only the last harvest's interval.
            DirtyBitmap::empty(&ctl.vm.slots)
        } else {
            // Sent while the vCPUs still run, outside the downtime: KVM's
            // log, armed before that harvest was requested, has every page
            // they rewrite from here on, and it goes in the paused set.
            let mut stats = sender.send_round(conn, round, &final_dirty)?;
            stats.dirty_rate_pages_s = dirty_rate;
            rounds.push(stats);
            round += 1;
            std::mem::replace(&mut final_dirty, DirtyBitmap::empty(&ctl.vm.slots))
        };
        report.paused_at_once = pause_now;
        guest_final = Some((report, sent));
        if let Some(gap) = guest_ldt::final_gap_for_test() {
            std::thread::sleep(gap);
        }
    }

    // Switch-over: nothing the guest writes from here on is lost because
    // the last harvest happens with every vCPU stopped.
    let paused_at = Instant::now();
    conn.set_deadline(Some(paused_at + switchover_budget(opts, expected_ms)));
    let mut b = DowntimeBreakdown::default();
    let mut lap = Lap(Instant::now());
    if ctl.pause() != RunState::Paused {
        return Err(MigrationError::VmStopped);
    }
    b.pause_ms = lap.ms();
    let mut last = final_dirty;
    let paused_set = dirty::harvest_paused(source, &ctl.vm)?;
    let mut audit = None;
    if let Some((g, sent)) = guest_final.as_mut() {
        g.kvm_pages = paused_set.count();
        g.kvm_only_pages = paused_set.pages().filter(|&p| !sent.is_dirty(p)).count() as u64;
        let areas = kvm_msr_areas(ctl)?;
        g.msr_area_pages = areas.len() as u64;
        audit = source.audit_verdict(&areas)?;
        for gpa in areas {
            last.set(gpa);
        }
    }
    last.or(&paused_set);
    b.final_harvest_ms = lap.ms();
    let mut stats = sender.send_round(conn, round, &last)?;
    stats.dirty_rate_pages_s = dirty_rate;
    rounds.push(stats);
    b.final_memory_ms = lap.ms();
    let state = save_machine_state(ctl)?;
    b.state_save_ms = lap.ms();
    let copy_mb_s = sender.memory_bytes as f64 / sender.copy_time.as_secs_f64().max(1e-9) / 1e6;
    conn.send(MessageKind::State, &state.encode())?;
    conn.flush()?;
    b.state_transfer_ms = lap.ms();
    // What was sent, against what arrived: a stream or apply error aborts.
    let digest_sent = sender.sent_hashes.as_ref().map(PageHashes::digest);
    b.verify_ms = lap.ms();
    let ready: Ready = parse("Ready", &expect(conn.recv()?, MessageKind::Ready)?)?;
    b.ready_wait_ms = lap.ms();
    b.destination_restore_ms = ready.restore_ms.unwrap_or(0.0);
    if opts.verify && ready.digest != digest_sent {
        return Err(MigrationError::DigestMismatch {
            source_digest: digest_sent.unwrap_or_default(),
            destination: ready.digest.unwrap_or_else(|| "none".into()),
        });
    }
    // The last moment a cancel can still leave the guest here.
    check_cancel(Some(cancel))?;
    conn.send(MessageKind::Commit, &[])?;
    // From here on the destination may run the guest: any failure leaves the
    // outcome unknown, never a reason to resume here.
    let committed = conn
        .flush()
        .map_err(MigrationError::from)
        .and_then(|()| expect(conn.recv()?, MessageKind::Resumed));
    if let Err(e) = committed {
        return Err(MigrationError::OutcomeUnknown(e.to_string()));
    }
    b.commit_ms = lap.ms();
    let downtime_ms = paused_at.elapsed().as_secs_f64() * 1e3;

    // Outside the downtime: the frozen source's memory, against what it
    // sent. A difference is a write the dirty source missed.
    let t = Instant::now();
    let (digest_source, verify_mismatch_pages) = match &sender.sent_hashes {
        Some(sent) => {
            let actual = PageHashes::of_memory(&ctl.vm, VERIFY_THREADS)?;
            (Some(actual.digest()), actual.differing(sent))
        }
        None => (None, 0),
    };
    let verify_ms = t.elapsed().as_secs_f64() * 1e3;

    Ok(MigrationReport {
        dirty_source: opts.dirty_source.name().into(),
        destination: opts.to.to_string(),
        total_ms: started.elapsed().as_secs_f64() * 1e3,
        setup_ms,
        downtime_ms,
        downtime_breakdown: b,
        expected_downtime_ms: expected_ms,
        downtime_target_ms: opts.downtime_ms,
        converged,
        transferred_bytes: conn.bytes_sent,
        rounds,
        copy_mb_s,
        memcpy_mb_s: 0.0,
        throttle_pct: throttle.pct(),
        precopy_nice,
        verify_ms,
        digest_source,
        digest_destination: ready.digest,
        verify_mismatch_pages,
        guest_ldt_final: guest_final.map(|(g, _)| g),
        guest_ldt_audit: audit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_estimate_counts_state_and_fixed_costs() {
        // Nothing left still costs the state and the fixed part.
        let empty = switchover_estimate_ms(0, 2, 1e9);
        assert!((FIXED_SWITCHOVER_MS..FIXED_SWITCHOVER_MS + 1.0).contains(&empty));
        // 100 MB at 1 GB/s: 100 ms on top.
        let full = switchover_estimate_ms(100_000_000, 2, 1e9);
        assert!((full - empty - 100.0).abs() < 1e-6, "{full} {empty}");
    }

    #[test]
    fn another_round_is_taken_only_while_it_halves_the_final_set() {
        // After round 0 (all 65536 pages), 2000 dirty: another round pays.
        assert!(another_round_pays(2000, 65536));
        // Dirtying as fast as sending: no gain.
        assert!(!another_round_pays(1500, 2000));
        // Too little left to be worth a round.
        assert!(!another_round_pays(MIN_PAGES_WORTH_A_ROUND, 65536));
    }

    #[test]
    fn guest_ldts_final_set_is_sent_running_only_if_mostly_kept() {
        // 8000 pages (32 MB) at 320 MB/s take 0.1 s: dirtying 80000
        // pages/s rewrites all of it meanwhile, 4000 pages/s 5%.
        assert!(!guest_final_send_pays(8000, 80_000.0, 320e6));
        assert!(guest_final_send_pays(8000, 4_000.0, 320e6));
        // Rewriting exactly half is not worth it.
        assert!(!guest_final_send_pays(
            8000,
            40_000.0,
            8000.0 * 4096.0 * 10.0
        ));
    }

    #[test]
    fn the_switchover_budget_grows_with_the_target_and_the_estimate() {
        let mut o = MigrateOptions {
            to: Endpoint::Unix("/x".into()),
            dirty_source: DirtySourceKind::KvmBitmap,
            downtime_ms: 300,
            max_rounds: 1,
            timeout_s: 1,
            policy: ConvergencePolicy::Cancel,
            bandwidth_limit_mbps: None,
            verify: false,
            auto_converge: false,
            precopy_nice: 0,
        };
        assert_eq!(
            switchover_budget(&o, 10.0),
            SWITCHOVER_SLACK + Duration::from_millis(1200)
        );
        assert_eq!(
            switchover_budget(&o, 1000.0),
            SWITCHOVER_SLACK + Duration::from_millis(4000)
        );
        o.downtime_ms = 0;
        assert_eq!(switchover_budget(&o, 0.0), SWITCHOVER_SLACK);
    }
}
