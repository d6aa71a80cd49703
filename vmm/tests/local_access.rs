//! What a local user gets from the files ldt-vmm creates and from its API
//! socket: sockets and snapshots are the owner's only (whatever the
//! umask), nothing is created over an existing file, and one client cannot
//! exhaust the API (line length, connections, idle time).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

mod common;

use common::{ctl, vmm, wait_exit, wait_for, KillOnDrop, Scratch};
use ldt_vmm::flat::{tempfile_path::TempPath, SPIN_PAYLOAD};

/// The binary with umask 000: whatever it creates gets exactly the mode it asks for.
fn vmm_umask_000() -> Command {
    let mut c = vmm();
    // SAFETY: umask is async-signal-safe and touches only the child.
    unsafe {
        c.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    c
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().mode() & 0o777
}

/// A spinning flat guest serving its API on `api`.
fn spinning_vm(payload: &TempPath, api: &Path, extra: &[&str]) -> KillOnDrop {
    let child = KillOnDrop(
        vmm_umask_000()
            .args(["run", "--mem", "32", "--flat"])
            .arg(payload.path())
            .arg("--api")
            .arg(api)
            .args(extra)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for(api);
    child
}

fn shutdown(mut child: KillOnDrop, api: &Path) {
    ctl(api, &["shutdown"]);
    assert!(wait_exit(&mut child.0, Duration::from_secs(20)).success());
}

#[test]
fn the_api_socket_and_snapshots_are_owner_only_under_umask_000() {
    let s = Scratch::new("local", "modes");
    let payload = TempPath::create(SPIN_PAYLOAD, "modes").unwrap();
    let api = s.path("vm.api");
    let child = spinning_vm(&payload, &api, &[]);
    assert_eq!(mode(&api), 0o600, "API socket");
    let snap = s.path("full.snap");
    let out = vmm()
        .args(["snapshot", "--api"])
        .arg(&api)
        .arg("--to")
        .arg(&snap)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(mode(&snap), 0o600, "snapshot file");
    shutdown(child, &api);
}

#[test]
fn the_incoming_socket_is_owner_only_under_umask_000() {
    let s = Scratch::new("local", "incoming");
    let sock = s.path("mig.sock");
    let _child = KillOnDrop(
        vmm_umask_000()
            .arg("run")
            .arg("--incoming")
            .arg(format!("unix:{}", sock.display()))
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for(&sock);
    assert_eq!(mode(&sock), 0o600, "incoming socket");
}

/// `run` with a regular file at the socket's path: refused, file intact.
fn refuses_to_replace(args: &[&str], path: &Path) {
    std::fs::write(path, b"precious").unwrap();
    let out = common::run_bounded(args, Duration::from_secs(20));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("is not a socket: refusing to replace it"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert_eq!(std::fs::read(path).unwrap(), b"precious");
}

#[test]
fn an_existing_file_at_a_socket_path_is_never_replaced() {
    let s = Scratch::new("local", "replace");
    let payload = TempPath::create(SPIN_PAYLOAD, "replace").unwrap();
    let api = s.path("vm.api");
    let p = payload.path().to_str().unwrap();
    refuses_to_replace(&["run", "--flat", p, "--api", api.to_str().unwrap()], &api);
    let sock = s.path("mig.sock");
    let url = format!("unix:{}", sock.display());
    refuses_to_replace(&["run", "--incoming", &url], &sock);
}

/// Reads one answer line (at most 10 s).
fn answer(c: &UnixStream) -> serde_json::Value {
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut line = String::new();
    BufReader::new(c).read_line(&mut line).expect("an answer");
    serde_json::from_str(&line).unwrap_or(serde_json::Value::Null)
}

fn closed(c: &mut UnixStream) -> bool {
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).is_ok()
}

#[test]
fn the_api_bounds_line_length_connections_and_idle_time() {
    let s = Scratch::new("local", "limits");
    let payload = TempPath::create(SPIN_PAYLOAD, "limits").unwrap();
    let api = s.path("vm.api");
    let child = spinning_vm(&payload, &api, &["--api-idle-timeout-s", "2"]);

    // A line without end: answered with an error, then closed.
    let mut c = UnixStream::connect(&api).unwrap();
    let _ = c.write_all(&vec![b'x'; 1 << 20]);
    let a = answer(&c);
    assert!(
        a["error"]
            .as_str()
            .unwrap_or("")
            .contains("request line longer than"),
        "{a}"
    );
    assert!(closed(&mut c));

    // Just over the limit and all written before the answer: some of it
    // is still unread when the VMM ends the connection, which must still
    // give the client its answer and then end of stream (a unix socket
    // closed with unread data resets the peer instead).
    let mut c = UnixStream::connect(&api).unwrap();
    c.write_all(&vec![b'x'; (64 << 10) + (8 << 10)]).unwrap();
    let a = answer(&c);
    assert!(
        a["error"]
            .as_str()
            .unwrap_or("")
            .contains("request line longer than"),
        "{a}"
    );
    assert!(
        closed(&mut c),
        "the answer was not followed by end of stream"
    );

    // Sixteen idle connections are served; the seventeenth is refused.
    let mut held: Vec<UnixStream> = (0..16)
        .map(|_| UnixStream::connect(&api).unwrap())
        .collect();
    for c in &mut held {
        c.write_all(b"{\"command\":\"status\"}\n").unwrap();
        assert_eq!(answer(c)["ok"], true);
    }
    let mut extra = UnixStream::connect(&api).unwrap();
    let _ = extra.write_all(b"{\"command\":\"status\"}\n");
    let a = answer(&extra);
    assert!(
        a["error"]
            .as_str()
            .unwrap_or("")
            .contains("too many API connections"),
        "{a}"
    );

    // Idle ones are closed by the server after --api-idle-timeout-s.
    for c in &mut held {
        let a = answer(c);
        assert!(
            a["error"]
                .as_str()
                .unwrap_or("")
                .contains("no request within"),
            "{a}"
        );
        assert!(closed(c));
    }
    // And then there is room again (once the server has counted them out).
    let t = std::time::Instant::now();
    loop {
        let mut c = UnixStream::connect(&api).unwrap();
        let _ = c.write_all(b"{\"command\":\"status\"}\n");
        if answer(&c)["ok"] == true {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no room after the idle ones closed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    shutdown(child, &api);
}
