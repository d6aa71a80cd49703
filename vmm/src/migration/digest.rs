//! Digests of guest memory, compared between source and destination.
//!
//! `--verify` keeps them out of the downtime: both sides keep a CRC-32 per
//! page of what was sent / received (`PageHashes`, updated as pages
//! stream); before Commit the destination's digest of its table must equal
//! the source's (a stream or apply error aborts the migration). After
//! Resumed, the frozen source hashes its actual memory on several threads:
//! a difference from what it sent means the dirty source missed a write,
//! reported (the guest runs on the destination by then).

use sha2::{Digest, Sha256};
use vm_memory::{Bytes, GuestAddress};

use crate::arch::layout::PAGE_SIZE;
use crate::vm::{MemorySlot, Vm};

/// Page numbers of guest-physical addresses, in memslot order.
pub struct PageIndex {
    /// (first gpa, size) of each slot and the number of its first page.
    slots: Vec<(u64, u64, usize)>,
    pages: usize,
}

impl PageIndex {
    pub fn new(slots: &[MemorySlot]) -> Self {
        let mut table = Vec::new();
        let mut n = 0;
        for s in slots {
            table.push((s.guest_addr, s.size, n));
            n += (s.size / PAGE_SIZE) as usize;
        }
        PageIndex {
            slots: table,
            pages: n,
        }
    }

    /// Number of pages of all slots.
    pub fn pages(&self) -> usize {
        self.pages
    }

    /// The page number of `gpa`, if it is guest RAM.
    pub fn of(&self, gpa: u64) -> Option<usize> {
        self.slots
            .iter()
            .find(|(at, size, _)| gpa >= *at && gpa < at + size)
            .map(|(at, _, first)| first + ((gpa - at) / PAGE_SIZE) as usize)
    }

    /// Every page's address, in order.
    fn gpas(&self) -> impl Iterator<Item = u64> + '_ {
        self.slots
            .iter()
            .flat_map(|(at, size, _)| (0..size / PAGE_SIZE).map(move |p| at + p * PAGE_SIZE))
    }
}

/// A CRC-32 of every guest page, in memslot order.
pub struct PageHashes {
    index: PageIndex,
    crc: Vec<u32>,
    /// The CRC-32 of a zero page.
    zero: u32,
}

impl PageHashes {
    /// Every page zero (a fresh VM's memory).
    pub fn zeroed(slots: &[MemorySlot]) -> Self {
        let zero = crc32fast::hash(&[0u8; PAGE_SIZE as usize]);
        let index = PageIndex::new(slots);
        PageHashes {
            crc: vec![zero; index.pages()],
            index,
            zero,
        }
    }

    fn index(&self, gpa: u64) -> Option<usize> {
        self.index.of(gpa)
    }

    /// Records the contents of the page at `gpa`.
    pub fn set(&mut self, gpa: u64, page: &[u8]) {
        if let Some(i) = self.index(gpa) {
            self.crc[i] = crc32fast::hash(page);
        }
    }

    /// Records that the page at `gpa` is zero.
    pub fn set_zero(&mut self, gpa: u64) {
        if let Some(i) = self.index(gpa) {
            self.crc[i] = self.zero;
        }
    }

    /// SHA-256 over the table: equal tables, equal digests.
    pub fn digest(&self) -> String {
        let mut h = Sha256::new();
        for c in &self.crc {
            h.update(c.to_le_bytes());
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Pages whose hash differs from `other`'s.
    pub fn differing(&self, other: &PageHashes) -> u64 {
        self.crc
            .iter()
            .zip(&other.crc)
            .filter(|(a, b)| a != b)
            .count() as u64
    }

    /// The table of `vm`'s memory as it is, hashed on `threads` threads.
    pub fn of_memory(vm: &Vm, threads: usize) -> Result<Self, vm_memory::GuestMemoryError> {
        let mut t = PageHashes::zeroed(&vm.slots);
        let pages: Vec<u64> = t.index.gpas().collect();
        let per = pages.len().div_ceil(threads.max(1)).max(1);
        std::thread::scope(|s| {
            let jobs: Vec<_> = t
                .crc
                .chunks_mut(per)
                .zip(pages.chunks(per))
                .map(|(out, gpas)| {
                    s.spawn(move || {
                        let mut page = vec![0u8; PAGE_SIZE as usize];
                        for (o, &gpa) in out.iter_mut().zip(gpas) {
                            vm.memory.read_slice(&mut page, GuestAddress(gpa))?;
                            *o = crc32fast::hash(&page);
                        }
                        Ok::<_, vm_memory::GuestMemoryError>(())
                    })
                })
                .collect();
            jobs.into_iter()
                .try_for_each(|j| j.join().expect("hash thread panicked"))
        })?;
        Ok(t)
    }
}

/// SHA-256 over every memslot in order (address, size, contents).
pub fn memory_digest(vm: &Vm) -> Result<String, vm_memory::GuestMemoryError> {
    const CHUNK: u64 = 1 << 20;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; CHUNK as usize];
    for s in &vm.slots {
        h.update(s.guest_addr.to_le_bytes());
        h.update(s.size.to_le_bytes());
        let mut off = 0;
        while off < s.size {
            let n = CHUNK.min(s.size - off) as usize;
            vm.memory
                .read_slice(&mut buf[..n], GuestAddress(s.guest_addr + off))?;
            h.update(&buf[..n]);
            off += n as u64;
        }
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::cpuid::CpuProfile;
    use crate::builder;
    use crate::devices::console::ConsoleOut;
    use crate::dirty::DirtySourceKind;
    use crate::migration::Hello;

    #[test]
    fn page_tables_match_memory_and_count_the_pages_that_differ() {
        let hello = Hello {
            mem_mib: 4,
            vcpus: 1,
            cpu_profile: CpuProfile::detect(),
            dirty_source: DirtySourceKind::KvmBitmap,
            verify: true,
            binary_state: true,
            snapshot: None,
            ldt_pv: false,
        };
        let (console, _out) = ConsoleOut::buffer();
        let m =
            builder::build(&hello.resources(console, None, crate::vm::MemBacking::Anon)).unwrap();
        let page = [0x5au8; PAGE_SIZE as usize];
        m.vm.memory
            .write_slice(&page, GuestAddress(0x10_0000))
            .unwrap();
        // A table built page by page as a sender would.
        let mut sent = PageHashes::zeroed(&m.vm.slots);
        sent.set(0x10_0000, &page);
        let actual = PageHashes::of_memory(&m.vm, 3).unwrap();
        assert_eq!(actual.digest(), sent.digest());
        assert_eq!(actual.differing(&sent), 0);
        // A write the sender never saw.
        m.vm.memory
            .write_slice(&page, GuestAddress(0x20_0000))
            .unwrap();
        let later = PageHashes::of_memory(&m.vm, 2).unwrap();
        assert_ne!(later.digest(), sent.digest());
        assert_eq!(later.differing(&sent), 1);
    }
}
