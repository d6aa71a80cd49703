//! Memory messages: a table of page ranges, then the data of the ranges
//! that are not all zero, in table order.
//!
//! ```text
//! count u32 | count × (gpa u64, pages u32, flags u32) | data
//! ```

use crate::frame::{MessageKind, ProtocolError};

/// Guest page size on the wire.
pub const PAGE_SIZE: u64 = 4096;
/// Range flag: every page of the range is zero; no data follows for it.
pub const RANGE_ZERO: u32 = 1;
const ENTRY_LEN: usize = 16;

/// `pages` pages from guest-physical `gpa`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryRange {
    pub gpa: u64,
    pub pages: u32,
    pub flags: u32,
}

impl MemoryRange {
    pub fn is_zero(&self) -> bool {
        self.flags & RANGE_ZERO != 0
    }

    /// Bytes of data this range carries in the message.
    pub fn data_len(&self) -> u64 {
        if self.is_zero() {
            0
        } else {
            self.pages as u64 * PAGE_SIZE
        }
    }
}

/// The table part of a memory message; the caller appends the data.
pub fn encode_memory_header(ranges: &[MemoryRange]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + ranges.len() * ENTRY_LEN);
    out.extend_from_slice(&(ranges.len() as u32).to_le_bytes());
    for r in ranges {
        out.extend_from_slice(&r.gpa.to_le_bytes());
        out.extend_from_slice(&r.pages.to_le_bytes());
        out.extend_from_slice(&r.flags.to_le_bytes());
    }
    out
}

fn malformed(why: impl Into<String>) -> ProtocolError {
    ProtocolError::Malformed {
        kind: MessageKind::Memory,
        why: why.into(),
    }
}

/// Bytes of a memory message's range table, count included, from the
/// count (its first 4 bytes), checked to fit a payload of `payload_len`.
pub fn memory_table_len(count: [u8; 4], payload_len: u64) -> Result<usize, ProtocolError> {
    let count = u32::from_le_bytes(count) as usize;
    count
        .checked_mul(ENTRY_LEN)
        .and_then(|n| n.checked_add(4))
        .filter(|&n| n as u64 <= payload_len)
        .ok_or_else(|| malformed(format!("table of {count} ranges does not fit")))
}

/// The ranges of a table (`table` without the count), checked: page
/// aligned, not empty, no overflow, and announcing exactly `data_len`
/// bytes of data.
pub fn decode_memory_table(table: &[u8], data_len: u64) -> Result<Vec<MemoryRange>, ProtocolError> {
    let (ranges, announced) = decode_ranges(table)?;
    if announced != data_len {
        return Err(malformed(format!(
            "{data_len} data bytes for a table announcing {announced}"
        )));
    }
    Ok(ranges)
}

/// The ranges of a `Pages` message (its whole payload is the table) and
/// the bytes of data that follow it on the stream.
pub fn decode_pages_table(payload: &[u8]) -> Result<(Vec<MemoryRange>, u64), ProtocolError> {
    if payload.len() < 4 {
        return Err(malformed("no range count"));
    }
    let table_end = memory_table_len(payload[0..4].try_into().unwrap(), payload.len() as u64)?;
    if table_end != payload.len() {
        return Err(malformed(format!(
            "{} bytes after a table of {table_end}",
            payload.len() - table_end
        )));
    }
    decode_ranges(&payload[4..])
}

/// Checked ranges of a table without its count, and the data they announce.
fn decode_ranges(table: &[u8]) -> Result<(Vec<MemoryRange>, u64), ProtocolError> {
    let mut ranges = Vec::with_capacity(table.len() / ENTRY_LEN);
    let mut announced: u64 = 0;
    for e in table.chunks_exact(ENTRY_LEN) {
        let r = MemoryRange {
            gpa: u64::from_le_bytes(e[0..8].try_into().unwrap()),
            pages: u32::from_le_bytes(e[8..12].try_into().unwrap()),
            flags: u32::from_le_bytes(e[12..16].try_into().unwrap()),
        };
        if !r.gpa.is_multiple_of(PAGE_SIZE) || r.pages == 0 || r.flags & !RANGE_ZERO != 0 {
            return Err(malformed(format!("bad range {r:?}")));
        }
        r.gpa
            .checked_add(r.pages as u64 * PAGE_SIZE)
            .ok_or_else(|| malformed(format!("range {r:?} overflows")))?;
        announced += r.data_len();
        ranges.push(r);
    }
    Ok((ranges, announced))
}

/// Splits a memory message into its ranges and their data, checking that
/// the data length matches the table exactly and that ranges are page
/// aligned and do not overflow.
pub fn decode_memory(payload: &[u8]) -> Result<(Vec<MemoryRange>, &[u8]), ProtocolError> {
    if payload.len() < 4 {
        return Err(malformed("no range count"));
    }
    let table_end = memory_table_len(payload[0..4].try_into().unwrap(), payload.len() as u64)?;
    let data = &payload[table_end..];
    let ranges = decode_memory_table(&payload[4..table_end], data.len() as u64)?;
    Ok((ranges, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(ranges: &[MemoryRange], data: &[u8]) -> Vec<u8> {
        let mut m = encode_memory_header(ranges);
        m.extend_from_slice(data);
        m
    }

    #[test]
    fn ranges_and_data_round_trip_with_zero_ranges_carrying_nothing() {
        let ranges = [
            MemoryRange {
                gpa: 0x1000,
                pages: 2,
                flags: 0,
            },
            MemoryRange {
                gpa: 0x10_0000,
                pages: 100,
                flags: RANGE_ZERO,
            },
            MemoryRange {
                gpa: 0x20_0000,
                pages: 1,
                flags: 0,
            },
        ];
        let data = vec![9u8; 3 * PAGE_SIZE as usize];
        let m = message(&ranges, &data);
        let (r, d) = decode_memory(&m).unwrap();
        assert_eq!(r, ranges);
        assert_eq!(d, &data[..]);
    }

    #[test]
    fn a_pages_table_announces_its_data_and_carries_nothing_else() {
        let ranges = [
            MemoryRange {
                gpa: 0x1000,
                pages: 2,
                flags: 0,
            },
            MemoryRange {
                gpa: 0x10_0000,
                pages: 100,
                flags: RANGE_ZERO,
            },
        ];
        let t = encode_memory_header(&ranges);
        assert_eq!(
            decode_pages_table(&t).unwrap(),
            (ranges.to_vec(), 2 * PAGE_SIZE)
        );
        let mut extra = t.clone();
        extra.push(0);
        assert!(decode_pages_table(&extra).is_err());
        assert!(decode_pages_table(&t[..t.len() - 1]).is_err());
        assert!(decode_pages_table(&[1]).is_err());
    }

    #[test]
    fn inconsistent_messages_are_refused() {
        let one = [MemoryRange {
            gpa: 0,
            pages: 1,
            flags: 0,
        }];
        assert!(
            decode_memory(&message(&one, &[0; 4095])).is_err(),
            "short data"
        );
        assert!(
            decode_memory(&message(&one, &[0; 4097])).is_err(),
            "extra data"
        );
        let unaligned = [MemoryRange {
            gpa: 5,
            pages: 1,
            flags: RANGE_ZERO,
        }];
        assert!(decode_memory(&message(&unaligned, &[])).is_err());
        let empty = [MemoryRange {
            gpa: 0,
            pages: 0,
            flags: RANGE_ZERO,
        }];
        assert!(decode_memory(&message(&empty, &[])).is_err());
        let overflow = [MemoryRange {
            gpa: u64::MAX - 4095,
            pages: 2,
            flags: RANGE_ZERO,
        }];
        assert!(decode_memory(&message(&overflow, &[])).is_err());
        let mut lying = message(&one, &[0; 4096]);
        lying[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_memory(&lying).is_err());
        assert!(decode_memory(&[1, 2]).is_err());
    }
}
