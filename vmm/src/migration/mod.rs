//! Pre-copy live migration between two ldt-vmm processes.
//!
//! The wire format is the `ldt-migration` crate; this module moves a VM over
//! it. Conversation (S = source, D = destination):
//!
//! ```text
//! S→D Hello{config}            D→S HelloAck (or Abort)
//! S→D Pages*, RoundEnd         round 0: all memory; round n: pages dirty since n-1
//! ...                          until the rest fits the downtime target; S pauses
//! S→D Pages*, RoundEnd         the last dirty set
//! S→D State{vm, vcpus, devs}   D→S Ready{digest}
//! S→D Commit                   D→S Resumed; S exits, D runs the VM
//! ```
//!
//! `Pages` (protocol version 2) is a range table in a frame, then the data
//! of its non-zero ranges, unframed: the source writes it straight from
//! guest memory, the destination reads it straight into guest memory
//! (with `--verify` the source sends a copy, so that what it hashed is
//! what went out). Version 1's `Memory` (data inside the checksummed
//! frame; snapshot files) is still read.
//!
//! Any failure before Commit leaves the source VM running with its memory
//! untouched (the source only reads guest memory), unless the operator had
//! paused it. Once Commit is sent the source never resumes by itself: if
//! Resumed does not arrive, the VM stays paused ("postmigrate") and the
//! operator decides (`ldt-vmm ctl resume` if the destination does not run
//! the guest, `shutdown` if it does). Every send and receive has a deadline
//! (`source::switchover_budget`, `destination::DEFAULT_FRAME_TIMEOUT`).
//! One dirty-log user at a time: a migration is refused while the API's
//! dirty tracking, a snapshot chain or another migration holds the log.

pub mod destination;
pub mod digest;
pub mod priority;
pub mod report;
pub mod snapshot;
pub mod source;
pub mod throttle;
pub mod tls_certs;
pub mod transport;

use serde::{Deserialize, Serialize};

use crate::arch::cpuid::CpuProfile;
use crate::arch::layout::PAGE_SIZE;
use crate::builder::{BootSource, VmResources};
use crate::devices::console::ConsoleOut;
use crate::devices::ldt_pv::LdtPvState;
use crate::devices::legacy::DevicesState;
use crate::dirty::DirtySourceKind;
use crate::vm::state::{StateError, VcpuState, VmState};
use crate::vm::MemBacking;

/// The VM configuration the destination needs to build an empty VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub mem_mib: u64,
    pub vcpus: u8,
    pub cpu_profile: CpuProfile,
    pub dirty_source: DirtySourceKind,
    pub verify: bool,
    /// The State message is binary (`MachineState::encode`, protocol 2
    /// sources); absent (version 1 sources, snapshot files): JSON.
    #[serde(default)]
    pub binary_state: bool,
    /// Set in snapshot files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<snapshot::SnapshotInfo>,
    /// The VM has the ldt-pv device (`run --ldt-pv`); absent: it has not.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ldt_pv: bool,
}

impl Hello {
    /// An empty VM of this shape, to be filled from a stream or snapshot,
    /// its memory backed as this host chooses (`mem_backing`): the backing
    /// is not part of the stream, so a guest moves between backings.
    pub fn resources(
        &self,
        console: ConsoleOut,
        dirty_ring_entries: Option<u32>,
        mem_backing: MemBacking,
    ) -> VmResources {
        VmResources {
            mem_mib: self.mem_mib,
            vcpus: self.vcpus,
            cpu_profile: self.cpu_profile,
            boot: BootSource::Incoming,
            dirty_ring_entries,
            console,
            mem_backing,
            ldt_pv: self.ldt_pv,
        }
    }
}

/// Everything besides memory, sent once the source is paused.
#[derive(Debug, Serialize, Deserialize)]
pub struct MachineState {
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub devices: DevicesState,
    /// The ldt-pv device's registers, when the VM has it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ldt_pv: Option<LdtPvState>,
}

/// The binary form of the fields every version has, in order.
#[derive(Serialize)]
struct CoreRef<'a>(&'a VmState, &'a Vec<VcpuState>, &'a DevicesState);
#[derive(Deserialize)]
struct Core(VmState, Vec<VcpuState>, DevicesState);

impl MachineState {
    /// The compact binary form (postcard: a few KiB per vCPU, no text to
    /// print or parse in the downtime), versioned by the protocol version.
    /// The ldt-pv state, when there is one, follows the fields every
    /// version has, so a VM without the device encodes exactly as before.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = postcard::to_stdvec(&CoreRef(&self.vm, &self.vcpus, &self.devices))
            .expect("state serializes");
        if let Some(d) = &self.ldt_pv {
            out.extend(postcard::to_stdvec(d).expect("ldt-pv state serializes"));
        }
        out
    }

    /// Decodes a State message: binary if the Hello said so, else JSON.
    pub fn decode(payload: &[u8], binary: bool) -> Result<Self, MigrationError> {
        if !binary {
            return parse("State", payload);
        }
        let bad = |e: postcard::Error| MigrationError::BadMessage("State", e.to_string());
        let (Core(vm, vcpus, devices), rest) = postcard::take_from_bytes(payload).map_err(bad)?;
        let ldt_pv = if rest.is_empty() {
            None
        } else {
            let (d, rest) = postcard::take_from_bytes(rest).map_err(bad)?;
            if !rest.is_empty() {
                return Err(MigrationError::BadMessage(
                    "State",
                    format!("{} bytes after the end", rest.len()),
                ));
            }
            Some(d)
        };
        Ok(MachineState {
            vm,
            vcpus,
            devices,
            ldt_pv,
        })
    }
}

/// The destination's answer to the state: its memory digest, if asked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ready {
    pub digest: Option<String>,
    /// How long the destination took to restore the state (ms).
    #[serde(default)]
    pub restore_ms: Option<f64>,
}

/// Why a migration failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("migration stream: {0}")]
    Protocol(#[from] ldt_migration::ProtocolError),
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("peer aborted: {0}")]
    Aborted(String),
    #[error("unexpected {0:?} message")]
    Unexpected(ldt_migration::MessageKind),
    #[error("bad {0} message: {1}")]
    BadMessage(&'static str, String),
    #[error("did not converge: {0}")]
    NotConverged(String),
    #[error("memory digest mismatch: source {source_digest}, destination {destination}")]
    DigestMismatch {
        source_digest: String,
        destination: String,
    },
    /// Commit was sent but the destination's Resumed never came.
    #[error("outcome unknown: the destination may be running ({0}); the VM stays paused here (postmigrate): resume it through the API only if the destination does not run it")]
    OutcomeUnknown(String),
    #[error("cancelled (migrate-cancel)")]
    Cancelled,
    #[error("the VM stopped during migration")]
    VmStopped,
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Dirty(#[from] crate::dirty::DirtyError),
    #[error("guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    #[error(transparent)]
    Input(#[from] crate::input_file::InputError),
    #[error("{0}")]
    Build(String),
    #[error("cannot start the migration's copying thread at its priority: {0}")]
    Priority(std::io::Error),
}

/// Decodes a JSON message body.
pub(crate) fn parse<T: for<'de> Deserialize<'de>>(
    what: &'static str,
    payload: &[u8],
) -> Result<T, MigrationError> {
    serde_json::from_slice(payload).map_err(|e| MigrationError::BadMessage(what, e.to_string()))
}

/// Whether the page at `page` is all zeroes (sent as a flag, skipped when
/// already so). Word-wise, eight words ORed per step and one branch per
/// 64 bytes: it stops at the first non-zero block, and costs little both
/// natively and under an emulator (the nested machine runs on TCG, where
/// every pass over memory counts). Volatile reads: the guest may be
/// writing the page meanwhile (it is then reported dirty again).
///
/// # Safety
/// `page` must point to `PAGE_SIZE` readable, 8-byte aligned bytes.
pub(crate) unsafe fn page_is_zero(page: *const u8) -> bool {
    let words = page.cast::<u64>();
    for block in 0..PAGE_SIZE as usize / 64 {
        let mut or = 0;
        for i in 0..8 {
            // SAFETY: within the page (caller's guarantee), aligned.
            or |= unsafe { words.add(block * 8 + i).read_volatile() };
        }
        if or != 0 {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_1_hello_means_json_state() {
        let mut h = Hello {
            mem_mib: 4,
            vcpus: 1,
            cpu_profile: CpuProfile::detect(),
            dirty_source: DirtySourceKind::KvmBitmap,
            verify: false,
            binary_state: true,
            snapshot: None,
            ldt_pv: false,
        };
        let mut v: serde_json::Value = serde_json::to_value(&h).unwrap();
        v.as_object_mut().unwrap().remove("binary_state");
        h.binary_state = false;
        assert_eq!(serde_json::from_value::<Hello>(v).unwrap(), h);
        // Either encoding of a state that is not one is refused by name.
        for binary in [true, false] {
            let e = MachineState::decode(b"\xff\xff", binary).unwrap_err();
            assert!(e.to_string().starts_with("bad State message"), "{e}");
        }
    }

    #[test]
    fn the_binary_state_without_ldt_pv_is_the_old_encoding_and_with_it_round_trips() {
        let vm = crate::vm::Vm::new(4 << 20, crate::vm::MemBacking::Anon).unwrap();
        let state = MachineState {
            vm: VmState::save(&vm.fd).unwrap(),
            vcpus: Vec::new(),
            devices: DevicesState {
                serial_regs: [1; 9],
                serial_input: vec![2],
                pending_input: vec![3],
                exit_status: Some(4),
            },
            ldt_pv: None,
        };
        #[derive(Serialize)]
        struct Old<'a> {
            vm: &'a VmState,
            vcpus: &'a Vec<VcpuState>,
            devices: &'a DevicesState,
        }
        let old = postcard::to_stdvec(&Old {
            vm: &state.vm,
            vcpus: &state.vcpus,
            devices: &state.devices,
        })
        .unwrap();
        assert_eq!(state.encode(), old, "a VM without ldt-pv encodes as before");
        assert!(MachineState::decode(&old, true).unwrap().ldt_pv.is_none());
        let with = MachineState {
            ldt_pv: Some(LdtPvState {
                driver: 1,
                epoch: 3,
                seq: 99,
            }),
            ..state
        };
        let back = MachineState::decode(&with.encode(), true).unwrap();
        assert_eq!(back.ldt_pv, with.ldt_pv);
        let mut junk = with.encode();
        junk.push(0);
        assert!(MachineState::decode(&junk, true).is_err());
        let json = serde_json::to_vec(&with).unwrap();
        assert_eq!(
            MachineState::decode(&json, false).unwrap().ldt_pv,
            with.ldt_pv
        );
    }

    #[test]
    fn a_page_is_zero_only_when_every_byte_is() {
        let mut page = vec![0u64; PAGE_SIZE as usize / 8];
        assert!(unsafe { page_is_zero(page.as_ptr().cast()) });
        let bytes = PAGE_SIZE as usize;
        for at in [0, 7, 63, 64, 2049, bytes - 1] {
            let p: &mut [u8] =
                unsafe { std::slice::from_raw_parts_mut(page.as_mut_ptr().cast(), bytes) };
            p[at] = 1;
            assert!(!unsafe { page_is_zero(page.as_ptr().cast()) }, "byte {at}");
            let p: &mut [u8] =
                unsafe { std::slice::from_raw_parts_mut(page.as_mut_ptr().cast(), bytes) };
            p[at] = 0;
        }
        assert!(unsafe { page_is_zero(page.as_ptr().cast()) });
    }
}
