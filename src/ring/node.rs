//! The Chord state of one physical peer: its virtual nodes, each with a predecessor,
//! a successor list and a finger table, and the pure handlers that answer ring requests.
//!
//! Owns: routing decisions (which contact is closest to a key), the successor-list and
//! finger bookkeeping, and the answers to FindNext / Neighbors / Notify / Fingers / Leave.
//! Never does I/O and never reads a clock: callers pass `now_ms` and carry messages
//! (the gRPC peer, the in-memory test network and the simulation all drive this code).

use super::id::Id;
use super::msg::{Contact, NeighborsInfo, RingRequest, RingResponse, Route};
use std::fmt::Debug;
use std::hash::Hash;

/// How many of a peer's own vnodes (those closest before a key) routing consults.
const ROUTE_VNODES: usize = 2;

/// What a peer address must support: cheap to clone, comparable, printable.
pub trait Addr: Clone + Eq + Hash + Debug + Send + Sync + 'static {}
impl<T: Clone + Eq + Hash + Debug + Send + Sync + 'static> Addr for T {}

#[derive(Clone, Debug)]
pub struct RingConfig {
    /// r in Chord: how many successors each vnode remembers. O(log N); the simulation
    /// sets it from the ring size, peers use the default.
    pub successor_list_len: usize,
    /// How many alternative next hops a FindNext answer carries, for failover.
    pub next_hop_alternatives: usize,
}

impl Default for RingConfig {
    fn default() -> Self {
        RingConfig { successor_list_len: 16, next_hop_alternatives: 6 }
    }
}

#[derive(Clone, Debug)]
pub struct Vnode<A> {
    pub id: Id,
    pub pred: Option<Contact<A>>,
    /// Closest first; may name other vnodes of this same peer.
    pub succ: Vec<Contact<A>>,
    /// Distinct finger contacts sorted by clockwise distance from `id`; at most one per
    /// exponent range [id + 2^e, id + 2^(e+1)).
    pub fingers: Vec<Contact<A>>,
    /// Next exponent fix_fingers refreshes (round robin from 159 down).
    pub next_finger_exp: u32,
    /// When the predecessor last answered (check_predecessor).
    pub pred_seen_ms: u64,
    /// Bumped whenever `pred` changes (`set_pred`): the arc this vnode owns may have
    /// changed, so what it vouched for under the old arc no longer holds (`authority`).
    pub pred_epoch: u64,
    /// When the last stabilize found our first successor naming this vnode as its
    /// predecessor; 0 when the last one did not.
    pub succ_confirmed_ms: u64,
}

impl<A: Addr> Vnode<A> {
    pub fn new(id: Id) -> Self {
        Vnode { id, pred: None, succ: Vec::new(), fingers: Vec::new(), next_finger_exp: 159, pred_seen_ms: 0, pred_epoch: 0, succ_confirmed_ms: 0 }
    }

    /// Every change of `pred` goes through here, so `pred_epoch` counts them.
    pub fn set_pred(&mut self, p: Option<Contact<A>>) {
        if self.pred.as_ref().map(|c| c.id) != p.as_ref().map(|c| c.id) {
            self.pred_epoch += 1;
        }
        self.pred = p;
    }

    /// Fraction of the ring this vnode owns: (pred, id]. Unknown predecessor counts as 0.
    pub fn arc_fraction(&self) -> f64 {
        match &self.pred {
            Some(p) if p.id == self.id => 1.0,
            Some(p) => p.id.distance_to(self.id).as_fraction(),
            None => 0.0,
        }
    }

    fn dist(&self, to: Id) -> Id {
        self.id.distance_to(to)
    }

    /// The finger and the successor-list entry closest before `key` (strictly preceding
    /// it), found by binary search since both lists are sorted by distance from `id`.
    /// Both are offered: after a mass failure one of them may be dead.
    fn closest_preceding(&self, key: Id, avoid: &[A]) -> [Option<&Contact<A>>; 2] {
        let dk = self.dist(key);
        let pick = |list: &'_ [Contact<A>]| -> Option<usize> {
            // Most keys lie beyond a list's last entry (it spans a small part of the
            // ring): checking it first skips a binary search whose every probe is a
            // cache miss in a large ring.
            let n = match list.last() {
                Some(last) if self.dist(last.id) < dk => list.len(),
                _ => list.partition_point(|c| self.dist(c.id) < dk),
            };
            (0..n).rev().find(|&i| !avoid.contains(&list[i].addr))
        };
        [pick(&self.fingers).map(|i| &self.fingers[i]), pick(&self.succ).map(|i| &self.succ[i])]
    }

    /// Record `c` as the answer for finger exponent `exp`: entries in that exponent's range
    /// other than `c` are dropped (they are either gone or not fingers).
    pub fn set_finger(&mut self, exp: u32, c: Contact<A>) {
        let start = self.id.wrapping_add(Id::pow2(exp));
        let end = if exp == 159 { self.id } else { self.id.wrapping_add(Id::pow2(exp + 1)) };
        let (ds, de) = (self.dist(start), if exp == 159 { Id::MAX } else { self.dist(end) });
        let id = self.id;
        self.fingers.retain(|f| {
            let d = id.distance_to(f.id);
            !(d >= ds && d < de) || f.id == c.id
        });
        if c.id == self.id {
            return;
        }
        let dc = self.dist(c.id);
        match self.fingers.binary_search_by(|f| id.distance_to(f.id).cmp(&dc)) {
            Ok(i) => self.fingers[i] = c,
            Err(i) => self.fingers.insert(i, c),
        }
    }

    /// The contact this vnode routes to for finger exponent `exp`: the first finger at
    /// distance >= 2^exp (what Chord's finger[exp] holds).
    pub fn finger_for(&self, exp: u32) -> Option<&Contact<A>> {
        let d = Id::pow2(exp);
        let i = self.fingers.partition_point(|f| self.dist(f.id) < d);
        self.fingers.get(i)
    }

    /// Adopts another vnode's fingers as hints (a joiner copies its successor's); wrong
    /// ones are replaced as fix_fingers visits each exponent.
    pub fn seed_fingers(&mut self, hints: Vec<Contact<A>>) {
        let id = self.id;
        let mut list: Vec<Contact<A>> = hints.into_iter().filter(|c| c.id != id).collect();
        list.sort_by_key(|c| id.distance_to(c.id));
        list.dedup_by(|a, b| a.id == b.id);
        list.truncate(160);
        self.fingers = list;
    }

    /// The lowest exponent worth a finger: below it, id + 2^e falls before the first
    /// successor, which the successor list already covers.
    pub fn finger_floor(&self) -> u32 {
        match self.succ.first() {
            Some(s) if s.id != self.id => self.dist(s.id).log2().unwrap_or(0),
            _ => 0,
        }
    }

    /// Sets the successor list, sorted by distance, deduplicated, without ourselves, at most `r`.
    pub fn set_successors(&mut self, mut list: Vec<Contact<A>>, r: usize) {
        let id = self.id;
        list.retain(|c| c.id != id);
        list.sort_by_key(|c| id.distance_to(c.id));
        list.dedup_by(|a, b| a.id == b.id);
        list.truncate(r);
        self.succ = list;
    }
}

/// The ring state of one physical peer.
#[derive(Clone, Debug)]
pub struct Node<A> {
    pub addr: A,
    pub peer_id: Id,
    pub capacity_bytes: u64,
    pub config: RingConfig,
    /// Sorted by id.
    pub vnodes: Vec<Vnode<A>>,
    /// Peers recently heard of, kept even when pointers to them are dropped: the way
    /// back into the ring for a vnode that lost every successor (after a partition).
    pub seen: Vec<A>,
    /// Vnodes recently found not to exist (their peer left or changed identity), with the
    /// time until which they are kept out of successor lists copied from neighbours.
    /// Without this a departed vnode lingers deep in lists that wrap a small ring and is
    /// copied back from one neighbour to the next forever.
    pub gone: Vec<(Id, u64)>,
    /// Peers that refused our connection recently (until the given time): kept out of
    /// successor lists copied from neighbours, who may not have noticed yet. A refusal,
    /// unlike a timeout, is no lost message.
    pub refused: Vec<(A, u64)>,
}

/// How long a vnode found gone is kept out of copied successor lists.
pub const GONE_TTL_MS: u64 = 30_000;
/// How long a peer that refused a connection is kept out of copied successor lists.
pub const REFUSED_TTL_MS: u64 = 10_000;
const GONE_MAX: usize = 64;

/// How many recently seen peer addresses a node keeps for rejoining.
pub const SEEN_ADDRS: usize = 32;

impl<A: Addr> Node<A> {
    pub fn new(addr: A, peer_id: Id, capacity_bytes: u64, vnode_ids: &[Id], config: RingConfig) -> Self {
        let mut vnodes: Vec<Vnode<A>> = vnode_ids.iter().map(|&id| Vnode::new(id)).collect();
        vnodes.sort_by_key(|v| v.id);
        vnodes.dedup_by_key(|v| v.id);
        Node { addr, peer_id, capacity_bytes, config, vnodes, seen: Vec::new(), gone: Vec::new(), refused: Vec::new() }
    }

    /// A ring of one: every vnode's successors and predecessor are our own vnodes.
    pub fn create_ring(&mut self) {
        let contacts: Vec<Contact<A>> = self.vnodes.iter().map(|v| self.contact(v.id)).collect();
        let n = contacts.len();
        let r = self.config.successor_list_len;
        for (i, v) in self.vnodes.iter_mut().enumerate() {
            v.set_pred(Some(contacts[(i + n - 1) % n].clone()));
            let list: Vec<Contact<A>> = (1..=n.min(r)).map(|k| contacts[(i + k) % n].clone()).collect();
            v.set_successors(list, r);
            if n == 1 {
                v.set_pred(Some(contacts[0].clone()));
            }
        }
    }

    pub fn contact(&self, vnode_id: Id) -> Contact<A> {
        Contact { id: vnode_id, addr: self.addr.clone() }
    }

    pub fn vnode(&self, id: Id) -> Option<&Vnode<A>> {
        self.vnodes.binary_search_by_key(&id, |v| v.id).ok().map(|i| &self.vnodes[i])
    }

    pub fn vnode_mut(&mut self, id: Id) -> Option<&mut Vnode<A>> {
        self.vnodes.binary_search_by_key(&id, |v| v.id).ok().map(move |i| &mut self.vnodes[i])
    }

    pub fn vnode_ids(&self) -> Vec<Id> {
        self.vnodes.iter().map(|v| v.id).collect()
    }

    /// A digest of every vnode's predecessor and successor list: it changes when a
    /// maintenance round changed the ring as this peer sees it (a join or a loss nearby
    /// still settling).
    pub fn links_digest(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for v in &self.vnodes {
            v.id.hash(&mut h);
            v.pred.as_ref().map(|p| p.id).hash(&mut h);
            for c in &v.succ {
                c.id.hash(&mut h);
            }
        }
        h.finish()
    }

    /// Fraction of the keyspace this peer owns, by its vnodes' arcs.
    pub fn keyspace_share(&self) -> f64 {
        self.vnodes.iter().map(|v| v.arc_fraction()).sum::<f64>().min(1.0)
    }

    /// Our largest arc (pred, vnode] among vnodes whose predecessor we know.
    pub fn largest_arc(&self) -> Option<(Id, Id)> {
        self.vnodes
            .iter()
            .filter_map(|v| v.pred.as_ref().filter(|p| p.id != v.id).map(|p| (p.id, v.id)))
            .max_by_key(|(p, v)| p.distance_to(*v))
    }

    /// Our own vnode that is the first at or after `key`, with the distance to it.
    fn own_successor(&self, key: Id) -> Option<&Vnode<A>> {
        if self.vnodes.is_empty() {
            return None;
        }
        let i = self.vnodes.partition_point(|v| v.id < key);
        Some(&self.vnodes[i % self.vnodes.len()])
    }

    /// The peer that owns `key` by this peer's own view, if it can tell without asking.
    pub fn owner_of(&self, key: Id) -> Option<A> {
        match self.route(key) {
            Route::Found { owner, .. } => Some(owner.addr),
            Route::Next(_) => None,
        }
    }

    /// Whether this peer may answer for `key` alone (a record read from the primary
    /// only): it owns the key by its own view, and in the rounds that began within
    /// `window_ms` of `now_ms` both ring neighbours of the owning vnode confirmed that
    /// view (the predecessor answered; the successor named this vnode as its
    /// predecessor). Another peer can take the key over only after dropping this one
    /// as silent (`RING_CALL_TIMEOUT`) or refused, and a window shorter than that ends
    /// first. Returns the owning vnode and its `pred_epoch`: what was vouched for under
    /// another epoch (another arc) is not vouched for now.
    pub fn authority(&self, key: Id, now_ms: u64, window_ms: u64) -> Option<(Id, u64)> {
        let n = self.vnodes.len();
        if n == 0 {
            return None;
        }
        let v = &self.vnodes[self.vnodes.partition_point(|v| v.id < key) % n];
        let pred = v.pred.as_ref()?;
        let fresh = |t: u64| t > 0 && now_ms.saturating_sub(t) <= window_ms;
        (key.in_open_closed(pred.id, v.id) && fresh(v.pred_seen_ms) && fresh(v.succ_confirmed_ms)).then_some((v.id, v.pred_epoch))
    }

    /// One routing step for `key`: either the owner (if this peer can tell) or the
    /// closest preceding contacts it knows, best first, for the caller to ask next.
    pub fn route(&self, key: Id) -> Route<A> {
        self.route_avoiding(key, &[])
    }

    /// As `route`, treating the peers in `avoid` as dead (the asker found them so).
    pub fn route_avoiding(&self, key: Id, avoid: &[A]) -> Route<A> {
        let n = self.vnodes.len();
        // One binary search serves both the own-arc check and the choice of own vnodes
        // (this runs once per hop of every lookup).
        let after = self.vnodes.partition_point(|v| v.id < key);
        if n > 0 {
            let s = &self.vnodes[after % n];
            if let Some(p) = &s.pred {
                if key.in_open_closed(p.id, s.id) {
                    return Route::Found { owner: self.contact(s.id), successors: s.succ.clone(), arc_from: Some(p.id) };
                }
            }
        }
        // The own vnode closest before the key is the only one whose successor can own
        // it; it and the few own vnodes before it hold the fingers that reach closest
        // to the key (fingers of farther vnodes halve a longer distance).
        let mut candidates: Vec<Contact<A>> = Vec::with_capacity(ROUTE_VNODES * 2);
        if n > 0 {
            let closest = (after + n - 1) % n;
            for k in 0..ROUTE_VNODES.min(n) {
                let v = &self.vnodes[(closest + n - k) % n];
                // The first successor not known dead owns what lies between us and it
                // (Chord's failure rule): that is how a lookup gets past a dead vnode that
                // everyone still routes to, before stabilize has noticed.
                if let Some(j) = v.succ.iter().position(|s| !avoid.contains(&s.addr)) {
                    if key.in_open_closed(v.id, v.succ[j].id) {
                        return Route::Found { owner: v.succ[j].clone(), successors: v.succ[j + 1..].to_vec(), arc_from: Some(v.id) };
                    }
                }
                for c in v.closest_preceding(key, avoid).into_iter().flatten() {
                    candidates.push(c.clone());
                }
            }
        }
        if candidates.is_empty() {
            // Alone (or not yet joined): the nearest own vnode is the best answer there is.
            return match self.own_successor(key) {
                Some(s) => Route::Found { owner: self.contact(s.id), successors: s.succ.clone(), arc_from: None },
                None => Route::Next(Vec::new()),
            };
        }
        candidates.sort_by_key(|c| c.id.distance_to(key));
        let mut next: Vec<Contact<A>> = Vec::with_capacity(self.config.next_hop_alternatives);
        for c in candidates {
            if c.addr != self.addr && !avoid.contains(&c.addr) && !next.iter().any(|n| n.addr == c.addr) {
                next.push(c);
                if next.len() == self.config.next_hop_alternatives {
                    break;
                }
            }
        }
        Route::Next(next)
    }

    pub fn neighbors(&self, vnode_id: Id) -> NeighborsInfo<A> {
        match self.vnode(vnode_id) {
            Some(v) => NeighborsInfo {
                vnode_exists: true,
                pred: v.pred.clone(),
                succ: v.succ.clone(),
                peer_capacity_bytes: self.capacity_bytes,
                peer_share: self.keyspace_share(),
                largest_arc: self.largest_arc(),
            },
            None => NeighborsInfo {
                vnode_exists: false,
                pred: None,
                succ: Vec::new(),
                peer_capacity_bytes: self.capacity_bytes,
                peer_share: self.keyspace_share(),
                largest_arc: self.largest_arc(),
            },
        }
    }

    /// Chord notify: `candidate` thinks it may be our predecessor (or, with
    /// `as_successor`, our successor: a joiner announcing itself to the vnode before it).
    pub fn notify(&mut self, vnode_id: Id, candidate: Contact<A>, as_successor: bool, now_ms: u64) -> bool {
        let r = self.config.successor_list_len;
        // A vnode that notifies us exists and is reachable, whatever we concluded before.
        self.gone.retain(|(g, _)| *g != candidate.id);
        self.refused.retain(|(a, _)| *a != candidate.addr);
        let Some(v) = self.vnode_mut(vnode_id) else { return false };
        if candidate.id == v.id {
            return false;
        }
        if as_successor {
            let closer = match v.succ.first() {
                Some(s) => candidate.id.in_open_open(v.id, s.id),
                None => true,
            };
            if closer {
                let mut list = vec![candidate];
                list.extend(v.succ.iter().cloned());
                v.set_successors(list, r);
            }
            return closer;
        }
        let cand_addr = candidate.addr.clone();
        let accept = match &v.pred {
            None => true,
            Some(p) if p.id == v.id => true,
            Some(p) => candidate.id.in_open_open(p.id, v.id),
        };
        if accept {
            v.set_pred(Some(candidate));
            v.pred_seen_ms = now_ms;
        }
        self.remember(&cand_addr);
        accept
    }

    pub fn fingers_of(&self, vnode_id: Id) -> Vec<Contact<A>> {
        self.vnode(vnode_id).map(|v| v.fingers.clone()).unwrap_or_default()
    }

    /// A neighbour leaves cleanly: splice it out of our pointers.
    pub fn handle_leave(
        &mut self,
        vnode_id: Id,
        leaving: &Contact<A>,
        new_pred: Option<Contact<A>>,
        new_succ: Vec<Contact<A>>,
        now_ms: u64,
    ) {
        let r = self.config.successor_list_len;
        if self.vnode(vnode_id).is_some() {
            self.mark_gone(leaving.id, now_ms);
        }
        let Some(v) = self.vnode_mut(vnode_id) else { return };
        if v.pred.as_ref().is_some_and(|p| p.id == leaving.id) {
            v.set_pred(new_pred.filter(|p| p.id != leaving.id));
            v.pred_seen_ms = now_ms;
        }
        if v.succ.iter().any(|s| s.id == leaving.id) {
            let mut list: Vec<Contact<A>> = v.succ.iter().filter(|s| s.id != leaving.id).cloned().collect();
            list.extend(new_succ.into_iter().filter(|s| s.id != leaving.id));
            v.set_successors(list, r);
        }
        v.fingers.retain(|f| f.id != leaving.id);
    }

    /// Records that vnode `id` does not exist any more and drops it from every pointer.
    pub fn mark_gone(&mut self, id: Id, now_ms: u64) {
        self.gone.retain(|(g, until)| *g != id && *until > now_ms);
        if self.gone.len() == GONE_MAX {
            self.gone.remove(0);
        }
        self.gone.push((id, now_ms + GONE_TTL_MS));
        for v in &mut self.vnodes {
            v.succ.retain(|s| s.id != id);
            v.fingers.retain(|f| f.id != id);
            if v.pred.as_ref().is_some_and(|p| p.id == id) {
                v.set_pred(None);
            }
        }
    }

    /// `addr` did not answer a stabilize: drop it from the successor lists of all our
    /// vnodes at once (fingers are left to lookups and fix_fingers). Dropping it from one vnode only is not enough: our own vnodes
    /// copy each other's lists (a lone survivor's vnodes are each other's successors), and
    /// would hand a dead peer back and forth forever.
    pub fn drop_unreachable(&mut self, addr: &A, now_ms: u64) {
        for v in &mut self.vnodes {
            v.succ.retain(|s| &s.addr != addr);
        }
        self.refused.retain(|(a, until)| a != addr && *until > now_ms);
        if self.refused.len() == GONE_MAX {
            self.refused.remove(0);
        }
        self.refused.push((addr.clone(), now_ms + REFUSED_TTL_MS));
    }

    pub fn is_gone(&self, id: Id, now_ms: u64) -> bool {
        self.gone.iter().any(|(g, until)| *g == id && *until > now_ms)
    }

    pub fn remember(&mut self, addr: &A) {
        if *addr == self.addr || self.seen.contains(addr) {
            return;
        }
        if self.seen.len() == SEEN_ADDRS {
            self.seen.remove(0);
        }
        self.seen.push(addr.clone());
    }

    /// A lookup step through `addr` failed: stop routing via it. Successor lists and
    /// predecessors are left to stabilize, which tells a dead peer from a lost message.
    pub fn forget_finger_addr(&mut self, addr: &A) {
        for v in &mut self.vnodes {
            v.fingers.retain(|f| &f.addr != addr);
        }
    }

    /// Drops every pointer to a peer that failed to answer. Stabilization re-learns it if
    /// it was only slow.
    pub fn forget_addr(&mut self, addr: &A) {
        for v in &mut self.vnodes {
            if v.pred.as_ref().is_some_and(|p| &p.addr == addr) {
                v.set_pred(None);
            }
            v.succ.retain(|s| &s.addr != addr);
            v.fingers.retain(|f| &f.addr != addr);
        }
    }

    /// Stabilize, second half: our first successor told us its predecessor `x` and its
    /// successor list. Returns the successor to notify.
    pub fn apply_stabilize(&mut self, vnode_id: Id, succ: &Contact<A>, info: &NeighborsInfo<A>, now_ms: u64) -> Option<Contact<A>> {
        let r = self.config.successor_list_len;
        let me = self.contact(vnode_id);
        let gone: Vec<Id> = self.gone.iter().filter(|(_, until)| *until > now_ms).map(|(g, _)| *g).collect();
        let refused: Vec<A> = self.refused.iter().filter(|(_, until)| *until > now_ms).map(|(a, _)| a.clone()).collect();
        let v = self.vnode_mut(vnode_id)?;
        let mut first = succ.clone();
        if let Some(x) = &info.pred {
            if x.id.in_open_open(v.id, succ.id) && x.id != v.id && !gone.contains(&x.id) && !refused.contains(&x.addr) {
                first = x.clone();
            }
        }
        let mut list = vec![first.clone()];
        if first.id == succ.id {
            list.extend(info.succ.iter().cloned());
        } else {
            list.push(succ.clone());
            list.extend(info.succ.iter().cloned());
        }
        // Our own successor list is the successor's list shifted by one: entries that
        // wrapped around past us are dropped by set_successors' distance sort + truncate.
        list.retain(|c| c.id != me.id && !gone.contains(&c.id) && !refused.contains(&c.addr));
        v.set_successors(list, r);
        v.succ.first().cloned()
    }

    /// The first successor of a vnode, if any, that is not this vnode itself.
    pub fn first_successor(&self, vnode_id: Id) -> Option<Contact<A>> {
        self.vnode(vnode_id).and_then(|v| v.succ.first().cloned())
    }

    /// Answers one ring request.
    pub fn handle(&mut self, req: RingRequest<A>, now_ms: u64) -> RingResponse<A> {
        match req {
            RingRequest::FindNext { key, avoid } => RingResponse::Route(self.route_avoiding(key, &avoid)),
            RingRequest::Neighbors { vnode } => RingResponse::Neighbors(self.neighbors(vnode)),
            RingRequest::Notify { vnode, candidate, as_successor } => {
                RingResponse::Notified(self.notify(vnode, candidate, as_successor, now_ms))
            }
            RingRequest::Fingers { vnode } => RingResponse::Fingers(self.fingers_of(vnode)),
            RingRequest::Leave { vnode, leaving, new_pred, new_succ } => {
                self.handle_leave(vnode, &leaving, new_pred, new_succ, now_ms);
                RingResponse::Ok
            }
            RingRequest::Ping => RingResponse::Ok,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn largest_arc_is_the_longest_known_one() {
        let ids = [Id::from_fraction(0.2), Id::from_fraction(0.3), Id::from_fraction(0.9)];
        let mut n: Node<u32> = Node::new(1, Id::from_fraction(0.0), 1 << 30, &ids, RingConfig::default());
        assert_eq!(n.largest_arc(), None, "no predecessor known yet");
        let pred = |f: f64| Some(Contact { id: Id::from_fraction(f), addr: 2u32 });
        n.vnodes[0].pred = pred(0.15); // 0.05
        n.vnodes[1].pred = pred(0.2); // 0.10
        n.vnodes[2].pred = pred(0.85); // 0.05
        assert_eq!(n.largest_arc(), Some((Id::from_fraction(0.2), Id::from_fraction(0.3))));
        assert_eq!(n.neighbors(ids[0]).largest_arc, n.largest_arc());
    }

    #[test]
    fn links_digest_changes_with_a_link_and_only_then() {
        let ids = [Id::from_fraction(0.2), Id::from_fraction(0.6)];
        let mut n: Node<u32> = Node::new(1, Id::from_fraction(0.0), 1 << 30, &ids, RingConfig::default());
        let c = |f: f64| Contact { id: Id::from_fraction(f), addr: 2u32 };
        n.vnodes[0].succ = vec![c(0.3), c(0.4)];
        let d = n.links_digest();
        // Fingers and timestamps are not links: a settled ring keeps its digest.
        n.vnodes[0].fingers = vec![c(0.5)];
        n.vnodes[0].pred_seen_ms = 99;
        assert_eq!(n.links_digest(), d);
        n.vnodes[1].pred = Some(c(0.5));
        let d2 = n.links_digest();
        assert_ne!(d2, d, "a new predecessor");
        n.vnodes[0].succ = vec![c(0.3), c(0.35), c(0.4)];
        assert_ne!(n.links_digest(), d2, "a joiner in a successor list");
    }

    #[test]
    fn authority_needs_the_arc_and_both_neighbours_confirming_it_lately() {
        let ids = [Id::from_fraction(0.2), Id::from_fraction(0.6)];
        let mut n: Node<u32> = Node::new(1, Id::from_fraction(0.0), 1 << 30, &ids, RingConfig::default());
        let c = |f: f64| Contact { id: Id::from_fraction(f), addr: 2u32 };
        let key = Id::from_fraction(0.5);
        n.vnodes[1].set_pred(Some(c(0.4)));
        let epoch = n.vnodes[1].pred_epoch;
        assert_eq!(n.authority(key, 10_000, 1500), None, "neither neighbour has confirmed anything");
        n.vnodes[1].pred_seen_ms = 8_000;
        n.vnodes[1].succ_confirmed_ms = 9_800;
        assert_eq!(n.authority(key, 10_000, 1500), None, "the predecessor was last heard 2 s ago, before the window");
        n.vnodes[1].pred_seen_ms = 9_600;
        assert_eq!(n.authority(key, 10_000, 1500), Some((ids[1], epoch)));
        assert_eq!(n.authority(Id::from_fraction(0.3), 10_000, 1500), None, "a key of another vnode's arc (0.2, 0.6] whose predecessor is 0.4");
        assert_eq!(n.authority(Id::from_fraction(0.7), 10_000, 1500), None, "a key outside every arc we know");
        n.vnodes[1].succ_confirmed_ms = 0;
        assert_eq!(n.authority(key, 10_000, 1500), None, "the last stabilize did not confirm us");
        n.vnodes[1].succ_confirmed_ms = 9_800;
        // The same predecessor again is no change; a new one is a new epoch, even if the
        // old one comes back (the arc was someone else's in between).
        n.vnodes[1].set_pred(Some(c(0.4)));
        assert_eq!(n.authority(key, 10_000, 1500), Some((ids[1], epoch)));
        n.vnodes[1].set_pred(Some(c(0.45)));
        n.vnodes[1].set_pred(Some(c(0.4)));
        assert_eq!(n.authority(key, 10_000, 1500), Some((ids[1], epoch + 2)));
        n.forget_addr(&2);
        assert_eq!(n.authority(key, 10_000, 1500), None, "no predecessor, no arc");
    }
}
