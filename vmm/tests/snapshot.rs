//! Full and diff snapshots of a running flat guest, and restores from them.

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

mod common;

use common::{counters, ctl as api, vmm as bin, wait_exit, wait_for};
use ldt_vmm::flat::{tempfile_path::TempPath, COUNTER_SLOW_PAYLOAD};

fn snapshot(sock: &Path, to: &Path, base: Option<&Path>) -> Result<serde_json::Value, String> {
    let mut c = bin();
    c.args([
        "snapshot",
        "--api",
        sock.to_str().unwrap(),
        "--to",
        to.to_str().unwrap(),
    ]);
    if let Some(b) = base {
        c.args(["--base", b.to_str().unwrap()]);
    }
    let out = c.output().unwrap();
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn finish(mut child: Child, sock: &Path) {
    api(sock, &["shutdown"]);
    assert!(wait_exit(&mut child, Duration::from_secs(20)).success());
}

/// Restores `files` paused, checks the memory digest through the API, then
/// lets the guest run and returns the counters it printed.
fn restore_and_check(dir: &Path, files: &[&Path], id: &str) -> Vec<u64> {
    restore_and_check_on(dir, files, id, &[])
}

/// `restore_and_check` with more `run` arguments (`--mem-backing`).
fn restore_and_check_on(dir: &Path, files: &[&Path], id: &str, extra: &[&str]) -> Vec<u64> {
    let sock = dir.join("restored.sock");
    let out = dir.join("restored.out");
    let mut args = vec![
        "run".to_string(),
        "--api".into(),
        sock.display().to_string(),
        "--paused".into(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    args.push("--restore".into());
    args.extend(files.iter().map(|f| f.display().to_string()));
    let child = bin()
        .args(&args)
        .stdout(std::fs::File::create(&out).unwrap())
        .spawn()
        .unwrap();
    wait_for(&sock);
    let d = api(&sock, &["memory-digest"]);
    assert_eq!(
        d["result"]["digest"], id,
        "restored memory is the snapshot's"
    );
    assert_eq!(api(&sock, &["status"])["result"]["state"], "paused");
    api(&sock, &["resume"]);
    // Let it print a few lines (a loaded host may take a while).
    let t = std::time::Instant::now();
    while counters(&std::fs::read(&out).unwrap()).len() < 20
        && t.elapsed() < Duration::from_secs(20)
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    finish(child, &sock);
    counters(&std::fs::read(&out).unwrap())
}

#[test]
fn full_and_diff_snapshots_restore_to_the_exact_memory() {
    let dir = std::env::temp_dir().join(format!("ldt-snap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let payload = TempPath::create(COUNTER_SLOW_PAYLOAD, "snap").unwrap();
    let sock = dir.join("src.sock");
    let src_out = dir.join("src.out");
    let src = bin()
        .args([
            "run",
            "--flat",
            payload.path().to_str().unwrap(),
            "--api",
            sock.to_str().unwrap(),
        ])
        .stdout(std::fs::File::create(&src_out).unwrap())
        .spawn()
        .unwrap();
    wait_for(&sock);
    std::thread::sleep(Duration::from_millis(200));

    let full: PathBuf = dir.join("full.snap");
    let d1: PathBuf = dir.join("d1.snap");
    let d2: PathBuf = dir.join("d2.snap");
    let r0 = snapshot(&sock, &full, None).unwrap();
    assert_eq!(r0["pages"], 65536, "a full snapshot has every page");
    std::thread::sleep(Duration::from_millis(200));
    let r1 = snapshot(&sock, &d1, Some(&full)).unwrap();
    assert_eq!(r1["base"], r0["id"]);
    let diff_pages = r1["pages"].as_u64().unwrap();
    assert!(
        diff_pages > 0 && diff_pages < 65536 / 2,
        "a diff has only what changed: {diff_pages}"
    );
    std::thread::sleep(Duration::from_millis(200));
    let r2 = snapshot(&sock, &d2, Some(&d1)).unwrap();
    assert_eq!(r2["base"], r1["id"]);
    let stale = snapshot(&sock, &dir.join("bad.snap"), Some(&full)).unwrap_err();
    assert!(stale.contains("not the last snapshot"), "{stale}");
    assert!(!dir.join("bad.snap").exists());
    finish(src, &sock);
    let src_values = counters(&std::fs::read(&src_out).unwrap());

    for (files, id) in [
        (vec![full.as_path()], &r0["id"]),
        (vec![full.as_path(), d1.as_path()], &r1["id"]),
        (vec![full.as_path(), d1.as_path(), d2.as_path()], &r2["id"]),
    ] {
        let v = restore_and_check(&dir, &files, id.as_str().unwrap());
        assert!(v.len() > 10, "restored guest runs: {} lines", v.len());
        for w in v.windows(2) {
            assert_eq!(w[1], w[0] + 1);
        }
        assert!(
            src_values.contains(&v[0]),
            "the restored guest continues where the source was"
        );
    }

    // Broken chains and files are refused with a message.
    let bad = |files: &[&Path], needle: &str| {
        let mut c = bin();
        c.arg("run").arg("--restore").args(files);
        let out = c.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(needle),
            "{files:?}: {err}"
        );
    };
    bad(&[&d1], "needs its base first");
    bad(&[&full, &d2], "not a diff of the snapshot before it");
    let mut bytes = std::fs::read(&d1).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 1;
    let corrupt = dir.join("corrupt.snap");
    std::fs::write(&corrupt, &bytes).unwrap();
    bad(&[&full, &corrupt], "checksum mismatch");
    std::fs::write(&corrupt, &std::fs::read(&d1).unwrap()[..n - 5000]).unwrap();
    bad(&[&full, &corrupt], "truncated");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn snapshots_of_a_thp_guest_restore_on_every_backing() {
    let dir = std::env::temp_dir().join(format!("ldt-snap-huge-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let payload = TempPath::create(COUNTER_SLOW_PAYLOAD, "snap-huge").unwrap();
    let sock = dir.join("src.sock");
    let src = bin()
        .args([
            "run",
            "--flat",
            payload.path().to_str().unwrap(),
            "--api",
            sock.to_str().unwrap(),
            "--mem",
            "66",
            "--mem-backing",
            "thp",
        ])
        .stdout(std::fs::File::create(dir.join("src.out")).unwrap())
        .spawn()
        .unwrap();
    wait_for(&sock);
    std::thread::sleep(Duration::from_millis(200));
    let full = dir.join("full.snap");
    let d1 = dir.join("d1.snap");
    snapshot(&sock, &full, None).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let r1 = snapshot(&sock, &d1, Some(&full)).unwrap();
    finish(src, &sock);
    // 33 pages for the restored VM (one at a time).
    let pool = ldt_vmm::vm::memory::HugePagePool::reserve(33);
    for backing in ["anon", "thp", "hugetlbfs"] {
        if let (true, Err(e)) = (backing == "hugetlbfs", &pool) {
            eprintln!("hugetlbfs skipped: {e}");
            continue;
        }
        // The chain: the diff's zero ranges land inside huge pages.
        let v = restore_and_check_on(
            &dir,
            &[full.as_path(), d1.as_path()],
            r1["id"].as_str().unwrap(),
            &["--mem-backing", backing],
        );
        assert!(v.len() > 10, "{backing}: restored guest runs: {}", v.len());
    }
    let _ = std::fs::remove_dir_all(&dir);
}
