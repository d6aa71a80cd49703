//! The destination's frame reader on arbitrary bytes: any error is fine,
//! a panic, a hang or a huge allocation is a bug.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut r = data;
    while let Ok(f) = ldt_migration::read_frame(&mut r) {
        if f.kind == ldt_migration::MessageKind::Memory {
            let _ = ldt_migration::decode_memory(&f.payload);
        }
    }
});
