//! ldt-vmm: a small KVM virtual machine monitor that tracks guest dirty
//! pages with KVM's dirty logs (and, later, LDT) and live-migrates guests.
//!
//! Map: `arch` (x86 boot facts) → `vm` (KVM objects) → `devices` →
//! `loader`/`builder` (assembling a VM) → `dirty` (one file a dirty source)
//! → `flat` (the flat-payload harness used by tests and benches) →
//! `runner` and `api` (running a VM and controlling it).

pub mod affinity;
pub mod api;
pub mod arch;
pub mod bench;
pub mod builder;
pub mod devices;
pub mod dirty;
pub mod flat;
pub mod input_file;
pub mod loader;
pub mod migration;
pub mod runner;
pub mod unix_socket;
pub mod vm;
