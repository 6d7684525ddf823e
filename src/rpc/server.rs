//! The gRPC service a peer runs: ring requests go to the node's pure handlers, block
//! requests to the disk image (on the blocking pool). Each handler validates its input.

use super::convert::*;
use super::fault::Fault;
use super::pb;
use super::pb::peer_server::{Peer, PeerServer};
use super::{NetAddr, MAX_MESSAGE_BYTES, PROTOCOL_VERSION};
use super::{MAX_HOLDINGS_STRIPES, MAX_RECORDS_ANSWER_BYTES, MAX_RECORDS_PER_CALL, MAX_RECORD_REPLICAS};
use crate::blockstore::{DiskImage, StoreError, MAX_DATA_BYTES, MAX_META_BYTES};
use crate::erasure::stripe::{shard_block_key, shard_key_range, ShardMeta};
use crate::erasure::upkeep::{DrainReport, UpkeepReport};
use crate::erasure::Code;
use crate::meta::store::RecordError;
use crate::meta::{CasOutcome, Fetched, Record};
use crate::ring::Id;
use std::sync::atomic::{AtomicBool, Ordering};
use crate::ring::{Node, RingRequest, RingResponse};
use parking_lot::Mutex;
use std::sync::Arc;
use std::time::Instant;
use tonic::{Request, Response, Status};

pub struct PeerState {
    pub node: Arc<Mutex<Node<NetAddr>>>,
    pub store: Arc<DiskImage>,
    pub started: Instant,
    /// The ring's erasure code.
    pub code: Code,
    /// Figures from the last upkeep scan, for status.
    pub upkeep: Mutex<UpkeepReport>,
    /// Set once a drain starts: new shards are refused so that nothing lands behind it.
    pub draining: AtomicBool,
    /// Metadata records held here (and the primary's CAS).
    pub records: crate::meta::store::RecordStore,
    /// Misbehaviour switched on by tests (None in every real peer).
    pub fault: Option<Arc<super::fault::Fault>>,
    /// Where a Drain request is handed to the peer's lifecycle task.
    pub drain_requests: tokio::sync::mpsc::Sender<tokio::sync::oneshot::Sender<DrainReport>>,
}

impl PeerState {
    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }
}

fn record_response(f: Fetched) -> pb::GetRecordResponse {
    match f {
        Fetched::Unchanged(v) => pb::GetRecordResponse { found: true, version: v, unchanged: true, ..Default::default() },
        Fetched::Got(rec) => pb::GetRecordResponse { found: rec.version > 0, version: rec.version, deleted: rec.deleted, data: rec.data, ..Default::default() },
    }
}

pub fn record_status(e: RecordError) -> Status {
    match e {
        RecordError::Store(e) => store_status(e),
        RecordError::NotARecord(_) => Status::failed_precondition(e.to_string()),
        RecordError::Task(_) => Status::internal(e.to_string()),
        RecordError::NotOwner { .. } => Status::failed_precondition(e.to_string()),
    }
}

/// The one mapping from disk-image errors to gRPC codes.
pub fn store_status(e: StoreError) -> Status {
    match e {
        StoreError::Full { .. } => Status::resource_exhausted(e.to_string()),
        StoreError::Corrupt { .. } => Status::data_loss(e.to_string()),
        StoreError::Invalid(_) => Status::invalid_argument(e.to_string()),
        StoreError::BadImage { .. } | StoreError::Io(_) => Status::internal(e.to_string()),
    }
}

#[derive(Clone)]
pub struct PeerService {
    pub state: Arc<PeerState>,
}

impl PeerService {
    pub fn into_server(self) -> PeerServer<PeerService> {
        PeerServer::new(self).max_decoding_message_size(MAX_MESSAGE_BYTES).max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    fn ring(&self, req: RingRequest<NetAddr>) -> RingResponse<NetAddr> {
        let now = self.state.now_ms();
        self.state.node.lock().handle(req, now)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&DiskImage) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, Status> {
        self.on_pool(move |s| f(&s.store).map_err(store_status)).await
    }

    /// Runs `f` on the blocking pool: disk I/O and hashing of whole shards, which take
    /// milliseconds and would hold up the async threads that answer ring and record calls.
    async fn on_pool<T: Send + 'static>(&self, f: impl FnOnce(&PeerState) -> Result<T, Status> + Send + 'static) -> Result<T, Status> {
        let state = self.state.clone();
        tokio::task::spawn_blocking(move || f(&state)).await.map_err(|e| Status::internal(format!("disk task failed: {e}")))?
    }
}

impl PeerService {
    /// A record replica's write: the PutRecord call and the direct lane both end here.
    pub(super) async fn store_record(&self, r: pb::PutRecordRequest) -> Result<pb::PutRecordResponse, Status> {
        let key = id_from(&r.key, "key")?;
        check_record(r.version, r.deleted, &r.data)?;
        let v = self.state.records.put(key, Record { version: r.version, deleted: r.deleted, data: r.data }, r.durable).await.map_err(record_status)?;
        Ok(pb::PutRecordResponse { version: v })
    }

    /// A compare-and-swap at a record's primary: the CasRecord call and the direct lane
    /// both end here.
    pub(super) async fn swap_record(&self, r: pb::CasRecordRequest) -> Result<pb::CasRecordResponse, Status> {
        let key = id_from(&r.key, "key")?;
        let next = r.expected.checked_add(1).ok_or_else(|| Status::invalid_argument("expected version is at its maximum"))?;
        check_record(next, r.deleted, &r.data)?;
        if r.replicas.len() > MAX_RECORD_REPLICAS {
            return Err(Status::invalid_argument(format!("{} replicas named, at most {MAX_RECORD_REPLICAS}", r.replicas.len())));
        }
        let replicas = r.replicas.iter().map(|a| addr_from(a)).collect::<Result<Vec<_>, _>>()?;
        let out = self.state.records.cas(key, r.expected, r.deleted, r.data, replicas, r.durable, r.insist).await.map_err(record_status)?;
        Ok(match out {
            CasOutcome::Done(v) => pb::CasRecordResponse { ok: true, version: v, ..Default::default() },
            CasOutcome::Conflict(rec) => pb::CasRecordResponse { ok: false, version: rec.version, found: rec.version > 0, deleted: rec.deleted, data: rec.data, failed_replicas: vec![] },
            CasOutcome::Partial { version, failed } => pb::CasRecordResponse { ok: false, version, failed_replicas: failed.iter().map(|a| a.to_string()).collect(), ..Default::default() },
        })
    }

    /// One step of a lookup: the FindNext call and the direct lane both end here.
    pub(super) fn ring_find_next(&self, r: pb::FindNextRequest) -> Result<pb::FindNextResponse, Status> {
        let key = id_from(&r.key, "key")?;
        if r.avoid.len() > crate::ring::lookup::MAX_AVOID {
            return Err(Status::invalid_argument(format!("{} peers to avoid (max {})", r.avoid.len(), crate::ring::lookup::MAX_AVOID)));
        }
        let avoid = r.avoid.iter().map(|a| addr_from(a)).collect::<Result<Vec<_>, _>>()?;
        match self.ring(RingRequest::FindNext { key, avoid }) {
            RingResponse::Route(r) => Ok(route_to(&r)),
            _ => Err(unexpected()),
        }
    }

    /// A vnode's neighbours: the Neighbors call and the direct lane both end here.
    pub(super) fn ring_neighbors(&self, r: pb::VnodeRequest) -> Result<pb::NeighborsResponse, Status> {
        let vnode = id_from(&r.vnode_id, "vnode_id")?;
        match self.ring(RingRequest::Neighbors { vnode }) {
            RingResponse::Neighbors(n) => Ok(neighbors_to(&n)),
            _ => Err(unexpected()),
        }
    }

    /// Chord's notify: the Notify call and the direct lane both end here.
    pub(super) fn ring_notify(&self, r: pb::NotifyRequest) -> Result<pb::NotifyResponse, Status> {
        let vnode = id_from(&r.vnode_id, "vnode_id")?;
        let candidate = contact_opt_from(&r.candidate)?.ok_or_else(|| Status::invalid_argument("notify without candidate"))?;
        match self.ring(RingRequest::Notify { vnode, candidate, as_successor: r.as_successor }) {
            RingResponse::Notified(accepted) => Ok(pb::NotifyResponse { accepted }),
            _ => Err(unexpected()),
        }
    }

    /// Many record reads: the GetRecords call and the direct lane both end here.
    pub(super) async fn read_records(&self, r: pb::GetRecordsRequest) -> Result<pb::GetRecordsResponse, Status> {
        if r.items.len() > MAX_RECORDS_PER_CALL {
            return Err(Status::invalid_argument(format!("{} records in one request (max {MAX_RECORDS_PER_CALL})", r.items.len())));
        }
        let keys = r.items.iter().map(|i| Ok((id_from(&i.key, "key")?, i.known_version))).collect::<Result<Vec<(Id, u64)>, Status>>()?;
        let mut items = Vec::with_capacity(keys.len());
        let mut bytes = 0;
        for (key, known) in keys {
            if bytes >= MAX_RECORDS_ANSWER_BYTES {
                items.push(pb::GetRecordsItem { skipped: true, record: None });
                continue;
            }
            let f = self.state.records.get(key, known).await.map_err(record_status)?;
            let rec = record_response(f);
            bytes += rec.data.len() + 64;
            items.push(pb::GetRecordsItem { skipped: false, record: Some(rec) });
        }
        Ok(pb::GetRecordsResponse { items })
    }

    /// A record read: the GetRecord call and the direct lane (`lane`) both end here.
    pub(super) async fn read_record(&self, r: pb::GetRecordRequest) -> Result<pb::GetRecordResponse, Status> {
        let key = id_from(&r.key, "key")?;
        if !r.as_primary {
            let f = self.state.records.get(key, r.known_version).await.map_err(record_status)?;
            return Ok(record_response(f));
        }
        if r.replicas.len() > MAX_RECORD_REPLICAS {
            return Err(Status::invalid_argument(format!("{} replicas named, at most {MAX_RECORD_REPLICAS}", r.replicas.len())));
        }
        let replicas = r.replicas.iter().map(|a| addr_from(a)).collect::<Result<Vec<_>, _>>()?;
        let read = self.state.records.get_primary(key, r.known_version, replicas).await.map_err(record_status)?;
        Ok(pb::GetRecordResponse { authoritative: read.authoritative, ..record_response(read.fetched) })
    }

    /// Checks a shard against its header and stores it: the PutShard call and the direct
    /// lane (`lane`) both end here.
    pub(super) async fn take_shard(&self, meta_bytes: Vec<u8>, data: bytes::Bytes, lazy: bool) -> Result<(), Status> {
        let meta = ShardMeta::decode(&meta_bytes).map_err(|e| Status::invalid_argument(format!("shard header: {e}")))?;
        if self.state.draining.load(Ordering::Relaxed) {
            return Err(Status::unavailable("this peer is draining and takes no new shards"));
        }
        // The check runs on the pool with the write: a CRC of 1 MiB is ~0.1 ms.
        self.on_pool(move |state| {
            let crc = crc32c::crc32c(&data);
            if !meta.arrived_intact(&data, crc) {
                return Err(Status::invalid_argument(format!(
                    "shard {} of stripe {}: {} bytes that do not match the header's length or checksum",
                    meta.index,
                    meta.stripe.to_hex(),
                    data.len()
                )));
            }
            let key = meta.block_key();
            let (mut meta_bytes, mut data, mut crc) = (meta_bytes, data, crc);
            if state.fault.as_ref().is_some_and(|f| Fault::on(&f.forge_stored)) {
                let mut forged = data.to_vec();
                super::fault::flip(&mut forged);
                data = forged.into();
                meta_bytes = meta.rehashed(&data).encode();
                crc = crc32c::crc32c(&data);
            }
            state.store.put_with_crc(&key, &meta_bytes, &data, crc, !lazy).map_err(store_status)
        })
        .await
    }
}

fn check_record(version: u64, deleted: bool, data: &[u8]) -> Result<(), Status> {
    if version == 0 {
        return Err(Status::invalid_argument("record version 0 means absent and cannot be written"));
    }
    if deleted && !data.is_empty() {
        return Err(Status::invalid_argument("a deleted record carries no data"));
    }
    if data.len() > MAX_DATA_BYTES {
        return Err(Status::invalid_argument(format!("record of {} bytes, at most {MAX_DATA_BYTES}", data.len())));
    }
    Ok(())
}

fn unexpected() -> Status {
    Status::internal("ring handler answered a different request kind")
}

#[tonic::async_trait]
impl Peer for PeerService {
    async fn hello(&self, req: Request<pb::HelloRequest>) -> Result<Response<pb::HelloResponse>, Status> {
        let r = req.into_inner();
        if r.protocol_version != PROTOCOL_VERSION {
            log::warn!("refused a caller speaking protocol v{} (we speak v{PROTOCOL_VERSION})", r.protocol_version);
            return Err(Status::failed_precondition(format!(
                "protocol version mismatch: this peer speaks v{PROTOCOL_VERSION}, caller speaks v{}",
                r.protocol_version
            )));
        }
        let peer_id = self.state.node.lock().peer_id;
        let code = self.state.code;
        Ok(Response::new(pb::HelloResponse {
            protocol_version: PROTOCOL_VERSION,
            peer_id: peer_id.to_bytes().to_vec(),
            code_k: code.k as u32,
            code_m: code.m as u32,
        }))
    }

    async fn find_next(&self, req: Request<pb::FindNextRequest>) -> Result<Response<pb::FindNextResponse>, Status> {
        Ok(Response::new(self.ring_find_next(req.into_inner())?))
    }

    async fn neighbors(&self, req: Request<pb::VnodeRequest>) -> Result<Response<pb::NeighborsResponse>, Status> {
        Ok(Response::new(self.ring_neighbors(req.into_inner())?))
    }

    async fn notify(&self, req: Request<pb::NotifyRequest>) -> Result<Response<pb::NotifyResponse>, Status> {
        Ok(Response::new(self.ring_notify(req.into_inner())?))
    }

    async fn fingers(&self, req: Request<pb::VnodeRequest>) -> Result<Response<pb::FingersResponse>, Status> {
        let vnode = id_from(&req.into_inner().vnode_id, "vnode_id")?;
        match self.ring(RingRequest::Fingers { vnode }) {
            RingResponse::Fingers(f) => Ok(Response::new(pb::FingersResponse { fingers: contacts_to(&f) })),
            _ => Err(unexpected()),
        }
    }

    async fn leave(&self, req: Request<pb::LeaveRequest>) -> Result<Response<pb::Empty>, Status> {
        let r = req.into_inner();
        let vnode = id_from(&r.vnode_id, "vnode_id")?;
        let leaving = contact_opt_from(&r.leaving)?.ok_or_else(|| Status::invalid_argument("leave without leaving vnode"))?;
        let new_pred = contact_opt_from(&r.new_predecessor)?;
        let new_succ = contacts_from(&r.new_successors)?;
        self.ring(RingRequest::Leave { vnode, leaving, new_pred, new_succ });
        Ok(Response::new(pb::Empty {}))
    }

    async fn peer_info(&self, _req: Request<pb::Empty>) -> Result<Response<pb::PeerInfoResponse>, Status> {
        let (peer_id, addr, vnodes, capacity, share) = {
            let n = self.state.node.lock();
            (n.peer_id, n.addr.to_string(), n.vnode_ids(), n.capacity_bytes, n.keyspace_share())
        };
        let store = &self.state.store;
        Ok(Response::new(pb::PeerInfoResponse {
            peer_id: peer_id.to_bytes().to_vec(),
            addr,
            vnode_ids: vnodes.iter().map(|v| v.to_bytes().to_vec()).collect(),
            capacity_bytes: capacity,
            used_bytes: store.used_bytes(),
            keyspace_share: share,
            protocol_version: PROTOCOL_VERSION,
            blocks: store.len() as u64,
            code_k: self.state.code.k as u32,
            code_m: self.state.code.m as u32,
            upkeep: Some(upkeep_to(&self.state.upkeep.lock())),
            draining: self.state.draining.load(Ordering::Relaxed),
        }))
    }

    async fn put_block(&self, req: Request<pb::PutBlockRequest>) -> Result<Response<pb::Empty>, Status> {
        let r = req.into_inner();
        let key = id_from(&r.key, "key")?.to_bytes();
        if r.meta.len() > MAX_META_BYTES || r.data.len() > MAX_DATA_BYTES {
            return Err(Status::invalid_argument(format!(
                "block too large: meta {} (max {MAX_META_BYTES}), data {} (max {MAX_DATA_BYTES})",
                r.meta.len(),
                r.data.len()
            )));
        }
        self.blocking(move |s| s.put(&key, &r.meta, &r.data)).await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn get_block(&self, req: Request<pb::GetBlockRequest>) -> Result<Response<pb::GetBlockResponse>, Status> {
        let key = id_from(&req.into_inner().key, "key")?.to_bytes();
        let got = self.blocking(move |s| s.get(&key)).await?;
        Ok(Response::new(match got {
            Some(b) => pb::GetBlockResponse { found: true, meta: b.meta, data: b.data },
            None => pb::GetBlockResponse { found: false, meta: Vec::new(), data: Vec::new() },
        }))
    }

    async fn delete_block(&self, req: Request<pb::DeleteBlockRequest>) -> Result<Response<pb::Empty>, Status> {
        let key = id_from(&req.into_inner().key, "key")?.to_bytes();
        self.blocking(move |s| s.delete(&key)).await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn list_keys(&self, req: Request<pb::ListKeysRequest>) -> Result<Response<pb::ListKeysResponse>, Status> {
        let r = req.into_inner();
        let from = id_from(&r.from_exclusive, "from_exclusive")?;
        let to = id_from(&r.to_inclusive, "to_inclusive")?;
        let limit = (r.limit as usize).clamp(1, 100_000);
        let keys = self.state.store.keys();
        let mut out: Vec<Vec<u8>> = Vec::new();
        let mut truncated = false;
        for k in keys {
            if crate::ring::Id::from_bytes(&k).in_open_closed(from, to) {
                if out.len() == limit {
                    truncated = true;
                    break;
                }
                out.push(k.to_vec());
            }
        }
        Ok(Response::new(pb::ListKeysResponse { keys: out, truncated }))
    }

    async fn put_shard(&self, req: Request<pb::PutShardRequest>) -> Result<Response<pb::Empty>, Status> {
        let r = req.into_inner();
        self.take_shard(r.meta, r.data, r.lazy).await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn sync(&self, _req: Request<pb::Empty>) -> Result<Response<pb::Empty>, Status> {
        self.state.records.sync().await.map_err(record_status)?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn get_shard(&self, req: Request<pb::GetShardRequest>) -> Result<Response<pb::GetShardResponse>, Status> {
        let r = req.into_inner();
        let stripe = id_from(&r.stripe, "stripe")?;
        let skip = r.skip_mask;
        let found = self
            .blocking(move |s| {
                let (from, to) = shard_key_range(stripe);
                for key in s.keys_between(&from, &to) {
                    let index = key[19];
                    if index < 64 && skip & (1u64 << index) != 0 {
                        continue;
                    }
                    // A corrupt copy is marked by the store (upkeep rebuilds it); try the next.
                    // The store's CRC has checked the bytes since put_shard checked their
                    // hash, and the reader checks the decoded stripe: no SHA-1 pass here.
                    let Ok(Some(b)) = s.get(&key) else { continue };
                    match ShardMeta::decode(&b.meta) {
                        Ok(m) if m.stripe == stripe && b.data.len() == m.shard_len() => return Ok(Some(b)),
                        _ => continue,
                    }
                }
                Ok(None)
            })
            .await?;
        Ok(Response::new(match found {
            Some(mut b) => {
                if self.state.fault.as_ref().is_some_and(|f| Fault::on(&f.flip_served)) {
                    super::fault::flip(&mut b.data);
                }
                pb::GetShardResponse { found: true, meta: b.meta, data: b.data.into() }
            }
            None => pb::GetShardResponse { found: false, meta: Vec::new(), data: Default::default() },
        }))
    }

    async fn holdings(&self, req: Request<pb::HoldingsRequest>) -> Result<Response<pb::HoldingsResponse>, Status> {
        let r = req.into_inner();
        if r.stripes.len() > MAX_HOLDINGS_STRIPES {
            return Err(Status::invalid_argument(format!("{} stripes in one request (max {MAX_HOLDINGS_STRIPES})", r.stripes.len())));
        }
        let stripes = r.stripes.iter().map(|b| id_from(b, "stripe")).collect::<Result<Vec<Id>, Status>>()?;
        let store = &self.state.store;
        let corrupt: std::collections::BTreeSet<_> = store.corrupt_keys().into_iter().collect();
        let masks = stripes
            .iter()
            .map(|s| {
                let (from, to) = shard_key_range(*s);
                store.keys_between(&from, &to).iter().filter(|k| k[19] < 64 && !corrupt.contains(*k)).fold(0u64, |m, k| m | 1u64 << k[19])
            })
            .collect();
        Ok(Response::new(pb::HoldingsResponse { masks }))
    }

    async fn delete_shard(&self, req: Request<pb::DeleteShardRequest>) -> Result<Response<pb::Empty>, Status> {
        let r = req.into_inner();
        let stripe = id_from(&r.stripe, "stripe")?;
        let index = u8::try_from(r.index).map_err(|_| Status::invalid_argument(format!("shard index {} out of range", r.index)))?;
        let key = shard_block_key(stripe, index);
        self.blocking(move |s| s.delete(&key)).await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn get_record(&self, req: Request<pb::GetRecordRequest>) -> Result<Response<pb::GetRecordResponse>, Status> {
        Ok(Response::new(self.read_record(req.into_inner()).await?))
    }

    async fn get_records(&self, req: Request<pb::GetRecordsRequest>) -> Result<Response<pb::GetRecordsResponse>, Status> {
        Ok(Response::new(self.read_records(req.into_inner()).await?))
    }

    async fn put_record(&self, req: Request<pb::PutRecordRequest>) -> Result<Response<pb::PutRecordResponse>, Status> {
        Ok(Response::new(self.store_record(req.into_inner()).await?))
    }

    async fn cas_record(&self, req: Request<pb::CasRecordRequest>) -> Result<Response<pb::CasRecordResponse>, Status> {
        Ok(Response::new(self.swap_record(req.into_inner()).await?))
    }

    async fn drain(&self, _req: Request<pb::Empty>) -> Result<Response<pb::DrainResponse>, Status> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.state.drain_requests.try_send(tx).map_err(|_| Status::failed_precondition("a drain is already under way"))?;
        let report = rx.await.map_err(|_| Status::internal("the drain stopped before it finished"))?;
        Ok(Response::new(pb::DrainResponse { shards_moved: report.moved, shards_left: report.left }))
    }
}

pub fn upkeep_to(u: &UpkeepReport) -> pb::Upkeep {
    pb::Upkeep {
        stripes: u.stripes,
        degraded: u.degraded,
        at_risk: u.at_risk,
        repair_queue: u.repair_queue,
        repaired_shards: u.repaired_shards,
        repaired_bytes: u.repaired_bytes,
        repair_bytes_per_sec: u.repair_bytes_per_sec,
        moved_shards: u.moved_shards,
        moved_bytes: u.moved_bytes,
        scans: u.scans,
        unplaceable: u.unplaceable,
    }
}
