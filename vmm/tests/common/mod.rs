//! Helpers shared by the tests that drive the `ldt-vmm` binary.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The binary under test, with stdin closed.
pub fn vmm() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ldt-vmm"));
    c.stdin(Stdio::null());
    c
}

/// Waits (at most 30 s) for a socket or file to appear.
pub fn wait_for(path: &Path) {
    let t = Instant::now();
    while !path.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits for `child` at most `limit`: a hung VMM fails the test, not CI.
pub fn wait_exit(child: &mut Child, limit: Duration) -> ExitStatus {
    let t = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if t.elapsed() > limit {
            let _ = child.kill();
            panic!("VMM did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `ldt-vmm ctl --api SOCK ARGS`, its JSON answer (Null if none).
pub fn ctl(api: &Path, args: &[&str]) -> serde_json::Value {
    let out = vmm()
        .args(["ctl", "--api", api.to_str().unwrap()])
        .args(args)
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

/// Counter values the counter payloads printed.
pub fn counters(bytes: &[u8]) -> Vec<u64> {
    ldt_vmm::flat::counter_values(bytes)
}
