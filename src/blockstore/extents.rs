//! In-memory map of free extents (in units), rebuilt at every open from the
//! record chain. Adjacent free extents are always coalesced, so best-fit sees
//! the largest holes that really exist.

use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Default)]
pub(crate) struct FreeMap {
    /// start -> length
    by_start: BTreeMap<u64, u64>,
    /// (length, start), for best-fit lookups
    by_len: BTreeSet<(u64, u64)>,
    total: u64,
}

impl FreeMap {
    pub(crate) fn total_units(&self) -> u64 {
        self.total
    }

    #[cfg(test)]
    pub(crate) fn extents(&self) -> Vec<(u64, u64)> {
        self.by_start.iter().map(|(&s, &l)| (s, l)).collect()
    }

    /// Smallest free extent holding at least `units`: (start, length).
    pub(crate) fn best_fit(&self, units: u64) -> Option<(u64, u64)> {
        self.by_len
            .range((units, 0)..)
            .next()
            .map(|&(len, start)| (start, len))
    }

    /// The extent that freeing [start, start+len) would produce once merged
    /// with free neighbours; does not modify the map.
    pub(crate) fn merged_span(&self, start: u64, len: u64) -> (u64, u64) {
        let end = start + len;
        let left = match self.by_start.range(..start).next_back() {
            Some((&s, &l)) if s + l == start => s,
            _ => start,
        };
        let right = self.by_start.get(&end).map_or(end, |&l| end + l);
        (left, right)
    }

    /// Adds [start, start+len) and coalesces it with its neighbours.
    /// Returns the resulting extent as (start, end).
    pub(crate) fn insert(&mut self, start: u64, len: u64) -> (u64, u64) {
        debug_assert!(len > 0);
        let (left, right) = self.merged_span(start, len);
        if left < start {
            self.remove(left);
        }
        if right > start + len {
            self.remove(start + len);
        }
        self.add_exact(left, right - left);
        (left, right)
    }

    /// Removes the extent starting exactly at `start`; returns its length.
    pub(crate) fn remove(&mut self, start: u64) -> Option<u64> {
        let len = self.by_start.remove(&start)?;
        self.by_len.remove(&(len, start));
        self.total -= len;
        Some(len)
    }

    /// Adds an extent known not to touch any other free extent.
    pub(crate) fn add_exact(&mut self, start: u64, len: u64) {
        self.by_start.insert(start, len);
        self.by_len.insert((len, start));
        self.total += len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalesces_both_sides() {
        let mut m = FreeMap::default();
        m.insert(10, 5);
        m.insert(20, 5);
        assert_eq!(m.merged_span(15, 5), (10, 25));
        assert_eq!(m.insert(15, 5), (10, 25));
        assert_eq!(m.extents(), vec![(10, 15)]);
        assert_eq!(m.total_units(), 15);
    }

    #[test]
    fn best_fit_picks_smallest_sufficient() {
        let mut m = FreeMap::default();
        m.insert(1, 10);
        m.insert(20, 3);
        m.insert(30, 6);
        assert_eq!(m.best_fit(3), Some((20, 3)));
        assert_eq!(m.best_fit(4), Some((30, 6)));
        assert_eq!(m.best_fit(7), Some((1, 10)));
        assert_eq!(m.best_fit(11), None);
        assert_eq!(m.remove(30), Some(6));
        assert_eq!(m.total_units(), 13);
    }
}
