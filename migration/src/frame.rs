//! Frames: header, checksum, payload.

use std::io::{self, Read, Write};

/// First bytes of every frame.
pub const MAGIC: [u8; 4] = *b"LDTM";
/// Protocol version written. 2 added `Pages` (memory whose data follows
/// its frame unchecksummed, sent straight from guest memory).
pub const VERSION: u16 = 2;
/// Oldest version read: version 1 streams (snapshot files) are a subset
/// of version 2. A receiver refuses any other. (A version 1 peer refuses
/// version 2 frames, so old and new processes do not migrate to each
/// other: the first frame fails with a one-line error.)
pub const MIN_VERSION: u16 = 1;
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
    /// Source → destination (version 2): a memory range table; the data of
    /// its non-zero ranges follows the frame on the stream, in table
    /// order, outside the frame's checksum (the transport's own checks,
    /// and with --verify per-page CRC-32s end to end, guard it).
    Pages = 10,
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
            10 => Pages,
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
    #[error("protocol version {got} not supported (this side speaks {MIN_VERSION} to {want})")]
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

/// The CRC-32 state after a frame's kind and length; the payload follows.
fn crc_start(kind: u16, len: u64) -> crc32fast::Hasher {
    let mut h = crc32fast::Hasher::new();
    h.update(&kind.to_le_bytes());
    h.update(&len.to_le_bytes());
    h
}

/// Writes one frame.
pub fn write_frame<W: Write>(w: &mut W, kind: MessageKind, payload: &[u8]) -> io::Result<()> {
    write_frame_parts(w, kind, &[payload])
}

/// Writes one frame whose payload is `parts` back to back, without joining
/// them first (a memory message's table and its pages).
pub fn write_frame_parts<W: Write>(
    w: &mut W,
    kind: MessageKind,
    parts: &[&[u8]],
) -> io::Result<()> {
    let len: u64 = parts.iter().map(|p| p.len() as u64).sum();
    let mut h = crc_start(kind as u16, len);
    for p in parts {
        h.update(p);
    }
    let mut hdr = [0u8; HEADER_LEN];
    hdr[0..4].copy_from_slice(&MAGIC);
    hdr[4..6].copy_from_slice(&VERSION.to_le_bytes());
    hdr[6..8].copy_from_slice(&(kind as u16).to_le_bytes());
    hdr[8..16].copy_from_slice(&len.to_le_bytes());
    hdr[16..20].copy_from_slice(&h.finalize().to_le_bytes());
    w.write_all(&hdr)?;
    for p in parts {
        w.write_all(p)?;
    }
    Ok(())
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

/// A frame whose header was read and checked; its payload is still on the
/// stream, to be read with [`FrameStart::payload`] (straight into its
/// final place: a memory message's pages into guest memory).
#[derive(Debug)]
pub struct FrameStart {
    raw_kind: u16,
    /// Payload bytes.
    pub len: u64,
    crc: u32,
}

impl FrameStart {
    /// The kind, if this side knows it (checked after the checksum by
    /// [`read_frame`]).
    pub fn kind(&self) -> Option<MessageKind> {
        MessageKind::from_u16(self.raw_kind)
    }

    /// Reads the payload from `r` piece by piece, checksumming as it goes.
    pub fn payload<'a, R: Read>(&self, r: &'a mut R) -> PayloadReader<'a, R> {
        PayloadReader {
            r,
            left: self.len,
            crc: self.crc,
            hasher: crc_start(self.raw_kind, self.len),
        }
    }
}

/// The payload of one frame, read in pieces; `finish` checks the checksum.
/// Bytes read are unchecked until then: a receiver may only act on them
/// in ways a failed migration undoes (filling a VM that will not run).
pub struct PayloadReader<'a, R: Read> {
    r: &'a mut R,
    left: u64,
    crc: u32,
    hasher: crc32fast::Hasher,
}

impl<R: Read> PayloadReader<'_, R> {
    /// Payload bytes not read yet.
    pub fn left(&self) -> u64 {
        self.left
    }

    /// Fills `buf` from the payload; asking for more than is left is a
    /// truncated frame.
    pub fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), ProtocolError> {
        if buf.len() as u64 > self.left {
            return Err(ProtocolError::Truncated);
        }
        read_exact_or(self.r, buf, false)?;
        self.hasher.update(buf);
        self.left -= buf.len() as u64;
        Ok(())
    }

    /// Checks the checksum once every byte was read.
    pub fn finish(self) -> Result<(), ProtocolError> {
        if self.left != 0 {
            return Err(ProtocolError::Truncated);
        }
        if self.hasher.finalize() != self.crc {
            return Err(ProtocolError::Checksum);
        }
        Ok(())
    }
}

/// Reads and validates one frame's header.
pub fn read_frame_start<R: Read>(r: &mut R) -> Result<FrameStart, ProtocolError> {
    let mut hdr = [0u8; HEADER_LEN];
    read_exact_or(r, &mut hdr, true)?;
    let magic: [u8; 4] = hdr[0..4].try_into().unwrap();
    if magic != MAGIC {
        return Err(ProtocolError::BadMagic(magic));
    }
    let version = u16::from_le_bytes([hdr[4], hdr[5]]);
    if !(MIN_VERSION..=VERSION).contains(&version) {
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
    Ok(FrameStart { raw_kind, len, crc })
}

/// Reads bytes that follow a frame outside it (a `Pages` message's data).
pub fn read_unframed<R: Read>(r: &mut R, buf: &mut [u8]) -> Result<(), ProtocolError> {
    read_exact_or(r, buf, false)
}

/// Reads the payload of a frame whose header `start` was read, and checks it.
pub fn read_frame_rest<R: Read>(r: &mut R, start: FrameStart) -> Result<Frame, ProtocolError> {
    let mut payload = vec![0u8; start.len as usize];
    let mut p = start.payload(r);
    p.read_exact(&mut payload)?;
    p.finish()?;
    let kind = start
        .kind()
        .ok_or(ProtocolError::UnknownKind(start.raw_kind))?;
    Ok(Frame { kind, payload })
}

/// Reads and validates one frame.
pub fn read_frame<R: Read>(r: &mut R) -> Result<Frame, ProtocolError> {
    let start = read_frame_start(r)?;
    read_frame_rest(r, start)
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
        assert!(read_frame(&mut &v[..])
            .unwrap_err()
            .to_string()
            .contains("version 9 not supported (this side speaks 1 to 2)"));
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
    fn a_frame_in_parts_is_the_frame_of_the_parts_joined() {
        let mut parts = Vec::new();
        write_frame_parts(&mut parts, MessageKind::Memory, &[b"table", b"", b"data"]).unwrap();
        assert_eq!(parts, encoded(MessageKind::Memory, b"tabledata"));
    }

    #[test]
    fn a_payload_read_in_pieces_is_checked_at_the_end() {
        let good = encoded(MessageKind::Memory, b"0123456789");
        let mut r = &good[..];
        let start = read_frame_start(&mut r).unwrap();
        assert_eq!((start.kind(), start.len), (Some(MessageKind::Memory), 10));
        let mut p = start.payload(&mut r);
        let (mut a, mut b) = ([0u8; 4], [0u8; 6]);
        p.read_exact(&mut a).unwrap();
        assert_eq!(p.left(), 6);
        // More than the frame holds is a truncation, not a read past it.
        assert!(matches!(
            p.read_exact(&mut [0u8; 7]),
            Err(ProtocolError::Truncated)
        ));
        p.read_exact(&mut b).unwrap();
        p.finish().unwrap();
        assert_eq!((&a, &b), (b"0123", b"456789"));

        let mut bad = good.clone();
        *bad.last_mut().unwrap() ^= 1;
        let mut r = &bad[..];
        let start = read_frame_start(&mut r).unwrap();
        let mut p = start.payload(&mut r);
        p.read_exact(&mut [0u8; 10]).unwrap();
        assert!(matches!(p.finish(), Err(ProtocolError::Checksum)));
        // Not all of it read: refused too.
        let mut r = &good[..];
        let start = read_frame_start(&mut r).unwrap();
        let mut p = start.payload(&mut r);
        p.read_exact(&mut [0u8; 3]).unwrap();
        assert!(matches!(p.finish(), Err(ProtocolError::Truncated)));
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
