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
    for name in ["writer", "hello", "triple-fault", "spin"] {
        let src = format!("payloads/{name}.S");
        println!("cargo:rerun-if-changed={src}");
        let obj = out.join(format!("{name}.o"));
        let bin = out.join(format!("{name}.bin"));
        run(Command::new("as").args(["--64", "-o"]).arg(&obj).arg(&src));
        run(Command::new("ld")
            .args(["-Ttext=0x100000", "--oformat", "binary", "-o"])
            .arg(&bin)
            .arg(&obj));
    }
}
