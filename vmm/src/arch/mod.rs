//! x86-64 facts: the guest-physical layout, descriptor tables, page tables,
//! CPUID, register state and the Linux boot protocol.

pub mod boot;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod paging;
pub mod regs;
