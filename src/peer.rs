//! A running storage peer: identity, disk image, gRPC server, join, and the periodic
//! Chord maintenance, wired together on a tokio runtime.
//!
//! Owns: process lifecycle (start, join with bounded retries, maintenance timer, clean
//! leave on SIGTERM/SIGINT). The ring logic lives in `ring`, the wire in `rpc`.

use crate::blockstore::DiskImage;
use crate::erasure::upkeep::{DrainReport, Upkeep, UpkeepConfig};
use crate::erasure::Code;
use crate::identity::Identity;
use crate::ring::driver::{self, Transport};
use crate::ring::vnode_position::{choose_positions, first_peer_positions, vnode_count};
use crate::ring::{Id, Node, RingConfig};
use crate::crypto::secret::RingSecret;
use crate::crypto::tls::RingTls;
use crate::rpc::client::GrpcNet;
use crate::rpc::listen;
use crate::rpc::server::{PeerService, PeerState};
use crate::rpc::{NetAddr, RING_CALL_TIMEOUT};
use parking_lot::Mutex;
use rand::Rng;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Lazy writes (records, shards) reach the disk at most this long after they were taken.
const GROUP_COMMIT_EVERY: Duration = Duration::from_secs(1);
/// Time between maintenance rounds while the last one changed this peer's links.
const SETTLING_INTERVAL: Duration = Duration::from_millis(150);

#[derive(Clone, Debug)]
pub struct PeerConfig {
    pub listen: String,
    /// Address other peers use to reach us (defaults to `listen`).
    pub advertise: String,
    pub data_dir: PathBuf,
    pub capacity_bytes: u64,
    pub join: Option<String>,
    pub maintenance_interval: Duration,
    pub fingers_per_round: usize,
    /// The erasure code for a new ring; when joining, it must match the ring's if given.
    pub code: Option<Code>,
    pub upkeep: UpkeepConfig,
    /// The ring secret (None: a ring without one, whose connections are not encrypted).
    pub secret: Option<RingSecret>,
    /// Misbehaviour for tests (None for every real peer).
    pub fault: Option<Arc<crate::rpc::fault::Fault>>,
}

impl PeerConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.capacity_bytes < (64 << 20) {
            return Err(format!("capacity {} bytes is too small (at least 64 MiB)", self.capacity_bytes));
        }
        if self.capacity_bytes > crate::rpc::MAX_PEER_CAPACITY {
            return Err(format!("capacity {} bytes is over the limit of 1 PiB per peer", self.capacity_bytes));
        }
        self.listen.parse::<std::net::SocketAddr>().map_err(|e| format!("--listen {:?}: {e}", self.listen))?;
        crate::rpc::convert::addr_from(&self.advertise).map_err(|s| format!("advertised address: {}", s.message()))?;
        if let Some(j) = &self.join {
            crate::rpc::convert::addr_from(j).map_err(|s| format!("--join {j:?}: {}", s.message()))?;
        }
        Ok(())
    }
}

pub struct RunningPeer {
    pub state: Arc<PeerState>,
    pub net: Arc<GrpcNet>,
    pub addr: NetAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<()>,
    maintenance: tokio::task::JoinHandle<()>,
    upkeep: tokio::task::JoinHandle<()>,
    drained: Arc<tokio::sync::Notify>,
}

impl RunningPeer {
    /// Leaves the ring cleanly (neighbours splice us out) and stops serving.
    pub async fn leave_and_stop(mut self) {
        self.maintenance.abort();
        self.upkeep.abort();
        driver::leave(&self.state.node, &*self.net).await;
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
        // Graceful shutdown waits for open connections; other peers keep theirs open.
        if tokio::time::timeout(Duration::from_secs(2), &mut self.server).await.is_err() {
            self.server.abort();
        }
        if let Err(e) = self.state.records.sync().await {
            log::error!("syncing the disk image at exit: {e}");
        }
    }

    /// Moves every shard to the peers that hold them once we are gone, leaves the ring,
    /// and stops serving.
    pub async fn drain_and_stop(mut self) -> DrainReport {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let report = match self.state.drain_requests.send(tx).await {
            Ok(()) => rx.await.unwrap_or_default(),
            Err(_) => DrainReport::default(),
        };
        self.maintenance.abort();
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
        if tokio::time::timeout(Duration::from_secs(2), &mut self.server).await.is_err() {
            self.server.abort();
        }
        report
    }

    /// Resolves once a Drain request (from `mutualstore-fs leave`) has completed and the
    /// peer has left the ring.
    pub async fn drained(&self) {
        self.drained.notified().await
    }

    /// Stops without telling anyone (like a crash, but the process lives on: for tests).
    pub async fn stop_abruptly(mut self) {
        self.maintenance.abort();
        self.upkeep.abort();
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
        self.server.abort();
        let _ = (&mut self.server).await;
    }
}

/// The runtime of a storage peer, and of a mount (which may run one): half the cores
/// for async work. The heavy work (sealing, coding, hashing and writing shards, fsync)
/// runs on the blocking pool; what is left — TLS, HTTP/2, routing, record calls, FUSE
/// calls waiting on them — is many small tasks, and on a small machine waking a second
/// worker for each of them cost more than it gained. Six peers and a mount on 2 cores:
/// small-file creates 380-410/s with two workers per peer, 476-525/s with one; cold
/// small-file reads with one worker in the mount instead of two, 330-365 µs of mount
/// CPU per file instead of 455-500, and 1,470-1,710 files/s instead of 1,260-1,550, with
/// 1 GiB sequential writes and reads no slower.
pub fn runtime() -> Result<tokio::runtime::Runtime, String> {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads((cores / 2).max(1))
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start runtime: {e}"))
}

/// Starts a peer: binds the listener first (so a busy port fails at once), then joins.
pub async fn start(cfg: PeerConfig) -> Result<RunningPeer, String> {
    cfg.validate()?;
    std::fs::create_dir_all(&cfg.data_dir).map_err(|e| format!("cannot create {}: {e}", cfg.data_dir.display()))?;
    let listener = tokio::net::TcpListener::bind(&cfg.listen).await.map_err(|e| format!("cannot listen on {}: {e}", cfg.listen))?;
    // Port 0 (tests) means "any free port": advertise the one the kernel chose.
    let advertise = match listener.local_addr() {
        Ok(local) if cfg.advertise.ends_with(":0") => local.to_string(),
        _ => cfg.advertise.clone(),
    };
    let addr: NetAddr = NetAddr::from(advertise.as_str());
    let secret = crate::crypto::secret::settle(cfg.secret.clone(), &cfg.data_dir)?;
    let tls = match &secret {
        Some(s) => Some(Arc::new(RingTls::new(s)?)),
        None => {
            log::warn!("this ring has no secret: anyone who can reach {addr} can join it and read its blocks (create rings with `mutualstore-fs init`)");
            None
        }
    };
    let net = Arc::new(GrpcNet::new().with_tls(tls.clone()));
    let bootstrap: Option<NetAddr> = cfg.join.as_deref().map(NetAddr::from);
    let ring_code = match &bootstrap {
        Some(b) => Some(first_contact(&net, b, &addr).await?),
        None => None,
    };

    let identity = match Identity::load(&cfg.data_dir)? {
        Some(id) => {
            if id.capacity_bytes != cfg.capacity_bytes {
                return Err(format!(
                    "{} was created with capacity {} bytes, not {}: capacity cannot change in place",
                    cfg.data_dir.display(),
                    id.capacity_bytes,
                    cfg.capacity_bytes
                ));
            }
            id
        }
        None => {
            let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::from_entropy();
            let peer_id = Id::sha1(&rng.gen::<[u8; 32]>());
            let n = vnode_count(cfg.capacity_bytes);
            let vnodes = match &bootstrap {
                None => first_peer_positions(n, &mut rng),
                Some(b) => {
                    let samples = driver::sample_ring(&*net, b, &mut rng).await.map_err(|e| format!("cannot sample the ring via {b}: {e}"))?;
                    choose_positions(&samples, cfg.capacity_bytes, n, &mut rng)
                }
            };
            let id = Identity::new(peer_id, &vnodes, cfg.capacity_bytes);
            id.save(&cfg.data_dir)?;
            id
        }
    };

    let code = settle_code(&cfg, identity.ring_code.as_deref(), ring_code)?;
    if identity.ring_code.as_deref() != Some(code.to_string().as_str()) {
        let mut id = identity.clone();
        id.ring_code = Some(code.to_string());
        id.save(&cfg.data_dir)?;
    }

    let data_dir = cfg.data_dir.clone();
    let capacity = cfg.capacity_bytes;
    let store = tokio::task::spawn_blocking(move || DiskImage::open(&data_dir, capacity))
        .await
        .map_err(|e| format!("disk image task failed: {e}"))?
        .map_err(|e| e.to_string())?;
    let mut node = Node::new(addr.clone(), identity.peer_id()?, cfg.capacity_bytes, &identity.vnodes()?, RingConfig::default());
    if bootstrap.is_none() {
        node.create_ring();
    }
    let (drain_tx, drain_rx) = tokio::sync::mpsc::channel(1);
    let store = Arc::new(store);
    let node = Arc::new(Mutex::new(node));
    let started = Instant::now();
    let state = Arc::new(PeerState {
        records: crate::meta::store::RecordStore::new(node.clone(), store.clone(), net.clone(), addr.clone(), started),
        node,
        store,
        started,
        code,
        upkeep: Mutex::new(Default::default()),
        draining: std::sync::atomic::AtomicBool::new(false),
        drain_requests: drain_tx,
        fault: cfg.fault.clone(),
    });

    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let svc = PeerService { state: state.clone() }.into_server();
    // The direct lane serves while the server task runs: the sender lives in that task.
    let (alive_tx, alive_rx) = tokio::sync::watch::channel(());
    let lane = crate::rpc::lane::LaneServer::new(PeerService { state: state.clone() }, alive_rx);
    let shutdown = async {
        let _ = rx.await;
    };
    let builder = || tonic::transport::Server::builder()
            .timeout(Duration::from_secs(60))
            .initial_stream_window_size(crate::rpc::H2_STREAM_WINDOW)
            .initial_connection_window_size(crate::rpc::H2_CONNECTION_WINDOW)
            .max_frame_size(crate::rpc::H2_MAX_FRAME).add_service(svc.clone());
    let server = match &tls {
        Some(t) => {
            let serving = builder().serve_with_incoming_shutdown(listen::tls(listener, t.clone(), lane), shutdown);
            tokio::spawn(async move {
                let _alive = alive_tx;
                log_server_end(serving.await)
            })
        }
        None => {
            let serving = builder().serve_with_incoming_shutdown(listen::plain(listener, lane), shutdown);
            tokio::spawn(async move {
                let _alive = alive_tx;
                log_server_end(serving.await)
            })
        }
    };

    if let Some(b) = &bootstrap {
        let mut last = String::new();
        let mut joined = false;
        for attempt in 0..5 {
            match driver::join(&state.node, &*net, b, state.now_ms()).await {
                Ok(()) => {
                    joined = true;
                    break;
                }
                Err(e) => {
                    last = e.to_string();
                    log::warn!("join attempt {} via {b} failed: {last}", attempt + 1);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        if !joined {
            server.abort();
            return Err(format!("cannot join the ring via {b}: {last}"));
        }
        log::info!("joined the ring via {b} as {addr} with {} vnodes", state.node.lock().vnodes.len());
    } else {
        log::info!("started a new ring at {addr} with {} vnodes", state.node.lock().vnodes.len());
    }

    let maintenance = {
        let state = state.clone();
        let net = net.clone();
        let every = cfg.maintenance_interval;
        let fingers = cfg.fingers_per_round;
        let commit_state = state.clone();
        tokio::spawn(async move {
            let ring = async {
                let mut wait = Duration::ZERO;
                loop {
                    tokio::time::sleep(wait).await;
                    let before = state.node.lock().links_digest();
                    driver::maintain(&state.node, &*net, fingers, state.now_ms()).await;
                    // While the ring around us is still changing (peers just joined or
                    // left), go round again soon: a fresh ring otherwise takes several
                    // seconds of rounds to link every joiner's vnodes in, and until then
                    // placement sees fewer peers than a stripe needs and waits.
                    let settling = state.node.lock().links_digest() != before;
                    wait = if settling { every.min(SETTLING_INTERVAL) } else { every };
                }
            };
            // Group commit of lazy writes (records, and shards of files not yet
            // fsynced): on its own clock, so a slow ring round never delays it.
            let commit = async {
                loop {
                    tokio::time::sleep(GROUP_COMMIT_EVERY).await;
                    if let Err(e) = commit_state.records.sync().await {
                        log::error!("syncing the disk image: {e}");
                    }
                }
            };
            tokio::join!(ring, commit);
        })
    };

    let drained = Arc::new(tokio::sync::Notify::new());
    let upkeep = tokio::spawn(run_upkeep(Upkeep::new(state.clone(), net.clone(), addr.clone(), cfg.upkeep.clone()), cfg.upkeep.interval, drain_rx, state.clone(), net.clone(), drained.clone()));

    Ok(RunningPeer { state, net, addr, shutdown: Some(tx), server, maintenance, upkeep, drained })
}

/// Hello to the peer we join through, retried for a few seconds (peers of a new ring
/// are often started together, and the first may not listen yet).
async fn first_contact(net: &GrpcNet, b: &NetAddr, me: &NetAddr) -> Result<Code, String> {
    const TRIES: u32 = 8;
    let mut last = String::new();
    for attempt in 1..=TRIES {
        match net.hello(b, me).await {
            Ok((_, code)) => return Ok(code),
            // A version mismatch will not go away; anything else may (a peer still
            // starting, a network hiccup), so the peer keeps listening and tries again.
            Err(e) if e.to_string().contains("protocol v") => return Err(format!("cannot join via {b}: {e}")),
            Err(e) => {
                last = e.to_string();
                if attempt < TRIES {
                    log::warn!("cannot reach {b} to join (attempt {attempt} of {TRIES}): {last}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
    Err(format!("cannot join via {b}: {last}"))
}

/// The ring's code: what the ring says when joining, else what this peer stored, else
/// the configured one for a new ring. Any disagreement is an error, not a guess.
fn settle_code(cfg: &PeerConfig, stored: Option<&str>, ring: Option<Code>) -> Result<Code, String> {
    let stored: Option<Code> = stored.map(|s| s.parse()).transpose().map_err(|e| format!("{}: stored ring code: {e}", cfg.data_dir.display()))?;
    let code = ring.or(stored).or(cfg.code).unwrap_or(Code::DEFAULT);
    if let Some(c) = cfg.code.filter(|c| *c != code) {
        return Err(format!("--code {c} differs from the ring's code {code}; the code is fixed when a ring is created"));
    }
    if let Some(s) = stored.filter(|s| *s != code) {
        return Err(format!("{} belongs to a ring with code {s}, but the ring at {} uses {code}", cfg.data_dir.display(), cfg.join.as_deref().unwrap_or("?")));
    }
    Ok(code)
}

/// Runs upkeep scans on a timer; a drain request pre-empts them, after which the peer
/// leaves the ring and `drained` is notified so its owner can exit.
async fn run_upkeep(
    mut upkeep: Upkeep,
    every: Duration,
    mut drains: tokio::sync::mpsc::Receiver<tokio::sync::oneshot::Sender<DrainReport>>,
    state: Arc<PeerState>,
    net: Arc<GrpcNet>,
    drained: Arc<tokio::sync::Notify>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                upkeep.scan().await;
            }
            req = drains.recv() => {
                let Some(reply) = req else { return };
                let report = upkeep.drain().await;
                log::info!("drained: {} shards moved, {} left", report.moved, report.left);
                driver::leave(&state.node, &*net).await;
                let _ = reply.send(report);
                drained.notify_one();
                return;
            }
        }
    }
}

fn log_server_end(r: Result<(), tonic::transport::Error>) {
    if let Err(e) = r {
        log::error!("server stopped: {e}");
    }
}

/// Waits for SIGINT or SIGTERM.
pub async fn wait_for_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// A ring call with the standard deadline, for callers outside the driver.
pub async fn ping<T: Transport<NetAddr>>(net: &T, addr: &NetAddr) -> bool {
    tokio::time::timeout(RING_CALL_TIMEOUT, net.call(addr, crate::ring::RingRequest::Ping)).await.is_ok_and(|r| r.is_ok())
}
