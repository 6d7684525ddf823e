//! The erasure code itself: cut a stripe's bytes into k data shards, add m parity shards,
//! and get the bytes back from any k of the k+m. Pure and synchronous; callers run it on
//! the blocking pool (a 4 MiB stripe is a few milliseconds of CPU).
//!
//! m = 1 is plain XOR parity (RAID-5), which is what one Reed-Solomon parity shard amounts
//! to in spirit and is cheaper; m >= 2 is Reed-Solomon over GF(2^16) from reed-solomon-simd.

use super::Code;

/// Shards are padded to a multiple of this (the SIMD codec needs an even length; 64 keeps
/// its inner loops on whole vectors).
pub const SHARD_ALIGN: usize = 64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("need {need} shards to decode, have {have}")]
    TooFewShards { need: usize, have: usize },
    #[error("shard {index} is {got} bytes, expected {want}")]
    BadShardLength { index: usize, got: usize, want: usize },
    #[error("stripe of {len} bytes does not fit {k} shards of {shard_len} bytes")]
    BadStripeLength { len: usize, k: usize, shard_len: usize },
    #[error("codec: {0}")]
    Codec(String),
}

/// Bytes per shard for a stripe of `len` bytes.
pub fn shard_len(code: Code, len: usize) -> usize {
    len.div_ceil(code.k as usize).div_ceil(SHARD_ALIGN).max(1) * SHARD_ALIGN
}

/// All k+m shards of `data`, data shards first.
pub fn encode(code: Code, data: &[u8]) -> Result<Vec<bytes::Bytes>, CodecError> {
    let sl = shard_len(code, data.len());
    let mut padded = Vec::with_capacity(code.k as usize * sl);
    padded.extend_from_slice(data);
    encode_padded(code, padded.into(), data.len())
}

/// Room past a stripe's bytes that `encode_padded` needs to cut every data shard out of
/// the buffer itself, for any code of at most `k` data shards.
pub fn pad_room(k: u8) -> usize {
    k as usize * SHARD_ALIGN
}

/// All k+m shards of the stripe `data[..len]`, data shards first. When `data` holds
/// zeros from `len` to k shard lengths (see `pad_room`), the data shards are slices of it:
/// a sequential write no longer copies every byte into shards of their own. Otherwise the
/// stripe is copied into a padded buffer first.
pub fn encode_padded(code: Code, data: bytes::Bytes, len: usize) -> Result<Vec<bytes::Bytes>, CodecError> {
    let (k, m) = (code.k as usize, code.m as usize);
    let sl = shard_len(code, len);
    if len > data.len() {
        return Err(CodecError::BadStripeLength { len, k, shard_len: sl });
    }
    let data = if data.len() >= k * sl && data[len..k * sl].iter().all(|&b| b == 0) {
        data
    } else {
        let mut v = Vec::with_capacity(k * sl);
        v.extend_from_slice(&data[..len]);
        v.resize(k * sl, 0);
        bytes::Bytes::from(v)
    };
    let mut shards: Vec<bytes::Bytes> = (0..k).map(|i| data.slice(i * sl..(i + 1) * sl)).collect();
    if m == 1 {
        let mut parity = vec![0u8; sl];
        for s in &shards {
            xor_into(&mut parity, s);
        }
        shards.push(parity.into());
        return Ok(shards);
    }
    let parity = rs_parity(k, m, &shards).map_err(|e| CodecError::Codec(e.to_string()))?;
    shards.extend(parity.into_iter().map(bytes::Bytes::from));
    Ok(shards)
}

thread_local! {
    /// One encoder per thread, kept between stripes: a new one allocates and zeroes its
    /// working space (k+m shards' worth) for every stripe, 3 % of the mount's CPU in a
    /// sequential write. Encoding runs on the blocking pool, whose threads end when idle.
    static ENCODER: std::cell::RefCell<Option<reed_solomon_simd::ReedSolomonEncoder>> = const { std::cell::RefCell::new(None) };
}

/// The m recovery shards of k equal-length data shards.
fn rs_parity(k: usize, m: usize, shards: &[bytes::Bytes]) -> Result<Vec<Vec<u8>>, reed_solomon_simd::Error> {
    let sl = shards.first().map_or(0, |s| s.len());
    ENCODER.with(|cell| {
        let mut slot = cell.borrow_mut();
        let enc = match slot.as_mut() {
            Some(e) => {
                e.reset(k, m, sl)?;
                e
            }
            None => slot.insert(reed_solomon_simd::ReedSolomonEncoder::new(k, m, sl)?),
        };
        for s in shards {
            enc.add_original_shard(s)?;
        }
        let r = enc.encode()?;
        Ok(r.recovery_iter().map(<[u8]>::to_vec).collect())
    })
}

/// The stripe's `len` bytes from any k of its shards (`None` for a missing one). Present
/// data shards are copied once, straight into the result (this runs for every chunk read).
pub fn decode<S: AsRef<[u8]>>(code: Code, len: usize, shards: &[Option<S>]) -> Result<Vec<u8>, CodecError> {
    let (k, m) = (code.k as usize, code.m as usize);
    let sl = shard_len(code, len);
    if shards.len() != k + m {
        return Err(CodecError::Codec(format!("{} shard slots for a {code} code", shards.len())));
    }
    for (i, s) in shards.iter().enumerate() {
        if let Some(s) = s {
            if s.as_ref().len() != sl {
                return Err(CodecError::BadShardLength { index: i, got: s.as_ref().len(), want: sl });
            }
        }
    }
    let have = shards.iter().filter(|s| s.is_some()).count();
    if have < k {
        return Err(CodecError::TooFewShards { need: k, have });
    }
    if len > k * sl {
        return Err(CodecError::BadStripeLength { len, k, shard_len: sl });
    }
    let missing: Vec<usize> = (0..k).filter(|&i| shards[i].is_none()).collect();
    // Rebuilt data shards, by index (only the missing ones are filled).
    let mut rebuilt: Vec<Option<Vec<u8>>> = vec![None; k];
    if !missing.is_empty() {
        if m == 1 {
            // One data shard missing (have >= k means the parity is present).
            let mut acc = shards[k].as_ref().expect("parity present when a data shard is missing").as_ref().to_vec();
            for s in shards[..k].iter().flatten() {
                xor_into(&mut acc, s.as_ref());
            }
            rebuilt[missing[0]] = Some(acc);
        } else {
            let mut dec = reed_solomon_simd::ReedSolomonDecoder::new(k, m, sl).map_err(|e| CodecError::Codec(e.to_string()))?;
            for (i, s) in shards[..k].iter().enumerate() {
                if let Some(s) = s {
                    dec.add_original_shard(i, s.as_ref()).map_err(|e| CodecError::Codec(e.to_string()))?;
                }
            }
            for (j, s) in shards[k..].iter().enumerate() {
                if let Some(s) = s {
                    dec.add_recovery_shard(j, s.as_ref()).map_err(|e| CodecError::Codec(e.to_string()))?;
                }
            }
            let restored = dec.decode().map_err(|e| CodecError::Codec(e.to_string()))?;
            for &i in &missing {
                let r = restored.restored_original(i).ok_or_else(|| CodecError::Codec(format!("shard {i} not restored")))?;
                rebuilt[i] = Some(r.to_vec());
            }
        }
    }
    let mut out = Vec::with_capacity(len);
    for i in 0..k {
        let want = (len - out.len()).min(sl);
        if want == 0 {
            break;
        }
        let part: &[u8] = match (&shards[i], &rebuilt[i]) {
            (Some(s), _) => s.as_ref(),
            (None, Some(r)) => r,
            (None, None) => return Err(CodecError::Codec(format!("shard {i} not restored"))),
        };
        out.extend_from_slice(&part[..want]);
    }
    Ok(out)
}

fn xor_into(acc: &mut [u8], s: &[u8]) {
    for (a, b) in acc.iter_mut().zip(s) {
        *a ^= b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn code(k: u8, m: u8) -> Code {
        Code::new(k, m).unwrap()
    }

    #[test]
    fn padded_stripes_are_cut_in_place_and_only_zero_padding_counts_as_padding() {
        let c = code(4, 2);
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let want = encode(c, &data).unwrap();
        let mut padded = data.clone();
        padded.resize(data.len() + pad_room(4), 0);
        let buf = bytes::Bytes::from(padded);
        let got = encode_padded(c, buf.clone(), data.len()).unwrap();
        assert_eq!(got, want);
        assert_eq!(got[0].as_ptr(), buf.as_ptr(), "data shards are slices of the buffer");
        // Bytes past `len` that are not zeros are not padding: the stripe is copied.
        let mut dirty = data.clone();
        dirty.resize(data.len() + pad_room(4), 7);
        assert_eq!(encode_padded(c, dirty.into(), data.len()).unwrap(), want);
        assert!(encode_padded(c, bytes::Bytes::from(data.clone()), data.len() + 1).is_err());
    }

    #[test]
    fn xor_parity_is_the_xor_of_the_data_shards() {
        let c = code(3, 1);
        let data: Vec<u8> = (0..300u32).map(|i| (i * 7) as u8).collect();
        let s = encode(c, &data).unwrap();
        let x: Vec<u8> = (0..s[0].len()).map(|i| s[0][i] ^ s[1][i] ^ s[2][i]).collect();
        assert_eq!(s[3], x);
    }

    #[test]
    fn too_few_shards_is_an_error_not_garbage() {
        let c = code(4, 2);
        let s: Vec<Option<bytes::Bytes>> = encode(c, b"hello world").unwrap().into_iter().map(Some).collect();
        let mut lost = s.clone();
        lost[0] = None;
        lost[2] = None;
        lost[5] = None;
        assert_eq!(decode(c, 11, &lost), Err(CodecError::TooFewShards { need: 4, have: 3 }));
        let mut short = s.clone();
        short[1] = Some(vec![0; 3].into());
        assert!(matches!(decode(c, 11, &short), Err(CodecError::BadShardLength { index: 1, .. })));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        /// Every loss pattern of up to m shards round-trips, for several codes and sizes.
        #[test]
        fn any_m_losses_roundtrip(k in 1u8..=8, m in 1u8..=4, len in 0usize..5000, seed in any::<u64>(), lost_bits in any::<u32>()) {
            let c = code(k, m);
            let mut rng = seed;
            let data: Vec<u8> = (0..len).map(|_| { rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407); (rng >> 56) as u8 }).collect();
            let shards = encode(c, &data).unwrap();
            prop_assert_eq!(shards.len(), (k + m) as usize);
            // Pick up to m distinct shards to lose from the bit pattern.
            let mut slots: Vec<Option<bytes::Bytes>> = shards.into_iter().map(Some).collect();
            let mut lost = 0;
            for i in 0..slots.len() {
                if lost < m as usize && lost_bits & (1 << i) != 0 {
                    slots[i] = None;
                    lost += 1;
                }
            }
            prop_assert_eq!(decode(c, len, &slots).unwrap(), data);
        }
    }

    #[test]
    fn every_loss_pattern_of_4_plus_2_roundtrips_on_a_full_stripe() {
        let c = code(4, 2);
        let data: Vec<u8> = (0..4 << 20).map(|i: u32| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        let shards = encode(c, &data).unwrap();
        for a in 0..6 {
            for b in a..6 {
                let mut slots: Vec<Option<bytes::Bytes>> = shards.iter().cloned().map(Some).collect();
                slots[a] = None;
                slots[b] = None;
                assert!(decode(c, data.len(), &slots).unwrap() == data, "lost {a} and {b}");
            }
        }
    }
}
