//! Iterative lookup: the caller asks peer after peer for the next hop toward a key,
//! keeping the candidates it has been told about so a dead or slow hop is skipped.
//!
//! Owns: the lookup state machine (which contact to ask next, when it is done, when it
//! gives up). Never does I/O: the driver performs each request and feeds the answer back.

use super::id::Id;
use super::msg::{Contact, Route};
use super::node::Addr;
use std::collections::HashSet;

/// Bound on routing steps: Chord needs O(log N); anything past this is a routing loop.
pub const MAX_LOOKUP_HOPS: u32 = 64;
/// Bound on peers asked by one lookup, dead ones included.
pub const MAX_LOOKUP_ASKS: usize = 4 * MAX_LOOKUP_HOPS as usize;

#[derive(Clone, Debug, PartialEq)]
pub struct Found<A> {
    pub owner: Contact<A>,
    pub successors: Vec<Contact<A>>,
    /// The owner's arc is (arc_from, owner], if the answering peer knew its start.
    pub arc_from: Option<Id>,
    /// Remote FindNext calls it took (0 when the asking peer knew the answer itself).
    pub hops: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    #[error("lookup of {key} failed: no reachable peer knows a route ({tried} peers tried)")]
    Unreachable { key: String, tried: usize },
    #[error("lookup of {key} gave up after {MAX_LOOKUP_HOPS} hops or {MAX_LOOKUP_ASKS} peers asked")]
    TooManyHops { key: String },
}

pub enum Step<A> {
    /// Ask this peer FindNext(key).
    Ask(A),
    Done(Found<A>),
    Failed(LookupError),
}

pub struct Lookup<A> {
    key: Id,
    /// Candidates not yet asked, closest preceding the key last (popped first).
    frontier: Vec<Contact<A>>,
    /// Addresses with no id yet (a bootstrap address), asked before the frontier.
    start_addrs: Vec<A>,
    asked: HashSet<A>,
    /// Peers that failed to answer in this lookup, passed on so others route around them.
    failed: Vec<A>,
    /// The peer asked last, blamed if the answer does not come, and how many dead peers
    /// it was told about.
    current: Option<A>,
    current_avoid: usize,
    /// Peers that answered "ask someone else", with how many dead peers they knew of then:
    /// once every lead is exhausted, one of them is asked again with the longer list, so
    /// it can route around a dead vnode it still points at.
    referrers: Vec<(A, usize)>,
    /// The asking peer itself (a lookup that began from its own routing table): asking it
    /// again costs no message, so it does not count as a hop.
    own: Option<A>,
    hops: u32,
}

/// Most dead peers a lookup reports in one request.
pub const MAX_AVOID: usize = 16;

impl<A: Addr> Lookup<A> {
    /// A lookup that begins with the answer of the asking peer's own routing table.
    pub fn from_route(key: Id, own: A, route: Route<A>) -> (Lookup<A>, Step<A>) {
        let mut l = Lookup { key, frontier: Vec::new(), start_addrs: Vec::new(), asked: HashSet::new(), failed: Vec::new(), current: None, current_avoid: 0, referrers: Vec::new(), own: Some(own.clone()), hops: 0 };
        l.asked.insert(own.clone());
        // Our own answer is a referral like any other: if every contact it named is dead
        // (fingers not yet refreshed after a mass failure), we route again avoiding them
        // instead of giving up.
        if matches!(route, Route::Next(_)) {
            l.referrers.push((own, 0));
        }
        let step = l.absorb(route, false);
        (l, step)
    }

    /// A lookup by a process that is not (yet) in the ring: it starts at known peers.
    pub fn from_addrs(key: Id, addrs: Vec<A>) -> (Lookup<A>, Step<A>) {
        Self::starting_at(key, addrs)
    }

    /// Like `from_addrs`, treating `suspects` as dead from the start (never asked unless
    /// given as a start address; passed on as peers to avoid).
    pub fn from_addrs_avoiding(key: Id, addrs: Vec<A>, mut suspects: Vec<A>) -> (Lookup<A>, Step<A>) {
        suspects.retain(|s| !addrs.contains(s));
        suspects.truncate(MAX_AVOID);
        let mut l = Lookup { key, frontier: Vec::new(), start_addrs: Vec::new(), asked: suspects.iter().cloned().collect(), failed: suspects, current: None, current_avoid: 0, referrers: Vec::new(), own: None, hops: 0 };
        let mut addrs = addrs;
        addrs.reverse();
        l.start_addrs = addrs;
        let step = l.next_step();
        (l, step)
    }

    fn starting_at(key: Id, mut addrs: Vec<A>) -> (Lookup<A>, Step<A>) {
        addrs.reverse(); // popped from the back: the first given is asked first
        let mut l = Lookup { key, frontier: Vec::new(), start_addrs: addrs, asked: HashSet::new(), failed: Vec::new(), current: None, current_avoid: 0, referrers: Vec::new(), own: None, hops: 0 };
        let step = l.next_step();
        (l, step)
    }

    pub fn key(&self) -> Id {
        self.key
    }

    /// Peers found dead so far, for the next request.
    pub fn avoid(&self) -> Vec<A> {
        self.failed.clone()
    }

    /// The asked peer answered.
    pub fn on_route(&mut self, route: Route<A>) -> Step<A> {
        let current = self.current.take();
        if current.is_none() || current != self.own {
            self.hops += 1;
        }
        if let (Route::Next(_), Some(a)) = (&route, current) {
            self.referrers.push((a, self.current_avoid));
        }
        self.absorb(route, true)
    }

    /// The asked peer failed to answer (dead, timed out, refused): try the next candidate.
    pub fn on_failure(&mut self) -> Step<A> {
        if let Some(a) = self.current.take() {
            if self.failed.len() < MAX_AVOID {
                self.failed.push(a);
            }
        }
        self.next_step()
    }

    fn absorb(&mut self, route: Route<A>, remote: bool) -> Step<A> {
        match route {
            Route::Found { owner, successors, arc_from } => {
                // An arc that does not hold the key is a confused answer: use no arc.
                let arc_from = arc_from.filter(|&f| self.key.in_open_closed(f, owner.id));
                Step::Done(Found { owner, successors, arc_from, hops: if remote { self.hops } else { 0 } })
            }
            Route::Next(list) => {
                let key = self.key;
                for c in list {
                    if self.asked.contains(&c.addr) {
                        continue;
                    }
                    // One entry per peer: the contact closest before the key decides when
                    // that peer is asked (it answers for all its vnodes anyway).
                    match self.frontier.iter_mut().find(|f| f.addr == c.addr) {
                        Some(f) if c.id.distance_to(key) < f.id.distance_to(key) => *f = c,
                        Some(_) => {}
                        None => self.frontier.push(c),
                    }
                }
                // Farthest from the key first, so pop() yields the closest preceding contact.
                self.frontier.sort_by_key(|c| std::cmp::Reverse(c.id.distance_to(key)));
                self.next_step()
            }
        }
    }

    fn next_step(&mut self) -> Step<A> {
        // A lookup that keeps being sent on without ever arriving is a routing loop (or a
        // ring mostly dead): it stops here rather than visit the whole ring.
        if self.hops >= MAX_LOOKUP_HOPS || self.asked.len() >= MAX_LOOKUP_ASKS {
            return Step::Failed(LookupError::TooManyHops { key: self.key.to_hex() });
        }
        while let Some(a) = self.start_addrs.pop() {
            if self.asked.insert(a.clone()) {
                self.current = Some(a.clone());
                self.current_avoid = self.failed.len();
                return Step::Ask(a);
            }
        }
        while let Some(c) = self.frontier.pop() {
            if self.asked.insert(c.addr.clone()) {
                self.current = Some(c.addr.clone());
                self.current_avoid = self.failed.len();
                return Step::Ask(c.addr);
            }
        }
        if let Some(i) = self.referrers.iter().rposition(|(_, known)| *known < self.failed.len()) {
            let (a, _) = self.referrers.remove(i);
            self.current = Some(a.clone());
            self.current_avoid = self.failed.len();
            return Step::Ask(a);
        }
        Step::Failed(LookupError::Unreachable { key: self.key.to_hex(), tried: self.asked.len() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(i: u8, a: &'static str) -> Contact<&'static str> {
        Contact { id: Id::from_fraction(i as f64 / 256.0), addr: a }
    }

    #[test]
    fn a_dead_next_hop_sends_the_referrer_the_news_and_it_routes_around() {
        let key = Id::from_fraction(100.0 / 256.0);
        let (mut l, step) = Lookup::from_addrs(key, vec!["s"]);
        assert!(matches!(step, Step::Ask("s")));
        // s says: ask d (which owns the stretch before the key).
        assert!(matches!(l.on_route(Route::Next(vec![c(90, "d")])), Step::Ask("d")));
        assert!(l.avoid().is_empty());
        // d is dead: nobody else to ask, so s is asked again, now told d is dead.
        assert!(matches!(l.on_failure(), Step::Ask("s")));
        assert_eq!(l.avoid(), vec!["d"]);
        // s, avoiding d, answers with the next live successor.
        match l.on_route(Route::Found { owner: c(120, "x"), successors: vec![], arc_from: Some(Id::from_fraction(80.0 / 256.0)) }) {
            Step::Done(f) => assert_eq!((f.owner.addr, f.arc_from), ("x", Some(Id::from_fraction(80.0 / 256.0)))),
            _ => panic!("lookup should be done"),
        }
    }

    #[test]
    fn when_every_contact_of_our_own_table_is_dead_we_route_again_around_them() {
        let key = Id::from_fraction(0.5);
        let (mut l, step) = Lookup::from_route(key, "me", Route::Next(vec![c(90, "d1"), c(80, "d2")]));
        assert!(matches!(step, Step::Ask("d1")));
        assert!(matches!(l.on_failure(), Step::Ask("d2")));
        // Both dead: our own table is consulted again, now avoiding them.
        assert!(matches!(l.on_failure(), Step::Ask("me")));
        assert_eq!(l.avoid(), vec!["d1", "d2"]);
        assert!(matches!(l.on_route(Route::Next(vec![c(70, "x")])), Step::Ask("x")));
        // An arc that does not hold the key is a confused answer and is not passed on.
        match l.on_route(Route::Found { owner: c(130, "o"), successors: vec![], arc_from: Some(Id::from_fraction(0.505)) }) {
            // Only x's answer crossed the network.
            Step::Done(f) => assert_eq!((f.owner.addr, f.hops, f.arc_from), ("o", 1, None)),
            _ => panic!("lookup should be done"),
        }
    }

    #[test]
    fn a_referrer_is_not_asked_again_without_news() {
        let key = Id::from_fraction(0.5);
        let (mut l, _) = Lookup::from_addrs(key, vec!["s"]);
        assert!(matches!(l.on_route(Route::Next(vec![c(90, "d")])), Step::Ask("d")));
        assert!(matches!(l.on_failure(), Step::Ask("s")));
        // s still only knows d: the lookup gives up instead of looping.
        assert!(matches!(l.on_route(Route::Next(vec![c(90, "d")])), Step::Failed(_)));
    }

    #[test]
    fn a_lookup_sent_on_forever_gives_up_after_a_bounded_number_of_peers() {
        let key = Id::from_fraction(0.5);
        let (mut l, _) = Lookup::from_addrs(key, vec![0u32]);
        let mut asked = 1;
        // Every peer answers "ask someone new": a routing loop through an endless ring.
        let step = loop {
            let next = vec![Contact { id: Id::from_fraction(0.1 + asked as f64 * 1e-6), addr: asked }];
            match l.on_route(Route::Next(next)) {
                Step::Ask(_) => asked += 1,
                other => break other,
            }
            assert!(asked as usize <= MAX_LOOKUP_ASKS + 1, "lookup never gave up");
        };
        assert!(matches!(step, Step::Failed(LookupError::TooManyHops { .. })));
    }
}
