//! The peer's side of records: reads and writes against its disk image, and the
//! primary's compare-and-swap, which consults and updates the other replicas.

use super::{decode_meta, encode_meta, CasOutcome, Fetched, Record};
use crate::blockstore::{DiskImage, StoreError};
use crate::ring::Id;
use crate::rpc::client::GrpcNet;
use crate::rpc::NetAddr;
use futures_util::future::join_all;
use std::sync::Arc;

/// Writes to one key are serialised by one of these locks (keys hash onto them).
const LOCKS: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("block {0} is not a record")]
    NotARecord(String),
    #[error("disk task failed: {0}")]
    Task(String),
}

pub struct RecordStore {
    store: Arc<DiskImage>,
    net: Arc<GrpcNet>,
    me: NetAddr,
    locks: Vec<tokio::sync::Mutex<()>>,
}

impl RecordStore {
    pub fn new(store: Arc<DiskImage>, net: Arc<GrpcNet>, me: NetAddr) -> RecordStore {
        RecordStore { store, net, me, locks: (0..LOCKS).map(|_| tokio::sync::Mutex::new(())).collect() }
    }

    fn lock_for(&self, key: Id) -> &tokio::sync::Mutex<()> {
        &self.locks[key.to_bytes()[19] as usize % LOCKS]
    }

    async fn disk<T: Send + 'static>(&self, f: impl FnOnce(&DiskImage) -> Result<T, RecordError> + Send + 'static) -> Result<T, RecordError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&store)).await.map_err(|e| RecordError::Task(e.to_string()))?
    }

    /// The local copy (version 0 if none).
    pub async fn local(&self, key: Id) -> Result<Record, RecordError> {
        self.disk(move |s| read_local(s, key)).await
    }

    pub async fn get(&self, key: Id, known_version: u64) -> Result<Fetched, RecordError> {
        let r = self.local(key).await?;
        if known_version > 0 && r.version == known_version {
            return Ok(Fetched::Unchanged(known_version));
        }
        Ok(Fetched::Got(r))
    }

    /// Stores `rec` unless this peer already holds that version or a newer one; returns
    /// the version held afterwards.
    pub async fn put(&self, key: Id, rec: Record) -> Result<u64, RecordError> {
        let _g = self.lock_for(key).lock().await;
        self.put_locked(key, rec).await
    }

    async fn put_locked(&self, key: Id, rec: Record) -> Result<u64, RecordError> {
        self.disk(move |s| {
            let have = read_local(s, key)?;
            if have.version >= rec.version {
                return Ok(have.version);
            }
            let data = if rec.deleted { Vec::new() } else { rec.data };
            s.put(&key.to_bytes(), &encode_meta(rec.version, rec.deleted), &data)?;
            Ok(rec.version)
        })
        .await
    }

    /// Compare-and-swap as the primary: if the newest version among this peer and
    /// `replicas` is `expected`, writes `expected + 1` everywhere.
    pub async fn cas(&self, key: Id, expected: u64, deleted: bool, data: Vec<u8>, replicas: Vec<NetAddr>) -> Result<CasOutcome, RecordError> {
        let replicas: Vec<NetAddr> = replicas.into_iter().filter(|a| *a != self.me).collect();
        let _g = self.lock_for(key).lock().await;
        let mut current = self.local(key).await?;
        // A replica may be ahead of us: we may have just become primary, or have been
        // away while another primary wrote.
        let known = current.version;
        let answers = join_all(replicas.iter().map(|a| {
            let net = self.net.clone();
            let a = a.clone();
            async move { net.get_record(&a, key, known).await }
        }))
        .await;
        for f in answers.into_iter().flatten() {
            if let Fetched::Got(r) = f {
                if r.version > current.version {
                    current = r;
                }
            }
        }
        if current.version != expected {
            // Keep our own copy current while we are at it.
            if current.version > known {
                let _ = self.put_locked(key, current.clone()).await;
            }
            return Ok(CasOutcome::Conflict(current));
        }
        let rec = Record { version: expected + 1, deleted, data: if deleted { Vec::new() } else { data } };
        self.put_locked(key, rec.clone()).await?;
        let results = join_all(replicas.iter().map(|a| {
            let net = self.net.clone();
            let a = a.clone();
            let rec = rec.clone();
            async move { net.put_record(&a, key, &rec).await }
        }))
        .await;
        let mut failed = Vec::new();
        for (a, r) in replicas.iter().zip(results) {
            match r {
                Ok(v) if v >= rec.version => {}
                Ok(v) => {
                    log::warn!("record {}: replica {a} kept version {v} over {}", key.to_hex(), rec.version);
                    failed.push(a.clone());
                }
                Err(e) => {
                    log::info!("record {}: replica {a} failed: {e}", key.to_hex());
                    failed.push(a.clone());
                }
            }
        }
        if !failed.is_empty() {
            return Ok(CasOutcome::Partial { version: rec.version, failed });
        }
        Ok(CasOutcome::Done(rec.version))
    }
}

fn read_local(s: &DiskImage, key: Id) -> Result<Record, RecordError> {
    let Some(b) = s.get(&key.to_bytes())? else { return Ok(Record::default()) };
    let (version, deleted) = decode_meta(&b.meta).ok_or_else(|| RecordError::NotARecord(key.to_hex()))?;
    Ok(Record { version, deleted, data: if deleted { Vec::new() } else { b.data } })
}
