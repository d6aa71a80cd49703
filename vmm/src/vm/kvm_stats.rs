//! KVM's binary statistics of a VM or a vCPU (`KVM_GET_STATS_FD`, which
//! kvm-ioctls does not wrap): among the VM's `pages_4k`, `pages_2m`,
//! `pages_1g`, how many guest pages KVM maps at each size, which tells
//! whether huge host pages reach the guest's (shadow or TDP) mappings;
//! among a vCPU's `pf_taken` and `pf_fast`, the page faults KVM handled
//! (a write-protection fault for dirty logging is one of them).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

use kvm_bindings::{kvm_stats_desc, kvm_stats_header};
use kvm_ioctls::VmFd;
use vmm_sys_util::ioctl::ioctl;
use vmm_sys_util::ioctl_io_nr;

const KVMIO: u32 = 0xae;
ioctl_io_nr!(KVM_GET_STATS_FD, KVMIO, 0xce);

fn read_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

/// An open statistics file: the descriptors are read once, the values at
/// every `read` (KVM updates them in place).
pub struct Stats {
    file: File,
    /// Single-valued statistics: name and offset in the data block.
    offsets: Vec<(String, u64)>,
    data_offset: u64,
}

impl Stats {
    /// The statistics of `fd`, a KVM VM or vCPU.
    pub fn open(fd: &impl AsRawFd) -> io::Result<Stats> {
        // SAFETY: the ioctl takes no argument and returns a new fd or -1.
        let raw = unsafe { ioctl(fd, KVM_GET_STATS_FD()) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd that nothing else owns.
        let file = unsafe { File::from_raw_fd(raw) };
        let mut head = vec![0u8; std::mem::size_of::<kvm_stats_header>()];
        file.read_exact_at(&mut head, 0)?;
        let (name_size, num_desc) = (read_u32(&head, 4) as usize, read_u32(&head, 8) as usize);
        let (desc_offset, data_offset) = (read_u32(&head, 16) as u64, read_u32(&head, 20) as u64);
        let desc_len = std::mem::size_of::<kvm_stats_desc>() + name_size;
        let mut descs = vec![0u8; desc_len * num_desc];
        file.read_exact_at(&mut descs, desc_offset)?;
        let mut offsets = Vec::new();
        for d in descs.chunks_exact(desc_len) {
            // flags u32, exponent i16, size u16, offset u32, bucket_size u32, name.
            if u16::from_le_bytes([d[6], d[7]]) != 1 {
                continue;
            }
            let name = &d[16..];
            let name = String::from_utf8_lossy(
                &name[..name.iter().position(|b| *b == 0).unwrap_or(name.len())],
            )
            .into_owned();
            offsets.push((name, read_u32(d, 8) as u64));
        }
        Ok(Stats {
            file,
            offsets,
            data_offset,
        })
    }

    fn value_at(&self, offset: u64) -> io::Result<u64> {
        let mut v = [0u8; 8];
        self.file.read_exact_at(&mut v, self.data_offset + offset)?;
        Ok(u64::from_le_bytes(v))
    }

    /// Every single-valued statistic, by name, as it is now.
    pub fn read(&self) -> io::Result<Vec<(String, u64)>> {
        self.offsets
            .iter()
            .map(|(name, offset)| Ok((name.clone(), self.value_at(*offset)?)))
            .collect()
    }

    /// The sum of the named statistics now (only those are read); an
    /// error if one is missing.
    pub fn sum(&self, names: &[&str]) -> io::Result<u64> {
        names.iter().try_fold(0u64, |acc, n| {
            let (_, offset) = self
                .offsets
                .iter()
                .find(|(k, _)| k == n)
                .ok_or_else(|| io::Error::other(format!("no {n} statistic")))?;
            Ok(acc + self.value_at(*offset)?)
        })
    }
}

/// The page faults a vCPU's KVM handled: slow path and fast path (a
/// write-protection fault of dirty logging takes the fast one on TDP).
pub const VCPU_PAGE_FAULTS: &[&str] = &["pf_taken", "pf_fast"];

/// Every single-valued VM statistic, by name.
pub fn vm_stats(vm: &VmFd) -> io::Result<Vec<(String, u64)>> {
    Stats::open(vm)?.read()
}

/// Guest memory KVM maps with 4 KiB, 2 MiB and 1 GiB pages right now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct MappedPages {
    pub pages_4k: u64,
    pub pages_2m: u64,
    pub pages_1g: u64,
}

/// `MappedPages` of `vm`, if this KVM has the statistics.
pub fn mapped_pages(vm: &VmFd) -> io::Result<MappedPages> {
    let stats = vm_stats(vm)?;
    let get = |n: &str| stats.iter().find(|(k, _)| k == n).map(|(_, v)| *v);
    Ok(MappedPages {
        pages_4k: get("pages_4k").ok_or_else(|| io::Error::other("no pages_4k statistic"))?,
        pages_2m: get("pages_2m").unwrap_or(0),
        pages_1g: get("pages_1g").unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flat::WriterVm;

    #[test]
    fn kvm_counts_the_pages_a_guest_touched() {
        let mut vm = WriterVm::new(16, None).unwrap();
        let pages: Vec<u64> = (0..256).map(|i| (4 << 20) + i * 4096).collect();
        vm.write_round(&pages, 1, 1).unwrap();
        let m = mapped_pages(&vm.machine.vm.fd).unwrap();
        // 1 MiB written, plus the payload, its stack and page tables.
        assert!(m.pages_4k + 512 * m.pages_2m >= 256, "{m:?}");
        vm.stop().unwrap();
    }

    #[test]
    fn a_vcpu_counts_the_page_faults_of_first_touches() {
        let mut vm = WriterVm::new(16, None).unwrap();
        let stats = Stats::open(&vm.machine.vcpus[0].fd).unwrap();
        let before = stats.sum(VCPU_PAGE_FAULTS).unwrap();
        // 1 MiB the payload never touched: KVM maps each page at a fault
        // (TDP or shadow paging alike), so the count must grow.
        let pages: Vec<u64> = (0..256).map(|i| (8 << 20) + i * 4096).collect();
        vm.write_round(&pages, 1, 1).unwrap();
        let after = stats.sum(VCPU_PAGE_FAULTS).unwrap();
        assert!(after > before, "pf_taken + pf_fast {before} -> {after}");
        assert!(stats.sum(&["no_such_statistic"]).is_err());
        vm.stop().unwrap();
    }
}
