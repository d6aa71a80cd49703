//! Saving and restoring vCPU and VM state for migration and snapshots.
//!
//! Restore order (each step relies on the previous): guest memory; VM
//! state — irqchip (PIC master, PIC slave, IOAPIC), PIT, then the clock;
//! per vCPU — CPUID (set when the vCPU is configured), MSRs, regs, sregs,
//! FPU/XSAVE, XCRs, debug regs, LAPIC, MP state, and vCPU events last (they
//! may hold a pending exception or interrupt that the LAPIC and MP state
//! must already be able to take); then devices; then the vCPUs run.

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// Errors saving or restoring state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{0} failed: {1}")]
    Ioctl(&'static str, kvm_ioctls::Error),
    #[error("KVM restored {0} of {1} MSRs")]
    PartialMsrs(usize, usize),
    #[error("vCPU {vcpu} has {count} MSRs, KVM takes at most {MAX_MSRS_PER_CALL}")]
    TooManyMsrs { vcpu: usize, count: usize },
    #[error("vCPU {index} of the state carries id {id}")]
    VcpuId { index: usize, id: u8 },
}

/// Most entries one KVM_GET_MSRS/KVM_SET_MSRS call takes: KVM refuses
/// `nmsrs >= MAX_IO_MSRS` (256, arch/x86/kvm/x86.c), and kvm-bindings'
/// `Msrs` holds at most `KVM_MAX_MSR_ENTRIES` (also 256).
pub const MAX_MSRS_PER_CALL: usize = 255;

fn io(name: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |e| StateError::Ioctl(name, e)
}

/// x87 and SSE state (`kvm_fpu`, which kvm-bindings does not serialize).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    pub fpr: [[u8; 16]; 8],
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: [[u8; 16]; 16],
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        FpuState {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&FpuState> for kvm_fpu {
    fn from(f: &FpuState) -> Self {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// Everything KVM holds for one vCPU.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u8,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub fpu: FpuState,
    pub xsave: Option<kvm_xsave>,
    pub xcrs: Option<kvm_xcrs>,
    pub msrs: Vec<kvm_msr_entry>,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    pub events: kvm_vcpu_events,
    pub debug_regs: kvm_debugregs,
}

/// Reads `indices` one batch at a time, skipping MSRs KVM lists but cannot
/// read (KVM_GET_MSRS stops at the first failing entry).
fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, StateError> {
    let mut out = Vec::new();
    let mut rest: Vec<u32> = indices.to_vec();
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .take(MAX_MSRS_PER_CALL)
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).expect("at most MAX_MSRS_PER_CALL entries");
        let n = vcpu.get_msrs(&mut msrs).map_err(io("KVM_GET_MSRS"))?;
        out.extend_from_slice(&msrs.as_slice()[..n]);
        // Entry n failed (when n < the batch): skip it and go on after it.
        let done = if n < entries.len() { n + 1 } else { n };
        rest.drain(..done);
    }
    Ok(out)
}

/// The MSRs worth saving: KVM's index list.
pub fn msr_index_list(kvm: &Kvm) -> Result<Vec<u32>, StateError> {
    Ok(kvm
        .get_msr_index_list()
        .map_err(io("KVM_GET_MSR_INDEX_LIST"))?
        .as_slice()
        .to_vec())
}

impl VcpuState {
    /// Saves a stopped vCPU.
    pub fn save(id: u8, vcpu: &VcpuFd, msr_indices: &[u32]) -> Result<Self, StateError> {
        Ok(VcpuState {
            id,
            // mp_state and events first: KVM_GET_MP_STATE may flush pending
            // events into the state saved next.
            mp_state: vcpu.get_mp_state().map_err(io("KVM_GET_MP_STATE"))?,
            events: vcpu.get_vcpu_events().map_err(io("KVM_GET_VCPU_EVENTS"))?,
            regs: vcpu.get_regs().map_err(io("KVM_GET_REGS"))?,
            sregs: vcpu.get_sregs().map_err(io("KVM_GET_SREGS"))?,
            fpu: FpuState::from(&vcpu.get_fpu().map_err(io("KVM_GET_FPU"))?),
            xsave: vcpu.get_xsave().ok(),
            xcrs: vcpu.get_xcrs().ok(),
            msrs: read_msrs(vcpu, msr_indices)?,
            lapic: vcpu.get_lapic().map_err(io("KVM_GET_LAPIC"))?,
            debug_regs: vcpu.get_debug_regs().map_err(io("KVM_GET_DEBUGREGS"))?,
        })
    }

    /// Checks what KVM would otherwise refuse half-way (or what would not
    /// fit its fixed-size structures): the state of the vCPU at `index`.
    pub fn check(&self, index: usize) -> Result<(), StateError> {
        if self.id as usize != index {
            return Err(StateError::VcpuId { index, id: self.id });
        }
        if self.msrs.len() > MAX_MSRS_PER_CALL {
            return Err(StateError::TooManyMsrs {
                vcpu: index,
                count: self.msrs.len(),
            });
        }
        Ok(())
    }

    /// Restores into a configured (CPUID set) vCPU, in the documented order.
    /// The caller has run `check`.
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), StateError> {
        let msrs = Msrs::from_entries(&self.msrs).map_err(|_| StateError::TooManyMsrs {
            vcpu: self.id as usize,
            count: self.msrs.len(),
        })?;
        let n = vcpu.set_msrs(&msrs).map_err(io("KVM_SET_MSRS"))?;
        if n != self.msrs.len() {
            return Err(StateError::PartialMsrs(n, self.msrs.len()));
        }
        vcpu.set_regs(&self.regs).map_err(io("KVM_SET_REGS"))?;
        vcpu.set_sregs(&self.sregs).map_err(io("KVM_SET_SREGS"))?;
        vcpu.set_fpu(&kvm_fpu::from(&self.fpu))
            .map_err(io("KVM_SET_FPU"))?;
        if let Some(x) = &self.xsave {
            // SAFETY: `x` is a complete kvm_xsave saved by KVM_GET_XSAVE.
            unsafe { vcpu.set_xsave(x) }.map_err(io("KVM_SET_XSAVE"))?;
        }
        if let Some(x) = &self.xcrs {
            vcpu.set_xcrs(x).map_err(io("KVM_SET_XCRS"))?;
        }
        vcpu.set_debug_regs(&self.debug_regs)
            .map_err(io("KVM_SET_DEBUGREGS"))?;
        vcpu.set_lapic(&self.lapic).map_err(io("KVM_SET_LAPIC"))?;
        vcpu.set_mp_state(self.mp_state)
            .map_err(io("KVM_SET_MP_STATE"))?;
        vcpu.set_vcpu_events(&self.events)
            .map_err(io("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}

/// VM-wide KVM state: interrupt controllers, PIT, clock.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

fn get_chip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, StateError> {
    let mut c = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut c).map_err(io("KVM_GET_IRQCHIP"))?;
    Ok(c)
}

impl VmState {
    /// Saves the VM's state (vCPUs stopped).
    pub fn save(vm: &VmFd) -> Result<Self, StateError> {
        Ok(VmState {
            pic_master: get_chip(vm, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: get_chip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: get_chip(vm, KVM_IRQCHIP_IOAPIC)?,
            pit: vm.get_pit2().map_err(io("KVM_GET_PIT2"))?,
            clock: vm.get_clock().map_err(io("KVM_GET_CLOCK"))?,
        })
    }

    /// Restores it (before any vCPU state).
    pub fn restore(&self, vm: &VmFd) -> Result<(), StateError> {
        for chip in [&self.pic_master, &self.pic_slave, &self.ioapic] {
            vm.set_irqchip(chip).map_err(io("KVM_SET_IRQCHIP"))?;
        }
        vm.set_pit2(&self.pit).map_err(io("KVM_SET_PIT2"))?;
        // Only the clock value moves: flags such as TSC_STABLE describe the
        // source host and KVM_SET_CLOCK rejects most of them.
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&clock).map_err(io("KVM_SET_CLOCK"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fpu_state_round_trips_through_kvm_fpu() {
        let mut f = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            last_ip: 0xdead,
            ..Default::default()
        };
        f.xmm[3][7] = 0x5a;
        f.fpr[1][0] = 9;
        let s = FpuState::from(&f);
        let back = kvm_fpu::from(&s);
        assert_eq!(
            (back.fcw, back.mxcsr, back.last_ip),
            (0x37f, 0x1f80, 0xdead)
        );
        assert_eq!((back.xmm[3][7], back.fpr[1][0]), (0x5a, 9));
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<FpuState>(&json).unwrap(), s);
    }
}
