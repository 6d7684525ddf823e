//! The writer's and reader's side of records: find the replica set, read the newest
//! copy, compare-and-swap through the primary, route around replicas that fail.

use super::{read_quorum, CasOutcome, Fetched, Record};
use crate::erasure::client::StripeClient;
use crate::ring::{Id, NetError};
use crate::rpc::NetAddr;
use futures_util::future::join_all;
use futures_util::stream::{FuturesUnordered, StreamExt};
use crate::crypto::seal::{pad, unpad, FileKey, Purpose};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// Attempts of one CAS or read before it is reported as unavailable; the pauses between
/// them (growing, about 10 s in all) give the ring time to drop a dead peer.
const ATTEMPTS: usize = 10;
const BACKOFF: Duration = Duration::from_millis(200);
/// Refusals ("not the owner") after which a writer asks its primary to act anyway: views
/// of a settling ring agree within a few rounds; longer disagreement must not stop writes.
const INSIST_AFTER: usize = 4;
/// A read asks just enough replicas, and the rest when one fails or none has
/// answered within this long.
const READ_HEDGE: Duration = Duration::from_millis(30);
/// Replica sets looked up at once for a batched read.
const WALKS_PARALLEL: usize = 32;
/// Records of a batched read that are read one by one (their batch fell short) at once.
const FALLBACK_PARALLEL: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("metadata record {key} is unavailable: {why}")]
    Unavailable { key: String, why: String },
    #[error("the ring is full: {0}")]
    Full(String),
}

/// Outcome of `RecordClient::cas`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Swap {
    Done(u64),
    /// Someone else wrote first; the current record.
    Conflict(Record),
}

/// One record read's answers so far: the newest copy that passed authentication, and
/// which replica holds which version (for read repair).
struct Gathered {
    known: u64,
    /// The newest copy as stored (for repairs) and as written (for the caller).
    best: Option<(Record, Record)>,
    answered: usize,
    versions: Vec<(NetAddr, u64)>,
    why: String,
}

impl Gathered {
    fn new(known: u64) -> Gathered {
        Gathered { known, best: None, answered: 0, versions: Vec::new(), why: String::new() }
    }

    /// Takes replica `a`'s answer; true if it counts as one.
    fn take(&mut self, client: &RecordClient, key: Id, a: NetAddr, r: Result<Fetched, NetError>) -> bool {
        match r {
            Ok(Fetched::Got(rec)) if rec.version > self.known && self.best.as_ref().is_none_or(|b| rec.version > b.0.version) => match client.open(key, rec.clone()) {
                Ok(plain) => {
                    self.versions.push((a, rec.version));
                    self.best = Some((rec, plain));
                }
                Err(e) => {
                    // A replica that cannot show a valid copy is no answer.
                    log::warn!("record {}: {a} served version {} that fails authentication: {e}", key.to_hex(), rec.version);
                    self.why = format!("{a}: {e}");
                    return false;
                }
            },
            Ok(f) => self.versions.push((a, f.version())),
            Err(e) => {
                self.why = e.to_string();
                return false;
            }
        }
        self.answered += 1;
        true
    }

    /// The newest copy, if newer than `known`; replicas found behind it are brought up
    /// to date in the background (read repair), not at the next write.
    fn finish(self, client: &RecordClient, key: Id) -> Option<Record> {
        if let Some((rec, _)) = &self.best {
            let net = &client.stripes.net;
            for (a, v) in self.versions.iter().filter(|(_, v)| *v < rec.version) {
                let (net, a, rec) = (net.clone(), a.clone(), rec.clone());
                log::debug!("record {}: repairing {a} from version {v}", key.to_hex());
                tokio::spawn(async move {
                    let _ = net.put_record(&a, key, &rec, false).await;
                });
            }
        }
        self.best.map(|b| b.1)
    }
}

#[derive(Clone)]
pub struct RecordClient {
    pub stripes: StripeClient,
    /// Copies of each record: m + 1, so a record survives what a stripe survives.
    pub replicas: usize,
    /// Seals record data before it leaves (None: stored as given).
    key: Option<Arc<FileKey>>,
}

/// What a sealed record is bound to: its key and version, so that a replica cannot
/// serve one record's bytes as another's, or an old version as a newer one.
fn context(key: Id, version: u64) -> Vec<u8> {
    let mut c = key.to_bytes().to_vec();
    c.extend_from_slice(&version.to_be_bytes());
    c
}

impl RecordClient {
    pub fn new(stripes: StripeClient) -> RecordClient {
        let replicas = stripes.code.m as usize + 1;
        RecordClient { stripes, replicas, key: None }
    }

    /// Encrypts and authenticates every record with `key` (see `crypto::seal`).
    pub fn with_key(mut self, key: Arc<FileKey>) -> RecordClient {
        self.key = Some(key);
        self
    }

    fn seal(&self, key: Id, version: u64, plain: Vec<u8>) -> Vec<u8> {
        match &self.key {
            Some(k) => k.seal(Purpose::Record, &context(key, version), &pad(&plain)),
            None => plain,
        }
    }

    /// The record as the caller wrote it, or why this copy is not to be trusted.
    fn open(&self, key: Id, rec: Record) -> Result<Record, String> {
        let Some(k) = &self.key else { return Ok(rec) };
        if !rec.exists() {
            return Ok(rec);
        }
        let plain = k.open(Purpose::Record, &context(key, rec.version), rec.data).map_err(|e| e.to_string())?;
        Ok(Record { data: unpad(plain)?, ..rec })
    }

    /// The peers that hold `key`, primary first: the first R distinct peers of the ring
    /// walk from the key, as every client sees it. Not filtered by this client's own
    /// failure suspicions: two clients must agree on the primary, so a dead primary is
    /// waited out (retries) until the ring drops it.
    async fn replica_set(&self, key: Id) -> Result<Vec<NetAddr>, MetaError> {
        let set = self
            .stripes
            .peers_for(key, self.replicas)
            .await
            .map_err(|e| MetaError::Unavailable { key: key.to_hex(), why: e.to_string() })?;
        if set.is_empty() {
            return Err(MetaError::Unavailable { key: key.to_hex(), why: "no peer found for it".into() });
        }
        Ok(set)
    }

    /// The replica set for try number `attempt`: retries wait (growing, at most 2 s) and
    /// walk the ring afresh, so a dead peer the ring has since dropped is left out.
    async fn set_for_attempt(&self, key: Id, attempt: usize) -> Result<Vec<NetAddr>, MetaError> {
        if attempt > 0 {
            tokio::time::sleep((BACKOFF * attempt as u32).min(Duration::from_secs(2))).await;
            self.stripes.forget_walks();
        }
        self.replica_set(key).await
    }

    /// The newest copy (version 0 if the record was never written).
    pub async fn get(&self, key: Id) -> Result<Record, MetaError> {
        Ok(self.get_newer(key, 0).await?.unwrap_or_default())
    }

    /// The record if some replica holds a version newer than `known`; None if not.
    pub async fn get_newer(&self, key: Id, known: u64) -> Result<Option<Record>, MetaError> {
        let mut why = String::new();
        for attempt in 0..ATTEMPTS {
            // A walk can fail for a moment (a hop past its deadline on a busy ring): that
            // is one failed attempt, not the end of the read.
            let set = match self.set_for_attempt(key, attempt).await {
                Ok(set) => set,
                Err(e) => {
                    why = e.to_string();
                    continue;
                }
            };
            let net = &self.stripes.net;
            let need = read_quorum(set.len());
            // The primary is asked first, alone, to answer as primary: it has every
            // acknowledged write, and while its arc is settled it can say that its copy
            // is the newest (`RecordStore::get_primary`), which spares a call to a second
            // replica on every read. The other replicas are asked when it cannot say so,
            // fails, or has not answered within READ_HEDGE.
            let ask = |a: &NetAddr, as_primary: bool| {
                let a = a.clone();
                let others = &set[1..];
                async move {
                    let r = net.get_record_as(&a, key, known, (as_primary && need > 1).then_some(others)).await;
                    let authoritative = r.as_ref().is_ok_and(|x| x.1);
                    (a, r.map(|x| x.0), authoritative)
                }
            };
            let mut pending: FuturesUnordered<_> = std::iter::once(ask(&set[0], true)).collect();
            let mut unasked = set.iter().skip(1);
            let hedge = tokio::time::sleep(READ_HEDGE);
            tokio::pin!(hedge);
            let mut hedged = false;
            let mut g = Gathered::new(known);
            loop {
                let (a, r, authoritative) = tokio::select! {
                    next = pending.next() => match next {
                        Some(x) => x,
                        None => break,
                    },
                    _ = &mut hedge, if !hedged => {
                        hedged = true;
                        pending.extend(unasked.by_ref().map(|a| ask(a, false)));
                        continue;
                    }
                };
                let counted = g.take(self, key, a, r);
                if g.answered >= need || (counted && authoritative) {
                    break;
                }
                // Short of a quorum: ask as many more as it still takes.
                let short = need - g.answered;
                if pending.len() < short {
                    let more = short - pending.len();
                    pending.extend(unasked.by_ref().take(more).map(|a| ask(a, false)));
                }
            }
            if g.answered == 0 {
                why = g.why;
                continue;
            }
            return Ok(g.finish(self, key));
        }
        Err(MetaError::Unavailable { key: key.to_hex(), why })
    }

    /// Many records at once, as one call per peer rather than one per record: what a
    /// listing's prefetch costs the ring. Only each record's primary is asked: it holds
    /// every acknowledged write, and what this fills is the attribute cache, whose
    /// copies may be ATTR_TTL old anyway (an open still reads with `get_newer`); asking
    /// a second replica doubled the calls of every listing. A record whose primary
    /// failed or left it out is read alone, with `get_newer`.
    pub async fn get_newer_many(&self, keys: &[(Id, u64)]) -> Vec<Result<Option<Record>, MetaError>> {
        // A few walks at a time: with a cold walk cache each may be a lookup, and one
        // answer places a whole arc of keys for the rest.
        let walks: Vec<_> = keys.iter().map(|(k, _)| self.replica_set(*k)).collect();
        let sets: Vec<_> = futures_util::stream::iter(walks).buffered(WALKS_PARALLEL).collect().await;
        let mut need = vec![0; keys.len()];
        let mut by_peer: HashMap<NetAddr, Vec<usize>> = HashMap::new();
        for (i, set) in sets.iter().enumerate() {
            if let Ok(set) = set {
                need[i] = 1;
                by_peer.entry(set[0].clone()).or_default().push(i);
            }
        }
        let net = &self.stripes.net;
        let answers = join_all(by_peer.into_iter().map(|(a, idx)| async move {
            let asked: Vec<(Id, u64)> = idx.iter().map(|&i| keys[i]).collect();
            let r = net.get_records(&a, &asked).await;
            (a, idx, r)
        }))
        .await;
        let mut gathered: Vec<Gathered> = keys.iter().map(|(_, known)| Gathered::new(*known)).collect();
        for (a, idx, r) in answers {
            match r {
                Ok(list) => {
                    for (i, f) in idx.into_iter().zip(list) {
                        if let Some(f) = f {
                            gathered[i].take(self, keys[i].0, a.clone(), Ok(f));
                        }
                    }
                }
                Err(e) => log::debug!("batched record read at {a} failed: {e}"),
            }
        }
        let need = &need;
        futures_util::stream::iter(gathered.into_iter().enumerate())
            .map(|(i, g)| async move {
                let (key, known) = keys[i];
                if need[i] > 0 && g.answered >= need[i] {
                    Ok(g.finish(self, key))
                } else {
                    self.get_newer(key, known).await
                }
            })
            .buffered(FALLBACK_PARALLEL)
            .collect()
            .await
    }

    /// Writes `rec` durably on every replica that holds it or an older version.
    pub async fn put_durable(&self, key: Id, rec: &Record) -> Result<(), MetaError> {
        let set = self.replica_set(key).await?;
        let net = &self.stripes.net;
        let sealed = if rec.exists() { Record { data: self.seal(key, rec.version, rec.data.clone()), ..rec.clone() } } else { rec.clone() };
        let results = join_all(set.iter().map(|a| net.put_record(a, key, &sealed, true))).await;
        if results.iter().all(|r| r.is_err()) {
            return Err(MetaError::Unavailable { key: key.to_hex(), why: "no replica took the sync".into() });
        }
        Ok(())
    }

    /// Writes `data` (None: a tombstone) as version `expected + 1` if the record is still
    /// at `expected`. On return every replica holds it in memory (visible to all
    /// readers, safe from a peer process crash) and on disk within a second; with
    /// `durable`, on every replica's disk already.
    pub async fn cas(&self, key: Id, expected: u64, data: Option<Vec<u8>>) -> Result<Swap, MetaError> {
        self.cas_with(key, expected, data, false).await
    }

    pub async fn cas_with(&self, key: Id, expected: u64, data: Option<Vec<u8>>, durable: bool) -> Result<Swap, MetaError> {
        let deleted = data.is_none();
        // Sealed once: a retry sends the same bytes, so it can recognise its own write.
        let data = match data {
            Some(d) => self.seal(key, expected + 1, d),
            None => Vec::new(),
        };
        let mut why = String::new();
        let mut tried = false;
        let mut refusals = 0;
        for attempt in 0..ATTEMPTS {
            // A walk can fail for a moment (a hop past its deadline on a busy ring): that
            // is one failed attempt, not the end of the read.
            let set = match self.set_for_attempt(key, attempt).await {
                Ok(set) => set,
                Err(e) => {
                    why = e.to_string();
                    continue;
                }
            };
            let net = &self.stripes.net;
            let insist = refusals >= INSIST_AFTER;
            let r = net.cas_record(&set[0], key, expected, deleted, data.clone(), &set[1..], durable, insist).await;
            match r {
                Ok(CasOutcome::Done(v)) => return Ok(Swap::Done(v)),
                Ok(CasOutcome::Conflict(cur)) => {
                    if cur.version == 0 && expected > 0 {
                        log::warn!("record {}: primary {} of {set:?} has never seen it (we expected version {expected})", key.to_hex(), set[0]);
                    }
                    // A retry may find the write an earlier attempt left behind, ours or
                    // the transport's (the direct lane repeats an exchange whose reused
                    // connection failed before the answer). Sealed bytes name their writer
                    // (a fresh salt each); a tombstone or unsealed bytes name nobody, so
                    // only our own retry may claim those.
                    let ours_alone = !deleted && self.key.is_some();
                    if (tried || ours_alone) && cur.version == expected + 1 && cur.deleted == deleted && cur.data == data {
                        return Ok(Swap::Done(cur.version));
                    }
                    match self.open(key, cur) {
                        Ok(cur) => return Ok(Swap::Conflict(cur)),
                        Err(e) => {
                            log::warn!("record {}: primary {} answered with a copy that fails authentication: {e}", key.to_hex(), set[0]);
                            why = format!("{}: {e}", set[0]);
                            tried = true;
                        }
                    }
                }
                Ok(CasOutcome::Partial { failed, .. }) => {
                    log::info!("record {}: CAS at {} missed replicas {failed:?}; retrying", key.to_hex(), set[0]);
                    tried = true;
                    why = format!("replicas {failed:?} did not take the write");
                    for a in &failed {
                        net.suspect(a);
                    }
                }
                Err(NetError::Refused(m)) if m.contains("disk image full") => return Err(MetaError::Full(m)),
                Err(NetError::Refused(m)) if m.contains("does not own record") => {
                    // Our walk and the peer's view disagree (one is behind): walk again.
                    log::debug!("{m}; walking the ring again");
                    refusals += 1;
                    why = m;
                }
                Err(e) => {
                    log::info!("record {}: CAS at {} failed: {e}; retrying", key.to_hex(), set[0]);
                    tried = true;
                    why = e.to_string();
                    net.suspect(&set[0]);
                }
            }
        }
        Err(MetaError::Unavailable { key: key.to_hex(), why })
    }
}
