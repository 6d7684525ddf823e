//! `mutualstore-fs bench-codec`: encode/decode throughput of one stripe on one core, next
//! to a plain memcpy of the same bytes on the same run (the ratio is what travels between
//! machines).

use super::codec::{decode, encode};
use super::Code;
use std::time::Instant;

#[derive(Debug, serde::Serialize)]
pub struct CodecBench {
    pub code: String,
    pub shard_bytes: usize,
    pub rounds: usize,
    pub encode_gb_s: f64,
    pub decode_gb_s: f64,
    pub memcpy_gb_s: f64,
}

/// Bytes/s of `f` over `bytes` per call, best of three batches (a shared machine's
/// noise only ever makes things slower).
fn rate(bytes: usize, rounds: usize, mut f: impl FnMut()) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        for _ in 0..rounds {
            f();
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    (bytes * rounds) as f64 / best / 1e9
}

pub fn run(code: Code, shard_bytes: usize, rounds: usize) -> Result<CodecBench, String> {
    let len = code.k as usize * shard_bytes;
    let data: Vec<u8> = (0..len).map(|i| (i as u32).wrapping_mul(2654435761).to_le_bytes()[1]).collect();
    let shards = encode(code, &data).map_err(|e| e.to_string())?;
    // Decode the hard way: the first m data shards are missing.
    let mut slots: Vec<Option<bytes::Bytes>> = shards.into_iter().map(Some).collect();
    for s in slots.iter_mut().take(code.m.min(code.k) as usize) {
        *s = None;
    }
    if decode(code, len, &slots).map_err(|e| e.to_string())? != data {
        return Err("decode returned different bytes".into());
    }
    let encode_gb_s = rate(len, rounds, || {
        std::hint::black_box(encode(code, std::hint::black_box(&data)).expect("encodes"));
    });
    let decode_gb_s = rate(len, rounds, || {
        std::hint::black_box(decode(code, len, std::hint::black_box(&slots)).expect("decodes"));
    });
    let mut dst = vec![0u8; len];
    let memcpy_gb_s = rate(len, rounds, || {
        dst.copy_from_slice(std::hint::black_box(&data));
        std::hint::black_box(&dst);
    });
    Ok(CodecBench { code: code.to_string(), shard_bytes, rounds, encode_gb_s, decode_gb_s, memcpy_gb_s })
}
