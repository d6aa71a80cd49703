//! The memory-message decoder behind the checksum, on arbitrary payloads:
//! whatever it accepts must be self-consistent.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((ranges, bytes)) = ldt_migration::decode_memory(data) {
        let want: u64 = ranges.iter().map(|r| r.data_len()).sum();
        assert_eq!(want, bytes.len() as u64);
        for r in ranges {
            assert_eq!(r.gpa % ldt_migration::PAGE_SIZE, 0);
            assert!(r.pages > 0);
        }
    }
});
