//! Whole files on the ring: a file is cut into stripes of k x 1 MiB, each stored
//! erasure-coded (see `erasure`), and a manifest stripe lists them; the manifest's stripe
//! key is the file's handle. Used by `put`/`get` and by the filesystem.
//!
//! Manifest format (big-endian): "MSMANIF2", file size u64, stripe count u32, then per
//! stripe its key (20 bytes) and length (u32). Every stripe named is read with its length
//! and code known, and checked against its key.

use crate::erasure::client::{StripeClient, StripeError};
use crate::erasure::stripe::{MAX_SHARD_BYTES, SHARD_BYTES};
use crate::erasure::Code;
use crate::ring::Id;
use crate::crypto::tls::RingTls;
use crate::rpc::client::GrpcNet;
use crate::rpc::NetAddr;
use std::path::Path;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MANIFEST_MAGIC: &[u8; 8] = b"MSMANIF2";
const MANIFEST_HEADER: usize = 20;
const MANIFEST_ENTRY: usize = 24;
/// Stripes in flight at once during put/get: enough to keep k+m peers busy.
const PARALLEL_STRIPES: usize = 4;
/// Longest stripe any code writes.
const MAX_STRIPE_BYTES: usize = crate::erasure::MAX_SHARDS as usize * MAX_SHARD_BYTES;

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{0}")]
    Io(String),
    #[error(transparent)]
    Stripe(#[from] StripeError),
    #[error("bad handle: {0}")]
    BadHandle(String),
    #[error("file too large: {0}")]
    TooLarge(String),
}

/// One stripe of a file as the manifest names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StripeRef {
    pub key: Id,
    pub len: u32,
}

/// Progress callback: bytes done so far.
pub type Progress = Arc<dyn Fn(u64) + Send + Sync>;

#[derive(Clone)]
pub struct FileClient {
    pub stripes: StripeClient,
}

impl FileClient {
    /// A client for the ring at `start` that writes with the ring's own code.
    pub async fn connect(start: NetAddr, tls: Option<Arc<RingTls>>) -> Result<FileClient, String> {
        let net = Arc::new(GrpcNet::for_client().with_tls(tls));
        let (_, code) = net.hello(&start, "").await.map_err(|e| format!("cannot reach {start}: {e}"))?;
        Ok(FileClient { stripes: StripeClient::new(net, vec![start], code) })
    }

    /// A client that writes with the code the ring can hold now: the ring's, or a
    /// narrower one with the same parity when the ring has fewer than k+m peers.
    pub async fn connect_writer(start: NetAddr, tls: Option<Arc<RingTls>>) -> Result<FileClient, String> {
        let mut c = Self::connect(start, tls).await?;
        // Too few peers even for that is reported by the write itself.
        match c.stripes.effective_code().await {
            Ok(code) => {
                c.stripes.code = code;
                c.stripes.write_quorum = crate::erasure::client::default_quorum(code);
            }
            Err(StripeError::TooFewPeers { .. }) => {}
            Err(e) => return Err(e.to_string()),
        }
        Ok(c)
    }

    pub fn code(&self) -> Code {
        self.stripes.code
    }

    /// Bytes of file data per stripe.
    pub fn stripe_bytes(&self) -> usize {
        self.code().k as usize * SHARD_BYTES
    }

    /// Stores the file at `path`; returns its handle.
    pub async fn put_file(&self, path: &Path, progress: Option<Progress>) -> Result<Id, FileError> {
        let io = |e: std::io::Error| FileError::Io(format!("{}: {e}", path.display()));
        let mut f = tokio::fs::File::open(path).await.map_err(io)?;
        let stripe_bytes = self.stripe_bytes();
        let mut refs: Vec<StripeRef> = Vec::new();
        let mut size: u64 = 0;
        let mut tasks: tokio::task::JoinSet<Result<(usize, StripeRef), FileError>> = tokio::task::JoinSet::new();
        let mut done_bytes = 0u64;
        loop {
            let mut buf = vec![0u8; stripe_bytes];
            let mut filled = 0;
            while filled < stripe_bytes {
                let n = f.read(&mut buf[filled..]).await.map_err(io)?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            if filled == 0 && !refs.is_empty() {
                break;
            }
            buf.truncate(filled);
            size += filled as u64;
            let slot = refs.len();
            refs.push(StripeRef { key: Id::ZERO, len: filled as u32 });
            while tasks.len() >= PARALLEL_STRIPES {
                let (i, r) = join_one(&mut tasks).await?;
                refs[i] = r;
                done_bytes += r.len as u64;
                if let Some(p) = &progress {
                    p(done_bytes);
                }
            }
            let client = self.stripes.clone();
            tasks.spawn(async move {
                let len = buf.len() as u32;
                let key = client.write_stripe(buf).await?;
                Ok((slot, StripeRef { key, len }))
            });
            if filled < stripe_bytes {
                break;
            }
        }
        while !tasks.is_empty() {
            let (i, r) = join_one(&mut tasks).await?;
            refs[i] = r;
            done_bytes += r.len as u64;
            if let Some(p) = &progress {
                p(done_bytes);
            }
        }
        let manifest = encode_manifest(size, &refs);
        if manifest.len() > stripe_bytes {
            return Err(FileError::TooLarge(format!("{size} bytes need a manifest of {} bytes, over one stripe ({stripe_bytes})", manifest.len())));
        }
        Ok(self.stripes.write_stripe(manifest).await?)
    }

    /// Reads the manifest behind a handle.
    pub async fn manifest(&self, handle: Id) -> Result<(u64, Vec<StripeRef>), FileError> {
        let m = self.stripes.read_stripe(handle, None).await?;
        // Stripes may have been written under a wider code than this client writes with.
        decode_manifest(&m, MAX_STRIPE_BYTES).map_err(|e| FileError::BadHandle(format!("{}: {e}", handle.to_hex())))
    }

    /// Fetches the file behind `handle` into `out` (a temporary file, then renamed).
    pub async fn get_file(&self, handle: Id, out: &Path, progress: Option<Progress>) -> Result<u64, FileError> {
        let manifest = self.manifest(handle).await?;
        self.get_manifest(manifest, out, progress).await
    }

    /// Fetches the file a manifest (from `manifest`) describes into `out`.
    pub async fn get_manifest(&self, (size, refs): (u64, Vec<StripeRef>), out: &Path, progress: Option<Progress>) -> Result<u64, FileError> {
        let tmp = out.with_extension(format!("part-{}", std::process::id()));
        let io = |e: std::io::Error| FileError::Io(format!("{}: {e}", tmp.display()));
        let mut f = tokio::fs::File::create(&tmp).await.map_err(io)?;
        let mut written: u64 = 0;
        let result: Result<(), FileError> = async {
            let mut pending = std::collections::VecDeque::new();
            for r in refs {
                let c = self.stripes.clone();
                pending.push_back(tokio::spawn(async move { c.read_stripe(r.key, Some(r.len as usize)).await.map_err(FileError::from) }));
                if pending.len() >= PARALLEL_STRIPES {
                    let d = pending.pop_front().expect("non-empty").await.map_err(|e| FileError::Io(format!("read task: {e}")))??;
                    f.write_all(&d).await.map_err(io)?;
                    written += d.len() as u64;
                    if let Some(p) = &progress {
                        p(written);
                    }
                }
            }
            while let Some(t) = pending.pop_front() {
                let d = t.await.map_err(|e| FileError::Io(format!("read task: {e}")))??;
                f.write_all(&d).await.map_err(io)?;
                written += d.len() as u64;
                if let Some(p) = &progress {
                    p(written);
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
        if written != size {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(FileError::BadHandle(format!("manifest says {size} bytes but its stripes hold {written}")));
        }
        f.sync_all().await.map_err(io)?;
        tokio::fs::rename(&tmp, out).await.map_err(|e| FileError::Io(format!("{}: {e}", out.display())))?;
        Ok(size)
    }
}

async fn join_one(tasks: &mut tokio::task::JoinSet<Result<(usize, StripeRef), FileError>>) -> Result<(usize, StripeRef), FileError> {
    match tasks.join_next().await {
        Some(Ok(r)) => r,
        Some(Err(e)) => Err(FileError::Io(format!("task failed: {e}"))),
        None => Err(FileError::Io("no task to wait for".into())),
    }
}

pub fn encode_manifest(size: u64, stripes: &[StripeRef]) -> Vec<u8> {
    let mut m = Vec::with_capacity(MANIFEST_HEADER + MANIFEST_ENTRY * stripes.len());
    m.extend_from_slice(MANIFEST_MAGIC);
    m.extend_from_slice(&size.to_be_bytes());
    m.extend_from_slice(&(stripes.len() as u32).to_be_bytes());
    for s in stripes {
        m.extend_from_slice(&s.key.to_bytes());
        m.extend_from_slice(&s.len.to_be_bytes());
    }
    m
}

/// Parses a manifest and checks it is self-consistent for stripes of `stripe_bytes`.
pub fn decode_manifest(m: &[u8], stripe_bytes: usize) -> Result<(u64, Vec<StripeRef>), String> {
    if m.len() < MANIFEST_HEADER || &m[..8] != MANIFEST_MAGIC {
        return Err("not a file manifest".into());
    }
    let size = u64::from_be_bytes(m[8..16].try_into().expect("8 bytes"));
    let n = u32::from_be_bytes(m[16..20].try_into().expect("4 bytes")) as usize;
    if m.len() != MANIFEST_HEADER + MANIFEST_ENTRY * n {
        return Err(format!("manifest of {} bytes cannot hold {n} stripes", m.len()));
    }
    let refs: Vec<StripeRef> = m[MANIFEST_HEADER..]
        .chunks(MANIFEST_ENTRY)
        .map(|c| StripeRef { key: Id::from_slice(&c[..20]).expect("20 bytes"), len: u32::from_be_bytes(c[20..24].try_into().expect("4 bytes")) })
        .collect();
    let sum: u64 = refs.iter().map(|r| r.len as u64).sum();
    if sum != size {
        return Err(format!("manifest size {size} does not match its stripes ({sum} bytes)"));
    }
    if let Some(r) = refs.iter().find(|r| r.len as usize > stripe_bytes) {
        return Err(format!("stripe {} of {} bytes is longer than any code allows ({stripe_bytes})", r.key.to_hex(), r.len));
    }
    Ok((size, refs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_roundtrip_and_rejects_garbage() {
        let refs = vec![StripeRef { key: Id::sha1(b"a"), len: 4 << 20 }, StripeRef { key: Id::sha1(b"b"), len: 1 }];
        let size = (4 << 20) + 1;
        let m = encode_manifest(size, &refs);
        assert_eq!(decode_manifest(&m, 4 << 20).unwrap(), (size, refs.clone()));
        assert!(decode_manifest(&m[..m.len() - 1], 4 << 20).is_err());
        assert!(decode_manifest(b"garbage", 4 << 20).is_err());
        assert!(decode_manifest(&m, 2 << 20).is_err(), "a stripe longer than the code allows");
        assert!(decode_manifest(&encode_manifest(size + 1, &refs), 4 << 20).is_err());
        assert_eq!(decode_manifest(&encode_manifest(0, &[]), 4 << 20).unwrap(), (0, vec![]));
    }
}
