//! Live migration between two ldt-vmm processes: flat counter payloads keep
//! writing pages and printing a counter while they move; the counter must
//! continue on the destination without a gap or a repeat, and the memory
//! digests must match. Failures must leave the source running.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

mod common;

use common::{counters, ctl, vmm as bin, wait_exit, wait_for, wait_listening};
use ldt_migration::{read_frame, write_frame, MessageKind, MAX_PAYLOAD};
use ldt_vmm::flat::{tempfile_path::TempPath, COUNTER_FAST_PAYLOAD, COUNTER_SLOW_PAYLOAD};

/// A scratch directory for one test's sockets and logs.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        static N: AtomicU32 = AtomicU32::new(0);
        let d = std::env::temp_dir().join(format!(
            "ldt-mig-{}-{}-{name}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }
    fn path(&self, f: &str) -> PathBuf {
        self.0.join(f)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn spawn(args: &[&str], out: &Path, err: &Path) -> Child {
    bin()
        .args(args)
        .stdout(std::fs::File::create(out).unwrap())
        .stderr(std::fs::File::create(err).unwrap())
        .spawn()
        .unwrap()
}

fn assert_consecutive(values: &[u64]) {
    for w in values.windows(2) {
        assert_eq!(
            w[1],
            w[0] + 1,
            "counter jumped from {:#x} to {:#x}",
            w[0],
            w[1]
        );
    }
}

/// A running source VM with its API socket.
struct SourceVm {
    child: Child,
    api: PathBuf,
    out: PathBuf,
    _payload: TempPath,
}

impl Drop for SourceVm {
    /// A failed test must not leave its VMM running (a no-op once exited).
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_source(s: &Scratch, payload: &[u8], extra: &[&str]) -> SourceVm {
    let p = TempPath::create(payload, "counter").unwrap();
    let api = s.path("src.api");
    let out = s.path("src.out");
    let mut args = vec![
        "run",
        "--flat",
        p.path().to_str().unwrap(),
        "--api",
        api.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let child = spawn(&args, &out, &s.path("src.err"));
    wait_for(&api);
    // Running, and dirtying memory: a migration started before the guest
    // wrote anything fits in the socket buffers whatever the peer does.
    let t = std::time::Instant::now();
    while counters(&std::fs::read(&out).unwrap_or_default()).len() < 2 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the source guest prints nothing"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    SourceVm {
        child,
        api,
        out,
        _payload: p,
    }
}

fn start_destination(s: &Scratch, url: &str) -> (Child, PathBuf) {
    start_destination_on(s, url, &[])
}

/// `start_destination` with more arguments (`--mem-backing`).
fn start_destination_on(s: &Scratch, url: &str, extra: &[&str]) -> (Child, PathBuf) {
    let api = s.path("dst.api");
    let mut args = vec!["run", "--incoming", url, "--api", api.to_str().unwrap()];
    args.extend_from_slice(extra);
    let child = spawn(&args, &s.path("dst.out"), &s.path("dst.err"));
    wait_listening(&s.path("dst.err"));
    (child, api)
}

fn migrate(src_api: &Path, url: &str, extra: &[&str]) -> Output {
    bin()
        .args(["migrate", "--api", src_api.to_str().unwrap(), "--to", url])
        .args(extra)
        .output()
        .unwrap()
}

/// Migrates a counter payload with `source_args`/`migrate_args` and checks
/// the result end to end. Returns the report.
fn migrate_and_check(
    name: &str,
    url_of: impl Fn(&Scratch) -> String,
    source_args: &[&str],
    migrate_args: &[&str],
) -> serde_json::Value {
    migrate_and_check_on(name, url_of, source_args, &[], migrate_args, &|_, _| {})
}

/// `migrate_and_check` with destination arguments; `check(side, pid)` sees
/// the source VMM running before the migration and the destination after.
fn migrate_and_check_on(
    name: &str,
    url_of: impl Fn(&Scratch) -> String,
    source_args: &[&str],
    dest_args: &[&str],
    migrate_args: &[&str],
    check: &dyn Fn(&str, u32),
) -> serde_json::Value {
    let s = Scratch::new(name);
    let url = url_of(&s);
    let mut src = start_source(&s, COUNTER_SLOW_PAYLOAD, source_args);
    check("source", src.child.id());
    let (mut dst, dst_api) = start_destination_on(&s, &url, dest_args);
    std::thread::sleep(Duration::from_millis(300));

    let mut args = vec!["--verify"];
    args.extend_from_slice(migrate_args);
    let out = migrate(&src.api, &url, &args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "migrate failed: {err}");
    assert!(err.contains("round"), "progress lines on stderr: {err}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["digest_source"], report["digest_destination"]);
    assert!(report["digest_source"].as_str().unwrap().len() == 64);
    assert!(report["rounds"].as_array().unwrap().len() >= 2);
    assert!(report["downtime_ms"].as_f64().unwrap() > 0.0);
    // The breakdown's parts fit inside the downtime they explain.
    let b = report["downtime_breakdown"].as_object().unwrap();
    let parts: f64 = [
        "pause_ms",
        "final_harvest_ms",
        "final_memory_ms",
        "state_save_ms",
        "state_transfer_ms",
        "verify_ms",
        "ready_wait_ms",
        "commit_ms",
    ]
    .iter()
    .map(|k| b[*k].as_f64().unwrap())
    .sum();
    let downtime = report["downtime_ms"].as_f64().unwrap();
    assert!(
        parts > 0.0 && parts <= downtime + 0.01,
        "{b:?} vs {downtime}"
    );
    assert!(b["destination_restore_ms"].as_f64().unwrap() > 0.0);
    assert!(
        err.contains("downtime: pause"),
        "breakdown line on stderr: {err}"
    );

    let status = wait_exit(&mut src.child, Duration::from_secs(10));
    assert!(
        status.success(),
        "source VMM ends after a migration: {status}"
    );

    // The guest goes on at the destination.
    let before = counters(&std::fs::read(s.path("dst.out")).unwrap()).len();
    advances(&s.path("dst.out"), before + 10);
    check("destination", dst.id());
    let status = ctl(&dst_api, &["status"]);
    let dest_backing = dest_args
        .windows(2)
        .find(|w| w[0] == "--mem-backing")
        .map_or("anon", |w| w[1]);
    assert_eq!(
        status["result"]["mem_backing"], dest_backing,
        "the destination's own backing: {status}"
    );
    assert_eq!(ctl(&dst_api, &["shutdown"])["ok"], true);
    assert!(wait_exit(&mut dst, Duration::from_secs(10)).success());

    let mut all = std::fs::read(&src.out).unwrap();
    let src_count = counters(&all).len();
    all.extend(std::fs::read(s.path("dst.out")).unwrap());
    let values = counters(&all);
    assert!(
        src_count > 10 && values.len() > src_count + 10,
        "{src_count} / {}",
        values.len()
    );
    assert_eq!(values[0], 0);
    assert_consecutive(&values);
    report
}

fn unix_url(s: &Scratch) -> String {
    format!("unix:{}", s.path("mig.sock").display())
}

#[test]
fn migrates_a_running_guest_with_kvm_bitmap() {
    let r = migrate_and_check("bitmap", unix_url, &[], &["--dirty-source", "kvm-bitmap"]);
    assert_eq!(r["dirty_source"], "kvm-bitmap");
    assert_eq!(r["converged"], true);
}

#[test]
fn migrates_a_running_guest_with_kvm_clear() {
    let r = migrate_and_check(
        "clear",
        unix_url,
        &["--clear-chunk-pages", "4096"],
        &["--dirty-source", "kvm-clear"],
    );
    assert_eq!(r["dirty_source"], "kvm-clear");
}

#[test]
fn migrates_a_running_guest_with_kvm_ring() {
    let r = migrate_and_check(
        "ring",
        unix_url,
        &["--dirty-ring", "4096"],
        &["--dirty-source", "kvm-ring"],
    );
    assert_eq!(r["dirty_source"], "kvm-ring");
}

#[test]
fn migrates_over_tcp() {
    let port = 20000 + (std::process::id() % 20000) as u16;
    migrate_and_check(
        "tcp",
        |_| format!("tcp:127.0.0.1:{port}"),
        &[],
        &["--dirty-source", "kvm-bitmap"],
    );
}

/// (name, nice value) of every thread of process `pid`.
fn thread_nices(pid: u32) -> Vec<(String, i64)> {
    let mut all = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let stat = std::fs::read_to_string(t.unwrap().path().join("stat")).unwrap();
        // "tid (comm) state ppid ...": nice is field 19, the 17th after comm.
        let (head, rest) = stat.rsplit_once(") ").unwrap();
        let name = head.split_once(" (").unwrap().1.to_string();
        let nice = rest.split_whitespace().nth(16).unwrap().parse().unwrap();
        all.push((name, nice));
    }
    all
}

/// This test process's nice value: what the VMMs it starts inherit.
fn own_nice() -> i64 {
    thread_nices(std::process::id())
        .into_iter()
        .map(|(_, n)| n)
        .min()
        .unwrap()
}

#[test]
fn pre_copy_and_receiving_run_nicer_and_the_vcpus_do_not() {
    let base = own_nice();
    let report = migrate_and_check_on(
        "nice",
        unix_url,
        &[],
        &["--incoming-nice", "13"],
        // A nicer pre-copy yields to whatever else runs: on a loaded host
        // (a CI machine) it may never converge, which is not what this
        // checks, so the switch-over is forced after a few rounds.
        &[
            "--dirty-source",
            "kvm-bitmap",
            "--precopy-nice",
            "11",
            "--max-rounds",
            "5",
            "--policy",
            "force",
        ],
        &|side, pid| {
            // Before the migration on the source, after it on the
            // destination: no thread (vCPU, API, main) is nicer than the
            // VMM was started at.
            let nices = thread_nices(pid);
            assert!(
                nices.iter().all(|(_, n)| *n == base),
                "{side}: {nices:?} (started at {base})"
            );
            if side == "destination" {
                let err = std::fs::read_link(format!("/proc/{pid}/fd/2")).unwrap();
                let err = std::fs::read_to_string(err).unwrap();
                assert!(
                    err.contains(&format!("receiving the migration at nice {}", base.max(13))),
                    "{err}"
                );
            }
        },
    );
    assert_eq!(report["precopy_nice"], base.max(11), "{report}");
    // Without the option the rounds run at the VMM's own value.
    let plain = migrate_and_check("nice-0", unix_url, &[], &["--dirty-source", "kvm-bitmap"]);
    assert_eq!(plain["precopy_nice"], base, "{plain}");
}

/// Each thread of `pid`: its name and the CPUs it may run on, as the
/// kernel lists them (`Cpus_allowed_list`).
fn thread_cpus(pid: u32) -> Vec<(String, String)> {
    let mut all = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let t = t.unwrap().path();
        let name = std::fs::read_to_string(t.join("comm")).unwrap();
        let status = std::fs::read_to_string(t.join("status")).unwrap();
        let cpus = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap();
        all.push((name.trim().to_string(), cpus.trim().to_string()));
    }
    all
}

#[test]
fn vcpu_and_vmm_threads_run_on_the_cpus_each_side_gives_them() {
    let allowed = ldt_vmm::affinity::current_thread().unwrap().to_string();
    // The first and the last CPU this test may use (one and the same on
    // a one-CPU machine, where this checks less).
    let cpus: Vec<String> = allowed.split([',', '-']).map(str::to_string).collect();
    let (a, b) = (cpus[0].as_str(), cpus[cpus.len() - 1].as_str());
    if a == b {
        eprintln!("only CPU {a} is allowed here: every thread goes to it");
    }
    // The destination swaps them: its placement is its own, not the source's.
    let check = |side: &str, pid: u32| {
        let (vcpu, vmm) = if side == "source" { (a, b) } else { (b, a) };
        let threads = thread_cpus(pid);
        assert!(threads.iter().any(|(n, _)| n == "vcpu0"), "{threads:?}");
        for (name, cpus) in &threads {
            let want = if name.starts_with("vcpu") { vcpu } else { vmm };
            assert_eq!(cpus, want, "{side}: thread {name} of {threads:?}");
        }
    };
    let report = migrate_and_check_on(
        "affinity",
        unix_url,
        &["--vcpu-cpus", a, "--vmm-cpus", b],
        &["--vcpu-cpus", b, "--vmm-cpus", a],
        &["--dirty-source", "kvm-clear"],
        &check,
    );
    assert_eq!(report["converged"], true, "{report}");
}

#[test]
fn force_policy_switches_over_a_throttled_guest_that_never_converges() {
    let s = Scratch::new("force");
    let url = unix_url(&s);
    let mut src = start_source(&s, COUNTER_FAST_PAYLOAD, &[]);
    let (mut dst, dst_api) = start_destination(&s, &url);
    let out = migrate(
        &src.api,
        &url,
        &[
            "--downtime-ms",
            "0",
            "--max-rounds",
            "2",
            "--policy",
            "force",
            "--verify",
            "--auto-converge",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["converged"], false);
    assert_eq!(r["digest_source"], r["digest_destination"]);
    assert_eq!(
        r["throttle_pct"], 20,
        "auto-converge throttled from round 2"
    );
    assert_eq!(
        r["rounds"].as_array().unwrap().len(),
        4,
        "round 0, two more, the last"
    );
    assert!(wait_exit(&mut src.child, Duration::from_secs(10)).success());
    std::thread::sleep(Duration::from_millis(300));
    ctl(&dst_api, &["shutdown"]);
    assert!(wait_exit(&mut dst, Duration::from_secs(10)).success());
    let mut all = std::fs::read(&src.out).unwrap();
    all.extend(std::fs::read(s.path("dst.out")).unwrap());
    assert_consecutive(&counters(&all));
}

/// The source is still running and its counter still advances.
fn assert_source_alive(src: &mut SourceVm) {
    assert!(src.child.try_wait().unwrap().is_none(), "source VMM exited");
    assert_eq!(ctl(&src.api, &["status"])["result"]["state"], "running");
    let a = counters(&std::fs::read(&src.out).unwrap());
    advances(&src.out, a.len() + 10);
    assert_consecutive(&counters(&std::fs::read(&src.out).unwrap()));
}

/// Waits (at most 20 s: the host may be loaded) until the console at `out`
/// holds at least `lines` counter lines.
fn advances(out: &Path, lines: usize) {
    let t = std::time::Instant::now();
    loop {
        let n = counters(&std::fs::read(out).unwrap()).len();
        if n >= lines {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "guest counter at {} stopped at {n} lines",
            out.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn shutdown(src: &mut SourceVm) {
    ctl(&src.api, &["shutdown"]);
    assert!(wait_exit(&mut src.child, Duration::from_secs(10)).success());
}

#[test]
fn cancel_policy_leaves_a_non_converging_guest_running_on_the_source() {
    let s = Scratch::new("cancel");
    let url = unix_url(&s);
    let mut src = start_source(&s, COUNTER_FAST_PAYLOAD, &[]);
    let (mut dst, _) = start_destination(&s, &url);
    let out = migrate(
        &src.api,
        &url,
        &[
            "--downtime-ms",
            "0",
            "--max-rounds",
            "2",
            "--policy",
            "cancel",
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("did not converge") && err.contains("keeps running here"),
        "{err}"
    );
    let status = wait_exit(&mut dst, Duration::from_secs(10));
    assert!(!status.success(), "the destination gives up too");
    let dst_err = std::fs::read_to_string(s.path("dst.err")).unwrap();
    assert!(dst_err.contains("aborted"), "{dst_err}");
    assert_source_alive(&mut src);
    shutdown(&mut src);
}

#[test]
fn a_killed_destination_leaves_the_source_running() {
    let s = Scratch::new("kill");
    let url = unix_url(&s);
    let mut src = start_source(&s, COUNTER_FAST_PAYLOAD, &[]);
    let (mut dst, _) = start_destination(&s, &url);
    let api = src.api.clone();
    let url2 = url.clone();
    // 64 MiB of live pages at 20 MB/s: round 0 alone takes seconds.
    let m = std::thread::spawn(move || migrate(&api, &url2, &["--bandwidth-limit", "20"]));
    std::thread::sleep(Duration::from_millis(800));
    dst.kill().unwrap();
    dst.wait().unwrap();
    let out = m.join().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("migration failed") && err.contains("keeps running here"),
        "{err}"
    );
    assert_source_alive(&mut src);
    shutdown(&mut src);
}

#[test]
fn a_destination_speaking_another_version_is_refused() {
    let s = Scratch::new("version");
    let sock = s.path("fake.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let fake = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        let hello = read_frame(&mut c).unwrap();
        assert_eq!(hello.kind, MessageKind::Hello);
        let mut frame = Vec::new();
        write_frame(&mut frame, MessageKind::HelloAck, b"").unwrap();
        frame[4] = 9; // version 9
        c.write_all(&frame).unwrap();
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest);
    });
    let mut src = start_source(&s, COUNTER_SLOW_PAYLOAD, &[]);
    let out = migrate(&src.api, &format!("unix:{}", sock.display()), &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("protocol version 9 not supported"), "{err}");
    fake.join().unwrap();
    assert_source_alive(&mut src);
    shutdown(&mut src);
}

/// Plays a source that sends a Hello and then `bad` to a real destination.
fn destination_refuses(name: &str, bad: impl FnOnce(&mut Vec<u8>), needle: &str) {
    let s = Scratch::new(name);
    let url = unix_url(&s);
    let (mut dst, _) = start_destination(&s, &url);
    let mut c = std::os::unix::net::UnixStream::connect(s.path("mig.sock")).unwrap();
    let hello = br#"{"mem_mib":32,"vcpus":1,"cpu_profile":"host","dirty_source":"kvm-bitmap","verify":false}"#;
    write_frame(&mut c, MessageKind::Hello, hello).unwrap();
    assert_eq!(read_frame(&mut c).unwrap().kind, MessageKind::HelloAck);
    let mut stream = Vec::new();
    bad(&mut stream);
    c.write_all(&stream).unwrap();
    drop(c);
    let status = wait_exit(&mut dst, Duration::from_secs(10));
    assert!(!status.success());
    let err = std::fs::read_to_string(s.path("dst.err")).unwrap();
    assert!(
        err.contains(needle),
        "destination stderr lacks {needle:?}: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

fn memory_message() -> Vec<u8> {
    let mut m = ldt_migration::encode_memory_header(&[ldt_migration::MemoryRange {
        gpa: 0x200000,
        pages: 1,
        flags: 0,
    }]);
    m.extend_from_slice(&[0xab; 4096]);
    m
}

#[test]
fn a_destination_refuses_a_corrupted_stream() {
    destination_refuses(
        "flip",
        |s| {
            write_frame(s, MessageKind::Memory, &memory_message()).unwrap();
            let n = s.len();
            s[n - 100] ^= 0x10;
        },
        "checksum mismatch",
    );
}

#[test]
fn a_destination_refuses_a_truncated_stream() {
    destination_refuses(
        "trunc",
        |s| {
            write_frame(s, MessageKind::Memory, &memory_message()).unwrap();
            s.truncate(s.len() - 1000);
        },
        "truncated",
    );
}

#[test]
fn a_destination_refuses_memory_outside_guest_ram() {
    destination_refuses(
        "range",
        |s| {
            let m = ldt_migration::encode_memory_header(&[ldt_migration::MemoryRange {
                gpa: 1 << 40,
                pages: 1,
                flags: ldt_migration::RANGE_ZERO,
            }]);
            write_frame(s, MessageKind::Memory, &m).unwrap();
        },
        "is not guest RAM",
    );
}

#[test]
fn a_destination_refuses_a_huge_frame() {
    destination_refuses(
        "huge",
        |s| {
            write_frame(s, MessageKind::Memory, b"").unwrap();
            s[8..16].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
        },
        "exceeds",
    );
}

/// What a fake destination (speaking the protocol) does after its HelloAck.
#[derive(Clone, Copy, PartialEq)]
enum FakeDestination {
    /// Stops reading at once (and holds the connection open).
    StopsReading,
    /// Reads everything, never answers the State with Ready.
    NeverReady,
    /// Answers Ready, then drops the connection once Commit arrives.
    DropsAfterCommit,
    /// Answers Ready, then never answers Commit.
    HangsAfterCommit,
    /// Answers Ready with a digest that cannot match what was sent.
    WrongDigest,
}

/// Reads one frame; of a `Pages` message also the data that follows it.
fn read_message(c: &mut impl Read) -> Result<ldt_migration::Frame, ldt_migration::ProtocolError> {
    let f = read_frame(c)?;
    if f.kind == MessageKind::Pages {
        let (_, data) = ldt_migration::decode_pages_table(&f.payload)?;
        std::io::copy(&mut c.take(data), &mut std::io::sink())?;
    }
    Ok(f)
}

/// Serves one source on `sock` as `how` says; returns the kinds of the
/// frames it received after the HelloAck. Holds the connection until `release`.
fn fake_destination(
    sock: PathBuf,
    how: FakeDestination,
    release: std::sync::mpsc::Receiver<()>,
) -> std::thread::JoinHandle<Vec<MessageKind>> {
    let listener = UnixListener::bind(&sock).unwrap();
    std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        assert_eq!(read_frame(&mut c).unwrap().kind, MessageKind::Hello);
        write_frame(&mut c, MessageKind::HelloAck, b"").unwrap();
        let mut seen = Vec::new();
        if how == FakeDestination::StopsReading {
            let _ = release.recv();
            return seen;
        }
        while let Ok(f) = read_message(&mut c) {
            seen.push(f.kind);
            match (f.kind, how) {
                (MessageKind::State, FakeDestination::NeverReady) => {}
                (MessageKind::State, FakeDestination::WrongDigest) => {
                    let ready = format!(r#"{{"digest":"{}"}}"#, "0".repeat(64));
                    write_frame(&mut c, MessageKind::Ready, ready.as_bytes()).unwrap()
                }
                (MessageKind::State, _) => {
                    write_frame(&mut c, MessageKind::Ready, br#"{"digest":null}"#).unwrap()
                }
                (MessageKind::Commit, FakeDestination::DropsAfterCommit) => return seen,
                (MessageKind::Commit, _) => {
                    let _ = release.recv();
                    return seen;
                }
                _ => {}
            }
        }
        seen
    })
}

/// Migrates to a fake destination; returns the migrate output, the frames
/// the fake saw, and the source.
fn migrate_to_fake(
    name: &str,
    how: FakeDestination,
) -> (Output, Vec<MessageKind>, SourceVm, Scratch) {
    let s = Scratch::new(name);
    let sock = s.path("fake.sock");
    let (tx, rx) = std::sync::mpsc::channel();
    let fake = fake_destination(sock.clone(), how, rx);
    let src = start_source(&s, COUNTER_FAST_PAYLOAD, &[]);
    let verify: &[&str] = if how == FakeDestination::WrongDigest {
        &["--verify"]
    } else {
        &[]
    };
    let out = migrate(&src.api, &format!("unix:{}", sock.display()), verify);
    let _ = tx.send(());
    let seen = fake.join().unwrap();
    (out, seen, src, s)
}

/// The source is paused and prints nothing, and says why.
fn assert_source_postmigrate(src: &mut SourceVm) {
    assert!(src.child.try_wait().unwrap().is_none(), "source VMM exited");
    assert_eq!(ctl(&src.api, &["status"])["result"]["state"], "postmigrate");
    let before = std::fs::read(&src.out).unwrap().len();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        std::fs::read(&src.out).unwrap().len(),
        before,
        "a postmigrate guest does not run"
    );
}

#[test]
fn a_destination_that_drops_after_commit_leaves_the_source_paused() {
    let (out, seen, mut src, _s) =
        migrate_to_fake("commit-drop", FakeDestination::DropsAfterCommit);
    assert_eq!(seen.last(), Some(&MessageKind::Commit));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("outcome unknown: the destination may be running"),
        "{err}"
    );
    assert_source_postmigrate(&mut src);
    // The operator decides the destination does not run it: resume here.
    assert_eq!(ctl(&src.api, &["resume"])["result"]["state"], "running");
    assert_source_alive(&mut src);
    shutdown(&mut src);
}

#[test]
fn a_destination_that_hangs_after_commit_leaves_the_source_paused() {
    let (out, seen, mut src, _s) =
        migrate_to_fake("commit-hang", FakeDestination::HangsAfterCommit);
    assert_eq!(seen.last(), Some(&MessageKind::Commit));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("outcome unknown") && err.contains("timed out"),
        "{err}"
    );
    assert_source_postmigrate(&mut src);
    shutdown(&mut src);
}

#[test]
fn a_destination_that_stops_reading_ends_the_migration_with_the_source_running() {
    let (out, _, mut src, _s) = migrate_to_fake("stall", FakeDestination::StopsReading);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("peer stopped reading") && err.contains("keeps running here"),
        "{err}"
    );
    assert_source_alive(&mut src);
    shutdown(&mut src);
}

#[test]
fn a_destination_that_never_answers_ready_ends_the_switch_over_with_the_source_running() {
    let (out, seen, mut src, _s) = migrate_to_fake("no-ready", FakeDestination::NeverReady);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("timed out") && err.contains("keeps running here"),
        "{err}"
    );
    assert!(seen.contains(&MessageKind::State), "{seen:?}");
    assert_eq!(
        seen.last(),
        Some(&MessageKind::Abort),
        "the source says it gives up"
    );
    assert_source_alive(&mut src);
    shutdown(&mut src);
}

fn start_destination_with(s: &Scratch, url: &str, extra: &[&str]) -> Child {
    let api = s.path("dst.api");
    let mut args = vec!["run", "--incoming", url, "--api", api.to_str().unwrap()];
    args.extend_from_slice(extra);
    let child = spawn(&args, &s.path("dst.out"), &s.path("dst.err"));
    wait_listening(&s.path("dst.err"));
    child
}

/// A migration that takes seconds (64 MiB at 40 MB/s, forced after one
/// round), so that something can meet it while it runs.
const SLOW_FORCED: &[&str] = &[
    "--bandwidth-limit",
    "40",
    "--max-rounds",
    "1",
    "--downtime-ms",
    "0",
    "--policy",
    "force",
    "--verify",
];
const DETACH: &[&str] = &["--detach"];

/// `ldt-vmm snapshot --api API --to TO`, its output.
fn snapshot(api: &Path, to: &Path, base: Option<&Path>) -> Output {
    let mut c = bin();
    c.args(["snapshot", "--api", api.to_str().unwrap(), "--to"])
        .arg(to);
    if let Some(b) = base {
        c.arg("--base").arg(b);
    }
    c.output().unwrap()
}

const FAKE_HELLO: &[u8] =
    br#"{"mem_mib":32,"vcpus":1,"cpu_profile":"host","dirty_source":"kvm-bitmap","verify":false}"#;

#[test]
fn a_silent_or_trickling_source_does_not_hold_the_destination() {
    for trickle in [false, true] {
        let s = Scratch::new(if trickle { "trickle" } else { "silent" });
        let url = unix_url(&s);
        let mut dst = start_destination_with(&s, &url, &["--incoming-timeout", "2"]);
        let mut c = std::os::unix::net::UnixStream::connect(s.path("mig.sock")).unwrap();
        write_frame(&mut c, MessageKind::Hello, FAKE_HELLO).unwrap();
        assert_eq!(read_frame(&mut c).unwrap().kind, MessageKind::HelloAck);
        if trickle {
            // A valid memory frame, a byte every 100 ms: each read returns,
            // but the frame would take minutes.
            let mut frame = Vec::new();
            write_frame(&mut frame, MessageKind::Memory, &memory_message()).unwrap();
            for b in frame {
                if c.write_all(&[b]).is_err() || dst.try_wait().unwrap().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let status = wait_exit(&mut dst, Duration::from_secs(60));
        assert!(!status.success());
        let err = std::fs::read_to_string(s.path("dst.err")).unwrap();
        assert!(err.contains("timed out"), "{err}");
    }
}

#[test]
fn the_destination_answers_probes_and_second_sources_and_still_migrates() {
    let s = Scratch::new("service");
    let url = unix_url(&s);
    let sock = s.path("mig.sock");
    let mut src = start_source(&s, COUNTER_FAST_PAYLOAD, &[]);
    let mut dst = start_destination_with(&s, &url, &["--incoming-timeout", "5"]);
    let dst_api = s.path("dst.api");
    // A port probe: connect and close.
    drop(std::os::unix::net::UnixStream::connect(&sock).unwrap());
    // Something that is not a migration gets an answer.
    let mut junk = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    junk.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let answer = read_frame(&mut junk).unwrap();
    assert_eq!(answer.kind, MessageKind::Abort);
    assert!(String::from_utf8_lossy(&answer.payload).contains("not a migration"));
    assert!(
        dst.try_wait().unwrap().is_none(),
        "the destination waits on"
    );

    // The real migration, slowed down so a second source meets it.
    let api = src.api.clone();
    let url2 = url.clone();
    let m = std::thread::spawn(move || migrate(&api, &url2, SLOW_FORCED));
    // Wait until the destination has the migration: the source reports
    // progress only after the destination's HelloAck.
    let t = std::time::Instant::now();
    loop {
        let st = ctl(&src.api, &["migrate-status"]);
        if !st["result"]["progress"].is_null() {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "no progress: {st}");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut second = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    write_frame(&mut second, MessageKind::Hello, FAKE_HELLO).unwrap();
    let busy = read_frame(&mut second).unwrap();
    assert_eq!(busy.kind, MessageKind::Abort);
    assert!(
        String::from_utf8_lossy(&busy.payload).contains("already receiving a migration"),
        "{:?}",
        String::from_utf8_lossy(&busy.payload)
    );
    let out = m.join().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["digest_source"], r["digest_destination"]);
    assert!(wait_exit(&mut src.child, Duration::from_secs(10)).success());
    wait_for(&dst_api);
    ctl(&dst_api, &["shutdown"]);
    assert!(wait_exit(&mut dst, Duration::from_secs(10)).success());
}

#[test]
fn one_dirty_log_user_at_a_time() {
    let s = Scratch::new("one-user");
    let url = unix_url(&s);
    let mut src = start_source(&s, COUNTER_SLOW_PAYLOAD, &[]);
    // The API's tracking holds the log: a migration is refused.
    assert_eq!(ctl(&src.api, &["dirty-start", "kvm-bitmap"])["ok"], true);
    let out = migrate(&src.api, &url, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("in use by dirty tracking started through the API"),
        "{err}"
    );
    let snap = snapshot(&src.api, &s.path("full.snap"), None);
    assert!(
        String::from_utf8_lossy(&snap.stderr).contains("one user at a time"),
        "{}",
        String::from_utf8_lossy(&snap.stderr)
    );
    assert_eq!(ctl(&src.api, &["dirty-stop"])["ok"], true);

    // A snapshot chain holds it now: migration and dirty-start are refused,
    // and the chain's next diff still has what changed.
    let full = s.path("full.snap");
    let ok = snapshot(&src.api, &full, None);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let out = migrate(&src.api, &url, &[]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("diff-snapshot chain"));
    let r = ctl(&src.api, &["dirty-start", "kvm-clear"]);
    assert!(
        r["error"].as_str().unwrap().contains("diff-snapshot chain"),
        "{r}"
    );
    advances(
        &src.out,
        counters(&std::fs::read(&src.out).unwrap()).len() + 5,
    );
    let diff = snapshot(&src.api, &s.path("d1.snap"), Some(&full));
    assert!(diff.status.success());
    let d: serde_json::Value = serde_json::from_slice(&diff.stdout).unwrap();
    assert!(
        d["pages"].as_u64().unwrap() > 0,
        "the chain still tracks: {d}"
    );
    assert_source_alive(&mut src);
    shutdown(&mut src);
}

#[test]
fn two_migrations_at_once_are_refused_and_the_first_completes() {
    let s = Scratch::new("two");
    let url = unix_url(&s);
    let mut src = start_source(&s, COUNTER_FAST_PAYLOAD, &[]);
    let (mut dst, dst_api) = start_destination(&s, &url);
    let first = migrate(&src.api, &url, &[DETACH, SLOW_FORCED].concat());
    assert!(String::from_utf8_lossy(&first.stdout).contains("running"));
    let out = migrate(
        &src.api,
        &format!("unix:{}", s.path("other.sock").display()),
        &[],
    );
    let second = String::from_utf8_lossy(&out.stderr);
    assert!(
        second.contains("a migration is already in progress"),
        "{second}"
    );
    // Nor may a snapshot chain start on the log the migration uses.
    let snap = snapshot(&src.api, &s.path("during.snap"), None);
    let snap_err = String::from_utf8_lossy(&snap.stderr);
    assert!(
        !snap.status.success() && snap_err.contains("in use by a migration in progress"),
        "{snap_err}"
    );
    let t = std::time::Instant::now();
    let st = loop {
        let st = ctl(&src.api, &["migrate-status"]);
        if st["result"]["state"] != "running" || t.elapsed() > Duration::from_secs(60) {
            break st;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(st["result"]["state"], "completed", "{st}");
    let r = &st["result"]["report"];
    assert_eq!(r["digest_source"], r["digest_destination"]);
    assert!(wait_exit(&mut src.child, Duration::from_secs(10)).success());
    ctl(&dst_api, &["shutdown"]);
    assert!(wait_exit(&mut dst, Duration::from_secs(10)).success());
}

#[test]
fn an_operator_paused_vm_stays_paused_after_a_failed_migration_or_a_snapshot() {
    let s = Scratch::new("held");
    let sock = s.path("fake.sock");
    let (tx, rx) = std::sync::mpsc::channel();
    // Fails at the switch-over, where the migration pauses and resumes.
    let fake = fake_destination(sock.clone(), FakeDestination::NeverReady, rx);
    let mut src = start_source(&s, COUNTER_SLOW_PAYLOAD, &[]);
    assert_eq!(ctl(&src.api, &["pause"])["result"]["state"], "paused");
    let out = migrate(&src.api, &format!("unix:{}", sock.display()), &[]);
    let _ = tx.send(());
    fake.join().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("paused by the operator"),
        "{err}"
    );
    assert_eq!(ctl(&src.api, &["status"])["result"]["state"], "paused");
    let snap = snapshot(&src.api, &s.path("p.snap"), None);
    assert!(
        snap.status.success(),
        "{}",
        String::from_utf8_lossy(&snap.stderr)
    );
    assert_eq!(ctl(&src.api, &["status"])["result"]["state"], "paused");
    assert_eq!(ctl(&src.api, &["resume"])["result"]["state"], "running");
    assert_source_alive(&mut src);
    shutdown(&mut src);
}

#[test]
fn an_api_migration_runs_in_the_background_and_cancels_mid_round_with_the_source_unharmed() {
    let s = Scratch::new("async");
    let url = unix_url(&s);
    let mut src = start_source(&s, COUNTER_FAST_PAYLOAD, &[]);
    let (mut dst, _) = start_destination(&s, &url);
    // 64 MiB of live pages at 20 MB/s: round 0 alone takes seconds.
    let out = migrate(&src.api, &url, &["--detach", "--bandwidth-limit", "20"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let started: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(started["result"]["state"], "running", "{started}");
    // The API still answers while it runs, and the guest still runs.
    let st = ctl(&src.api, &["migrate-status"]);
    assert_eq!(st["result"]["state"], "running", "{st}");
    assert_eq!(ctl(&src.api, &["status"])["result"]["state"], "running");
    let again = migrate(&src.api, &url, &["--detach"]);
    assert!(String::from_utf8_lossy(&again.stdout).contains("already in progress"));
    assert_eq!(ctl(&src.api, &["migrate-cancel"])["ok"], true);
    let t = std::time::Instant::now();
    let st = loop {
        let st = ctl(&src.api, &["migrate-status"]);
        if st["result"]["state"] != "running" || t.elapsed() > Duration::from_secs(30) {
            break st;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(st["result"]["state"], "cancelled", "{st}");
    assert!(
        st["result"]["error"]
            .as_str()
            .unwrap()
            .contains("keeps running here"),
        "{st}"
    );
    assert!(
        st["result"]["progress"].is_null(),
        "cancelled inside round 0: {st}"
    );
    assert_eq!(ctl(&src.api, &["migrate-cancel"])["ok"], false);
    let status = wait_exit(&mut dst, Duration::from_secs(10));
    assert!(!status.success(), "the destination is told and gives up");
    assert_source_alive(&mut src);
    // The log is free again: the API's tracking can start.
    assert_eq!(ctl(&src.api, &["dirty-start", "kvm-bitmap"])["ok"], true);
    shutdown(&mut src);
}

#[test]
fn a_digest_mismatch_before_commit_aborts_with_the_source_running() {
    let (out, seen, mut src, _s) = migrate_to_fake("digest", FakeDestination::WrongDigest);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("memory digest mismatch") && err.contains("keeps running here"),
        "{err}"
    );
    assert!(!seen.contains(&MessageKind::Commit), "{seen:?}");
    assert_source_alive(&mut src);
    shutdown(&mut src);
}

#[test]
fn the_destination_memory_is_the_source_memory_exactly() {
    // A paused source and a destination that stays paused: the memory the
    // destination ends with must hash like the source's.
    let s = Scratch::new("exact");
    let url = unix_url(&s);
    let mut src = start_source(&s, COUNTER_FAST_PAYLOAD, &[]);
    let dst_api = s.path("dst.api");
    let mut dst = spawn(
        &[
            "run",
            "--incoming",
            &url,
            "--api",
            dst_api.to_str().unwrap(),
            "--paused",
        ],
        &s.path("dst.out"),
        &s.path("dst.err"),
    );
    wait_for(&s.path("mig.sock"));
    advances(&src.out, 20);
    assert_eq!(ctl(&src.api, &["pause"])["result"]["state"], "paused");
    let before = ctl(&src.api, &["memory-digest"])["result"]["digest"].clone();
    assert!(before.is_string());
    let out = migrate(&src.api, &url, &["--verify"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["verify_mismatch_pages"], 0);
    assert!(wait_exit(&mut src.child, Duration::from_secs(10)).success());
    wait_for(&dst_api);
    assert_eq!(ctl(&dst_api, &["status"])["result"]["state"], "paused");
    assert_eq!(
        ctl(&dst_api, &["memory-digest"])["result"]["digest"],
        before
    );
    ctl(&dst_api, &["shutdown"]);
    assert!(wait_exit(&mut dst, Duration::from_secs(10)).success());
}

/// The smaps lines of the read-write mapping of `mib` MiB (guest RAM) in
/// process `pid`.
fn guest_ram_smaps(pid: u32, mib: u64) -> String {
    ldt_vmm::bench::smaps::mapping(&pid.to_string(), |a, b, perms| {
        b - a == mib << 20 && perms == "rw-p"
    })
    .filter(|lines| !lines.is_empty())
    .unwrap_or_else(|| panic!("no {mib} MiB mapping in process {pid}"))
}

fn smaps_field(smaps: &str, key: &str) -> String {
    smaps
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Asserts that guest RAM of `pid` is mapped as `backing` says, and prints
/// how much of it huge pages back.
fn assert_backed_as(side: &str, pid: u32, backing: &str, mib: u64) {
    let smaps = guest_ram_smaps(pid, mib);
    let flags = smaps_field(&smaps, "VmFlags:");
    let has = |f: &str| flags.split_whitespace().any(|x| x == f);
    match backing {
        "thp" => assert!(has("hg") && !has("ht"), "{side}: {flags}"),
        "hugetlbfs" => assert!(has("ht"), "{side}: {flags}"),
        _ => assert!(!has("hg") && !has("ht"), "{side}: {flags}"),
    }
    eprintln!(
        "{side} ({backing}): AnonHugePages {}, Private_Hugetlb {}",
        smaps_field(&smaps, "AnonHugePages:"),
        smaps_field(&smaps, "Private_Hugetlb:")
    );
}

/// Migrates with --verify from a `from`-backed source to a `to`-backed
/// destination (66 MiB guests: no other mapping has that size), checking each side's mapping.
fn migrate_between_backings(name: &str, from: &'static str, to: &'static str, source: &str) {
    let pages = [from, to].iter().filter(|b| **b == "hugetlbfs").count() as u64 * 33;
    let _pool = if pages > 0 {
        match ldt_vmm::vm::memory::HugePagePool::reserve(pages) {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("skipped: no hugetlbfs pages: {e}");
                return;
            }
        }
    } else {
        None
    };
    let mut source_args = vec!["--mem", "66", "--mem-backing", from];
    if source == "kvm-ring" {
        source_args.extend(["--dirty-ring", "4096"]);
    }
    let r = migrate_and_check_on(
        name,
        unix_url,
        &source_args,
        &["--mem-backing", to],
        &["--dirty-source", source],
        &|side, pid| assert_backed_as(side, pid, if side == "source" { from } else { to }, 66),
    );
    assert_eq!(r["dirty_source"], source);
    assert_eq!(r["verify_mismatch_pages"], 0, "{r}");
}

#[test]
fn migrates_a_thp_backed_guest() {
    migrate_between_backings("thp", "thp", "thp", "kvm-bitmap");
}

#[test]
fn migrates_a_hugetlbfs_backed_guest() {
    migrate_between_backings("hugetlbfs", "hugetlbfs", "hugetlbfs", "kvm-clear");
}

#[test]
fn migrates_between_different_backings() {
    migrate_between_backings("anon-thp", "anon", "thp", "kvm-bitmap");
    migrate_between_backings("thp-hugetlbfs", "thp", "hugetlbfs", "kvm-ring");
    migrate_between_backings("hugetlbfs-anon", "hugetlbfs", "anon", "kvm-bitmap");
}

#[test]
fn a_destination_short_of_huge_pages_refuses_and_the_source_runs_on() {
    use ldt_vmm::vm::memory::{available_huge_pages, HugePagePool};
    // No other test of this binary changes the pool meanwhile.
    let _lock = HugePagePool::reserve(0);
    let free = available_huge_pages().unwrap_or(0);
    if free >= 128 {
        eprintln!("skipped: this host has {free} free huge pages, a 256 MiB guest fits");
        return;
    }
    let s = Scratch::new("short");
    let url = unix_url(&s);
    let mut src = start_source(&s, COUNTER_SLOW_PAYLOAD, &[]);
    let (mut dst, _) = start_destination_on(&s, &url, &["--mem-backing", "hugetlbfs"]);
    let out = migrate(&src.api, &url, &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("destination cannot build the VM: --mem-backing hugetlbfs: 256 MiB of guest memory needs 128 free 2 MiB huge pages")
            && err.contains("keeps running here"),
        "{err}"
    );
    assert!(!wait_exit(&mut dst, Duration::from_secs(10)).success());
    assert_source_alive(&mut src);
    shutdown(&mut src);
}
