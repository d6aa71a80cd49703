//! `ldt-vmm bench dirty`: the VM analogue of the LDT paper's write-only
//! experiment. A ring-3 flat payload writes W pages of an S-page working set
//! per round, untracked and under each dirty source, all in one run; the
//! report gives guest write time relative to untracked, harvest time, and
//! pages reported vs written.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::arch::layout::PAGE_SIZE;
use crate::dirty::{self, DirtyOptions, DirtySourceKind};
use crate::flat::{FlatError, LdtPvWriterVm, WriterVm, MAX_PAGES_PER_COMMAND};
use crate::vm::kvm_stats::{self, MappedPages};
use crate::vm::MemBacking;

/// First page of the working set (above the payload at 1 MiB).
pub const WORKING_SET_BASE: u64 = 2 << 20;

/// Parameters of the dirty benchmark.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct DirtyBenchConfig {
    pub working_set_pages: u64,
    pub write_pages: u64,
    pub bytes_per_page: u32,
    pub rounds: u32,
    pub seed: u64,
    pub ring_entries: u32,
    /// What backs guest RAM.
    pub mem_backing: MemBacking,
}

/// Results of one tracking mode.
#[derive(Debug, Clone, Serialize)]
pub struct DirtyBenchResult {
    pub mode: String,
    pub mem_backing: MemBacking,
    /// Guest RAM backed by huge host pages after the first touch, KiB
    /// (smaps: AnonHugePages + Private_Hugetlb).
    pub host_huge_kib: u64,
    /// Pages KVM mapped at each size after the first touch and after the
    /// measured rounds (tracking makes KVM map 4 KiB pages), if known.
    pub kvm_mapped_after_touch: Option<MappedPages>,
    pub kvm_mapped_after_rounds: Option<MappedPages>,
    /// Page faults KVM handled for the vCPU during the measured rounds
    /// (`pf_taken` + `pf_fast`), if known: the write-protection faults a
    /// KVM source costs the guest, none for host-ldt.
    pub kvm_page_faults_rounds: Option<u64>,
    /// One more round of the same writes once the source stopped (a
    /// cancelled migration): whether the guest gets its speed back.
    pub write_ms_after_stop: f64,
    pub kvm_mapped_after_stop: Option<MappedPages>,
    pub write_ms_median: f64,
    pub write_ratio_vs_untracked: f64,
    pub harvest_ms_median: f64,
    /// Guest write time of each round, in round order (the figures plot
    /// their spread; the medians above summarise them).
    pub write_ms_rounds: Vec<f64>,
    /// Harvest time of each round (empty when untracked).
    pub harvest_ms_rounds: Vec<f64>,
    pub pages_written: u64,
    pub pages_reported: u64,
    pub missed: u64,
    pub false_positives: u64,
}

/// A small deterministic PRNG (xorshift64*), shared with the tests.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// `k` distinct values of `0..n`, in random order.
    pub fn sample(&mut self, n: u64, k: u64) -> Vec<u64> {
        let mut all: Vec<u64> = (0..n).collect();
        let k = k.min(n) as usize;
        for i in 0..k {
            let j = i + (self.next_u64() % (n - i as u64)) as usize;
            all.swap(i, j);
        }
        all.truncate(k);
        all
    }
}

/// Guest-physical address of working-set page `i`.
pub fn working_set_page(i: u64) -> u64 {
    WORKING_SET_BASE + i * PAGE_SIZE
}

/// Guest RAM the benchmark needs for `pages` working-set pages.
pub fn mem_mib_for(pages: u64) -> u64 {
    let end = working_set_page(pages) + (2 << 20);
    end.div_ceil(2 << 20) * 2
}

fn millis(v: &[Duration]) -> Vec<f64> {
    v.iter().map(|d| d.as_secs_f64() * 1e3).collect()
}

fn median(v: &mut [Duration]) -> f64 {
    v.sort();
    v.get(v.len() / 2)
        .map(|d| d.as_secs_f64() * 1e3)
        .unwrap_or(0.0)
}

fn write_pages(
    vm: &mut WriterVm,
    pages: &[u64],
    bytes: u32,
    value: u8,
) -> Result<Duration, FlatError> {
    let mut t = Duration::ZERO;
    for chunk in pages.chunks(MAX_PAGES_PER_COMMAND) {
        t += vm.write_round(chunk, bytes, value)?;
    }
    Ok(t)
}

fn write_pages_ldt_pv(
    vm: &mut LdtPvWriterVm,
    pages: &[u64],
    bytes: u32,
    value: u8,
) -> Result<Duration, FlatError> {
    let mut t = Duration::ZERO;
    for chunk in pages.chunks(LdtPvWriterVm::MAX_PAGES) {
        t += vm.write_round(chunk, bytes, value)?;
    }
    Ok(t)
}

/// Runs one mode (`None` = untracked) with the writer payload.
fn run_mode(
    cfg: &DirtyBenchConfig,
    kind: Option<DirtySourceKind>,
) -> anyhow::Result<DirtyBenchResult> {
    let ring = (kind == Some(DirtySourceKind::KvmRing)).then_some(cfg.ring_entries);
    let mut vm = WriterVm::with_backing(mem_mib_for(cfg.working_set_pages), ring, cfg.mem_backing)?;
    let machine_vm = vm.machine.vm.clone();
    let ring = vm.machine.ring.clone();
    let mode = kind.map_or("untracked".into(), |k| k.name().to_string());
    let vcpu_stats = kvm_stats::Stats::open(&vm.machine.vcpus[0].fd).ok();
    let result = measure(
        cfg,
        &machine_vm,
        vcpu_stats.as_ref(),
        &mut |pages, bytes, value| write_pages(&mut vm, pages, bytes, value),
        &|n| WriterVm::command_pages(n.min(MAX_PAGES_PER_COMMAND)),
        kind,
        ring,
        mode,
    )?;
    vm.stop()?;
    Ok(result)
}

/// guest-ldt (or, untracked, its baseline) with the ldt-pv harness
/// payload, whose driver keeps its own record of every frame it writes.
fn run_mode_ldt_pv(cfg: &DirtyBenchConfig, tracked: bool) -> anyhow::Result<DirtyBenchResult> {
    let mut vm = LdtPvWriterVm::new(mem_mib_for(cfg.working_set_pages))?;
    let machine_vm = vm.vm.clone();
    let frames = vm.vm.ldt_pv.as_ref().map_or(0, |d| d.frames());
    let kind = tracked.then_some(DirtySourceKind::GuestLdt);
    let mode = if tracked {
        "guest-ldt".to_string()
    } else {
        LDT_PV_BASELINE.to_string()
    };
    // The vCPU runs on the harness's own thread: no statistics here.
    let result = measure(
        cfg,
        &machine_vm,
        None,
        &mut |pages, bytes, value| write_pages_ldt_pv(&mut vm, pages, bytes, value),
        &|n| LdtPvWriterVm::named_pages_for(frames, n.min(LdtPvWriterVm::MAX_PAGES)),
        kind,
        None,
        mode,
    )?;
    vm.stop()?;
    Ok(result)
}

/// The untracked mode guest-ldt's ratio is taken against: its own harness
/// payload, not the writer (see `dirty`).
const LDT_PV_BASELINE: &str = "untracked (ldt-pv payload)";

type WriteRound<'a> = dyn FnMut(&[u64], u32, u8) -> Result<Duration, FlatError> + 'a;

/// The rounds of one mode: `write` has the guest write the pages, `named`
/// gives the pages a harvest may hold besides them (the VMM's command
/// block, the payload's own record).
#[allow(clippy::too_many_arguments)]
fn measure(
    cfg: &DirtyBenchConfig,
    vm: &crate::vm::Vm,
    vcpu_stats: Option<&kvm_stats::Stats>,
    write: &mut WriteRound,
    named: &dyn Fn(usize) -> Vec<u64>,
    kind: Option<DirtySourceKind>,
    ring: Option<std::sync::Arc<crate::dirty::kvm_ring::RingCollector>>,
    mode: String,
) -> anyhow::Result<DirtyBenchResult> {
    let all: Vec<u64> = (0..cfg.working_set_pages).map(working_set_page).collect();
    // First touch, untimed: the guest faults every page in once.
    write(&all, 1, 0xff)?;
    let ram = vm.slots[0].host_addr;
    let host_huge_kib = super::smaps::huge_kib("self", |a, b, _| (a..b).contains(&ram));
    let kvm_mapped_after_touch = kvm_stats::mapped_pages(&vm.fd).ok();

    let mut source = match kind {
        Some(k) => {
            let mut s = dirty::create(k, DirtyOptions::default(), ring)?;
            dirty::reset_vmm_writes(vm);
            s.start(vm)?;
            // Drop whatever start reports (INITIALLY_SET reports everything).
            dirty::harvest(s.as_mut(), vm)?;
            Some(s)
        }
        None => None,
    };

    let mut rng = Rng::new(cfg.seed);
    let (mut writes, mut harvests) = (Vec::new(), Vec::new());
    let (mut written, mut reported, mut missed, mut fps) = (0, 0, 0, 0);
    let faults = || vcpu_stats.and_then(|s| s.sum(kvm_stats::VCPU_PAGE_FAULTS).ok());
    let faults_before = faults();
    for round in 0..cfg.rounds {
        let pages: Vec<u64> = rng
            .sample(cfg.working_set_pages, cfg.write_pages)
            .into_iter()
            .map(working_set_page)
            .collect();
        writes.push(write(&pages, cfg.bytes_per_page, round as u8)?);
        written += pages.len() as u64;
        if let Some(s) = source.as_mut() {
            let t = Instant::now();
            let bitmap = dirty::harvest(s.as_mut(), vm)?;
            harvests.push(t.elapsed());
            reported += bitmap.count();
            missed += pages.iter().filter(|p| !bitmap.is_dirty(**p)).count() as u64;
            // Extra pages, not counting the named ones.
            let written: HashSet<u64> = pages.iter().copied().collect();
            let named: HashSet<u64> = named(pages.len()).into_iter().collect();
            fps += bitmap
                .pages()
                .filter(|p| !written.contains(p) && !named.contains(p))
                .count() as u64;
        }
    }
    let kvm_mapped_after_rounds = kvm_stats::mapped_pages(&vm.fd).ok();
    let kvm_page_faults_rounds = faults_before.zip(faults()).map(|(a, b)| b - a);
    if let Some(mut s) = source {
        s.stop(vm)?;
    }
    let pages: Vec<u64> = rng
        .sample(cfg.working_set_pages, cfg.write_pages)
        .into_iter()
        .map(working_set_page)
        .collect();
    let after_stop = write(&pages, cfg.bytes_per_page, 0xee)?;
    let kvm_mapped_after_stop = kvm_stats::mapped_pages(&vm.fd).ok();
    let (write_ms_rounds, harvest_ms_rounds) = (millis(&writes), millis(&harvests));
    Ok(DirtyBenchResult {
        mode,
        // The ldt-pv harness runs only when comparing on anon (`dirty`).
        mem_backing: cfg.mem_backing,
        host_huge_kib,
        kvm_mapped_after_touch,
        kvm_mapped_after_rounds,
        kvm_page_faults_rounds,
        write_ms_after_stop: after_stop.as_secs_f64() * 1e3,
        kvm_mapped_after_stop,
        write_ms_median: median(&mut writes),
        write_ratio_vs_untracked: 0.0,
        harvest_ms_median: median(&mut harvests),
        write_ms_rounds,
        harvest_ms_rounds,
        pages_written: written,
        pages_reported: reported,
        missed,
        false_positives: fps,
    })
}

/// Runs every mode side by side and fills in the ratios.
pub fn dirty(cfg: &DirtyBenchConfig) -> anyhow::Result<Vec<DirtyBenchResult>> {
    let mut results = vec![run_mode(cfg, None)?];
    for k in DirtySourceKind::available() {
        results.push(run_mode(cfg, Some(k))?);
    }
    let base = results[0].write_ms_median.max(1e-6);
    for r in &mut results {
        r.write_ratio_vs_untracked = r.write_ms_median / base;
    }
    // (Its harness VM is anon-backed: rows only when comparing on anon.)
    if cfg.mem_backing != MemBacking::Anon {
        return Ok(results);
    }
    // guest-ldt needs a guest driver: the ldt-pv payload plays it, and its
    // ratio is against that payload untracked (its rounds cost a thread
    // hand-off and the driver's own record, which the writer has not).
    let mut ldt = vec![run_mode_ldt_pv(cfg, false)?, run_mode_ldt_pv(cfg, true)?];
    let base = ldt[0].write_ms_median.max(1e-6);
    for r in &mut ldt {
        r.write_ratio_vs_untracked = r.write_ms_median / base;
    }
    results.extend(ldt);
    Ok(results)
}

/// Nearest-rank percentile of `v` (ms), `q` in 0..=1.
pub fn percentile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[((q * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1]
}

/// One mode on one backing over every run.
#[derive(Debug, Clone, Serialize)]
pub struct BackingSummary {
    pub mem_backing: MemBacking,
    pub mode: String,
    pub runs: usize,
    pub write_ms_p50: f64,
    pub write_ms_p95: f64,
    /// p50 write time over the untracked p50 on the same backing.
    pub ratio_vs_untracked: f64,
    /// p50 write time over the same mode's p50 on `anon`.
    pub ratio_vs_anon: Option<f64>,
    pub harvest_ms_p50: f64,
    pub host_huge_kib: u64,
    pub kvm_mapped_after_touch: Option<MappedPages>,
    pub kvm_mapped_after_rounds: Option<MappedPages>,
    /// p50 of the round written after the source stopped.
    pub write_ms_after_stop_p50: f64,
    pub kvm_mapped_after_stop: Option<MappedPages>,
    pub missed: u64,
}

/// Every mode on every backing, `runs` times, the backings interleaved
/// (anon, thp, hugetlbfs, anon, ...) so that the host's load falls on all.
pub fn compare(
    cfg: &DirtyBenchConfig,
    backings: &[MemBacking],
    runs: u32,
) -> anyhow::Result<(Vec<DirtyBenchResult>, Vec<BackingSummary>)> {
    let mut all = Vec::new();
    for _ in 0..runs.max(1) {
        for &b in backings {
            all.extend(dirty(&DirtyBenchConfig {
                mem_backing: b,
                ..*cfg
            })?);
        }
    }
    let mut sums: Vec<BackingSummary> = Vec::new();
    for &b in backings {
        let mut modes: Vec<&str> = Vec::new();
        for r in all.iter().filter(|r| r.mem_backing == b) {
            if !modes.contains(&r.mode.as_str()) {
                modes.push(&r.mode);
            }
        }
        for m in modes {
            let rs: Vec<&DirtyBenchResult> = all
                .iter()
                .filter(|r| r.mem_backing == b && r.mode == m)
                .collect();
            let writes: Vec<f64> = rs.iter().flat_map(|r| r.write_ms_rounds.clone()).collect();
            let harvests: Vec<f64> = rs
                .iter()
                .flat_map(|r| r.harvest_ms_rounds.clone())
                .collect();
            let last = rs.last().expect("one run at least");
            sums.push(BackingSummary {
                mem_backing: b,
                mode: m.to_string(),
                runs: rs.len(),
                write_ms_p50: percentile(&writes, 0.5),
                write_ms_p95: percentile(&writes, 0.95),
                ratio_vs_untracked: 0.0,
                ratio_vs_anon: None,
                harvest_ms_p50: percentile(&harvests, 0.5),
                host_huge_kib: rs.iter().map(|r| r.host_huge_kib).min().unwrap_or(0),
                kvm_mapped_after_touch: last.kvm_mapped_after_touch,
                kvm_mapped_after_rounds: last.kvm_mapped_after_rounds,
                write_ms_after_stop_p50: percentile(
                    &rs.iter().map(|r| r.write_ms_after_stop).collect::<Vec<_>>(),
                    0.5,
                ),
                kvm_mapped_after_stop: last.kvm_mapped_after_stop,
                missed: rs.iter().map(|r| r.missed).sum(),
            });
        }
    }
    let p50 = |sums: &[BackingSummary], b: MemBacking, m: &str| {
        sums.iter()
            .find(|s| s.mem_backing == b && s.mode == m)
            .map(|s| s.write_ms_p50.max(1e-6))
    };
    let ratios: Vec<(f64, Option<f64>)> = sums
        .iter()
        .map(|s| {
            let baseline = if s.mode == DirtySourceKind::GuestLdt.name() {
                LDT_PV_BASELINE
            } else {
                "untracked"
            };
            let untracked = p50(&sums, s.mem_backing, baseline).unwrap_or(1e-6);
            let anon = p50(&sums, MemBacking::Anon, &s.mode);
            (s.write_ms_p50 / untracked, anon.map(|a| s.write_ms_p50 / a))
        })
        .collect();
    for (s, (u, a)) in sums.iter_mut().zip(ratios) {
        s.ratio_vs_untracked = u;
        s.ratio_vs_anon = a;
    }
    Ok((all, sums))
}

/// The side-by-side table of `compare`.
pub fn compare_table(cfg: &DirtyBenchConfig, runs: u32, sums: &[BackingSummary]) -> String {
    let mut s = format!(
        "dirty bench by memory backing: {} of {} pages per round, {} byte(s) each, {} rounds x {} runs\n",
        cfg.write_pages, cfg.working_set_pages, cfg.bytes_per_page, cfg.rounds, runs
    );
    s += &format!(
        "{:<10} {:<26} {:>9} {:>9} {:>8} {:>7} {:>10} {:>9} {:>11} {:>11} {:>10} {:>11} {:>6}\n",
        "backing",
        "mode",
        "write p50",
        "write p95",
        "x untrk",
        "x anon",
        "harvest ms",
        "huge MiB",
        "kvm 4k/2m",
        "tracked",
        "stop write",
        "stopped",
        "missed"
    );
    let kvm = |m: &Option<MappedPages>| {
        m.map(|m| format!("{}/{}", m.pages_4k, m.pages_2m))
            .unwrap_or_else(|| "-".into())
    };
    for r in sums {
        s += &format!(
            "{:<10} {:<26} {:>9.3} {:>9.3} {:>8.2} {:>7} {:>10.3} {:>9} {:>11} {:>11} {:>10.3} {:>11} {:>6}\n",
            r.mem_backing.name(),
            r.mode,
            r.write_ms_p50,
            r.write_ms_p95,
            r.ratio_vs_untracked,
            r.ratio_vs_anon
                .map(|a| format!("{a:.2}"))
                .unwrap_or_else(|| "-".into()),
            r.harvest_ms_p50,
            r.host_huge_kib / 1024,
            kvm(&r.kvm_mapped_after_touch),
            kvm(&r.kvm_mapped_after_rounds),
            r.write_ms_after_stop_p50,
            kvm(&r.kvm_mapped_after_stop),
            r.missed
        );
    }
    s += "write p50/p95: guest write time of one round (ms), every round of every run; x untrk: p50 over\n\
          untracked on the same backing; x anon: p50 over the same mode on anon; huge MiB: guest RAM on\n\
          huge host pages after the first touch (smaps); kvm 4k/2m: pages KVM maps at each size after the\n\
          first touch, after the tracked rounds, and after one more round once the source stopped\n\
          (stop write, ms)\n";
    s
}

/// The human-readable table.
pub fn table(cfg: &DirtyBenchConfig, results: &[DirtyBenchResult]) -> String {
    let mut s = format!(
        "dirty bench: {} of {} pages per round, {} byte(s) each, {} rounds (guest ring 3)\n",
        cfg.write_pages, cfg.working_set_pages, cfg.bytes_per_page, cfg.rounds
    );
    s += &format!(
        "{:<26} {:>12} {:>10} {:>12} {:>9} {:>9} {:>6} {:>6}\n",
        "mode", "write ms", "x untrk", "harvest ms", "written", "reported", "missed", "fp"
    );
    for r in results {
        s += &format!(
            "{:<26} {:>12.3} {:>10.2} {:>12.3} {:>9} {:>9} {:>6} {:>6}\n",
            r.mode,
            r.write_ms_median,
            r.write_ratio_vs_untracked,
            r.harvest_ms_median,
            r.pages_written,
            r.pages_reported,
            r.missed,
            r.false_positives
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_is_distinct_and_in_range() {
        let mut r = Rng::new(7);
        let s = r.sample(1000, 300);
        let mut d = s.clone();
        d.sort();
        d.dedup();
        assert_eq!(d.len(), 300);
        assert!(s.iter().all(|x| *x < 1000));
        assert_eq!(Rng::new(7).sample(1000, 300), s, "deterministic for a seed");
        assert_eq!(r.sample(5, 10).len(), 5);
    }

    #[test]
    fn memory_covers_the_working_set() {
        let mib = mem_mib_for(16384);
        assert!(mib << 20 > working_set_page(16384));
        assert_eq!(mib % 2, 0);
    }
}
