//! A peer's stream or a snapshot file is input from outside: whatever it
//! says, the destination and a restore end with a one-line error, never a
//! panic, and allocate nothing the host cannot back.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{ctl, vmm, wait_exit, wait_for, KillOnDrop, Scratch};
use ldt_migration::{read_frame, write_frame, Frame, MessageKind};
use ldt_vmm::flat::{tempfile_path::TempPath, COUNTER_SLOW_PAYLOAD};
use serde_json::Value;

/// The frames of a real full snapshot of a small running flat guest.
fn real_snapshot(s: &Scratch) -> Vec<Frame> {
    let payload = TempPath::create(COUNTER_SLOW_PAYLOAD, "hostile").unwrap();
    let api = s.path("src.api");
    let mut child = KillOnDrop(
        vmm()
            .args(["run", "--mem", "32", "--flat"])
            .arg(payload.path())
            .arg("--api")
            .arg(&api)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for(&api);
    let snap = s.path("real.snap");
    let out = common::run_bounded(
        &[
            "snapshot",
            "--api",
            api.to_str().unwrap(),
            "--to",
            snap.to_str().unwrap(),
        ],
        Duration::from_secs(60),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ctl(&api, &["shutdown"]);
    wait_exit(&mut child.0, Duration::from_secs(20));
    let mut r = std::io::BufReader::new(std::fs::File::open(&snap).unwrap());
    let mut frames = Vec::new();
    while let Ok(f) = read_frame(&mut r) {
        frames.push(f);
    }
    assert_eq!(frames.last().unwrap().kind, MessageKind::State);
    frames
}

/// `frames` with the State message changed by `edit`.
fn with_state(frames: &[Frame], edit: impl Fn(&mut Value)) -> Vec<u8> {
    let mut out = Vec::new();
    for f in frames {
        if f.kind == MessageKind::State {
            let mut state: Value = serde_json::from_slice(&f.payload).unwrap();
            edit(&mut state);
            write_frame(&mut out, f.kind, &serde_json::to_vec(&state).unwrap()).unwrap();
        } else {
            write_frame(&mut out, f.kind, &f.payload).unwrap();
        }
    }
    out
}

/// 300 MSRs for vCPU 0: more than one KVM_SET_MSRS takes (and more than
/// kvm-bindings' fixed-capacity `Msrs` holds).
fn too_many_msrs(state: &mut Value) {
    let msrs = state["vcpus"][0]["msrs"].as_array_mut().unwrap();
    let first = msrs[0].clone();
    while msrs.len() < 300 {
        msrs.push(first.clone());
    }
}

fn wrong_vcpu_id(state: &mut Value) {
    state["vcpus"][0]["id"] = 3.into();
}

fn assert_clean_failure(err: &str, needle: &str) {
    assert!(err.contains(needle), "stderr lacks {needle:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// Restores `stream` as a snapshot file: must fail with `needle`.
fn restore_refuses(s: &Scratch, stream: &[u8], needle: &str) {
    let file = s.path("crafted.snap");
    std::fs::write(&file, stream).unwrap();
    let mut child = vmm()
        .args(["run", "--restore"])
        .arg(&file)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_exit(&mut child, Duration::from_secs(30));
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(status.code(), Some(1), "{err}");
    assert_clean_failure(&err, needle);
}

fn start_destination(s: &Scratch, extra: &[&str]) -> (Child, PathBuf, PathBuf) {
    let sock = s.path("mig.sock");
    let err = s.path("dst.err");
    let child = vmm()
        .arg("run")
        .arg("--incoming")
        .arg(format!("unix:{}", sock.display()))
        .args(extra)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    wait_for(&sock);
    (child, sock, err)
}

/// Waits until the destination's stderr holds `needle` (or it exited), then
/// ends it: the destination may keep waiting for the next source.
fn destination_says(mut child: Child, err: &Path, needle: &str) {
    let t = Instant::now();
    loop {
        let text = std::fs::read_to_string(err).unwrap();
        let exited = child.try_wait().unwrap();
        if text.contains(needle) || exited.is_some() || t.elapsed() > Duration::from_secs(30) {
            if exited.is_none() {
                let _ = child.kill();
            }
            let status = child.wait().unwrap();
            use std::os::unix::process::ExitStatusExt;
            assert_ne!(status.signal(), Some(libc::SIGABRT), "aborted: {text}");
            assert_clean_failure(&text, needle);
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Plays a source sending `stream` (a Hello and what follows) to a real
/// destination, answering nothing after the HelloAck.
fn destination_refuses(s: &Scratch, stream: &[u8], needle: &str) {
    let (child, sock, err) = start_destination(s, &[]);
    let mut c = UnixStream::connect(&sock).unwrap();
    let mut r = stream;
    let hello = read_frame(&mut r).unwrap();
    write_frame(&mut c, hello.kind, &hello.payload).unwrap();
    assert_eq!(read_frame(&mut c).unwrap().kind, MessageKind::HelloAck);
    // The destination may stop reading at the bad State: ignore EPIPE.
    let _ = c.write_all(r);
    destination_says(child, &err, needle);
}

#[test]
fn a_state_with_more_msrs_than_kvm_takes_is_refused() {
    let s = Scratch::new("hostile", "msrs");
    let frames = real_snapshot(&s);
    let stream = with_state(&frames, too_many_msrs);
    let needle = "vCPU 0 has 300 MSRs, KVM takes at most 255";
    restore_refuses(&s, &stream, needle);
    destination_refuses(&s, &stream, needle);
}

#[test]
fn a_state_whose_vcpu_ids_do_not_match_is_refused() {
    let s = Scratch::new("hostile", "ids");
    let frames = real_snapshot(&s);
    let stream = with_state(&frames, wrong_vcpu_id);
    let needle = "vCPU 0 of the state carries id 3";
    restore_refuses(&s, &stream, needle);
    destination_refuses(&s, &stream, needle);
}

fn hello(mem_mib: u64) -> Vec<u8> {
    format!(
        r#"{{"mem_mib":{mem_mib},"vcpus":1,"cpu_profile":"host","dirty_source":"kvm-bitmap","verify":false}}"#
    )
    .into_bytes()
}

#[test]
fn a_peer_announcing_more_memory_than_this_host_has_is_refused() {
    let s = Scratch::new("hostile", "mem");
    let twice = (common::host_memory_mib() * 2).next_multiple_of(2);
    let (child, sock, err) = start_destination(&s, &[]);
    let mut c = UnixStream::connect(&sock).unwrap();
    write_frame(&mut c, MessageKind::Hello, &hello(twice)).unwrap();
    let answer = read_frame(&mut c).unwrap();
    assert_eq!(answer.kind, MessageKind::Abort);
    let why = String::from_utf8_lossy(&answer.payload).into_owned();
    assert!(why.contains("more than this host can back"), "{why}");
    drop(c);
    destination_says(child, &err, "more than this host can back");

    // The operator may allow it explicitly.
    let (child, sock, _) = start_destination(&s, &["--mem-overcommit", "150"]);
    let _child = KillOnDrop(child);
    let mut c = UnixStream::connect(&sock).unwrap();
    write_frame(&mut c, MessageKind::Hello, &hello(twice)).unwrap();
    assert_eq!(read_frame(&mut c).unwrap().kind, MessageKind::HelloAck);
}
