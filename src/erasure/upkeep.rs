//! A peer's background care of the stripes it holds: repair, rebalance, drain, scrub.
//!
//! Every scan the peer groups its shards by stripe and, for each stripe, finds the
//! stripe's holder set (the first k+m distinct peers from the stripe key) and asks those
//! peers which shard indexes they hold (one batched Holdings call per peer). Then:
//!
//! - *Not in the set* (a peer joined in front of us, or we were a repair target and the
//!   old holder came back): hand each shard to a set member holding nothing of the
//!   stripe, then delete ours; if a set member already has that index, just delete ours.
//!   This is the whole of rebalancing: only shards whose holder fell out of a set move.
//! - *In the set, and holding the lowest index among live set members* (the stripe's
//!   coordinator, so exactly one peer acts): count the stripe for status, and if indexes
//!   have been missing for longer than the grace period, rebuild them from any k shards
//!   onto the set members that hold nothing, at a bounded rate.
//! - A local shard found corrupt (by a read or by the rolling scrub) is rebuilt in place
//!   at once: the peer is alive, so there is nothing to wait for.
//! - The coordinator also audits its healthy stripes, a slice per scan at
//!   `audit_bytes_per_sec`, one full pass a day (`audit_every`): every holder's shard is
//!   compared with the re-encoded stripe, so a peer that stores or serves forgeries its
//!   own checks cannot see is found and rewritten. Scrub re-reads local shards the same
//!   way (`scrub_every`); both once went round again as soon as they finished, which on
//!   small images meant re-reading and re-fetching everything every few minutes.
//!
//! Drain runs the hand-off step as if we were already out of every set.

use super::placement::distinct_peers;
use super::stripe::{make_stripe_as, Shard, ShardMeta};
use super::client::assemble_any;
use super::Code;
use crate::blockstore::{BlockKey, DiskImage};
use crate::ring::driver::{self, Walk};
use crate::ring::Id;
use crate::rpc::client::GrpcNet;
use crate::rpc::server::PeerState;
use crate::rpc::NetAddr;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct UpkeepConfig {
    pub interval: Duration,
    /// How long a stripe may miss shards before they are rebuilt elsewhere: a peer that
    /// reboots within it costs no repair traffic.
    pub grace: Duration,
    /// Repair and hand-off bandwidth cap in bytes/s (0 = none), so foreground I/O goes on.
    pub rate_bytes_per_sec: u64,
    /// Local shard bytes re-verified per second (rolling, in slices per scan), to find rot
    /// nobody reads.
    pub scrub_bytes_per_sec: u64,
    /// Shortest time from the start of one full scrub pass to the start of the next.
    /// Reads verify what they read, so scrub is for cold data; re-reading small images
    /// over and over cost an idle 6-peer ring on one machine 50 MB/s of disk reads.
    pub scrub_every: Duration,
    /// Shard bytes per second the stripe audit fetches from other peers.
    pub audit_bytes_per_sec: u64,
    /// Shortest time from the start of one full audit pass to the start of the next
    /// (reads check what they read; the audit finds forgeries nobody has read yet).
    pub audit_every: Duration,
}

impl Default for UpkeepConfig {
    fn default() -> Self {
        UpkeepConfig {
            interval: Duration::from_secs(30),
            grace: Duration::from_secs(300),
            rate_bytes_per_sec: 64 << 20,
            scrub_bytes_per_sec: 8 << 20,
            scrub_every: Duration::from_secs(24 * 3600),
            audit_bytes_per_sec: 1 << 20,
            audit_every: Duration::from_secs(24 * 3600),
        }
    }
}

/// Figures for status. Stripe counts cover the stripes this peer coordinates.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct UpkeepReport {
    pub stripes: u64,
    pub degraded: u64,
    pub at_risk: u64,
    pub repair_queue: u64,
    pub repaired_shards: u64,
    pub repaired_bytes: u64,
    pub repair_bytes_per_sec: f64,
    pub moved_shards: u64,
    pub moved_bytes: u64,
    pub scans: u64,
    pub unplaceable: u64,
}

#[derive(Clone, Debug, Default)]
pub struct DrainReport {
    pub moved: u64,
    pub left: u64,
}

/// One stripe as this peer holds it.
#[derive(Clone, Debug)]
struct LocalStripe {
    stripe: Id,
    /// The header version of its shards, which names the hash of its key.
    version: u8,
    code: Code,
    len: u32,
    /// Intact shard indexes held here.
    mask: u64,
    /// Indexes held here whose record failed its checksum.
    corrupt: u64,
}

/// Groups the local shards by stripe, from block headers only.
fn local_stripes(store: &DiskImage) -> (Vec<LocalStripe>, Vec<BlockKey>) {
    let corrupt: HashSet<BlockKey> = store.corrupt_keys().into_iter().collect();
    let mut by_prefix: BTreeMap<[u8; 19], LocalStripe> = BTreeMap::new();
    let mut unreadable: Vec<BlockKey> = Vec::new();
    for key in store.keys() {
        let prefix: [u8; 19] = key[..19].try_into().expect("19 bytes");
        let index = key[19];
        let meta = match store.meta(&key) {
            Ok(Some(m)) => ShardMeta::decode(&m).ok(),
            Ok(None) => continue,
            Err(_) => None,
        };
        let Some(meta) = meta.filter(|m| m.index == index && m.block_key() == key) else {
            if corrupt.contains(&key) {
                unreadable.push(key);
            }
            continue;
        };
        let e = by_prefix.entry(prefix).or_insert(LocalStripe { stripe: meta.stripe, version: meta.version, code: meta.code, len: meta.stripe_len, mask: 0, corrupt: 0 });
        if corrupt.contains(&key) {
            e.corrupt |= 1 << index;
        } else {
            e.mask |= 1 << index;
        }
    }
    (by_prefix.into_values().collect(), unreadable)
}

/// Paces background transfers to a byte rate.
struct Pacer {
    rate: u64,
    next_free: tokio::time::Instant,
}

impl Pacer {
    async fn take(&mut self, bytes: usize) {
        if self.rate == 0 {
            return;
        }
        let now = tokio::time::Instant::now();
        if self.next_free > now {
            tokio::time::sleep_until(self.next_free).await;
        }
        self.next_free = self.next_free.max(now) + Duration::from_secs_f64(bytes as f64 / self.rate as f64);
    }
}

pub struct Upkeep {
    state: Arc<PeerState>,
    net: Arc<GrpcNet>,
    me: NetAddr,
    cfg: UpkeepConfig,
    degraded_since: HashMap<Id, Instant>,
    totals: UpkeepReport,
    scrub_cursor: Option<BlockKey>,
    /// When the current (or last) full scrub pass began.
    scrub_pass_started: Option<Instant>,
    /// Where the rolling check of metadata records resumes.
    record_cursor: Option<BlockKey>,
    /// Where the rolling audit of coordinated stripes resumes, and the bytes it may
    /// still fetch (earned at `audit_bytes_per_sec`).
    audit_cursor: Option<Id>,
    audit_credit: u64,
    /// When the current (or last) full audit pass began.
    audit_pass_started: Option<Instant>,
    pacer: Pacer,
}

/// Metadata records checked per scan (each costs a walk per owner range and a read per
/// replica), so a peer with many records still scans in bounded time.
const RECORDS_PER_SCAN: usize = 512;

/// A stripe's holder set and who holds what in it, plus what the next few peers past the
/// set hold (shards wait there while a join or leave is being rebalanced).
struct View {
    set: Vec<NetAddr>,
    masks: Vec<u64>,
    /// Whether each set member answered the probe: one that did not (dead, frozen, slow)
    /// holds nothing *as far as we know*, and must never be picked as a target for that.
    known: Vec<bool>,
    spare_masks: Vec<u64>,
}

impl View {
    fn union(&self) -> u64 {
        self.masks.iter().fold(0, |a, m| a | m)
    }

    /// Indexes held anywhere we looked: an index held only past the set is not lost,
    /// its holder hands it over.
    fn union_with_spares(&self) -> u64 {
        self.spare_masks.iter().fold(self.union(), |a, m| a | m)
    }
}

/// Peers past the set probed for shards in transit.
const SPARES: usize = 2;

impl Upkeep {
    pub fn new(state: Arc<PeerState>, net: Arc<GrpcNet>, me: NetAddr, cfg: UpkeepConfig) -> Upkeep {
        let pacer = Pacer { rate: cfg.rate_bytes_per_sec, next_free: tokio::time::Instant::now() };
        Upkeep { state, net, me, cfg, degraded_since: HashMap::new(), totals: UpkeepReport::default(), scrub_cursor: None, scrub_pass_started: None, record_cursor: None, audit_cursor: None, audit_credit: 0, audit_pass_started: None, pacer }
    }

    async fn local(&self) -> (Vec<LocalStripe>, Vec<BlockKey>) {
        let store = self.state.store.clone();
        tokio::task::spawn_blocking(move || local_stripes(&store)).await.unwrap_or_default()
    }

    /// The holder sets of `stripes` (sorted by key), with `extra` more peers walked past
    /// the set, from as few lookups as possible: stripes up to a walk's first vnode share it.
    async fn walks(&self, stripes: &[LocalStripe], extra: usize) -> Vec<Option<Vec<NetAddr>>> {
        let mut out = Vec::with_capacity(stripes.len());
        let mut cached: Option<Walk<NetAddr>> = None;
        for s in stripes {
            let n = s.code.total() as usize + extra;
            if !cached.as_ref().is_some_and(|w| w.covers(s.stripe)) {
                match driver::walk_from(&*self.net, vec![self.me.clone()], s.stripe, n + 2).await {
                    Ok(w) if !w.vnodes.is_empty() => cached = Some(w),
                    _ => {
                        cached = None;
                        out.push(None);
                        continue;
                    }
                }
            }
            let walk = &cached.as_ref().expect("set above").vnodes;
            out.push(Some(distinct_peers(walk, n)));
        }
        out
    }

    /// Asks every peer in `sets` what it holds of the stripes it is asked about.
    async fn probe(&self, stripes: &[LocalStripe], sets: &[Option<Vec<NetAddr>>]) -> HashMap<(NetAddr, Id), u64> {
        let mut ask: HashMap<NetAddr, Vec<Id>> = HashMap::new();
        for (s, set) in stripes.iter().zip(sets) {
            for p in set.iter().flatten() {
                if *p != self.me {
                    ask.entry(p.clone()).or_default().push(s.stripe);
                }
            }
        }
        let mut out = HashMap::new();
        let mut calls = tokio::task::JoinSet::new();
        for (peer, ids) in ask {
            let net = self.net.clone();
            calls.spawn(async move {
                let r = net.holdings(&peer, &ids).await;
                (peer, ids, r)
            });
        }
        while let Some(Ok((peer, ids, r))) = calls.join_next().await {
            match r {
                Ok(masks) => {
                    for (id, m) in ids.into_iter().zip(masks) {
                        out.insert((peer.clone(), id), m);
                    }
                }
                Err(e) => log::debug!("holdings from {peer}: {e}"),
            }
        }
        out
    }

    /// The view of `s` from a walk: its first k+m peers are the set, the rest spares.
    fn view(&self, s: &LocalStripe, walk: &[NetAddr], held: &HashMap<(NetAddr, Id), u64>) -> View {
        let mask_of = |p: &NetAddr| if *p == self.me { Some(s.mask) } else { held.get(&(p.clone(), s.stripe)).copied() };
        let total = (s.code.total() as usize).min(walk.len());
        let set: Vec<Option<u64>> = walk[..total].iter().map(mask_of).collect();
        View {
            set: walk[..total].to_vec(),
            masks: set.iter().map(|m| m.unwrap_or(0)).collect(),
            known: set.iter().map(|m| m.is_some()).collect(),
            spare_masks: walk[total..].iter().map(|p| mask_of(p).unwrap_or(0)).collect(),
        }
    }

    /// One pass over every local stripe. Returns the report status shows.
    pub async fn scan(&mut self) -> UpkeepReport {
        let started = Instant::now();
        let repaired_before = self.totals.repaired_bytes;
        let (mut stripes, unreadable) = self.local().await;
        for key in unreadable {
            // Header and data both unreadable: we cannot even tell which stripe it was.
            // Dropping it makes the index missing, which the coordinator rebuilds.
            log::warn!("dropping unreadable shard record {}", Id::from_bytes(&key).to_hex());
            let store = self.state.store.clone();
            let _ = tokio::task::spawn_blocking(move || store.delete(&key)).await;
        }
        stripes.sort_by_key(|s| s.stripe);
        let sets = self.walks(&stripes, SPARES).await;
        let held = self.probe(&stripes, &sets).await;
        let mut report = UpkeepReport::default();
        let mut still_degraded: HashSet<Id> = HashSet::new();
        // A scan that never ran short of credit has audited through the last stripe, so
        // the next starts over. Credit is capped so an idle peer does not save up a burst.
        let earned = (self.cfg.audit_bytes_per_sec as f64 * self.cfg.interval.as_secs_f64()) as u64;
        let auditing = pass_goes_on(self.audit_cursor.is_some(), &mut self.audit_pass_started, self.cfg.audit_every, Instant::now());
        if auditing {
            self.audit_credit = (self.audit_credit + earned).min(earned.max(64 << 20));
        }
        let mut audit_short = false;
        for (s, set) in stripes.iter().zip(&sets) {
            let Some(set) = set else { continue };
            let total = s.code.total() as usize;
            if set.len() < total {
                report.unplaceable += 1;
                continue;
            }
            let view = self.view(s, set, &held);
            if s.corrupt != 0 {
                self.rebuild_local(s, &view).await;
            }
            if !view.set.contains(&self.me) {
                self.hand_off(s, &view).await;
                continue;
            }
            let coordinator = view
                .masks
                .iter()
                .enumerate()
                .filter(|(_, m)| **m != 0)
                .min_by_key(|(i, m)| (m.trailing_zeros(), *i))
                .map(|(i, _)| view.set[i].clone());
            if coordinator.as_ref() != Some(&self.me) {
                continue;
            }
            report.stripes += 1;
            let have = view.union_with_spares().count_ones() as usize;
            if have >= total {
                let cost = s.len as u64 * total as u64 / s.code.k as u64;
                if auditing && self.audit_cursor.is_none_or(|c| s.stripe > c) {
                    if self.audit_credit >= cost {
                        self.audit_credit -= cost;
                        self.audit_cursor = Some(s.stripe);
                        self.audit(s, &view).await;
                        tokio::time::sleep(paced(cost, self.cfg.audit_bytes_per_sec)).await;
                    } else {
                        audit_short = true;
                    }
                }
                continue;
            }
            report.degraded += 1;
            if have <= s.code.k as usize {
                report.at_risk += 1;
            }
            let since = *self.degraded_since.entry(s.stripe).or_insert_with(Instant::now);
            still_degraded.insert(s.stripe);
            if since.elapsed() >= self.cfg.grace && self.repair(s, &view).await {
                report.degraded -= 1;
                if have <= s.code.k as usize {
                    report.at_risk -= 1;
                }
                still_degraded.remove(&s.stripe);
            } else {
                report.repair_queue += 1;
            }
        }
        if auditing && !audit_short {
            self.audit_cursor = None;
        }
        self.degraded_since.retain(|id, _| still_degraded.contains(id));
        self.records().await;
        self.scrub().await;
        self.totals.scans += 1;
        report.scans = self.totals.scans;
        report.repaired_shards = self.totals.repaired_shards;
        report.repaired_bytes = self.totals.repaired_bytes;
        report.moved_shards = self.totals.moved_shards;
        report.moved_bytes = self.totals.moved_bytes;
        let secs = started.elapsed().as_secs_f64().max(1e-3);
        report.repair_bytes_per_sec = (self.totals.repaired_bytes - repaired_before) as f64 / secs;
        *self.state.upkeep.lock() = report.clone();
        report
    }

    /// Re-replicates metadata records: each record this peer holds is pushed to the
    /// members of its replica set (the first m+1 distinct peers of its walk) that lack it
    /// or hold an older version, so records regain m+1 copies after peers are lost.
    async fn records(&mut self) {
        let store = self.state.store.clone();
        let after = self.record_cursor;
        let keys: Vec<BlockKey> = tokio::task::spawn_blocking(move || {
            let mut keys: Vec<BlockKey> = store.keys().into_iter().filter(|k| store.meta(k).ok().flatten().is_some_and(|m| crate::meta::decode_meta(&m).is_some())).collect();
            keys.sort();
            let start = after.map(|a| keys.partition_point(|k| *k <= a)).unwrap_or(0);
            let mut batch: Vec<BlockKey> = keys[start..].iter().take(RECORDS_PER_SCAN).copied().collect();
            if batch.len() < RECORDS_PER_SCAN && start > 0 {
                batch.extend(keys[..start].iter().take(RECORDS_PER_SCAN - batch.len()).copied());
            }
            batch
        })
        .await
        .unwrap_or_default();
        self.record_cursor = keys.last().copied();
        let r = self.state.code.m as usize + 1;
        let mut cached: Option<Walk<NetAddr>> = None;
        // Which versions to check where: one batched call per replica peer, not one call
        // per record and replica (512 records cost each peer ~1,000 calls every scan,
        // which on a small machine slowed every read in flight).
        let mut ask: std::collections::HashMap<NetAddr, Vec<(Id, u64)>> = std::collections::HashMap::new();
        let mut copies: std::collections::HashMap<Id, crate::meta::Record> = std::collections::HashMap::new();
        for k in keys {
            let key = Id::from_bytes(&k);
            if !cached.as_ref().is_some_and(|w| w.covers(key)) {
                match driver::walk_from(&*self.net, vec![self.me.clone()], key, r + 2).await {
                    Ok(w) if !w.vnodes.is_empty() => cached = Some(w),
                    _ => {
                        cached = None;
                        continue;
                    }
                }
            }
            let set = distinct_peers(&cached.as_ref().expect("set above").vnodes, r);
            let Ok(mine) = self.state.records.local(key).await else { continue };
            if mine.version == 0 {
                continue;
            }
            for peer in set.iter().filter(|p| **p != self.me) {
                ask.entry(peer.clone()).or_default().push((key, mine.version));
            }
            copies.insert(key, mine);
        }
        let mut pushed = 0u64;
        for (peer, asked) in ask {
            let Ok(answers) = self.net.get_records(&peer, &asked).await else { continue };
            for ((key, version), answer) in asked.into_iter().zip(answers) {
                let behind = match answer {
                    Some(f) => f.version() < version,
                    // Left out of a full answer: asked alone.
                    None => self.net.get_record(&peer, key, version).await.is_ok_and(|f| f.version() < version),
                };
                if behind && self.net.put_record(&peer, key, &copies[&key], false).await.is_ok() {
                    pushed += 1;
                }
            }
        }
        if pushed > 0 {
            log::info!("upkeep: re-replicated {pushed} metadata record copies");
        }
    }

    /// Gathers k verified shards of a stripe from the holders in `view` (and our own) and
    /// decodes it; the decode is checked against the stripe key.
    async fn fetch_stripe(&self, s: &LocalStripe, view: &View) -> Option<Vec<u8>> {
        let mut got: Vec<Shard> = Vec::new();
        let mut mask = 0u64;
        let mut sources: Vec<NetAddr> = view.set.iter().zip(&view.masks).filter(|(_, m)| **m != 0).map(|(p, _)| p.clone()).collect();
        if s.mask != 0 && !sources.contains(&self.me) {
            sources.push(self.me.clone());
        }
        for p in sources {
            for _ in 0..s.code.total() {
                if got.len() >= s.code.total() as usize {
                    break;
                }
                match self.net.get_shard(&p, s.stripe, mask).await {
                    Ok(Some(sh)) if sh.meta.code == s.code && sh.meta.stripe_len == s.len => {
                        mask |= 1 << sh.meta.index;
                        got.push(sh);
                    }
                    _ => break,
                }
            }
        }
        if got.len() < s.code.k as usize {
            log::warn!("stripe {}: only {} of {} shards readable, cannot rebuild", s.stripe.to_hex(), got.len(), s.code.k);
            return None;
        }
        let (id, code, len) = (s.stripe, s.code, s.len as usize);
        let r = tokio::task::spawn_blocking(move || assemble_any(id, code, len, &got)).await.ok()?;
        r.map_err(|e| log::warn!("stripe {}: {e}", s.stripe.to_hex())).ok()
    }

    /// Deep check of a healthy stripe this peer coordinates: each holder's shard is
    /// fetched and compared with the re-encoded stripe. A shard that differs (a lying or
    /// rotten peer whose own checks pass) or fails its hash is rewritten. This finds what
    /// reads never meet: reads stop at the first k good shards.
    async fn audit(&mut self, s: &LocalStripe, view: &View) {
        let mut served: Vec<(NetAddr, Shard)> = Vec::new();
        let mut bad: Vec<(NetAddr, u8)> = Vec::new();
        for (p, m) in view.set.iter().zip(&view.masks) {
            for i in (0..s.code.total()).filter(|i| m & (1u64 << i) != 0) {
                match self.net.get_shard(p, s.stripe, !(1u64 << i)).await {
                    Ok(Some(sh)) if sh.meta.code == s.code && sh.meta.stripe_len == s.len && sh.meta.index == i => served.push((p.clone(), sh)),
                    Err(crate::ring::NetError::Protocol(_)) | Ok(Some(_)) => bad.push((p.clone(), i)),
                    _ => {}
                }
            }
        }
        let got: Vec<Shard> = served.iter().map(|(_, sh)| sh.clone()).collect();
        if got.len() < s.code.k as usize {
            return;
        }
        let (id, code, len) = (s.stripe, s.code, s.len as usize);
        let Ok(Ok(data)) = tokio::task::spawn_blocking(move || assemble_any(id, code, len, &got)).await else { return };
        let Some(shards) = self.reencode(s, data).await else { return };
        bad.extend(served.iter().filter(|(_, sh)| sh.data != shards[sh.meta.index as usize].data).map(|(p, sh)| (p.clone(), sh.meta.index)));
        for (p, i) in bad {
            let shard = &shards[i as usize];
            self.pacer.take(shard.data.len()).await;
            let r = if p == self.me { self.put_local(shard).await } else { self.net.put_shard(&p, shard).await.map_err(|e| e.to_string()) };
            match r {
                Ok(()) => {
                    log::warn!("audit: {p} held a bad shard {i} of stripe {}; rewrote it", s.stripe.to_hex());
                    self.totals.repaired_shards += 1;
                    self.totals.repaired_bytes += shard.data.len() as u64;
                }
                Err(e) => log::warn!("audit: {p} holds a bad shard {i} of stripe {}; rewriting failed: {e}", s.stripe.to_hex()),
            }
        }
    }

    async fn reencode(&self, s: &LocalStripe, data: Vec<u8>) -> Option<Vec<Shard>> {
        let (code, version) = (s.code, s.version);
        let (id, shards) = tokio::task::spawn_blocking(move || make_stripe_as(version, code, &data)).await.ok()?.ok()?;
        (id == s.stripe).then_some(shards)
    }

    /// Rebuilds missing indexes onto set members that hold nothing. True if complete.
    async fn repair(&mut self, s: &LocalStripe, view: &View) -> bool {
        let union = view.union_with_spares();
        let missing: Vec<u8> = (0..s.code.total()).filter(|i| union & (1 << i) == 0).collect();
        let targets: Vec<NetAddr> = (0..view.set.len()).filter(|&i| view.masks[i] == 0 && view.known[i]).map(|i| view.set[i].clone()).collect();
        let Some(data) = self.fetch_stripe(s, view).await else { return false };
        let Some(shards) = self.reencode(s, data).await else { return false };
        let mut all = true;
        for (index, target) in missing.iter().zip(targets.iter()) {
            let shard = &shards[*index as usize];
            self.pacer.take(shard.data.len()).await;
            let r = if *target == self.me { self.put_local(shard).await } else { self.net.put_shard(target, shard).await.map_err(|e| e.to_string()) };
            match r {
                Ok(()) => {
                    log::info!("repaired shard {index} of stripe {} onto {target}", s.stripe.to_hex());
                    self.totals.repaired_shards += 1;
                    self.totals.repaired_bytes += shard.data.len() as u64;
                }
                Err(e) => {
                    log::warn!("repair of shard {index} of stripe {} onto {target}: {e}", s.stripe.to_hex());
                    all = false;
                }
            }
        }
        all && missing.len() <= targets.len()
    }

    /// Rewrites our own corrupt shards of `s` from the others.
    async fn rebuild_local(&mut self, s: &LocalStripe, view: &View) {
        let Some(data) = self.fetch_stripe(s, view).await else { return };
        let Some(shards) = self.reencode(s, data).await else { return };
        for index in (0..s.code.total()).filter(|i| s.corrupt & (1 << i) != 0) {
            let shard = &shards[index as usize];
            match self.put_local(shard).await {
                Ok(()) => {
                    log::info!("rewrote corrupt shard {index} of stripe {}", s.stripe.to_hex());
                    self.totals.repaired_shards += 1;
                    self.totals.repaired_bytes += shard.data.len() as u64;
                }
                Err(e) => log::warn!("rewriting corrupt shard {index} of stripe {}: {e}", s.stripe.to_hex()),
            }
        }
    }

    async fn put_local(&self, shard: &Shard) -> Result<(), String> {
        let store = self.state.store.clone();
        let (key, meta, data) = (shard.meta.block_key(), shard.meta.encode(), shard.data.clone());
        tokio::task::spawn_blocking(move || store.put(&key, &meta, &data)).await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())
    }

    async fn delete_local(&self, stripe: Id, index: u8) -> Result<(), String> {
        let store = self.state.store.clone();
        let key = super::stripe::shard_block_key(stripe, index);
        tokio::task::spawn_blocking(move || store.delete(&key)).await.map_err(|e| e.to_string())?.map(|_| ()).map_err(|e| e.to_string())
    }

    /// Moves our shards of `s` into its set (we are not in it). Returns shards still here.
    async fn hand_off(&mut self, s: &LocalStripe, view: &View) -> u64 {
        let mut left = 0;
        let mut masks = view.masks.clone();
        for index in (0..s.code.total()).filter(|i| s.mask & (1 << i) != 0) {
            let union = masks.iter().fold(0, |a, m| a | m);
            if union & (1 << index) != 0 {
                // A set member has this index: ours is a spare copy.
                if let Err(e) = self.delete_local(s.stripe, index).await {
                    log::warn!("dropping spare shard {index} of {}: {e}", s.stripe.to_hex());
                    left += 1;
                }
                continue;
            }
            let Some(slot) = (0..masks.len()).find(|&i| masks[i] == 0 && view.known[i]) else {
                left += 1;
                continue;
            };
            let target = view.set[slot].clone();
            let store = self.state.store.clone();
            let key = super::stripe::shard_block_key(s.stripe, index);
            let block = tokio::task::spawn_blocking(move || store.get(&key)).await.ok().and_then(|r| r.ok()).flatten();
            let Some(shard) = block.and_then(|b| ShardMeta::decode(&b.meta).ok().filter(|m| m.verifies(&b.data)).map(|meta| Shard { meta, data: b.data.into() })) else {
                left += 1;
                continue;
            };
            self.pacer.take(shard.data.len()).await;
            match self.net.put_shard(&target, &shard).await {
                Ok(()) => {
                    masks[slot] |= 1 << index;
                    self.totals.moved_shards += 1;
                    self.totals.moved_bytes += shard.data.len() as u64;
                    log::debug!("handed shard {index} of {} to {target}", s.stripe.to_hex());
                    if let Err(e) = self.delete_local(s.stripe, index).await {
                        log::warn!("deleting handed-off shard {index} of {}: {e}", s.stripe.to_hex());
                    }
                }
                Err(e) => {
                    log::warn!("handing shard {index} of {} to {target}: {e}", s.stripe.to_hex());
                    left += 1;
                }
            }
        }
        left
    }

    /// Moves every local shard to the peers that will hold it once we are gone.
    pub async fn drain(&mut self) -> DrainReport {
        self.state.draining.store(true, Ordering::Relaxed);
        let moved_before = self.totals.moved_shards;
        let mut left = 0;
        for _round in 0..3 {
            let (mut stripes, _) = self.local().await;
            stripes.sort_by_key(|s| s.stripe);
            let walks = self.walks(&stripes, 1).await;
            let sets: Vec<Option<Vec<NetAddr>>> = walks
                .into_iter()
                .zip(&stripes)
                .map(|(w, s)| w.map(|w| w.into_iter().filter(|p| *p != self.me).take(s.code.total() as usize).collect()))
                .collect();
            let held = self.probe(&stripes, &sets).await;
            left = 0;
            for (s, set) in stripes.iter().zip(&sets) {
                match set {
                    Some(set) if set.len() >= s.code.total() as usize => {
                        let view = self.view(s, set, &held);
                        left += self.hand_off(s, &view).await;
                    }
                    _ => left += s.mask.count_ones() as u64,
                }
            }
            if left == 0 {
                break;
            }
        }
        DrainReport { moved: self.totals.moved_shards - moved_before, left }
    }

    /// Re-reads a slice of the local blocks so rot is found even if nobody reads them,
    /// a few MiB at a time with rests in between (`paced`). The rests are awaited here,
    /// not slept on the blocking pool, so a peer that stops is not kept from releasing
    /// its image by a scrub in progress.
    async fn scrub(&mut self) {
        if !pass_goes_on(self.scrub_cursor.is_some(), &mut self.scrub_pass_started, self.cfg.scrub_every, Instant::now()) {
            return;
        }
        let budget = (self.cfg.scrub_bytes_per_sec as f64 * self.cfg.interval.as_secs_f64()) as u64;
        let mut spent = 0u64;
        while spent < budget {
            let store = self.state.store.clone();
            let after = self.scrub_cursor;
            let (read, last) = tokio::task::spawn_blocking(move || {
                let mut read = 0u64;
                let mut last = None;
                for key in store.keys_after(after.as_ref(), SCRUB_SLICE_KEYS) {
                    if read >= SCRUB_SLICE_BYTES {
                        break;
                    }
                    if let Ok(Some(b)) = store.get(&key) {
                        read += b.data.len() as u64;
                    }
                    last = Some(key);
                }
                (read, last)
            })
            .await
            .unwrap_or((0, None));
            // No key left: the pass is complete.
            self.scrub_cursor = last;
            if last.is_none() {
                return;
            }
            spent += read;
            tokio::time::sleep(paced(read, self.cfg.scrub_bytes_per_sec)).await;
        }
    }
}

/// One scrub step reads at most this many blocks, or this many bytes.
const SCRUB_SLICE_KEYS: usize = 256;
const SCRUB_SLICE_BYTES: u64 = 4 << 20;

/// How long to rest after `bytes` of a rolling pass (scrub, audit) whose budget is
/// `rate` bytes/s: the scan's slice is spread over half the interval instead of being
/// read at once. Six peers on one machine each scrubbing their 80 MiB slice at once
/// took most of both cores for a second and a half every 10 s, and whatever the user
/// was doing then (a listing, small-file reads) ran at half speed.
fn paced(bytes: u64, rate: u64) -> Duration {
    if rate == 0 {
        return Duration::ZERO;
    }
    Duration::from_secs_f64(bytes as f64 / (2.0 * rate as f64)).min(Duration::from_secs(5))
}

/// Whether a rolling pass (scrub, audit) works this scan: it is in the middle of one, or
/// the last full pass began at least `every` before `now`, in which case a new one begins.
fn pass_goes_on(mid_pass: bool, started: &mut Option<Instant>, every: Duration, now: Instant) -> bool {
    if mid_pass {
        return true;
    }
    if started.is_some_and(|t| now.saturating_duration_since(t) < every) {
        return false;
    }
    *started = Some(now);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rolling_pass_rests_so_its_budget_takes_half_the_interval() {
        let rate = 8u64 << 20;
        let per_scan = rate * 10;
        let rest: Duration = (0..80).map(|_| paced(per_scan / 80, rate)).sum();
        assert!((rest.as_secs_f64() - 5.0).abs() < 0.01, "a 10 s budget rests 5 s in all: {rest:?}");
        assert_eq!(paced(1 << 20, 0), Duration::ZERO, "no budget, no rest");
        assert_eq!(paced(u64::MAX, 1), Duration::from_secs(5), "one huge block rests at most 5 s");
    }

    #[test]
    fn a_pass_starts_at_once_then_not_again_until_its_period_has_passed() {
        let day = Duration::from_secs(24 * 3600);
        let t0 = Instant::now();
        let mut started = None;
        assert!(pass_goes_on(false, &mut started, day, t0), "the first pass starts at once");
        assert_eq!(started, Some(t0));
        assert!(pass_goes_on(true, &mut started, day, t0 + Duration::from_secs(60)), "a pass under way goes on");
        assert!(!pass_goes_on(false, &mut started, day, t0 + Duration::from_secs(3600)), "finished an hour ago: wait");
        assert_eq!(started, Some(t0), "a refused start leaves the clock alone");
        assert!(pass_goes_on(false, &mut started, day, t0 + day), "a day later a new pass starts");
        assert_eq!(started, Some(t0 + day));
        let mut back_to_back = Some(t0);
        assert!(pass_goes_on(false, &mut back_to_back, Duration::ZERO, t0), "every = 0: passes back to back");
    }
}
