//! Byte layout of the superblock and of record headers (pure encode/decode,
//! no I/O). Every decoder bounds-checks every field: the bytes may come from
//! a corrupt or hostile file, so nothing here may panic on any input.

use super::{BlockKey, MAX_DATA_BYTES, MAX_META_BYTES};

/// Allocation unit. Records start on unit boundaries.
pub(crate) const UNIT: u64 = 4096;
/// Fixed size of a record header; data follows it directly.
pub(crate) const HEADER_LEN: usize = 128;
/// Bytes of unit 0 that the superblock occupies (the rest of unit 0 is zero).
pub(crate) const SUPERBLOCK_LEN: usize = 64;
pub(crate) const FORMAT_VERSION: u32 = 1;
/// Sequence numbers above this are rejected as forged: a real image would
/// need centuries of writes to get there, and the headroom means the
/// counter can never overflow.
pub(crate) const MAX_SEQ: u64 = 1 << 62;

const IMAGE_MAGIC: &[u8; 8] = b"MSIMG001";
const RECORD_MAGIC: &[u8; 8] = b"MSREC001";
const KIND_BLOCK: u8 = 1;
const KIND_FREE: u8 = 2;
/// Offset of the header checksum; it covers bytes [0, HEADER_CRC_AT).
const HEADER_CRC_AT: usize = HEADER_LEN - 4;
const SUPERBLOCK_CRC_AT: usize = SUPERBLOCK_LEN - 4;

/// Units a block record of `data_len` bytes occupies (header included).
pub(crate) fn units_for(data_len: usize) -> u64 {
    (HEADER_LEN as u64 + data_len as u64).div_ceil(UNIT)
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[at..at + 2]);
    u16::from_le_bytes(a)
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Unit 0. Written once when the image is created and never rewritten, so it
/// can never be torn by a crash after creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Superblock {
    pub capacity: u64,
    /// Random per-image value mixed into every header checksum, so a header
    /// forged inside block data (or copied from another image) never
    /// validates.
    pub nonce: u64,
}

impl Superblock {
    pub(crate) fn encode(&self) -> [u8; SUPERBLOCK_LEN] {
        let mut b = [0u8; SUPERBLOCK_LEN];
        b[0..8].copy_from_slice(IMAGE_MAGIC);
        b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(UNIT as u32).to_le_bytes());
        b[16..24].copy_from_slice(&self.capacity.to_le_bytes());
        b[24..32].copy_from_slice(&self.nonce.to_le_bytes());
        b[32..36].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        let crc = crc32c::crc32c(&b[..SUPERBLOCK_CRC_AT]);
        b[SUPERBLOCK_CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Err carries a human-readable reason (becomes StoreError::BadImage).
    pub(crate) fn decode(b: &[u8]) -> Result<Superblock, String> {
        if b.len() < SUPERBLOCK_LEN {
            return Err(format!("superblock truncated ({} bytes)", b.len()));
        }
        if &b[0..8] != IMAGE_MAGIC {
            return Err("not a MutualStore disk image (bad magic)".into());
        }
        let crc = crc32c::crc32c(&b[..SUPERBLOCK_CRC_AT]);
        if crc != le_u32(b, SUPERBLOCK_CRC_AT) {
            return Err("superblock checksum mismatch".into());
        }
        let version = le_u32(b, 8);
        if version != FORMAT_VERSION {
            return Err(format!(
                "format version {version} not supported (expected {FORMAT_VERSION})"
            ));
        }
        let unit = le_u32(b, 12);
        let header = le_u32(b, 32);
        if u64::from(unit) != UNIT || header as usize != HEADER_LEN {
            return Err(format!(
                "unit size {unit} / header size {header} not supported (expected {UNIT} / {HEADER_LEN})"
            ));
        }
        Ok(Superblock {
            capacity: le_u64(b, 16),
            nonce: le_u64(b, 24),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Block,
    Free,
}

/// A decoded, checksum-verified record header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Header {
    pub kind: Kind,
    /// Length of the whole record in units, header included (>= 1).
    pub units: u64,
    pub seq: u64,
    pub key: BlockKey,
    pub data_len: u32,
    pub data_crc: u32,
    pub meta: Vec<u8>,
}

impl Header {
    pub(crate) fn free(units: u64) -> Header {
        Header {
            kind: Kind::Free,
            units,
            seq: 0,
            key: [0; 20],
            data_len: 0,
            data_crc: 0,
            meta: Vec::new(),
        }
    }

    /// Caller has validated meta/data sizes.
    pub(crate) fn block(
        key: &BlockKey,
        meta: &[u8],
        data_len: usize,
        data_crc: u32,
        seq: u64,
    ) -> Header {
        Header {
            kind: Kind::Block,
            units: units_for(data_len),
            seq,
            key: *key,
            data_len: data_len as u32,
            data_crc,
            meta: meta.to_vec(),
        }
    }

    pub(crate) fn encode(&self, nonce: u64) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(RECORD_MAGIC);
        b[8..10].copy_from_slice(&(FORMAT_VERSION as u16).to_le_bytes());
        b[10] = match self.kind {
            Kind::Block => KIND_BLOCK,
            Kind::Free => KIND_FREE,
        };
        let meta_len = self.meta.len().min(MAX_META_BYTES);
        b[11] = meta_len as u8;
        b[12..16].copy_from_slice(&self.data_len.to_le_bytes());
        b[16..24].copy_from_slice(&self.units.to_le_bytes());
        b[24..32].copy_from_slice(&self.seq.to_le_bytes());
        b[32..52].copy_from_slice(&self.key);
        b[52..56].copy_from_slice(&self.data_crc.to_le_bytes());
        b[56..56 + meta_len].copy_from_slice(&self.meta[..meta_len]);
        let crc = header_crc(nonce, &b);
        b[HEADER_CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes the header found at `unit` of an image with `total_units`
    /// units. Rejects anything inconsistent, including records that would
    /// run past the end of the image.
    pub(crate) fn decode(
        b: &[u8],
        nonce: u64,
        unit: u64,
        total_units: u64,
    ) -> Result<Header, String> {
        if b.len() < HEADER_LEN {
            return Err("header truncated".into());
        }
        if &b[0..8] != RECORD_MAGIC {
            return Err("bad record magic".into());
        }
        if header_crc(nonce, b) != le_u32(b, HEADER_CRC_AT) {
            return Err("header checksum mismatch".into());
        }
        // Past the checksum the fields were written by us, but an image from
        // a buggy or hostile writer could still carry nonsense: check all.
        if le_u16(b, 8) != FORMAT_VERSION as u16 {
            return Err(format!("record format version {}", le_u16(b, 8)));
        }
        let kind = match b[10] {
            KIND_BLOCK => Kind::Block,
            KIND_FREE => Kind::Free,
            k => return Err(format!("unknown record kind {k}")),
        };
        let meta_len = b[11] as usize;
        let data_len = le_u32(b, 12);
        let units = le_u64(b, 16);
        if meta_len > MAX_META_BYTES {
            return Err(format!("meta length {meta_len} > {MAX_META_BYTES}"));
        }
        if data_len as usize > MAX_DATA_BYTES {
            return Err(format!("data length {data_len} > {MAX_DATA_BYTES}"));
        }
        let end = unit.checked_add(units).ok_or("record length overflows")?;
        if units == 0 || unit == 0 || end > total_units {
            return Err(format!(
                "record of {units} units at unit {unit} does not fit the image"
            ));
        }
        let seq = le_u64(b, 24);
        if seq > MAX_SEQ {
            return Err(format!("implausible sequence number {seq}"));
        }
        if kind == Kind::Block && units != units_for(data_len as usize) {
            return Err(format!("block of {data_len} bytes claims {units} units"));
        }
        let mut key = [0u8; 20];
        key.copy_from_slice(&b[32..52]);
        Ok(Header {
            kind,
            units,
            seq,
            key,
            data_len,
            data_crc: le_u32(b, 52),
            meta: b[56..56 + meta_len].to_vec(),
        })
    }
}

fn header_crc(nonce: u64, b: &[u8]) -> u32 {
    let seeded = crc32c::crc32c(&nonce.to_le_bytes());
    crc32c::crc32c_append(seeded, &b[..HEADER_CRC_AT])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_for_counts_header() {
        assert_eq!(units_for(0), 1);
        assert_eq!(units_for(4096 - 128), 1);
        assert_eq!(units_for(4096 - 127), 2);
        assert_eq!(units_for(4096), 2);
        assert_eq!(units_for(MAX_DATA_BYTES), 4097);
    }

    #[test]
    fn superblock_round_trip_and_rejects_damage() {
        let sb = Superblock {
            capacity: 1 << 30,
            nonce: 42,
        };
        let mut b = sb.encode();
        assert_eq!(Superblock::decode(&b), Ok(sb));
        b[17] ^= 1;
        assert!(Superblock::decode(&b).unwrap_err().contains("checksum"));
        assert!(Superblock::decode(&[0u8; 10]).is_err());
        assert!(Superblock::decode(&[0u8; 64])
            .unwrap_err()
            .contains("magic"));
    }

    #[test]
    fn header_round_trip() {
        let h = Header::block(&[7; 20], b"meta!", 5000, 0xdead_beef, 99);
        let b = h.encode(5);
        assert_eq!(Header::decode(&b, 5, 3, 100), Ok(h));
        let f = Header::free(17);
        assert_eq!(Header::decode(&f.encode(5), 5, 3, 100), Ok(f));
    }

    #[test]
    fn header_rejects_wrong_nonce_bounds_and_flips() {
        let b = Header::block(&[1; 20], b"", 10, 1, 1).encode(5);
        assert!(Header::decode(&b, 6, 3, 100).is_err(), "foreign nonce");
        assert!(Header::decode(&b, 5, 100, 100).is_err(), "past the end");
        assert!(Header::decode(&b, 5, 0, 100).is_err(), "superblock unit");
        for i in 0..HEADER_LEN {
            let mut c = b;
            c[i] ^= 0x10;
            assert!(Header::decode(&c, 5, 3, 100).is_err(), "flip at byte {i}");
        }
        let huge = Header::free(u64::MAX).encode(5);
        assert!(Header::decode(&huge, 5, 3, 100).is_err());
        let mut forged = Header::free(1);
        forged.seq = u64::MAX;
        assert!(Header::decode(&forged.encode(5), 5, 3, 100).is_err());
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200),
                               unit in 0u64..10, total in 0u64..20) {
            let _ = Header::decode(&bytes, 0, unit, total);
            let _ = Superblock::decode(&bytes);
        }
    }
}
