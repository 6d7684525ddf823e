//! Recently used small blocks, kept in memory. Records (inodes, directories, files
//! stored inline) are read on every open and lookup that revalidates; from the page
//! cache that costs microseconds, but once the kernel has dropped the image's pages
//! (memory pressure, or a benchmark's drop_caches on a machine that also runs the
//! peers) each one was a disk read of ~0.2 ms done on the peer's async worker.
//!
//! An entry is bound to the index entry's `seq`: a block that was replaced, deleted or
//! rewritten (repair, hand-off) has another seq, so a stale entry is never served, only
//! overwritten or evicted. What is cached was verified against its checksum when it was
//! read or written; scrub still reads the disk.

use super::{Block, BlockKey};
use std::collections::HashMap;

/// Blocks larger than this are not kept (shards of big files have their own path).
pub const SMALL_BLOCK_MAX: usize = 128 << 10;
/// Bytes of block data and meta kept per disk image.
pub const BUDGET_BYTES: usize = 32 << 20;

pub struct SmallCache {
    map: HashMap<BlockKey, (u64, Block)>,
    bytes: usize,
    budget: usize,
}

fn cost(b: &Block) -> usize {
    b.data.len() + b.meta.len() + 64
}

impl SmallCache {
    pub fn new(budget: usize) -> SmallCache {
        SmallCache { map: HashMap::new(), bytes: 0, budget }
    }

    /// The block stored under `key` as version `seq` of it, if kept.
    pub fn get(&self, key: &BlockKey, seq: u64) -> Option<Block> {
        match self.map.get(key) {
            Some((s, b)) if *s == seq => Some(b.clone()),
            _ => None,
        }
    }

    pub fn insert(&mut self, key: BlockKey, seq: u64, block: &Block) {
        if block.data.len() > SMALL_BLOCK_MAX {
            self.remove(&key);
            return;
        }
        if let Some((s, _)) = self.map.get(&key) {
            if *s > seq {
                return;
            }
        }
        self.bytes += cost(block);
        if let Some((_, old)) = self.map.insert(key, (seq, block.clone())) {
            self.bytes -= cost(&old);
        }
        if self.bytes > self.budget {
            self.shrink();
        }
    }

    pub fn remove(&mut self, key: &BlockKey) {
        if let Some((_, old)) = self.map.remove(key) {
            self.bytes -= cost(&old);
        }
    }

    /// Evicts down to three quarters of the budget. The victims are whichever the hash
    /// map yields first: effectively random, which needs no bookkeeping per hit and
    /// keeps a block that is used often more likely to be in (it comes back at once).
    fn shrink(&mut self) {
        let target = self.budget / 4 * 3;
        let mut victims = Vec::new();
        let mut bytes = self.bytes;
        for (k, (_, b)) in &self.map {
            if bytes <= target {
                break;
            }
            bytes -= cost(b);
            victims.push(*k);
        }
        for k in victims {
            self.remove(&k);
        }
    }

    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(n: usize, fill: u8) -> Block {
        Block { meta: vec![1, 2], data: vec![fill; n] }
    }

    #[test]
    fn an_entry_is_served_only_for_the_seq_it_was_stored_as() {
        let mut c = SmallCache::new(1 << 20);
        let k = [7u8; 20];
        c.insert(k, 5, &block(100, 1));
        assert_eq!(c.get(&k, 5).map(|b| b.data[0]), Some(1));
        assert!(c.get(&k, 6).is_none(), "a newer version on disk must not be answered from the cache");
        assert!(c.get(&k, 4).is_none());
        c.insert(k, 3, &block(100, 9));
        assert_eq!(c.get(&k, 5).map(|b| b.data[0]), Some(1), "an older seq never replaces a newer one");
        c.insert(k, 6, &block(100, 2));
        assert_eq!(c.get(&k, 6).map(|b| b.data[0]), Some(2));
        c.remove(&k);
        assert!(c.get(&k, 6).is_none());
        assert_eq!(c.bytes(), 0);
    }

    #[test]
    fn memory_stays_within_the_budget_and_big_blocks_are_not_kept() {
        let mut c = SmallCache::new(64 << 10);
        for i in 0..1000u32 {
            let mut k = [0u8; 20];
            k[..4].copy_from_slice(&i.to_be_bytes());
            c.insert(k, 1, &block(1000, 3));
            assert!(c.bytes() <= 64 << 10, "{} bytes after {i} inserts", c.bytes());
        }
        let k = [9u8; 20];
        c.insert(k, 1, &block(10, 1));
        assert!(c.get(&k, 1).is_some());
        c.insert(k, 2, &block(SMALL_BLOCK_MAX + 1, 1));
        assert!(c.get(&k, 2).is_none() && c.get(&k, 1).is_none(), "a block too big to keep drops the old copy");
    }
}
