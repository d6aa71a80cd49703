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
//! is not all zero: inside the frame (`Memory`), or (`Pages`, version 2)
//! after it on the stream, so that it can go from guest memory to the
//! socket and back without a copy or a pass to checksum it. Everything a receiver reads is validated before use: a
//! truncated, corrupted or foreign stream gives a [`ProtocolError`].

pub mod frame;
pub mod memory;

pub use frame::{
    read_frame, read_frame_rest, read_frame_start, read_unframed, write_frame, write_frame_parts,
    Frame, FrameStart, MessageKind, PayloadReader, ProtocolError, MAX_PAYLOAD, MIN_VERSION,
    VERSION,
};
pub use memory::{
    decode_memory, decode_memory_table, decode_pages_table, encode_memory_header, memory_table_len,
    MemoryRange, PAGE_SIZE, RANGE_ZERO,
};
