//! The JSON bodies a destination and a restore parse (Hello, State).
#![no_main]
use libfuzzer_sys::fuzz_target;
use ldt_vmm::migration::{Hello, MachineState};

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<Hello>(data);
    let _ = serde_json::from_slice::<MachineState>(data);
});
