//! Helpers for tests that run real gRPC peers on 127.0.0.1 inside the test process.
#![allow(dead_code)]

use mutualstore::erasure::upkeep::UpkeepConfig;
use mutualstore::erasure::Code;
use mutualstore::peer::{self, PeerConfig, RunningPeer};
use mutualstore::ring::{Id, Node};
use mutualstore::rpc::NetAddr;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use mutualstore::crypto::secret::RingSecret;
use mutualstore::crypto::tls::RingTls;

pub const GIB: u64 = 1 << 30;

/// The ring secret of this test process's in-process rings (every test ring has one:
/// the product is tested as it runs, with TLS between members).
pub fn test_secret() -> RingSecret {
    static S: OnceLock<RingSecret> = OnceLock::new();
    S.get_or_init(RingSecret::generate).clone()
}

/// A raw gRPC client to a member of a test ring (TLS with the test ring's credentials),
/// for tests that send hand-made messages.
pub async fn raw_client(addr: &str) -> mutualstore::rpc::pb::peer_client::PeerClient<tonic::transport::Channel> {
    let ep = tonic::transport::Endpoint::from_shared(format!("https://{addr}")).unwrap().tls_config(test_tls().unwrap().client_config()).unwrap();
    mutualstore::rpc::pb::peer_client::PeerClient::new(ep.connect().await.unwrap())
}

/// Member credentials for clients of those rings.
pub fn test_tls() -> Option<Arc<RingTls>> {
    static T: OnceLock<Arc<RingTls>> = OnceLock::new();
    Some(T.get_or_init(|| Arc::new(RingTls::new(&test_secret()).unwrap())).clone())
}

pub fn peer_config(dir: &Path, capacity: u64, join: Option<&NetAddr>) -> PeerConfig {
    PeerConfig {
        listen: "127.0.0.1:0".into(),
        advertise: "127.0.0.1:0".into(),
        data_dir: dir.to_path_buf(),
        capacity_bytes: capacity,
        join: join.map(|j| j.to_string()),
        maintenance_interval: Duration::from_millis(100),
        fingers_per_round: 8,
        // Three peers are enough for 2+1; tests of repair start their own peers.
        code: Some(Code::new(2, 1).unwrap()),
        upkeep: UpkeepConfig { interval: Duration::from_secs(1), grace: Duration::from_secs(600), ..UpkeepConfig::default() },
        secret: Some(test_secret()),
        fault: None,
    }
}

pub async fn start_ring(root: &Path, n: usize, capacity: u64) -> Vec<RunningPeer> {
    let mut peers: Vec<RunningPeer> = Vec::new();
    for i in 0..n {
        let join = peers.first().map(|p| p.addr.clone());
        let p = peer::start(peer_config(&root.join(format!("p{i}")), capacity, join.as_ref()))
            .await
            .unwrap_or_else(|e| panic!("peer {i} failed to start: {e}"));
        peers.push(p);
    }
    peers
}

/// The true owner of every key: sorted (vnode id -> peer addr) over the given peers.
pub fn oracle(peers: &[&RunningPeer]) -> BTreeMap<Id, NetAddr> {
    let mut m = BTreeMap::new();
    for p in peers {
        for v in p.state.node.lock().vnode_ids() {
            m.insert(v, p.addr.clone());
        }
    }
    m
}

pub fn successor_of(o: &BTreeMap<Id, NetAddr>, key: Id) -> Id {
    *o.range(key..).next().or_else(|| o.iter().next()).expect("non-empty ring").0
}

/// Counts wrong pointers: first successors, predecessors, and fingers for every
/// exponent at or above the vnode's finger floor.
pub fn wrong_pointers(peers: &[&RunningPeer]) -> (usize, usize) {
    let (s, f, _) = wrong_pointers_described(peers);
    (s, f)
}

/// As `wrong_pointers`, with one line per wrong successor/predecessor for failure messages.
pub fn wrong_pointers_described(peers: &[&RunningPeer]) -> (usize, usize, String) {
    let mut why = String::new();
    let o = oracle(peers);
    let ids: Vec<Id> = o.keys().cloned().collect();
    let (mut wrong_succ, mut wrong_fingers) = (0, 0);
    for p in peers {
        let node: Node<NetAddr> = p.state.node.lock().clone();
        for v in &node.vnodes {
            let idx = ids.binary_search(&v.id).expect("own vnode is in the oracle");
            let want_succ = ids[(idx + 1) % ids.len()];
            let want_pred = ids[(idx + ids.len() - 1) % ids.len()];
            if ids.len() > 1 && (v.succ.first().map(|c| c.id) != Some(want_succ) || v.pred.as_ref().map(|c| c.id) != Some(want_pred)) {
                wrong_succ += 1;
                why.push_str(&format!(
                    "{} vnode {}: succ {:?} (want {} at {}), pred {:?} (want {} at {})\n",
                    p.addr,
                    v.id,
                    v.succ.first().map(|c| (c.id.to_string(), c.addr.to_string())),
                    want_succ,
                    o[&want_succ],
                    v.pred.as_ref().map(|c| (c.id.to_string(), c.addr.to_string())),
                    want_pred,
                    o[&want_pred],
                ));
            }
            for e in v.finger_floor() + 1..160 {
                let want = successor_of(&o, v.id.wrapping_add(Id::pow2(e)));
                if want == v.id {
                    continue;
                }
                let got = v.finger_for(e).map(|c| c.id).or_else(|| v.succ.iter().find(|s| v.id.distance_to(s.id) >= Id::pow2(e)).map(|c| c.id));
                if got != Some(want) {
                    wrong_fingers += 1;
                }
            }
        }
    }
    (wrong_succ, wrong_fingers, why)
}

/// Polls until the ring's pointers are all correct (bounded), returns what is left wrong.
pub async fn wait_converged(peers: &[&RunningPeer], max: Duration) -> (usize, usize) {
    let deadline = tokio::time::Instant::now() + max;
    loop {
        let w = wrong_pointers(peers);
        if w == (0, 0) || tokio::time::Instant::now() > deadline {
            return w;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
pub mod procs;
pub mod mount;

/// A raw direct-lane connection (`rpc::lane`) to a member of a test ring: TLS with the
/// test ring's credentials, the lane's magic already sent.
pub async fn raw_lane(addr: &str) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    try_raw_lane(addr).await.unwrap()
}

/// `raw_lane`, or why not (the peer's gate refuses an address opening connections
/// faster than 64/s after a burst of 256, so long fuzz runs must wait their turn).
pub async fn try_raw_lane(addr: &str) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    use tokio::io::AsyncWriteExt;
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from(mutualstore::crypto::tls::SERVER_NAME).unwrap();
    let mut s = tokio_rustls::TlsConnector::from(test_tls().unwrap().lane_client_config()).connect(name, tcp).await?;
    s.write_all(&mutualstore::rpc::lane::MAGIC).await?;
    Ok(s)
}

/// A direct-lane put request: op 1, flags, lengths, header, data.
pub fn lane_put(meta: &[u8], data: &[u8], lazy: bool) -> Vec<u8> {
    let mut v = vec![1u8, lazy as u8];
    v.extend_from_slice(&(meta.len() as u16).to_le_bytes());
    v.extend_from_slice(&(data.len() as u32).to_le_bytes());
    v.extend_from_slice(meta);
    v.extend_from_slice(data);
    v
}

/// A lane request with no head and this body (every operation but a shard write).
pub fn lane_request(op: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![op, 0, 0, 0];
    v.extend_from_slice(&(body.len() as u32).to_le_bytes());
    v.extend_from_slice(body);
    v
}

/// The next answer on a lane connection: Some((status code, message)), None at EOF.
pub async fn lane_answer<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Option<(u8, String)> {
    use tokio::io::AsyncReadExt;
    let mut h = [0u8; 5];
    s.read_exact(&mut h).await.ok()?;
    let mut msg = vec![0u8; u32::from_le_bytes([h[1], h[2], h[3], h[4]]) as usize];
    s.read_exact(&mut msg).await.ok()?;
    Some((h[0], String::from_utf8_lossy(&msg).into_owned()))
}
