//! Where a joining peer puts its virtual nodes, and how many it runs.
//!
//! Owns: the vnode count for a capacity and the choice of vnode positions from a sample
//! of the ring. Never does I/O: the join driver gathers the samples.
//!
//! Why not random positions: the Chord paper measures the 99th-percentile load at ~1.6x
//! the mean even with log N random vnodes per peer. Instead the joiner samples vnodes
//! (uniform random keys -> their owners, so peers are hit in proportion to their share),
//! estimates the total capacity of the ring from the samples (E[cap/share] under
//! share-weighted sampling is exactly the total capacity), and places each of its vnodes
//! *inside the arc of the most over-loaded sampled peer*, cutting off exactly the bite
//! that moves that peer toward its fair share. Each joiner thus takes its own fair share
//! from the peers that hold too much, and load stays within a few percent of capacity.

use super::id::Id;
use rand::Rng;

/// One vnode per this many bytes of capacity, within [MIN_VNODES, MAX_VNODES]. The
/// share a peer owns comes from where its vnodes sit (arc lengths), so the count only
/// needs to grow with capacity enough that a joiner's bites out of other peers stay small.
pub const VNODE_BYTES: u64 = 256 << 20;
pub const MIN_VNODES: usize = 2;
pub const MAX_VNODES: usize = 64;
/// A victim may be cut down to this fraction of its fair share (it regains it as the
/// ring grows and fair shares shrink).
const VICTIM_FLOOR: f64 = 0.92;
/// Never take more than this fraction of one arc, so vnode ids stay distinct.
const MAX_ARC_BITE: f64 = 0.98;
/// How strongly the choice of victim favours the most over-loaded peers over big bites.
const SCORE_RATIO_POWER: i32 = 16;

pub fn vnode_count(capacity_bytes: u64) -> usize {
    let n = (capacity_bytes + VNODE_BYTES / 2) / VNODE_BYTES;
    (n as usize).clamp(MIN_VNODES, MAX_VNODES)
}

/// A joiner samples the ring by SAMPLE_WALKS lookups of random keys, each followed by a
/// walk of up to SAMPLE_WALK_LEN successors (one direct call each, not a lookup): a
/// cheap way to see enough peers that every over-loaded one is found before it drifts far.
/// Walks visit vnodes about uniformly, not by arc length, so each answer also names its
/// peer's largest arc: an over-loaded peer is cut where its load is, not in a sliver.
pub const SAMPLE_WALKS: usize = 16;
pub const SAMPLE_WALK_LEN: usize = 32;

/// One sampled vnode: its arc (pred, vnode] and its peer's load.
#[derive(Clone, Debug)]
pub struct Sample<P> {
    pub vnode: Id,
    pub pred: Id,
    pub peer: P,
    pub peer_capacity_bytes: u64,
    pub peer_share: f64,
}

/// Positions for a peer's vnodes when it is the first in a ring: evenly spread.
pub fn first_peer_positions<R: Rng>(count: usize, rng: &mut R) -> Vec<Id> {
    let offset: f64 = rng.gen();
    let mut ids: Vec<Id> = (0..count).map(|i| Id::from_fraction((offset + i as f64 / count as f64) % 1.0)).collect();
    ids.sort();
    ids.dedup();
    ids
}

/// Estimated total capacity of the ring from share-weighted samples. Each sample's
/// capacity / share equals the total capacity divided by that peer's load ratio; the
/// median is used because one badly under-loaded peer (a tiny share) would otherwise
/// blow the mean up and make every later joiner take too little.
pub fn estimate_total_capacity<P>(samples: &[Sample<P>]) -> Option<f64> {
    let mut vals: Vec<f64> = samples
        .iter()
        .filter(|s| s.peer_share > 0.0 && s.peer_capacity_bytes > 0)
        .map(|s| s.peer_capacity_bytes as f64 / s.peer_share)
        .collect();
    if vals.is_empty() {
        return None;
    }
    vals.sort_by(f64::total_cmp);
    let m = vals.len() / 2;
    Some(if vals.len() % 2 == 1 { vals[m] } else { (vals[m - 1] + vals[m]) / 2.0 })
}

fn arc_fraction<P>(s: &Sample<P>) -> f64 {
    let arc = s.pred.distance_to(s.vnode);
    if arc == Id::ZERO {
        1.0
    } else {
        arc.as_fraction()
    }
}

/// Chooses `count` new vnode positions for a peer of `capacity_bytes` given samples of
/// the current ring. Returns sorted, distinct ids that collide with no sampled vnode.
pub fn choose_positions<P: PartialEq + Clone, R: Rng>(
    samples: &[Sample<P>],
    capacity_bytes: u64,
    count: usize,
    rng: &mut R,
) -> Vec<Id> {
    let Some(total) = estimate_total_capacity(samples) else {
        return first_peer_positions(count, rng);
    };
    let cap = capacity_bytes as f64;
    let fair_density = 1.0 / (total + cap); // share per byte of capacity after we join
    let mut need = cap * fair_density;

    // Distinct arcs, each with its owner's current load.
    let mut arcs: Vec<Sample<P>> = samples.to_vec();
    arcs.sort_by_key(|s| s.vnode);
    arcs.dedup_by_key(|s| s.vnode);
    // excess[i]: how much of the keyspace the owner of arcs[i] may still give away.
    let mut peers: Vec<(P, f64, f64)> = Vec::new(); // (peer, capacity, share left)
    // arc_peer[i]: index in `peers` of the owner of arcs[i] (found once, not per slot).
    let mut arc_peer: Vec<usize> = Vec::with_capacity(arcs.len());
    for s in &arcs {
        let pi = match peers.iter().position(|(p, _, _)| *p == s.peer) {
            Some(pi) => pi,
            None => {
                peers.push((s.peer.clone(), s.peer_capacity_bytes as f64, s.peer_share));
                peers.len() - 1
            }
        };
        arc_peer.push(pi);
    }
    let mut used = vec![false; arcs.len()];
    let mut out: Vec<Id> = Vec::with_capacity(count);
    // Bounded: each pass either places a vnode or marks an arc used/unsplittable.
    let mut budget = 4 * count + 2 * arcs.len() + 4;
    while out.len() < count && budget > 0 {
        budget -= 1;
        let target = need.max(0.0) / (count - out.len()) as f64;
        // The arc whose owner is the most over-loaded (share / fair share), scored by the
        // bite it can give (up to the target) without pushing its owner below
        // VICTIM_FLOOR, weighted by how over-loaded the owner is.
        let mut best: Option<(usize, usize, f64, f64)> = None; // (arc, peer, score, len)
        for (i, a) in arcs.iter().enumerate() {
            if used[i] {
                continue;
            }
            let pi = arc_peer[i];
            let (_, pcap, pshare) = &peers[pi];
            let ratio = if *pcap > 0.0 { pshare / (pcap * fair_density) } else { f64::INFINITY };
            let len = arc_fraction(a);
            let give = (pshare - VICTIM_FLOOR * pcap * fair_density).max(0.0);
            let feasible = give.min(len * MAX_ARC_BITE).min(target);
            let score = (feasible / target.max(1e-300)).max(1e-6).sqrt() * ratio.powi(SCORE_RATIO_POWER);
            if len > 0.0 && best.is_none_or(|(_, _, sc, _)| score > sc) {
                best = Some((i, pi, score, len));
            }
        }
        let Some((i, pi, _, arc_len)) = best else {
            // Every sampled arc has had a bite (a small ring): bite into the rest of them.
            if used.iter().any(|u| *u) {
                used.iter_mut().for_each(|u| *u = false);
                continue;
            }
            break;
        };
        used[i] = true;
        let (_, pcap, pshare) = peers[pi];
        let give = (pshare - VICTIM_FLOOR * pcap * fair_density).max(0.0);
        let mut bite = target.min(arc_len * MAX_ARC_BITE);
        if give > 0.0 {
            bite = bite.min(give);
        } else {
            // Nobody sampled has spare: take a small bite rather than none, so the vnode exists.
            bite = bite.min(arc_len * 0.05);
        }
        let arc = arcs[i].pred.distance_to(arcs[i].vnode);
        // Random low bits: two peers that join at once with the same samples must still
        // pick distinct ids (the f64 bite leaves the low 96 bits zero otherwise).
        let noise = Id::from_bytes(&{
            let mut b = [0u8; 20];
            rng.fill(&mut b[8..]);
            b
        });
        let step = Id::from_fraction(bite).wrapping_add(noise).max(Id::pow2(0));
        let mut pos = arcs[i].pred.wrapping_add(step);
        if !pos.in_open_open(arcs[i].pred, arcs[i].vnode) {
            pos = arcs[i].pred.wrapping_add(arc.scale(0.5));
        }
        if !pos.in_open_open(arcs[i].pred, arcs[i].vnode) {
            // An arc of length 1 cannot be split; it is no candidate any more.
            arcs[i].pred = arcs[i].vnode.wrapping_sub(Id::pow2(0));
            continue;
        }
        // What is left of the arc, (pos, vnode], still belongs to the victim.
        arcs[i].pred = pos;
        peers[pi].2 -= bite;
        need -= bite;
        out.push(pos);
    }
    // Only when the samples offered no splittable arc at all.
    while out.len() < count {
        let f: f64 = rng.gen();
        out.push(Id::from_fraction(f));
    }
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use std::collections::BTreeMap;

    /// A placement-only model of the ring (no routing): vnode -> peer in a BTreeMap.
    /// Returns (min, max) of owned share / capacity share over all peers.
    pub(crate) fn model_balance(peers: usize, seed: u64) -> (f64, f64) {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut ring: BTreeMap<Id, usize> = BTreeMap::new();
        let mut caps: Vec<u64> = Vec::new();
        let mut share: Vec<f64> = Vec::new();
        let mut vn: Vec<Vec<Id>> = Vec::new();
        let owner_of = |ring: &BTreeMap<Id, usize>, k: Id| -> (Id, usize) {
            let (id, p) = ring.range(k..).next().or_else(|| ring.iter().next()).expect("ring not empty");
            (*id, *p)
        };
        let pred_of = |ring: &BTreeMap<Id, usize>, v: Id| -> Id {
            *ring.range(..v).next_back().or_else(|| ring.iter().next_back()).expect("ring not empty").0
        };
        for p in 0..peers {
            let cap = (rng.gen_range(1.0..10.0) * (1u64 << 30) as f64) as u64;
            let n = vnode_count(cap);
            let ids = if ring.is_empty() {
                first_peer_positions(n, &mut rng)
            } else {
                // As driver::sample_ring: independent walks, merged in order; each answer
                // also names the peer's largest arc.
                let mut samples: Vec<Sample<usize>> = Vec::new();
                let mut seen: std::collections::HashSet<Id> = std::collections::HashSet::new();
                for key in (0..SAMPLE_WALKS).map(|_| Id::from_fraction(rng.gen())).collect::<Vec<_>>() {
                    let (mut v, _) = owner_of(&ring, key);
                    let mut walked: std::collections::HashSet<Id> = std::collections::HashSet::new();
                    for _ in 0..SAMPLE_WALK_LEN {
                        if !walked.insert(v) { break; }
                        let owner = ring[&v];
                        if seen.insert(v) {
                            samples.push(Sample { vnode: v, pred: pred_of(&ring, v), peer: owner, peer_capacity_bytes: caps[owner], peer_share: share[owner] });
                        }
                        let big = vn[owner].iter().map(|id| (*id, pred_of(&ring, *id))).max_by_key(|(id, pr)| pr.distance_to(*id));
                        if let Some((id, pr)) = big.filter(|(id, _)| seen.insert(*id)) {
                            samples.push(Sample { vnode: id, pred: pr, peer: owner, peer_capacity_bytes: caps[owner], peer_share: share[owner] });
                        }
                        v = owner_of(&ring, v.wrapping_add(Id::pow2(0))).0;
                    }
                }
                choose_positions(&samples, cap, n, &mut rng)
            };
            caps.push(cap);
            share.push(0.0);
            vn.push(ids.clone());
            for id in ids {
                if ring.is_empty() {
                    ring.insert(id, p);
                    continue;
                }
                let (succ, owner) = owner_of(&ring, id);
                let before = pred_of(&ring, succ).distance_to(succ);
                ring.insert(id, p);
                let after = id.distance_to(succ);
                let taken = before.as_fraction() - after.as_fraction();
                share[owner] -= taken;
                share[p] += taken;
            }
            if p == 0 {
                share[0] = 1.0;
            }
        }
        let mut truth = vec![0.0f64; peers];
        let ids: Vec<(Id, usize)> = ring.iter().map(|(a, b)| (*a, *b)).collect();
        for (i, (id, p)) in ids.iter().enumerate() {
            let pred = ids[(i + ids.len() - 1) % ids.len()].0;
            truth[*p] += if ids.len() == 1 { 1.0 } else { pred.distance_to(*id).as_fraction() };
        }
        for i in 0..peers {
            assert!((truth[i] - share[i]).abs() < 1e-9, "model bookkeeping: peer {i} share {} vs truth {}", share[i], truth[i]);
        }
        let total: f64 = caps.iter().map(|&c| c as f64).sum();
        let ratios: Vec<f64> = (0..peers).map(|i| share[i] / (caps[i] as f64 / total)).collect();
        // For tuning: the most and least loaded peers with their arcs, and a histogram.
        if std::env::var("MS_MODEL_DIAG").is_ok() {
            let mut idx: Vec<usize> = (0..peers).collect();
            idx.sort_by(|a, b| ratios[*b].total_cmp(&ratios[*a]));
            for &i in idx.iter().take(3).chain(idx.iter().rev().take(5)) {
                let avg = 1.0 / ring.len() as f64;
                let arcs: Vec<String> = ring.iter().filter(|(_, &p)| p == i).map(|(v, _)| format!("{:.2}", pred_of(&ring, *v).distance_to(*v).as_fraction() / avg)).collect();
                eprintln!("  peer {i} cap {:.2} GiB vnodes {} ratio {:.4} arcs/avg {arcs:?}", caps[i] as f64 / (1u64 << 30) as f64, ring.values().filter(|&&p| p == i).count(), ratios[i]);
            }
            let mut hist = [0usize; 8];
            for r in &ratios { hist[(((r - 0.8) / 0.05).max(0.0) as usize).min(7)] += 1; }
            eprintln!("  histogram from 0.80 step 0.05: {hist:?}");
        }
        let min = ratios.iter().cloned().fold(f64::INFINITY, f64::min);
        let max = ratios.iter().cloned().fold(0.0, f64::max);
        (min, max)
    }

    #[test]
    fn vnode_count_follows_capacity() {
        assert_eq!(vnode_count(0), MIN_VNODES);
        assert_eq!(vnode_count(1 << 30), 4);
        assert_eq!(vnode_count(4 << 30), 16);
        assert!(vnode_count(10 << 30) > vnode_count(5 << 30));
        assert_eq!(vnode_count(u64::MAX / 2), MAX_VNODES);
    }

    #[test]
    fn estimate_is_exact_for_a_single_peer() {
        let s = vec![Sample { vnode: Id::pow2(10), pred: Id::pow2(10), peer: 0, peer_capacity_bytes: 7, peer_share: 1.0 }];
        assert_eq!(estimate_total_capacity(&s), Some(7.0));
    }

    #[test]
    fn placement_keeps_load_proportional_to_capacity() {
        for (peers, seed) in [(3, 1), (10, 2), (100, 3), (1000, 4)] {
            let (min, max) = model_balance(peers, seed);
            eprintln!("peers={peers} min={min:.3} max={max:.3}");
            assert!(max <= 1.15 && min >= 0.85, "peers={peers}: load ratio {min:.3}..{max:.3} outside 0.85..1.15");
        }
    }

    #[test]
    fn model_balance_at_scale_from_env() {
        // For tuning: MS_MODEL_PEERS=100000 cargo test --release model_balance_at_scale_from_env -- --nocapture
        if let Ok(n) = std::env::var("MS_MODEL_PEERS") {
            let n: usize = n.parse().expect("MS_MODEL_PEERS is a number");
            for seed in [42, 43, 44] {
                let (min, max) = model_balance(n, seed);
                eprintln!("model peers={n} seed={seed} min={min:.4} max={max:.4}");
            }
        }
    }
}
