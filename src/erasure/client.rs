//! Writing and reading stripes over the network.
//!
//! A write encodes off the async workers, sends shard i to the i-th of the stripe's k+m
//! distinct peers in parallel, and is acknowledged once `write_quorum` (>= k, default
//! k+1) shards are durable; shards still in flight finish on their own, and any that
//! never land are rebuilt by upkeep.
//!
//! A read asks the first k peers at once and, if k verified shards have not arrived
//! after `hedge_after` (or as soon as one peer fails or lacks its shard), asks the rest.
//! So a dead, slow or frozen (SIGSTOPped) peer costs one hedge delay, not a timeout. The
//! decode is checked against the stripe key (or by a caller that can authenticate the
//! bytes itself, `read_stripe_opened`); a shard that fails its hash is never used.

use super::placement::distinct_peers;
use super::codec;
use super::stripe::{assemble, decode_unchecked, make_stripe_as, make_stripe_padded, Shard, HASH_V2_SHA1, HASH_V3};
use super::Code;
use crate::ring::driver::{self, Walk};
use crate::ring::{Id, NetError};
use crate::rpc::client::GrpcNet;
use crate::rpc::NetAddr;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

/// Peers beyond k+m a read may ask: shards can sit just past the set while a join or
/// leave is being rebalanced.
const READ_SPARES: usize = 2;
/// After the write quorum is reached, how long to wait for the remaining shards before
/// acknowledging (they keep going in the background).
const STRAGGLER_WAIT: Duration = Duration::from_millis(200);
/// Most k-subsets tried when a decode does not match the stripe key (a forged shard).
const MAX_DECODE_ATTEMPTS: usize = 64;
const READ_ATTEMPTS: usize = 3;
/// Looks (PLACEMENT_RETRY_WAIT apart) that must all show a small ring before stripes narrow.
const NARROW_AFTER_LOOKS: usize = 40;
const READ_RETRY_WAIT: Duration = Duration::from_millis(400);
/// Short, so a write resumes within ~0.1 s of the ring settling: at 500 ms, the first
/// 512 MiB written into a ring started 2 s before took 2.7-4.9 s instead of ~1 s (stripes
/// whose walk showed 5 of 6 peers each slept half a second, several times).
const PLACEMENT_RETRY_WAIT: Duration = Duration::from_millis(100);
pub const DEFAULT_HEDGE_AFTER: Duration = Duration::from_millis(150);

#[derive(Debug, thiserror::Error)]
pub enum StripeError {
    #[error("lookup failed: {0}")]
    Lookup(String),
    #[error("the ring has {have} reachable peers, a {code} stripe needs {} distinct peers", code.total())]
    TooFewPeers { have: usize, code: Code },
    #[error("stripe {stripe}: only {stored} of {total} shards stored, {quorum} needed: {why}")]
    WriteFailed { stripe: String, stored: usize, total: usize, quorum: usize, why: String },
    #[error("stripe {stripe}: {have} of the {need} shards needed are readable; missing shards {missing} ({why})")]
    Unavailable { stripe: String, have: usize, need: usize, missing: String, why: String },
    #[error("stripe {stripe}: {why}")]
    Corrupt { stripe: String, why: String },
    #[error("{failed} peers could not put lately written shards on disk ({tolerated} may fail): {why}")]
    SyncFailed { failed: usize, tolerated: usize, why: String },
    #[error("{0}")]
    Internal(String),
}

#[derive(Clone)]
pub struct StripeClient {
    pub net: Arc<GrpcNet>,
    pub start: Vec<NetAddr>,
    pub code: Code,
    pub write_quorum: usize,
    pub hedge_after: Duration,
    walks: Arc<parking_lot::Mutex<WalkCache>>,
    /// A narrower code this client fell back to when it could not find k+m live peers,
    /// and until when it keeps using it before trying the full code again.
    narrowed: Arc<parking_lot::Mutex<Option<(Code, Instant)>>>,
    /// Peers sent lazy shards, and when last: what `sync_lazy` asks to sync.
    lazy: Arc<parking_lot::Mutex<HashMap<NetAddr, Instant>>>,
}

/// A peer puts lazy writes on disk within about a second (its group commit); a lazy
/// shard older than this is on disk without being asked.
const LAZY_WINDOW: Duration = Duration::from_secs(5);

/// How long a write keeps a narrowed code before looking for k+m peers again.
const NARROWED_FOR: Duration = Duration::from_secs(20);
/// Placement waits this many retries for a short walk to fill up before narrowing.
const NARROW_AFTER_RETRIES: usize = 50;
/// Whole-stripe write attempts (each with a fresh walk that avoids peers that failed).
const WRITE_ATTEMPTS: usize = 3;

/// Recent walks of the ring, one per owner vnode, keyed by that vnode's id. A walk
/// serves every key of its owner's arc as the lookup's last peer knew it: a file's
/// inodes and stripes have random keys, and a cache that served only keys between the
/// looked-up one and the owner missed nearly every time (each miss a lookup of several
/// hops). Deeper entries of a walk come from successor lists, which can lag behind a
/// join for a few rounds, so they are never used to place other keys. Entries expire
/// so joins and leaves show; a primary that disagrees refuses the write and the writer
/// walks again.
#[derive(Default)]
struct WalkCache {
    walks: BTreeMap<Id, (Walk<NetAddr>, Instant)>,
}

const WALK_CACHE_TTL: Duration = Duration::from_secs(5);
/// A ring of 4,096 vnodes is cached whole; a larger one keeps its recently used arcs.
const WALK_CACHE_LEN: usize = 4096;

impl WalkCache {
    fn peers_for(&mut self, key: Id, n: usize) -> Option<Vec<NetAddr>> {
        // The owner is the first cached vnode at or after the key, or (an arc that wraps
        // past zero) the first of all.
        let (&owner, (walk, at)) = self.walks.range(key..).next().or_else(|| self.walks.iter().next())?;
        if at.elapsed() >= WALK_CACHE_TTL {
            self.walks.remove(&owner);
            return None;
        }
        if !walk.covers(key) {
            return None;
        }
        let peers = distinct_peers(&walk.vnodes, n);
        (peers.len() >= n).then_some(peers)
    }

    fn insert(&mut self, walk: Walk<NetAddr>) {
        let Some(owner) = walk.vnodes.first().map(|c| c.id) else { return };
        // Cached vnodes inside the new arc are gone, as far as the newer answer knows.
        let inside: Vec<Id> = self.walks.keys().filter(|&&id| id.in_open_open(walk.arc_from, owner)).copied().collect();
        for id in inside {
            self.walks.remove(&id);
        }
        if self.walks.len() >= WALK_CACHE_LEN {
            self.walks.retain(|_, (_, t)| t.elapsed() < WALK_CACHE_TTL);
            if self.walks.len() >= WALK_CACHE_LEN {
                let oldest = self.walks.iter().min_by_key(|(_, (_, t))| *t).map(|(id, _)| *id);
                oldest.map(|id| self.walks.remove(&id));
            }
        }
        self.walks.insert(owner, (walk, Instant::now()));
    }
}

/// Default write quorum for a code: k+1, so one more loss is survivable before repair.
pub fn default_quorum(code: Code) -> usize {
    (code.k as usize + 1).min(code.total() as usize)
}

impl StripeClient {
    pub fn new(net: Arc<GrpcNet>, start: Vec<NetAddr>, code: Code) -> StripeClient {
        StripeClient { net, start, code, write_quorum: default_quorum(code), hedge_after: DEFAULT_HEDGE_AFTER, walks: Default::default(), narrowed: Default::default(), lazy: Default::default() }
    }

    /// The code new stripes are written with: the ring's, or for a ring with fewer than
    /// k+m peers, a narrower one with the same m (k' = peers - m), so a small ring still
    /// survives m losses; fewer than m+1 peers is an error.
    pub async fn effective_code(&self) -> Result<Code, StripeError> {
        let code = self.code;
        let total = code.total() as usize;
        let mut have = 0;
        // A young ring's successor lists may not show every peer yet: narrow only when the
        // walk stays short for a few seconds, never on one look.
        for attempt in 0..NARROW_AFTER_LOOKS {
            if attempt > 0 {
                tokio::time::sleep(PLACEMENT_RETRY_WAIT).await;
                self.walks.lock().walks.clear();
            }
            let key = Id::from_fraction(rand::random::<f64>());
            have = self.peers_for(key, total).await?.len();
            if have >= total {
                return Ok(code);
            }
        }
        if have > code.m as usize {
            let narrow = Code::new((have - code.m as usize) as u8, code.m).map_err(StripeError::Internal)?;
            log::warn!("the ring has {have} peers, fewer than {total}: writing {narrow} stripes (still {} losses survivable)", code.m);
            return Ok(narrow);
        }
        Err(StripeError::TooFewPeers { have, code })
    }

    /// The first `n` distinct peers at and after `key`, from the walk cache when a recent
    /// walk covers the key, else from a lookup and walk.
    pub async fn peers_for(&self, key: Id, n: usize) -> Result<Vec<NetAddr>, StripeError> {
        let suspects = self.net.suspected();
        if let Some(p) = self.walks.lock().peers_for(key, n) {
            if !p.iter().any(|a| suspects.contains(a)) {
                return Ok(p);
            }
        }
        let walk = driver::walk_from(&*self.net, self.start.clone(), key, n).await.map_err(|e| StripeError::Lookup(e.to_string()))?;
        let peers = distinct_peers(&walk.vnodes, n);
        self.walks.lock().insert(walk);
        Ok(peers)
    }

    /// Drops cached ring walks: the next placement walks the ring afresh.
    pub fn forget_walks(&self) {
        self.walks.lock().walks.clear();
    }

    /// The first `n` distinct peers for `key`, without peers that just failed us.
    async fn live_peers_for(&self, key: Id, n: usize) -> Result<Vec<NetAddr>, StripeError> {
        let suspects = self.net.suspected();
        let walk = self.peers_for(key, n + suspects.len().min(4)).await?;
        Ok(walk.into_iter().filter(|a| !suspects.contains(a)).take(n).collect())
    }

    /// Stores `data` as one stripe; returns its key once the write quorum is durable.
    /// With fewer than k+m live peers (some down, repair not done yet) it writes with a
    /// narrower code of the same m, so the stripe still survives m more losses; repair
    /// and rebalance later see it like any other stripe.
    pub async fn write_stripe(&self, data: Vec<u8>) -> Result<Id, StripeError> {
        self.write_stripe_as(data, false).await
    }

    /// `write_stripe`, returning once the write quorum holds the shards in memory (safe
    /// from a peer process dying, on the peers' disks within a second). `sync_lazy`
    /// makes them durable sooner: what a file's fsync does.
    pub async fn write_stripe_lazy(&self, data: Vec<u8>) -> Result<Id, StripeError> {
        self.write_stripe_as(data, true).await
    }

    /// Has every peer that took a lazy shard from this client lately put it on disk.
    /// Each stripe was acknowledged by k+1 peers (the write quorum), so one peer that
    /// cannot be reached leaves every stripe with k durable shards, still whole; more
    /// is an error.
    pub async fn sync_lazy(&self) -> Result<(), StripeError> {
        let started = Instant::now();
        let peers: Vec<NetAddr> = {
            let mut m = self.lazy.lock();
            m.retain(|_, t| t.elapsed() < LAZY_WINDOW);
            m.keys().cloned().collect()
        };
        let results = futures_util::future::join_all(peers.iter().map(|p| self.net.sync(p))).await;
        let mut failed = Vec::new();
        {
            let mut m = self.lazy.lock();
            for (p, r) in peers.iter().zip(results) {
                match r {
                    // Unless it took another lazy shard since we asked.
                    Ok(()) => {
                        if m.get(p).is_some_and(|t| *t <= started) {
                            m.remove(p);
                        }
                    }
                    Err(e) => failed.push(format!("{p}: {e}")),
                }
            }
        }
        let tolerated = self.write_quorum.clamp(self.code.k as usize, self.code.total() as usize).min(default_quorum(self.code)) - self.code.k as usize;
        if failed.len() > tolerated {
            return Err(StripeError::SyncFailed { failed: failed.len(), tolerated, why: failed.join("; ") });
        }
        for f in failed {
            log::warn!("could not sync {f}; its shards are still held durably by the write quorum's others");
        }
        Ok(())
    }

    async fn write_stripe_as(&self, mut data: Vec<u8>, lazy: bool) -> Result<Id, StripeError> {
        // Zero padding for any code tried below (they only get narrower), so the data
        // shards are slices of this one buffer; free when the caller left room for it.
        let len = data.len();
        data.resize(len + codec::pad_room(self.code.k), 0);
        let data = bytes::Bytes::from(data);
        let mut code = match *self.narrowed.lock() {
            Some((c, until)) if Instant::now() < until && c.k < self.code.k => c,
            _ => self.code,
        };
        let mut last = None;
        let mut attempt = 0;
        while attempt < WRITE_ATTEMPTS {
            let total = code.total() as usize;
            let d = data.clone();
            let (stripe, shards) = tokio::task::spawn_blocking(move || make_stripe_padded(code, d, len))
                .await
                .map_err(|e| StripeError::Internal(format!("encode task failed: {e}")))?
                .map_err(|e| StripeError::Internal(e.to_string()))?;
            let mut peers = self.live_peers_for(stripe, total).await?;
            // A ring that is still converging (peers just joined) can show a short walk;
            // give it a moment before writing narrower.
            for _ in 0..NARROW_AFTER_RETRIES {
                if peers.len() >= total {
                    break;
                }
                log::debug!("stripe {}: the walk shows {} of {total} peers; waiting for the ring to settle", stripe.to_hex(), peers.len());
                tokio::time::sleep(PLACEMENT_RETRY_WAIT).await;
                self.walks.lock().walks.clear();
                peers = self.live_peers_for(stripe, total).await?;
            }
            if peers.len() < total {
                let m = code.m as usize;
                if peers.len() > m {
                    let narrow = Code::new((peers.len() - m) as u8, code.m).map_err(StripeError::Internal)?;
                    log::warn!("only {} live peers for a {code} stripe: writing {narrow} (still {m} losses survivable)", peers.len());
                    *self.narrowed.lock() = Some((narrow, Instant::now() + NARROWED_FOR));
                    code = narrow;
                    continue;
                }
                return Err(StripeError::TooFewPeers { have: peers.len(), code });
            }
            let quorum = if code == self.code { self.write_quorum.clamp(code.k as usize, total) } else { default_quorum(code) };
            match self.put_shards(stripe, code, shards, peers, quorum, lazy).await {
                Ok(()) => return Ok(stripe),
                Err(e) => {
                    log::info!("stripe {}: {e}; retrying with a fresh walk", stripe.to_hex());
                    self.walks.lock().walks.clear();
                    last = Some(e);
                }
            }
            attempt += 1;
        }
        Err(last.unwrap_or_else(|| StripeError::Internal("no write attempt made".into())))
    }

    /// Sends each shard to its peer; Ok once `quorum` are durable (stragglers get a
    /// little longer so the stripe is usually complete).
    async fn put_shards(&self, stripe: Id, code: Code, shards: Vec<Shard>, peers: Vec<NetAddr>, quorum: usize, lazy: bool) -> Result<(), StripeError> {
        let total = code.total() as usize;
        let (tx, mut rx) = tokio::sync::mpsc::channel(total);
        for (shard, peer) in shards.into_iter().zip(peers) {
            let net = self.net.clone();
            let tx = tx.clone();
            if lazy {
                // Noted before sending: a sync must not miss a shard that lands late.
                self.lazy.lock().insert(peer.clone(), Instant::now());
            }
            tokio::spawn(async move {
                let r = net.put_shard_as(&peer, &shard, lazy).await;
                let _ = tx.send((shard.meta.index, peer, r)).await;
            });
        }
        drop(tx);
        let (mut ok, mut failed, mut why) = (0usize, 0usize, String::new());
        let mut quorum_at: Option<tokio::time::Instant> = None;
        loop {
            let next = match quorum_at {
                None => rx.recv().await,
                Some(t) => match tokio::time::timeout_at(t + STRAGGLER_WAIT, rx.recv()).await {
                    Ok(r) => r,
                    Err(_) => break,
                },
            };
            let Some((index, peer, r)) = next else { break };
            match r {
                Ok(()) => ok += 1,
                Err(e) => {
                    failed += 1;
                    log::warn!("stripe {}: shard {index} to {peer}: {e}", stripe.to_hex());
                    // A peer that answered (full, say) is alive: only silence is suspect.
                    if matches!(e, NetError::Timeout(_) | NetError::Unreachable(_)) {
                        self.net.suspect(&peer);
                    }
                    why = format!("shard {index} on {peer}: {e}");
                }
            }
            if ok >= quorum && quorum_at.is_none() {
                quorum_at = Some(tokio::time::Instant::now());
            }
            if failed > total - quorum {
                break;
            }
        }
        if ok < quorum {
            return Err(StripeError::WriteFailed { stripe: stripe.to_hex(), stored: ok, total, quorum, why });
        }
        Ok(())
    }

    /// Reads a stripe back. `len` is its length when the caller knows it (from a
    /// manifest); the code is learnt from the shards (the stripe key commits to it).
    pub async fn read_stripe(&self, stripe: Id, len: Option<usize>) -> Result<Vec<u8>, StripeError> {
        self.read_stripe_with(stripe, len, Arc::new(Some), false).await
    }

    /// Reads a stripe whose bytes the caller can authenticate itself: `open` turns them
    /// into what it wants, or says None when they are not what it expects. The first k
    /// shards are decoded and handed to `open` without hashing the stripe against its key
    /// (a sealed chunk's GCM tag and known seal header are a stronger check, and the hash
    /// was a fifth of a sequential read's CPU); only when `open` refuses them is the read
    /// done the checked way (key hash, other k-subsets, bad shards found and rewritten).
    pub async fn read_stripe_opened<T: Send + 'static>(&self, stripe: Id, len: Option<usize>, open: Opener<T>) -> Result<T, StripeError> {
        self.read_stripe_with(stripe, len, open, true).await
    }

    async fn read_stripe_with<T: Send + 'static>(&self, stripe: Id, len: Option<usize>, open: Opener<T>, trusted: bool) -> Result<T, StripeError> {
        // A walk taken while the ring is still noticing a loss can be short of live holders:
        // look again (without the cache) before calling the stripe unavailable.
        for _ in 1..READ_ATTEMPTS {
            match self.read_stripe_once(stripe, len, &open, trusted).await {
                Err(StripeError::Unavailable { .. }) => {
                    self.walks.lock().walks.clear();
                    tokio::time::sleep(READ_RETRY_WAIT).await;
                }
                r => return r,
            }
        }
        self.read_stripe_once(stripe, len, &open, trusted).await
    }

    async fn read_stripe_once<T: Send + 'static>(&self, stripe: Id, len: Option<usize>, open: &Opener<T>, trusted: bool) -> Result<T, StripeError> {
        let guess = self.code;
        let mut peers = self.peers_for(stripe, guess.total() as usize + READ_SPARES).await?;
        // Peers that failed us recently are asked last, not first.
        let suspects = self.net.suspected();
        peers.sort_by_key(|p| suspects.contains(p));
        let mut inflight: HashMap<NetAddr, Instant> = HashMap::new();
        let mut read = Read { stripe, code: None, len, got: Vec::new(), from: Vec::new(), mask: 0, errors: Vec::new(), liars: Vec::new(), forged: false };
        let mut tasks: JoinSet<(NetAddr, Result<Option<Shard>, crate::ring::NetError>)> = JoinSet::new();
        let mut next = 0usize;
        let launch = |tasks: &mut JoinSet<_>, inflight: &mut HashMap<NetAddr, Instant>, next: &mut usize, n: usize, skip: u64| {
            for _ in 0..n {
                if let Some(p) = peers.get(*next).cloned() {
                    inflight.insert(p.clone(), Instant::now());
                    let net = self.net.clone();
                    tasks.spawn(async move {
                        let r = net.get_shard_unhashed(&p, stripe, skip).await;
                        (p, r)
                    });
                    *next += 1;
                }
            }
        };
        launch(&mut tasks, &mut inflight, &mut next, guess.k as usize, 0);
        let hedge = tokio::time::sleep(self.hedge_after);
        tokio::pin!(hedge);
        let mut hedged = false;
        let mut tried_decode_with = 0usize;
        loop {
            let k = read.code.map(|c| c.k as usize).unwrap_or(guess.k as usize);
            if read.got.len() >= k && read.got.len() > tried_decode_with {
                tried_decode_with = read.got.len();
                let (code, len) = (read.code.expect("set with the first shard"), read.len.expect("set with the first shard"));
                // The shards go to the decoding thread and come back (no copy of 4 MiB).
                let shards = std::mem::take(&mut read.got);
                let fast = trusted && read.liars.is_empty() && !read.forged;
                let open2 = open.clone();
                let (res, shards) = tokio::task::spawn_blocking(move || {
                    if fast {
                        if let Some(t) = decode_unchecked(stripe, code, len, &shards).ok().and_then(|d| open2(d)) {
                            return (Ok(Decoded::Opened(t)), shards);
                        }
                    }
                    (assemble_any_noting(stripe, code, len, &shards).map(|(d, bad_first)| Decoded::Checked(d, fast || bad_first)), shards)
                })
                .await
                .map_err(|e| StripeError::Internal(format!("decode task failed: {e}")))?;
                read.got = shards;
                match res {
                    Ok(Decoded::Opened(t)) => {
                        self.suspect_stragglers(&inflight);
                        return Ok(t);
                    }
                    Ok(Decoded::Checked(data, suspect)) => {
                        self.suspect_stragglers(&inflight);
                        // The first k shards did not decode to the stripe (or the caller
                        // refused them) while another subset did: one of them is bad.
                        read.forged |= suspect;
                        if !read.liars.is_empty() || read.forged {
                            self.repair_in_background(&read, &data);
                        }
                        return open(data).ok_or_else(|| StripeError::Corrupt {
                            stripe: stripe.to_hex(),
                            why: "the stripe's bytes match its key but not what the reader expects".into(),
                        });
                    }
                    Err(e) => {
                        read.errors.push(e);
                        read.forged = true;
                        // Shards are fetched without hashing them (the decoded stripe is
                        // checked instead): now find the bad ones, so that others replace them.
                        let got = std::mem::take(&mut read.got);
                        let (got, ok) = tokio::task::spawn_blocking(move || {
                            let ok: Vec<bool> = got.iter().map(|s| s.meta.verifies(&s.data)).collect();
                            (got, ok)
                        })
                        .await
                        .map_err(|e| StripeError::Internal(format!("verify task failed: {e}")))?;
                        read.got = got;
                        if read.drop_unverified(&ok) > 0 {
                            tried_decode_with = 0; // what is left may decode now
                        }
                        launch(&mut tasks, &mut inflight, &mut next, peers.len(), 0);
                    }
                }
            }
            tokio::select! {
                r = tasks.join_next() => {
                    let Some(r) = r else {
                        if next < peers.len() {
                            launch(&mut tasks, &mut inflight, &mut next, 1, 0);
                            continue;
                        }
                        break;
                    };
                    let (peer, res) = r.map_err(|e| StripeError::Internal(format!("read task failed: {e}")))?;
                    inflight.remove(&peer);
                    match res {
                        Ok(Some(shard)) => {
                            if let Err(why) = read.accept(shard, &peer) {
                                if why == DUPLICATE {
                                    // It may hold another index too (mid-rebalance): ask again.
                                    let mask = read.mask;
                                    inflight.insert(peer.clone(), Instant::now());
                                    let net = self.net.clone();
                                    tasks.spawn(async move { let r = net.get_shard_unhashed(&peer, stripe, mask).await; (peer, r) });
                                } else {
                                    read.errors.push(format!("{peer}: {why}"));
                                    launch(&mut tasks, &mut inflight, &mut next, 1, 0);
                                }
                            }
                        }
                        Ok(None) => {
                            read.errors.push(format!("{peer} holds no shard"));
                            launch(&mut tasks, &mut inflight, &mut next, 1, 0);
                        }
                        Err(e) => {
                            if matches!(e, crate::ring::NetError::Protocol(_)) {
                                read.liars.push(peer.clone());
                            }
                            read.errors.push(e.to_string());
                            launch(&mut tasks, &mut inflight, &mut next, 1, 0);
                        }
                    }
                }
                _ = &mut hedge, if !hedged => {
                    hedged = true;
                    launch(&mut tasks, &mut inflight, &mut next, peers.len(), 0);
                }
            }
        }
        tasks.abort_all();
        self.suspect_stragglers(&inflight);
        let code = read.code.unwrap_or(guess);
        let missing: Vec<String> = (0..code.total()).filter(|i| read.mask & (1u64 << i) == 0).map(|i| i.to_string()).collect();
        let have = read.got.len();
        if have >= code.k as usize {
            return Err(StripeError::Corrupt { stripe: stripe.to_hex(), why: read.errors.join("; ") });
        }
        Err(StripeError::Unavailable {
            stripe: stripe.to_hex(),
            have,
            need: code.k as usize,
            missing: missing.join(","),
            why: if read.errors.is_empty() { "no peer answered".into() } else { read.errors.join("; ") },
        })
    }
}

impl StripeClient {
    /// Read repair: once a stripe is decoded despite bad shards, every peer that served
    /// one gets the right shard back (a shard that failed its hash is rewritten at every
    /// index that peer holds; a forged one, consistent with its header but not with the
    /// stripe, at its own index). In the background: the reader has its data.
    fn repair_in_background(&self, read: &Read, data: &[u8]) {
        let (Some(code), stripe) = (read.code, read.stripe) else { return };
        let served: Vec<(NetAddr, Shard)> = read.from.iter().cloned().zip(read.got.iter().cloned()).collect();
        let liars = read.liars.clone();
        let (net, data) = (self.net.clone(), data.to_vec());
        tokio::spawn(async move {
            // The stripe's hash is the one whose key re-encoding gives back, not the one
            // some served shard's header claims (a liar's header could name the other).
            let Ok(Some(correct)) = tokio::task::spawn_blocking(move || {
                [HASH_V3, HASH_V2_SHA1].into_iter().find_map(|v| make_stripe_as(v, code, &data).ok().filter(|(id, _)| *id == stripe).map(|(_, shards)| shards))
            })
            .await
            else {
                return;
            };
            let mut fixes: Vec<(NetAddr, u8)> = served.iter().filter(|(_, sh)| sh.data != correct[sh.meta.index as usize].data).map(|(p, sh)| (p.clone(), sh.meta.index)).collect();
            for p in liars {
                if let Ok(masks) = net.holdings(&p, &[stripe]).await {
                    let mask = masks.first().copied().unwrap_or(0);
                    fixes.extend((0..code.total()).filter(|i| mask & (1u64 << i) != 0).map(|i| (p.clone(), i)));
                }
            }
            for (p, i) in fixes {
                match net.put_shard(&p, &correct[i as usize]).await {
                    Ok(()) => log::warn!("stripe {}: {p} served a bad shard {i}; rewrote it", stripe.to_hex()),
                    Err(e) => log::warn!("stripe {}: {p} served a bad shard {i}; rewriting it failed: {e}", stripe.to_hex()),
                }
            }
        });
    }

    /// Peers still silent past the hedge delay are routed around for a while.
    fn suspect_stragglers(&self, inflight: &HashMap<NetAddr, Instant>) {
        for (p, t) in inflight {
            if t.elapsed() >= self.hedge_after {
                self.net.suspect(p);
            }
        }
    }
}

const DUPLICATE: &str = "duplicate index";

/// Turns a stripe's decoded bytes into what a reader wants; None when they are not what
/// it expects (see `StripeClient::read_stripe_opened`).
pub type Opener<T> = Arc<dyn Fn(Vec<u8>) -> Option<T> + Send + Sync>;

enum Decoded<T> {
    /// The caller's opener took a decode that was not checked against the stripe key.
    Opened(T),
    /// Checked against the stripe key; true when some shard given is suspect (the first k
    /// did not decode to the stripe, or the opener refused an unchecked decode).
    Checked(Vec<u8>, bool),
}

/// What a read has gathered so far.
struct Read {
    stripe: Id,
    code: Option<Code>,
    len: Option<usize>,
    got: Vec<Shard>,
    /// Who served each of `got`.
    from: Vec<NetAddr>,
    mask: u64,
    errors: Vec<String>,
    /// Peers that served a shard failing its own hash.
    liars: Vec<NetAddr>,
    /// Some k shards decoded to bytes that are not the stripe: one was forged.
    forged: bool,
}

impl Read {
    /// Drops the shards whose `ok` is false (they fail their own hash): their peers are
    /// liars, and their indexes may be fetched again from others. Returns how many.
    fn drop_unverified(&mut self, ok: &[bool]) -> usize {
        let mut dropped = 0;
        let (got, from) = (std::mem::take(&mut self.got), std::mem::take(&mut self.from));
        for ((shard, peer), good) in got.into_iter().zip(from).zip(ok.iter().copied().chain(std::iter::repeat(true))) {
            if good {
                self.got.push(shard);
                self.from.push(peer);
            } else {
                dropped += 1;
                self.mask &= !(1u64 << shard.meta.index);
                self.errors.push(format!("{peer} sent shard {} that fails its hash", shard.meta.index));
                self.liars.push(peer);
            }
        }
        dropped
    }

    fn accept(&mut self, s: Shard, from: &NetAddr) -> Result<(), String> {
        if s.meta.stripe != self.stripe {
            return Err("shard of another stripe".into());
        }
        if self.len.is_some_and(|l| l != s.meta.stripe_len as usize) || self.code.is_some_and(|c| c != s.meta.code) {
            return Err(format!("shard says {} bytes under {}, others say {:?} bytes under {:?}", s.meta.stripe_len, s.meta.code, self.len, self.code));
        }
        self.code = Some(s.meta.code);
        self.len = Some(s.meta.stripe_len as usize);
        if self.mask & (1u64 << s.meta.index) != 0 {
            return Err(DUPLICATE.into());
        }
        self.mask |= 1u64 << s.meta.index;
        self.got.push(s);
        self.from.push(from.clone());
        Ok(())
    }
}

/// Decodes from the first k shards, and if the result does not hash to the stripe key
/// (some shard is forged), from other k-subsets.
pub fn assemble_any(stripe: Id, code: Code, len: usize, shards: &[Shard]) -> Result<Vec<u8>, String> {
    assemble_any_noting(stripe, code, len, shards).map(|(d, _)| d)
}

/// Like `assemble_any`, and also says whether the first k shards did not decode to the
/// stripe (so one of them is bad, and read repair has something to rewrite).
pub fn assemble_any_noting(stripe: Id, code: Code, len: usize, shards: &[Shard]) -> Result<(Vec<u8>, bool), String> {
    let k = code.k as usize;
    let mut first_err = None;
    let mut attempts = 0;
    let mut pick: Vec<usize> = (0..k).collect();
    loop {
        match assemble(stripe, code, len, pick.iter().map(|&i| &shards[i])) {
            Ok(d) => return Ok((d, attempts > 0)),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
        attempts += 1;
        if attempts >= MAX_DECODE_ATTEMPTS || !next_combination(&mut pick, shards.len()) {
            return Err(first_err.unwrap_or_else(|| "no shards".into()));
        }
    }
}

/// Advances `pick` (sorted indexes into 0..n) to the next k-combination; false at the end.
fn next_combination(pick: &mut [usize], n: usize) -> bool {
    let k = pick.len();
    for i in (0..k).rev() {
        if pick[i] < n - k + i {
            pick[i] += 1;
            for j in i + 1..k {
                pick[j] = pick[j - 1] + 1;
            }
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::erasure::stripe::make_stripe;
    use crate::ring::Contact;

    #[test]
    fn the_walk_cache_places_only_keys_its_first_vnode_owns() {
        let f = |x: f64| Id::from_fraction(x);
        let c = |x: f64, a: &str| Contact { id: f(x), addr: NetAddr::from(a) };
        let mut w = WalkCache::default();
        w.insert(Walk { arc_from: f(0.10), vnodes: vec![c(0.20, "a"), c(0.30, "b"), c(0.40, "a"), c(0.50, "c"), c(0.60, "d")] });
        let p = |v: &[&str]| v.iter().map(|s| NetAddr::from(*s)).collect::<Vec<_>>();
        assert_eq!(w.peers_for(f(0.15), 3), Some(p(&["a", "b", "c"])));
        assert_eq!(w.peers_for(f(0.20), 2), Some(p(&["a", "b"])));
        assert_eq!(w.peers_for(f(0.11), 1), Some(p(&["a"])), "the whole arc is served");
        assert_eq!(w.peers_for(f(0.15), 5), None, "not enough peers in the walk");
        // Deeper entries come from successor lists that may lag a join: not trusted.
        assert_eq!(w.peers_for(f(0.25), 1), None, "owned by a later vnode of the walk");
        assert_eq!(w.peers_for(f(0.10), 1), None, "the arc's start belongs to the vnode before");
        assert_eq!(w.peers_for(f(0.05), 1), None, "before the arc");
        assert_eq!(w.peers_for(f(0.65), 1), None, "past the walk's end");
        // An arc that wraps past zero serves keys on both sides of it.
        w.insert(Walk { arc_from: f(0.90), vnodes: vec![c(0.05, "e"), c(0.20, "a")] });
        assert_eq!(w.peers_for(f(0.95), 1), Some(p(&["e"])));
        assert_eq!(w.peers_for(f(0.01), 2), Some(p(&["e", "a"])));
        assert_eq!(w.peers_for(f(0.15), 1), Some(p(&["a"])), "the other arc is still there");
        // A newer answer whose arc holds a cached vnode says that vnode is gone.
        w.insert(Walk { arc_from: f(0.12), vnodes: vec![c(0.25, "f")] });
        assert_eq!(w.peers_for(f(0.15), 1), Some(p(&["f"])));
        assert_eq!(w.peers_for(f(0.11), 1), None, "the rest of the gone vnode's arc is unknown");
    }

    #[test]
    fn combinations_cover_every_subset_once() {
        let mut pick = vec![0, 1];
        let mut seen = vec![pick.clone()];
        while next_combination(&mut pick, 4) {
            seen.push(pick.clone());
        }
        assert_eq!(seen, vec![vec![0, 1], vec![0, 2], vec![0, 3], vec![1, 2], vec![1, 3], vec![2, 3]]);
    }

    #[test]
    fn a_forged_shard_is_routed_around_when_spares_exist() {
        let code = Code::new(2, 2).unwrap();
        let data = vec![42u8; 5000];
        let (s, mut shards) = make_stripe(code, &data).unwrap();
        let mut forged = shards[0].data.to_vec();
        forged[10] ^= 0xff;
        shards[0].data = forged.into();
        shards[0].meta = shards[0].meta.rehashed(&shards[0].data);
        assert_eq!(assemble_any(s, code, data.len(), &shards).unwrap(), data);
        assert_eq!(assemble_any_noting(s, code, data.len(), &shards).unwrap(), (data.clone(), true), "the forged first shard is noted");
        assert!(assemble_any(s, code, data.len(), &shards[..2]).is_err());
        let (_, clean) = make_stripe(code, &data).unwrap();
        assert_eq!(assemble_any_noting(s, code, data.len(), &clean).unwrap(), (data, false));
    }
}
