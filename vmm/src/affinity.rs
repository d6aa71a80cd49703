//! CPU affinity of the VMM's threads (`run --vcpu-cpus`, `--vmm-cpus`), as
//! libvirt's vcpupin and emulatorpin or Cloud Hypervisor's
//! `--cpus affinity=` place them: keeping the VMM's own work (migration,
//! API, devices) off the CPUs the guest's vCPUs run on.

use std::collections::BTreeSet;
use std::fmt;
use std::io;
use std::str::FromStr;

/// The kernel's `cpu_set_t` holds this many CPUs.
const MAX_CPUS: usize = libc::CPU_SETSIZE as usize;

/// A set of host CPUs, written as the kernel writes them in
/// `Cpus_allowed_list` ("0-3,8").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuSet(BTreeSet<usize>);

impl CpuSet {
    pub fn contains(&self, cpu: usize) -> bool {
        self.0.contains(&cpu)
    }

    /// Fails naming the first CPU of `self` that is not in `allowed`.
    pub fn check_within(&self, allowed: &CpuSet) -> Result<(), String> {
        match self.0.iter().find(|c| !allowed.contains(**c)) {
            Some(c) => Err(format!(
                "CPU {c} is not among the CPUs this process may run on ({allowed})"
            )),
            None => Ok(()),
        }
    }

    fn to_raw(&self) -> libc::cpu_set_t {
        // SAFETY: cpu_set_t is a plain bit array; all zeros is the empty set.
        let mut raw: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        for &c in &self.0 {
            // SAFETY: c < MAX_CPUS, checked when the set was parsed.
            unsafe { libc::CPU_SET(c, &mut raw) };
        }
        raw
    }
}

impl FromStr for CpuSet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let cpu = |t: &str| -> Result<usize, String> {
            let c: usize = t
                .trim()
                .parse()
                .map_err(|_| format!("`{t}` is not a CPU number"))?;
            if c >= MAX_CPUS {
                return Err(format!("CPU {c} is beyond the {MAX_CPUS} a CPU set holds"));
            }
            Ok(c)
        };
        let mut set = BTreeSet::new();
        for part in s.split(',') {
            match part.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (cpu(a)?, cpu(b)?);
                    if a > b {
                        return Err(format!("range `{part}` runs backwards"));
                    }
                    set.extend(a..=b);
                }
                None => {
                    set.insert(cpu(part)?);
                }
            }
        }
        Ok(CpuSet(set))
    }
}

impl fmt::Display for CpuSet {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let mut cpus = self.0.iter().copied().peekable();
        let mut first = true;
        while let Some(start) = cpus.next() {
            let mut end = start;
            while cpus.peek() == Some(&(end + 1)) {
                end = cpus.next().unwrap();
            }
            let sep = if first { "" } else { "," };
            first = false;
            if end == start {
                write!(f, "{sep}{start}")?;
            } else {
                write!(f, "{sep}{start}-{end}")?;
            }
        }
        Ok(())
    }
}

/// The CPUs the calling thread may run on.
pub fn current_thread() -> io::Result<CpuSet> {
    // SAFETY: zeroed is the empty set; the kernel fills at most its size.
    let mut raw: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is the calling thread; the size is the buffer's.
    let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&raw), &mut raw) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: reads bits of a set the kernel filled.
    Ok(CpuSet(
        (0..MAX_CPUS)
            .filter(|&c| unsafe { libc::CPU_ISSET(c, &raw) })
            .collect(),
    ))
}

/// Restricts the calling thread (and the threads it starts from now on,
/// which inherit its mask) to `set`.
pub fn pin_current_thread(set: &CpuSet) -> io::Result<()> {
    let raw = set.to_raw();
    // SAFETY: pid 0 is the calling thread; the set lives across the call.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&raw), &raw) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The vCPU placement of `run --vcpu-cpus`: one set for every vCPU, or one
/// per vCPU in order.
#[derive(Clone, Debug, Default)]
pub struct VcpuAffinity(Vec<CpuSet>);

impl VcpuAffinity {
    pub fn new(sets: Vec<CpuSet>) -> Self {
        VcpuAffinity(sets)
    }

    pub fn sets(&self) -> &[CpuSet] {
        &self.0
    }

    /// The set of vCPU `index` of `count`; an error when the sets given
    /// are neither one nor one per vCPU.
    pub fn for_vcpu(&self, index: usize, count: usize) -> Result<Option<&CpuSet>, String> {
        match self.0.len() {
            0 => Ok(None),
            1 => Ok(self.0.first()),
            n if n == count => Ok(self.0.get(index)),
            n => Err(format!(
                "--vcpu-cpus given {n} times for {count} vCPUs: give it once (every vCPU) or once per vCPU"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(s: &str) -> CpuSet {
        s.parse().unwrap()
    }

    #[test]
    fn lists_parse_and_print_as_the_kernel_writes_them() {
        assert_eq!(set("0").to_string(), "0");
        assert_eq!(set("3,0-1").to_string(), "0-1,3");
        assert_eq!(set("0-3,5,6,7,9").to_string(), "0-3,5-7,9");
        assert_eq!(set("2,2,1-2").to_string(), "1-2");
        assert_eq!(set(" 1 - 2 ").to_string(), "1-2");
    }

    #[test]
    fn bad_lists_are_refused_with_the_reason() {
        for (bad, why) in [
            ("", "not a CPU number"),
            ("1,", "not a CPU number"),
            ("a", "not a CPU number"),
            ("-1", "not a CPU number"),
            ("3-1", "backwards"),
            ("1024", "beyond"),
            ("0-5000", "beyond"),
        ] {
            let e = bad.parse::<CpuSet>().unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }

    #[test]
    fn a_set_outside_the_allowed_ones_names_the_cpu() {
        let allowed = set("0-1");
        assert!(set("1").check_within(&allowed).is_ok());
        let e = set("0,7").check_within(&allowed).unwrap_err();
        assert!(e.contains("CPU 7") && e.contains("(0-1)"), "{e}");
    }

    #[test]
    fn pinning_changes_only_the_calling_thread_and_what_it_starts() {
        let before = current_thread().unwrap();
        let one = CpuSet(BTreeSet::from([*before.0.iter().next().unwrap()]));
        std::thread::scope(|s| {
            s.spawn(|| {
                pin_current_thread(&one).unwrap();
                assert_eq!(current_thread().unwrap(), one);
                let child = std::thread::spawn(|| current_thread().unwrap());
                assert_eq!(child.join().unwrap(), one, "inherited");
            });
        });
        assert_eq!(current_thread().unwrap(), before);
    }

    #[test]
    fn one_set_for_all_or_one_per_vcpu() {
        let none = VcpuAffinity::default();
        assert_eq!(none.for_vcpu(1, 2), Ok(None));
        let all = VcpuAffinity::new(vec![set("1")]);
        assert_eq!(all.for_vcpu(1, 2), Ok(Some(&set("1"))));
        let each = VcpuAffinity::new(vec![set("0"), set("1")]);
        assert_eq!(each.for_vcpu(1, 2), Ok(Some(&set("1"))));
        assert!(each
            .for_vcpu(0, 3)
            .unwrap_err()
            .contains("2 times for 3 vCPUs"));
    }
}
