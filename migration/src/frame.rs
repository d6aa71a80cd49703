//! Frames: header, checksum, payload.

use std::io::{self, Read, Write};

/// First bytes of every frame.
pub const MAGIC: [u8; 4] = *b"LDTM";
/// Protocol version; a receiver refuses any other.
pub const VERSION: u16 = 1;
/// Largest payload a receiver accepts (a memory chunk or the device state).
pub const MAX_PAYLOAD: u64 = 64 << 20;
const HEADER_LEN: usize = 20;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum MessageKind {
    /// Source → destination: VM configuration (JSON).
    Hello = 1,
    /// Destination → source: ready for memory.
    HelloAck = 2,
    /// Source → destination: a memory range table and its data.
    Memory = 3,
    /// Source → destination: end of a pre-copy round (round number, u32).
    RoundEnd = 4,
    /// Source → destination: vCPU, VM and device state (JSON), after the last round.
    State = 5,
    /// Destination → source: state restored; memory digest (or empty).
    Ready = 6,
    /// Source → destination: resume the VM.
    Commit = 7,
    /// Destination → source: the VM runs on the destination.
    Resumed = 8,
    /// Either side: give up (UTF-8 reason).
    Abort = 9,
}

impl MessageKind {
    fn from_u16(v: u16) -> Option<Self> {
        use MessageKind::*;
        Some(match v {
            1 => Hello,
            2 => HelloAck,
            3 => Memory,
            4 => RoundEnd,
            5 => State,
            6 => Ready,
            7 => Commit,
            8 => Resumed,
            9 => Abort,
            _ => return None,
        })
    }
}

/// A received frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: MessageKind,
    pub payload: Vec<u8>,
}

/// Why a stream was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("connection closed by the peer")]
    Closed,
    #[error("stream truncated in the middle of a frame")]
    Truncated,
    #[error("not an ldt-vmm migration stream (bad magic {0:02x?})")]
    BadMagic([u8; 4]),
    #[error("protocol version {got} not supported (this side speaks {want})")]
    Version { got: u16, want: u16 },
    #[error("unknown message kind {0}")]
    UnknownKind(u16),
    #[error("frame of {0} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    TooLarge(u64),
    #[error("checksum mismatch (frame corrupted)")]
    Checksum,
    #[error("malformed {kind:?} message: {why}")]
    Malformed { kind: MessageKind, why: String },
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

fn checksum(kind: u16, len: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&kind.to_le_bytes());
    h.update(&len.to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// Writes one frame.
pub fn write_frame<W: Write>(w: &mut W, kind: MessageKind, payload: &[u8]) -> io::Result<()> {
    let len = payload.len() as u64;
    let mut hdr = [0u8; HEADER_LEN];
    hdr[0..4].copy_from_slice(&MAGIC);
    hdr[4..6].copy_from_slice(&VERSION.to_le_bytes());
    hdr[6..8].copy_from_slice(&(kind as u16).to_le_bytes());
    hdr[8..16].copy_from_slice(&len.to_le_bytes());
    hdr[16..20].copy_from_slice(&checksum(kind as u16, len, payload).to_le_bytes());
    w.write_all(&hdr)?;
    w.write_all(payload)
}

fn read_exact_or<R: Read>(r: &mut R, buf: &mut [u8], at_start: bool) -> Result<(), ProtocolError> {
    let mut done = 0;
    while done < buf.len() {
        match r.read(&mut buf[done..]) {
            Ok(0) if done == 0 && at_start => return Err(ProtocolError::Closed),
            Ok(0) => return Err(ProtocolError::Truncated),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Reads and validates one frame.
pub fn read_frame<R: Read>(r: &mut R) -> Result<Frame, ProtocolError> {
    let mut hdr = [0u8; HEADER_LEN];
    read_exact_or(r, &mut hdr, true)?;
    let magic: [u8; 4] = hdr[0..4].try_into().unwrap();
    if magic != MAGIC {
        return Err(ProtocolError::BadMagic(magic));
    }
    let version = u16::from_le_bytes([hdr[4], hdr[5]]);
    if version != VERSION {
        return Err(ProtocolError::Version {
            got: version,
            want: VERSION,
        });
    }
    let raw_kind = u16::from_le_bytes([hdr[6], hdr[7]]);
    let len = u64::from_le_bytes(hdr[8..16].try_into().unwrap());
    let crc = u32::from_le_bytes(hdr[16..20].try_into().unwrap());
    if len > MAX_PAYLOAD {
        return Err(ProtocolError::TooLarge(len));
    }
    let mut payload = vec![0u8; len as usize];
    read_exact_or(r, &mut payload, false)?;
    if checksum(raw_kind, len, &payload) != crc {
        return Err(ProtocolError::Checksum);
    }
    let kind = MessageKind::from_u16(raw_kind).ok_or(ProtocolError::UnknownKind(raw_kind))?;
    Ok(Frame { kind, payload })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(kind: MessageKind, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        write_frame(&mut v, kind, payload).unwrap();
        v
    }

    #[test]
    fn frames_round_trip() {
        let mut stream = encoded(MessageKind::Hello, b"{}");
        stream.extend(encoded(MessageKind::Commit, b""));
        let mut r = &stream[..];
        assert_eq!(
            read_frame(&mut r).unwrap(),
            Frame {
                kind: MessageKind::Hello,
                payload: b"{}".to_vec()
            }
        );
        assert_eq!(read_frame(&mut r).unwrap().kind, MessageKind::Commit);
        assert!(matches!(read_frame(&mut r), Err(ProtocolError::Closed)));
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let good = encoded(MessageKind::State, b"some device state");
        for byte in 0..good.len() {
            for bit in 0..8 {
                let mut bad = good.clone();
                bad[byte] ^= 1 << bit;
                assert!(
                    read_frame(&mut &bad[..]).is_err(),
                    "flip of byte {byte} bit {bit} accepted"
                );
            }
        }
    }

    #[test]
    fn every_truncation_is_detected() {
        let good = encoded(MessageKind::Memory, &[7u8; 100]);
        for cut in 1..good.len() {
            assert!(
                matches!(read_frame(&mut &good[..cut]), Err(ProtocolError::Truncated)),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn wrong_version_and_magic_are_named() {
        let mut v = encoded(MessageKind::Hello, b"x");
        v[4] = 9;
        assert!(matches!(
            read_frame(&mut &v[..]),
            Err(ProtocolError::Version {
                got: 9,
                want: VERSION
            })
        ));
        let mut m = encoded(MessageKind::Hello, b"x");
        m[0] = b'X';
        assert!(matches!(
            read_frame(&mut &m[..]),
            Err(ProtocolError::BadMagic(_))
        ));
    }

    #[test]
    fn huge_lengths_are_refused_before_allocating() {
        let mut v = encoded(MessageKind::Memory, b"");
        v[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            read_frame(&mut &v[..]),
            Err(ProtocolError::TooLarge(_))
        ));
    }

    #[test]
    fn random_streams_never_panic() {
        // A deterministic fuzz: mutate valid streams at random and parse.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let base = encoded(MessageKind::Memory, &[3u8; 64]);
        for _ in 0..20_000 {
            let mut s = base.clone();
            for _ in 0..(next() % 4 + 1) {
                let i = (next() % s.len() as u64) as usize;
                s[i] = next() as u8;
            }
            s.truncate((next() % (s.len() as u64 + 1)) as usize);
            let _ = read_frame(&mut &s[..]);
        }
    }
}
