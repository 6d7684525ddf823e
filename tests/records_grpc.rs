//! Metadata records on real gRPC peers on 127.0.0.1: compare-and-swap serialises
//! writers (no lost update), readers get the newest version, tombstones stay, and a
//! dead replica is routed around.

mod common;

use common::*;
use mutualstore::erasure::client::StripeClient;
use mutualstore::meta::client::{RecordClient, Swap};
use mutualstore::ring::Id;
use mutualstore::rpc::client::GrpcNet;
use std::sync::Arc;
use std::time::Duration;

async fn client(start: &mutualstore::rpc::NetAddr) -> RecordClient {
    let net = Arc::new(GrpcNet::for_client().with_tls(test_tls()));
    let (_, code) = net.hello(start, "").await.unwrap();
    RecordClient::new(StripeClient::new(net, vec![start.clone()], code))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cas_serialises_writers_and_tombstones_stay() {
    let tmp = tempfile::tempdir().unwrap();
    let peers = start_ring(tmp.path(), 4, GIB).await;
    let refs: Vec<_> = peers.iter().collect();
    wait_converged(&refs, Duration::from_secs(20)).await;
    let c = client(&peers[0].addr).await;
    let k = Id::sha1(b"record under test");

    assert_eq!(c.get(k).await.unwrap().version, 0);
    assert_eq!(c.cas(k, 0, Some(b"a".to_vec())).await.unwrap(), Swap::Done(1));
    match c.cas(k, 0, Some(b"b".to_vec())).await.unwrap() {
        Swap::Conflict(r) => assert_eq!((r.version, r.data.as_slice()), (1, b"a".as_slice())),
        other => panic!("a stale CAS succeeded: {other:?}"),
    }
    assert_eq!(c.cas(k, 1, Some(b"b".to_vec())).await.unwrap(), Swap::Done(2));
    // Another client, through another peer, reads the newest.
    let c2 = client(&peers[2].addr).await;
    let r = c2.get(k).await.unwrap();
    assert_eq!((r.version, r.data.as_slice()), (2, b"b".as_slice()));

    // Eight writers, each adding 1 twenty times through a read-CAS loop: no update lost.
    let counter = Id::sha1(b"counter");
    let mut tasks = Vec::new();
    for w in 0..8 {
        let c = client(&peers[w % peers.len()].addr).await;
        tasks.push(tokio::spawn(async move {
            for _ in 0..20 {
                let mut cur = c.get(counter).await.unwrap();
                loop {
                    let n: u64 = if cur.version == 0 { 0 } else { String::from_utf8(cur.data.clone()).unwrap().parse().unwrap() };
                    match c.cas(counter, cur.version, Some((n + 1).to_string().into_bytes())).await.unwrap() {
                        Swap::Done(_) => break,
                        Swap::Conflict(r) => cur = r,
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let r = c.get(counter).await.unwrap();
    assert_eq!(String::from_utf8(r.data).unwrap(), "160");
    assert_eq!(r.version, 160);

    // A tombstone keeps its version: an old writer cannot bring the record back.
    assert_eq!(c.cas(k, 2, None).await.unwrap(), Swap::Done(3));
    let r = c2.get(k).await.unwrap();
    assert!(r.deleted && r.version == 3 && !r.exists());
    assert!(matches!(c.cas(k, 0, Some(b"zombie".to_vec())).await.unwrap(), Swap::Conflict(_)));
    for p in peers {
        p.stop_abruptly().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_and_reads_go_on_with_a_replica_dead() {
    let tmp = tempfile::tempdir().unwrap();
    let mut peers = start_ring(tmp.path(), 4, GIB).await;
    let refs: Vec<_> = peers.iter().collect();
    wait_converged(&refs, Duration::from_secs(20)).await;
    let c = client(&peers[0].addr).await;
    // A key whose replica set does not include the peer the client talks to.
    let mut k = Id::sha1(b"k0");
    let mut n = 0u32;
    let victim = loop {
        let set = c.stripes.peers_for(k, c.replicas).await.unwrap();
        if !set.contains(&peers[0].addr) {
            break set[0].clone();
        }
        n += 1;
        k = Id::sha1(format!("k{n}").as_bytes());
    };
    assert_eq!(c.cas(k, 0, Some(b"v1".to_vec())).await.unwrap(), Swap::Done(1));
    let i = peers.iter().position(|p| p.addr == victim).unwrap();
    peers.remove(i).stop_abruptly().await;
    // The primary is gone: the write goes on through the next replica, bounded in time.
    let r = tokio::time::timeout(Duration::from_secs(30), c.cas(k, 1, Some(b"v2".to_vec()))).await.expect("CAS hangs with a replica dead");
    assert_eq!(r.unwrap(), Swap::Done(2));
    let r = c.get(k).await.unwrap();
    assert_eq!((r.version, r.data.as_slice()), (2, b"v2".as_slice()));
    for p in peers {
        p.stop_abruptly().await;
    }
}

/// A batched read answers every record as reading it alone would: the newest version,
/// "nothing newer" for a version the reader has, absent for a never-written key; and
/// with a replica peer dead it still answers each (the short batches fall back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_reads_match_single_reads_even_with_a_peer_dead() {
    let tmp = tempfile::tempdir().unwrap();
    let mut peers = start_ring(tmp.path(), 5, GIB).await;
    let refs: Vec<_> = peers.iter().collect();
    wait_converged(&refs, Duration::from_secs(20)).await;
    let c = client(&peers[0].addr).await;
    let keys: Vec<Id> = (0..60).map(|i| Id::sha1(format!("batched {i}").as_bytes())).collect();
    // Key i is written i % 3 times (0: never).
    for (i, k) in keys.iter().enumerate() {
        for v in 0..(i % 3) as u64 {
            assert_eq!(c.cas(*k, v, Some(format!("{i}@{}", v + 1).into_bytes())).await.unwrap(), Swap::Done(v + 1));
        }
    }
    let check = |got: Vec<Result<Option<mutualstore::meta::Record>, _>>, asked: &[(Id, u64)]| {
        assert_eq!(got.len(), asked.len());
        for (i, (r, (_, known))) in got.into_iter().zip(asked).enumerate() {
            let r = r.unwrap_or_else(|e| panic!("record {i}: {e}"));
            let newest = (i % 3) as u64;
            if newest == 0 || *known == newest {
                assert!(r.is_none(), "record {i} (known {known}): got {r:?}");
            } else {
                let r = r.unwrap_or_else(|| panic!("record {i}: version {newest} not returned"));
                assert_eq!((r.version, r.data), (newest, format!("{i}@{newest}").into_bytes()), "record {i}");
            }
        }
    };
    // Knowing nothing, then knowing the newest of every other one.
    let fresh: Vec<(Id, u64)> = keys.iter().map(|k| (*k, 0)).collect();
    check(c.get_newer_many(&fresh).await, &fresh);
    let half: Vec<(Id, u64)> = keys.iter().enumerate().map(|(i, k)| (*k, if i % 2 == 0 { (i % 3) as u64 } else { 0 })).collect();
    check(c.get_newer_many(&half).await, &half);
    // A peer that is every third key's primary or second replica dies: answers stay whole.
    peers.remove(2).stop_abruptly().await;
    let got = tokio::time::timeout(Duration::from_secs(60), c.get_newer_many(&fresh)).await.expect("a batched read hangs with a peer dead");
    check(got, &fresh);
    for p in peers {
        p.stop_abruptly().await;
    }
}

/// One primary per key: once the ring has converged, a client's walk and every peer's own
/// routing name the same owner for every key, the oracle's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_and_peers_agree_on_every_keys_primary() {
    let tmp = tempfile::tempdir().unwrap();
    let peers = start_ring(tmp.path(), 3, GIB).await;
    let refs: Vec<_> = peers.iter().collect();
    assert_eq!(wait_converged(&refs, Duration::from_secs(30)).await, (0, 0));
    let o = oracle(&refs);
    let c = client(&peers[0].addr).await;
    let mut bad = Vec::new();
    for i in 0..500u32 {
        let k = Id::sha1(&i.to_be_bytes());
        let truth = o[&successor_of(&o, k)].clone();
        let walk = c.stripes.peers_for(k, 2).await.unwrap();
        if walk[0] != truth {
            let w = mutualstore::ring::driver::walk_from(&*c.stripes.net, vec![peers[0].addr.clone()], k, 2).await.unwrap();
            let near: Vec<String> = o.range(k..).take(4).map(|(id, a)| format!("{} {a}", &id.to_hex()[..8])).collect();
            let ws: Vec<String> = w.vnodes.iter().take(4).map(|c| format!("{} {}", &c.id.to_hex()[..8], c.addr)).collect();
            bad.push(format!("key {k}: client walk says {}, oracle {truth}; fresh walk {ws:?}; oracle {near:?}", walk[0]));
        }
        for p in &peers {
            if let Some(owner) = p.state.node.lock().owner_of(k) {
                if owner != truth {
                    bad.push(format!("key {k}: peer {} says {owner}, oracle {truth}", p.addr));
                }
            }
        }
    }
    assert!(bad.is_empty(), "{} disagreements, e.g.:\n{}", bad.len(), bad.iter().take(10).cloned().collect::<Vec<_>>().join("\n"));
    for p in peers {
        p.stop_abruptly().await;
    }
}

/// Records regain m+1 copies after a loss (upkeep), so a second loss later loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_are_re_replicated_after_a_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let mut peers = start_ring(tmp.path(), 4, GIB).await;
    let refs: Vec<_> = peers.iter().collect();
    wait_converged(&refs, Duration::from_secs(20)).await;
    let c = client(&peers[0].addr).await;
    let keys: Vec<Id> = (0..20u32).map(|i| Id::sha1(format!("rec{i}").as_bytes())).collect();
    for k in &keys {
        assert_eq!(c.cas(*k, 0, Some(k.to_hex().into_bytes())).await.unwrap(), Swap::Done(1));
    }
    // Lose one peer (not the client's), let upkeep restore the copies, lose another.
    for round in 0..2 {
        let victim = peers.len() - 1;
        peers.remove(victim).stop_abruptly().await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            c.stripes.forget_walks();
            let mut short = 0;
            for k in &keys {
                let set = c.stripes.peers_for(*k, c.replicas).await.unwrap();
                for p in &set {
                    let held = peers.iter().find(|x| x.addr == *p).map(|x| x.state.store.contains(&k.to_bytes())).unwrap_or(false);
                    if !held {
                        short += 1;
                    }
                }
            }
            if short == 0 {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "round {round}: {short} record copies still missing after 60 s");
        }
    }
    for k in &keys {
        let r = c.get(*k).await.unwrap();
        assert_eq!(r.data, k.to_hex().into_bytes(), "record lost after two losses with re-replication between");
    }
    for p in peers {
        p.stop_abruptly().await;
    }
}

/// Two primaries writing at once, each naming the other as replica, on keys that share
/// a lock slot: every write reaches both copies. A replica's put once waited for the
/// lock its own primary held across its call to the first peer, so the two waited on
/// each other until the call timed out and the writes came back partial.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primaries_replicating_to_each_other_do_not_wait_on_each_other() {
    let tmp = tempfile::tempdir().unwrap();
    let peers = start_ring(tmp.path(), 2, GIB).await;
    let refs: Vec<_> = peers.iter().collect();
    wait_converged(&refs, Duration::from_secs(20)).await;
    let net = Arc::new(GrpcNet::for_client().with_tls(test_tls()));
    // Keys that all land on one lock slot of a peer (the store hashes the last byte).
    let keys: Vec<Id> = (0u32..).map(|i| Id::sha1(format!("slot-{i}").as_bytes())).filter(|k| k.to_bytes()[19] % 64 == 7).take(64).collect();
    let (a, b) = (peers[0].addr.clone(), peers[1].addr.clone());
    let mut tasks = Vec::new();
    for (i, k) in keys.into_iter().enumerate() {
        let (net, a, b) = (net.clone(), a.clone(), b.clone());
        let (primary, replica) = if i % 2 == 0 { (a, b) } else { (b, a) };
        tasks.push(tokio::spawn(async move {
            let mut partial = 0;
            for v in 0..8u64 {
                // `insist`: each peer acts as primary whatever the ring says.
                match net.cas_record(&primary, k, v, false, vec![i as u8; 4096], &[replica.clone()], false, true).await {
                    Ok(mutualstore::meta::CasOutcome::Done(n)) => assert_eq!(n, v + 1),
                    // Partial: the replica did not answer; Err: neither did the primary.
                    Ok(mutualstore::meta::CasOutcome::Partial { .. }) | Err(_) => {
                        partial += 1;
                        break;
                    }
                    Ok(other) => panic!("key {i}: unexpected {other:?}"),
                }
            }
            partial
        }));
    }
    let mut partial = 0;
    for t in tasks {
        partial += t.await.unwrap();
    }
    assert_eq!(partial, 0, "{partial} of 64 writers found a live peer not answering");
    for p in peers {
        p.stop_abruptly().await;
    }
}

/// A settled primary answers a read alone (one call instead of two) for what it wrote,
/// a peer that is not the primary never claims to, and a copy that changed behind the
/// primary's back (a replica's put, as another primary's write would be) is checked
/// against the replicas again before the primary answers alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settled_primary_answers_alone_only_for_what_it_vouched_for() {
    let tmp = tempfile::tempdir().unwrap();
    // Code 2+2: records have three copies, so a read needs two answers unless the
    // primary can answer alone (with 2+1 every read takes one answer anyway).
    let mut peers: Vec<mutualstore::peer::RunningPeer> = Vec::new();
    for i in 0..4 {
        let join = peers.first().map(|p| p.addr.clone());
        let mut cfg = peer_config(&tmp.path().join(format!("p{i}")), GIB, join.as_ref());
        cfg.code = Some(mutualstore::erasure::Code::new(2, 2).unwrap());
        peers.push(mutualstore::peer::start(cfg).await.unwrap());
    }
    let refs: Vec<_> = peers.iter().collect();
    assert_eq!(wait_converged(&refs, Duration::from_secs(30)).await, (0, 0));
    let c = client(&peers[0].addr).await;
    assert_eq!(c.replicas, 3);
    let net = c.stripes.net.clone();
    let k = Id::sha1(b"vouched record");
    assert_eq!(c.cas(k, 0, Some(b"one".to_vec())).await.unwrap(), Swap::Done(1));
    let set = c.stripes.peers_for(k, c.replicas).await.unwrap();
    assert_eq!(set.len(), 3);
    let (primary, others) = (&set[0], &set[1..]);

    // Neighbour confirmations come with the next maintenance rounds (every 100 ms here).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let (f, alone) = loop {
        let (f, alone) = net.get_record_as(primary, k, 0, Some(others)).await.unwrap();
        if alone || tokio::time::Instant::now() > deadline {
            break (f, alone);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(alone, "the primary of a settled 4-peer ring never answered alone");
    match f {
        mutualstore::meta::Fetched::Got(r) => assert_eq!((r.version, r.data.as_slice()), (1, b"one".as_slice())),
        other => panic!("asked with no known version, got {other:?}"),
    }
    let (_, alone) = net.get_record_as(&set[1], k, 0, Some(&[set[0].clone(), set[2].clone()])).await.unwrap();
    assert!(!alone, "a replica that does not own the key answered as its primary");

    // Version 2 lands on the primary's copy without its CAS (another primary's write
    // reaching it as a replica): not vouched for, so the primary asks the replicas,
    // which hold version 1, and answers with the newest of all, 2.
    let v2 = mutualstore::meta::Record { version: 2, deleted: false, data: b"two".to_vec() };
    assert_eq!(net.put_record(primary, k, &v2, false).await.unwrap(), 2);
    let (f, _) = net.get_record_as(primary, k, 1, Some(others)).await.unwrap();
    assert_eq!(f.version(), 2);
    let r = c.get(k).await.unwrap();
    assert_eq!((r.version, r.data.as_slice()), (2, b"two".as_slice()));
    // The primary checked the replicas for its read: their copies of version 1 are what
    // it found behind, and it vouches for 2 now.
    let (_, alone) = net.get_record_as(primary, k, 2, Some(others)).await.unwrap();
    assert!(alone, "after checking the replicas the primary still does not vouch for version 2");
    for p in peers {
        p.stop_abruptly().await;
    }
}
