//! Erasure-coded storage on real peer processes on 127.0.0.1: losses up to m, a frozen
//! peer, corrupt shards, repair after the grace period, rebalance on join, drain on leave.

mod common;

use common::procs::*;
use mutualstore::files::FileClient;
use mutualstore::ring::Id;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::path::Path;
use std::time::Duration;

const MIB: usize = 1 << 20;
const LONG: Duration = Duration::from_secs(120);

async fn put(ring: &ProcRing, path: &Path) -> Id {
    let (ok, out, err) = cli(&["put", path.to_str().unwrap(), "--join", &ring.first_alive(), "--secret-file", ring.secret_file.to_str().unwrap()], LONG).await;
    assert!(ok, "put failed: {err}");
    Id::from_hex(out.trim()).unwrap_or_else(|| panic!("put printed {out:?}"))
}

/// `get` through the CLI; Ok(bytes) or Err(stderr).
async fn get(ring: &ProcRing, handle: Id, out: &Path) -> Result<Vec<u8>, String> {
    let _ = std::fs::remove_file(out);
    let (ok, _, err) = cli(&["get", &handle.to_hex(), "-o", out.to_str().unwrap(), "--join", &ring.first_alive(), "--secret-file", ring.secret_file.to_str().unwrap()], LONG).await;
    if ok {
        Ok(std::fs::read(out).unwrap())
    } else {
        Err(err)
    }
}

fn write_file(dir: &Path, name: &str, len: usize, seed: u64) -> (std::path::PathBuf, Vec<u8>) {
    let data = bytes(len, seed);
    let p = dir.join(name);
    std::fs::write(&p, &data).unwrap();
    (p, data)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_plus_two_survives_any_two_kills_and_fails_clearly_on_a_third() {
    let dir = tempfile::tempdir().unwrap();
    let mut ring = ProcRing::start(&dir.path().join("ring"), 6, "4+2", "1GiB", 600.0);
    let st = ring.wait_ring(LONG).await;
    assert_eq!(st.code, "4+2");
    let (src, data) = write_file(dir.path(), "in", 50 * MIB, 1);
    let h = put(&ring, &src).await;
    let out = dir.path().join("out");
    assert!(get(&ring, h, &out).await.unwrap() == data, "healthy read differs");

    // Two peers, chosen by a seeded shuffle, die without a word.
    let mut order: Vec<usize> = (0..6).collect();
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(7));
    ring.kill(order[0]);
    ring.kill(order[1]);
    assert!(get(&ring, h, &out).await.unwrap() == data, "read with peers {} and {} dead differs", order[0], order[1]);

    // A third: now some stripes have only 3 of the 4 shards they need.
    ring.kill(order[2]);
    let err = get(&ring, h, &out).await.expect_err("a read with 3 of 6 peers dead must fail");
    assert!(err.contains("missing shards"), "the error names the missing shards: {err}");
    assert!(!out.exists(), "no partial output is left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_pair_of_unavailable_peers_is_survived_by_four_plus_two() {
    let dir = tempfile::tempdir().unwrap();
    let ring = ProcRing::start(&dir.path().join("ring"), 6, "4+2", "512MiB", 600.0);
    ring.wait_ring(LONG).await;
    let (src, data) = write_file(dir.path(), "in", 9 * MIB, 5);
    let h = put(&ring, &src).await;
    // Every stripe has one shard on each of the 6 peers, so freezing each of the 15 pairs
    // is every loss pattern of two shards (peer 0 is the client's way in, so its pairs are
    // frozen with reads entering through peer 5).
    let out = dir.path().join("out");
    for a in 0..6 {
        for b in a + 1..6 {
            ring.signal(a, libc::SIGSTOP);
            ring.signal(b, libc::SIGSTOP);
            let entry = if a == 0 { ring.addr(if b == 5 { 4 } else { 5 }) } else { ring.addr(0) };
            let r = FileClient::connect(entry, ring.tls.clone()).await.map_err(|e| e.to_string());
            let got = match r {
                Ok(c) => c.get_file(h, &out, None).await.map_err(|e| e.to_string()).map(|_| std::fs::read(&out).unwrap()),
                Err(e) => Err(e),
            };
            ring.signal(a, libc::SIGCONT);
            ring.signal(b, libc::SIGCONT);
            assert!(got.unwrap_or_else(|e| panic!("peers {a} and {b} unavailable: {e}")) == data, "peers {a} and {b} unavailable: bytes differ");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_plus_one_survives_the_loss_of_any_one_peer() {
    let dir = tempfile::tempdir().unwrap();
    let mut ring = ProcRing::start(&dir.path().join("ring"), 3, "2+1", "512MiB", 600.0);
    ring.wait_ring(LONG).await;
    let (src, data) = write_file(dir.path(), "in", 5 * MIB + 3, 2);
    let h = put(&ring, &src).await;
    let out = dir.path().join("out");
    for victim in 0..3 {
        ring.kill(victim);
        assert!(get(&ring, h, &out).await.unwrap() == data, "read with peer {victim} dead differs");
        // Bring it back with its shards before the next one goes.
        ring.restart(victim);
        ring.wait_ring(LONG).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_peer_does_not_stall_reads_and_leaves_nothing_degraded() {
    let dir = tempfile::tempdir().unwrap();
    let ring = ProcRing::start(&dir.path().join("ring"), 6, "4+2", "1GiB", 600.0);
    ring.wait_ring(LONG).await;
    let (src, data) = write_file(dir.path(), "in", 20 * MIB, 3);
    let h = put(&ring, &src).await;
    // Freeze a peer that is not the one the client talks to.
    ring.signal(3, libc::SIGSTOP);
    let out = dir.path().join("out");
    let got = get(&ring, h, &out).await;
    ring.signal(3, libc::SIGCONT);
    assert!(got.unwrap() == data, "read with a frozen peer differs");
    let st = ring.wait_status(LONG, "every peer scanned with 0 degraded stripes", |st| st.ring_size == 6 && st.health.scanned && st.health.degraded_stripes == 0 && st.health.stripes_total > 0).await;
    assert_eq!(st.health.stripes_at_risk, 0);
}

/// Finds `needle` in a peer's disk image and flips a byte of it in place.
fn flip_in_image(image: &Path, needle: &[u8]) -> bool {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(image).unwrap();
    let len = f.metadata().unwrap().len();
    let chunk = 8 * MIB as u64;
    let mut buf = vec![0u8; chunk as usize + needle.len()];
    let mut off = 0;
    while off < len {
        let n = f.read_at(&mut buf, off).unwrap();
        if let Some(pos) = buf[..n].windows(needle.len()).position(|w| w == needle) {
            let at = off + pos as u64 + 7;
            let mut b = [0u8; 1];
            f.read_exact_at(&mut b, at).unwrap();
            b[0] ^= 0x5a;
            f.write_all_at(&b, at).unwrap();
            f.sync_all().unwrap();
            return true;
        }
        off += chunk;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_bytes_are_never_returned_and_the_shard_is_rewritten() {
    let dir = tempfile::tempdir().unwrap();
    let ring = ProcRing::start(&dir.path().join("ring"), 6, "4+2", "256MiB", 600.0);
    ring.wait_ring(LONG).await;
    let (src, data) = write_file(dir.path(), "in", 8 * MIB, 4);
    let h = put(&ring, &src).await;
    // The first data shard of the first stripe starts with the file's first bytes.
    let needle = &data[..64];
    let victim = (0..6)
        .find(|&i| flip_in_image(&ring.peers[i].as_ref().unwrap().dir.join("image.msd"), needle))
        .expect("some peer holds the file's first bytes");
    let out = dir.path().join("out");
    assert!(get(&ring, h, &out).await.unwrap() == data, "read after a flipped byte differs");
    // The peer found the bad record on that read (or its scrub) and rebuilt it.
    let net = ring.net();
    let addr = ring.addr(victim);
    let deadline = tokio::time::Instant::now() + LONG;
    loop {
        let info = net.peer_info(&addr).await.unwrap();
        let repaired = info.upkeep.map(|u| u.repaired_shards).unwrap_or(0);
        let image = std::fs::read(ring.peers[victim].as_ref().unwrap().dir.join("image.msd")).unwrap();
        let intact = image.windows(needle.len()).any(|w| w == needle);
        if repaired >= 1 && intact {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "peer {victim} did not rewrite its corrupt shard (repaired {repaired}, intact {intact})");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(get(&ring, h, &out).await.unwrap() == data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_peer_is_repaired_after_the_grace_period_then_two_more_losses_are_survived() {
    let dir = tempfile::tempdir().unwrap();
    let mut ring = ProcRing::start(&dir.path().join("ring"), 7, "4+2", "512MiB", 3.0);
    ring.wait_ring(LONG).await;
    let mut files = Vec::new();
    for (i, len) in [12 * MIB, 3 * MIB + 5, 1].into_iter().enumerate() {
        let (src, data) = write_file(dir.path(), &format!("in{i}"), len, 10 + i as u64);
        files.push((put(&ring, &src).await, data));
    }
    ring.wait_clean(LONG).await;
    ring.kill(5);
    ring.wait_status(LONG, "the loss to be seen", |st| st.ring_size == 6 && st.health.degraded_stripes > 0).await;
    let st = ring.wait_status(LONG, "repair to finish", |st| st.ring_size == 6 && st.health.scanned && st.health.degraded_stripes == 0 && st.health.repair_queue == 0).await;
    assert!(st.health.repaired_shards > 0, "repair rebuilt shards");
    ring.kill(1);
    ring.kill(3);
    let out = dir.path().join("out");
    for (h, data) in &files {
        assert!(get(&ring, *h, &out).await.unwrap() == *data, "file {} after three losses", h.to_hex());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_peer_receives_its_share_and_little_else_moves() {
    let dir = tempfile::tempdir().unwrap();
    let mut ring = ProcRing::start(&dir.path().join("ring"), 6, "4+2", "512MiB", 600.0);
    ring.wait_ring(LONG).await;
    let (src, data) = write_file(dir.path(), "in", 40 * MIB, 20);
    let h = put(&ring, &src).await;
    let before = ring.wait_clean(LONG).await;
    let stored: u64 = before.peers.iter().map(|p| p.used_bytes).sum();
    let moved_before = before.health.moved_bytes;
    let newcomer = ring.add_peer();
    let addr = ring.addr(newcomer).to_string();
    // Settled: the newcomer holds data and the moved total has not changed for a while.
    let mut last = (u64::MAX, 0);
    let mut steady = 0;
    ring.wait_status(LONG, "the newcomer in the ring, every peer scanned", |st| st.ring_size == 7 && st.health.scanned).await;
    let deadline = tokio::time::Instant::now() + LONG;
    let final_st = loop {
        let st = ring.status().await.unwrap();
        let got = st.peers.iter().find(|p| p.addr == addr).map(|p| p.used_bytes).unwrap_or(0);
        let now = (st.health.moved_bytes, got);
        steady = if now == last && got > 0 && st.health.degraded_stripes == 0 { steady + 1 } else { 0 };
        last = now;
        if steady >= 10 {
            break st;
        }
        assert!(tokio::time::Instant::now() < deadline, "rebalance did not settle");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let moved = final_st.health.moved_bytes - moved_before;
    let ideal = stored as f64 / 7.0;
    let ratio = moved as f64 / ideal;
    eprintln!("rebalance: moved {moved} bytes, ideal {ideal:.0}, ratio {ratio:.2}");
    assert!(moved > 0, "the newcomer received shards");
    assert!(ratio <= 1.5, "moved {moved} bytes for an ideal of {ideal:.0} (ratio {ratio:.2})");
    assert!(ratio >= 0.5, "the newcomer got well under its share (ratio {ratio:.2})");
    let out = dir.path().join("out");
    assert!(get(&ring, h, &out).await.unwrap() == data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_peer_moves_its_shards_before_it_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let mut ring = ProcRing::start(&dir.path().join("ring"), 7, "4+2", "512MiB", 600.0);
    ring.wait_ring(LONG).await;
    let (src, data) = write_file(dir.path(), "in", 24 * MIB, 30);
    let h = put(&ring, &src).await;
    ring.wait_clean(LONG).await;
    let leaver = ring.addr(4).to_string();
    let (ok, out, err) = cli(&["leave", "--join", &leaver, "--secret-file", ring.secret_file.to_str().unwrap()], LONG).await;
    assert!(ok, "leave failed: {err}");
    assert!(out.contains("moved"), "{out}");
    assert!(ring.wait_exit(4, Duration::from_secs(30)), "the drained peer exits");
    // Grace is 600 s, so nothing here can be the work of repair: the drain moved it all.
    let st = ring.wait_status(LONG, "6 peers scanned", |st| st.ring_size == 6 && st.health.scanned).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let st2 = ring.wait_status(LONG, "a fresh scan", |s| s.ring_size == 6 && s.health.scanned).await;
    for s in [&st, &st2] {
        assert_eq!(s.health.degraded_stripes, 0, "nothing became degraded:\n{}", mutualstore::status::table(s));
    }
    assert_eq!(st2.health.repaired_shards, 0);
    // Every stripe still has all six shards: any two more losses are survivable.
    ring.kill(0);
    ring.kill(6);
    let outp = dir.path().join("out");
    assert!(get(&ring, h, &outp).await.unwrap() == data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_drain_on_exit_moves_shards_before_leaving() {
    let dir = tempfile::tempdir().unwrap();
    let mut ring = ProcRing::start(&dir.path().join("ring"), 6, "4+2", "512MiB", 600.0);
    ring.extra = vec!["--drain-on-exit".into()];
    let i = ring.add_peer();
    ring.wait_ring(LONG).await;
    let (src, data) = write_file(dir.path(), "in", 12 * MIB, 31);
    let h = put(&ring, &src).await;
    ring.wait_clean(LONG).await;
    assert!(ring.peers[i].as_ref().unwrap().dir.join("image.msd").exists());
    ring.signal(i, libc::SIGTERM);
    assert!(ring.wait_exit(i, Duration::from_secs(60)), "the draining peer exits");
    ring.wait_status(LONG, "6 peers", |st| st.ring_size == 6).await;
    // Scans run every second: a few seconds on, every report is from after the leave.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let st = ring.status().await.unwrap();
    assert_eq!(st.health.degraded_stripes, 0, "nothing became degraded:\n{}", mutualstore::status::table(&st));
    assert_eq!(st.health.repaired_shards, 0, "nothing needed repair");
    ring.kill(0);
    ring.kill(3);
    let out = dir.path().join("out");
    assert!(get(&ring, h, &out).await.unwrap() == data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_ring_writes_narrower_stripes_and_a_tiny_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut ring = ProcRing::start(&dir.path().join("ring"), 3, "4+2", "256MiB", 600.0);
    ring.wait_ring(LONG).await;
    let (src, data) = write_file(dir.path(), "in", 3 * MIB, 40);
    // Three peers under 4+2: stripes are written 1+2, so any two may die.
    let c = FileClient::connect_writer(ring.first_alive(), ring.tls.clone()).await.unwrap();
    assert_eq!(c.code().to_string(), "1+2");
    let h = put(&ring, &src).await;
    ring.kill(1);
    ring.kill(2);
    let out = dir.path().join("out");
    assert!(get(&ring, h, &out).await.unwrap() == data, "1+2 stripes with two of three peers dead");
    // One peer cannot hold m+1 = 3 shards on distinct peers: refused, with the reason.
    // Until the survivor notices its neighbours are gone the write fails on them instead;
    // either way it must fail, and once the ring has shrunk it must say why.
    let mut last = String::new();
    for _ in 0..30 {
        let (ok, _, err) = cli(&["put", src.to_str().unwrap(), "--join", &ring.first_alive(), "--secret-file", ring.secret_file.to_str().unwrap()], LONG).await;
        assert!(!ok, "a write to a ring of one peer must fail");
        last = err;
        if last.contains("needs 6 distinct peers") {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    panic!("the refusal never named the reason: {last}");
}

/// Six peers (4+2) up and linked, and a stripe client of the ring's code.
async fn six_peers_and_a_stripe_client(dir: &Path) -> (ProcRing, mutualstore::erasure::client::StripeClient) {
    let ring = ProcRing::start(&dir.join("ring"), 6, "4+2", "1GiB", 600.0);
    ring.wait_ring(LONG).await;
    let net = std::sync::Arc::new(ring.net());
    let (_, code) = net.hello(&ring.addr(0), "").await.unwrap();
    let c = mutualstore::erasure::client::StripeClient::new(net, vec![ring.addr(0)], code);
    (ring, c)
}

/// Stripes written lazily (a mount's chunks) are put on disk by `sync_lazy`: it succeeds
/// with every peer up and with one peer not answering (each stripe still has k durable
/// shards), fails with two peers that took shards gone rather than promise what it cannot,
/// and what was written reads back either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_stripes_are_synced_and_a_sync_missing_two_peers_fails() {
    use mutualstore::erasure::client::StripeError;
    let dir = tempfile::tempdir().unwrap();
    let (mut ring, c) = six_peers_and_a_stripe_client(dir.path()).await;

    let a = bytes(3 * MIB, 1);
    let sa = c.write_stripe_lazy(a.clone()).await.unwrap();
    c.sync_lazy().await.expect("a sync with every peer up");

    // One peer frozen: its Sync times out, the others' suffice.
    let b = bytes(2 * MIB, 2);
    let sb = c.write_stripe_lazy(b.clone()).await.unwrap();
    ring.signal(5, libc::SIGSTOP);
    let r = tokio::time::timeout(Duration::from_secs(30), c.sync_lazy()).await.expect("a sync waits on a frozen peer without bound");
    ring.signal(5, libc::SIGCONT);
    r.expect("a sync with one peer frozen");

    // Two peers that took shards die: no promise.
    let d = bytes(MIB, 3);
    let sd = c.write_stripe_lazy(d.clone()).await.unwrap();
    ring.kill(1);
    ring.kill(2);
    match c.sync_lazy().await {
        Err(StripeError::SyncFailed { failed, .. }) => assert_eq!(failed, 2),
        other => panic!("a sync with two holders dead said {other:?}"),
    }
    for (s, data) in [(sa, a), (sb, b), (sd, d)] {
        assert!(c.read_stripe(s, Some(data.len())).await.unwrap() == data, "stripe {} reads back wrong", s.to_hex());
    }
}

/// A mount's unmount with deletes still queued: the reclaimer deletes them at once, however
/// long their delay, and ends (it used to sleep out each queued delay after the shutdown,
/// then wait forever, and the mount gave up on it after 60 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_deletes_what_is_queued_at_once_and_the_reclaimer_ends() {
    use mutualstore::fs::chunk::Reclaimer;
    let dir = tempfile::tempdir().unwrap();
    let (_ring, c) = six_peers_and_a_stripe_client(dir.path()).await;
    let a = c.write_stripe(bytes(MIB, 7)).await.unwrap();
    let b = c.write_stripe(bytes(MIB, 8)).await.unwrap();
    let (tx, rx) = tokio::sync::watch::channel(false);
    let (reclaimer, task) = Reclaimer::start(c.clone(), Duration::from_secs(3600), rx);
    reclaimer.reclaim(vec![a]);
    reclaimer.reclaim(vec![b]);
    tokio::time::sleep(Duration::from_millis(200)).await;
    tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(30), task).await.expect("the reclaimer ends soon after the shutdown").unwrap();
    assert_eq!(reclaimer.pending.load(std::sync::atomic::Ordering::Relaxed), 0, "every queued stripe was deleted");
    for s in [a, b] {
        assert!(c.read_stripe(s, Some(MIB)).await.is_err(), "stripe {} still readable", s.to_hex());
    }
}
