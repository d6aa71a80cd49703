//! A vCPU: its KVM fd, initial state, and the exit loop.

use std::cell::Cell;
use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_run, CpuId, KVM_EXIT_DIRTY_RING_FULL, KVM_INTERNAL_ERROR_EMULATION};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress};

use super::{GuestMemory, Vm, VmError};
use crate::arch::{cpuid, regs};
use crate::devices::{LegacyDevices, PioAction};

/// Called by a vCPU thread whose dirty ring is full; must drain the rings.
pub trait DirtyRingFull: Send + Sync {
    fn ring_full(&self) -> Result<(), String>;
}

/// Why `Vcpu::run` returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuEvent {
    /// The guest reset through the i8042: the VM ends.
    Reset,
    /// A flat payload reached a sync point.
    FlatSync(u32),
    /// The guest kernel reported a panic (pvpanic): the VM ends.
    GuestPanic,
    /// `KVM_RUN` was interrupted by a kick (pause, shutdown).
    Kicked,
}

/// Errors of a running vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("{0} failed: {1}")]
    Ioctl(&'static str, kvm_ioctls::Error),
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    #[error("vCPU {cpu}: guest triple fault (KVM_EXIT_SHUTDOWN) at RIP {rip:#x}")]
    TripleFault { cpu: u8, rip: u64 },
    #[error("vCPU {cpu}: KVM internal error, suberror {suberror}{what} at RIP {rip:#x}, instruction bytes [{bytes}]")]
    Internal {
        cpu: u8,
        suberror: u32,
        what: &'static str,
        rip: u64,
        bytes: String,
    },
    #[error("vCPU {cpu}: KVM entry failed, hardware reason {reason:#x}")]
    FailEntry { cpu: u8, reason: u64 },
    #[error("vCPU {cpu}: dirty ring full and no collector: {msg}")]
    RingFull { cpu: u8, msg: String },
    #[error("vCPU {cpu}: unexpected exit {exit}")]
    Unexpected { cpu: u8, exit: String },
}

thread_local! {
    /// The `kvm_run` of the vCPU running on this thread, for the kick signal.
    static RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// Kick-signal handler: makes the current or next `KVM_RUN` on this thread
/// return at once with EINTR.
pub extern "C" fn kick_signal_handler(
    _: libc::c_int,
    _: *mut libc::siginfo_t,
    _: *mut libc::c_void,
) {
    let p = RUN_PTR.with(|p| p.get());
    if !p.is_null() {
        // SAFETY: the pointer is this thread's vCPU `kvm_run` mapping, set
        // while the vCPU runs on this thread and cleared before it moves.
        unsafe { (*p).immediate_exit = 1 };
    }
}

/// The signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

/// Installs the kick handler (once per process).
pub fn register_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_signal_handler)
}

pub struct Vcpu {
    pub id: u8,
    pub fd: VcpuFd,
    devices: Arc<Mutex<LegacyDevices>>,
    ring_full: Option<Arc<dyn DirtyRingFull>>,
    memory: GuestMemory,
}

impl Vcpu {
    pub fn new(
        vm: &Vm,
        id: u8,
        devices: Arc<Mutex<LegacyDevices>>,
        ring_full: Option<Arc<dyn DirtyRingFull>>,
    ) -> Result<Vcpu, VmError> {
        let fd = vm
            .fd
            .create_vcpu(id as u64)
            .map_err(|e| VmError::Ioctl("KVM_CREATE_VCPU", e))?;
        Ok(Vcpu {
            id,
            fd,
            devices,
            ring_full,
            memory: vm.memory.clone(),
        })
    }

    /// Sets CPUID, MSRs, FPU, LAPIC and the long-mode entry state.
    pub fn configure(
        &self,
        base_cpuid: &CpuId,
        vcpus: u8,
        entry: kvm_bindings::kvm_regs,
    ) -> Result<(), VcpuError> {
        let mut entries = base_cpuid.as_slice().to_vec();
        cpuid::set_vcpu_identity(&mut entries, self.id, vcpus);
        let cpuid = CpuId::from_entries(&entries).expect("CPUID entries fit");
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(|e| VcpuError::Ioctl("KVM_SET_CPUID2", e))?;
        regs::set_boot_msrs(&self.fd)?;
        self.fd
            .set_fpu(&regs::initial_fpu())
            .map_err(|e| VcpuError::Ioctl("KVM_SET_FPU", e))?;
        regs::set_lint(&self.fd)?;
        if self.id == 0 {
            let sregs = self
                .fd
                .get_sregs()
                .map_err(|e| VcpuError::Ioctl("KVM_GET_SREGS", e))?;
            self.fd
                .set_sregs(&regs::long_mode_sregs(sregs))
                .map_err(|e| VcpuError::Ioctl("KVM_SET_SREGS", e))?;
            self.fd
                .set_regs(&entry)
                .map_err(|e| VcpuError::Ioctl("KVM_SET_REGS", e))?;
        }
        Ok(())
    }

    /// Runs the guest until an event the caller must handle. Port I/O to
    /// the legacy devices and full dirty rings are handled here.
    pub fn run(&mut self) -> Result<VcpuEvent, VcpuError> {
        self.run_while(&|| true)
    }

    /// Like `run`, for a vCPU thread that can be kicked: `keep_running` is
    /// checked after this thread's kick target is set, so a kick sent after
    /// a `false` answer would have been is never lost (it makes `KVM_RUN`
    /// return at once).
    pub fn run_while(&mut self, keep_running: &dyn Fn() -> bool) -> Result<VcpuEvent, VcpuError> {
        RUN_PTR.with(|p| p.set(self.fd.get_kvm_run()));
        let result = if keep_running() {
            self.run_loop()
        } else {
            Ok(VcpuEvent::Kicked)
        };
        RUN_PTR.with(|p| p.set(std::ptr::null_mut()));
        self.fd.set_kvm_immediate_exit(0);
        result
    }

    /// A `KVM_RUN` that returns before entering the guest (`immediate_exit`),
    /// for KVM's first-run work on the calling thread: since Linux 6.13 the
    /// first `KVM_RUN` of a VM starts its NX huge-page recovery worker, a
    /// thread of this process that inherits the caller's CPU mask.
    pub fn run_no_entry(&mut self) -> Result<(), VcpuError> {
        self.fd.set_kvm_immediate_exit(1);
        let result = self.fd.run().map(|exit| format!("{exit:?}"));
        self.fd.set_kvm_immediate_exit(0);
        match result {
            Err(e) if e.errno() == libc::EINTR => Ok(()),
            Err(e) => Err(VcpuError::Ioctl("KVM_RUN", e)),
            Ok(exit) => Err(VcpuError::Unexpected { cpu: self.id, exit }),
        }
    }

    fn run_loop(&mut self) -> Result<VcpuEvent, VcpuError> {
        let cpu = self.id;
        loop {
            match self.fd.run() {
                Ok(VcpuExit::IoOut(port, data)) => {
                    let action = self.devices.lock().unwrap().pio_write(port, data);
                    match action {
                        PioAction::Continue => {}
                        PioAction::Reset => return Ok(VcpuEvent::Reset),
                        PioAction::FlatSync(v) => return Ok(VcpuEvent::FlatSync(v)),
                        PioAction::GuestPanic => return Ok(VcpuEvent::GuestPanic),
                    }
                }
                Ok(VcpuExit::IoIn(port, data)) => self.devices.lock().unwrap().pio_read(port, data),
                Ok(VcpuExit::MmioRead(_, data)) => data.fill(0xff),
                Ok(VcpuExit::MmioWrite(..)) => {}
                Ok(VcpuExit::Hlt) => {}
                Ok(VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL)) => match &self.ring_full {
                    Some(h) => h
                        .ring_full()
                        .map_err(|msg| VcpuError::RingFull { cpu, msg })?,
                    None => {
                        return Err(VcpuError::RingFull {
                            cpu,
                            msg: "no dirty-ring collector".into(),
                        })
                    }
                },
                Ok(VcpuExit::Shutdown) => {
                    return Err(VcpuError::TripleFault {
                        cpu,
                        rip: self.rip(),
                    })
                }
                Ok(VcpuExit::InternalError) => {
                    if !self.complete_unemulated() {
                        return Err(self.internal_error());
                    }
                }
                Ok(VcpuExit::FailEntry(reason, _)) => {
                    return Err(VcpuError::FailEntry { cpu, reason })
                }
                Ok(VcpuExit::SystemEvent(kind, _)) => {
                    return Err(VcpuError::Unexpected {
                        cpu,
                        exit: format!("system event {kind}"),
                    })
                }
                Ok(other) => {
                    return Err(VcpuError::Unexpected {
                        cpu,
                        exit: format!("{other:?}"),
                    })
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                    return Ok(VcpuEvent::Kicked);
                }
                Err(e) => return Err(VcpuError::Ioctl("KVM_RUN", e)),
            }
        }
    }

    fn rip(&self) -> u64 {
        self.fd.get_regs().map(|r| r.rip).unwrap_or(0)
    }

    /// Completes an instruction the host's emulator could not: this
    /// project's PVM hosts interpret guest ring 0 and lack `int3` and
    /// `fwait`. `int3` becomes an injected #BP after it (its trap
    /// semantics), `fwait` a no-op (no x87 exception is ever pending in a
    /// guest without XSAVE state here). Returns false for anything else.
    fn complete_unemulated(&mut self) -> bool {
        const INT3: u8 = 0xcc;
        const FWAIT: u8 = 0x9b;
        const BP_VECTOR: u8 = 3;
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so the
        // `internal` member of the union is the valid one.
        let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
        if suberror != KVM_INTERNAL_ERROR_EMULATION {
            return false;
        }
        let Ok(mut regs) = self.fd.get_regs() else {
            return false;
        };
        let Some(insn) = self.instruction_bytes(regs.rip) else {
            return false;
        };
        match insn[0] {
            FWAIT => {
                regs.rip += 1;
                self.fd.set_regs(&regs).is_ok()
            }
            INT3 => {
                let Ok(mut events) = self.fd.get_vcpu_events() else {
                    return false;
                };
                regs.rip += 1;
                events.exception.injected = 1;
                events.exception.nr = BP_VECTOR;
                events.exception.has_error_code = 0;
                events.exception.error_code = 0;
                self.fd.set_regs(&regs).is_ok() && self.fd.set_vcpu_events(&events).is_ok()
            }
            _ => false,
        }
    }

    /// The 15 bytes at guest-virtual `rip`, if mapped.
    fn instruction_bytes(&self, rip: u64) -> Option<[u8; 15]> {
        let t = self.fd.translate_gva(rip).ok().filter(|t| t.valid != 0)?;
        let mut buf = [0u8; 15];
        self.memory
            .read_slice(&mut buf, GuestAddress(t.physical_address))
            .ok()?;
        Some(buf)
    }

    /// Describes a `KVM_EXIT_INTERNAL_ERROR` with the faulting instruction.
    fn internal_error(&mut self) -> VcpuError {
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so the
        // `internal` member of the union is the valid one.
        let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
        let rip = self.rip();
        let bytes = self
            .instruction_bytes(rip)
            .map(|b| {
                b.iter()
                    .map(|x| format!("{x:02x}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_else(|| "unreadable".into());
        VcpuError::Internal {
            cpu: self.id,
            suberror,
            what: if suberror == KVM_INTERNAL_ERROR_EMULATION {
                " (emulation failure)"
            } else {
                ""
            },
            rip,
            bytes,
        }
    }
}
