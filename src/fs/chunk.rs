//! File content on the ring: a file is cut into chunks, each sealed with the mount's
//! file key (`crypto::seal`: a random 16-byte header, AES-256-GCM ciphertext, tag) and
//! stored as one erasure-coded stripe. The random header also makes two writes of equal
//! bytes different stripes: each stripe has exactly one inode referring to it and can
//! be reclaimed when that reference goes.

use super::error::{FsError, FsResult};
use crate::erasure::client::{Opener, StripeClient};
use crate::erasure::stripe::SHARD_BYTES;
use crate::ring::Id;
use parking_lot::Mutex;
use crate::crypto::seal::{FileKey, Purpose, HEADER, OVERHEAD};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bytes of file per chunk for a code with `k` data shards: a stripe's worth, less room
/// for the seal's header and tag (and slack).
pub fn chunk_bytes_for(k: u8) -> usize {
    k as usize * SHARD_BYTES - 64
}

pub type ChunkData = Arc<Vec<u8>>;
type Slot = Arc<tokio::sync::OnceCell<ChunkData>>;

/// Recently read chunks by stripe key (a key's content never changes), shared by all
/// open files; bounded in count.
pub struct ChunkCache {
    slots: Mutex<(HashMap<Id, Slot>, VecDeque<Id>)>,
    cap: usize,
    key: Arc<FileKey>,
}

impl ChunkCache {
    pub fn new(cap: usize, key: Arc<FileKey>) -> ChunkCache {
        ChunkCache { slots: Mutex::new((HashMap::new(), VecDeque::new())), cap, key }
    }

    /// What is stored for a chunk of these bytes, with spare capacity for the stripe
    /// writer's zero padding (`codec::pad_room`: no reallocation and copy of 4 MiB there).
    pub fn seal(&self, data: &[u8]) -> Vec<u8> {
        self.key.seal_with_room(Purpose::Chunk, b"", data, crate::erasure::codec::pad_room(crate::erasure::MAX_SHARDS))
    }

    fn slot(&self, key: Id) -> Slot {
        let mut g = self.slots.lock();
        let (map, order) = &mut *g;
        if let Some(s) = map.get(&key) {
            return s.clone();
        }
        let s: Slot = Arc::new(tokio::sync::OnceCell::new());
        map.insert(key, s.clone());
        order.push_back(key);
        while order.len() > self.cap {
            if let Some(old) = order.pop_front() {
                map.remove(&old);
            }
        }
        s
    }

    pub fn insert(&self, key: Id, data: ChunkData) {
        let _ = self.slot(key).set(data);
    }

    /// The chunk's bytes, read from the ring once however many ask at the same time.
    pub async fn get(&self, client: &StripeClient, c: ChunkRef) -> FsResult<ChunkData> {
        let slot = self.slot(c.key);
        let r = slot
            .get_or_try_init(|| async {
                let stripe_len = c.len + OVERHEAD;
                let Some(seal) = c.seal else {
                    let stripe = client.read_stripe(c.key, Some(stripe_len)).await?;
                    let key = self.key.clone();
                    let plain = tokio::task::spawn_blocking(move || unseal_with(&key, stripe, c.len)).await.map_err(|e| FsError::Io(format!("unseal task failed: {e}")))??;
                    return Ok::<_, FsError>(Arc::new(plain));
                };
                // The seal header is random per chunk and authenticated by the GCM tag, so
                // bytes that open under the header the inode names are exactly the chunk
                // that was written: no need to hash the stripe against its key too.
                let key = self.key.clone();
                let open: Opener<Vec<u8>> = Arc::new(move |b: Vec<u8>| {
                    if b.len() != stripe_len || b[..HEADER] != seal {
                        return None;
                    }
                    key.open(Purpose::Chunk, b"", b).ok()
                });
                Ok(Arc::new(client.read_stripe_opened(c.key, Some(stripe_len), open).await?))
            })
            .await
            .cloned();
        if r.is_err() {
            // Do not keep a failed slot around: the next read tries again.
            let mut g = self.slots.lock();
            g.0.remove(&c.key);
        }
        r
    }
}

/// Deletes stripes that nothing refers to any more, after a delay so that a reader
/// holding an older version of the file can finish.
#[derive(Clone)]
pub struct Reclaimer {
    tx: tokio::sync::mpsc::UnboundedSender<(Instant, Vec<Id>)>,
    pub pending: Arc<std::sync::atomic::AtomicU64>,
}

impl Reclaimer {
    /// Starts the background deleter; it runs until `shutdown` fires, then deletes what
    /// is still queued at once.
    pub fn start(client: StripeClient, delay: Duration, shutdown: tokio::sync::watch::Receiver<bool>) -> (Reclaimer, tokio::task::JoinHandle<()>) {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<Id>)>();
        let pending = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let p2 = pending.clone();
        let task = tokio::spawn(async move {
            let mut shutdown = shutdown;
            // `wait_for`, not `changed`: once seen, a change is not seen again, and a loop
            // that waited on `changed` after shutdown slept out each queued delay and then
            // hung until the mount gave up on it (60 s after every unmount with deletes
            // queued). The error (sender gone) counts as shutdown too.
            loop {
                let item = tokio::select! {
                    biased;
                    _ = shutdown.wait_for(|down| *down) => None,
                    i = rx.recv() => i,
                };
                let Some((due, keys)) = item else { break };
                let wait = (due + delay).saturating_duration_since(Instant::now());
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.wait_for(|down| *down) => {}
                }
                delete_stripes(&client, &keys, &p2).await;
            }
            // Shutting down: what is queued goes now.
            rx.close();
            while let Ok((_, keys)) = rx.try_recv() {
                delete_stripes(&client, &keys, &p2).await;
            }
        });
        (Reclaimer { tx, pending }, task)
    }

    pub fn reclaim(&self, keys: Vec<Id>) {
        let keys: Vec<Id> = keys.into_iter().filter(|k| *k != Id::ZERO).collect();
        if keys.is_empty() {
            return;
        }
        self.pending.fetch_add(keys.len() as u64, std::sync::atomic::Ordering::Relaxed);
        // Queued with the time it was asked for; the task adds the delay.
        let _ = self.tx.send((Instant::now(), keys));
    }
}

/// Stripes whose deletion is planned together: one `Holdings` call per peer covers them.
const DELETE_BATCH: usize = 256;

/// Removes every shard of `stripes` from the peers that hold them (set members and two
/// spares), counting each stripe off `pending` when done. Per batch, each peer gets one
/// `Holdings` call for all the batch's stripes it may hold, then its deletes one after
/// another, peers in parallel: a deleted 1 GiB file was ~3,600 calls one after another.
/// Best effort: a peer that is down keeps its shards, which upkeep reports as garbage.
pub async fn delete_stripes(client: &StripeClient, stripes: &[Id], pending: &std::sync::atomic::AtomicU64) {
    let n = client.code.total() as usize + 2;
    for batch in stripes.chunks(DELETE_BATCH) {
        let mut by_peer: HashMap<crate::rpc::NetAddr, Vec<Id>> = HashMap::new();
        for &s in batch {
            if let Ok(peers) = client.peers_for(s, n).await {
                for p in peers {
                    by_peer.entry(p).or_default().push(s);
                }
            }
        }
        futures_util::future::join_all(by_peer.into_iter().map(|(p, ss)| async move {
            let Ok(masks) = client.net.holdings(&p, &ss).await else { return };
            for (s, mask) in ss.iter().zip(masks) {
                for i in (0..64u8).filter(|i| mask & (1u64 << i) != 0) {
                    let _ = client.net.delete_shard(&p, *s, i).await;
                }
            }
        }))
        .await;
        pending.fetch_sub(batch.len() as u64, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A chunk's bytes from its stripe, which must be exactly a sealed `len`-byte chunk.
fn unseal_with(key: &FileKey, stripe: Vec<u8>, len: usize) -> FsResult<Vec<u8>> {
    if stripe.len() != len + OVERHEAD {
        return Err(FsError::Io(format!("chunk stripe of {} bytes is not a sealed {len}-byte chunk", stripe.len())));
    }
    key.open(Purpose::Chunk, b"", stripe).map_err(|e| FsError::Io(format!("chunk: {e}")))
}

pub fn stripe_id(c: &super::inode::Chunk) -> Option<Id> {
    if c.stripe.is_empty() {
        None
    } else {
        Id::from_slice(&c.stripe)
    }
}

/// A stored chunk as a reader needs it: its stripe, its length, and its seal header when
/// the inode names one.
#[derive(Clone, Copy, Debug)]
pub struct ChunkRef {
    pub key: Id,
    pub len: usize,
    pub seal: Option<[u8; HEADER]>,
}

/// The stored chunk `c` refers to; None for a hole.
pub fn chunk_ref(c: &super::inode::Chunk) -> Option<ChunkRef> {
    Some(ChunkRef { key: stripe_id(c)?, len: c.len as usize, seal: c.seal.as_slice().try_into().ok() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_seal_to_ciphertext_and_unseal_only_whole() {
        let key = Arc::new(FileKey::generate().1);
        let cache = ChunkCache::new(2, key.clone());
        let d = b"some bytes".to_vec();
        let s = cache.seal(&d);
        assert_ne!(cache.seal(&d), s, "equal content seals differently");
        assert_eq!(unseal_with(&key, s.clone(), d.len()).unwrap(), d);
        assert!(unseal_with(&key, s.clone(), d.len() + 1).is_err());
        let mut bad = s;
        bad[20] ^= 1;
        assert!(unseal_with(&key, bad, d.len()).is_err());
        assert!(chunk_bytes_for(4) + OVERHEAD <= 4 * SHARD_BYTES);
    }
}
