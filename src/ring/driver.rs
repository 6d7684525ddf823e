//! Chord's protocols (join, stabilize, notify, fix_fingers, check_predecessor, leave,
//! lookup, ring sampling) written once, generic over a `Transport`.
//!
//! Owns: the order of messages in each protocol. Never holds the node lock across an
//! await, never reads a clock (callers pass `now_ms`), never touches sockets itself:
//! the gRPC transport, the in-memory test network and the simulation plug in below.

use super::id::Id;
use super::lookup::{Found, Lookup, LookupError, Step};
use super::msg::{Contact, NeighborsInfo, NetError, RingRequest, RingResponse};
use super::node::{Addr, Node};
use super::vnode_position::{Sample, SAMPLE_WALKS, SAMPLE_WALK_LEN};
use parking_lot::Mutex;
use rand::Rng;
use std::collections::HashSet;
use std::future::Future;

pub trait Transport<A>: Send + Sync {
    fn call(&self, to: &A, req: RingRequest<A>) -> impl Future<Output = Result<RingResponse<A>, NetError>> + Send;

    /// Peers this transport recently failed to reach, for lookups to route around from
    /// the start (a client's failure detector; peers leave it empty and let stabilize
    /// decide who is gone).
    fn suspects(&self) -> Vec<A> {
        Vec::new()
    }
}

/// Calls `to`, answering locally when it is this very peer (no socket to ourselves).
async fn call<A: Addr, T: Transport<A>>(
    node: &Mutex<Node<A>>,
    net: &T,
    to: &A,
    req: RingRequest<A>,
    now_ms: u64,
) -> Result<RingResponse<A>, NetError> {
    let local = { node.lock().addr == *to };
    if local {
        return Ok(node.lock().handle(req, now_ms));
    }
    net.call(to, req).await
}

fn unexpected<A>(what: &str, got: &RingResponse<A>) -> NetError
where
    A: std::fmt::Debug,
{
    NetError::Protocol(format!("expected {what}, got {got:?}"))
}

async fn run_lookup<A: Addr, T: Transport<A>>(
    node: Option<&Mutex<Node<A>>>,
    net: &T,
    mut lookup: Lookup<A>,
    mut step: Step<A>,
    now_ms: u64,
) -> Result<Found<A>, LookupError> {
    let key = lookup.key();
    loop {
        match step {
            Step::Done(f) => return Ok(f),
            Step::Failed(e) => return Err(e),
            Step::Ask(a) => {
                let req = RingRequest::FindNext { key, avoid: lookup.avoid() };
                let res = match node {
                    Some(n) => call(n, net, &a, req, now_ms).await,
                    None => net.call(&a, req).await,
                };
                step = match res {
                    Ok(RingResponse::Route(r)) => lookup.on_route(r),
                    Ok(_) => lookup.on_failure(),
                    Err(_) => {
                        if let Some(n) = node {
                            n.lock().forget_finger_addr(&a);
                        }
                        lookup.on_failure()
                    }
                };
            }
        }
    }
}

/// Successor-list fetches a walk may make beyond the lookup's own answer.
const MAX_WALK_EXTENSIONS: usize = 16;
/// Vnodes of a walk, from its end backwards, asked to extend it before giving up.
const WALK_EXTEND_TRIES: usize = 4;
/// Vnodes of a short walk asked at once for their successors (see `walk_from`).
const DEEP_WALK_ASKS: usize = 24;

/// Finds the owner of `key`, starting from this peer's own routing state.
pub async fn lookup<A: Addr, T: Transport<A>>(
    node: &Mutex<Node<A>>,
    net: &T,
    key: Id,
    now_ms: u64,
) -> Result<Found<A>, LookupError> {
    let (me, route) = {
        let n = node.lock();
        (n.addr.clone(), n.route(key))
    };
    let (l, step) = Lookup::from_route(key, me, route);
    run_lookup(Some(node), net, l, step, now_ms).await
}

/// Finds the owner of `key` from outside the ring (a client, or a peer before it joins).
pub async fn lookup_via<A: Addr, T: Transport<A>>(net: &T, start: Vec<A>, key: Id) -> Result<Found<A>, LookupError> {
    let (l, step) = Lookup::from_addrs_avoiding(key, start, net.suspects());
    run_lookup(None, net, l, step, 0).await
}

pub async fn neighbors<A: Addr, T: Transport<A>>(net: &T, c: &Contact<A>) -> Result<NeighborsInfo<A>, NetError> {
    match net.call(&c.addr, RingRequest::Neighbors { vnode: c.id }).await? {
        RingResponse::Neighbors(info) => Ok(info),
        other => Err(unexpected("Neighbors", &other)),
    }
}

/// A walk of the ring: the owner of a key and the vnodes after it.
#[derive(Clone, Debug)]
pub struct Walk<A> {
    /// The owner's arc begins just after this id: every key in (arc_from, vnodes[0]] has
    /// this same walk. When the lookup's last peer did not know the arc's start, it is
    /// the looked-up key minus one, so only keys from the looked-up one on are covered.
    pub arc_from: Id,
    pub vnodes: Vec<Contact<A>>,
}

impl<A> Walk<A> {
    /// Whether `key` has this walk (the walk's first vnode owns it).
    pub fn covers(&self, key: Id) -> bool {
        self.vnodes.first().is_some_and(|owner| key.in_open_closed(self.arc_from, owner.id))
    }
}

/// The owner of `key` and the vnodes after it, walked until `peers` distinct peers are
/// seen or the walk comes back around (a ring smaller than `peers` gives all it has).
/// A lookup answer carries a successor list; the walk asks further only when vnodes of
/// the same peers fill that list.
pub async fn walk_from<A: Addr, T: Transport<A>>(net: &T, start: Vec<A>, key: Id, peers: usize) -> Result<Walk<A>, LookupError> {
    let found = lookup_via(net, start.clone(), key).await?;
    let arc_from = found.arc_from.unwrap_or_else(|| key.wrapping_sub(Id::pow2(0)));
    let mut walk: Vec<Contact<A>> = vec![found.owner.clone()];
    walk.extend(found.successors.iter().filter(|c| c.id != found.owner.id).cloned());
    let distinct = |w: &[Contact<A>]| {
        let mut seen: Vec<&A> = Vec::new();
        for c in w {
            if !seen.contains(&&c.addr) {
                seen.push(&c.addr);
            }
        }
        seen.len()
    };
    for _ in 0..MAX_WALK_EXTENSIONS {
        if distinct(&walk) >= peers {
            break;
        }
        // Extend from the last vnode of the walk that answers (the last may be dead).
        let mut info = None;
        let suspects = net.suspects();
        for c in walk.iter().rev().filter(|c| !suspects.contains(&c.addr)).take(WALK_EXTEND_TRIES) {
            if let Ok(i) = neighbors(net, c).await {
                if i.vnode_exists {
                    info = Some(i);
                    break;
                }
            }
        }
        let next: Vec<Contact<A>> = match info {
            Some(info) => info.succ,
            // None of them answers: look up what follows the walk's end instead.
            None => {
                let last = walk.last().expect("walk starts with the owner").id;
                let Ok(f) = lookup_via(net, start.clone(), last.wrapping_add(Id::pow2(0))).await else { break };
                std::iter::once(f.owner).chain(f.successors).collect()
            }
        };
        let before = walk.len();
        let known: Vec<Id> = walk.iter().map(|w| w.id).collect();
        let fresh: Vec<Contact<A>> = next.into_iter().skip_while(|c| known.contains(&c.id)).collect();
        for c in fresh {
            if c.id == found.owner.id || walk.iter().any(|w| w.id == c.id) {
                break;
            }
            walk.push(c);
        }
        if walk.len() == before {
            break;
        }
    }
    if distinct(&walk) < peers {
        // Still short: in a ring still linking its joiners in, a joiner is known at
        // first only to the vnode just before it (as its first successor); successor
        // lists learn of it one stabilize round (150 ms) per hop backwards, so for a
        // second or two a walk that follows lists skips it. Ask the vnodes of the walk
        // for their successors at once and merge what they know.
        let suspects = net.suspects();
        let asked: Vec<&Contact<A>> = walk.iter().filter(|c| !suspects.contains(&c.addr)).take(DEEP_WALK_ASKS).collect();
        let infos = futures_util::future::join_all(asked.into_iter().map(|c| neighbors(net, c))).await;
        let span = walk.last().map_or(Id::pow2(0), |l| key.distance_to(l.id));
        let mut all = walk.clone();
        for info in infos.into_iter().flatten().filter(|i| i.vnode_exists) {
            all.extend(info.succ);
            // A joiner just before a vnode of the walk is that vnode's predecessor first.
            all.extend(info.pred.filter(|p| key.distance_to(p.id) < span));
        }
        // Clockwise from the key: the first is its owner (a joiner may have taken the
        // key from the one the lookup found).
        all.sort_by_key(|c| key.distance_to(c.id));
        all.dedup_by(|a, b| a.id == b.id);
        if distinct(&all) > distinct(&walk) {
            let arc_from = if all[0].id == found.owner.id { arc_from } else { key.wrapping_sub(Id::pow2(0)) };
            return Ok(Walk { arc_from, vnodes: all });
        }
    }
    Ok(Walk { arc_from, vnodes: walk })
}

/// Samples the ring for vnode placement: SAMPLE_WALKS random lookups, each followed by
/// a short walk along successors. Each sample is a vnode's arc and its peer's load. The
/// walks are independent (their keys are drawn first), so they run concurrently: one
/// round trip per step of the longest walk, not per step of all of them.
pub async fn sample_ring<A: Addr, T: Transport<A>, R: Rng + Send>(
    net: &T,
    bootstrap: &A,
    rng: &mut R,
) -> Result<Vec<Sample<A>>, LookupError> {
    let keys = sample_keys(rng);
    let walks = futures_util::future::join_all(keys.into_iter().map(|k| sample_walk(net, bootstrap, k))).await;
    merge_samples(walks)
}

/// The start keys of a ring sample's walks.
pub fn sample_keys<R: Rng>(rng: &mut R) -> Vec<Id> {
    (0..SAMPLE_WALKS).map(|_| Id::from_fraction(rng.gen())).collect()
}

/// The samples of all walks, in walk order, each vnode once. Fails only if every walk
/// failed (a few lost walks just mean fewer samples).
pub fn merge_samples<A: Addr>(walks: Vec<Result<Vec<Sample<A>>, LookupError>>) -> Result<Vec<Sample<A>>, LookupError> {
    let mut seen: HashSet<Id> = HashSet::new();
    let mut out = Vec::new();
    let mut last_err = None;
    let mut any_ok = false;
    for w in walks {
        match w {
            Ok(samples) => {
                any_ok = true;
                out.extend(samples.into_iter().filter(|s| seen.insert(s.vnode)));
            }
            Err(e) => last_err = Some(e),
        }
    }
    match (any_ok, last_err) {
        (false, Some(e)) => Err(e),
        _ => Ok(out),
    }
}

/// One sample walk: the owner of `key`, then up to SAMPLE_WALK_LEN successors (one
/// direct call each), each with its peer's largest arc.
pub async fn sample_walk<A: Addr, T: Transport<A>>(net: &T, bootstrap: &A, key: Id) -> Result<Vec<Sample<A>>, LookupError> {
    let found = lookup_via(net, vec![bootstrap.clone()], key).await?;
    let mut out: Vec<Sample<A>> = Vec::new();
    let mut sampled: HashSet<Id> = HashSet::new();
    let mut at = found.owner;
    for _ in 0..SAMPLE_WALK_LEN {
        if !sampled.insert(at.id) {
            break; // walked all the way round a small ring
        }
        let Ok(info) = neighbors(net, &at).await else { break };
        let (Some(pred), true) = (info.pred.clone(), info.vnode_exists) else { break };
        out.push(Sample {
            vnode: at.id,
            pred: pred.id,
            peer: at.addr.clone(),
            peer_capacity_bytes: info.peer_capacity_bytes,
            peer_share: info.peer_share,
        });
        // The peer's largest arc too: if the peer holds too much, that is where a cut
        // helps (the arc just sampled may be a sliver).
        if let Some((pred, vnode)) = info.largest_arc {
            if vnode != at.id {
                // (a vnode met twice is dropped by merge_samples)
                out.push(Sample { vnode, pred, peer: at.addr.clone(), peer_capacity_bytes: info.peer_capacity_bytes, peer_share: info.peer_share });
            }
        }
        match info.succ.first() {
            Some(next) => at = next.clone(),
            None => break,
        }
    }
    Ok(out)
}

/// Joins every vnode of `node` to the ring `bootstrap` belongs to: find the vnode's
/// successor, adopt its predecessor and successor list, tell both neighbours, and seed
/// the finger table from the successor's (the Chord paper's join optimisation).
pub async fn join<A: Addr, T: Transport<A>>(
    node: &Mutex<Node<A>>,
    net: &T,
    bootstrap: &A,
    now_ms: u64,
) -> Result<(), JoinError> {
    let (ids, me) = {
        let mut n = node.lock();
        n.remember(bootstrap);
        (n.vnode_ids(), n.addr.clone())
    };
    for id in ids {
        let found = lookup_via_node(node, net, bootstrap, id, now_ms).await?;
        let succ = found.owner;
        if succ.id == id && succ.addr != me {
            return Err(JoinError::Collision(format!("vnode {} is already run by {:?}", id.to_hex(), succ.addr)));
        }
        if succ.id == id {
            // Still in the ring from before a restart: take the successors it reported.
            let mut n = node.lock();
            let r = n.config.successor_list_len;
            if let Some(v) = n.vnode_mut(id) {
                v.set_successors(found.successors.clone(), r);
            }
            continue;
        }
        let info = match call(node, net, &succ.addr, RingRequest::Neighbors { vnode: succ.id }, now_ms).await? {
            RingResponse::Neighbors(i) => i,
            other => return Err(JoinError::Net(unexpected("Neighbors", &other))),
        };
        let fingers = match call(node, net, &succ.addr, RingRequest::Fingers { vnode: succ.id }, now_ms).await {
            Ok(RingResponse::Fingers(f)) => f,
            _ => Vec::new(),
        };
        {
            let mut n = node.lock();
            let r = n.config.successor_list_len;
            let v = n.vnode_mut(id).expect("joining vnode belongs to this node");
            v.set_pred(info.pred.clone().filter(|p| p.id != id));
            v.pred_seen_ms = now_ms;
            let mut list = vec![succ.clone()];
            list.extend(info.succ.iter().cloned());
            v.set_successors(list, r);
            v.seed_fingers(fingers);
        }
        let me_c = Contact { id, addr: me.clone() };
        call(node, net, &succ.addr, RingRequest::Notify { vnode: succ.id, candidate: me_c.clone(), as_successor: false }, now_ms)
            .await?;
        if let Some(p) = info.pred.filter(|p| p.id != id) {
            // Best effort: if the predecessor is unreachable, its successor's stabilize fixes it.
            let _ = call(node, net, &p.addr, RingRequest::Notify { vnode: p.id, candidate: me_c, as_successor: true }, now_ms).await;
        }
    }
    Ok(())
}

/// Lookup for a joining node: through the bootstrap peer, but answering calls to our
/// own address locally (our earlier vnodes are already in the ring).
async fn lookup_via_node<A: Addr, T: Transport<A>>(
    node: &Mutex<Node<A>>,
    net: &T,
    bootstrap: &A,
    key: Id,
    now_ms: u64,
) -> Result<Found<A>, LookupError> {
    let (l, step) = Lookup::from_addrs(key, vec![bootstrap.clone()]);
    run_lookup(Some(node), net, l, step, now_ms).await
}

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(transparent)]
    Lookup(#[from] LookupError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("vnode id collision: {0}")]
    Collision(String),
}

/// Chord stabilize for one vnode: ask the first live successor for its predecessor and
/// successor list, adopt a closer successor if one appeared, then notify it.
pub async fn stabilize<A: Addr, T: Transport<A>>(node: &Mutex<Node<A>>, net: &T, vnode: Id, now_ms: u64) {
    // Only the round that just ran counts: a successor that stopped answering (or no
    // longer names us) ends what `Node::authority` grants at once, not a window later.
    let confirmed = stabilize_round(node, net, vnode, now_ms).await;
    if let Some(v) = node.lock().vnode_mut(vnode) {
        v.succ_confirmed_ms = if confirmed { now_ms.max(1) } else { 0 };
    }
}

/// One stabilize; true if our first successor named this vnode as its predecessor.
async fn stabilize_round<A: Addr, T: Transport<A>>(node: &Mutex<Node<A>>, net: &T, vnode: Id, now_ms: u64) -> bool {
    let (me, max_tries) = {
        let n = node.lock();
        (n.addr.clone(), n.config.successor_list_len + 1)
    };
    // Our first successor is one of our own vnodes while we have heard of other peers:
    // we may be an island left by a partition (our vnodes pointing only at each other),
    // which stabilize alone never notices. Now and then (one round in ISLAND_CHECK_EVERY,
    // staggered by vnode), look ourselves up through a remembered peer to merge back.
    let island = {
        let n = node.lock();
        let own_first = n.vnode(vnode).and_then(|v| v.succ.first()).is_some_and(|s| s.addr == me);
        let turn = (now_ms / 1000 + vnode.to_bytes()[19] as u64).is_multiple_of(ISLAND_CHECK_EVERY);
        own_first && turn && !n.seen.is_empty()
    };
    if island {
        rejoin_vnode_via(node, net, vnode, ISLAND_PROBES, now_ms).await;
    }
    for attempt in 0..max_tries {
        let first = node.lock().first_successor(vnode);
        let Some(succ) = first else {
            rejoin_vnode(node, net, vnode, now_ms).await;
            return false;
        };
        match call(node, net, &succ.addr, RingRequest::Neighbors { vnode: succ.id }, now_ms).await {
            Ok(RingResponse::Neighbors(info)) if info.vnode_exists => {
                let names_us = info.pred.as_ref().is_some_and(|p| p.id == vnode);
                let first = {
                    let mut n = node.lock();
                    n.remember(&succ.addr);
                    n.apply_stabilize(vnode, &succ, &info, now_ms)
                };
                // A closer successor appeared: ask it too, now. Taking one step back per
                // round is not enough after a mass failure, when the first live entry of a
                // stale successor list can lie a dozen live vnodes past the true successor
                // (seen at 10,000 peers: 16 rounds to converge).
                let moved = first.as_ref().is_some_and(|f| f.id != succ.id);
                if moved && attempt + 1 < max_tries {
                    continue;
                }
                if let Some(first) = first {
                    let cand = Contact { id: vnode, addr: me.clone() };
                    let req = RingRequest::Notify { vnode: first.id, candidate: cand, as_successor: false };
                    let _ = call(node, net, &first.addr, req, now_ms).await;
                }
                return names_us && !moved;
            }
            Ok(_) => {
                // That vnode is gone (its peer left or changed identity): drop just it,
                // everywhere, and keep it from being copied back from neighbours' lists.
                node.lock().mark_gone(succ.id, now_ms);
            }
            Err(NetError::Unreachable(_)) => {
                // Refused or no route: drop the peer from all our vnodes' lists at once.
                node.lock().drop_unreachable(&succ.addr, now_ms);
            }
            Err(_) => {
                // No answer in time, perhaps a lost message: skip it for this vnode only;
                // the next successor's predecessor pointer brings it back if it lives.
                if let Some(v) = node.lock().vnode_mut(vnode) {
                    v.succ.retain(|s| s.addr != succ.addr);
                }
            }
        }
    }
    false
}

/// A vnode that lost every successor finds its place again through any peer it has
/// heard of (the state after a partition heals), or failing that its predecessor.
async fn rejoin_vnode<A: Addr, T: Transport<A>>(node: &Mutex<Node<A>>, net: &T, vnode: Id, now_ms: u64) {
    if !rejoin_vnode_via(node, net, vnode, SEEN_PROBES, now_ms).await {
        adopt_predecessor_as_successor(node, vnode);
    }
}

/// How many remembered peers one maintenance round may ask (each may time out).
const SEEN_PROBES: usize = 4;
const ISLAND_PROBES: usize = 2;
const ISLAND_CHECK_EVERY: u64 = 8;

async fn rejoin_vnode_via<A: Addr, T: Transport<A>>(
    node: &Mutex<Node<A>>,
    net: &T,
    vnode: Id,
    probes: usize,
    now_ms: u64,
) -> bool {
    let (seen, me) = {
        let n = node.lock();
        (n.seen.clone(), n.addr.clone())
    };
    for via in seen.iter().rev().take(probes) {
        // The others are asked to route around us as if we were dead: they answer with
        // the first vnode after ours that is not ours, which is what an island lacks.
        // (Merely not asking ourselves is not enough: everyone would keep pointing the
        // lookup at us, and it would wander the ring.)
        let key = vnode.wrapping_add(Id::pow2(0));
        let (l, step) = Lookup::from_addrs_avoiding(key, vec![via.clone()], vec![me.clone()]);
        if let Ok(found) = run_lookup(Some(node), net, l, step, now_ms).await {
            let mut n = node.lock();
            let r = n.config.successor_list_len;
            if let Some(v) = n.vnode_mut(vnode) {
                let mut list = vec![found.owner];
                list.extend(found.successors);
                if found_foreign(&list, &me) || v.succ.is_empty() {
                    v.set_successors(list, r);
                }
                if !v.succ.is_empty() {
                    return true;
                }
            }
        }
    }
    false
}

fn found_foreign<A: Addr>(list: &[Contact<A>], me: &A) -> bool {
    list.iter().any(|c| &c.addr != me)
}

/// With every successor gone, the predecessor is the best pointer left; stabilize then
/// walks forward from it.
fn adopt_predecessor_as_successor<A: Addr>(node: &Mutex<Node<A>>, vnode: Id) {
    let mut n = node.lock();
    let r = n.config.successor_list_len;
    let fallback: Vec<Contact<A>> = {
        let me_v = n.vnode(vnode);
        let mut c: Vec<Contact<A>> = me_v.map(|v| v.fingers.clone()).unwrap_or_default();
        if let Some(p) = me_v.and_then(|v| v.pred.clone()) {
            c.push(p);
        }
        // Our own other vnodes are certainly alive: a peer whose neighbours all died ends
        // up a ring of its own vnodes rather than pointing at the dead forever.
        let own: Vec<Contact<A>> = n.vnodes.iter().filter(|v| v.id != vnode).map(|v| n.contact(v.id)).collect();
        c.extend(own);
        c
    };
    if let Some(v) = n.vnode_mut(vnode) {
        v.set_successors(fallback, r);
    }
}

/// Chord check_predecessor: forget a predecessor that does not answer.
pub async fn check_predecessor<A: Addr, T: Transport<A>>(node: &Mutex<Node<A>>, net: &T, vnode: Id, now_ms: u64) {
    let Some(pred) = node.lock().vnode(vnode).and_then(|v| v.pred.clone()) else { return };
    match call(node, net, &pred.addr, RingRequest::Neighbors { vnode: pred.id }, now_ms).await {
        Ok(RingResponse::Neighbors(info)) if info.vnode_exists => {
            if let Some(v) = node.lock().vnode_mut(vnode) {
                v.pred_seen_ms = now_ms;
            }
        }
        Ok(RingResponse::Neighbors(_)) => node.lock().mark_gone(pred.id, now_ms),
        _ => {
            if let Some(v) = node.lock().vnode_mut(vnode) {
                if v.pred.as_ref().is_some_and(|p| p.id == pred.id) {
                    v.set_pred(None);
                }
            }
        }
    }
}

/// Chord fix_fingers: refresh `count` finger exponents of one vnode, round robin.
pub async fn fix_fingers<A: Addr, T: Transport<A>>(
    node: &Mutex<Node<A>>,
    net: &T,
    vnode: Id,
    count: usize,
    now_ms: u64,
) {
    for _ in 0..count {
        let exp = {
            let mut n = node.lock();
            let Some(v) = n.vnode_mut(vnode) else { return };
            let floor = v.finger_floor();
            if v.next_finger_exp < floor || v.next_finger_exp > 159 {
                v.next_finger_exp = 159;
            }
            let e = v.next_finger_exp;
            v.next_finger_exp = if e <= floor { 159 } else { e - 1 };
            e
        };
        let target = vnode.wrapping_add(Id::pow2(exp));
        // A target within our own successor list needs no lookup: the list is the run of
        // vnodes after ours, so its first entry at or after the target owns it.
        let local = {
            let n = node.lock();
            n.vnode(vnode).and_then(|v| {
                let d = vnode.distance_to(target);
                v.succ.last().filter(|l| vnode.distance_to(l.id) >= d)?;
                v.succ.iter().find(|c| vnode.distance_to(c.id) >= d).cloned()
            })
        };
        if let Some(owner) = local {
            if let Some(v) = node.lock().vnode_mut(vnode) {
                v.set_finger(exp, owner);
            }
            continue;
        }
        // In a settled ring the finger we have is usually still right: one question to
        // it (is the target past your predecessor?) confirms it, where a lookup takes
        // log N hops. (While a ring grows fast, most are stale and this is one wasted call.)
        let old = node.lock().vnode(vnode).and_then(|v| v.finger_for(exp).filter(|f| exp == 159 || vnode.distance_to(f.id) < Id::pow2(exp + 1)).cloned());
        if let Some(f) = old {
            if let Ok(RingResponse::Neighbors(info)) = call(node, net, &f.addr, RingRequest::Neighbors { vnode: f.id }, now_ms).await {
                if info.vnode_exists && info.pred.as_ref().is_some_and(|p| target.in_open_closed(p.id, f.id)) {
                    if let Some(v) = node.lock().vnode_mut(vnode) {
                        v.set_finger(exp, f);
                    }
                    continue;
                }
            }
        }
        if let Ok(found) = lookup(node, net, target, now_ms).await {
            if let Some(v) = node.lock().vnode_mut(vnode) {
                v.set_finger(exp, found.owner);
            }
        }
    }
}

/// How many finger exponents a vnode currently keeps (for a full refresh).
pub fn finger_span<A: Addr>(node: &Mutex<Node<A>>, vnode: Id) -> usize {
    node.lock().vnode(vnode).map(|v| 160 - v.finger_floor() as usize).unwrap_or(0)
}

/// One maintenance round for every vnode of a peer.
pub async fn maintain<A: Addr, T: Transport<A>>(node: &Mutex<Node<A>>, net: &T, fingers_per_vnode: usize, now_ms: u64) {
    let ids = node.lock().vnode_ids();
    for id in &ids {
        check_predecessor(node, net, *id, now_ms).await;
        stabilize(node, net, *id, now_ms).await;
    }
    for id in &ids {
        fix_fingers(node, net, *id, fingers_per_vnode, now_ms).await;
    }
}

/// Leaves cleanly: each vnode's neighbours are told to splice it out.
pub async fn leave<A: Addr, T: Transport<A>>(node: &Mutex<Node<A>>, net: &T) {
    type Neighbours<A> = (Contact<A>, Option<Contact<A>>, Vec<Contact<A>>);
    let vnodes: Vec<Neighbours<A>> = {
        let n = node.lock();
        n.vnodes.iter().map(|v| (n.contact(v.id), v.pred.clone(), v.succ.clone())).collect()
    };
    // From here on we answer as a peer without vnodes, so a neighbour's stabilize that
    // races with the Leave messages cannot adopt us again.
    node.lock().vnodes.clear();
    let me = node.lock().addr.clone();
    for (c, pred, succ) in vnodes {
        let others: Vec<Contact<A>> = succ.iter().filter(|s| s.addr != me).cloned().collect();
        if let Some(s) = others.first() {
            let req = RingRequest::Leave { vnode: s.id, leaving: c.clone(), new_pred: pred.clone(), new_succ: Vec::new() };
            let _ = net.call(&s.addr, req).await;
        }
        if let Some(p) = pred.filter(|p| p.addr != me) {
            let req = RingRequest::Leave { vnode: p.id, leaving: c.clone(), new_pred: None, new_succ: others };
            let _ = net.call(&p.addr, req).await;
        }
    }
}
