//! Initial vCPU register state: long mode, FPU, the MSRs Linux expects, and
//! the local APIC's LINT pins.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;

use super::gdt;
use super::layout::{GDT_ADDR, PML4_ADDR, TSS_ADDR};

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_MP: u64 = 1 << 1;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_NE: u64 = 1 << 5;
const X86_CR0_WP: u64 = 1 << 16;
const X86_CR0_AM: u64 = 1 << 18;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const X86_CR4_OSFXSR: u64 = 1 << 9;
const X86_CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_SCE: u64 = 1 << 0;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_MEM_TYPE_WB: u64 = 6;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Special registers for 64-bit long mode with the boot GDT and page tables.
pub fn long_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let table = gdt::table(TSS_ADDR);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of_val(&table) - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cs = gdt::segment(gdt::CODE64_DPL0, table[1]);
    let data = gdt::segment(gdt::DATA_DPL0, table[2]);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = gdt::segment(gdt::TSS64, table[5]);
    // Busy 64-bit TSS: what `ltr` would leave in TR.
    sregs.tr.type_ = 0xb;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = X86_CR4_PAE | X86_CR4_OSFXSR | X86_CR4_OSXMMEXCPT;
    sregs.cr0 =
        X86_CR0_PE | X86_CR0_MP | X86_CR0_ET | X86_CR0_NE | X86_CR0_WP | X86_CR0_AM | X86_CR0_PG;
    sregs.efer = EFER_LME | EFER_LMA | EFER_SCE;
    sregs
}

/// General registers for entering at `rip` with stack `rsp` and `rsi`
/// (the Linux boot protocol passes `boot_params` in RSI).
pub fn entry_regs(rip: u64, rsp: u64, rsi: u64) -> kvm_regs {
    kvm_regs {
        rip,
        rsp,
        rbp: rsp,
        rsi,
        rflags: 0x2,
        ..Default::default()
    }
}

/// x87/SSE state after `fninit` + `ldmxcsr 0x1f80`.
pub fn initial_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// The MSR values a Linux guest expects at its 64-bit entry.
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    let e = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        e(MSR_IA32_SYSENTER_CS, 0),
        e(MSR_IA32_SYSENTER_ESP, 0),
        e(MSR_IA32_SYSENTER_EIP, 0),
        e(MSR_STAR, 0),
        e(MSR_CSTAR, 0),
        e(MSR_KERNEL_GS_BASE, 0),
        e(MSR_SYSCALL_MASK, 0),
        e(MSR_LSTAR, 0),
        e(MSR_IA32_TSC, 0),
        e(MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        e(MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ]
}

/// Errors setting up a vCPU's registers.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("{0} failed: {1}")]
    Ioctl(&'static str, kvm_ioctls::Error),
    #[error("KVM accepted only {0} of {1} boot MSRs")]
    PartialMsrs(usize, usize),
}

/// Writes the boot MSRs.
pub fn set_boot_msrs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let entries = boot_msr_entries();
    let msrs = Msrs::from_entries(&entries).expect("boot MSR list fits a FAM struct");
    let n = vcpu
        .set_msrs(&msrs)
        .map_err(|e| RegsError::Ioctl("KVM_SET_MSRS", e))?;
    if n != entries.len() {
        return Err(RegsError::PartialMsrs(n, entries.len()));
    }
    Ok(())
}

/// LINT0 as ExtINT (the PIC's output) and LINT1 as NMI, like a PC's BIOS.
pub fn set_lint(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut lapic = vcpu
        .get_lapic()
        .map_err(|e| RegsError::Ioctl("KVM_GET_LAPIC", e))?;
    let reg = |regs: &[i8], off: usize| -> u32 {
        u32::from_le_bytes([
            regs[off] as u8,
            regs[off + 1] as u8,
            regs[off + 2] as u8,
            regs[off + 3] as u8,
        ])
    };
    let set = |regs: &mut [i8], off: usize, v: u32| {
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            regs[off + i] = *b as i8;
        }
    };
    let delivery = |v: u32, mode: u32| (v & !0x700) | (mode << 8);
    let lvt0 = reg(&lapic.regs, APIC_LVT0);
    set(&mut lapic.regs, APIC_LVT0, delivery(lvt0, APIC_MODE_EXTINT));
    let lvt1 = reg(&lapic.regs, APIC_LVT1);
    set(&mut lapic.regs, APIC_LVT1, delivery(lvt1, APIC_MODE_NMI));
    vcpu.set_lapic(&lapic)
        .map_err(|e| RegsError::Ioctl("KVM_SET_LAPIC", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_mode_has_paging_pae_and_lma() {
        let s = long_mode_sregs(kvm_sregs::default());
        assert_ne!(s.cr0 & X86_CR0_PG, 0);
        assert_ne!(s.cr0 & X86_CR0_PE, 0);
        assert_ne!(s.cr4 & X86_CR4_PAE, 0);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.cr3, PML4_ADDR);
        assert_eq!((s.cs.selector, s.cs.l, s.cs.dpl), (gdt::CODE64_DPL0, 1, 0));
        assert_eq!(s.tr.selector, gdt::TSS64);
    }

    #[test]
    fn boot_msrs_enable_fast_strings_and_write_back_mtrr() {
        let m = boot_msr_entries();
        let get = |i| m.iter().find(|e| e.index == i).unwrap().data;
        assert_eq!(get(MSR_IA32_MISC_ENABLE), 1);
        assert_eq!(get(MSR_MTRR_DEF_TYPE), 0x806);
    }
}
