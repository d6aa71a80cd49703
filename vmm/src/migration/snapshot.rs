//! Full and diff snapshots: the migration stream written to a file.
//!
//! A snapshot file is a Hello (with the snapshot's id and its base's id),
//! memory messages and a State message. A full snapshot holds all memory; a
//! diff holds the pages the dirty source reported since the snapshot it is
//! based on (tracking keeps running between snapshots for that). A
//! snapshot's id is the SHA-256 of all guest memory when it was taken, so a
//! restore can check it rebuilt exactly that memory.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use ldt_migration::{read_frame, write_frame_parts, MessageKind, ProtocolError};
use serde::{Deserialize, Serialize};

use super::destination::{apply_memory, restore_state};
use super::digest::memory_digest;
use super::source::{kvm_msr_areas, save_machine_state, Sender};
use super::transport::FrameSink;
use super::{parse, Hello, MigrationError};
use crate::builder::{self, Machine};
use crate::devices::console::ConsoleOut;
use crate::dirty::{self, DirtyBitmap, DirtySourceKind};
use crate::input_file;
use crate::runner::{RunState, SnapshotChain, TrackingUser, VmControl};

/// Identity of a snapshot within a chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// Digest of all guest memory at the snapshot.
    pub id: String,
    /// Id of the snapshot this diff applies to; `None` for a full snapshot.
    pub base: Option<String>,
}

/// Parameters of `ldt-vmm snapshot`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotOptions {
    pub to: PathBuf,
    pub base: Option<PathBuf>,
    pub dirty_source: DirtySourceKind,
}

/// What a snapshot wrote.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotReport {
    pub file: PathBuf,
    pub id: String,
    pub base: Option<String>,
    pub pages: u64,
    pub bytes: u64,
    pub paused_ms: f64,
}

struct FileSink {
    out: BufWriter<File>,
    bytes: u64,
}

impl FrameSink for FileSink {
    fn send_parts(&mut self, kind: MessageKind, parts: &[&[u8]]) -> io::Result<()> {
        self.bytes += parts.iter().map(|p| p.len() as u64).sum::<u64>() + 20;
        write_frame_parts(&mut self.out, kind, parts)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
    fn bytes_sent(&self) -> u64 {
        self.bytes
    }
}

/// Creates `path` owner-only (0600), whatever the umask: a snapshot holds
/// all guest memory. A stale file of that name (a crash) is replaced.
fn create_private(path: &Path) -> io::Result<File> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

/// Reads just the Hello of a snapshot file.
pub fn read_hello(path: &Path) -> Result<Hello, MigrationError> {
    let mut r = BufReader::new(input_file::open(path, u64::MAX)?.0);
    let f = read_frame(&mut r)?;
    if f.kind != MessageKind::Hello {
        return Err(MigrationError::Unexpected(f.kind));
    }
    parse("Hello", &f.payload)
}

/// Takes a snapshot of the VM behind `ctl` (paused for the duration).
pub fn take(ctl: &VmControl, opts: &SnapshotOptions) -> Result<SnapshotReport, MigrationError> {
    let base_id = match &opts.base {
        Some(p) => {
            let hello = read_hello(p)?;
            let info = hello.snapshot.ok_or_else(|| {
                MigrationError::Build(format!("{} is not a snapshot", p.display()))
            })?;
            Some(info.id)
        }
        None => None,
    };
    let mut chain = ctl.snapshots.lock().unwrap();
    if let Some(b) = &base_id {
        match chain.as_ref() {
            Some(c) if &c.last_id == b => {}
            _ => {
                return Err(MigrationError::Build(
                    "the base is not the last snapshot of this VM: take a full snapshot first"
                        .into(),
                ))
            }
        }
    }
    let t = Instant::now();
    // A source the guest answers (guest-ldt) is started, or harvested one
    // last time with KVM's log armed, while the guest still runs.
    let diff = base_id.is_some() && chain.is_some();
    let guest_driven = match chain.as_ref() {
        Some(c) if diff => c.source.needs_running_guest(),
        _ => opts.dirty_source == DirtySourceKind::GuestLdt,
    };
    let mut guest_set = None;
    if guest_driven {
        match chain.as_mut() {
            Some(c) if diff => {
                let s = c.source.as_mut();
                match s
                    .begin_final_round(&ctl.vm)
                    .and_then(|()| dirty::harvest(s, &ctl.vm))
                {
                    Ok(b) => guest_set = Some(b),
                    Err(e) => {
                        let _ = s.end_final_round(&ctl.vm);
                        return Err(e.into());
                    }
                }
            }
            _ => start_chain(ctl, opts, &mut chain, false)?,
        }
    }
    if ctl.pause() != RunState::Paused {
        return Err(MigrationError::VmStopped);
    }
    let result = write_snapshot(ctl, opts, base_id, &mut chain, guest_set, guest_driven);
    // Runs again unless the operator had paused it (then it stays paused).
    ctl.resume();
    let mut report = result?;
    report.paused_ms = t.elapsed().as_secs_f64() * 1e3;
    Ok(report)
}

/// Starts a new snapshot chain with `opts.dirty_source` (stopping the old
/// one): tracking from now on. `paused`: the vCPUs are stopped (an old
/// chain's guest-ldt driver then gets its STOP without being waited for).
fn start_chain(
    ctl: &VmControl,
    opts: &SnapshotOptions,
    chain: &mut Option<SnapshotChain>,
    paused: bool,
) -> Result<(), MigrationError> {
    ctl.claim_tracking(TrackingUser::SnapshotChain)?;
    if let Some(mut old) = chain.take() {
        let stopped = if paused {
            old.source.stop_paused(&ctl.vm)
        } else {
            old.source.stop(&ctl.vm)
        };
        if let Err(e) = stopped {
            ctl.release_tracking(TrackingUser::SnapshotChain);
            return Err(e.into());
        }
    }
    let started =
        dirty::create(opts.dirty_source, ctl.dirty_options, ctl.ring.clone()).and_then(|mut s| {
            dirty::reset_vmm_writes(&ctl.vm);
            s.start(&ctl.vm).map(|()| s)
        });
    let mut source = match started {
        Ok(s) => s,
        Err(e) => {
            ctl.release_tracking(TrackingUser::SnapshotChain);
            return Err(e.into());
        }
    };
    // The snapshot being taken has all memory: the next diff starts from
    // here (with INITIALLY_SET the source would report everything).
    dirty::harvest(source.as_mut(), &ctl.vm)?;
    *chain = Some(SnapshotChain {
        source,
        last_id: String::new(),
    });
    Ok(())
}

fn write_snapshot(
    ctl: &VmControl,
    opts: &SnapshotOptions,
    base_id: Option<String>,
    chain: &mut Option<SnapshotChain>,
    guest_set: Option<DirtyBitmap>,
    guest_driven: bool,
) -> Result<SnapshotReport, MigrationError> {
    let pages = match (&base_id, chain.as_mut()) {
        (Some(_), Some(c)) if guest_driven => {
            // The guest's last harvest, KVM's log from just before it to
            // this pause, and KVM's MSR-registered areas (as a migration's
            // final round); the guest's own record goes on from its harvest.
            let mut pages = guest_set.unwrap_or_else(|| DirtyBitmap::empty(&ctl.vm.slots));
            let paused = dirty::harvest_paused(c.source.as_mut(), &ctl.vm);
            c.source.end_final_round(&ctl.vm)?;
            pages.or(&paused?);
            for gpa in kvm_msr_areas(ctl)? {
                pages.set(gpa);
            }
            pages
        }
        (Some(_), Some(c)) => dirty::harvest(c.source.as_mut(), &ctl.vm)?,
        _ => {
            // A full snapshot starts a new chain: tracking from this pause on
            // (guest-ldt's started before the pause).
            if !guest_driven {
                start_chain(ctl, opts, chain, true)?;
            }
            DirtyBitmap::full(&ctl.vm.slots)
        }
    };
    let id = memory_digest(&ctl.vm)?;
    let hello = Hello {
        mem_mib: ctl.vm.mem_size() >> 20,
        vcpus: ctl.vcpu_count as u8,
        cpu_profile: ctl.cpu_profile,
        dirty_source: opts.dirty_source,
        verify: false,
        // Files keep JSON state, readable with any tool.
        binary_state: false,
        snapshot: Some(SnapshotInfo {
            id: id.clone(),
            base: base_id.clone(),
        }),
        ldt_pv: ctl.vm.ldt_pv.is_some(),
    };
    // Written beside the target and renamed, so a failure leaves no half file.
    let tmp = opts.to.with_extension("partial");
    let mut sink = FileSink {
        out: BufWriter::new(create_private(&tmp)?),
        bytes: 0,
    };
    let written = (|| {
        sink.send(
            MessageKind::Hello,
            &serde_json::to_vec(&hello).expect("hello serializes"),
        )?;
        let mut sender = Sender::new(ctl, None, 0);
        sender.send_round(&mut sink, 0, &pages)?;
        let state = save_machine_state(ctl)?;
        sink.send(
            MessageKind::State,
            &serde_json::to_vec(&state).expect("state serializes"),
        )?;
        sink.flush()?;
        sink.out.get_ref().sync_all()?;
        Ok::<_, MigrationError>(())
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, &opts.to)?;
    chain.as_mut().expect("chain exists").last_id = id.clone();
    Ok(SnapshotReport {
        file: opts.to.clone(),
        id,
        base: base_id,
        pages: pages.count(),
        bytes: sink.bytes,
        paused_ms: 0.0,
    })
}

/// Builds a VM from a full snapshot and the diffs on top of it, in order,
/// and checks that the memory it rebuilt has the last snapshot's digest.
pub fn restore(
    files: &[PathBuf],
    console: ConsoleOut,
    dirty_ring_entries: Option<u32>,
    mem_backing: crate::vm::MemBacking,
) -> Result<(Hello, Machine), MigrationError> {
    let first = files
        .first()
        .ok_or_else(|| MigrationError::Build("no snapshot file".into()))?;
    let hello = read_hello(first)?;
    let res = hello.resources(console, dirty_ring_entries, mem_backing);
    let machine = builder::build(&res).map_err(|e| MigrationError::Build(e.to_string()))?;
    let mut expected_base: Option<String> = None;
    let mut last_id = String::new();
    let mut last_state = None;
    for (i, path) in files.iter().enumerate() {
        let what = |e: MigrationError| MigrationError::Build(format!("{}: {e}", path.display()));
        let mut r = BufReader::new(
            input_file::open(path, u64::MAX)
                .map_err(|e| what(e.into()))?
                .0,
        );
        let f = read_frame(&mut r).map_err(|e| what(e.into()))?;
        let h: Hello = parse("Hello", &f.payload).map_err(what)?;
        let info = h
            .snapshot
            .ok_or_else(|| what(MigrationError::Build("not a snapshot file".into())))?;
        if i == 0 && info.base.is_some() {
            return Err(what(MigrationError::Build(
                "a diff snapshot needs its base first".into(),
            )));
        }
        if i > 0 && info.base != expected_base {
            return Err(what(MigrationError::Build(
                "not a diff of the snapshot before it".into(),
            )));
        }
        if h.mem_mib != hello.mem_mib || h.vcpus != hello.vcpus {
            return Err(what(MigrationError::Build("a different VM shape".into())));
        }
        let mut state_seen = false;
        loop {
            match read_frame(&mut r) {
                Ok(f) if f.kind == MessageKind::Memory => {
                    apply_memory(&machine, &f.payload).map_err(what)?
                }
                Ok(f) if f.kind == MessageKind::RoundEnd => {}
                Ok(f) if f.kind == MessageKind::State => {
                    if i + 1 == files.len() {
                        last_state = Some((path, f.payload));
                    }
                    state_seen = true;
                }
                Ok(f) => return Err(what(MigrationError::Unexpected(f.kind))),
                Err(ProtocolError::Closed) if state_seen => break,
                Err(ProtocolError::Closed) => {
                    return Err(what(MigrationError::Build(
                        "no device state: file incomplete".into(),
                    )))
                }
                Err(e) => return Err(what(e.into())),
            }
        }
        expected_base = Some(info.id.clone());
        last_id = info.id;
    }
    // Digest before restoring the vCPUs: restoring MSR_KVM_WALL_CLOCK_NEW
    // makes KVM write the wall clock into guest memory at once.
    let digest = memory_digest(&machine.vm)?;
    if digest != last_id {
        return Err(MigrationError::DigestMismatch {
            source_digest: last_id,
            destination: digest,
        });
    }
    if let Some((path, state)) = last_state {
        restore_state(&machine, &state, hello.binary_state)
            .map_err(|e| MigrationError::Build(format!("{}: {e}", path.display())))?;
    }
    Ok((hello, machine))
}
