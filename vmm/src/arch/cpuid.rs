//! CPUID table for the guest: KVM's supported CPUID filtered by a CPU profile.
//!
//! `compat` exists for this project's PVM hosts, whose instruction emulator
//! interprets guest ring-0 code and cannot emulate some instructions
//! (`cmpxchg16b`, `xrstor`, `popcnt`, `clac`, ...): the features that make a
//! kernel use them are hidden, and `kernel_cmdline_words` adds the boot
//! parameters for those a kernel does not take from CPUID alone.

use kvm_bindings::kvm_cpuid_entry2;

/// Which CPU features the guest sees.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum CpuProfile {
    /// Everything KVM supports.
    Host,
    /// KVM's features minus what this project's PVM host cannot emulate.
    Compat,
}

impl CpuProfile {
    /// `compat` where the host runs `kvm_pvm`, `host` elsewhere.
    pub fn detect() -> Self {
        if std::path::Path::new("/sys/module/kvm_pvm").exists() {
            CpuProfile::Compat
        } else {
            CpuProfile::Host
        }
    }

    /// Kernel command-line words this profile needs.
    pub fn kernel_cmdline_words(self) -> &'static [&'static str] {
        match self {
            CpuProfile::Host => &[],
            // X86_FEATURE_SMAP (9*32+20), SMEP (9*32+7) and POPCNT (4*32+23)
            // leak through the CPUID masks on PVM, so clear them by number.
            // pvm_interp_compat turns on the project's guest patch that
            // completes user-mode SYSCALLs (guest-kernel-patch/pvm-*);
            // other kernels pass the unknown word on to init, harmlessly.
            CpuProfile::Compat => &["noxsave", "clearcpuid=308,295,151", "pvm_interp_compat"],
        }
    }
}

/// A CPUID register of one leaf/subleaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reg {
    Ebx,
    Ecx,
    Edx,
}

/// (leaf, subleaf or None for all, register, bits to clear).
type Mask = (u32, Option<u32>, Reg, u32);

const fn bits(list: &[u32]) -> u32 {
    let mut m = 0;
    let mut i = 0;
    while i < list.len() {
        m |= 1 << list[i];
        i += 1;
    }
    m
}

/// Features hidden by the `compat` profile.
const COMPAT_MASKS: &[Mask] = &[
    // Leaf 1 ECX: FMA 12, CX16 13, PCID 17, MOVBE 22, POPCNT 23, XSAVE 26,
    // OSXSAVE 27, AVX 28, F16C 29, RDRAND 30.
    (
        1,
        None,
        Reg::Ecx,
        bits(&[12, 13, 17, 22, 23, 26, 27, 28, 29, 30]),
    ),
    // Leaf 7.0 EBX: FSGSBASE 0, BMI1 3, HLE 4, AVX2 5, SMEP 7, BMI2 8,
    // INVPCID 10, RTM 11, MPX 14, AVX512F 16, AVX512DQ 17, RDSEED 18, ADX 19,
    // SMAP 20, AVX512IFMA 21, CLFLUSHOPT 23, CLWB 24, AVX512PF 26, AVX512ER 27,
    // AVX512CD 28, SHA 29, AVX512BW 30, AVX512VL 31.
    (
        7,
        Some(0),
        Reg::Ebx,
        bits(&[
            0, 3, 4, 5, 7, 8, 10, 11, 14, 16, 17, 18, 19, 20, 21, 23, 24, 26, 27, 28, 29, 30, 31,
        ]),
    ),
    // Leaf 7.0 ECX: AVX512VBMI 1, UMIP 2, PKU 3, OSPKE 4, WAITPKG 5,
    // AVX512VBMI2 6, CET_SS 7, GFNI 8, VAES 9, VPCLMULQDQ 10, AVX512VNNI 11,
    // AVX512BITALG 12, AVX512VPOPCNTDQ 14, LA57 16, RDPID 22, MOVDIRI 27,
    // MOVDIR64B 28, ENQCMD 29.
    (
        7,
        Some(0),
        Reg::Ecx,
        bits(&[
            1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 22, 27, 28, 29,
        ]),
    ),
    // Leaf 7.0 EDX: AVX512_4VNNIW 2, AVX512_4FMAPS 3, FSRM 4, AVX512_VP2INTERSECT 8,
    // SERIALIZE 14, TSXLDTRK 16, CET_IBT 20, AMX 22/24, AVX512_FP16 23.
    (
        7,
        Some(0),
        Reg::Edx,
        bits(&[2, 3, 4, 8, 14, 16, 20, 22, 23, 24]),
    ),
    // Extended leaf 0x80000001 ECX: ABM/LZCNT 5, SSE4A 6, XOP 11, FMA4 16, TBM 21.
    (0x8000_0001, None, Reg::Ecx, bits(&[5, 6, 11, 16, 21])),
    // Extended leaf 0x80000001 EDX: RDTSCP 27 (its TSC_AUX read needs MSR emulation).
    (0x8000_0001, None, Reg::Edx, bits(&[27])),
];

/// Leaves removed entirely by `compat`: XSAVE state (0xd) and leaf 7.1 (AVX-VNNI, ...).
fn compat_drops(e: &kvm_cpuid_entry2) -> bool {
    e.function == 0xd || (e.function == 7 && e.index >= 1)
}

/// Applies `profile` to KVM's supported CPUID entries.
pub fn filter(entries: &mut Vec<kvm_cpuid_entry2>, profile: CpuProfile) {
    for e in entries.iter_mut() {
        // Leaf 1 ECX bit 31: tell the guest it runs under a hypervisor.
        if e.function == 1 {
            e.ecx |= 1 << 31;
        }
    }
    if profile == CpuProfile::Host {
        return;
    }
    entries.retain(|e| !compat_drops(e));
    for e in entries.iter_mut() {
        for &(leaf, sub, reg, mask) in COMPAT_MASKS {
            if e.function == leaf && sub.is_none_or(|s| s == e.index) {
                match reg {
                    Reg::Ebx => e.ebx &= !mask,
                    Reg::Ecx => e.ecx &= !mask,
                    Reg::Edx => e.edx &= !mask,
                }
            }
        }
    }
}

/// First of ldt-vmm's own hypervisor CPUID leaves (after KVM's at
/// 0x40000000), by which the guest finds the devices ACPI would describe
/// elsewhere (README "Guest panics: pvpanic and the platform CPUID leaf"):
/// `PLATFORM_LEAF`: EAX = highest leaf of the range, EBX/ECX/EDX = the
/// signature; `PLATFORM_LEAF + 1`: EAX = `PLATFORM_VERSION`, EBX = feature
/// bits, ECX[15:0] = the pvpanic port when `FEATURE_PVPANIC`;
/// `LDT_PV_LEAF`: the ldt-pv device (`devices::ldt_pv`), all zero without it.
pub const PLATFORM_LEAF: u32 = 0x4000_0100;
/// The ldt-pv leaf: EAX = protocol version, EBX = bitmap GPA >> 12, ECX =
/// frames the bitmap covers, EDX[15:0] = port base, EDX[23:16] = ISA IRQ.
pub const LDT_PV_LEAF: u32 = PLATFORM_LEAF + 2;
/// The highest leaf of the range.
pub const PLATFORM_MAX_LEAF: u32 = LDT_PV_LEAF;
/// In EBX, ECX, EDX of `PLATFORM_LEAF`, little-endian, 4 bytes each.
pub const PLATFORM_SIGNATURE: &[u8; 12] = b"ldt-vmm-plat";
/// Version of the feature word; new features take new bits, never new meanings.
pub const PLATFORM_VERSION: u32 = 1;
/// Feature bit: a pvpanic device at the port in ECX[15:0].
pub const FEATURE_PVPANIC: u32 = 1 << 0;
/// Feature bit: the ldt-pv paravirtual dirty-tracking device (`LDT_PV_LEAF`).
pub const FEATURE_LDT_PV: u32 = 1 << 1;

/// What the ldt-pv leaf announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LdtPvLeaf {
    pub version: u32,
    pub bitmap_gpa: u64,
    pub frames: u32,
    pub port: u16,
    pub irq: u8,
}

/// Adds the platform leaves (replacing any KVM reported there), with the
/// ldt-pv leaf filled in when the VM has the device.
pub fn add_platform_leaves(entries: &mut Vec<kvm_cpuid_entry2>, ldt_pv: Option<LdtPvLeaf>) {
    entries.retain(|e| !(PLATFORM_LEAF..=PLATFORM_MAX_LEAF).contains(&e.function));
    let word = |i: usize| u32::from_le_bytes(PLATFORM_SIGNATURE[i..i + 4].try_into().unwrap());
    entries.push(kvm_cpuid_entry2 {
        function: PLATFORM_LEAF,
        eax: PLATFORM_MAX_LEAF,
        ebx: word(0),
        ecx: word(4),
        edx: word(8),
        ..Default::default()
    });
    let features = FEATURE_PVPANIC | if ldt_pv.is_some() { FEATURE_LDT_PV } else { 0 };
    entries.push(kvm_cpuid_entry2 {
        function: PLATFORM_LEAF + 1,
        eax: PLATFORM_VERSION,
        ebx: features,
        ecx: crate::devices::pvpanic::PVPANIC_PORT as u32,
        ..Default::default()
    });
    let l = ldt_pv.unwrap_or(LdtPvLeaf {
        version: 0,
        bitmap_gpa: 0,
        frames: 0,
        port: 0,
        irq: 0,
    });
    entries.push(kvm_cpuid_entry2 {
        function: LDT_PV_LEAF,
        eax: l.version,
        ebx: (l.bitmap_gpa >> 12) as u32,
        ecx: l.frames,
        edx: l.port as u32 | (l.irq as u32) << 16,
        ..Default::default()
    });
}

/// Per-vCPU fields: initial APIC ID and the x2APIC topology leaves.
pub fn set_vcpu_identity(entries: &mut [kvm_cpuid_entry2], cpu_id: u8, vcpus: u8) {
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | ((vcpus as u32) << 16) | ((cpu_id as u32) << 24);
                if vcpus > 1 {
                    e.edx |= 1 << 28; // HTT: the logical-processor count is valid
                }
            }
            0xb | 0x1f => e.edx = cpu_id as u32,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    fn sample() -> Vec<kvm_cpuid_entry2> {
        vec![
            entry(0, 0, 0x756e_6547, 0x6c65_746e, 0x4965_6e69),
            entry(1, 0, 0, u32::MAX, u32::MAX),
            entry(7, 0, u32::MAX, u32::MAX, u32::MAX),
            entry(7, 1, u32::MAX, 0, 0),
            entry(0xd, 0, 7, 0, 0),
            entry(0xd, 1, 1, 0, 0),
            entry(0x8000_0001, 0, 0, u32::MAX, u32::MAX),
        ]
    }

    fn find(v: &[kvm_cpuid_entry2], f: u32, i: u32) -> Option<kvm_cpuid_entry2> {
        v.iter().copied().find(|e| e.function == f && e.index == i)
    }

    #[test]
    fn compat_hides_what_the_pvm_emulator_cannot_run() {
        let mut v = sample();
        filter(&mut v, CpuProfile::Compat);
        let l1 = find(&v, 1, 0).unwrap();
        for bit in [13, 23, 26, 27, 28, 17] {
            assert_eq!(l1.ecx & (1 << bit), 0, "leaf 1 ecx bit {bit}");
        }
        assert_ne!(l1.ecx & 1, 0, "SSE3 stays");
        assert_ne!(l1.ecx & (1 << 31), 0, "hypervisor bit");
        let l7 = find(&v, 7, 0).unwrap();
        for bit in [0, 5, 7, 10, 16, 20, 30, 31] {
            assert_eq!(l7.ebx & (1 << bit), 0, "leaf 7 ebx bit {bit}");
        }
        for bit in [2, 3, 22] {
            assert_eq!(l7.ecx & (1 << bit), 0, "leaf 7 ecx bit {bit}");
        }
        assert!(find(&v, 0xd, 0).is_none() && find(&v, 0xd, 1).is_none());
        assert!(find(&v, 7, 1).is_none());
        assert_eq!(find(&v, 0x8000_0001, 0).unwrap().ecx & (1 << 5), 0);
        assert_eq!(find(&v, 0, 0), find(&sample(), 0, 0), "vendor untouched");
    }

    #[test]
    fn host_profile_keeps_every_feature() {
        let mut v = sample();
        filter(&mut v, CpuProfile::Host);
        assert_eq!(v.len(), sample().len());
        assert_eq!(find(&v, 7, 0).unwrap().ebx, u32::MAX);
        assert_eq!(find(&v, 1, 0).unwrap().ecx, u32::MAX);
        assert!(find(&v, 0xd, 0).is_some());
        assert!(CpuProfile::Host.kernel_cmdline_words().is_empty());
    }

    #[test]
    fn compat_adds_the_boot_words() {
        let w = CpuProfile::Compat.kernel_cmdline_words();
        assert!(w.contains(&"noxsave"));
        assert!(w.contains(&"pvm_interp_compat"));
        assert!(w.iter().any(|w| w.starts_with("clearcpuid=")));
    }

    #[test]
    fn each_vcpu_gets_its_apic_id() {
        let mut v = vec![entry(1, 0, 0x0000_0800, 0, 0), entry(0xb, 0, 0, 0, 9)];
        set_vcpu_identity(&mut v, 3, 4);
        assert_eq!(v[0].ebx >> 24, 3);
        assert_eq!((v[0].ebx >> 16) & 0xff, 4);
        assert_eq!(v[0].ebx & 0xffff, 0x0800);
        assert_eq!(v[1].edx, 3);
    }

    #[test]
    fn the_ldt_pv_leaf_is_announced_only_with_the_device() {
        let mut v = Vec::new();
        add_platform_leaves(&mut v, None);
        assert_eq!(find(&v, PLATFORM_LEAF, 0).unwrap().eax, LDT_PV_LEAF);
        assert_eq!(find(&v, PLATFORM_LEAF + 1, 0).unwrap().ebx, FEATURE_PVPANIC);
        let l = find(&v, LDT_PV_LEAF, 0).unwrap();
        assert_eq!((l.eax, l.ebx, l.ecx, l.edx), (0, 0, 0, 0));
        let mut v = Vec::new();
        let leaf = LdtPvLeaf {
            version: 1,
            bitmap_gpa: 0xc000_0000,
            frames: 65536,
            port: 0x520,
            irq: 5,
        };
        add_platform_leaves(&mut v, Some(leaf));
        assert_eq!(
            find(&v, PLATFORM_LEAF + 1, 0).unwrap().ebx,
            FEATURE_PVPANIC | FEATURE_LDT_PV
        );
        let l = find(&v, LDT_PV_LEAF, 0).unwrap();
        assert_eq!((l.eax, l.ebx, l.ecx, l.edx), (1, 0xc0000, 65536, 0x05_0520));
    }
}
