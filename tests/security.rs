//! Trust no peer, on real peer processes and a real mount on 127.0.0.1: only holders of
//! the ring secret join or talk to peers; what a mount writes reaches disks and the wire
//! only as ciphertext; a peer that forges or flips shards cannot make a read wrong, and
//! its shards are rewritten.

mod common;

use common::mount::Mount;
use common::procs::*;
use common::{peer_config, test_tls, GIB};
use mutualstore::crypto::secret::RingSecret;
use mutualstore::crypto::tls::RingTls;
use mutualstore::erasure::stripe::{make_stripe, ShardMeta};
use mutualstore::erasure::Code;
use mutualstore::crypto::seal::{FileKey, HEADER};
use mutualstore::files::FileClient;
use mutualstore::fs::chunk::{ChunkCache, ChunkRef};
use mutualstore::rpc::client::GrpcNet;
use mutualstore::rpc::fault::Fault;
use mutualstore::rpc::NetAddr;
use parking_lot::Mutex;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const LONG: Duration = Duration::from_secs(120);

/// Runs `mutualstore-fs peer` joining `join` and waits (bounded) for it to give up.
fn intruder(dir: &Path, join: &str, extra: &[&str]) -> (bool, String) {
    let mut cmd = std::process::Command::new(BIN);
    cmd.args(["peer", "--listen", "127.0.0.1:0", "--capacity", "256MiB", "--join", join, "--data"]).arg(dir).args(extra);
    cmd.env_remove("MUTUALSTORE_SECRET").stdin(std::process::Stdio::null());
    let mut child = cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            return (st.success(), err);
        }
        if start.elapsed() > Duration::from_secs(40) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("a peer without the ring's secret neither joined nor gave up in 40 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_holders_of_the_secret_join_or_reach_blocks() {
    let tmp = tempfile::tempdir().unwrap();
    let ring = ProcRing::start(&tmp.path().join("ring"), 3, "2+1", "512MiB", 600.0);
    ring.wait_ring(LONG).await;
    let entry = ring.addr(0);

    // No secret, then another ring's secret: the joiner is refused and says why.
    let (ok, err) = tokio::task::block_in_place(|| intruder(&tmp.path().join("x1"), &entry, &[]));
    assert!(!ok, "a peer without a secret joined");
    assert!(err.contains("cannot join") && err.contains("secret"), "the refusal does not say why: {err}");
    let other = tmp.path().join("other.secret");
    RingSecret::generate().save(&other).unwrap();
    let (ok, err) = tokio::task::block_in_place(|| intruder(&tmp.path().join("x2"), &entry, &["--secret-file", other.to_str().unwrap()]));
    assert!(!ok, "a peer with another ring's secret joined");
    assert!(err.contains("does not accept our ring secret"), "the refusal does not say why: {err}");
    // A member claiming an absurd capacity is refused before it touches the ring.
    let (ok, err) = tokio::task::block_in_place(|| {
        let mut cmd = std::process::Command::new(BIN);
        cmd.args(["peer", "--listen", "127.0.0.1:0", "--capacity", "4000TiB", "--join", &entry, "--secret-file", ring.secret_file.to_str().unwrap(), "--data"]);
        let out = cmd.arg(tmp.path().join("x3")).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    });
    assert!(!ok && err.contains("over the limit"), "a 4000 TiB peer: ok={ok} {err}");
    let st = ring.status().await.unwrap();
    assert_eq!(st.ring_size, 3, "the ring grew: {:?}", st.peers.iter().map(|p| &p.addr).collect::<Vec<_>>());
    let log = std::fs::read_to_string(ring.peers[0].as_ref().unwrap().dir.join("peer.log")).unwrap();
    assert!(log.contains("refused a connection from 127.0.0.1"), "the peer's log has no entry for the refusals");

    // A storm of connections from one address is cut off at the door, logged, and the
    // ring goes on (members hold their connections; new ones pass once it is over).
    let storm: Vec<_> = (0..600).map(|_| tokio::net::TcpStream::connect(entry.to_string())).collect();
    let opened = futures_util::future::join_all(storm).await.into_iter().filter(|r| r.is_ok()).count();
    assert!(opened > 0);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let log = std::fs::read_to_string(ring.peers[0].as_ref().unwrap().dir.join("peer.log")).unwrap();
    assert!(log.contains("refused a connection from 127.0.0.1: too many"), "the storm was not refused at the door");
    assert_eq!(ring.status().await.unwrap().ring_size, 3, "the ring after a connection storm");

    // Nor can anyone without it read status or blocks, by CLI or by direct calls.
    let src = tmp.path().join("in");
    std::fs::write(&src, bytes(300_000, 1)).unwrap();
    for args in [vec!["status", "--join", &entry], vec!["put", src.to_str().unwrap(), "--join", &entry]] {
        let (ok, _, err) = cli(&args, LONG).await;
        assert!(!ok && err.contains("secret"), "{args:?} without the secret: ok={ok} {err}");
        let mut with_other = args.clone();
        with_other.extend(["--secret-file", other.to_str().unwrap()]);
        let (ok, _, err) = cli(&with_other, LONG).await;
        assert!(!ok && err.contains("ring secret"), "{with_other:?}: ok={ok} {err}");
    }
    let stranger_tls = Some(Arc::new(RingTls::new(&RingSecret::generate()).unwrap()));
    let stripe = mutualstore::ring::Id::sha1(b"any stripe");
    for net in [GrpcNet::new(), GrpcNet::new().with_tls(stranger_tls)] {
        assert!(net.peer_info(&entry).await.is_err(), "status answered a stranger");
        assert!(net.get_shard(&entry, stripe, 0).await.is_err(), "a shard read answered a stranger");
        let (_, shards) = make_stripe(Code::new(2, 1).unwrap(), b"intruder bytes").unwrap();
        assert!(net.put_shard(&entry, &shards[0]).await.is_err(), "a stranger stored a shard");
    }

    // The right secret works, end to end.
    let (ok, out, err) = cli(&["put", src.to_str().unwrap(), "--join", &entry, "--secret-file", ring.secret_file.to_str().unwrap()], LONG).await;
    assert!(ok, "put with the secret: {err}");
    let back = tmp.path().join("back");
    let (ok, _, err) = cli(&["get", out.trim(), "-o", back.to_str().unwrap(), "--join", &ring.addr(2), "--secret-file", ring.secret_file.to_str().unwrap()], LONG).await;
    assert!(ok, "get with the secret: {err}");
    assert_eq!(std::fs::read(&back).unwrap(), std::fs::read(&src).unwrap());

    // No log holds the secret.
    let secret = std::fs::read_to_string(&ring.secret_file).unwrap();
    let hex = secret.trim().trim_start_matches("mss1-");
    for p in ring.peers.iter().flatten() {
        let log = std::fs::read_to_string(p.dir.join("peer.log")).unwrap();
        assert!(!log.contains(hex), "{} logs the ring secret", p.dir.display());
    }
}

/// A TCP relay that keeps a copy of every byte in both directions.
async fn recording_proxy(to: String) -> (String, Arc<Mutex<Vec<u8>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let seen: Arc<Mutex<Vec<u8>>> = Arc::default();
    let s2 = seen.clone();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let Ok(outbound) = tokio::net::TcpStream::connect(&to).await else { continue };
            let (ri, wi) = inbound.into_split();
            let (ro, wo) = outbound.into_split();
            tokio::spawn(pump(ri, wo, s2.clone()));
            tokio::spawn(pump(ro, wi, s2.clone()));
        }
    });
    (addr, seen)
}

async fn pump(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf, seen: Arc<Mutex<Vec<u8>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        {
            let mut s = seen.lock();
            if s.len() < (512 << 20) {
                s.extend_from_slice(&buf[..n]);
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Files under `root` (recursively) whose bytes contain `needle`.
fn files_containing(root: &Path, needle: &[u8]) -> Vec<String> {
    let mut hits = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(b) = std::fs::read(&p) {
                if contains(&b, needle) {
                    hits.push(p.display().to_string());
                }
            }
        }
    }
    hits
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_and_the_wire_see_only_ciphertext() {
    let tmp = tempfile::tempdir().unwrap();
    let mut ring = ProcRing::start(&tmp.path().join("ring"), 3, "2+1", "512MiB", 600.0);
    // A fourth peer that everyone reaches through a relay recording the traffic.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (relay, seen) = recording_proxy(format!("127.0.0.1:{port}")).await;
    ring.extra = vec!["--advertise".into(), relay.clone()];
    let spy = ring.add_peer_at(&format!("127.0.0.1:{port}"));
    ring.extra.clear();
    assert_eq!(ring.addr(spy).to_string(), relay);
    ring.wait_ring(LONG).await;

    let m = Mount::start(&tmp.path().join("mnt"), &ring.addr(0), &ring.member_args());
    let marker = format!("PLAINTEXT-MARKER-{}", std::process::id());
    let name = format!("secret-name-{}", std::process::id());
    let dir = m.path(&format!("{name}-dir"));
    std::fs::create_dir(&dir).unwrap();
    let line = format!("{marker} line\n");
    let big: String = line.repeat((6 << 20) / line.len());
    for i in 0..8 {
        std::fs::write(dir.join(format!("{name}-{i}.txt")), &big).unwrap();
        std::fs::write(dir.join(format!("small-{i}")), format!("{marker} small {i}")).unwrap();
    }
    std::os::unix::fs::symlink(format!("{marker}-target"), dir.join("link")).unwrap();
    let f = std::fs::File::open(dir.join("small-0")).unwrap();
    f.sync_all().unwrap();
    drop(f);
    assert_eq!(std::fs::read_to_string(dir.join(format!("{name}-3.txt"))).unwrap(), big);

    let peers_root = ring.root.clone();
    for needle in [marker.as_bytes(), name.as_bytes()] {
        let hits = files_containing(&peers_root, needle);
        assert!(hits.is_empty(), "{:?} found in peer files {hits:?}", String::from_utf8_lossy(needle));
    }
    // The search reads what peers store: sealed chunks and records are there.
    assert!(!files_containing(&peers_root, b"MSC2").is_empty(), "no sealed chunk found in any disk image");
    assert!(!files_containing(&peers_root, b"MSR2").is_empty(), "no sealed record found in any disk image");

    let wire = seen.lock().clone();
    assert!(wire.len() > (4 << 20), "only {} bytes passed the relay: the test saw no real traffic", wire.len());
    assert!(!contains(&wire, marker.as_bytes()) && !contains(&wire, name.as_bytes()), "plaintext on the wire");
    // Not even the sealed objects' headers: the connection itself is encrypted.
    assert!(!contains(&wire, b"MSC2"), "sealed chunks travel in the clear: no TLS between members");
    drop(m);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_peer_cannot_make_a_read_wrong_and_its_shards_are_rewritten() {
    let tmp = tempfile::tempdir().unwrap();
    let fault = Arc::new(Fault::default());
    let mut peers = Vec::new();
    for i in 0..3 {
        let join: Option<NetAddr> = peers.first().map(|p: &mutualstore::peer::RunningPeer| p.addr.clone());
        let mut cfg = peer_config(&tmp.path().join(format!("p{i}")), GIB, join.as_ref());
        cfg.upkeep.audit_bytes_per_sec = 64 << 20;
        // Audit passes back to back, as before passes were spaced a day apart: the
        // forgeries are planted after the peers' first, empty, passes, and the audit
        // should stay free to find them alongside the reads.
        cfg.upkeep.audit_every = Duration::ZERO;
        if i == 1 {
            cfg.fault = Some(fault.clone());
        }
        peers.push(mutualstore::peer::start(cfg).await.unwrap());
    }
    common::wait_converged(&peers.iter().collect::<Vec<_>>(), Duration::from_secs(30)).await;
    let liar = &peers[1];
    let client = FileClient::connect_writer(peers[0].addr.clone(), test_tls()).await.unwrap();

    // It stores forgeries (its own checks cannot tell) while the files are written.
    Fault::set(&fault.forge_stored, true);
    let mut files = Vec::new();
    for i in 0..6u64 {
        let p = tmp.path().join(format!("f{i}"));
        std::fs::write(&p, bytes(3 << 20, i)).unwrap();
        files.push((client.put_file(&p, None).await.unwrap(), std::fs::read(&p).unwrap()));
    }
    // And sealed chunks, as a mount writes them: read back below without the stripe-key
    // hash (the seal header and GCM tag are the check), so forgeries must still not pass.
    let file_key = Arc::new(FileKey::generate().1);
    let mut chunks = Vec::new();
    for i in 0..6u64 {
        let plain = bytes((3 << 20) + 1000 * i as usize, 100 + i);
        let sealed = ChunkCache::new(1, file_key.clone()).seal(&plain);
        let seal: [u8; HEADER] = sealed[..HEADER].try_into().unwrap();
        let key = client.stripes.write_stripe(sealed).await.unwrap();
        chunks.push((ChunkRef { key, len: plain.len(), seal: Some(seal) }, plain));
    }
    Fault::set(&fault.forge_stored, false);
    let store = liar.state.store.clone();
    let forged_now = || async {
        let mut bad = 0;
        for key in store.keys() {
            let Ok(Some(b)) = store.get(&key) else { continue };
            let Ok(meta) = ShardMeta::decode(&b.meta) else { continue };
            let data = client.stripes.read_stripe(meta.stripe, Some(meta.stripe_len as usize)).await.unwrap();
            let (_, right) = make_stripe(meta.code, &data).unwrap();
            if right[meta.index as usize].data != b.data {
                bad += 1;
            }
        }
        bad
    };
    let forged = forged_now().await;
    assert!(forged > 0, "the liar holds no forged shards: the test tests nothing");

    let read_all = |what: &'static str| {
        let files = files.clone();
        let addr = peers[2].addr.clone();
        async move {
            let c = FileClient::connect(addr, test_tls()).await.unwrap();
            for (i, (h, want)) in files.iter().enumerate() {
                let out = tempfile::NamedTempFile::new().unwrap();
                c.get_file(*h, out.path(), None).await.unwrap_or_else(|e| panic!("{what}: file {i}: {e}"));
                assert!(std::fs::read(out.path()).unwrap() == *want, "{what}: file {i} read back wrong");
            }
        }
    };
    let read_chunks = |what: &'static str| {
        let (chunks, stripes, file_key) = (chunks.clone(), client.stripes.clone(), file_key.clone());
        async move {
            let cache = ChunkCache::new(1, file_key.clone());
            for (i, (r, want)) in chunks.iter().enumerate() {
                let got = cache.get(&stripes, *r).await.unwrap_or_else(|e| panic!("{what}: chunk {i}: {e}"));
                assert!(*got == *want, "{what}: chunk {i} read back wrong");
            }
            // A chunk of a file written before inodes named seal headers: the checked read.
            let legacy = ChunkRef { seal: None, ..chunks[2].0 };
            let got = ChunkCache::new(1, file_key.clone()).get(&stripes, legacy).await.unwrap_or_else(|e| panic!("{what}: chunk without its seal header: {e}"));
            assert!(*got == chunks[2].1, "{what}: chunk without its seal header read back wrong");
            // A chunk read under another chunk's seal header is refused, never served.
            let (a, b) = (chunks[0].0, chunks[1].0);
            let mixed = ChunkRef { seal: b.seal, ..a };
            assert!(ChunkCache::new(1, file_key).get(&stripes, mixed).await.is_err(), "{what}: a chunk opened under another's seal header");
        }
    };
    // It also flips bytes in everything it serves.
    Fault::set(&fault.flip_served, true);
    read_all("while the liar flips what it serves").await;
    read_chunks("sealed chunks while the liar flips what it serves").await;
    Fault::set(&fault.flip_served, false);
    read_all("with the liar's forged shards on disk").await;
    read_chunks("sealed chunks with the liar's forged shards on disk").await;

    // Reads and the coordinators' audits rewrite every forged shard it holds.
    let start = Instant::now();
    loop {
        let bad = forged_now().await;
        if bad == 0 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(90), "{bad} of the liar's {forged} shards are still forged after 90 s");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
