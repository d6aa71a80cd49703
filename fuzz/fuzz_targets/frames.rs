//! The destination's frame reader on arbitrary bytes: any error is fine,
//! a panic, a hang or a huge allocation is a bug.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut r = data;
    while let Ok(f) = ldt_migration::read_frame(&mut r) {
        match f.kind {
            ldt_migration::MessageKind::Memory => {
                let _ = ldt_migration::decode_memory(&f.payload);
            }
            ldt_migration::MessageKind::Pages => {
                if let Ok((_, data)) = ldt_migration::decode_pages_table(&f.payload) {
                    // The data follows the frame on the stream.
                    let skip = (data as usize).min(r.len());
                    r = &r[skip..];
                }
            }
            _ => {}
        }
    }
});
