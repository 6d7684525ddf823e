//! Erasure-coded storage: stripes of k data + m parity shards on k+m distinct peers.
//!
//! - `codec`: the arithmetic (reed-solomon-simd; XOR for m = 1), pure.
//! - `stripe`: stripe keys, shard headers and verification, pure.
//! - `placement`: which peers hold a stripe's shards (a walk of the ring), pure.
//! - `client`: writing and reading stripes over the network with quorum and hedging.
//! - `upkeep`: a peer's background work: repair, rebalance and drain.

pub mod bench;
pub mod client;
pub mod codec;
pub mod placement;
pub mod stripe;
pub mod upkeep;

use std::fmt;
use std::str::FromStr;

/// Largest k + m: shard indexes fit a byte and holdings fit a 64-bit mask with room.
pub const MAX_SHARDS: u8 = 32;

/// A ring's erasure code: k data shards and m parity shards per stripe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Code {
    pub k: u8,
    pub m: u8,
}

impl Code {
    pub const DEFAULT: Code = Code { k: 4, m: 2 };

    pub fn new(k: u8, m: u8) -> Result<Code, String> {
        if k == 0 || m == 0 || k as u16 + m as u16 > MAX_SHARDS as u16 {
            return Err(format!("code {k}+{m}: need k >= 1, m >= 1 and k + m <= {MAX_SHARDS}"));
        }
        Ok(Code { k, m })
    }

    pub fn total(&self) -> u8 {
        self.k + self.m
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}+{}", self.k, self.m)
    }
}

impl FromStr for Code {
    type Err = String;
    fn from_str(s: &str) -> Result<Code, String> {
        let (k, m) = s.split_once('+').ok_or_else(|| format!("code {s:?}: expected K+M, e.g. 4+2"))?;
        let k: u8 = k.trim().parse().map_err(|_| format!("code {s:?}: K is not a small number"))?;
        let m: u8 = m.trim().parse().map_err(|_| format!("code {s:?}: M is not a small number"))?;
        Code::new(k, m)
    }
}
