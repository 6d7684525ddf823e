//! Naming and self-description of stripes and shards.
//!
//! A stripe is content-addressed: its key S is a hash of its code, length and bytes, so
//! anyone holding k shards can check a decode, and two writes of the same bytes are the
//! same stripe (writes are idempotent; there is never a mix of two versions under one key).
//!
//! Shard i of S is stored under the block key S[..19] ++ [i]: the shards of one stripe are
//! adjacent in a peer's index (one range scan finds them) and sit at S's ring position.
//! Every shard carries a 56-byte header (the block's metadata) naming its stripe, its
//! index, the code, the stripe length, the hash of the shard's own bytes and their
//! CRC-32C, so a peer can verify, repair and move shards without any file manifest.
//!
//! The header's version names the hash: 3 (written) is BLAKE3 cut to 160 bits; 2 is
//! SHA-1, as written before, still read, verified and repaired in kind. SHA-1 of every
//! shard was a quarter of all CPU a sequential write cost the mount and peers together
//! (mount hashing 1.5× the data, each peer re-hashing what it takes); BLAKE3 with the
//! machine's SIMD does the same in a fraction of it.

use super::codec::shard_len;
use super::Code;
use crate::blockstore::BlockKey;
use crate::ring::Id;
use sha1::{Digest, Sha1};

/// Header version of the shards and stripe keys this build writes: BLAKE3.
pub const HASH_V3: u8 = 3;
/// Header version of the SHA-1 shards and stripe keys written before; still read.
pub const HASH_V2_SHA1: u8 = 2;

/// Files are cut into stripes of k shards of this many bytes.
pub const SHARD_BYTES: usize = 1 << 20;
/// Largest shard accepted: a stripe cut for k shards may be written with a narrower
/// code while peers are down (see `StripeClient::write_stripe`), so its shards grow.
pub const MAX_SHARD_BYTES: usize = 8 << 20;
const META_TAG: u8 = b'S';
/// Header length of version 3: version 2's fields and the shard's CRC-32C.
pub const META_LEN: usize = 56;
const META_LEN_V2: usize = 52;

/// One incremental hash of either version.
enum Hasher {
    Sha1(Box<Sha1>),
    Blake3(Box<blake3::Hasher>),
}

impl Hasher {
    fn new(version: u8) -> Hasher {
        if version == HASH_V2_SHA1 {
            Hasher::Sha1(Box::default())
        } else {
            Hasher::Blake3(Box::default())
        }
    }

    fn update(&mut self, b: &[u8]) {
        match self {
            Hasher::Sha1(h) => h.update(b),
            Hasher::Blake3(h) => {
                h.update(b);
            }
        }
    }

    fn finish(self) -> Id {
        match self {
            Hasher::Sha1(h) => Id::from_slice(&h.finalize()).expect("sha1 is 20 bytes"),
            Hasher::Blake3(h) => Id::from_slice(&h.finalize().as_bytes()[..20]).expect("20 bytes"),
        }
    }
}

/// The hash of a shard's bytes under header version `version`.
pub fn shard_digest(version: u8, data: &[u8]) -> Id {
    let mut h = Hasher::new(version);
    h.update(data);
    h.finish()
}

/// Ring key of a stripe with these bytes under this code: a hash over the code, the
/// length and the hashes of the k data shards (the stripe split as `codec::encode` splits
/// it, zero-padded), so a writer hashes each byte once — the shard hashes go into the
/// shard headers anyway — and still commits to every byte of the stripe.
pub fn stripe_key(version: u8, code: Code, data: &[u8]) -> Id {
    let sl = shard_len(code, data.len());
    let hashes: Vec<Id> = (0..code.k as usize)
        .map(|i| {
            let piece = &data[(i * sl).min(data.len())..((i + 1) * sl).min(data.len())];
            let mut h = Hasher::new(version);
            h.update(piece);
            let zeros = [0u8; 4096];
            let mut pad = sl - piece.len();
            while pad > 0 {
                let n = pad.min(zeros.len());
                h.update(&zeros[..n]);
                pad -= n;
            }
            h.finish()
        })
        .collect();
    key_of_shards(version, code, data.len(), &hashes)
}

/// The stripe key from its data shards' hashes (see `stripe_key`).
fn key_of_shards(version: u8, code: Code, len: usize, data_shard_hashes: &[Id]) -> Id {
    let mut h = Hasher::new(version);
    h.update(if version == HASH_V2_SHA1 { b"MSSTRIPE2" } else { b"MSSTRIPE3" });
    h.update(&[code.k, code.m]);
    h.update(&(len as u64).to_be_bytes());
    for x in data_shard_hashes {
        h.update(&x.to_bytes());
    }
    h.finish()
}

/// Block key under which shard `index` of stripe `s` is stored.
pub fn shard_block_key(s: Id, index: u8) -> BlockKey {
    let mut k = s.to_bytes();
    k[19] = index;
    k
}

/// The inclusive range of block keys that can hold shards of `s`.
pub fn shard_key_range(s: Id) -> (BlockKey, BlockKey) {
    (shard_block_key(s, 0), shard_block_key(s, u8::MAX))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardMeta {
    /// Which hash `stripe` and `shard_hash` are (`HASH_V3` or `HASH_V2_SHA1`).
    pub version: u8,
    pub code: Code,
    pub index: u8,
    pub stripe_len: u32,
    pub stripe: Id,
    pub shard_hash: Id,
    /// CRC-32C of the shard (version 3; version 2 headers have none). What a peer checks
    /// a shard against when it takes one: the disk record needs that CRC anyway, so the
    /// check is free, where re-hashing every shard was 7 % of all CPU of a sequential
    /// write. It catches what goes wrong between honest parties (a sender's bug, a
    /// damaged transfer); a dishonest sender can forge both, and the hash catches that
    /// wherever shards are used (reads, repair, audit).
    pub shard_crc: Option<u32>,
}

impl ShardMeta {
    /// This header with the hash of other bytes (a fault injection forging a shard).
    pub fn rehashed(self, shard: &[u8]) -> ShardMeta {
        ShardMeta { shard_hash: shard_digest(self.version, shard), shard_crc: self.shard_crc.map(|_| crc32c::crc32c(shard)), ..self }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(META_LEN);
        b.extend_from_slice(&[META_TAG, self.version, self.code.k, self.code.m, self.index, 0, 0, 0]);
        b.extend_from_slice(&self.stripe_len.to_be_bytes());
        b.extend_from_slice(&self.stripe.to_bytes());
        b.extend_from_slice(&self.shard_hash.to_bytes());
        if let Some(crc) = self.shard_crc {
            b.extend_from_slice(&crc.to_be_bytes());
        }
        b
    }

    /// Parses and checks the fields against each other; the bytes may be hostile.
    pub fn decode(b: &[u8]) -> Result<ShardMeta, String> {
        if b.len() < META_LEN_V2 || b[0] != META_TAG {
            return Err("not a shard header".into());
        }
        let version = b[1];
        let want_len = match version {
            HASH_V3 => META_LEN,
            HASH_V2_SHA1 => META_LEN_V2,
            _ => return Err(format!("shard header version {version} (this build reads {HASH_V2_SHA1} and {HASH_V3})")),
        };
        if b.len() != want_len {
            return Err(format!("shard header of version {version} is {} bytes, not {want_len}", b.len()));
        }
        let code = Code::new(b[2], b[3])?;
        let index = b[4];
        if index >= code.total() {
            return Err(format!("shard index {index} out of range for a {code} code"));
        }
        let stripe_len = u32::from_be_bytes(b[8..12].try_into().expect("4 bytes"));
        if stripe_len as usize > code.k as usize * MAX_SHARD_BYTES {
            return Err(format!("stripe length {stripe_len} too large for a {code} code"));
        }
        let stripe = Id::from_slice(&b[12..32]).ok_or("bad stripe key")?;
        let shard_hash = Id::from_slice(&b[32..52]).ok_or("bad shard hash")?;
        let shard_crc = (version == HASH_V3).then(|| u32::from_be_bytes(b[52..56].try_into().expect("4 bytes")));
        Ok(ShardMeta { version, code, index, stripe_len, stripe, shard_hash, shard_crc })
    }

    pub fn shard_len(&self) -> usize {
        shard_len(self.code, self.stripe_len as usize)
    }

    pub fn block_key(&self) -> BlockKey {
        shard_block_key(self.stripe, self.index)
    }

    /// Whether `data` is exactly the shard this header describes.
    pub fn verifies(&self, data: &[u8]) -> bool {
        data.len() == self.shard_len() && shard_digest(self.version, data) == self.shard_hash
    }

    /// Whether `data`, whose CRC-32C is `crc`, arrived as the sender described it: its
    /// length, and its CRC (version 3) or hash (version 2). See `shard_crc`.
    pub fn arrived_intact(&self, data: &[u8], crc: u32) -> bool {
        match self.shard_crc {
            Some(want) => data.len() == self.shard_len() && crc == want,
            None => self.verifies(data),
        }
    }
}

/// A shard as moved between peers: its header and bytes, verified by whoever builds one.
#[derive(Debug, Clone)]
pub struct Shard {
    pub meta: ShardMeta,
    /// Shared, not copied, between the coder, the requests that carry it and retries.
    pub data: bytes::Bytes,
}

/// Splits and encodes one stripe; returns its key and all k+m shards.
pub fn make_stripe(code: Code, data: &[u8]) -> Result<(Id, Vec<Shard>), super::codec::CodecError> {
    make_stripe_as(HASH_V3, code, data)
}

/// `make_stripe` under a given header version: re-encoding an existing stripe to repair
/// it must give the shards it had, so a stripe written with SHA-1 stays SHA-1.
pub fn make_stripe_as(version: u8, code: Code, data: &[u8]) -> Result<(Id, Vec<Shard>), super::codec::CodecError> {
    shards_of(version, code, super::codec::encode(code, data)?, data.len())
}

/// `make_stripe` of `data[..len]` where `data` may carry zero padding past `len`
/// (`codec::encode_padded`: the data shards are then slices of `data`, not copies).
pub fn make_stripe_padded(code: Code, data: bytes::Bytes, len: usize) -> Result<(Id, Vec<Shard>), super::codec::CodecError> {
    shards_of(HASH_V3, code, super::codec::encode_padded(code, data, len)?, len)
}

fn shards_of(version: u8, code: Code, shards: Vec<bytes::Bytes>, len: usize) -> Result<(Id, Vec<Shard>), super::codec::CodecError> {
    let hashes: Vec<Id> = shards.iter().map(|d| shard_digest(version, d)).collect();
    let crcs: Vec<Option<u32>> = shards.iter().map(|d| (version == HASH_V3).then(|| crc32c::crc32c(d))).collect();
    let s = key_of_shards(version, code, len, &hashes[..code.k as usize]);
    let out = shards
        .into_iter()
        .zip(hashes.into_iter().zip(crcs))
        .enumerate()
        .map(|(i, (data, (shard_hash, shard_crc)))| Shard { meta: ShardMeta { version, code, index: i as u8, stripe_len: len as u32, stripe: s, shard_hash, shard_crc }, data })
        .collect();
    Ok((s, out))
}

/// Decodes a stripe from verified shards (any order, any k of them) and checks the result
/// against the stripe key; a decode that does not hash to the key is an error, never data.
/// The hash is the one the shards' headers name (a forger gains nothing by naming the
/// other: the key must still match).
pub fn assemble<'a>(stripe: Id, code: Code, len: usize, shards: impl IntoIterator<Item = &'a Shard> + Clone) -> Result<Vec<u8>, String> {
    let version = shards.clone().into_iter().next().map_or(HASH_V3, |s| s.meta.version);
    let data = decode_unchecked(stripe, code, len, shards.into_iter().filter(|s| s.meta.version == version))?;
    if stripe_key(version, code, &data) != stripe {
        return Err(format!("stripe {} decodes to bytes with a different hash", stripe.to_hex()));
    }
    Ok(data)
}

/// Decodes a stripe without checking the result against its key: only for a caller that
/// authenticates the bytes itself (see `StripeClient::read_stripe_opened`).
pub fn decode_unchecked<'a>(stripe: Id, code: Code, len: usize, shards: impl IntoIterator<Item = &'a Shard>) -> Result<Vec<u8>, String> {
    let mut slots: Vec<Option<&[u8]>> = vec![None; code.total() as usize];
    for s in shards {
        // Shards' own hashes are not checked: the decoded whole is (against the stripe
        // key, which no peer can forge, or by the caller); a reader hashes shards only to
        // find a bad one after a failed decode (`Read::drop_unverified`).
        if s.meta.stripe == stripe && s.meta.code == code && s.meta.stripe_len as usize == len && s.data.len() == s.meta.shard_len() {
            slots[s.meta.index as usize] = Some(&s.data);
        }
    }
    super::codec::decode(code, len, &slots).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_a_writer_makes_is_the_key_a_reader_checks_and_commits_to_every_byte() {
        for version in [HASH_V3, HASH_V2_SHA1] {
            for (k, m) in [(2u8, 1u8), (4, 2), (3, 3)] {
                let code = Code::new(k, m).unwrap();
                for len in [1usize, 63, 64, 65, 4095, 4097, 3 * 64 * 1000 + 7] {
                    let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
                    let (s, shards) = make_stripe_as(version, code, &data).unwrap();
                    assert_eq!(s, stripe_key(version, code, &data), "v{version} {code} len {len}");
                    assert!(shards.iter().all(|x| x.meta.version == version && x.meta.verifies(&x.data)));
                    let mut other = data.clone();
                    other[len - 1] ^= 1;
                    assert_ne!(s, stripe_key(version, code, &other), "{code} len {len}: last byte not covered");
                    // Padding is not data: a stripe one zero byte longer is another stripe.
                    let mut longer = data.clone();
                    longer.push(0);
                    assert_ne!(s, stripe_key(version, code, &longer));
                    assert_eq!(assemble(s, code, len, shards.iter().skip(m as usize)).unwrap(), data);
                }
            }
        }
    }

    #[test]
    fn stripes_written_with_sha1_keep_their_keys_and_headers() {
        // The key the SHA-1 build gave "some bytes" under 2+1 (also computed with Python's
        // hashlib from the layout in `stripe_key`): peers still hold such stripes.
        let code = Code::new(2, 1).unwrap();
        let (s, shards) = make_stripe_as(HASH_V2_SHA1, code, b"some bytes").unwrap();
        assert_eq!(s.to_hex(), "89f2cf88bd53b3c1c26b08223fcbcea7cc0fc8f3");
        assert_eq!(shards[2].meta.shard_hash, Id::sha1(&shards[2].data));
        let header = shards[2].meta.encode();
        assert_eq!(header[1], 2);
        assert_eq!(ShardMeta::decode(&header).unwrap(), shards[2].meta);
        assert_eq!(assemble(s, code, 10, &shards[1..]).unwrap(), b"some bytes");
        // The same bytes written now are another stripe, which the old key does not check.
        let (s3, shards3) = make_stripe(code, b"some bytes").unwrap();
        assert_ne!(s3, s);
        assert!(assemble(s, code, 10, &shards3[1..]).is_err());
        let mut other = header.clone();
        other[1] = 4;
        assert!(ShardMeta::decode(&other).is_err());
    }

    #[test]
    fn meta_roundtrips_and_rejects_nonsense() {
        let code = Code::new(4, 2).unwrap();
        let (s, shards) = make_stripe(code, b"some bytes").unwrap();
        let m = shards[5].meta;
        assert_eq!(ShardMeta::decode(&m.encode()).unwrap(), m);
        assert!(m.verifies(&shards[5].data));
        assert!(!m.verifies(&shards[4].data));
        assert_eq!(m.block_key()[..19], s.to_bytes()[..19]);
        let mut bad = m.encode();
        bad[4] = 6;
        assert!(ShardMeta::decode(&bad).is_err());
        assert!(ShardMeta::decode(&bad[..10]).is_err());
        let mut bad = m.encode();
        bad[2] = 0;
        assert!(ShardMeta::decode(&bad).is_err());
    }

    #[test]
    fn a_peer_takes_a_shard_by_its_crc_and_an_old_one_by_its_hash() {
        let code = Code::new(2, 1).unwrap();
        let (_, shards) = make_stripe(code, &[9u8; 3000]).unwrap();
        let sh = &shards[1];
        assert_eq!(sh.meta.encode().len(), META_LEN);
        assert!(sh.meta.arrived_intact(&sh.data, crc32c::crc32c(&sh.data)));
        let mut damaged = sh.data.to_vec();
        damaged[7] ^= 0x10;
        assert!(!sh.meta.arrived_intact(&damaged, crc32c::crc32c(&damaged)));
        assert!(!sh.meta.arrived_intact(&sh.data[1..], crc32c::crc32c(&sh.data[1..])));
        // Version 2 headers carry no CRC: the hash decides, whatever CRC is offered.
        let (_, old) = make_stripe_as(HASH_V2_SHA1, code, &[9u8; 3000]).unwrap();
        assert_eq!(old[1].meta.shard_crc, None);
        assert!(old[1].meta.arrived_intact(&old[1].data, 0));
        assert!(!old[1].meta.arrived_intact(&damaged, crc32c::crc32c(&damaged)));
        // A v3 header cut to v2's length, or a v2 header grown to v3's, is refused.
        assert!(ShardMeta::decode(&sh.meta.encode()[..52]).is_err());
        let mut grown = old[1].meta.encode();
        grown.extend_from_slice(&[0; 4]);
        assert!(ShardMeta::decode(&grown).is_err());
    }

    #[test]
    fn assemble_refuses_a_forged_shard_with_a_consistent_header() {
        let code = Code::new(2, 1).unwrap();
        let data = vec![7u8; 1000];
        let (s, mut shards) = make_stripe(code, &data).unwrap();
        assert_eq!(assemble(s, code, data.len(), &shards[1..]).unwrap(), data);
        // A hostile peer rewrites shard 0 and its header hash to match.
        let mut forged = shards[0].data.to_vec();
        forged[0] ^= 1;
        shards[0].data = forged.into();
        shards[0].meta = shards[0].meta.rehashed(&shards[0].data);
        assert!(assemble(s, code, data.len(), &shards[..2]).is_err());
    }
}
