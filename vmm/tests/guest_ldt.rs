//! The ldt-pv device and the guest-ldt dirty source, with flat payloads
//! playing the guest driver (`payloads/ldt-pv.S`): migrations that verify,
//! the final round's KVM log shown necessary, the up-front and mid-session
//! failures (the VM keeps running), and harvests against ground truth.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Output};
use std::time::{Duration, Instant};

mod common;

use common::{ctl, vmm as bin, wait_exit, wait_for, KillOnDrop, Scratch};
use ldt_vmm::bench::{working_set_page, Rng};
use ldt_vmm::dirty::{self, DirtyOptions, DirtySourceKind};
use ldt_vmm::flat::{self, tempfile_path::TempPath, LdtPvWriterVm};

const MEM: &str = "32";
/// The payload's own record of the frames it wrote (one page for 32 MiB).
const RECORD_PAGE: u64 = ldt_vmm::flat::LDT_PV_RECORD_ADDR;

struct Vmm {
    child: KillOnDrop,
    api: PathBuf,
    _payload: TempPath,
}

fn spawn(args: &[&str], s: &Scratch, name: &str, env: &[(&str, &str)]) -> Child {
    let mut c = bin();
    c.args(args)
        .stdout(std::fs::File::create(s.path(&format!("{name}.out"))).unwrap())
        .stderr(std::fs::File::create(s.path(&format!("{name}.err"))).unwrap());
    for (k, v) in env {
        c.env(k, v);
    }
    c.spawn().unwrap()
}

/// Boots `payload` (flat, 32 MiB) with `extra` options and an API socket.
fn start(s: &Scratch, payload: &[u8], extra: &[&str], env: &[(&str, &str)]) -> Vmm {
    let p = TempPath::create(payload, "ldt-pv").unwrap();
    let api = s.path("src.api");
    let mut args = vec![
        "run",
        "--flat",
        p.path().to_str().unwrap(),
        "--mem",
        MEM,
        "--api",
        api.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let child = KillOnDrop(spawn(&args, s, "src", env));
    wait_for(&api);
    Vmm {
        child,
        api,
        _payload: p,
    }
}

fn start_destination(s: &Scratch) -> (KillOnDrop, PathBuf, String) {
    let sock = s.path("mig.sock");
    let api = s.path("dst.api");
    let url = format!("unix:{}", sock.display());
    let child = KillOnDrop(spawn(
        &["run", "--incoming", &url, "--api", api.to_str().unwrap()],
        s,
        "dst",
        &[],
    ));
    wait_for(&sock);
    (child, api, url)
}

fn migrate(api: &Path, url: &str) -> Output {
    migrate_with(api, url, &[])
}

fn migrate_with(api: &Path, url: &str, extra: &[&str]) -> Output {
    bin()
        .args(["migrate", "--api", api.to_str().unwrap(), "--to", url])
        .args(["--dirty-source", "guest-ldt", "--verify"])
        .args(extra)
        .output()
        .unwrap()
}

/// Waits (at most 30 s) until the guest answers a guest-ldt session.
fn wait_announced(api: &Path) {
    let t = Instant::now();
    loop {
        let r = ctl(api, &["dirty-start", "guest-ldt"]);
        if r["ok"] == true {
            assert_eq!(ctl(api, &["dirty-stop"])["ok"], true);
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the guest never announced: {r}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether KVM's paravirtual leaf offers kvmclock (KVM_FEATURE_CLOCKSOURCE2),
/// as the payload checks before registering its area.
fn kvm_offers_kvmclock() -> bool {
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .unwrap();
    let leaf = |f: u32| cpuid.as_slice().iter().find(|e| e.function == f).copied();
    leaf(0x4000_0000).is_some_and(|e| e.ebx == 0x4b4d_564b)
        && leaf(0x4000_0001).is_some_and(|e| e.eax & (1 << 3) != 0)
}

fn assert_running(api: &Path) {
    let st = ctl(api, &["status"]);
    assert_eq!(st["result"]["state"], "running", "{st}");
}

/// Migrates the well-behaved driver with `env` on the source VMM; returns
/// the migrate output and the destination (still running) with its
/// scratch directory (which holds its API socket).
fn migrate_ldt_pv(name: &str, env: &[(&str, &str)]) -> (Output, KillOnDrop, PathBuf, Scratch) {
    migrate_ldt_pv_with(name, &["--ldt-pv"], env)
}

fn migrate_ldt_pv_with(
    name: &str,
    run_args: &[&str],
    env: &[(&str, &str)],
) -> (Output, KillOnDrop, PathBuf, Scratch) {
    let s = Scratch::new("guest-ldt", name);
    let mut src = start(&s, flat::LDT_PV_PAYLOAD, run_args, env);
    wait_announced(&src.api);
    let (dst, dst_api, url) = start_destination(&s);
    let out = migrate(&src.api, &url);
    wait_exit(&mut src.child.0, Duration::from_secs(30));
    (out, dst, dst_api, s)
}

#[test]
fn a_guest_ldt_migration_verifies_and_the_destination_keeps_the_device() {
    let (out, mut dst, dst_api, _s) = migrate_ldt_pv("migrate", &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "migrate failed: {err}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["dirty_source"], "guest-ldt");
    assert_eq!(r["verify_mismatch_pages"], 0);
    assert_eq!(r["digest_source"], r["digest_destination"]);
    let f = &r["guest_ldt_final"];
    // The payload writes its 64-page working set all the time.
    assert!(f["guest_pages"].as_u64().unwrap() >= 1, "{f}");
    // Its kvmclock area (registered where KVM offers it) went as KVM's.
    let kvmclock = f["msr_area_pages"].as_u64().unwrap();
    assert_eq!(kvmclock, u64::from(kvm_offers_kvmclock()), "{f}");
    // The device and the guest's announcement came along: the migrated
    // guest answers a new session on the destination.
    wait_for(&dst_api);
    assert_running(&dst_api);
    assert_eq!(ctl(&dst_api, &["dirty-start", "guest-ldt"])["ok"], true);
    let h = ctl(&dst_api, &["dirty-harvest"]);
    assert_eq!(h["ok"], true, "{h}");
    assert_eq!(ctl(&dst_api, &["dirty-stop"])["ok"], true);
    assert_eq!(ctl(&dst_api, &["shutdown"])["ok"], true);
    assert!(wait_exit(&mut dst.0, Duration::from_secs(10)).success());
}

/// The never-miss audit (`run --ldt-pv-audit`): KVM's log beside the
/// pre-copy rounds. An honest driver passes with every KVM page accounted
/// for; the report shows the rounds compared.
#[test]
fn an_audited_guest_ldt_migration_finds_no_miss_in_an_honest_driver() {
    let (out, _dst, _dst_api, _s) =
        migrate_ldt_pv_with("audit-honest", &["--ldt-pv", "--ldt-pv-audit"], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "migrate failed: {err}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let a = &r["guest_ldt_audit"];
    assert_eq!(a["missed_pages"], 0, "{a}");
    assert!(a["rounds"].as_u64().unwrap() >= 1, "{a}");
    // The payload writes its working set all the time: KVM saw it.
    assert!(a["kvm_pages"].as_u64().unwrap() >= 1, "{a}");
    assert_eq!(r["verify_mismatch_pages"], 0);
}

/// A driver that writes a page it never reports: the audit names the page
/// (where --verify would only count differing pages after the fact), and
/// the migration fails before the switch-over's commit, the source running.
#[test]
fn the_audit_names_the_page_a_lying_driver_never_reports() {
    let s = Scratch::new("guest-ldt", "audit-hide");
    let src = start(
        &s,
        flat::LDT_PV_HIDE_PAYLOAD,
        &["--ldt-pv", "--ldt-pv-audit"],
        &[],
    );
    wait_announced(&src.api);
    let (_dst, _dst_api, url) = start_destination(&s);
    let out = migrate(&src.api, &url);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "an audited migration of a lying driver succeeded"
    );
    assert!(err.contains("guest-ldt audit"), "{err}");
    assert!(err.contains("first at 0x650000"), "{err}");
    assert_running(&src.api);
}

/// The payload writes a page right after each harvest answer that it writes
/// at no other time; with 300 ms between the last answer and the pause, it
/// surely does so in that interval. KVM's log, armed for the final round,
/// catches it; without it (test-only switch) --verify finds the miss.
#[test]
fn the_final_rounds_kvm_log_catches_writes_after_the_last_guest_harvest() {
    let gap = [("LDT_VMM_TEST_FINAL_GAP_MS", "300")];
    let (out, _dst, _, _s) = migrate_ldt_pv("final-kvm", &gap);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "migrate failed: {err}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["verify_mismatch_pages"], 0, "{r}");
    let f = &r["guest_ldt_final"];
    assert!(f["kvm_pages"].as_u64().unwrap() >= 1, "{f}");
    assert!(f["kvm_only_pages"].as_u64().unwrap() >= 1, "{f}");

    let no_log = [
        ("LDT_VMM_TEST_FINAL_GAP_MS", "300"),
        ("LDT_VMM_TEST_NO_FINAL_KVM_LOG", "1"),
    ];
    let (out, _dst, _, _s) = migrate_ldt_pv("final-no-kvm", &no_log);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "verify must fail: {err}");
    assert!(err.contains("verify FAILED"), "{err}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(r["verify_mismatch_pages"].as_u64().unwrap() >= 1, "{r}");
    assert_eq!(r["guest_ldt_final"]["kvm_pages"], 0);
}

/// The payload rewrites its whole working set all the time; at 2 MB/s its
/// 64 pages take about 130 ms to send, so the guest would rewrite all of
/// its last set while it went out: the set goes in the pause at once
/// (nothing sent with the vCPUs running after the last harvest), and
/// KVM's log of that harvest's interval still covers every write.
#[test]
fn a_final_set_the_guest_would_rewrite_goes_in_the_pause_and_verifies() {
    let s = Scratch::new("guest-ldt", "final-paused");
    let mut src = start(&s, flat::LDT_PV_PAYLOAD, &["--ldt-pv"], &[]);
    wait_announced(&src.api);
    let (_dst, _dst_api, url) = start_destination(&s);
    let out = migrate_with(&src.api, &url, &["--bandwidth-limit", "2"]);
    wait_exit(&mut src.child.0, Duration::from_secs(30));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "migrate failed: {err}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["verify_mismatch_pages"], 0, "{r}");
    let f = &r["guest_ldt_final"];
    assert_eq!(f["paused_at_once"], true, "{f}");
    // The round after the last harvest is the paused one, with the whole
    // working set (the last pre-copy harvest's and the final one's).
    let rounds = r["rounds"].as_array().unwrap();
    let last = rounds.last().unwrap()["pages"].as_u64().unwrap();
    assert!(last >= 64, "the paused round sent {last} pages: {r}");
}

/// On a VM with KVM's dirty ring (which then has no dirty bitmap) the
/// final interval is logged by the ring.
#[test]
fn on_a_dirty_ring_vm_the_final_round_uses_the_ring() {
    let gap = [("LDT_VMM_TEST_FINAL_GAP_MS", "300")];
    let args = ["--ldt-pv", "--dirty-ring", "4096"];
    let (out, _dst, _, _s) = migrate_ldt_pv_with("final-ring", &args, &gap);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "migrate failed: {err}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["verify_mismatch_pages"], 0, "{r}");
    assert!(
        r["guest_ldt_final"]["kvm_only_pages"].as_u64().unwrap() >= 1,
        "{r}"
    );
}

fn migrate_fails_up_front(name: &str, payload: &[u8], extra: &[&str]) {
    let s = Scratch::new("guest-ldt", name);
    let src = start(&s, payload, extra, &[]);
    let url = format!("unix:{}", s.path("nobody.sock").display());
    let out = migrate(&src.api, &url);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("the guest did not announce guest-ldt"),
        "{name}: {err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    let r = ctl(&src.api, &["dirty-start", "guest-ldt"]);
    assert_eq!(r["ok"], false);
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("the guest did not announce guest-ldt"),
        "{r}"
    );
    assert_running(&src.api);
    // Nothing is left claimed: another source works.
    assert_eq!(ctl(&src.api, &["dirty-start", "kvm-bitmap"])["ok"], true);
}

#[test]
fn without_the_device_or_an_announcement_guest_ldt_fails_up_front() {
    // Without the device the driver finds nothing: a payload that runs anyway.
    migrate_fails_up_front("no-device", flat::COUNTER_SLOW_PAYLOAD, &[]);
    migrate_fails_up_front(
        "no-announce",
        flat::LDT_PV_NOANNOUNCE_PAYLOAD,
        &["--ldt-pv"],
    );
}

#[test]
fn a_guest_that_never_answers_a_harvest_fails_the_migration_within_the_deadline() {
    let s = Scratch::new("guest-ldt", "noharvest");
    let src = start(&s, flat::LDT_PV_NOHARVEST_PAYLOAD, &["--ldt-pv"], &[]);
    wait_announced(&src.api);
    let (_dst, _, url) = start_destination(&s);
    let t = Instant::now();
    let out = migrate(&src.api, &url);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("did not complete HARVEST"), "{err}");
    // Bounded by the deadline (10 s), not by the test's patience.
    assert!(t.elapsed() < Duration::from_secs(60), "{:?}", t.elapsed());
    assert_running(&src.api);
    // Still answering: the guest takes START again, tracking was stopped.
    assert_eq!(ctl(&src.api, &["dirty-start", "guest-ldt"])["ok"], true);
    assert_eq!(ctl(&src.api, &["dirty-stop"])["ok"], true);
}

/// One session through the API against a misbehaving driver: START works,
/// the harvest fails with `expect`, the VM keeps running.
fn harvest_fails(name: &str, payload: &[u8], ok_harvests: usize, expect: &str) {
    let s = Scratch::new("guest-ldt", name);
    let src = start(&s, payload, &["--ldt-pv"], &[]);
    wait_announced(&src.api);
    assert_eq!(ctl(&src.api, &["dirty-start", "guest-ldt"])["ok"], true);
    for _ in 0..ok_harvests {
        assert_eq!(ctl(&src.api, &["dirty-harvest"])["ok"], true);
    }
    let r = ctl(&src.api, &["dirty-harvest"]);
    assert_eq!(r["ok"], false, "{r}");
    assert!(r["error"].as_str().unwrap().contains(expect), "{name}: {r}");
    assert_running(&src.api);
    assert_eq!(ctl(&src.api, &["dirty-stop"])["ok"], true);
}

#[test]
fn a_wrong_sequence_number_an_error_status_or_a_driver_leaving_fail_clearly() {
    harvest_fails(
        "badseq",
        flat::LDT_PV_BADSEQ_PAYLOAD,
        0,
        "the guest completed seq",
    );
    harvest_fails(
        "badstatus",
        flat::LDT_PV_BADSTATUS_PAYLOAD,
        0,
        "with status 1",
    );
    // WITHDRAW=2: ANNOUNCE 0 after its second harvest.
    harvest_fails(
        "withdraw",
        flat::LDT_PV_WITHDRAW_PAYLOAD,
        2,
        "left or re-announced",
    );
}

/// The harness payload writes the pages the test lists; every harvest must
/// hold all of them, and nothing else but pages the test names: the
/// command block (the VMM wrote it) and the payload's record page.
#[test]
fn guest_ldt_harvests_report_exactly_the_pages_the_guest_wrote() {
    const ROUNDS: u32 = 6;
    const PER_ROUND: u64 = 300;
    let mut guest = LdtPvWriterVm::new(32).unwrap();
    let vm = guest.vm.clone();
    let mut source =
        dirty::create(DirtySourceKind::GuestLdt, DirtyOptions::default(), None).unwrap();
    dirty::reset_vmm_writes(&vm);
    source.start(&vm).unwrap();

    let mut rng = Rng::new(0x1d7);
    let mut extras = 0;
    for round in 0..ROUNDS {
        let pages: Vec<u64> = rng
            .sample(4096, PER_ROUND)
            .into_iter()
            .map(working_set_page)
            .collect();
        guest.write_round(&pages, 1, 0x40 + round as u8).unwrap();
        let harvested = dirty::harvest(source.as_mut(), &vm).unwrap();

        let written: BTreeSet<u64> = pages.iter().copied().collect();
        let named: BTreeSet<u64> = guest.named_pages(pages.len()).into_iter().collect();
        assert!(named.contains(&RECORD_PAGE));
        let got: BTreeSet<u64> = harvested.pages().collect();
        let missed: Vec<_> = written.difference(&got).collect();
        assert!(missed.is_empty(), "round {round}: missed {missed:#x?}");
        let unexplained: Vec<_> = got
            .difference(&written)
            .filter(|p| !named.contains(p))
            .collect();
        assert!(
            unexplained.is_empty(),
            "round {round}: unexplained {unexplained:#x?}"
        );
        extras += got.len() - written.len();
    }
    eprintln!("guest-ldt: {ROUNDS} rounds of {PER_ROUND} pages, 0 missed, {extras} named extras");
    source.stop(&vm).unwrap();
    guest.stop().unwrap();
}

fn snapshot(api: &Path, to: &Path, base: Option<&Path>) -> serde_json::Value {
    let mut c = bin();
    c.args(["snapshot", "--api", api.to_str().unwrap()]).args([
        "--to",
        to.to_str().unwrap(),
        "--dirty-source",
        "guest-ldt",
    ]);
    if let Some(b) = base {
        c.args(["--base", b.to_str().unwrap()]);
    }
    let out = c.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "snapshot failed: {err}");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A diff chain fed by guest-ldt restores to exactly the memory of its last
/// snapshot (restore checks the digest): a missed write would fail it.
#[test]
fn guest_ldt_diff_snapshots_restore_to_the_exact_memory() {
    let s = Scratch::new("guest-ldt", "snapshots");
    let src = start(&s, flat::LDT_PV_PAYLOAD, &["--ldt-pv"], &[]);
    wait_announced(&src.api);
    let full = s.path("full.snap");
    let d1 = s.path("d1.snap");
    let d2 = s.path("d2.snap");
    snapshot(&src.api, &full, None);
    std::thread::sleep(Duration::from_millis(200));
    let r1 = snapshot(&src.api, &d1, Some(&full));
    std::thread::sleep(Duration::from_millis(200));
    let r2 = snapshot(&src.api, &d2, Some(&d1));
    // A diff holds the pages written since the last snapshot, not all memory.
    let all_pages = 32 * 256;
    for r in [&r1, &r2] {
        let pages = r["pages"].as_u64().unwrap();
        assert!(pages >= 1 && pages < all_pages, "{r}");
    }
    assert_running(&src.api);

    let api = s.path("restored.api");
    let files = [&full, &d1, &d2].map(|p| p.to_str().unwrap().to_string());
    let mut args = vec![
        "run",
        "--paused",
        "--api",
        api.to_str().unwrap(),
        "--restore",
    ];
    args.extend(files.iter().map(|f| f.as_str()));
    let mut restored = KillOnDrop(spawn(&args, &s, "restored", &[]));
    // Restore compares the rebuilt memory with the last snapshot's id
    // before it restores the vCPUs (whose kvmclock KVM then rewrites) and
    // ends the VMM on a mismatch: a running, paused VM is the check passed.
    let t = Instant::now();
    while !api.exists() {
        if let Some(st) = restored.0.try_wait().unwrap() {
            let err = std::fs::read_to_string(s.path("restored.err")).unwrap();
            panic!("restore failed ({st}): {err}");
        }
        assert!(t.elapsed() < Duration::from_secs(60), "restore hangs");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(ctl(&api, &["status"])["result"]["state"], "paused");
    // The restored guest still has its device and driver.
    ctl(&api, &["resume"]);
    assert_eq!(ctl(&api, &["dirty-start", "guest-ldt"])["ok"], true);
    assert_eq!(ctl(&api, &["dirty-harvest"])["ok"], true);
}
