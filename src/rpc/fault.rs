//! Misbehaviour on purpose, for tests of what honest members do about a hostile or
//! broken peer. Set only by code that builds a `PeerConfig` (tests); the command line
//! has no way to turn it on.

use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Debug, Default)]
pub struct Fault {
    /// Store every shard with one byte flipped and its header's hash recomputed to
    /// match: a forgery the peer's own checks cannot see.
    pub forge_stored: AtomicBool,
    /// Serve every shard with one byte flipped (its header left alone).
    pub flip_served: AtomicBool,
}

impl Fault {
    pub fn set(flag: &AtomicBool, on: bool) {
        flag.store(on, Ordering::SeqCst);
    }

    pub fn on(flag: &AtomicBool) -> bool {
        flag.load(Ordering::SeqCst)
    }
}

/// Flips one byte in the middle of `data` (if any).
pub fn flip(data: &mut [u8]) {
    if !data.is_empty() {
        let i = data.len() / 2;
        data[i] ^= 0x5a;
    }
}
