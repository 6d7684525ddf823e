//! Naming and self-description of stripes and shards.
//!
//! A stripe is content-addressed: its key S is the SHA-1 of its code, length and bytes, so
//! anyone holding k shards can check a decode, and two writes of the same bytes are the
//! same stripe (writes are idempotent; there is never a mix of two versions under one key).
//!
//! Shard i of S is stored under the block key S[..19] ++ [i]: the shards of one stripe are
//! adjacent in a peer's index (one range scan finds them) and sit at S's ring position.
//! Every shard carries a 52-byte header (the block's metadata) naming its stripe, its
//! index, the code, the stripe length and the SHA-1 of the shard's own bytes, so a peer
//! can verify, repair and move shards without any file manifest.

use super::codec::shard_len;
use super::Code;
use crate::blockstore::BlockKey;
use crate::ring::Id;
use sha1::{Digest, Sha1};

/// Files are cut into stripes of k shards of this many bytes.
pub const SHARD_BYTES: usize = 1 << 20;
/// Largest shard accepted: a stripe cut for k shards may be written with a narrower
/// code while peers are down (see `StripeClient::write_stripe`), so its shards grow.
pub const MAX_SHARD_BYTES: usize = 8 << 20;
const META_TAG: u8 = b'S';
const META_VERSION: u8 = 2;
pub const META_LEN: usize = 52;

/// Ring key of a stripe with these bytes under this code: a hash over the code, the
/// length and the hashes of the k data shards (the stripe split as `codec::encode` splits
/// it, zero-padded), so a writer hashes each byte once — the shard hashes go into the
/// shard headers anyway — and still commits to every byte of the stripe.
pub fn stripe_key(code: Code, data: &[u8]) -> Id {
    let sl = shard_len(code, data.len());
    let hashes: Vec<Id> = (0..code.k as usize)
        .map(|i| {
            let piece = &data[(i * sl).min(data.len())..((i + 1) * sl).min(data.len())];
            let mut h = Sha1::new();
            h.update(piece);
            let zeros = [0u8; 4096];
            let mut pad = sl - piece.len();
            while pad > 0 {
                let n = pad.min(zeros.len());
                h.update(&zeros[..n]);
                pad -= n;
            }
            Id::from_slice(&h.finalize()).expect("sha1 is 20 bytes")
        })
        .collect();
    key_of_shards(code, data.len(), &hashes)
}

/// The stripe key from its data shards' hashes (see `stripe_key`).
fn key_of_shards(code: Code, len: usize, data_shard_hashes: &[Id]) -> Id {
    let mut h = Sha1::new();
    h.update(b"MSSTRIPE2");
    h.update([code.k, code.m]);
    h.update((len as u64).to_be_bytes());
    for x in data_shard_hashes {
        h.update(x.to_bytes());
    }
    Id::from_slice(&h.finalize()).expect("sha1 is 20 bytes")
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
    pub code: Code,
    pub index: u8,
    pub stripe_len: u32,
    pub stripe: Id,
    pub shard_hash: Id,
}

impl ShardMeta {
    pub fn new(code: Code, index: u8, stripe: Id, stripe_len: usize, shard: &[u8]) -> ShardMeta {
        ShardMeta { code, index, stripe_len: stripe_len as u32, stripe, shard_hash: Id::sha1(shard) }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(META_LEN);
        b.extend_from_slice(&[META_TAG, META_VERSION, self.code.k, self.code.m, self.index, 0, 0, 0]);
        b.extend_from_slice(&self.stripe_len.to_be_bytes());
        b.extend_from_slice(&self.stripe.to_bytes());
        b.extend_from_slice(&self.shard_hash.to_bytes());
        b
    }

    /// Parses and checks the fields against each other; the bytes may be hostile.
    pub fn decode(b: &[u8]) -> Result<ShardMeta, String> {
        if b.len() != META_LEN || b[0] != META_TAG {
            return Err("not a shard header".into());
        }
        if b[1] != META_VERSION {
            return Err(format!("shard header version {} (this build reads {META_VERSION})", b[1]));
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
        Ok(ShardMeta { code, index, stripe_len, stripe, shard_hash })
    }

    pub fn shard_len(&self) -> usize {
        shard_len(self.code, self.stripe_len as usize)
    }

    pub fn block_key(&self) -> BlockKey {
        shard_block_key(self.stripe, self.index)
    }

    /// Whether `data` is exactly the shard this header describes.
    pub fn verifies(&self, data: &[u8]) -> bool {
        data.len() == self.shard_len() && Id::sha1(data) == self.shard_hash
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
    let shards = super::codec::encode(code, data)?;
    let hashes: Vec<Id> = shards.iter().map(|d| Id::sha1(d)).collect();
    let s = key_of_shards(code, data.len(), &hashes[..code.k as usize]);
    let out = shards
        .into_iter()
        .zip(hashes)
        .enumerate()
        .map(|(i, (d, shard_hash))| Shard { meta: ShardMeta { code, index: i as u8, stripe_len: data.len() as u32, stripe: s, shard_hash }, data: d.into() })
        .collect();
    Ok((s, out))
}

/// Decodes a stripe from verified shards (any order, any k of them) and checks the result
/// against the stripe key; a decode that does not hash to the key is an error, never data.
pub fn assemble<'a>(stripe: Id, code: Code, len: usize, shards: impl IntoIterator<Item = &'a Shard>) -> Result<Vec<u8>, String> {
    let data = decode_unchecked(stripe, code, len, shards)?;
    if stripe_key(code, &data) != stripe {
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
        for (k, m) in [(2u8, 1u8), (4, 2), (3, 3)] {
            let code = Code::new(k, m).unwrap();
            for len in [1usize, 63, 64, 65, 4095, 4097, 3 * 64 * 1000 + 7] {
                let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
                let (s, shards) = make_stripe(code, &data).unwrap();
                assert_eq!(s, stripe_key(code, &data), "{code} len {len}");
                assert!(shards.iter().all(|x| x.meta.verifies(&x.data)));
                let mut other = data.clone();
                other[len - 1] ^= 1;
                assert_ne!(s, stripe_key(code, &other), "{code} len {len}: last byte not covered");
                // Padding is not data: a stripe one zero byte longer is another stripe.
                let mut longer = data.clone();
                longer.push(0);
                assert_ne!(s, stripe_key(code, &longer));
                assert_eq!(assemble(s, code, len, shards.iter().skip(m as usize)).unwrap(), data);
            }
        }
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
    fn assemble_refuses_a_forged_shard_with_a_consistent_header() {
        let code = Code::new(2, 1).unwrap();
        let data = vec![7u8; 1000];
        let (s, mut shards) = make_stripe(code, &data).unwrap();
        assert_eq!(assemble(s, code, data.len(), &shards[1..]).unwrap(), data);
        // A hostile peer rewrites shard 0 and its header hash to match.
        let mut forged = shards[0].data.to_vec();
        forged[0] ^= 1;
        shards[0].data = forged.into();
        shards[0].meta.shard_hash = Id::sha1(&shards[0].data);
        assert!(assemble(s, code, data.len(), &shards[..2]).is_err());
    }
}
