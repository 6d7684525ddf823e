//! The in-memory network harness: the real ring code over a seeded network that drops
//! messages, partitions and kills peers. Each scenario replays exactly from its seed.

use mutualstore::ring::vnode_position::{choose_positions, first_peer_positions, vnode_count};
use mutualstore::ring::{driver, Id, Node, RingConfig};
use mutualstore::sim::net::{run_ready, SimAddr, SimNet};
use mutualstore::sim::run::{run, SimConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;

fn build(n: usize, seed: u64) -> (SimNet, StdRng) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut net = SimNet::new(seed);
    let config = RingConfig { successor_list_len: 12, ..RingConfig::default() };
    for i in 0..n {
        let cap = (rng.gen_range(1..=10) as u64) << 30;
        let addr = i as SimAddr;
        if i == 0 {
            let mut node = Node::new(addr, Id::sha1(b"p0"), cap, &first_peer_positions(vnode_count(cap), &mut rng), config.clone());
            node.create_ring();
            net.add(node);
            continue;
        }
        let samples = run_ready(driver::sample_ring(&net.client(), &0, &mut rng)).expect("sampling succeeds");
        let ids = choose_positions(&samples, cap, vnode_count(cap), &mut rng);
        net.add(Node::new(addr, Id::sha1(format!("p{i}").as_bytes()), cap, &ids, config.clone()));
        run_ready(driver::join(&net.node(addr).clone(), &net.endpoint(addr), &0, 0)).expect("join succeeds");
    }
    (net, rng)
}

fn rounds(net: &mut SimNet, n: usize) {
    for _ in 0..n {
        net.now_ms += 1000;
        for a in net.alive_addrs() {
            let node = net.node(a).clone();
            run_ready(driver::maintain(&node, &net.endpoint(a), 40, net.now_ms));
        }
    }
}

fn truth(net: &SimNet) -> BTreeMap<Id, SimAddr> {
    let mut m = BTreeMap::new();
    for a in net.alive_addrs() {
        for v in net.node(a).lock().vnode_ids() {
            m.insert(v, a);
        }
    }
    m
}

/// Lookups from every live peer; returns how many reached a wrong owner or failed.
fn bad_lookups(net: &SimNet, rng: &mut StdRng, per_peer: usize) -> usize {
    bad_lookups_against(net, rng, per_peer, &truth(net), &[])
}

/// Lookups from every live peer not in `skip`, judged against `owners`.
fn bad_lookups_against(net: &SimNet, rng: &mut StdRng, per_peer: usize, owners: &BTreeMap<Id, SimAddr>, skip: &[SimAddr]) -> usize {
    let mut bad = 0;
    for a in net.alive_addrs().into_iter().filter(|a| !skip.contains(a)) {
        for _ in 0..per_peer {
            let key = Id::from_fraction(rng.gen());
            let want = *owners.range(key..).next().or_else(|| owners.iter().next()).unwrap().0;
            let node = net.node(a).clone();
            match run_ready(driver::lookup(&node, &net.endpoint(a), key, net.now_ms)) {
                Ok(f) if f.owner.id == want => {}
                _ => bad += 1,
            }
        }
    }
    bad
}

#[test]
fn lookups_survive_message_loss() {
    let (mut net, mut rng) = build(60, 11);
    rounds(&mut net, 3);
    net.set_drop_probability(0.2);
    rounds(&mut net, 5); // maintenance under 20% loss must not corrupt the ring
    net.set_drop_probability(0.0);
    rounds(&mut net, 8);
    assert_eq!(bad_lookups(&net, &mut rng, 20), 0);
}

#[test]
fn the_majority_routes_around_a_partitioned_peer() {
    let (mut net, mut rng) = build(40, 12);
    rounds(&mut net, 3);
    net.partition(&[7], 1);
    rounds(&mut net, 6);
    // Seen from the majority, peer 7 is gone: every lookup from the other side reaches the
    // live owner it would have without 7 (keys of 7 resolve to its successors).
    let mut without7: BTreeMap<Id, SimAddr> = truth(&net);
    without7.retain(|_, a| *a != 7);
    let bad = bad_lookups_against(&net, &mut rng, 10, &without7, &[7]);
    assert_eq!(bad, 0, "lookups from the majority side went wrong during the partition");
    // Known gap, left for a later issue: after the partition heals, peer 7 (whose vnodes
    // meanwhile formed an island ring of their own) merges back only slowly through the
    // peers it remembers; at seed 12, 6 of 780 lookups are still wrong after 40 rounds.
}

#[test]
fn killing_a_third_of_the_peers_keeps_lookups_correct() {
    let (mut net, mut rng) = build(60, 13);
    rounds(&mut net, 3);
    for a in (0..60).step_by(3) {
        net.kill(a as SimAddr);
    }
    rounds(&mut net, 6);
    assert_eq!(bad_lookups(&net, &mut rng, 20), 0);
}

#[test]
fn same_seed_same_ring() {
    let (a, _) = build(30, 99);
    let (b, _) = build(30, 99);
    assert_eq!(truth(&a), truth(&b), "a seeded build must replay exactly");
}

#[test]
fn simulation_meets_its_targets_at_2000_peers() {
    let r = run(&SimConfig { peers: 2000, fail_fraction: 0.5, lookups: 5000, seed: 7, ..SimConfig::default() }, |_| {});
    let hop_target = 0.5 * (2000f64).log2() + 1.0;
    assert!(r.hops_mean <= hop_target, "hops_mean {} > {hop_target}", r.hops_mean);
    assert_eq!(r.failed_lookups, 0);
    assert_eq!(r.failed_lookups_after_fail, 0);
    assert!(r.load_max_over_fair <= 1.15 && r.load_min_over_fair >= 0.85, "load {}..{}", r.load_min_over_fair, r.load_max_over_fair);
}

/// A joiner is known at first only to its neighbours (its predecessor lists it as first
/// successor, its successor as predecessor); the other successor lists learn of it one
/// stabilize round per hop. A walk that comes up short (here: fewer than all nine peers)
/// asks its vnodes for what they know, so it meets the joiner before any round has run.
#[test]
fn a_short_walk_finds_a_joiner_no_round_has_spread_yet() {
    let (mut net, mut rng) = build(8, 21);
    rounds(&mut net, 12);
    let cap = 4u64 << 30;
    let samples = run_ready(driver::sample_ring(&net.client(), &0, &mut rng)).expect("sampling succeeds");
    let ids = choose_positions(&samples, cap, vnode_count(cap), &mut rng);
    let joiner = net.add(Node::new(8, Id::sha1(b"joiner"), cap, &ids, RingConfig { successor_list_len: 12, ..RingConfig::default() }));
    run_ready(driver::join(&net.node(joiner).clone(), &net.endpoint(joiner), &0, net.now_ms)).expect("join succeeds");
    // Walks from three vnodes before each of the joiner's: the joiner is in the middle of
    // the walk, where only its predecessor's list shows it.
    let before: Vec<Id> = truth(&net).keys().copied().filter(|id| !ids.contains(id)).collect();
    let mut missed = Vec::new();
    for v in &ids {
        let at = before.partition_point(|id| id < v);
        let key = before[(at + before.len() - 3) % before.len()];
        let w = run_ready(driver::walk_from(&net.client(), vec![0], key, 9)).expect("walk succeeds");
        if !w.vnodes.iter().any(|c| c.addr == joiner) {
            missed.push(v.to_hex());
        }
    }
    assert!(missed.is_empty(), "walks through {} of the joiner's {} vnodes never met the joiner: {missed:?}", missed.len(), ids.len());
}
