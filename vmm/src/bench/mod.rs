//! Benchmarks: `ldt-vmm bench dirty` (tracking cost, in process) and
//! `ldt-vmm bench migrate` (whole migrations between two VMM processes).

pub mod dirty;
pub mod migrate;
pub mod smaps;

pub use dirty::{
    mem_mib_for, working_set_page, DirtyBenchConfig, DirtyBenchResult, Rng, WORKING_SET_BASE,
};
