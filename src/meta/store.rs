//! The peer's side of records: reads and writes against its disk image, and the
//! primary's compare-and-swap, which consults and updates the other replicas.

use super::{decode_meta, encode_meta, CasOutcome, Fetched, Record};
use crate::blockstore::{DiskImage, StoreError};
use crate::ring::{Id, Node};
use crate::rpc::client::GrpcNet;
use crate::rpc::NetAddr;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A primary's compare-and-swaps on one key are serialised by one of these locks (keys
/// hash onto them), held across its calls to the replicas.
const LOCKS: usize = 64;
/// How long a primary trusts that the replicas hold nothing newer than what it last
/// wrote or read from them. Only a change of primary (a join or failure next to the
/// key) can make that untrue, and the ring takes longer than this to settle one.
const AUTHORITY: Duration = Duration::from_millis(1000);
/// How recently both ring neighbours must have confirmed a primary's view of its arc
/// for it to answer a read alone (`Node::authority`): shorter than the time another
/// peer needs to take the arc over (it must first find this one silent for a whole
/// `RING_CALL_TIMEOUT`), longer than the 1 s between maintenance rounds.
const READ_AUTHORITY_WINDOW: Duration = Duration::from_millis(crate::rpc::RING_CALL_TIMEOUT.as_millis() as u64 * 3 / 4);
/// How long a primary's check of the replicas for a read may take before it answers
/// without authority (the reader then asks them itself).
const CONSULT_WAIT: Duration = Duration::from_millis(500);
/// Keys whose authority a primary remembers; past this the map is emptied (reads then
/// check the replicas again, once).
const AUTHORITY_MAX: usize = 200_000;

/// How long a CAS waits for the last replicas once enough have answered.
const STRAGGLER_WAIT: Duration = Duration::from_millis(100);
/// Lazy record writes reach the disk within this long (group commit).
pub const SYNC_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("block {0} is not a record")]
    NotARecord(String),
    #[error("disk task failed: {0}")]
    Task(String),
    /// Asked to act as primary for a key that another peer owns by this peer's view: the
    /// writer's view of the ring is behind, or the ring is settling. The writer walks
    /// again; two primaries for one key could otherwise accept conflicting writes.
    #[error("{me} does not own record {key}")]
    NotOwner { me: String, key: String },
}

pub struct RecordStore {
    node: Arc<Mutex<Node<NetAddr>>>,
    store: Arc<DiskImage>,
    net: Arc<GrpcNet>,
    me: NetAddr,
    locks: Vec<tokio::sync::Mutex<()>>,
    /// Each local read-compare-write of a copy holds one of these, and nothing else:
    /// never across a network call. A replica's put must not wait for the CAS lock: two
    /// primaries each holding a CAS lock while putting to the other's replica whose key
    /// hashes onto the same lock would wait on each other until the call timed out (this
    /// cost 2-13 s stalls on a 3-peer ring with many records in flight).
    write_locks: Arc<Vec<Mutex<()>>>,
    /// Keys this peer wrote or checked as primary: the version then, when, and the
    /// owning vnode's epoch if it held authority for the key then (`Node::authority`).
    authority: Mutex<HashMap<Id, Vouched>>,
    started: Instant,
}

#[derive(Clone, Copy)]
struct Vouched {
    version: u64,
    at: Instant,
    epoch: Option<(Id, u64)>,
}

/// A primary's answer to a read: the copy, and whether it is the newest there is (the
/// primary vouched for it, or checked the replicas just now).
pub struct PrimaryRead {
    pub fetched: Fetched,
    pub authoritative: bool,
}

impl RecordStore {
    pub fn new(node: Arc<Mutex<Node<NetAddr>>>, store: Arc<DiskImage>, net: Arc<GrpcNet>, me: NetAddr, started: Instant) -> RecordStore {
        RecordStore {
            node,
            store,
            net,
            me,
            locks: (0..LOCKS).map(|_| tokio::sync::Mutex::new(())).collect(),
            write_locks: Arc::new((0..LOCKS).map(|_| Mutex::new(())).collect()),
            authority: Mutex::new(HashMap::new()),
            started,
        }
    }

    /// The owning vnode and its epoch if this peer may answer for `key` alone now.
    fn epoch(&self, key: Id) -> Option<(Id, u64)> {
        let now_ms = self.started.elapsed().as_millis() as u64;
        self.node.lock().authority(key, now_ms, READ_AUTHORITY_WINDOW.as_millis() as u64)
    }

    /// Records that this peer, as primary, knows `version` is the newest of `key`;
    /// `epoch0` is what `epoch` said before the write or check began: authority is kept
    /// only if it held throughout.
    fn vouch(&self, key: Id, version: u64, epoch0: Option<(Id, u64)>) {
        let epoch = self.epoch(key).filter(|e| Some(*e) == epoch0);
        let mut a = self.authority.lock();
        if a.len() >= AUTHORITY_MAX {
            a.clear();
        }
        a.insert(key, Vouched { version, at: Instant::now(), epoch });
    }

    /// Whether `version` is vouched for and the arc it was vouched under still holds.
    fn authoritative(&self, key: Id, version: u64) -> bool {
        let Some(v) = self.authority.lock().get(&key).copied() else { return false };
        v.version == version && v.epoch.is_some() && v.epoch == self.epoch(key)
    }

    /// Whether this primary may skip asking the replicas: it wrote or checked this very
    /// version lately, and it owns the key by its own view of the ring. A peer that is
    /// primary only in some writer's (outdated) view always asks, so two writers with
    /// different views cannot both skip the check that would show them each other.
    fn vouched(&self, key: Id, version: u64) -> bool {
        self.authority.lock().get(&key).is_some_and(|v| v.version == version && v.at.elapsed() < AUTHORITY) && self.node.lock().owner_of(key).as_ref() == Some(&self.me)
    }

    /// Puts lazy writes on disk (run every SYNC_EVERY by the peer).
    pub async fn sync(&self) -> Result<(), RecordError> {
        self.disk(|s| Ok(s.sync_now()?)).await
    }

    fn lock_for(&self, key: Id) -> &tokio::sync::Mutex<()> {
        &self.locks[lock_index(key)]
    }

    async fn disk<T: Send + 'static>(&self, f: impl FnOnce(&DiskImage) -> Result<T, RecordError> + Send + 'static) -> Result<T, RecordError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&store)).await.map_err(|e| RecordError::Task(e.to_string()))?
    }

    /// The local copy (version 0 if none). Read in place, not on the blocking pool:
    /// a record is a few KiB, normally in the page cache, and read in microseconds,
    /// while the hop to a pool thread and back costs two thread switches — the largest
    /// cost of a record call on a small machine (perf: a quarter of the peers' time went
    /// to switching threads during a run of small-file creates).
    pub async fn local(&self, key: Id) -> Result<Record, RecordError> {
        read_local(&self.store, key)
    }

    pub async fn get(&self, key: Id, known_version: u64) -> Result<Fetched, RecordError> {
        Ok(fetched(self.local(key).await?, known_version))
    }

    /// A read that asks this peer to answer as the key's primary. It answers alone when
    /// it vouched for its copy under the arc it still owns (every write since went
    /// through it); otherwise, if it owns the key, it checks `replicas` as a reader
    /// would (its copy and enough of theirs make a read quorum), and vouches for what it
    /// found. Not the owner, or the check fell short: the copy without authority, and
    /// the reader asks the replicas itself.
    pub async fn get_primary(&self, key: Id, known: u64, replicas: Vec<NetAddr>) -> Result<PrimaryRead, RecordError> {
        let local = self.local(key).await?;
        if self.authoritative(key, local.version) {
            return Ok(PrimaryRead { fetched: fetched(local, known), authoritative: true });
        }
        let epoch0 = self.epoch(key);
        let replicas: Vec<NetAddr> = replicas.into_iter().filter(|a| *a != self.me).collect();
        if epoch0.is_none() || replicas.is_empty() {
            return Ok(PrimaryRead { fetched: fetched(local, known), authoritative: false });
        }
        // As a CAS does: no write of this key lands here while we look.
        let _g = self.lock_for(key).lock().await;
        let current = self.local(key).await?;
        // This copy and the answers make a read quorum once they are `quorum` in all.
        let quorum = super::read_quorum(replicas.len() + 1);
        let (current, copies) = self.consult(key, &replicas, current, Some(quorum)).await;
        if copies < quorum {
            return Ok(PrimaryRead { fetched: fetched(current, known), authoritative: false });
        }
        self.vouch(key, current.version, epoch0);
        Ok(PrimaryRead { fetched: fetched(current, known), authoritative: true })
    }

    /// Asks `replicas` for their copies of `key` and returns the newest of theirs and
    /// `current` (ours), with how many copies that is, ours included; our own copy is
    /// brought up to date. Waits for every answer (each call has its deadline), or with
    /// `enough`, only until that many copies are in, for at most CONSULT_WAIT.
    async fn consult(&self, key: Id, replicas: &[NetAddr], mut current: Record, enough: Option<usize>) -> (Record, usize) {
        use futures_util::StreamExt;
        let held = current.version;
        let mut asks: futures_util::stream::FuturesUnordered<_> = replicas
            .iter()
            .map(|a| {
                let net = self.net.clone();
                let a = a.clone();
                async move { net.get_record(&a, key, held).await }
            })
            .collect();
        let mut copies = 1;
        let gather = async {
            while enough.is_none_or(|n| copies < n) {
                match asks.next().await {
                    None => break,
                    Some(Ok(Fetched::Got(r))) => {
                        copies += 1;
                        if r.version > current.version {
                            current = r;
                        }
                    }
                    Some(Ok(Fetched::Unchanged(_))) => copies += 1,
                    Some(Err(_)) => {}
                }
            }
        };
        if enough.is_some() {
            if tokio::time::timeout(CONSULT_WAIT, gather).await.is_err() {
                copies = 0;
            }
        } else {
            gather.await;
        }
        if current.version > held {
            // Keep our own copy current while we are at it.
            let _ = self.put(key, current.clone(), false).await;
        }
        (current, copies)
    }

    /// Stores `rec` unless this peer already holds that version or a newer one; returns
    /// the version held afterwards.
    pub async fn put(&self, key: Id, rec: Record, durable: bool) -> Result<u64, RecordError> {
        Ok(self.put_new(key, rec, durable).await?.0)
    }

    /// `put`, also saying whether this call wrote `rec` (false: the copy here already
    /// had its version or a newer one).
    async fn put_new(&self, key: Id, rec: Record, durable: bool) -> Result<(u64, bool), RecordError> {
        let locks = self.write_locks.clone();
        let put = move |s: &DiskImage| {
            let _g = locks[lock_index(key)].lock();
            let have = read_local(s, key)?;
            if have.version >= rec.version {
                if durable {
                    s.sync_now()?;
                }
                return Ok((have.version, false));
            }
            let data = if rec.deleted { Vec::new() } else { rec.data };
            let meta = encode_meta(rec.version, rec.deleted);
            if durable {
                s.put(&key.to_bytes(), &meta, &data)?;
            } else {
                s.put_unsynced(&key.to_bytes(), &meta, &data)?;
            }
            Ok((rec.version, true))
        };
        // A lazy write only copies into the page cache: in place, as `local` reads.
        // A durable one waits for the disk, on the blocking pool.
        if durable {
            self.disk(put).await
        } else {
            put(&self.store)
        }
    }

    /// Compare-and-swap as the primary: if the newest version among this peer and
    /// `replicas` is `expected`, writes `expected + 1` everywhere.
    #[allow(clippy::too_many_arguments)]
    pub async fn cas(&self, key: Id, expected: u64, deleted: bool, data: Vec<u8>, replicas: Vec<NetAddr>, durable: bool, insist: bool) -> Result<CasOutcome, RecordError> {
        let replicas: Vec<NetAddr> = replicas.into_iter().filter(|a| *a != self.me).collect();
        if let Some(o) = self.node.lock().owner_of(key).filter(|o| *o != self.me && !insist) {
            return Err(RecordError::NotOwner { me: self.me.to_string(), key: format!("{} (its owner is {o})", key.to_hex()) });
        }
        let _g = self.lock_for(key).lock().await;
        let epoch0 = self.epoch(key);
        let mut current = self.local(key).await?;
        let known = current.version;
        // A write to a record nobody has (a new inode under a fresh random number) has
        // nobody to be behind; the replicas would say so if they held something.
        let fresh = expected == 0 && known == 0;
        if !fresh && !self.vouched(key, known) {
            // A replica may be ahead of us: we may have just become primary, or have
            // been away while another primary wrote.
            current = self.consult(key, &replicas, current, None).await.0;
            self.vouch(key, current.version, epoch0);
        }
        if current.version != expected {
            return Ok(CasOutcome::Conflict(current));
        }
        let rec = Record { version: expected + 1, deleted, data: if deleted { Vec::new() } else { data } };
        let (tx, mut rx) = tokio::sync::mpsc::channel(replicas.len().max(1));
        for a in &replicas {
            let (net, a, rec, tx) = (self.net.clone(), a.clone(), rec.clone(), tx.clone());
            tokio::spawn(async move {
                let r = net.put_record(&a, key, &rec, durable).await;
                let _ = tx.send((a, r)).await;
            });
        }
        drop(tx);
        if !self.put_new(key, rec.clone(), durable).await?.1 {
            // Another primary's write of this key reached our copy since we read it (a
            // replica's put does not wait for our CAS lock): ours lost the race, as a
            // CAS at a stale version. The writer retries on the newer record, and its
            // write brings any replica that took ours back in line.
            self.authority.lock().remove(&key);
            return Ok(CasOutcome::Conflict(self.local(key).await?));
        }
        // Acknowledged once all but one of the copies are written (all of them when
        // there are only two), so one slow or dead replica costs a write nothing; it
        // catches up by read repair or the next write.
        let copies = replicas.len() + 1;
        let need = if copies >= 3 { copies - 2 } else { copies - 1 };
        let (mut ok, mut ahead, mut failed) = (0usize, false, Vec::new());
        let mut until: Option<tokio::time::Instant> = None;
        loop {
            let next = match until {
                None => rx.recv().await,
                Some(t) => match tokio::time::timeout_at(t, rx.recv()).await {
                    Ok(n) => n,
                    Err(_) => break,
                },
            };
            let Some((a, r)) = next else { break };
            match r {
                Ok(v) if v == rec.version => ok += 1,
                Ok(v) => {
                    // Ahead of us: another primary wrote. The writer's retry consults
                    // the replicas and sees it.
                    log::warn!("record {}: replica {a} holds version {v}, newer than {}", key.to_hex(), rec.version);
                    ahead = true;
                    failed.push(a);
                }
                Err(e) => {
                    log::info!("record {}: replica {a} failed: {e}", key.to_hex());
                    failed.push(a);
                }
            }
            if ok >= need && until.is_none() {
                until = Some(tokio::time::Instant::now() + STRAGGLER_WAIT);
            }
        }
        if ahead || ok < need {
            self.authority.lock().remove(&key);
            return Ok(CasOutcome::Partial { version: rec.version, failed });
        }
        self.vouch(key, rec.version, epoch0);
        Ok(CasOutcome::Done(rec.version))
    }
}

/// A copy as an answer to a reader who holds `known` (0: none).
fn fetched(r: Record, known: u64) -> Fetched {
    if known > 0 && r.version == known {
        return Fetched::Unchanged(known);
    }
    Fetched::Got(r)
}

fn lock_index(key: Id) -> usize {
    key.to_bytes()[19] as usize % LOCKS
}

fn read_local(s: &DiskImage, key: Id) -> Result<Record, RecordError> {
    let Some(b) = s.get_cached(&key.to_bytes())? else { return Ok(Record::default()) };
    let (version, deleted) = decode_meta(&b.meta).ok_or_else(|| RecordError::NotARecord(key.to_hex()))?;
    Ok(Record { version, deleted, data: if deleted { Vec::new() } else { b.data } })
}
