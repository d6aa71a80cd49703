//! Migration statistics: per round and overall, as JSON.

use serde::{Deserialize, Serialize};

/// One pre-copy round.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RoundStats {
    pub round: u32,
    /// Pages the round sent (including zero pages).
    pub pages: u64,
    pub zero_pages: u64,
    /// Bytes on the wire.
    pub bytes: u64,
    pub duration_ms: f64,
    /// Pages the guest dirtied per second while the previous round was sent.
    pub dirty_rate_pages_s: f64,
    /// Transfer rate of this round.
    pub bandwidth_mb_s: f64,
}

/// Progress shown while migrating.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Progress {
    pub round: u32,
    pub remaining_bytes: u64,
    pub dirty_rate_pages_s: f64,
    pub bandwidth_mb_s: f64,
    pub expected_downtime_ms: f64,
    /// Share of time the vCPUs are parked by auto-converge.
    #[serde(default)]
    pub throttle_pct: u32,
}

impl Progress {
    /// The one-line form printed during migration.
    pub fn line(&self) -> String {
        format!(
            "round {:>3}  remaining {:>8} KiB  dirty {:>9.0} pages/s  bw {:>8.1} MB/s  expected downtime {:>8.1} ms  throttle {:>2}%",
            self.round,
            self.remaining_bytes / 1024,
            self.dirty_rate_pages_s,
            self.bandwidth_mb_s,
            self.expected_downtime_ms,
            self.throttle_pct
        )
    }
}

/// Where the downtime went, in the order it happens (milliseconds).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DowntimeBreakdown {
    /// Stopping every vCPU.
    pub pause_ms: f64,
    /// The last harvest of the dirty source, with the vCPUs stopped.
    pub final_harvest_ms: f64,
    /// Sending the last dirty set.
    pub final_memory_ms: f64,
    /// Saving vCPU, VM and device state.
    pub state_save_ms: f64,
    /// Encoding and sending the state.
    pub state_transfer_ms: f64,
    /// The source's digest of what it sent (with --verify).
    pub verify_ms: f64,
    /// From the state sent to the destination's Ready (its restore, its
    /// digest with --verify, and the wire).
    pub ready_wait_ms: f64,
    /// The destination's own time to restore the state (from its Ready).
    pub destination_restore_ms: f64,
    /// Commit sent to Resumed received.
    pub commit_ms: f64,
}

impl DowntimeBreakdown {
    /// The one-line form printed after a migration.
    pub fn line(&self) -> String {
        format!(
            "downtime: pause {:.1}  harvest {:.1}  memory {:.1}  state save {:.1}  state send {:.1}  verify {:.1}  ready wait {:.1} (restore {:.1})  commit {:.1} ms",
            self.pause_ms,
            self.final_harvest_ms,
            self.final_memory_ms,
            self.state_save_ms,
            self.state_transfer_ms,
            self.verify_ms,
            self.ready_wait_ms,
            self.destination_restore_ms,
            self.commit_ms
        )
    }
}

/// The final report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrationReport {
    pub dirty_source: String,
    pub destination: String,
    pub total_ms: f64,
    pub setup_ms: f64,
    /// Source pause to the destination's "resumed".
    pub downtime_ms: f64,
    /// What the downtime was spent on.
    pub downtime_breakdown: DowntimeBreakdown,
    /// Time the source spent hashing its memory after the commit (--verify).
    pub verify_ms: f64,
    pub expected_downtime_ms: f64,
    pub downtime_target_ms: u64,
    pub converged: bool,
    pub transferred_bytes: u64,
    pub rounds: Vec<RoundStats>,
    /// Guest memory copy rate (bytes of memory sent per second of sending).
    pub copy_mb_s: f64,
    /// This machine's plain memcpy rate, for comparison.
    pub memcpy_mb_s: f64,
    /// Auto-converge throttle reached (percent of time vCPUs were parked).
    pub throttle_pct: u32,
    /// The nice value the pre-copy rounds ran at (`migrate --precopy-nice`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precopy_nice: Option<i32>,
    /// With --verify: digest of the source's memory (hashed after the
    /// commit, outside the downtime) and of what the destination received.
    pub digest_source: Option<String>,
    pub digest_destination: Option<String>,
    /// Pages whose contents at the switch-over differ from what was sent
    /// (writes the dirty source missed); must be 0.
    #[serde(default)]
    pub verify_mismatch_pages: u64,
    /// guest-ldt only: what its final round was made of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_ldt_final: Option<GuestLdtFinal>,
    /// guest-ldt with `run --ldt-pv-audit`: its rounds against KVM's log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_ldt_audit: Option<crate::dirty::guest_ldt::GuestLdtAudit>,
}

/// The final round of a guest-ldt migration: the guest's last harvest
/// (vCPUs running, KVM's log armed), its set sent with the vCPUs running
/// (or not: `paused_at_once`), then with the vCPUs paused KVM's log for
/// that interval and the pages of KVM's MSR-registered areas.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GuestLdtFinal {
    /// The guest's last harvest (it runs before the pause, outside the downtime).
    pub guest_harvest_ms: f64,
    /// Pages the guest's last harvest reported (with the VMM's own writes).
    pub guest_pages: u64,
    /// Pages KVM's log saw from its arming to the pause.
    pub kvm_pages: u64,
    /// Of those, pages the guest's set did not have: writes after its
    /// last harvest (or before it, that it had not reported yet).
    pub kvm_only_pages: u64,
    /// Pages of KVM's MSR-registered areas (kvmclock, steal time, PV EOI, async PF).
    pub msr_area_pages: u64,
    /// The guest's last set went in the pause, not out with the vCPUs
    /// running: the guest would have rewritten most of it meanwhile.
    #[serde(default)]
    pub paused_at_once: bool,
}

/// Measures memcpy over 64 MiB (median of 3).
pub fn memcpy_rate_mb_s() -> f64 {
    let n = 64 << 20;
    let src = vec![0x5au8; n];
    let mut dst = vec![0u8; n];
    let mut rates: Vec<f64> = (0..3)
        .map(|_| {
            let t = std::time::Instant::now();
            dst.copy_from_slice(std::hint::black_box(&src));
            std::hint::black_box(&dst);
            n as f64 / t.elapsed().as_secs_f64() / 1e6
        })
        .collect();
    rates.sort_by(|a, b| a.total_cmp(b));
    rates[1]
}
