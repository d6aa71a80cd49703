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

use common::{counters, ctl, vmm as bin, wait_exit, wait_for};
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
    SourceVm {
        child,
        api,
        out,
        _payload: p,
    }
}

fn start_destination(s: &Scratch, url: &str) -> (Child, PathBuf) {
    let api = s.path("dst.api");
    let child = spawn(
        &["run", "--incoming", url, "--api", api.to_str().unwrap()],
        &s.path("dst.out"),
        &s.path("dst.err"),
    );
    if let Some(p) = url.strip_prefix("unix:") {
        wait_for(Path::new(p));
    } else {
        std::thread::sleep(Duration::from_millis(300));
    }
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
    let s = Scratch::new(name);
    let url = url_of(&s);
    let mut src = start_source(&s, COUNTER_SLOW_PAYLOAD, source_args);
    let (mut dst, dst_api) = start_destination(&s, &url);
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

    let status = wait_exit(&mut src.child, Duration::from_secs(10));
    assert!(
        status.success(),
        "source VMM ends after a migration: {status}"
    );

    // The guest goes on at the destination.
    let before = counters(&std::fs::read(s.path("dst.out")).unwrap()).len();
    advances(&s.path("dst.out"), before + 10);
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
        frame[4] = 2; // version 2
        c.write_all(&frame).unwrap();
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest);
    });
    let mut src = start_source(&s, COUNTER_SLOW_PAYLOAD, &[]);
    let out = migrate(&src.api, &format!("unix:{}", sock.display()), &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("protocol version 2 not supported"), "{err}");
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
