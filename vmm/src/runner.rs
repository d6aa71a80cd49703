//! Runs a built VM: one thread per vCPU, the main thread's event loop for
//! console input and the end of the VM, and optionally the control API.

use std::io::{IsTerminal, Read};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::signal::Killable;
use vmm_sys_util::terminal::Terminal;

use crate::affinity::{self, CpuSet, VcpuAffinity};
use crate::builder::Machine;
use crate::devices::LegacyDevices;
use crate::dirty::{self, DirtyError, DirtyOptions, DirtySource, DirtySourceKind};
use crate::vm::vcpu::{self, Vcpu, VcpuEvent};
use crate::vm::Vm;

/// Run state of the vCPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    Running,
    Paused,
    /// Paused after a migration whose outcome is unknown (the destination
    /// may be running the guest): only the operator's `resume` runs it here.
    Postmigrate,
    Stopping,
}

struct Shared {
    state: RunState,
    /// vCPU threads currently parked because of a pause.
    parked: usize,
    exit_status: Option<i32>,
    /// The operator paused the VM (API `pause`, `--paused`, or a migration
    /// that ended with its outcome unknown): internal pauses (migration,
    /// snapshot, throttle) then leave it paused when they are done.
    held: bool,
    /// The hold comes from a migration whose outcome is unknown.
    postmigrate: bool,
}

/// Who drives the VM's single KVM dirty log. KVM keeps one log per memslot,
/// so two users would steal each other's dirty bits (and one's `stop`
/// would switch off the other's logging): one at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrackingUser {
    Api,
    Migration,
    SnapshotChain,
}

impl std::fmt::Display for TrackingUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TrackingUser::Api => "dirty tracking started through the API (stop it with dirty-stop)",
            TrackingUser::Migration => "a migration in progress",
            TrackingUser::SnapshotChain => {
                "a diff-snapshot chain (its tracking runs until the VM ends)"
            }
        })
    }
}

/// Dirty tracking started through the API.
#[derive(Default)]
pub struct DirtyTracking {
    pub source: Option<Box<dyn DirtySource>>,
    pub rounds: u64,
    pub pages_total: u64,
    pub last_round_pages: u64,
}

/// Dirty tracking kept running between snapshots, so the next one can be a diff.
pub struct SnapshotChain {
    pub source: Box<dyn DirtySource>,
    /// Id (memory digest) of the last snapshot taken.
    pub last_id: String,
}

/// The handle the API and migration use to control a running VM.
pub struct VmControl {
    pub vm: Arc<Vm>,
    /// vCPUs; a vCPU thread holds its lock only while in `KVM_RUN`, so
    /// after `pause` the controller may lock them to save state.
    pub vcpus: Vec<Arc<Mutex<Vcpu>>>,
    pub devices: Arc<Mutex<LegacyDevices>>,
    pub cpu_profile: crate::arch::cpuid::CpuProfile,
    pub ring: Option<Arc<dirty::kvm_ring::RingCollector>>,
    pub dirty_options: DirtyOptions,
    pub dirty: Mutex<DirtyTracking>,
    pub snapshots: Mutex<Option<SnapshotChain>>,
    /// The one user of the dirty log, if any (see `TrackingUser`).
    tracking_user: Mutex<Option<TrackingUser>>,
    pub started: Instant,
    /// Host page-move counters at the start, for the triple-fault scan
    /// (`vm::fault_scan`; empty unless it is enabled).
    vmstat_at_start: std::collections::HashMap<String, u64>,
    pub vcpu_count: usize,
    shared: Mutex<Shared>,
    changed: Condvar,
    threads: Mutex<Vec<JoinHandle<()>>>,
    exit_evt: EventFd,
}

impl VmControl {
    /// Wraps a built machine; its vCPUs start when `run` is called.
    pub fn new(
        machine: Machine,
        dirty_options: DirtyOptions,
        cpu_profile: crate::arch::cpuid::CpuProfile,
        start_paused: bool,
    ) -> std::io::Result<Arc<Self>> {
        let Machine {
            vm,
            vcpus,
            devices,
            ring,
        } = machine;
        Ok(Arc::new(VmControl {
            vm,
            vcpu_count: vcpus.len(),
            vcpus: vcpus.into_iter().map(|v| Arc::new(Mutex::new(v))).collect(),
            devices,
            cpu_profile,
            ring,
            dirty_options,
            dirty: Mutex::new(DirtyTracking::default()),
            snapshots: Mutex::new(None),
            tracking_user: Mutex::new(None),
            started: Instant::now(),
            vmstat_at_start: if crate::vm::fault_scan::enabled() {
                crate::vm::fault_scan::vmstat()
            } else {
                Default::default()
            },
            shared: Mutex::new(Shared {
                state: if start_paused {
                    RunState::Paused
                } else {
                    RunState::Running
                },
                parked: 0,
                exit_status: None,
                held: start_paused,
                postmigrate: false,
            }),
            changed: Condvar::new(),
            threads: Mutex::new(Vec::new()),
            exit_evt: EventFd::new(EFD_NONBLOCK)?,
        }))
    }

    pub fn state(&self) -> RunState {
        let s = self.shared.lock().unwrap();
        match s.state {
            RunState::Paused if s.postmigrate => RunState::Postmigrate,
            st => st,
        }
    }

    /// Whether the operator holds the VM paused (internal resumes keep it so).
    pub fn held(&self) -> bool {
        self.shared.lock().unwrap().held
    }

    /// The operator's pause: it lasts until the operator's `resume`.
    pub fn operator_pause(&self) -> RunState {
        self.shared.lock().unwrap().held = true;
        self.pause()
    }

    /// The operator's resume: ends an operator hold or a postmigrate state.
    pub fn operator_resume(&self) -> RunState {
        let mut s = self.shared.lock().unwrap();
        s.held = false;
        s.postmigrate = false;
        drop(s);
        self.resume()
    }

    /// Keeps the VM paused after a migration whose outcome is unknown.
    pub fn hold_postmigrate(&self) {
        let mut s = self.shared.lock().unwrap();
        s.held = true;
        s.postmigrate = true;
    }

    /// Makes `user` the dirty log's only user, or says who already is.
    pub fn claim_tracking(&self, user: TrackingUser) -> Result<(), DirtyError> {
        let mut u = self.tracking_user.lock().unwrap();
        match *u {
            // A new full snapshot restarts the chain it already owns.
            Some(TrackingUser::SnapshotChain) if user == TrackingUser::SnapshotChain => Ok(()),
            Some(other) => Err(DirtyError::Config(format!(
                "dirty tracking is in use by {other}: one user at a time"
            ))),
            None => {
                *u = Some(user);
                Ok(())
            }
        }
    }

    /// Gives the dirty log back (only `user`'s own claim).
    pub fn release_tracking(&self, user: TrackingUser) {
        let mut u = self.tracking_user.lock().unwrap();
        if *u == Some(user) {
            *u = None;
        }
    }

    /// Stops every vCPU at its next exit and waits until all are parked.
    pub fn pause(&self) -> RunState {
        let mut s = self.shared.lock().unwrap();
        if s.state != RunState::Running {
            return s.state;
        }
        s.state = RunState::Paused;
        drop(s);
        self.kick_all();
        let mut s = self.shared.lock().unwrap();
        while s.state == RunState::Paused && s.parked < self.vcpu_count {
            s = self.changed.wait(s).unwrap();
        }
        s.state
    }

    /// Lets paused vCPUs run again, unless the operator holds them paused.
    pub fn resume(&self) -> RunState {
        let mut s = self.shared.lock().unwrap();
        if s.state == RunState::Paused && !s.held {
            s.state = RunState::Running;
            self.changed.notify_all();
        }
        s.state
    }

    /// Ends the VM with `status` (the first reason to end wins).
    pub fn stop(&self, status: i32) {
        let mut s = self.shared.lock().unwrap();
        if s.exit_status.is_none() {
            s.exit_status = Some(status);
        }
        s.state = RunState::Stopping;
        self.changed.notify_all();
        drop(s);
        self.kick_all();
        let _ = self.exit_evt.write(1);
    }

    fn kick_all(&self) {
        for t in self.threads.lock().unwrap().iter() {
            let _ = t.kill(vcpu::kick_signal());
        }
    }

    /// Starts dirty tracking with `kind`.
    pub fn dirty_start(&self, kind: DirtySourceKind) -> Result<(), DirtyError> {
        let mut d = self.dirty.lock().unwrap();
        if let Some(s) = &d.source {
            return Err(DirtyError::Config(format!(
                "dirty tracking already running ({})",
                s.kind()
            )));
        }
        self.claim_tracking(TrackingUser::Api)?;
        let started =
            dirty::create(kind, self.dirty_options, self.ring.clone()).and_then(|mut s| {
                dirty::reset_vmm_writes(&self.vm);
                s.start(&self.vm).map(|()| s)
            });
        let source = match started {
            Ok(s) => s,
            Err(e) => {
                self.release_tracking(TrackingUser::Api);
                return Err(e);
            }
        };
        *d = DirtyTracking {
            source: Some(source),
            ..Default::default()
        };
        Ok(())
    }

    /// One harvest round; returns the dirty bitmap.
    pub fn dirty_harvest(&self) -> Result<dirty::DirtyBitmap, DirtyError> {
        let mut d = self.dirty.lock().unwrap();
        let source = d
            .source
            .as_mut()
            .ok_or_else(|| DirtyError::Config("dirty tracking is not running".into()))?;
        let bitmap = dirty::harvest(source.as_mut(), &self.vm)?;
        let n = bitmap.count();
        d.rounds += 1;
        d.pages_total += n;
        d.last_round_pages = n;
        Ok(bitmap)
    }

    /// Stops dirty tracking.
    pub fn dirty_stop(&self) -> Result<(), DirtyError> {
        let mut d = self.dirty.lock().unwrap();
        match d.source.take() {
            Some(mut s) => {
                let stopped = s.stop(&self.vm);
                self.release_tracking(TrackingUser::Api);
                stopped
            }
            None => Err(DirtyError::Config("dirty tracking is not running".into())),
        }
    }

    /// Parks the calling vCPU thread while paused; false when stopping.
    fn wait_runnable(&self) -> bool {
        let mut s = self.shared.lock().unwrap();
        if s.state == RunState::Paused {
            s.parked += 1;
            self.changed.notify_all();
            while s.state == RunState::Paused {
                s = self.changed.wait(s).unwrap();
            }
            s.parked -= 1;
        }
        s.state == RunState::Running
    }
}

fn vcpu_thread(vcpu: Arc<Mutex<Vcpu>>, ctl: Arc<VmControl>) {
    while ctl.wait_runnable() {
        let result = vcpu
            .lock()
            .unwrap()
            .run_while(&|| ctl.state() == RunState::Running);
        match result {
            Ok(VcpuEvent::Reset) => {
                let status = ctl.devices.lock().unwrap().exit_status.unwrap_or(0);
                ctl.stop(status as i32);
            }
            Ok(VcpuEvent::GuestPanic) => {
                eprintln!(
                    "ldt-vmm: the guest kernel panicked (pvpanic event on port {:#x}); exit status {}",
                    crate::devices::pvpanic::PVPANIC_PORT,
                    crate::devices::GUEST_PANIC_STATUS
                );
                ctl.stop(crate::devices::GUEST_PANIC_STATUS);
            }
            Ok(VcpuEvent::FlatSync(_)) | Ok(VcpuEvent::Kicked) => {}
            Err(e) => {
                eprintln!("ldt-vmm: {e}");
                if matches!(e, crate::vm::vcpu::VcpuError::TripleFault { .. })
                    && crate::vm::fault_scan::enabled()
                {
                    let vm = &ctl.vm;
                    eprintln!(
                        "{}",
                        crate::vm::fault_scan::report(&vm.memory, &vm.slots, &ctl.vmstat_at_start)
                    );
                }
                ctl.stop(1);
            }
        }
    }
}

/// Feeds stdin to the UART and ends the loop when the VM ends.
struct ConsoleLoop {
    ctl: Arc<VmControl>,
    stdin_open: bool,
    done: bool,
}

const TOKEN_STDIN: u32 = 0;
const TOKEN_EXIT: u32 = 1;

impl MutEventSubscriber for ConsoleLoop {
    fn init(&mut self, ops: &mut EventOps) {
        if self.stdin_open {
            let stdin = std::io::stdin();
            let ev = Events::with_data_raw(stdin.as_raw_fd(), TOKEN_STDIN, EventSet::IN);
            if ops.add(ev).is_err() {
                // stdin that epoll refuses (a regular file, /dev/null) gives no input.
                self.stdin_open = false;
            }
        }
        ops.add(Events::with_data(
            &self.ctl.exit_evt,
            TOKEN_EXIT,
            EventSet::IN,
        ))
        .expect("epoll accepts an eventfd");
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_STDIN => {
                let mut buf = [0u8; 256];
                match std::io::stdin().lock().read(&mut buf) {
                    Ok(n) if n > 0 => self.ctl.devices.lock().unwrap().queue_input(&buf[..n]),
                    _ => {
                        let _ = ops.remove(events);
                    }
                }
            }
            _ => {
                let _ = self.ctl.exit_evt.read();
                self.done = true;
            }
        }
    }
}

/// Runs the VM until the guest resets or is shut down; returns the exit
/// status for the process. Each vCPU thread first restricts itself to its
/// set of `vcpu_cpus` (the other threads keep the mask they inherit).
pub fn run(ctl: Arc<VmControl>, vcpu_cpus: &VcpuAffinity) -> anyhow::Result<i32> {
    vcpu::register_kick_handler()?;
    let placement = (0..ctl.vcpus.len())
        .map(|i| {
            vcpu_cpus
                .for_vcpu(i, ctl.vcpus.len())
                .map(Option::<&CpuSet>::cloned)
        })
        .collect::<Result<Vec<_>, String>>()
        .map_err(anyhow::Error::msg)?;

    // KVM's own worker threads would otherwise start from a vCPU thread and
    // share its CPUs: this thread (on the VMM's) makes them first.
    if placement.iter().any(Option::is_some) {
        if let Some(v) = ctl.vcpus.first() {
            v.lock().unwrap().run_no_entry()?;
        }
    }
    let stdin = std::io::stdin();
    let raw = stdin.is_terminal() && stdin.lock().set_raw_mode().is_ok();
    // The list is held while spawning so that a pause or stop issued
    // meanwhile kicks every vCPU thread, not only those pushed so far.
    let mut threads = ctl.threads.lock().unwrap();
    for (i, (v, cpus)) in ctl.vcpus.iter().zip(placement).enumerate() {
        let (c, v) = (ctl.clone(), v.clone());
        let h = std::thread::Builder::new()
            .name(format!("vcpu{i}"))
            .spawn(move || {
                if let Some(cpus) = cpus {
                    if let Err(e) = affinity::pin_current_thread(&cpus) {
                        eprintln!("ldt-vmm: vCPU {i} cannot be placed on CPUs {cpus}: {e}");
                        c.stop(1);
                        return;
                    }
                }
                vcpu_thread(v, c)
            })?;
        threads.push(h);
    }
    drop(threads);

    let mut events = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new()?;
    let console = Arc::new(Mutex::new(ConsoleLoop {
        ctl: ctl.clone(),
        stdin_open: true,
        done: false,
    }));
    events.add_subscriber(console.clone());
    while !console.lock().unwrap().done {
        events.run()?;
    }
    if raw {
        let _ = stdin.lock().set_canon_mode();
    }
    let threads: Vec<_> = ctl.threads.lock().unwrap().drain(..).collect();
    for t in threads {
        let _ = t.join();
    }
    let status = ctl.shared.lock().unwrap().exit_status.unwrap_or(0);
    Ok(status)
}
