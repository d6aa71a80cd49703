//! The `ldt-vmm` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use ldt_vmm::affinity::{self, CpuSet, VcpuAffinity};
use ldt_vmm::api::{self, Request};
use ldt_vmm::arch::cpuid::CpuProfile;
use ldt_vmm::bench::migrate::{MigrateBenchConfig, Workload};
use ldt_vmm::bench::{self, DirtyBenchConfig};
use ldt_vmm::builder::{self, BootSource, VmResources};
use ldt_vmm::devices::console::ConsoleOut;
use ldt_vmm::dirty::{DirtyOptions, DirtySourceKind};
use ldt_vmm::loader::LinuxBoot;
use ldt_vmm::migration::destination;
use ldt_vmm::migration::report::DowntimeBreakdown;
use ldt_vmm::migration::snapshot::{self, SnapshotOptions};
use ldt_vmm::migration::source::{ConvergencePolicy, MigrateOptions};
use ldt_vmm::migration::transport::{Endpoint, Listener, TlsFiles};
use ldt_vmm::runner::{self, VmControl};
use ldt_vmm::vm::MemBacking;

/// Words every Linux guest gets: serial console, reset through the i8042
/// (which ends the VM), no PCI or modules to probe.
pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 pci=off nomodules i8042.noaux i8042.nomux i8042.dumbkbd";

#[derive(Parser)]
#[command(
    name = "ldt-vmm",
    version,
    about = "A small KVM VMM with dirty-page tracking for live migration",
    long_about = "ldt-vmm boots Linux guests (ELF vmlinux or bzImage) or flat test payloads on KVM,\n\
tracks the pages they dirty with KVM's dirty logs, and is controlled over a JSON API.\n\n\
Examples:\n  ldt-vmm run images/guest.img\n  ldt-vmm run --flat payload.bin\n  \
ldt-vmm run vmlinux --initrd initrd.cpio --mem 512 --vcpus 2 --api /tmp/vm.sock\n  \
ldt-vmm ctl --api /tmp/vm.sock status\n  ldt-vmm bench dirty --write-pages 4096"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a guest and run it until it powers off.
    #[command(
        after_help = "Examples:\n  ldt-vmm run images/guest.img --cmdline-append 'ldt.run=uname%20-a'\n  \
ldt-vmm run /boot/vmlinuz --initrd initrd.img --cpu-profile compat\n  \
ldt-vmm run --flat payload.bin   # payload built with: as --64 p.S -o p.o && ld -Ttext=0x100000 --oformat binary p.o -o payload.bin\n\n\
The process exits with the guest's status: 0 when it resets through the i8042, the byte it wrote to\n\
port 0x501 if any, 1 on a VMM or guest error (triple fault, KVM internal error)."
    )]
    Run(RunArgs),
    /// Live-migrate a running VM (through its API socket) to a waiting destination.
    #[command(after_help = "Example (destination first, then the source):\n  \
ldt-vmm run --incoming unix:/tmp/mig.sock --api /tmp/dst.sock\n  \
ldt-vmm migrate --api /tmp/src.sock --to unix:/tmp/mig.sock --dirty-source kvm-clear --verify --stats report.json\n\n\
Progress lines go to stderr, the JSON report to stdout (and --stats FILE). On failure the VM keeps\n\
running on the source and the exit status is 1.")]
    Migrate(MigrateArgs),
    /// Write a full snapshot of a running VM, or a diff against the last one.
    #[command(
        after_help = "Examples:\n  ldt-vmm snapshot --api /tmp/vm.sock --to full.snap\n  \
ldt-vmm snapshot --api /tmp/vm.sock --to diff1.snap --base full.snap\n  \
ldt-vmm run --restore full.snap diff1.snap\n\n\
A full snapshot starts dirty tracking (--dirty-source) so that the next snapshot can be a diff."
    )]
    Snapshot(SnapshotArgs),
    /// Send a command to a running VM's API socket and print the JSON answer.
    #[command(after_help = "Examples:\n  ldt-vmm ctl --api /tmp/vm.sock status\n  \
ldt-vmm ctl --api /tmp/vm.sock dirty-start kvm-ring\n  ldt-vmm ctl --api /tmp/vm.sock dirty-harvest")]
    Ctl(CtlArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Args)]
struct RunArgs {
    /// Linux kernel: ELF vmlinux (64-bit entry) or bzImage.
    #[arg(required_unless_present_any = ["flat", "incoming", "restore"], conflicts_with_all = ["flat", "incoming", "restore"])]
    kernel: Option<PathBuf>,
    /// Wait for a migrating VM on unix:PATH or tcp:HOST:PORT instead of booting
    /// (memory size, vCPUs and CPU profile come from the stream).
    #[arg(long, value_name = "URL", conflicts_with = "flat")]
    incoming: Option<Endpoint>,
    /// With --incoming: the longest a connected source may take for any one
    /// frame (a silent or trickling source then ends the migration).
    // clap does not check `requires` against an argument that conflicts
    // with one given (--incoming with --flat, a kernel or --restore): the
    // conflicts say it instead.
    #[arg(long, value_name = "S", default_value_t = destination::DEFAULT_FRAME_TIMEOUT.as_secs(),
          requires = "incoming", conflicts_with_all = ["kernel", "flat", "restore"])]
    incoming_timeout: u64,
    /// With --incoming: nice value (0-19) of the thread that receives the
    /// migration (the whole of it, switch-over included), so that whatever
    /// else runs on this host wins the CPUs over it; the vCPUs keep the
    /// VMM's priority.
    #[arg(long, value_name = "N", default_value_t = 0, requires = "incoming",
          conflicts_with_all = ["kernel", "flat", "restore"], value_parser = clap::value_parser!(u8).range(0..=19))]
    incoming_nice: u8,
    /// Restore from snapshot files: a full snapshot, then its diffs in order.
    #[arg(long, value_name = "FILE", num_args = 1.., conflicts_with_all = ["flat", "incoming"])]
    restore: Vec<PathBuf>,
    /// Start with the vCPUs paused (resume through the API).
    #[arg(long, requires = "api")]
    paused: bool,
    /// Boot a flat payload instead: loaded and entered at 0x100000 in 64-bit mode.
    #[arg(long, value_name = "FILE")]
    flat: Option<PathBuf>,
    /// Initramfs for the kernel.
    #[arg(long, value_name = "FILE")]
    initrd: Option<PathBuf>,
    /// Replace the default kernel command line.
    #[arg(long, value_name = "STR", conflicts_with = "cmdline_append")]
    cmdline: Option<String>,
    /// Words to add to the default kernel command line.
    #[arg(long, value_name = "STR")]
    cmdline_append: Option<String>,
    /// Guest RAM in MiB (a multiple of 2).
    #[arg(long, default_value_t = 256, value_name = "MIB")]
    mem: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Allow guest RAM (from --mem, a migration stream or a snapshot) up to this
    /// host's physical memory plus PERCENT of it (default: no more than the RAM).
    #[arg(long, default_value_t = 0, value_name = "PERCENT")]
    mem_overcommit: u64,
    /// What backs guest RAM on this host: anon (4 KiB pages), thp (transparent huge
    /// pages: 2 MiB-aligned, MADV_HUGEPAGE) or hugetlbfs (2 MiB pages reserved from
    /// /proc/sys/vm/nr_hugepages up front). Also for --incoming and --restore: the
    /// backing is this host's choice, not the source's.
    #[arg(long, value_enum, default_value_t = MemBacking::Anon, value_name = "BACKING")]
    mem_backing: MemBacking,
    /// Serve the JSON control API on this unix socket (created 0600: whoever
    /// may connect controls the VM and may write files as this process).
    #[arg(long, value_name = "SOCKET")]
    api: Option<PathBuf>,
    /// Close an API connection that sends no complete request for this long.
    #[arg(long, default_value_t = 60, value_name = "S")]
    api_idle_timeout_s: u64,
    /// Give the guest the ldt-pv paravirtual dirty-tracking device (platform
    /// CPUID leaf 0x40000102), so a guest driver can feed `--dirty-source
    /// guest-ldt`. A VM migrated or restored keeps it (it is VM config).
    #[arg(long, conflicts_with_all = ["incoming", "restore"])]
    ldt_pv: bool,
    /// Check every guest-ldt session of this VM against KVM's dirty log
    /// (which then runs beside the pre-copy rounds: a test mode): a
    /// migration fails when KVM saw a write that no guest report has.
    #[arg(long, requires = "ldt_pv")]
    ldt_pv_audit: bool,
    /// Host CPUs the vCPU threads run on ("0-3,8", as in Cpus_allowed_list):
    /// given once, every vCPU; given once per vCPU, the Nth for vCPU N-1.
    /// With --incoming, once (the vCPU count comes from the stream).
    #[arg(long, value_name = "LIST", action = clap::ArgAction::Append)]
    vcpu_cpus: Vec<CpuSet>,
    /// Host CPUs every other thread of the VMM runs on (API, migration,
    /// console, and everything they start): libvirt's emulatorpin.
    #[arg(long, value_name = "LIST")]
    vmm_cpus: Option<CpuSet>,
    /// CPU features: `compat` hides what this project's PVM hosts cannot emulate.
    /// Default: compat where /sys/module/kvm_pvm exists, host elsewhere.
    #[arg(long, value_enum)]
    cpu_profile: Option<CpuProfile>,
    #[command(flatten)]
    dirty: DirtyArgs,
    #[command(flatten)]
    tls: TlsArgs,
}

#[derive(Args, Clone)]
struct TlsArgs {
    /// TLS with mutual authentication on a tcp: endpoint: this side's certificate
    /// chain (PEM). The peer must present one signed by --tls-ca.
    #[arg(long, value_name = "PEM", requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<PathBuf>,
    /// This side's private key (PEM).
    #[arg(long, value_name = "PEM", requires_all = ["tls_cert", "tls_ca"])]
    tls_key: Option<PathBuf>,
    /// The CA certificate(s) (PEM) the peer's certificate must be signed by.
    #[arg(long, value_name = "PEM", requires_all = ["tls_cert", "tls_key"])]
    tls_ca: Option<PathBuf>,
}

impl TlsArgs {
    /// `ep`, with TLS if the options ask for it (absolute paths: the source
    /// VMM reads them, from its own working directory).
    fn apply(&self, ep: Endpoint) -> anyhow::Result<Endpoint> {
        let (Some(cert), Some(key), Some(ca)) = (&self.tls_cert, &self.tls_key, &self.tls_ca)
        else {
            return Ok(ep);
        };
        let files = TlsFiles {
            cert: std::path::absolute(cert)?,
            key: std::path::absolute(key)?,
            ca: std::path::absolute(ca)?,
        };
        ep.with_tls(files).map_err(anyhow::Error::msg)
    }
}

#[derive(Args, Clone, Copy)]
struct DirtyArgs {
    /// Enable KVM's dirty ring with this many entries per vCPU (needed for the
    /// kvm-ring source; it must exist before the vCPUs and then replaces the bitmap sources).
    #[arg(long, value_name = "ENTRIES")]
    dirty_ring: Option<u32>,
    /// kvm-clear: pages per KVM_CLEAR_DIRTY_LOG call (multiple of 64; default 1 GiB worth).
    #[arg(long, default_value_t = DirtyOptions::default().clear_chunk_pages, value_name = "PAGES")]
    clear_chunk_pages: u64,
    /// kvm-clear: do not use KVM_DIRTY_LOG_INITIALLY_SET.
    #[arg(long)]
    no_initially_set: bool,
}

impl DirtyArgs {
    fn options(&self) -> DirtyOptions {
        DirtyOptions {
            clear_chunk_pages: self.clear_chunk_pages,
            initially_set: !self.no_initially_set,
            ring_entries: self
                .dirty_ring
                .unwrap_or(DirtyOptions::default().ring_entries),
        }
    }
}

#[derive(Args)]
struct MigrateArgs {
    /// The source VM's API socket.
    #[arg(long, value_name = "SOCKET")]
    api: PathBuf,
    /// Destination: unix:PATH or tcp:HOST:PORT.
    #[arg(long, value_name = "URL")]
    to: Endpoint,
    /// How the source learns which pages the guest dirtied.
    #[arg(long, value_enum, default_value_t = DirtySourceKind::KvmBitmap)]
    dirty_source: DirtySourceKind,
    /// Switch over once the rest can be sent within this downtime.
    #[arg(long, default_value_t = 300, value_name = "MS")]
    downtime_ms: u64,
    /// Rounds after round 0 before --policy applies.
    #[arg(long, default_value_t = 30, value_name = "N")]
    max_rounds: u32,
    /// Seconds before --policy applies.
    #[arg(long, default_value_t = 300, value_name = "S")]
    timeout_s: u64,
    /// What to do when rounds or time run out: cancel (VM stays here) or force.
    #[arg(long, value_enum, default_value_t = ConvergencePolicy::Cancel)]
    policy: ConvergencePolicy,
    /// Cap on the transfer rate.
    #[arg(long, value_name = "MBPS")]
    bandwidth_limit: Option<u64>,
    /// Compare a digest of all guest memory on both sides before resuming.
    #[arg(long)]
    verify: bool,
    /// Throttle the vCPUs (20%, then +10% a round, up to 90%) while rounds do not converge.
    #[arg(long)]
    auto_converge: bool,
    /// Nice value (0-19) of the thread that sends the rounds while the guest
    /// runs, so that the guest's vCPUs win the CPUs over it; the switch-over
    /// runs at the VMM's own priority.
    #[arg(long, value_name = "N", default_value_t = 0,
          value_parser = clap::value_parser!(u8).range(0..=19))]
    precopy_nice: u8,
    /// Also write the JSON report to this file.
    #[arg(long, value_name = "FILE")]
    stats: Option<PathBuf>,
    /// Start the migration and return at once (follow it with
    /// `ctl migrate-status`, stop it with `ctl migrate-cancel`).
    #[arg(long, conflicts_with = "stats")]
    detach: bool,
    #[command(flatten)]
    tls: TlsArgs,
}

#[derive(Args)]
struct SnapshotArgs {
    /// The VM's API socket.
    #[arg(long, value_name = "SOCKET")]
    api: PathBuf,
    /// Snapshot file to write.
    #[arg(long, value_name = "FILE")]
    to: PathBuf,
    /// Write only what changed since this snapshot (the VM's last one).
    #[arg(long, value_name = "FILE")]
    base: Option<PathBuf>,
    /// Dirty source that tracks changes for the next diff.
    #[arg(long, value_enum, default_value_t = DirtySourceKind::KvmBitmap)]
    dirty_source: DirtySourceKind,
}

#[derive(Args)]
struct CtlArgs {
    /// The VM's API socket.
    #[arg(long, value_name = "SOCKET")]
    api: PathBuf,
    #[command(subcommand)]
    request: CtlRequest,
}

#[derive(Subcommand)]
enum CtlRequest {
    /// Run state, vCPUs, memory, uptime.
    Status,
    /// Stop all vCPUs.
    Pause,
    /// Resume paused vCPUs.
    Resume,
    /// End the VM (exit status 0).
    Shutdown,
    /// Start dirty tracking with a source.
    DirtyStart {
        #[arg(value_enum)]
        source: DirtySourceKind,
    },
    /// Harvest one round of dirty pages and print how many (and the time).
    DirtyHarvest {
        /// A file of `FIRST_FRAME COUNT` lines whose pages must all be in
        /// the harvest: the answer counts those that are not.
        #[arg(long, value_name = "FILE")]
        expect: Option<PathBuf>,
    },
    /// Stop dirty tracking.
    DirtyStop,
    /// Counters of the current dirty-tracking session.
    DirtyStats,
    /// SHA-256 of all guest memory (vCPUs paused meanwhile).
    MemoryDigest,
    /// State, progress and outcome of the migration started last.
    MigrateStatus,
    /// Stop the running migration (before its commit); the VM keeps running here.
    MigrateCancel,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Guest write cost and harvest cost under each dirty source, side by side
    /// (a flat ring-3 writer; with a Linux guest: scripts/bench-dirty-nested.sh).
    #[command(
        after_help = "Example:\n  ldt-vmm bench dirty --working-set-pages 16384 --write-pages 16384 --bytes 1 --json\n\n\
                      With a Linux guest (ldt-writer in images/guest.img, tracked through the API, in the\n\
                      nested machine where the guest's dirty bits are hardware's):\n  \
                      scripts/bench-dirty-nested.sh --rounds 7 --ws 8192"
    )]
    Dirty(DirtyBenchArgs),
    /// Whole live migrations of the same flat guest with each dirty source.
    #[command(after_help = "Example:\n  ldt-vmm bench migrate --workload slow --json")]
    Migrate(MigrateBenchArgs),
}

#[derive(Args)]
struct MigrateBenchArgs {
    /// Guest workload: slow converges, fast never does (forced switch-over).
    #[arg(long, value_enum, default_value_t = Workload::Slow)]
    workload: Workload,
    /// Downtime target.
    #[arg(long, default_value_t = 300)]
    downtime_ms: u64,
    /// Rounds before forcing the switch-over.
    #[arg(long, default_value_t = 10)]
    max_rounds: u32,
    /// Transfer cap in MB/s.
    #[arg(long)]
    bandwidth_limit: Option<u64>,
    /// Throttle vCPUs while rounds do not converge.
    #[arg(long)]
    auto_converge: bool,
    /// Compare plain TCP with TLS (kvm-bitmap, throwaway certificates) instead.
    #[arg(long)]
    tls: bool,
    #[command(flatten)]
    backings: BackingRuns,
    /// Also print one JSON line per mode.
    #[arg(long)]
    json: bool,
}

/// The backings a benchmark compares and how often (bench dirty, migrate).
#[derive(Args)]
struct BackingRuns {
    /// Guest RAM backings to compare, side by side (e.g. anon,thp,hugetlbfs;
    /// hugetlbfs needs free pages in /proc/sys/vm/nr_hugepages: 128 per
    /// 256 MiB VM, and bench migrate runs two).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "anon",
        value_name = "BACKING,..."
    )]
    mem_backing: Vec<MemBacking>,
    /// Runs of every mode on every backing (interleaved), for p50/p95.
    #[arg(long, default_value_t = 1)]
    runs: u32,
}

#[derive(Args)]
struct DirtyBenchArgs {
    /// Working-set size S in 4 KiB pages.
    #[arg(long, default_value_t = 16384)]
    working_set_pages: u64,
    /// Pages W written per round (a random subset of the working set).
    #[arg(long, default_value_t = 16384)]
    write_pages: u64,
    /// Bytes written per page: 1 or 4096 (any 1..=4096 works).
    #[arg(long, default_value_t = 1)]
    bytes: u32,
    /// Measured rounds per mode.
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// Seed of the page choice.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Dirty-ring entries for kvm-ring.
    #[arg(long, default_value_t = 65536)]
    ring_entries: u32,
    #[command(flatten)]
    backings: BackingRuns,
    /// Also print one JSON line per mode.
    #[arg(long)]
    json: bool,
}

fn run(args: RunArgs) -> anyhow::Result<i32> {
    let vcpu_cpus = place_threads(&args)?;
    let profile = args.cpu_profile.unwrap_or_else(CpuProfile::detect);
    let options = args.dirty.options();
    ldt_vmm::vm::memory::set_overcommit_percent(args.mem_overcommit);
    let incoming = args
        .incoming
        .clone()
        .map(|ep| args.tls.apply(ep))
        .transpose()?;
    if incoming.is_none() && args.tls.tls_cert.is_some() {
        anyhow::bail!("--tls-cert/--tls-key/--tls-ca apply to --incoming tcp: only");
    }
    let ctl = if let Some(ep) = &incoming {
        let listener = Listener::bind(ep).with_context(|| format!("cannot listen on {ep}"))?;
        eprintln!("ldt-vmm: waiting for a migration on {ep}");
        let (hello, machine) = destination::incoming(
            &listener,
            ConsoleOut::Stdout,
            args.dirty.dirty_ring,
            args.mem_backing,
            std::time::Duration::from_secs(args.incoming_timeout),
            args.incoming_nice,
        )
        .context("incoming migration failed")?;
        VmControl::new(machine, options, hello.cpu_profile, args.paused)?
    } else if !args.restore.is_empty() {
        let (hello, machine) = snapshot::restore(
            &args.restore,
            ConsoleOut::Stdout,
            args.dirty.dirty_ring,
            args.mem_backing,
        )
        .context("restore failed")?;
        VmControl::new(machine, options, hello.cpu_profile, args.paused)?
    } else {
        let machine = builder::build(&resources(&args, profile)?)?;
        if let Some(d) = &machine.vm.ldt_pv {
            d.set_audit(args.ldt_pv_audit);
        }
        VmControl::new(machine, options, profile, args.paused)?
    };
    let _api = match &args.api {
        Some(path) => Some(
            api::serve_with(
                path,
                ctl.clone(),
                api::ApiLimits {
                    idle: std::time::Duration::from_secs(args.api_idle_timeout_s.max(1)),
                    ..Default::default()
                },
            )
            .with_context(|| format!("API socket {}", path.display()))?,
        ),
        None => None,
    };
    runner::run(ctl, &vcpu_cpus)
}

/// Checks `--vcpu-cpus` and `--vmm-cpus` against the CPUs this process may
/// use and moves this thread, before it starts any other, to `--vmm-cpus`;
/// the vCPU threads place themselves when they start.
fn place_threads(args: &RunArgs) -> anyhow::Result<VcpuAffinity> {
    let allowed = affinity::current_thread().context("sched_getaffinity")?;
    for set in &args.vcpu_cpus {
        set.check_within(&allowed)
            .map_err(|e| anyhow::anyhow!("--vcpu-cpus {set}: {e}"))?;
    }
    if args.incoming.is_some() && args.vcpu_cpus.len() > 1 {
        anyhow::bail!("--incoming takes --vcpu-cpus once (the vCPU count comes from the stream)");
    }
    let vcpus = VcpuAffinity::new(args.vcpu_cpus.clone());
    if args.incoming.is_none() && args.restore.is_empty() {
        vcpus
            .for_vcpu(0, args.vcpus.into())
            .map_err(anyhow::Error::msg)?;
    }
    if let Some(set) = &args.vmm_cpus {
        set.check_within(&allowed)
            .map_err(|e| anyhow::anyhow!("--vmm-cpus {set}: {e}"))?;
        affinity::pin_current_thread(set).with_context(|| format!("--vmm-cpus {set}"))?;
    }
    Ok(vcpus)
}

fn resources(args: &RunArgs, profile: CpuProfile) -> anyhow::Result<VmResources> {
    let boot = match (&args.flat, &args.kernel) {
        (Some(f), _) => BootSource::Flat(f.clone()),
        (None, Some(k)) => {
            let mut cmdline = args
                .cmdline
                .clone()
                .unwrap_or_else(|| DEFAULT_CMDLINE.to_string());
            for w in profile.kernel_cmdline_words() {
                cmdline.push(' ');
                cmdline.push_str(w);
            }
            if let Some(extra) = &args.cmdline_append {
                cmdline.push(' ');
                cmdline.push_str(extra);
            }
            BootSource::Linux(LinuxBoot {
                kernel: k.clone(),
                initrd: args.initrd.clone(),
                cmdline,
            })
        }
        (None, None) => anyhow::bail!("give a kernel, --flat FILE or --incoming URL"),
    };
    Ok(VmResources {
        mem_mib: args.mem,
        vcpus: args.vcpus,
        cpu_profile: profile,
        boot,
        dirty_ring_entries: args.dirty.dirty_ring,
        console: ConsoleOut::Stdout,
        mem_backing: args.mem_backing,
        ldt_pv: args.ldt_pv,
    })
}

fn migrate(a: MigrateArgs) -> anyhow::Result<i32> {
    let opts = MigrateOptions {
        to: a.tls.apply(a.to)?,
        dirty_source: a.dirty_source,
        downtime_ms: a.downtime_ms,
        max_rounds: a.max_rounds,
        timeout_s: a.timeout_s,
        policy: a.policy,
        bandwidth_limit_mbps: a.bandwidth_limit,
        verify: a.verify,
        auto_converge: a.auto_converge,
        precopy_nice: a.precopy_nice,
    };
    if a.detach {
        let resp = api::call(&a.api, &Request::Migrate(opts))?;
        println!("{}", serde_json::to_string(&resp)?);
        return Ok(if resp.ok { 0 } else { 1 });
    }
    let mut show = |p: &ldt_vmm::migration::report::Progress| eprintln!("{}", p.line());
    let resp = api::migrate_and_wait(&a.api, &opts, &mut show)?;
    if !resp.ok {
        anyhow::bail!("{}", resp.error.unwrap_or_default());
    }
    if let Some(b) = resp
        .result
        .as_ref()
        .and_then(|r| r.get("downtime_breakdown"))
        .and_then(|b| serde_json::from_value::<DowntimeBreakdown>(b.clone()).ok())
    {
        eprintln!("{}", b.line());
    }
    let report = serde_json::to_string_pretty(&resp.result)?;
    println!("{report}");
    if let Some(f) = &a.stats {
        std::fs::write(f, &report).with_context(|| format!("cannot write {}", f.display()))?;
    }
    let missed = resp
        .result
        .as_ref()
        .and_then(|r| r["verify_mismatch_pages"].as_u64())
        .unwrap_or(0);
    if missed > 0 {
        eprintln!(
            "ldt-vmm: verify FAILED: {missed} pages differ from what was sent (the dirty source missed writes); the guest runs on the destination"
        );
        return Ok(3);
    }
    Ok(0)
}

fn ctl(args: CtlArgs) -> anyhow::Result<i32> {
    let req = match args.request {
        CtlRequest::Status => Request::Status,
        CtlRequest::Pause => Request::Pause,
        CtlRequest::Resume => Request::Resume,
        CtlRequest::Shutdown => Request::Shutdown,
        CtlRequest::DirtyStart { source } => Request::DirtyStart { source },
        CtlRequest::DirtyHarvest { expect } => Request::DirtyHarvest {
            // The VMM reads it: make a relative path the caller's.
            expect: expect.map(std::path::absolute).transpose()?,
        },
        CtlRequest::DirtyStop => Request::DirtyStop,
        CtlRequest::DirtyStats => Request::DirtyStats,
        CtlRequest::MemoryDigest => Request::MemoryDigest,
        CtlRequest::MigrateStatus => Request::MigrateStatus,
        CtlRequest::MigrateCancel => Request::MigrateCancel,
    };
    let resp = api::call(&args.api, &req)?;
    println!("{}", serde_json::to_string(&resp)?);
    Ok(if resp.ok { 0 } else { 1 })
}

fn bench_migrate(a: MigrateBenchArgs) -> anyhow::Result<i32> {
    let cfg = MigrateBenchConfig {
        workload: a.workload,
        downtime_ms: a.downtime_ms,
        max_rounds: a.max_rounds,
        bandwidth_limit_mbps: a.bandwidth_limit,
        auto_converge: a.auto_converge,
        tls: a.tls,
        mem_backing: a.backings.mem_backing.first().copied().unwrap_or_default(),
    };
    if a.backings.mem_backing.len() > 1 || a.backings.runs > 1 {
        let (_, sums) = bench::migrate::compare(&cfg, &a.backings.mem_backing, a.backings.runs)
            .context("migration benchmark")?;
        print!(
            "{}",
            bench::migrate::compare_table(&cfg, a.backings.runs, &sums)
        );
        if a.json {
            for r in &sums {
                println!(
                    "{}",
                    serde_json::json!({ "bench": "migrate-backing", "config": cfg, "runs": a.backings.runs, "result": r })
                );
            }
        }
        return Ok(0);
    }
    let results = bench::migrate::migrate(&cfg).context("migration benchmark")?;
    print!("{}", bench::migrate::table(&cfg, &results));
    if a.json {
        for r in &results {
            println!(
                "{}",
                serde_json::json!({ "bench": "migrate", "config": cfg, "result": r })
            );
        }
    }
    Ok(0)
}

fn snapshot_cmd(a: SnapshotArgs) -> anyhow::Result<i32> {
    let opts = SnapshotOptions {
        to: std::path::absolute(&a.to)?,
        base: a.base.as_ref().map(std::path::absolute).transpose()?,
        dirty_source: a.dirty_source,
    };
    let resp = api::call(&a.api, &Request::Snapshot(opts))?;
    if !resp.ok {
        anyhow::bail!("{}", resp.error.unwrap_or_default());
    }
    println!("{}", serde_json::to_string(&resp.result)?);
    Ok(0)
}

fn bench_dirty(a: DirtyBenchArgs) -> anyhow::Result<i32> {
    anyhow::ensure!(
        a.write_pages <= a.working_set_pages,
        "--write-pages must not exceed --working-set-pages"
    );
    anyhow::ensure!((1..=4096).contains(&a.bytes), "--bytes must be 1..=4096");
    let cfg = DirtyBenchConfig {
        working_set_pages: a.working_set_pages,
        write_pages: a.write_pages,
        bytes_per_page: a.bytes,
        rounds: a.rounds,
        seed: a.seed,
        ring_entries: a.ring_entries,
        mem_backing: a.backings.mem_backing.first().copied().unwrap_or_default(),
    };
    if a.backings.mem_backing.len() > 1 || a.backings.runs > 1 {
        let (results, sums) = bench::dirty::compare(&cfg, &a.backings.mem_backing, a.backings.runs)
            .context("dirty benchmark")?;
        print!(
            "{}",
            bench::dirty::compare_table(&cfg, a.backings.runs, &sums)
        );
        if a.json {
            for r in &sums {
                println!(
                    "{}",
                    serde_json::json!({ "bench": "dirty-backing", "config": cfg, "runs": a.backings.runs, "result": r })
                );
            }
        }
        return Ok(if results.iter().any(|r| r.missed > 0) {
            1
        } else {
            0
        });
    }
    let results = bench::dirty::dirty(&cfg).context("dirty benchmark")?;
    print!("{}", bench::dirty::table(&cfg, &results));
    if a.json {
        for r in &results {
            println!(
                "{}",
                serde_json::json!({ "bench": "dirty", "config": cfg, "result": r })
            );
        }
    }
    Ok(if results.iter().any(|r| r.missed > 0) {
        1
    } else {
        0
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(a) => run(a),
        Command::Ctl(a) => ctl(a),
        Command::Migrate(a) => migrate(a),
        Command::Snapshot(a) => snapshot_cmd(a),
        Command::Bench(BenchCommand::Dirty(a)) => bench_dirty(a),
        Command::Bench(BenchCommand::Migrate(a)) => bench_migrate(a),
    };
    match result {
        Ok(status) => ExitCode::from(status.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("ldt-vmm: {e:#}");
            ExitCode::from(1)
        }
    }
}
