//! Mapping guest memory into KVM's two-dimensional page tables (EPT/NPT)
//! before the guest runs: KVM_PRE_FAULT_MEMORY (Linux 6.10). A migration
//! destination maps what it received, so the guest does not take a nested
//! page fault on each page it touches after it resumes (kvm-ioctls has no
//! wrapper for this ioctl).
//!
//! Only an optimization: KVM keeps the mappings coherent with the memory
//! (its MMU notifier drops a mapping whose page the VMM discards), and a
//! page not mapped here faults in on first touch as before.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use kvm_bindings::{kvm_pre_fault_memory, KVMIO};
use vmm_sys_util::errno;
use vmm_sys_util::ioctl::ioctl_with_mut_ref;
use vmm_sys_util::ioctl_iowr_nr;

ioctl_iowr_nr!(KVM_PRE_FAULT_MEMORY, KVMIO, 0xd5, kvm_pre_fault_memory);

/// The most one ioctl maps, so that a stop request waits for at most this.
const CHUNK: u64 = 2 << 20;

/// What a pre-fault pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Prefaulted {
    /// Bytes of guest memory mapped.
    pub bytes: u64,
    pub ms: f64,
    /// Stopped before the end (the state arrived first).
    pub stopped: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum PrefaultError {
    /// The kernel has no KVM_PRE_FAULT_MEMORY (before 6.10), or this VM's
    /// MMU cannot pre-fault (shadow paging, e.g. a PVM host).
    #[error("KVM_PRE_FAULT_MEMORY is not available here ({0})")]
    Unsupported(errno::Error),
    #[error("KVM_PRE_FAULT_MEMORY at {gpa:#x} failed after {done} bytes: {err}")]
    Failed {
        gpa: u64,
        done: u64,
        err: errno::Error,
    },
}

/// Maps the guest-physical `ranges` (start, length in bytes) through
/// vCPU `vcpu`'s MMU, until done or `stop` is set (checked every 2 MiB).
/// The vCPU must not run meanwhile (KVM serializes it with its other
/// ioctls).
pub fn prefault(
    vcpu: RawFd,
    ranges: &[(u64, u64)],
    stop: &AtomicBool,
) -> Result<Prefaulted, PrefaultError> {
    let t = Instant::now();
    let mut done = 0u64;
    let mut stopped = false;
    'ranges: for &(start, len) in ranges {
        let (mut gpa, end) = (start, start + len);
        while gpa < end {
            if stop.load(Ordering::Relaxed) {
                stopped = true;
                break 'ranges;
            }
            let size = CHUNK.min(end - gpa);
            let mut r = kvm_pre_fault_memory {
                gpa,
                size,
                ..Default::default()
            };
            // SAFETY: the ioctl reads and writes back exactly `r`.
            let ret = unsafe { ioctl_with_mut_ref(&vcpu, KVM_PRE_FAULT_MEMORY(), &mut r) };
            let mapped = size - r.size;
            if ret < 0 {
                let err = errno::Error::last();
                match err.errno() {
                    // Interrupted part way: go on from where it stopped.
                    libc::EINTR | libc::EAGAIN => {}
                    libc::ENOTTY | libc::EOPNOTSUPP | libc::EINVAL if done == 0 => {
                        return Err(PrefaultError::Unsupported(err))
                    }
                    _ => return Err(PrefaultError::Failed { gpa, done, err }),
                }
            } else if mapped == 0 {
                // Success that maps nothing would loop forever.
                return Err(PrefaultError::Failed {
                    gpa,
                    done,
                    err: errno::Error::new(libc::EIO),
                });
            }
            gpa += mapped;
            done += mapped;
        }
    }
    Ok(Prefaulted {
        bytes: done,
        ms: t.elapsed().as_secs_f64() * 1e3,
        stopped,
    })
}

/// Appends `(gpa, len)` to `ranges`, merged with the last one if they touch
/// (a round sends its pages in address order).
pub fn push_range(ranges: &mut Vec<(u64, u64)>, gpa: u64, len: u64) {
    match ranges.last_mut() {
        Some((s, l)) if *s + *l == gpa => *l += len,
        _ => ranges.push((gpa, len)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adjacent_ranges_merge_and_gaps_do_not() {
        let mut r = Vec::new();
        push_range(&mut r, 0x1000, 0x1000);
        push_range(&mut r, 0x2000, 0x3000);
        push_range(&mut r, 0x6000, 0x1000);
        push_range(&mut r, 0x7000, 0x1000);
        push_range(&mut r, 0x1000, 0x1000);
        assert_eq!(
            r,
            vec![(0x1000, 0x4000), (0x6000, 0x2000), (0x1000, 0x1000)]
        );
    }

    #[test]
    fn a_set_stop_maps_nothing_and_says_so() {
        let stop = AtomicBool::new(true);
        // Never reaches the ioctl: the fd is not a vCPU.
        let p = prefault(-1, &[(0, 1 << 20)], &stop).unwrap();
        assert_eq!((p.bytes, p.stopped), (0, true));
    }

    #[test]
    fn a_non_vcpu_fd_is_refused_not_looped_on() {
        let stop = AtomicBool::new(false);
        let f = std::fs::File::open("/dev/null").unwrap();
        let e = prefault(std::os::fd::AsRawFd::as_raw_fd(&f), &[(0, 8192)], &stop);
        assert!(matches!(e, Err(PrefaultError::Unsupported(_))), "{e:?}");
    }
}
