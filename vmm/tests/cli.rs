//! The `ldt-vmm` binary end to end: flat payloads, bad input, the API.

use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::time::Duration;

mod common;

use common::{ctl, vmm, wait_exit, wait_for};
use ldt_vmm::flat::{
    tempfile_path::TempPath, HELLO_PAYLOAD, PVPANIC_PAYLOAD, SPIN_PAYLOAD, TRIPLE_FAULT_PAYLOAD,
};

fn run(args: &[&str]) -> Output {
    vmm().args(args).output().expect("ldt-vmm runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Asserts a clean failure: non-zero status, `needle` in stderr, no panic.
fn fails_with(out: &Output, needle: &str) {
    let err = text(&out.stderr);
    assert!(!out.status.success(), "should fail: {err}");
    assert!(err.contains(needle), "stderr lacks {needle:?}: {err}");
    assert!(!err.contains("panicked"), "panicked: {err}");
}

fn file(bytes: &[u8], name: &str) -> TempPath {
    TempPath::create(bytes, name).unwrap()
}

#[test]
fn flat_payload_prints_from_ring3_and_exits_zero() {
    let p = file(HELLO_PAYLOAD, "hello");
    let out = run(&["run", "--flat", p.path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hello from ring 3\n");
}

#[test]
fn triple_fault_is_reported_with_the_rip() {
    let p = file(TRIPLE_FAULT_PAYLOAD, "tf");
    let out = run(&["run", "--flat", p.path().to_str().unwrap()]);
    fails_with(&out, "triple fault");
    assert!(
        text(&out.stderr).contains("RIP 0x10000"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn missing_kernel_is_a_clear_error() {
    fails_with(
        &run(&["run", "/nonexistent/vmlinux"]),
        "cannot read /nonexistent/vmlinux",
    );
}

#[test]
fn empty_flat_payload_is_a_clear_error() {
    let p = file(b"", "empty");
    fails_with(
        &run(&["run", "--flat", p.path().to_str().unwrap()]),
        "is empty",
    );
}

#[test]
fn truncated_kernels_are_rejected() {
    // The first KiB of an x86-64 ELF: headers point past the end.
    let me = std::fs::read(env!("CARGO_BIN_EXE_ldt-vmm")).unwrap();
    let elf = file(&me[..1024], "trunc-elf");
    fails_with(
        &run(&["run", elf.path().to_str().unwrap()]),
        "not a loadable x86-64 kernel",
    );
    // Something that is neither ELF nor bzImage.
    let junk = file(&[0x4d, 0x5a, 1, 2, 3], "junk");
    fails_with(
        &run(&["run", junk.path().to_str().unwrap()]),
        "not a loadable x86-64 kernel",
    );
}

/// A minimal bzImage header: 1 setup sector after the boot sector, a
/// protected-mode part of `syssize` 16-byte paragraphs.
fn bzimage(syssize: u32, len: usize) -> Vec<u8> {
    let mut img = vec![0u8; len];
    img[0x1f1] = 1; // setup_sects
    img[0x1f4..0x1f8].copy_from_slice(&syssize.to_le_bytes());
    img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    img[0x202..0x206].copy_from_slice(b"HdrS");
    img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes()); // protocol 2.15
    img[0x211] = 1; // loadflags: LOADED_HIGH
    img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
    img
}

#[test]
fn truncated_bzimage_is_rejected_before_it_runs() {
    // The header promises 1024 + 64 * 16 bytes; half of them are there.
    let cut = file(&bzimage(64, 1536), "trunc-bzimage");
    fails_with(
        &run(&["run", cut.path().to_str().unwrap()]),
        "truncated bzImage: 1536 bytes, its header says 2048",
    );
}

#[test]
fn elf_for_another_machine_is_rejected() {
    let mut hdr = vec![0u8; 64];
    hdr[..4].copy_from_slice(b"\x7fELF");
    hdr[4] = 2; // 64-bit
    hdr[5] = 1; // little endian
    hdr[18..20].copy_from_slice(&183u16.to_le_bytes()); // EM_AARCH64
    let p = file(&hdr, "arm64");
    fails_with(&run(&["run", p.path().to_str().unwrap()]), "not x86-64");
}

#[test]
fn bad_sizes_are_rejected() {
    let p = file(HELLO_PAYLOAD, "hello");
    let path = p.path().to_str().unwrap();
    fails_with(
        &run(&["run", "--flat", path, "--mem", "0"]),
        "--mem must be",
    );
    fails_with(
        &run(&["run", "--flat", path, "--mem", "3"]),
        "--mem must be",
    );
    fails_with(
        &run(&["run", "--flat", path, "--vcpus", "0"]),
        "--vcpus must be",
    );
    fails_with(&run(&["run", "--flat", path, "--vcpus", "2"]), "one vCPU");
    fails_with(
        &run(&["run", "--flat", path, "--dirty-ring", "100"]),
        "power of two",
    );
}

#[test]
fn nice_values_out_of_range_or_without_their_mode_are_rejected() {
    let out = run(&[
        "migrate",
        "--api",
        "/tmp/none.sock",
        "--to",
        "unix:/tmp/none-mig.sock",
        "--precopy-nice",
        "20",
    ]);
    fails_with(&out, "20 is not in 0..=19");
    assert_eq!(out.status.code(), Some(2));
    // Once unheard (clap did not check `requires` against a conflict).
    for flag in ["--incoming-nice", "--incoming-timeout"] {
        for mode in [
            &["--flat", "/dev/null"][..],
            &["/tmp/no-kernel"],
            &["--restore", "/dev/null"],
        ] {
            let mut args = vec!["run"];
            args.extend_from_slice(mode);
            args.extend_from_slice(&[flag, "5"]);
            let out = run(&args);
            fails_with(&out, &format!("cannot be used with '{flag} "));
            assert_eq!(out.status.code(), Some(2), "{args:?}");
        }
    }
}

#[test]
fn cpu_lists_that_cannot_be_honoured_are_refused_before_anything_runs() {
    for (list, why) in [
        ("1-0", "range `1-0` runs backwards"),
        ("x", "`x` is not a CPU number"),
        ("4096", "CPU 4096 is beyond the 1024"),
    ] {
        for flag in ["--vcpu-cpus", "--vmm-cpus"] {
            let out = run(&["run", "--flat", "/dev/null", flag, list]);
            fails_with(&out, why);
            assert_eq!(out.status.code(), Some(2), "{flag} {list}");
        }
    }
    // Parsed, but not a CPU this process may use; before the payload is read.
    for flag in ["--vcpu-cpus", "--vmm-cpus"] {
        let out = run(&["run", "--flat", "/dev/null", flag, "1023"]);
        fails_with(
            &out,
            &format!("{flag} 1023: CPU 1023 is not among the CPUs this process may run on ("),
        );
        assert_eq!(out.status.code(), Some(1));
    }
    let twice = ["--vcpu-cpus", "0", "--vcpu-cpus", "0"];
    let mut args = vec!["run", "--flat", "/dev/null"];
    args.extend_from_slice(&twice);
    fails_with(&run(&args), "--vcpu-cpus given 2 times for 1 vCPUs");
    let mut args = vec!["run", "--incoming", "unix:/tmp/ldt-vmm-cli-never.sock"];
    args.extend_from_slice(&twice);
    fails_with(&run(&args), "--incoming takes --vcpu-cpus once");
    assert!(!std::path::Path::new("/tmp/ldt-vmm-cli-never.sock").exists());
}

#[test]
fn unknown_dirty_source_is_rejected() {
    let out = run(&[
        "ctl",
        "--api",
        "/tmp/none.sock",
        "dirty-start",
        "soft-dirty",
    ]);
    fails_with(&out, "invalid value 'soft-dirty'");
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn help_explains_every_subcommand_with_examples() {
    for args in [
        &["--help"][..],
        &["run", "--help"],
        &["ctl", "--help"],
        &["bench", "dirty", "--help"],
    ] {
        let out = run(args);
        assert!(out.status.success());
        let t = text(&out.stdout);
        assert!(t.contains("Example"), "{args:?}: {t}");
    }
}

/// Harvests until the spinning guest has dirtied something (it always
/// does once it gets the CPU; a loaded host may take a while). Returns the
/// number of harvest rounds used.
fn harvest_until_dirty(sock: &std::path::Path) -> u64 {
    let t = std::time::Instant::now();
    for round in 1.. {
        std::thread::sleep(Duration::from_millis(50));
        let h = ctl(sock, &["dirty-harvest"]);
        if h["result"]["pages"].as_u64().unwrap() >= 1 {
            return round;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the spinning guest dirtied nothing: {h}"
        );
    }
    unreachable!()
}

#[test]
fn api_pauses_resumes_tracks_dirty_pages_and_shuts_down() {
    let p = file(SPIN_PAYLOAD, "spin");
    let sock = PathBuf::from(format!("/tmp/ldt-vmm-test-{}.sock", std::process::id()));
    let mut child = vmm()
        .args([
            "run",
            "--flat",
            p.path().to_str().unwrap(),
            "--api",
            sock.to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(&sock);

    let s = ctl(&sock, &["status"]);
    assert_eq!(s["ok"], true);
    assert_eq!(s["result"]["state"], "running");
    assert_eq!(s["result"]["mem_mib"], 256);

    // host-ldt needs the ldt_kvm module; without it the answer says so.
    let h = ctl(&sock, &["dirty-start", "host-ldt"]);
    if std::path::Path::new("/dev/ldt-kvm").exists() {
        assert_eq!(h["ok"], true, "{h}");
        assert_eq!(ctl(&sock, &["dirty-stop"])["ok"], true);
    } else {
        assert_eq!(h["ok"], false);
        assert!(
            h["error"].as_str().unwrap().contains("ldt_kvm host module"),
            "{h}"
        );
    }
    assert_eq!(ctl(&sock, &["dirty-start", "kvm-bitmap"])["ok"], true);
    let mut rounds = harvest_until_dirty(&sock);

    assert_eq!(ctl(&sock, &["pause"])["result"]["state"], "paused");
    ctl(&sock, &["dirty-harvest"]);
    std::thread::sleep(Duration::from_millis(50));
    let paused = ctl(&sock, &["dirty-harvest"]);
    rounds += 2;
    assert_eq!(
        paused["result"]["pages"], 0,
        "a paused guest writes nothing: {paused}"
    );
    // The counter's page, as ground truth: missing while paused; a bad
    // frame file is refused before the harvest (no round spent).
    let expect = std::env::temp_dir().join(format!("ldt-expect-{}", std::process::id()));
    std::fs::write(&expect, "# the spin payload's counter\n0x300 1\n").unwrap();
    let e = expect.to_str().unwrap();
    let miss = ctl(&sock, &["dirty-harvest", "--expect", e]);
    rounds += 1;
    assert_eq!(miss["result"]["expected"], 1, "{miss}");
    assert_eq!(miss["result"]["missed"], 1, "{miss}");
    assert_eq!(miss["result"]["first_missed"], "0x300000", "{miss}");
    std::fs::write(&expect, "0x300\n").unwrap();
    let bad = ctl(&sock, &["dirty-harvest", "--expect", e]);
    assert_eq!(bad["ok"], false);
    assert!(bad["error"].as_str().unwrap().contains("line 1"), "{bad}");
    std::fs::write(&expect, "0x300 1\n").unwrap();

    assert_eq!(ctl(&sock, &["resume"])["result"]["state"], "running");
    // Once the guest ran again, the counter's page is in the harvest (the
    // only page this payload writes).
    let t = std::time::Instant::now();
    let hit = loop {
        std::thread::sleep(Duration::from_millis(50));
        let h = ctl(&sock, &["dirty-harvest", "--expect", e]);
        rounds += 1;
        if h["result"]["pages"].as_u64().unwrap() >= 1 {
            break h;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "{h}");
    };
    assert_eq!(hit["result"]["missed"], 0, "{hit}");
    assert!(hit["result"]["ms"].as_f64().unwrap() >= 0.0, "{hit}");
    std::fs::remove_file(&expect).unwrap();

    let stats = ctl(&sock, &["dirty-stats"]);
    assert_eq!(stats["result"]["source"], "kvm-bitmap");
    assert_eq!(stats["result"]["rounds"], rounds);
    let again = ctl(&sock, &["dirty-start", "kvm-clear"]);
    assert_eq!(again["ok"], false);
    assert!(again["error"].as_str().unwrap().contains("already running"));
    assert_eq!(ctl(&sock, &["dirty-stop"])["ok"], true);

    assert_eq!(ctl(&sock, &["shutdown"])["ok"], true);
    let status = wait_exit(&mut child, Duration::from_secs(20));
    assert!(status.success(), "{status}");
    assert!(!sock.exists(), "socket removed on exit");
}

#[test]
fn mem_beyond_this_host_is_refused_unless_overcommit_allows_it() {
    let p = file(HELLO_PAYLOAD, "hello-big");
    let path = p.path().to_str().unwrap();
    let twice = (common::host_memory_mib() * 2)
        .next_multiple_of(2)
        .to_string();
    fails_with(
        &run(&["run", "--flat", path, "--mem", &twice]),
        "more than this host can back",
    );
    // Allowed by the host check, the flat loader's own limit (the boot
    // page tables map 21 GiB) speaks next; a destination test receives
    // such a VM (tests/hostile_input.rs).
    fails_with(
        &run(&[
            "run",
            "--flat",
            path,
            "--mem",
            &twice,
            "--mem-overcommit",
            "150",
        ]),
        "too large for the boot page tables",
    );
}

/// Runs `args` bounded (see `common::run_bounded`) and expects a clean
/// one-line failure naming `needle`.
fn refused(args: &[&str], needle: &str) {
    let out = common::run_bounded(args, Duration::from_secs(30));
    fails_with(&out, needle);
    assert_eq!(
        text(&out.stderr).trim_end().lines().count(),
        1,
        "one line: {}",
        text(&out.stderr)
    );
}

#[test]
fn special_files_are_refused_as_inputs() {
    let dir = std::env::temp_dir().join(format!("ldt-special-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let fifo = fifo.to_str().unwrap();
    let kernel = file(&bzimage(64, 2048), "kernel-for-initrd");
    let kernel = kernel.path().to_str().unwrap();
    let d = dir.to_str().unwrap();
    refused(
        &["run", "--flat", "/dev/zero"],
        "/dev/zero is a character device, not a regular file",
    );
    refused(&["run", "--flat", fifo], "is a FIFO, not a regular file");
    refused(&["run", "/dev/zero"], "is a character device");
    refused(&["run", d], "is a directory, not a regular file");
    refused(
        &["run", kernel, "--initrd", "/dev/zero"],
        "is a character device",
    );
    refused(&["run", kernel, "--initrd", fifo], "is a FIFO");
    refused(&["run", "--restore", "/dev/zero"], "is a character device");
    refused(&["run", "--restore", fifo], "is a FIFO");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn huge_inputs_are_refused_before_they_are_read() {
    // 64 GiB, sparse: reading it would take minutes and all memory.
    let huge = file(b"", "huge");
    std::fs::OpenOptions::new()
        .write(true)
        .open(huge.path())
        .unwrap()
        .set_len(64 << 30)
        .unwrap();
    let huge = huge.path().to_str().unwrap();
    let kernel = file(&bzimage(64, 2048), "kernel-for-huge-initrd");
    let kernel = kernel.path().to_str().unwrap();
    refused(&["run", "--flat", huge], "more than the");
    refused(
        &["run", "--mem", "64", huge],
        "more than the 67108864 bytes",
    );
    refused(
        &["run", "--mem", "64", kernel, "--initrd", huge],
        "does not fit in guest RAM",
    );
}

#[test]
fn a_guest_panic_on_the_pvpanic_port_ends_the_vmm_with_status_3() {
    let p = file(PVPANIC_PAYLOAD, "pvpanic");
    let out = common::run_bounded(
        &["run", "--flat", p.path().to_str().unwrap()],
        Duration::from_secs(30),
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("the guest kernel panicked"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}

#[test]
fn huge_page_backings_refuse_bad_sizes_and_a_short_pool_in_one_line() {
    use ldt_vmm::vm::memory::{available_huge_pages, HugePagePool};
    let p = file(HELLO_PAYLOAD, "hello");
    let flat = p.path().to_str().unwrap();
    for backing in ["thp", "hugetlbfs"] {
        let out = run(&[
            "run",
            "--flat",
            flat,
            "--mem-backing",
            backing,
            "--mem",
            "3",
        ]);
        fails_with(
            &out,
            "--mem must be at least 2 MiB and a multiple of 2 MiB (got 3 MiB)",
        );
    }
    // No other test of this binary changes the pool meanwhile.
    let _lock = HugePagePool::reserve(0);
    let free = available_huge_pages().unwrap_or(0);
    let mib = ((free + 1) * 2).to_string();
    let out = run(&[
        "run",
        "--flat",
        flat,
        "--mem-backing",
        "hugetlbfs",
        "--mem",
        &mib,
    ]);
    fails_with(
        &out,
        &format!(
            "--mem-backing hugetlbfs: {mib} MiB of guest memory needs {} free 2 MiB huge pages, this host has {free}",
            free + 1
        ),
    );
    assert_eq!(
        text(&out.stderr).lines().count(),
        1,
        "{}",
        text(&out.stderr)
    );
    assert_eq!(
        available_huge_pages().unwrap_or(0),
        free,
        "nothing reserved"
    );
    let out = run(&["run", "--flat", flat, "--mem-backing", "2M"]);
    fails_with(&out, "invalid value '2M' for '--mem-backing <BACKING>'");
}

#[test]
fn a_flat_guest_runs_on_each_backing() {
    use ldt_vmm::vm::memory::HugePagePool;
    let p = file(HELLO_PAYLOAD, "hello");
    let flat = p.path().to_str().unwrap();
    let pool = HugePagePool::reserve(8);
    for backing in ["anon", "thp", "hugetlbfs"] {
        if backing == "hugetlbfs" {
            if let Err(e) = &pool {
                eprintln!("hugetlbfs skipped: {e}");
                continue;
            }
        }
        let out = run(&[
            "run",
            "--flat",
            flat,
            "--mem-backing",
            backing,
            "--mem",
            "16",
        ]);
        assert!(out.status.success(), "{backing}: {}", text(&out.stderr));
        assert_eq!(text(&out.stdout), "hello from ring 3\n", "{backing}");
    }
}
