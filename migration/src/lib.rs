//! The ldt-vmm live-migration wire protocol.
//!
//! Nothing here knows about KVM or sockets: a stream of frames, each
//!
//! ```text
//! magic "LDTM" | version u16 | kind u16 | length u64 | crc32 u32 | payload[length]
//! ```
//!
//! (little endian), where the CRC-32 covers kind, length and payload. Memory
//! travels as [`MemoryRange`] tables followed by the data of every range that
//! is not all zero. Everything a receiver reads is validated before use: a
//! truncated, corrupted or foreign stream gives a [`ProtocolError`].

pub mod frame;
pub mod memory;

pub use frame::{read_frame, write_frame, Frame, MessageKind, ProtocolError, MAX_PAYLOAD, VERSION};
pub use memory::{decode_memory, encode_memory_header, MemoryRange, PAGE_SIZE, RANGE_ZERO};
