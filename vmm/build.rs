//! Assembles the flat payloads in `payloads/` with GNU as + ld, following the
//! flat contract (`ld -Ttext=0x100000 --oformat binary`).

use std::path::PathBuf;
use std::process::Command;

fn run(cmd: &mut Command) {
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (install binutils)"));
    assert!(status.success(), "{cmd:?} failed with {status}");
}

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    // (output name, source, `as --defsym` values)
    let payloads: &[(&str, &str, &[&str])] = &[
        ("writer", "writer", &[]),
        ("hello", "hello", &[]),
        ("triple-fault", "triple-fault", &[]),
        ("spin", "spin", &[]),
        ("pvpanic", "pvpanic", &[]),
        // About 16 pages per printed line, then a pause: converges fast.
        ("counter-slow", "counter", &["PAGES=16", "SPIN=200000"]),
        // 4096 pages per line, no pause: dirties faster than a throttled link sends.
        ("counter-fast", "counter", &["PAGES=4096", "SPIN=1"]),
        // The ldt-pv guest driver, well behaved and in its failure modes.
        ("ldt-pv", "ldt-pv", &[]),
        ("ldt-pv-harness", "ldt-pv", &["AUTO=0", "HARNESS=1"]),
        ("ldt-pv-noannounce", "ldt-pv", &["NOANNOUNCE=1"]),
        ("ldt-pv-noharvest", "ldt-pv", &["NOHARVEST=1"]),
        ("ldt-pv-badseq", "ldt-pv", &["BADSEQ=1"]),
        ("ldt-pv-badstatus", "ldt-pv", &["BADSTATUS=1"]),
        ("ldt-pv-withdraw", "ldt-pv", &["WITHDRAW=2"]),
        ("ldt-pv-hide", "ldt-pv", &["HIDE=1"]),
    ];
    println!("cargo:rerun-if-changed=payloads/ring3.inc");
    for (name, source, defs) in payloads {
        let src = format!("payloads/{source}.S");
        println!("cargo:rerun-if-changed={src}");
        let obj = out.join(format!("{name}.o"));
        let bin = out.join(format!("{name}.bin"));
        let mut as_cmd = Command::new("as");
        as_cmd.args(["--64", "-I", "payloads", "-o"]).arg(&obj);
        for d in defs.iter() {
            as_cmd.arg("--defsym").arg(d);
        }
        run(as_cmd.arg(&src));
        run(Command::new("ld")
            .args(["-Ttext=0x100000", "--oformat", "binary", "-o"])
            .arg(&bin)
            .arg(&obj));
    }
}
