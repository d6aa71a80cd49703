//! `ldt-vmm bench migrate`: the same flat guest and workload migrated with
//! each dirty source between two ldt-vmm processes on this machine, in one
//! run. The guest prints a counter and dirties pages between lines; its
//! progress during the migration, relative to before, shows what tracking
//! costs the guest.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::api::{self, Request};
use crate::dirty::DirtySourceKind;
use crate::flat::{
    counter_values, tempfile_path::TempPath, COUNTER_FAST_PAYLOAD, COUNTER_SLOW_PAYLOAD,
};
use crate::migration::report::{DowntimeBreakdown, RoundStats};
use crate::migration::source::{ConvergencePolicy, MigrateOptions};
use crate::migration::tls_certs;
use crate::migration::transport::{Endpoint, TlsFiles};
use crate::vm::MemBacking;

use super::dirty::percentile;
use super::smaps::guest_ram_huge_kib;

/// Guest RAM of the benchmark's VMs (`run`'s default).
const GUEST_MIB: u64 = 256;

/// Which counter payload runs in the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// ~16 dirty pages per printed line, with a pause between lines.
    Slow,
    /// 4096 dirty pages per line, no pause (needs --policy force to finish).
    Fast,
}

/// Parameters of the migration benchmark.
#[derive(Debug, Clone, Serialize)]
pub struct MigrateBenchConfig {
    pub workload: Workload,
    pub downtime_ms: u64,
    pub max_rounds: u32,
    pub bandwidth_limit_mbps: Option<u64>,
    pub auto_converge: bool,
    /// Instead of every source over a unix socket: kvm-bitmap over plain
    /// TCP and over TCP with TLS, side by side (what TLS costs).
    pub tls: bool,
    /// What backs guest RAM on both sides.
    pub mem_backing: MemBacking,
}

/// How source and destination are connected in one run.
enum Link {
    Unix,
    Tcp,
    Tls(TlsFiles),
}

impl Link {
    fn name(&self) -> &'static str {
        match self {
            Link::Unix => "",
            Link::Tcp => " tcp",
            Link::Tls(_) => " tcp+tls",
        }
    }

    /// The endpoint and the destination's extra arguments.
    fn endpoint(&self, mig: &Path) -> anyhow::Result<(Endpoint, Vec<String>)> {
        if let Link::Unix = self {
            return Ok((Endpoint::Unix(mig.into()), vec![]));
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let ep = Endpoint::Tcp(format!("127.0.0.1:{port}"));
        Ok(match self {
            Link::Tls(f) => {
                let args = [
                    ("--tls-cert", &f.cert),
                    ("--tls-key", &f.key),
                    ("--tls-ca", &f.ca),
                ]
                .iter()
                .flat_map(|(o, p)| [o.to_string(), p.display().to_string()])
                .collect();
                (ep.with_tls(f.clone()).map_err(anyhow::Error::msg)?, args)
            }
            _ => (ep, vec![]),
        })
    }
}

/// One migration's figures.
#[derive(Debug, Clone, Serialize)]
pub struct MigrateBenchResult {
    pub mode: String,
    pub mem_backing: MemBacking,
    /// Guest RAM on huge host pages (smaps AnonHugePages + Private_Hugetlb,
    /// KiB): the source's before the migration, the destination's after.
    pub source_huge_kib: u64,
    pub destination_huge_kib: u64,
    pub total_ms: f64,
    pub downtime_ms: f64,
    pub rounds: usize,
    pub transferred_mb: f64,
    pub converged: bool,
    /// Counter increments the guest made while migrating (to the pause).
    pub guest_progress: u64,
    /// Guest progress rate while migrating over its rate just before.
    pub guest_rate_vs_idle: f64,
    /// Where the downtime went.
    pub downtime_breakdown: DowntimeBreakdown,
    /// Every round (the last one sent with the guest paused).
    pub round_stats: Vec<RoundStats>,
    /// Guest memory sent per second of sending (the report's copy rate).
    pub copy_mb_s: f64,
}

struct Vmm {
    child: Child,
    out: PathBuf,
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(exe: &Path, args: &[String], out: PathBuf) -> anyhow::Result<Vmm> {
    let child = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out)?)
        .stderr(std::fs::File::create(out.with_extension("err"))?)
        .spawn()?;
    Ok(Vmm { child, out })
}

/// Polls `ready` every 10 ms for up to 30 s; the error says what never came.
fn wait_until(what: &str, ready: impl Fn() -> anyhow::Result<bool>) -> anyhow::Result<()> {
    let t = Instant::now();
    while !ready()? {
        anyhow::ensure!(t.elapsed() < Duration::from_secs(30), "{what}");
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

fn wait_for(p: &Path) -> anyhow::Result<()> {
    wait_until(
        &format!("{} never appeared", p.display()),
        || Ok(p.exists()),
    )
}

fn wait_for_line(p: &Path, line: &str) -> anyhow::Result<()> {
    wait_until(&format!("{} never said {line:?}", p.display()), || {
        Ok(std::fs::read_to_string(p)?.contains(line))
    })
}

fn last_counter(out: &Path) -> anyhow::Result<(u64, Instant)> {
    let now = Instant::now();
    let v = counter_values(&std::fs::read(out)?);
    Ok((v.last().copied().unwrap_or(0), now))
}

fn run_one(
    exe: &Path,
    dir: &Path,
    cfg: &MigrateBenchConfig,
    kind: DirtySourceKind,
    link: &Link,
) -> anyhow::Result<MigrateBenchResult> {
    let payload = match cfg.workload {
        Workload::Slow => COUNTER_SLOW_PAYLOAD,
        Workload::Fast => COUNTER_FAST_PAYLOAD,
    };
    let file = TempPath::create(payload, "bench-counter")?;
    // Files of one run, never those of the run before (a stale socket).
    let tag = format!("{kind}{}", link.name().replace([' ', '+'], "-"));
    let src_api = dir.join(format!("{tag}-src.sock"));
    let dst_api = dir.join(format!("{tag}-dst.sock"));
    let mig = dir.join(format!("{tag}-mig.sock"));
    let backing = cfg.mem_backing.name().to_string();
    let mut src_args = vec![
        "run".to_string(),
        "--flat".into(),
        file.path().display().to_string(),
        "--api".into(),
        src_api.display().to_string(),
        "--mem-backing".into(),
        backing.clone(),
    ];
    if kind == DirtySourceKind::KvmRing {
        src_args.extend(["--dirty-ring".into(), "65536".into()]);
    }
    let src = spawn(exe, &src_args, dir.join(format!("{tag}-src.out")))?;
    let (to, extra) = link.endpoint(&mig)?;
    let mut dst_args = vec![
        "run".to_string(),
        "--incoming".into(),
        match &to {
            Endpoint::Unix(p) => format!("unix:{}", p.display()),
            Endpoint::Tcp(a) | Endpoint::TcpTls(a, _) => format!("tcp:{a}"),
        },
        "--api".into(),
        dst_api.display().to_string(),
        "--mem-backing".into(),
        backing,
    ];
    dst_args.extend(extra);
    let dst = spawn(exe, &dst_args, dir.join(format!("{tag}-dst.out")))?;
    wait_for(&src_api)?;
    // Listening once it says so (its API comes after the migration; a
    // probe connection would end a waiting destination).
    wait_for_line(&dst.out.with_extension("err"), "waiting for a migration")?;
    // Warm up (first touch of the working set), then measure the idle rate.
    std::thread::sleep(Duration::from_millis(1500));
    let (a, ta) = last_counter(&src.out)?;
    std::thread::sleep(Duration::from_millis(1000));
    let (b, tb) = last_counter(&src.out)?;
    let idle_rate = (b - a) as f64 / (tb - ta).as_secs_f64();
    let source_huge_kib = guest_ram_huge_kib(src.child.id(), GUEST_MIB << 20);

    let opts = MigrateOptions {
        to,
        dirty_source: kind,
        downtime_ms: cfg.downtime_ms,
        max_rounds: cfg.max_rounds,
        timeout_s: 120,
        policy: ConvergencePolicy::Force,
        bandwidth_limit_mbps: cfg.bandwidth_limit_mbps,
        verify: false,
        auto_converge: cfg.auto_converge,
        precopy_nice: 0,
    };
    let (c0, _) = last_counter(&src.out)?;
    let resp = api::migrate_and_wait(&src_api, &opts, &mut |_| {})?;
    anyhow::ensure!(resp.ok, "{kind}: {}", resp.error.unwrap_or_default());
    let r = resp.result.unwrap_or_default();
    std::thread::sleep(Duration::from_millis(200));
    let (c_pause, _) = last_counter(&src.out)?;
    let destination_huge_kib = guest_ram_huge_kib(dst.child.id(), GUEST_MIB << 20);
    let _ = api::call(&dst_api, &Request::Shutdown);
    drop(dst);
    drop(src);

    let total_ms = r["total_ms"].as_f64().unwrap_or(0.0);
    let downtime_ms = r["downtime_ms"].as_f64().unwrap_or(0.0);
    let progress = c_pause.saturating_sub(c0);
    let running_s = ((total_ms - downtime_ms) / 1e3).max(1e-3);
    Ok(MigrateBenchResult {
        mode: format!("{}{}", kind.name(), link.name()),
        mem_backing: cfg.mem_backing,
        source_huge_kib,
        destination_huge_kib,
        copy_mb_s: r["copy_mb_s"].as_f64().unwrap_or(0.0),
        total_ms,
        downtime_ms,
        rounds: r["rounds"].as_array().map(|a| a.len()).unwrap_or(0),
        transferred_mb: r["transferred_bytes"].as_f64().unwrap_or(0.0) / 1e6,
        converged: r["converged"].as_bool().unwrap_or(false),
        guest_progress: progress,
        guest_rate_vs_idle: progress as f64 / running_s / idle_rate.max(1e-9),
        downtime_breakdown: serde_json::from_value(r["downtime_breakdown"].clone())
            .unwrap_or_default(),
        round_stats: serde_json::from_value(r["rounds"].clone()).unwrap_or_default(),
    })
}

/// Migrates with every KVM dirty source, one after the other.
pub fn migrate(cfg: &MigrateBenchConfig) -> anyhow::Result<Vec<MigrateBenchResult>> {
    let exe = std::env::current_exe()?;
    let dir = std::env::temp_dir().join(format!("ldt-bench-migrate-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let results = if cfg.tls {
        tls_certs::generate(&dir, "bench").and_then(|files| {
            [Link::Tcp, Link::Tls(files)]
                .iter()
                .map(|l| run_one(&exe, &dir, cfg, DirtySourceKind::KvmBitmap, l))
                .collect()
        })
    } else {
        DirtySourceKind::available()
            .iter()
            .map(|k| run_one(&exe, &dir, cfg, *k, &Link::Unix))
            .collect()
    };
    let _ = std::fs::remove_dir_all(&dir);
    results
}

/// One source on one backing over every run.
#[derive(Debug, Clone, Serialize)]
pub struct BackingSummary {
    pub mem_backing: MemBacking,
    pub mode: String,
    pub runs: usize,
    pub total_ms_p50: f64,
    pub downtime_ms_p50: f64,
    pub downtime_ms_p95: f64,
    pub guest_rate_vs_idle_p50: f64,
    pub guest_rate_vs_idle_p95: f64,
    /// This p50 of the guest's rate over the same source's on anon.
    pub guest_rate_vs_anon: Option<f64>,
    pub source_huge_mib: u64,
    pub destination_huge_mib: u64,
}

/// Every source on every backing, `runs` times, interleaved.
pub fn compare(
    cfg: &MigrateBenchConfig,
    backings: &[MemBacking],
    runs: u32,
) -> anyhow::Result<(Vec<MigrateBenchResult>, Vec<BackingSummary>)> {
    let mut all = Vec::new();
    for _ in 0..runs.max(1) {
        for &b in backings {
            all.extend(migrate(&MigrateBenchConfig {
                mem_backing: b,
                ..cfg.clone()
            })?);
        }
    }
    let mut sums: Vec<BackingSummary> = Vec::new();
    for &b in backings {
        let mut modes: Vec<String> = Vec::new();
        for r in all.iter().filter(|r| r.mem_backing == b) {
            if !modes.contains(&r.mode) {
                modes.push(r.mode.clone());
            }
        }
        for m in modes {
            let rs: Vec<&MigrateBenchResult> = all
                .iter()
                .filter(|r| r.mem_backing == b && r.mode == m)
                .collect();
            let of =
                |f: fn(&MigrateBenchResult) -> f64| rs.iter().map(|r| f(r)).collect::<Vec<_>>();
            let (total, down, rate) = (
                of(|r| r.total_ms),
                of(|r| r.downtime_ms),
                of(|r| r.guest_rate_vs_idle),
            );
            sums.push(BackingSummary {
                mem_backing: b,
                mode: m,
                runs: rs.len(),
                total_ms_p50: percentile(&total, 0.5),
                downtime_ms_p50: percentile(&down, 0.5),
                downtime_ms_p95: percentile(&down, 0.95),
                guest_rate_vs_idle_p50: percentile(&rate, 0.5),
                guest_rate_vs_idle_p95: percentile(&rate, 0.95),
                guest_rate_vs_anon: None,
                source_huge_mib: rs.iter().map(|r| r.source_huge_kib).min().unwrap_or(0) >> 10,
                destination_huge_mib: rs.iter().map(|r| r.destination_huge_kib).min().unwrap_or(0)
                    >> 10,
            });
        }
    }
    let anon: Vec<(String, f64)> = sums
        .iter()
        .filter(|s| s.mem_backing == MemBacking::Anon)
        .map(|s| (s.mode.clone(), s.guest_rate_vs_idle_p50))
        .collect();
    for s in &mut sums {
        s.guest_rate_vs_anon = anon
            .iter()
            .find(|(m, _)| *m == s.mode)
            .map(|(_, a)| s.guest_rate_vs_idle_p50 / a.max(1e-9));
    }
    Ok((all, sums))
}

/// The side-by-side table of `compare`.
pub fn compare_table(cfg: &MigrateBenchConfig, runs: u32, sums: &[BackingSummary]) -> String {
    let mut s = format!(
        "migrate bench by memory backing: {:?} counter workload, downtime target {} ms, {} runs\n",
        cfg.workload, cfg.downtime_ms, runs
    );
    s += &format!(
        "{:<10} {:<11} {:>9} {:>14} {:>16} {:>7} {:>9} {:>9}\n",
        "backing",
        "mode",
        "total p50",
        "down p50/p95",
        "x idle p50/p95",
        "x anon",
        "src huge",
        "dst huge"
    );
    for r in sums {
        s += &format!(
            "{:<10} {:<11} {:>9.0} {:>14} {:>16} {:>7} {:>8}M {:>8}M\n",
            r.mem_backing.name(),
            r.mode,
            r.total_ms_p50,
            format!("{:.1}/{:.1}", r.downtime_ms_p50, r.downtime_ms_p95),
            format!(
                "{:.2}/{:.2}",
                r.guest_rate_vs_idle_p50, r.guest_rate_vs_idle_p95
            ),
            r.guest_rate_vs_anon
                .map(|a| format!("{a:.2}"))
                .unwrap_or_else(|| "-".into()),
            r.source_huge_mib,
            r.destination_huge_mib
        );
    }
    s += "x idle: the guest's counter rate while migrating over its rate just before (p50/p95 over the\n\
          runs); x anon: that p50 over the same source's on anon; src/dst huge: guest RAM on huge host\n\
          pages, the source's before and the destination's after the migration (smaps)\n";
    s
}

/// The human-readable table.
pub fn table(cfg: &MigrateBenchConfig, results: &[MigrateBenchResult]) -> String {
    let mut s = format!(
        "migrate bench: {:?} counter workload, downtime target {} ms, bandwidth limit {}\n",
        cfg.workload,
        cfg.downtime_ms,
        cfg.bandwidth_limit_mbps
            .map(|b| format!("{b} MB/s"))
            .unwrap_or_else(|| "none".into())
    );
    s += &format!(
        "{:<19} {:>9} {:>11} {:>7} {:>9} {:>10} {:>10} {:>10} {:>10}\n",
        "mode",
        "total ms",
        "downtime ms",
        "rounds",
        "sent MB",
        "converged",
        "progress",
        "x idle",
        "copy MB/s"
    );
    for r in results {
        s += &format!(
            "{:<19} {:>9.0} {:>11.1} {:>7} {:>9.1} {:>10} {:>10} {:>10.2} {:>10.0}\n",
            r.mode,
            r.total_ms,
            r.downtime_ms,
            r.rounds,
            r.transferred_mb,
            r.converged,
            r.guest_progress,
            r.guest_rate_vs_idle,
            r.copy_mb_s
        );
    }
    s += "downtime breakdown (ms):\n";
    for r in results {
        s += &format!("{:<11} {}\n", r.mode, r.downtime_breakdown.line());
    }
    s
}
