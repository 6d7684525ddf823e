//! Directory leases: which directories this mount may create files in without asking the
//! ring, and how long other mounts wait for a lease holder (see ARCHITECTURE.md,
//! "Directory leases").
//!
//! A lease lives in the directory's own record (`lease_holder`, `lease_epoch`,
//! `lease_wanted`) and is taken and renewed by compare-and-swap, so it needs no clock
//! shared between machines: the holder trusts its lease for `OWN_FOR` after it *sent* the
//! CAS that took or renewed it, and another mount waits until it has seen the same
//! (holder, epoch) for `LEASE_TTL` on its own clock. The first is shorter than the second,
//! so the holder stops trusting its lease before anyone else acts as if it had lapsed.
//! While it holds the lease, no other mount changes the directory's entries, so the
//! holder's copy is exact: it answers "no such name" and decides creates locally.
//!
//! This module only keeps the books (no I/O, time passed in); `ops` does the CASes.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How long another mount waits on a lease whose holder has gone silent (crashed,
/// frozen, cut off) before it treats the lease as void. Short, because a mount that
/// crashed leaves this wait on each directory it was creating in; a live holder renews
/// a busy lease long before (each publish renews it) and gives an idle one back.
pub const LEASE_TTL: Duration = Duration::from_secs(2);
/// How long the holder trusts its lease after sending the CAS that took or renewed it.
pub const OWN_FOR: Duration = Duration::from_millis(1500);
/// Renew when less than this is left and the lease is still in use.
pub const RENEW_BEFORE: Duration = Duration::from_millis(1000);
/// A lease not used for this long is given back.
pub const IDLE_RELEASE: Duration = Duration::from_millis(300);
/// After letting a lease go because another mount asked, or finding one held by another
/// mount, this mount uses the ordinary path in that directory for a while: two mounts
/// working in one directory would otherwise hand the lease back and forth.
pub const BACKOFF: Duration = Duration::from_secs(2);
/// A file created under a lease and still open this long is published (entry and
/// inode), so that its name never outlives the lease that reserved it.
pub const PENDING_MAX_AGE: Duration = Duration::from_secs(1);

struct Held {
    epoch: u64,
    valid_until: Instant,
    last_used: Instant,
}

struct Seen {
    holder: u64,
    epoch: u64,
    since: Instant,
}

pub struct Leases {
    /// This mount's id in lease records (random, never 0).
    pub me: u64,
    held: Mutex<HashMap<u64, Held>>,
    /// Being given back: no local decisions, no renewal.
    releasing: Mutex<std::collections::HashSet<u64>>,
    backoff: Mutex<HashMap<u64, Instant>>,
    seen: Mutex<HashMap<u64, Seen>>,
}

/// What the holder does with its lease when it next writes the directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// Keep it: write epoch + 1.
    Renew,
    /// Another mount asked: give it back.
    Release,
    /// Not ours (any more): leave the fields alone.
    NotOurs,
}

impl Leases {
    pub fn new(me: u64) -> Leases {
        assert!(me != 0, "0 means no holder");
        Leases { me, held: Mutex::new(HashMap::new()), releasing: Mutex::new(Default::default()), backoff: Mutex::new(HashMap::new()), seen: Mutex::new(HashMap::new()) }
    }

    /// True if this mount may trust its copy of `dir` now; marks the lease used.
    pub fn valid(&self, dir: u64, now: Instant) -> bool {
        let mut m = self.held.lock();
        match m.get_mut(&dir) {
            Some(h) if now < h.valid_until => {
                h.last_used = now;
                true
            }
            _ => false,
        }
    }

    /// True if this mount may trust its copy of `dir` now (does not count as use).
    pub fn trusts(&self, dir: u64, now: Instant) -> bool {
        self.held.lock().get(&dir).is_some_and(|h| now < h.valid_until)
    }

    pub fn may_acquire(&self, dir: u64, now: Instant) -> bool {
        let mut b = self.backoff.lock();
        match b.get(&dir) {
            Some(until) if now < *until => false,
            Some(_) => {
                b.remove(&dir);
                true
            }
            None => true,
        }
    }

    pub fn back_off(&self, dir: u64, now: Instant) {
        self.back_off_for(dir, now, BACKOFF);
    }

    /// Keeps the ordinary path in `dir` for `d` (never shortening a longer back-off).
    pub fn back_off_for(&self, dir: u64, now: Instant, d: Duration) {
        let mut b = self.backoff.lock();
        let until = b.get(&dir).copied().unwrap_or(now).max(now + d);
        b.insert(dir, until);
    }

    /// The CAS sent at `sent` wrote `epoch` with us as holder (ignored while the lease
    /// is being given back: a publish on the way must not bring it back to life).
    pub fn granted(&self, dir: u64, epoch: u64, sent: Instant) {
        if self.releasing(dir) {
            return;
        }
        let mut m = self.held.lock();
        let last_used = m.get(&dir).map(|h| h.last_used).unwrap_or(sent);
        m.insert(dir, Held { epoch, valid_until: sent + OWN_FOR, last_used });
    }

    pub fn dropped(&self, dir: u64) {
        self.held.lock().remove(&dir);
    }

    /// From now until `end_release`, the lease on `dir` is neither trusted nor renewed.
    pub fn start_release(&self, dir: u64) {
        self.releasing.lock().insert(dir);
        self.held.lock().remove(&dir);
    }

    pub fn end_release(&self, dir: u64) {
        self.releasing.lock().remove(&dir);
        self.held.lock().remove(&dir);
    }

    pub fn releasing(&self, dir: u64) -> bool {
        self.releasing.lock().contains(&dir)
    }

    /// What a write of `dir` whose current record has these lease fields should do with
    /// them, from the holder's side.
    pub fn renewal(&self, holder: u64, wanted: bool) -> Renewal {
        if holder != self.me {
            Renewal::NotOurs
        } else if wanted {
            Renewal::Release
        } else {
            Renewal::Renew
        }
    }

    /// Is a lease held by another mount still to be respected? Tracks, per directory,
    /// since when this (holder, epoch) has been seen; it lapses after `LEASE_TTL` of
    /// this mount's time without a renewal.
    pub fn foreign_live(&self, dir: u64, holder: u64, epoch: u64, now: Instant) -> bool {
        if holder == 0 || holder == self.me {
            return false;
        }
        let mut s = self.seen.lock();
        match s.get(&dir) {
            Some(x) if x.holder == holder && x.epoch == epoch => now.duration_since(x.since) < LEASE_TTL,
            _ => {
                s.insert(dir, Seen { holder, epoch, since: now });
                true
            }
        }
    }

    /// Leases to give back (unused for `IDLE_RELEASE`) and to renew (in use, running out).
    pub fn upkeep(&self, now: Instant) -> (Vec<u64>, Vec<u64>) {
        let m = self.held.lock();
        let mut release = Vec::new();
        let mut renew = Vec::new();
        for (dir, h) in m.iter() {
            if now.duration_since(h.last_used) >= IDLE_RELEASE || now >= h.valid_until {
                release.push(*dir);
            } else if h.valid_until.saturating_duration_since(now) < RENEW_BEFORE {
                renew.push(*dir);
            }
        }
        drop(m);
        self.seen.lock().retain(|_, x| now.duration_since(x.since) < LEASE_TTL * 4);
        self.backoff.lock().retain(|_, until| now < *until);
        (release, renew)
    }

    pub fn held(&self) -> Vec<u64> {
        self.held.lock().keys().copied().collect()
    }

    pub fn epoch(&self, dir: u64) -> Option<u64> {
        self.held.lock().get(&dir).map(|h| h.epoch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_holder_stops_trusting_its_lease_before_others_may_take_it() {
        let t0 = Instant::now();
        let a = Leases::new(7);
        let b = Leases::new(9);
        a.granted(1, 3, t0);
        // B first sees the lease only after A sent the CAS.
        let seen_at = t0 + Duration::from_millis(5);
        assert!(b.foreign_live(1, 7, 3, seen_at));
        let mut t = t0;
        while t < t0 + LEASE_TTL * 2 {
            if !b.foreign_live(1, 7, 3, t.max(seen_at)) {
                assert!(!a.valid(1, t), "A still trusts its lease at {:?} while B has taken it as lapsed", t - t0);
            }
            t += Duration::from_millis(50);
        }
        assert!(!b.foreign_live(1, 7, 3, t0 + LEASE_TTL * 2));
        // A renewal (new epoch) is live again for B.
        assert!(b.foreign_live(1, 7, 4, t0 + LEASE_TTL * 2));
    }

    #[test]
    fn own_leases_are_not_foreign_and_renewal_follows_the_wanted_flag() {
        let a = Leases::new(7);
        let now = Instant::now();
        assert!(!a.foreign_live(1, 7, 1, now));
        assert!(!a.foreign_live(1, 0, 1, now));
        assert_eq!(a.renewal(7, false), Renewal::Renew);
        assert_eq!(a.renewal(7, true), Renewal::Release);
        assert_eq!(a.renewal(8, false), Renewal::NotOurs);
        assert_eq!(a.renewal(0, true), Renewal::NotOurs);
    }

    #[test]
    fn a_lease_being_given_back_is_neither_trusted_nor_renewed() {
        let a = Leases::new(7);
        let t0 = Instant::now();
        a.granted(1, 1, t0);
        assert!(a.trusts(1, t0));
        a.start_release(1);
        assert!(!a.trusts(1, t0));
        a.granted(1, 2, t0);
        assert!(!a.trusts(1, t0), "a renewal during the release revived the lease");
        a.end_release(1);
        assert!(!a.trusts(1, t0));
        a.granted(1, 3, t0);
        assert!(a.trusts(1, t0));
    }

    #[test]
    fn idle_leases_are_released_and_busy_ones_renewed() {
        let a = Leases::new(7);
        let t0 = Instant::now();
        a.granted(1, 1, t0);
        a.granted(2, 1, t0);
        let t = t0 + OWN_FOR - RENEW_BEFORE + Duration::from_millis(10);
        assert!(a.valid(2, t));
        let (release, renew) = a.upkeep(t);
        assert_eq!(release, vec![1]);
        assert_eq!(renew, vec![2]);
        assert!(!a.valid(1, t0 + OWN_FOR));
    }

    #[test]
    fn backoff_keeps_a_mount_on_the_ordinary_path_for_a_while() {
        let a = Leases::new(7);
        let t0 = Instant::now();
        assert!(a.may_acquire(1, t0));
        a.back_off(1, t0);
        assert!(!a.may_acquire(1, t0 + BACKOFF / 2));
        assert!(a.may_acquire(1, t0 + BACKOFF));
    }
}
