//! `tcp:` migration with TLS and mutual authentication: a good pair
//! migrates with --verify; a peer whose certificate does not verify, a
//! client without a certificate and a plain peer on either side are
//! refused, and the source VM keeps running.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use common::{counters, ctl, vmm, wait_exit, wait_for, wait_listening, KillOnDrop, Scratch};
use ldt_vmm::flat::{tempfile_path::TempPath, COUNTER_SLOW_PAYLOAD};
use ldt_vmm::migration::tls_certs;
use ldt_vmm::migration::transport::TlsFiles;

fn tls_args(f: &TlsFiles) -> Vec<String> {
    vec![
        "--tls-cert".into(),
        f.cert.display().to_string(),
        "--tls-key".into(),
        f.key.display().to_string(),
        "--tls-ca".into(),
        f.ca.display().to_string(),
    ]
}

/// A port nothing listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Source {
    vm: KillOnDrop,
    api: PathBuf,
    _payload: TempPath,
}

fn start_source(s: &Scratch) -> Source {
    let payload = TempPath::create(COUNTER_SLOW_PAYLOAD, "tls").unwrap();
    let api = s.path("src.api");
    let vm = KillOnDrop(
        vmm()
            .args(["run", "--mem", "256", "--flat"])
            .arg(payload.path())
            .arg("--api")
            .arg(&api)
            .stdout(std::fs::File::create(s.path("src.out")).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for(&api);
    Source {
        vm,
        api,
        _payload: payload,
    }
}

/// A destination on `url`, listening once it said so (a probe connection
/// would be a failed handshake).
fn start_destination(s: &Scratch, url: &str, tls: Option<&TlsFiles>) -> (KillOnDrop, PathBuf) {
    let err = s.path("dst.err");
    let api = s.path("dst.api");
    let mut c = vmm();
    c.args(["run", "--incoming", url, "--api"]).arg(&api);
    if let Some(f) = tls {
        c.args(tls_args(f));
    }
    let child = KillOnDrop(
        c.stdout(std::fs::File::create(s.path("dst.out")).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_listening(&err);
    (child, api)
}

fn migrate(src: &Source, url: &str, tls: Option<&TlsFiles>) -> Output {
    let mut c = vmm();
    c.args(["migrate", "--api"])
        .arg(&src.api)
        .args(["--to", url, "--verify", "--timeout-s", "60"]);
    if let Some(f) = tls {
        c.args(tls_args(f));
    }
    c.output().unwrap()
}

/// The migration failed, the source still runs its guest.
fn refused_and_source_runs(out: &Output, src: &mut Source, s: &Scratch) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "migration should fail: {err}");
    assert!(err.contains("keeps running here"), "{err}");
    assert!(
        src.vm.0.try_wait().unwrap().is_none(),
        "source VMM still up"
    );
    assert_eq!(ctl(&src.api, &["status"])["result"]["state"], "running");
    let before = counters(&std::fs::read(s.path("src.out")).unwrap()).len();
    let t = Instant::now();
    while counters(&std::fs::read(s.path("src.out")).unwrap()).len() < before + 5 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "source guest stopped"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    err
}

/// Waits for the destination's stderr to hold `needle`.
fn destination_says(s: &Scratch, needle: &str) {
    let t = Instant::now();
    loop {
        let err = std::fs::read_to_string(s.path("dst.err")).unwrap();
        if err.contains(needle) {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "destination lacks {needle:?}: {err}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn mutually_authenticated_tls_migration_verifies_and_the_guest_goes_on() {
    let s = Scratch::new("tls", "good");
    let pki = tls_certs::generate(&s.0, "good").unwrap();
    let url = format!("tcp:127.0.0.1:{}", free_port());
    let src = start_source(&s);
    let (mut dst, dst_api) = start_destination(&s, &url, Some(&pki));
    let out = migrate(&src, &url, Some(&pki));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "TLS migration failed: {err}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["digest_source"], report["digest_destination"]);
    let mut src_vm = src.vm;
    assert!(wait_exit(&mut src_vm.0, Duration::from_secs(20)).success());
    let t = Instant::now();
    while counters(&std::fs::read(s.path("dst.out")).unwrap()).len() < 10 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "guest stopped on the destination"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(ctl(&dst_api, &["shutdown"])["ok"], true);
    assert!(wait_exit(&mut dst.0, Duration::from_secs(20)).success());
}

#[test]
fn a_source_with_a_certificate_from_another_ca_is_refused() {
    let s = Scratch::new("tls", "other-ca-src");
    let trusted = tls_certs::generate(&s.0, "trusted").unwrap();
    let other = tls_certs::generate(&s.0, "other").unwrap();
    let url = format!("tcp:127.0.0.1:{}", free_port());
    let mut src = start_source(&s);
    let (_dst, _) = start_destination(&s, &url, Some(&trusted));
    // The source trusts the destination's CA but presents another CA's certificate.
    let mine = TlsFiles {
        ca: trusted.ca.clone(),
        ..other
    };
    let out = migrate(&src, &url, Some(&mine));
    refused_and_source_runs(&out, &mut src, &s);
    destination_says(&s, "invalid peer certificate");
}

#[test]
fn a_destination_with_a_certificate_from_another_ca_is_refused() {
    let s = Scratch::new("tls", "other-ca-dst");
    let trusted = tls_certs::generate(&s.0, "trusted").unwrap();
    let other = tls_certs::generate(&s.0, "other").unwrap();
    let url = format!("tcp:127.0.0.1:{}", free_port());
    let mut src = start_source(&s);
    let theirs = TlsFiles {
        ca: trusted.ca.clone(),
        ..other
    };
    let (_dst, _) = start_destination(&s, &url, Some(&theirs));
    let out = migrate(&src, &url, Some(&trusted));
    let err = refused_and_source_runs(&out, &mut src, &s);
    assert!(err.contains("invalid peer certificate"), "{err}");
}

#[test]
fn a_client_without_a_certificate_is_refused() {
    let s = Scratch::new("tls", "no-cert");
    let pki = tls_certs::generate(&s.0, "pki").unwrap();
    let port = free_port();
    let (_dst, _) = start_destination(&s, &format!("tcp:127.0.0.1:{port}"), Some(&pki));
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_file(&pki.ca).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut session = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut tls = rustls::Stream::new(&mut session, &mut tcp);
    let hello = br#"{"mem_mib":32,"vcpus":1,"cpu_profile":"host","dirty_source":"kvm-bitmap","verify":false}"#;
    let mut frame = Vec::new();
    ldt_migration::write_frame(&mut frame, ldt_migration::MessageKind::Hello, hello).unwrap();
    let _ = tls.write_all(&frame).and_then(|_| tls.flush());
    let answer = ldt_migration::read_frame(&mut tls);
    assert!(answer.is_err(), "no HelloAck without a client certificate");
    destination_says(&s, "peer sent no certificates");
}

#[test]
fn plain_and_tls_peers_do_not_talk() {
    let s = Scratch::new("tls", "mismatch");
    let pki = tls_certs::generate(&s.0, "pki").unwrap();
    let mut src = start_source(&s);
    // A plain source to a TLS destination...
    let url = format!("tcp:127.0.0.1:{}", free_port());
    let (dst, _) = start_destination(&s, &url, Some(&pki));
    let out = migrate(&src, &url, None);
    refused_and_source_runs(&out, &mut src, &s);
    destination_says(&s, "TLS handshake");
    drop(dst);
    // ...and a TLS source to a plain destination.
    let url = format!("tcp:127.0.0.1:{}", free_port());
    let (_dst, _) = start_destination(&s, &url, None);
    let out = migrate(&src, &url, Some(&pki));
    refused_and_source_runs(&out, &mut src, &s);
}

#[test]
fn tls_options_need_a_tcp_endpoint_and_readable_files() {
    let s = Scratch::new("tls", "options");
    let pki = tls_certs::generate(&s.0, "pki").unwrap();
    let sock = s.path("mig.sock");
    let mut args = vec![
        "run".to_string(),
        "--incoming".into(),
        format!("unix:{}", sock.display()),
    ];
    args.extend(tls_args(&pki));
    let out = common::run_bounded(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        Duration::from_secs(20),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("TLS applies to tcp: endpoints only"), "{err}");
    let broken = TlsFiles {
        key: Path::new("/nonexistent/key.pem").into(),
        ..pki.clone()
    };
    let mut args = vec![
        "run".to_string(),
        "--incoming".into(),
        format!("tcp:127.0.0.1:{}", free_port()),
    ];
    args.extend(tls_args(&broken));
    let out = common::run_bounded(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        Duration::from_secs(20),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot read /nonexistent/key.pem"), "{err}");
    // A special file named as a certificate is refused, not read forever.
    let zero = TlsFiles {
        cert: Path::new("/dev/zero").into(),
        ..pki
    };
    let mut args = vec![
        "run".to_string(),
        "--incoming".into(),
        format!("tcp:127.0.0.1:{}", free_port()),
    ];
    args.extend(tls_args(&zero));
    let out = common::run_bounded(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        Duration::from_secs(20),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("/dev/zero is a character device"), "{err}");
}
