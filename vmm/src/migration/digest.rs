//! A digest of all guest memory, compared between source and destination.

use sha2::{Digest, Sha256};
use vm_memory::{Bytes, GuestAddress};

use crate::vm::Vm;

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
