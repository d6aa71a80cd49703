//! Assembles a VM from plain resources: memory, irqchip, devices, vCPUs with
//! their CPUID and entry state, and the guest loaded into memory.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};

use crate::arch::cpuid::{self, CpuProfile};
use crate::arch::layout;
use crate::devices::console::ConsoleOut;
use crate::devices::ldt_pv::LdtPv;
use crate::devices::{self, LegacyDevices};
use crate::dirty::kvm_ring::{self, RingCollector};
use crate::dirty::DirtyError;
use crate::loader::{self, LinuxBoot, LoadError};
use crate::vm::vcpu::{DirtyRingFull, Vcpu, VcpuError};
use crate::vm::{MemBacking, Vm, VmError};

/// Most vCPUs the MP table in the EBDA can describe.
pub const MAX_VCPUS: u8 = 32;

/// What to boot.
#[derive(Debug, Clone)]
pub enum BootSource {
    /// A flat payload (see `loader` for the contract).
    Flat(PathBuf),
    Linux(LinuxBoot),
    /// Nothing to load: memory and state arrive from a migration stream.
    Incoming,
}

/// Everything needed to build a VM.
#[derive(Clone)]
pub struct VmResources {
    pub mem_mib: u64,
    pub vcpus: u8,
    pub cpu_profile: CpuProfile,
    pub boot: BootSource,
    /// Entries per vCPU dirty ring, when the kvm-ring source may be used.
    pub dirty_ring_entries: Option<u32>,
    pub console: ConsoleOut,
    /// What backs guest RAM here (this host's choice, also for a VM that
    /// arrives by migration or from a snapshot).
    pub mem_backing: MemBacking,
    /// The ldt-pv paravirtual dirty-tracking device (`--ldt-pv`).
    pub ldt_pv: bool,
}

/// Errors building a VM.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("--mem must be at least 2 MiB and a multiple of 2 MiB (got {0} MiB)")]
    BadMemory(u64),
    #[error("--vcpus must be between 1 and {MAX_VCPUS} (got {0})")]
    BadVcpus(u8),
    #[error("flat payloads run on one vCPU")]
    FlatSmp,
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Dirty(#[from] DirtyError),
    #[error(transparent)]
    Device(#[from] devices::legacy::DeviceError),
    #[error("KVM_GET_SUPPORTED_CPUID failed: {0}")]
    Cpuid(kvm_ioctls::Error),
    #[error("{0} CPUID entries, more than the {KVM_MAX_CPUID_ENTRIES} KVM_SET_CPUID2 takes here")]
    CpuidTooLarge(usize),
    #[error(transparent)]
    LdtPv(#[from] devices::ldt_pv::LdtPvSetupError),
    #[error("registering the COM1 irqfd failed: {0}")]
    Irqfd(kvm_ioctls::Error),
}

/// A built VM, ready to run.
pub struct Machine {
    pub vm: Arc<Vm>,
    pub vcpus: Vec<Vcpu>,
    pub devices: Arc<Mutex<LegacyDevices>>,
    /// The dirty-ring collector, when the ring was enabled.
    pub ring: Option<Arc<RingCollector>>,
}

/// Builds the VM described by `res`.
pub fn build(res: &VmResources) -> Result<Machine, BuildError> {
    if res.mem_mib < 2 || !res.mem_mib.is_multiple_of(2) || res.mem_mib > (1 << 30) {
        return Err(BuildError::BadMemory(res.mem_mib));
    }
    if res.vcpus == 0 || res.vcpus > MAX_VCPUS {
        return Err(BuildError::BadVcpus(res.vcpus));
    }
    if matches!(res.boot, BootSource::Flat(_)) && res.vcpus != 1 {
        return Err(BuildError::FlatSmp);
    }
    let mem_size = res.mem_mib << 20;
    crate::vm::memory::check_host_can_back(mem_size).map_err(VmError::from)?;
    let mut vm = Vm::new(mem_size, res.mem_backing)?;
    if res.ldt_pv {
        vm.ldt_pv = Some(Arc::new(LdtPv::new(vm.fd.clone(), mem_size)?));
    }
    // The bitmap is e820-reserved, so a kernel never takes it for RAM.
    let reserved: Vec<(u64, u64)> = layout::ldt_pv_bitmap(mem_size)
        .filter(|_| res.ldt_pv)
        .map(|(_, bytes)| (layout::LDT_PV_BITMAP_ADDR, bytes))
        .into_iter()
        .collect();

    let entry = match &res.boot {
        BootSource::Flat(path) => loader::load_flat(&vm.memory, mem_size, path)?,
        BootSource::Linux(spec) => {
            loader::load_linux(&vm.memory, mem_size, res.vcpus, spec, &reserved)?
        }
        BootSource::Incoming => kvm_bindings::kvm_regs::default(),
    };

    let devices = Arc::new(Mutex::new(LegacyDevices::new(res.console.clone())?));
    if let Some(d) = &vm.ldt_pv {
        devices.lock().unwrap().attach_ldt_pv(d.clone());
    }
    vm.fd
        .register_irqfd(devices.lock().unwrap().serial_irq(), devices::COM1_IRQ)
        .map_err(BuildError::Irqfd)?;

    // The ring must exist before the vCPUs are created.
    let ring = match res.dirty_ring_entries {
        Some(n) => {
            kvm_ring::enable(&vm.fd, n)?;
            Some(Arc::new(RingCollector::new(vm.fd.clone(), &vm.slots, n)))
        }
        None => None,
    };

    let mut base_cpuid = vm
        .kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(BuildError::Cpuid)?
        .as_slice()
        .to_vec();
    cpuid::filter(&mut base_cpuid, res.cpu_profile);
    cpuid::add_platform_leaves(&mut base_cpuid, vm.ldt_pv.as_ref().map(|d| d.leaf()));
    let base_cpuid = CpuId::from_entries(&base_cpuid)
        .map_err(|_| BuildError::CpuidTooLarge(base_cpuid.len()))?;

    let mut vcpus = Vec::new();
    for id in 0..res.vcpus {
        let hook = ring.clone().map(|r| r as Arc<dyn DirtyRingFull>);
        let vcpu = Vcpu::new(&vm, id, devices.clone(), hook)?;
        if let Some(r) = &ring {
            r.attach(&vcpu.fd)?;
        }
        vcpu.configure(&base_cpuid, res.vcpus, entry)?;
        vcpus.push(vcpu);
    }
    Ok(Machine {
        vm: Arc::new(vm),
        vcpus,
        devices,
        ring,
    })
}
