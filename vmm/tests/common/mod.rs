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

/// Waits (at most 30 s) until a destination's stderr in `err` says it
/// listens (printed after bind and listen: a probe before it would be
/// refused, a probe after it is a connection the destination must answer).
pub fn wait_listening(err: &Path) {
    let t = Instant::now();
    while !std::fs::read_to_string(err)
        .unwrap_or_default()
        .contains("waiting for a migration")
    {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the destination never listened: {}",
            std::fs::read_to_string(err).unwrap_or_default()
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

/// Runs the binary with `args` under a 4 GiB address-space limit (so a
/// VMM that reads an endless file fails fast instead of eating the host's
/// memory) and kills it after `limit`.
pub fn run_bounded(args: &[&str], limit: Duration) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    let mut c = vmm();
    c.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    // SAFETY: setrlimit is async-signal-safe and touches only the child.
    unsafe {
        c.pre_exec(|| {
            let l = libc::rlimit {
                rlim_cur: 4 << 30,
                rlim_max: 4 << 30,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &l) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = c.spawn().unwrap();
    wait_exit(&mut child, limit);
    child.wait_with_output().unwrap()
}

/// This host's physical memory in MiB.
pub fn host_memory_mib() -> u64 {
    // SAFETY: sysconf only reads system constants.
    let (pages, page) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    (pages as u64 * page as u64) >> 20
}

/// A child VMM killed when the test ends, passed or failed (a failed
/// assertion must not leave a spinning guest behind).
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A scratch directory for one test's files, removed at the end.
pub struct Scratch(pub std::path::PathBuf);

impl Scratch {
    /// `ldt-SUITE-PID-NAME` in the temporary directory.
    pub fn new(suite: &str, name: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("ldt-{suite}-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }
    pub fn path(&self, f: &str) -> std::path::PathBuf {
        self.0.join(f)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
