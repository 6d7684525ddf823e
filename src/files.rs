//! The low-level block path a client uses: a file is cut into blocks, each stored on
//! the peers that own its key, and a manifest block lists them; the manifest's key is
//! the handle. Blocks are content-addressed (key = SHA-1 of the bytes), so every block
//! read is verified against its key and a wrong or corrupt copy is never returned.
//!
//! Placement is the preference list of the key: its owner, then the following distinct
//! peers on the ring. Until erasure coding lands, a block is written to `COPIES` of them.

use crate::ring::driver;
use crate::ring::{Contact, Id};
use crate::rpc::client::GrpcNet;
use crate::rpc::NetAddr;
use std::path::Path;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const BLOCK_BYTES: usize = 1 << 20;
pub const COPIES: usize = 2;
const MANIFEST_MAGIC: &[u8; 8] = b"MSMANIF1";
const META_DATA: u8 = 1;
const META_MANIFEST: u8 = 2;
/// Blocks in flight at once during put/get.
const PARALLEL_BLOCKS: usize = 8;
/// Largest manifest we accept (a 16 MiB block of 20-byte keys).
const MAX_MANIFEST_KEYS: usize = (crate::blockstore::MAX_DATA_BYTES - 24) / 20;

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{0}")]
    Io(String),
    #[error("lookup failed: {0}")]
    Lookup(String),
    #[error("could not store block {key} on any peer: {why}")]
    StoreFailed { key: String, why: String },
    #[error("block {key} is unavailable: {why}")]
    Unavailable { key: String, why: String },
    #[error("bad handle: {0}")]
    BadHandle(String),
}

#[derive(Clone)]
pub struct BlockClient {
    pub net: Arc<GrpcNet>,
    pub start: Vec<NetAddr>,
}

/// The first `n` distinct peers of a lookup answer: the owner, then successors.
pub fn preference_list(owner: &Contact<NetAddr>, successors: &[Contact<NetAddr>], n: usize) -> Vec<NetAddr> {
    let mut out: Vec<NetAddr> = Vec::with_capacity(n);
    for c in std::iter::once(owner).chain(successors.iter()) {
        if !out.contains(&c.addr) {
            out.push(c.addr.clone());
            if out.len() == n {
                break;
            }
        }
    }
    out
}

impl BlockClient {
    pub fn new(start: Vec<NetAddr>) -> Self {
        BlockClient { net: Arc::new(GrpcNet::new()), start }
    }

    async fn placement(&self, key: Id, n: usize) -> Result<Vec<NetAddr>, FileError> {
        let found = driver::lookup_via(&*self.net, self.start.clone(), key).await.map_err(|e| FileError::Lookup(e.to_string()))?;
        Ok(preference_list(&found.owner, &found.successors, n))
    }

    /// Stores a block on up to COPIES peers; succeeds if at least one copy is durable.
    pub async fn put_block(&self, key: Id, kind: u8, data: Vec<u8>) -> Result<usize, FileError> {
        let targets = self.placement(key, COPIES).await?;
        let mut ok = 0;
        let mut why = String::from("no peers");
        for t in targets {
            match self.net.put_block(&t, key, vec![kind], data.clone()).await {
                Ok(()) => ok += 1,
                Err(e) => why = e.to_string(),
            }
        }
        if ok == 0 {
            return Err(FileError::StoreFailed { key: key.to_hex(), why });
        }
        Ok(ok)
    }

    /// Reads a block from the first peer of its preference list that has a copy whose
    /// SHA-1 matches the key.
    pub async fn get_block(&self, key: Id) -> Result<(u8, Vec<u8>), FileError> {
        let targets = self.placement(key, COPIES + 2).await?;
        let mut why = String::from("no peer holds it");
        for t in targets {
            match self.net.get_block(&t, key).await {
                Ok(Some(b)) => {
                    if Id::sha1(&b.data) == key && b.meta.len() == 1 {
                        return Ok((b.meta[0], b.data));
                    }
                    why = format!("{t} returned a copy that fails its checksum");
                    log::warn!("{why} (block {})", key.to_hex());
                }
                Ok(None) => {}
                Err(e) => why = e.to_string(),
            }
        }
        Err(FileError::Unavailable { key: key.to_hex(), why })
    }

    /// Stores a file; returns its handle.
    pub async fn put_file(&self, path: &Path) -> Result<Id, FileError> {
        let mut f = tokio::fs::File::open(path).await.map_err(|e| FileError::Io(format!("{}: {e}", path.display())))?;
        let mut keys: Vec<Id> = Vec::new();
        let mut size: u64 = 0;
        let mut tasks: tokio::task::JoinSet<Result<usize, FileError>> = tokio::task::JoinSet::new();
        loop {
            let mut buf = vec![0u8; BLOCK_BYTES];
            let mut filled = 0;
            while filled < BLOCK_BYTES {
                let n = f.read(&mut buf[filled..]).await.map_err(|e| FileError::Io(format!("{}: {e}", path.display())))?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            if filled == 0 {
                break;
            }
            buf.truncate(filled);
            size += filled as u64;
            let key = Id::sha1(&buf);
            keys.push(key);
            while tasks.len() >= PARALLEL_BLOCKS {
                join_one(&mut tasks).await?;
            }
            let me = self.clone();
            tasks.spawn(async move { me.put_block(key, META_DATA, buf).await });
            if filled < BLOCK_BYTES {
                break;
            }
        }
        while !tasks.is_empty() {
            join_one(&mut tasks).await?;
        }
        let manifest = encode_manifest(size, &keys);
        let handle = Id::sha1(&manifest);
        self.put_block(handle, META_MANIFEST, manifest).await?;
        Ok(handle)
    }

    /// Fetches the file behind `handle` into `out` (written to a temporary file, then renamed).
    pub async fn get_file(&self, handle: Id, out: &Path) -> Result<u64, FileError> {
        let (kind, manifest) = self.get_block(handle).await?;
        if kind != META_MANIFEST {
            return Err(FileError::BadHandle(format!("{} names a data block, not a file", handle.to_hex())));
        }
        let (size, keys) = decode_manifest(&manifest).map_err(FileError::BadHandle)?;
        let tmp = out.with_extension(format!("part-{}", std::process::id()));
        let mut f = tokio::fs::File::create(&tmp).await.map_err(|e| FileError::Io(format!("{}: {e}", tmp.display())))?;
        let mut written: u64 = 0;
        for chunk in keys.chunks(PARALLEL_BLOCKS) {
            let mut set = tokio::task::JoinSet::new();
            for (i, k) in chunk.iter().enumerate() {
                let me = self.clone();
                let k = *k;
                set.spawn(async move { (i, me.get_block(k).await) });
            }
            let mut got: Vec<Option<Vec<u8>>> = vec![None; chunk.len()];
            while let Some(r) = set.join_next().await {
                let (i, res) = r.map_err(|e| FileError::Io(format!("task failed: {e}")))?;
                let (_, data) = res?;
                got[i] = Some(data);
            }
            for d in got.into_iter().flatten() {
                written += d.len() as u64;
                f.write_all(&d).await.map_err(|e| FileError::Io(format!("{}: {e}", tmp.display())))?;
            }
        }
        if written != size {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(FileError::BadHandle(format!("manifest says {size} bytes but blocks hold {written}")));
        }
        f.sync_all().await.map_err(|e| FileError::Io(e.to_string()))?;
        tokio::fs::rename(&tmp, out).await.map_err(|e| FileError::Io(format!("{}: {e}", out.display())))?;
        Ok(size)
    }
}

async fn join_one(tasks: &mut tokio::task::JoinSet<Result<usize, FileError>>) -> Result<(), FileError> {
    match tasks.join_next().await {
        Some(Ok(r)) => r.map(|_| ()),
        Some(Err(e)) => Err(FileError::Io(format!("task failed: {e}"))),
        None => Ok(()),
    }
}

pub fn encode_manifest(size: u64, keys: &[Id]) -> Vec<u8> {
    let mut m = Vec::with_capacity(20 + 20 * keys.len());
    m.extend_from_slice(MANIFEST_MAGIC);
    m.extend_from_slice(&size.to_be_bytes());
    m.extend_from_slice(&(keys.len() as u32).to_be_bytes());
    for k in keys {
        m.extend_from_slice(&k.to_bytes());
    }
    m
}

pub fn decode_manifest(m: &[u8]) -> Result<(u64, Vec<Id>), String> {
    if m.len() < 20 || &m[..8] != MANIFEST_MAGIC {
        return Err("not a manifest".into());
    }
    let size = u64::from_be_bytes(m[8..16].try_into().map_err(|_| "short manifest")?);
    let n = u32::from_be_bytes(m[16..20].try_into().map_err(|_| "short manifest")?) as usize;
    if n > MAX_MANIFEST_KEYS || m.len() != 20 + 20 * n {
        return Err(format!("manifest of {} bytes cannot hold {n} keys", m.len()));
    }
    if size > (n as u64) * BLOCK_BYTES as u64 || (n > 0 && size <= (n as u64 - 1) * BLOCK_BYTES as u64) {
        return Err(format!("manifest size {size} does not fit {n} blocks"));
    }
    let keys = m[20..].chunks(20).map(|c| Id::from_slice(c).ok_or("bad key")).collect::<Result<Vec<_>, _>>()?;
    Ok((size, keys))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_roundtrip_and_rejects_garbage() {
        let keys = vec![Id::sha1(b"a"), Id::sha1(b"b")];
        let m = encode_manifest(BLOCK_BYTES as u64 + 1, &keys);
        assert_eq!(decode_manifest(&m).unwrap(), (BLOCK_BYTES as u64 + 1, keys));
        assert!(decode_manifest(&m[..m.len() - 1]).is_err());
        assert!(decode_manifest(b"garbage").is_err());
        assert!(decode_manifest(&encode_manifest(5 * BLOCK_BYTES as u64, &[Id::ZERO])).is_err());
        assert_eq!(decode_manifest(&encode_manifest(0, &[])).unwrap(), (0, vec![]));
    }

    #[test]
    fn preference_list_skips_repeated_peers() {
        let c = |i: u8, a: &str| Contact { id: Id::sha1(&[i]), addr: NetAddr::from(a) };
        let l = preference_list(&c(0, "a:1"), &[c(1, "a:1"), c(2, "b:1"), c(3, "b:1"), c(4, "c:1")], 3);
        assert_eq!(l, vec![NetAddr::from("a:1"), NetAddr::from("b:1"), NetAddr::from("c:1")]);
    }
}
