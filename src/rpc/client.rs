//! Calls to other peers over gRPC: the `Transport` the ring driver uses in a real
//! peer, plus block and status calls. One lazily connected channel per address; every
//! call has a deadline.

use super::convert::*;
use super::pb;
use super::pb::peer_client::PeerClient;
use super::{NetAddr, BLOCK_CALL_TIMEOUT, CONNECT_TIMEOUT, MAX_MESSAGE_BYTES, PROTOCOL_VERSION, RING_CALL_TIMEOUT};
use super::{MAX_HOLDINGS_STRIPES, MAX_RECORDS_PER_CALL, RECORD_CAS_TIMEOUT};
use crate::erasure::stripe::{Shard, ShardMeta};
use crate::erasure::Code;
use crate::meta::{CasOutcome, Fetched, Record};
use crate::ring::driver::Transport;
use crate::ring::{Id, NetError, RingRequest, RingResponse};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use crate::crypto::tls::RingTls;
use tonic::transport::{Channel, Endpoint};
use tonic::Status;

pub struct GrpcNet {
    channels: Mutex<HashMap<NetAddr, Channel>>,
    /// Deadline of one ring call (a lookup hop, a maintenance call). Clients use a short
    /// one: a lookup hop that does not answer quickly is routed around, so a frozen peer
    /// costs a client one short wait rather than the peers' patient 2 s.
    ring_timeout: Duration,
    /// Clients only: peers that recently failed or timed out, and when.
    suspects: Option<Mutex<HashMap<NetAddr, std::time::Instant>>>,
    /// Membership credentials; None only in a ring created without a secret.
    tls: Option<Arc<RingTls>>,
    /// Shard writes and record reads go over the direct lane (`lane`), not gRPC.
    lane: super::lane::LanePool,
}

impl Default for GrpcNet {
    fn default() -> Self {
        GrpcNet { channels: Mutex::new(HashMap::new()), ring_timeout: RING_CALL_TIMEOUT, suspects: None, tls: None, lane: super::lane::LanePool::new(None) }
    }
}

/// Ring-call deadline for clients (put/get, the filesystem): a FindNext on loopback or a
/// LAN answers in well under a millisecond, so a hop this slow is routed around.
pub const CLIENT_RING_CALL_TIMEOUT: Duration = Duration::from_millis(250);
/// How long a client routes around a peer that failed it.
pub const SUSPECT_FOR: Duration = Duration::from_secs(10);

pub fn net_error(addr: &str, s: Status) -> NetError {
    match s.code() {
        tonic::Code::DeadlineExceeded => NetError::Timeout(0),
        // tonic's own client-side deadline (the request's grpc-timeout) ends a call as
        // CANCELLED "Timeout expired": silence, not a refusal. Taken for one, a peer that
        // was only frozen for a few seconds was kept out of its neighbours' successor
        // lists for REFUSED_TTL_MS after it woke, and stripes it held read as unavailable.
        tonic::Code::Cancelled if s.message() == tonic::TimeoutExpired(()).to_string() => NetError::Timeout(0),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled => NetError::Unreachable(format!("{addr}: {}", error_chain(&s))),
        _ => NetError::Refused(format!("{addr}: {}", s.message())),
    }
}

/// A status's message and the causes under it ("transport error" alone says nothing).
pub fn error_chain(s: &Status) -> String {
    let mut out = s.message().to_string();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(s);
    while let Some(e) = cur {
        let t = e.to_string();
        if !out.contains(&t) {
            out.push_str(": ");
            out.push_str(&t);
        }
        cur = e.source();
    }
    out
}

pub struct BlockReply {
    pub meta: Vec<u8>,
    pub data: Vec<u8>,
}

impl GrpcNet {
    pub fn new() -> Self {
        Self::default()
    }

    /// A network for clients: lookup hops give up after CLIENT_RING_CALL_TIMEOUT.
    pub fn for_client() -> Self {
        GrpcNet { ring_timeout: CLIENT_RING_CALL_TIMEOUT, suspects: Some(Mutex::new(HashMap::new())), ..Self::default() }
    }

    /// Connects to members with TLS under the ring's credentials.
    pub fn with_tls(mut self, tls: Option<Arc<RingTls>>) -> Self {
        self.lane = super::lane::LanePool::new(tls.as_ref().map(|t| t.lane_client_config()));
        self.tls = tls;
        self
    }

    pub fn tls(&self) -> Option<&Arc<RingTls>> {
        self.tls.as_ref()
    }

    /// The error of a first contact, with what it most likely means.
    pub fn explain(&self, e: NetError) -> NetError {
        let hint = |m: &str| crate::crypto::tls::explain(m, self.tls.is_some()).map(|h| format!("{m} ({h})")).unwrap_or_else(|| m.to_string());
        match e {
            NetError::Unreachable(m) => NetError::Unreachable(hint(&m)),
            NetError::Refused(m) => NetError::Refused(hint(&m)),
            e => e,
        }
    }

    /// Records the outcome of a call for the client's failure detector.
    fn observe<T>(&self, addr: &NetAddr, r: &Result<T, NetError>) {
        let Some(s) = &self.suspects else { return };
        match r {
            Ok(_) | Err(NetError::Refused(_)) | Err(NetError::Protocol(_)) => {
                s.lock().remove(addr);
            }
            Err(_) => {
                s.lock().insert(addr.clone(), std::time::Instant::now());
            }
        }
    }

    /// Marks a peer that left a request unanswered past the caller's patience.
    pub fn suspect(&self, addr: &NetAddr) {
        if let Some(s) = &self.suspects {
            s.lock().insert(addr.clone(), std::time::Instant::now());
        }
    }

    /// Peers that failed this client within SUSPECT_FOR, most recent last.
    pub fn suspected(&self) -> Vec<NetAddr> {
        let Some(s) = &self.suspects else { return Vec::new() };
        let mut m = s.lock();
        m.retain(|_, t| t.elapsed() < SUSPECT_FOR);
        let mut v: Vec<(NetAddr, std::time::Instant)> = m.iter().map(|(a, t)| (a.clone(), *t)).collect();
        v.sort_by_key(|(_, t)| *t);
        v.into_iter().map(|(a, _)| a).collect()
    }

    fn client(&self, addr: &NetAddr, timeout: Duration) -> Result<PeerClient<Channel>, NetError> {
        let channel = {
            let mut map = self.channels.lock();
            match map.get(addr) {
                Some(c) => c.clone(),
                None => {
                    let scheme = if self.tls.is_some() { "https" } else { "http" };
                    // No Endpoint::connect_timeout: with a custom connector tonic would
                    // bound the TLS handshake with it too (see `coalesce::Connector`).
                    let mut ep = Endpoint::from_shared(format!("{scheme}://{addr}")).map_err(|e| NetError::Unreachable(format!("bad address {addr}: {e}")))?;
                    if let Some(t) = &self.tls {
                        ep = ep.tls_config(t.client_config()).map_err(|e| NetError::Unreachable(format!("TLS for {addr}: {e}")))?;
                    }
                    ep = ep
                        .initial_stream_window_size(super::H2_STREAM_WINDOW)
                        .initial_connection_window_size(super::H2_CONNECTION_WINDOW)
                        .max_frame_size(super::H2_MAX_FRAME);
                    // Our own TCP connector: it gathers each flush into one send (see `coalesce`).
                    let c = ep.connect_with_connector_lazy(super::coalesce::Connector);
                    map.insert(addr.clone(), c.clone());
                    c
                }
            }
        };
        let _ = timeout;
        Ok(PeerClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES).max_encoding_message_size(MAX_MESSAGE_BYTES))
    }

    fn request<T>(msg: T, timeout: Duration) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.set_timeout(timeout);
        r
    }

    /// Checks that `addr` answers and speaks our protocol version; returns its peer id
    /// and the ring's erasure code.
    pub async fn hello(&self, addr: &NetAddr, my_addr: &str) -> Result<(Id, Code), NetError> {
        let mut c = self.client(addr, RING_CALL_TIMEOUT)?;
        let req = Self::request(pb::HelloRequest { protocol_version: PROTOCOL_VERSION, addr: my_addr.to_string() }, RING_CALL_TIMEOUT);
        let r = with_deadline(RING_CALL_TIMEOUT, c.hello(req)).await.map_err(|s| self.explain(net_error(addr, s)))?.into_inner();
        if r.protocol_version != PROTOCOL_VERSION {
            return Err(NetError::Refused(format!(
                "{addr} speaks protocol v{}, we speak v{PROTOCOL_VERSION}",
                r.protocol_version
            )));
        }
        let id = Id::from_slice(&r.peer_id).ok_or_else(|| NetError::Protocol(format!("{addr} sent a bad peer id")))?;
        let code = code_from(r.code_k, r.code_m).map_err(|s| NetError::Protocol(format!("{addr}: {}", s.message())))?;
        Ok((id, code))
    }

    pub async fn peer_info(&self, addr: &NetAddr) -> Result<pb::PeerInfoResponse, NetError> {
        let mut c = self.client(addr, RING_CALL_TIMEOUT)?;
        let r = with_deadline(RING_CALL_TIMEOUT, c.peer_info(Self::request(pb::Empty {}, RING_CALL_TIMEOUT)))
            .await
            .map_err(|s| self.explain(net_error(addr, s)))?;
        Ok(r.into_inner())
    }

    pub async fn put_block(&self, addr: &NetAddr, key: Id, meta: Vec<u8>, data: Vec<u8>) -> Result<(), NetError> {
        let mut c = self.client(addr, BLOCK_CALL_TIMEOUT)?;
        let req = Self::request(pb::PutBlockRequest { key: key.to_bytes().to_vec(), meta, data }, BLOCK_CALL_TIMEOUT);
        with_deadline(BLOCK_CALL_TIMEOUT, c.put_block(req)).await.map_err(|s| net_error(addr, s))?;
        Ok(())
    }

    /// Ok(None) when the peer does not hold the block; Err(Refused) with "corrupt" when
    /// its copy fails its checksum.
    pub async fn get_block(&self, addr: &NetAddr, key: Id) -> Result<Option<BlockReply>, NetError> {
        let mut c = self.client(addr, BLOCK_CALL_TIMEOUT)?;
        let req = Self::request(pb::GetBlockRequest { key: key.to_bytes().to_vec() }, BLOCK_CALL_TIMEOUT);
        let r = with_deadline(BLOCK_CALL_TIMEOUT, c.get_block(req)).await.map_err(|s| net_error(addr, s))?.into_inner();
        Ok(r.found.then_some(BlockReply { meta: r.meta, data: r.data }))
    }

    /// The ring's erasure code, as the peer at `addr` knows it.
    pub async fn ring_code(&self, addr: &NetAddr) -> Result<Code, NetError> {
        let info = self.peer_info(addr).await?;
        code_from(info.code_k, info.code_m).map_err(|s| NetError::Protocol(format!("{addr}: {}", s.message())))
    }

    /// Stores a shard durably (on the peer's disk when this returns).
    pub async fn put_shard(&self, addr: &NetAddr, shard: &Shard) -> Result<(), NetError> {
        self.put_shard_as(addr, shard, false).await
    }

    /// Stores a shard; `lazy`: in the peer's page cache when this returns (see `sync`).
    /// Over the direct lane, bounded like a block call.
    pub async fn put_shard_as(&self, addr: &NetAddr, shard: &Shard, lazy: bool) -> Result<(), NetError> {
        let r = self.on_lane(addr, BLOCK_CALL_TIMEOUT, self.lane.put_shard(addr, &shard.meta.encode(), &shard.data, lazy)).await;
        self.observe(addr, &r);
        r
    }

    /// A lane exchange under the deadline the gRPC call would have, failing with the
    /// error the gRPC call would have given.
    async fn on_lane<T>(&self, addr: &NetAddr, t: Duration, fut: impl Future<Output = Result<T, super::lane::LaneError>>) -> Result<T, NetError> {
        match tokio::time::timeout(call_budget(t), fut).await {
            Err(_) => Err(NetError::Timeout(0)),
            Ok(r) => r.map_err(|e| self.lane_error(addr, e)),
        }
    }

    fn lane_error(&self, addr: &NetAddr, e: super::lane::LaneError) -> NetError {
        match e {
            super::lane::LaneError::Status(s) => net_error(addr, s),
            super::lane::LaneError::Protocol(m) => NetError::Protocol(format!("{addr}: direct lane: {m}")),
            super::lane::LaneError::Io(e) => self.explain(NetError::Unreachable(format!("{addr}: direct lane: {e}"))),
        }
    }

    /// Has `addr` put every lazy write it took on disk. Bounded like a record write, not
    /// like a block transfer: an fsync must not wait 20 s on a frozen peer (one may fail).
    pub async fn sync(&self, addr: &NetAddr) -> Result<(), NetError> {
        let r = async {
            let mut c = self.client(addr, RECORD_CAS_TIMEOUT)?;
            let req = Self::request(pb::Empty {}, RECORD_CAS_TIMEOUT);
            with_deadline(RECORD_CAS_TIMEOUT, c.sync(req)).await.map_err(|s| net_error(addr, s))?;
            Ok(())
        }
        .await;
        self.observe(addr, &r);
        r
    }

    /// One intact shard of `stripe` that `addr` holds, other than those in `skip_mask`.
    /// The answer is checked here: a shard whose header or bytes do not match is an error.
    /// A shard of `stripe` (not one of the indexes in `skip_mask`), checked against its
    /// own hash.
    pub async fn get_shard(&self, addr: &NetAddr, stripe: Id, skip_mask: u64) -> Result<Option<Shard>, NetError> {
        let r = self.get_shard_inner(addr, stripe, skip_mask, true).await;
        self.observe(addr, &r);
        r
    }

    /// As `get_shard` without hashing the bytes: for a reader that checks the decoded
    /// stripe against its key anyway (hashing every shard too cost a second SHA-1 pass
    /// over everything read) and hashes shards only when a decode fails.
    pub async fn get_shard_unhashed(&self, addr: &NetAddr, stripe: Id, skip_mask: u64) -> Result<Option<Shard>, NetError> {
        let r = self.get_shard_inner(addr, stripe, skip_mask, false).await;
        self.observe(addr, &r);
        r
    }

    async fn get_shard_inner(&self, addr: &NetAddr, stripe: Id, skip_mask: u64, hash: bool) -> Result<Option<Shard>, NetError> {
        let mut c = self.client(addr, BLOCK_CALL_TIMEOUT)?;
        let req = Self::request(pb::GetShardRequest { stripe: stripe.to_bytes().to_vec(), skip_mask }, BLOCK_CALL_TIMEOUT);
        let r = with_deadline(BLOCK_CALL_TIMEOUT, c.get_shard(req)).await.map_err(|s| net_error(addr, s))?.into_inner();
        if !r.found {
            return Ok(None);
        }
        let meta = ShardMeta::decode(&r.meta).map_err(|e| NetError::Protocol(format!("{addr} sent a bad shard header: {e}")))?;
        if meta.stripe != stripe || skip_mask & (1u64 << meta.index) != 0 {
            return Err(NetError::Protocol(format!("{addr} answered with a shard of another stripe or index")));
        }
        if r.data.len() != meta.shard_len() || (hash && !meta.verifies(&r.data)) {
            return Err(NetError::Protocol(format!("{addr} sent shard {} of stripe {} that fails its hash", meta.index, stripe.to_hex())));
        }
        Ok(Some(Shard { meta, data: r.data }))
    }

    /// For each stripe, the bitmask of shard indexes `addr` holds.
    pub async fn holdings(&self, addr: &NetAddr, stripes: &[Id]) -> Result<Vec<u64>, NetError> {
        let mut out = Vec::with_capacity(stripes.len());
        for chunk in stripes.chunks(MAX_HOLDINGS_STRIPES) {
            let mut c = self.client(addr, RING_CALL_TIMEOUT)?;
            let req = Self::request(pb::HoldingsRequest { stripes: chunk.iter().map(|s| s.to_bytes().to_vec()).collect() }, RING_CALL_TIMEOUT);
            let r = with_deadline(RING_CALL_TIMEOUT, c.holdings(req)).await.map_err(|s| net_error(addr, s))?.into_inner();
            if r.masks.len() != chunk.len() {
                return Err(NetError::Protocol(format!("{addr} answered {} holdings for {} stripes", r.masks.len(), chunk.len())));
            }
            out.extend(r.masks);
        }
        Ok(out)
    }

    pub async fn delete_shard(&self, addr: &NetAddr, stripe: Id, index: u8) -> Result<(), NetError> {
        let mut c = self.client(addr, RING_CALL_TIMEOUT)?;
        let req = Self::request(pb::DeleteShardRequest { stripe: stripe.to_bytes().to_vec(), index: index as u32 }, RING_CALL_TIMEOUT);
        with_deadline(RING_CALL_TIMEOUT, c.delete_shard(req)).await.map_err(|s| net_error(addr, s))?;
        Ok(())
    }

    /// A record replica's copy of `key`; `known` is the version the caller has (0: none).
    pub async fn get_record(&self, addr: &NetAddr, key: Id, known: u64) -> Result<Fetched, NetError> {
        Ok(self.get_record_as(addr, key, known, None).await?.0)
    }

    /// `get_record`; with `replicas`, asks `addr` to answer as the key's primary (see
    /// `GetRecordRequest`): true with the answer if it vouched for it as the newest.
    pub async fn get_record_as(&self, addr: &NetAddr, key: Id, known: u64, replicas: Option<&[NetAddr]>) -> Result<(Fetched, bool), NetError> {
        let msg = pb::GetRecordRequest {
            key: key.to_bytes().to_vec(),
            known_version: known,
            as_primary: replicas.is_some(),
            replicas: replicas.unwrap_or_default().iter().map(|a| a.to_string()).collect(),
        };
        // Over the direct lane, with the deadline a gRPC call would have.
        let r = self.on_lane(addr, RING_CALL_TIMEOUT, self.lane.get_record(addr, &msg)).await.and_then(|r| {
            let authoritative = r.authoritative;
            fetched_from(addr, known, r).map(|f| (f, authoritative))
        });
        self.observe(addr, &r);
        r
    }

    /// A replica's copies of many records in one call, in the order asked; None for
    /// one the peer left out to keep its answer small (ask for it alone).
    pub async fn get_records(&self, addr: &NetAddr, keys: &[(Id, u64)]) -> Result<Vec<Option<Fetched>>, NetError> {
        let r = async {
            let mut out = Vec::with_capacity(keys.len());
            // A request of MAX_RECORDS_PER_CALL keys stays well inside the lane's limit.
            for chunk in keys.chunks(MAX_RECORDS_PER_CALL) {
                let items = chunk.iter().map(|(k, known)| pb::GetRecordRequest { key: k.to_bytes().to_vec(), known_version: *known, ..Default::default() }).collect();
                let req = pb::GetRecordsRequest { items };
                let r = self.on_lane(addr, RING_CALL_TIMEOUT, self.lane.get_records(addr, &req)).await?;
                if r.items.len() != chunk.len() {
                    return Err(NetError::Protocol(format!("{addr} answered {} records for {} asked", r.items.len(), chunk.len())));
                }
                for (item, (_, known)) in r.items.into_iter().zip(chunk) {
                    out.push(match (item.skipped, item.record) {
                        (true, _) => None,
                        (false, Some(rec)) => Some(fetched_from(addr, *known, rec)?),
                        (false, None) => return Err(NetError::Protocol(format!("{addr} answered an item with neither a record nor a skip"))),
                    });
                }
            }
            Ok(out)
        }
        .await;
        self.observe(addr, &r);
        r
    }

    /// Stores a replica of a record unless `addr` has that version or newer; returns the
    /// version `addr` holds afterwards.
    pub async fn put_record(&self, addr: &NetAddr, key: Id, rec: &Record, durable: bool) -> Result<u64, NetError> {
        let msg = pb::PutRecordRequest { key: key.to_bytes().to_vec(), version: rec.version, deleted: rec.deleted, data: rec.data.clone(), durable };
        Ok(self.on_lane(addr, RING_CALL_TIMEOUT, self.lane.put_record(addr, &msg)).await?.version)
    }

    /// Compare-and-swap at the record's primary `addr`, which replicates to `replicas`.
    #[allow(clippy::too_many_arguments)]
    pub async fn cas_record(&self, addr: &NetAddr, key: Id, expected: u64, deleted: bool, data: Vec<u8>, replicas: &[NetAddr], durable: bool, insist: bool) -> Result<CasOutcome, NetError> {
        let r = async {
            let msg = pb::CasRecordRequest {
                key: key.to_bytes().to_vec(),
                expected,
                deleted,
                data,
                replicas: replicas.iter().map(|a| a.to_string()).collect(),
                durable,
                insist,
            };
            let r = self.on_lane(addr, RECORD_CAS_TIMEOUT, self.lane.cas_record(addr, &msg)).await?;
            if r.ok {
                if r.version != expected + 1 {
                    return Err(NetError::Protocol(format!("{addr} wrote version {} for expected {expected}", r.version)));
                }
                return Ok(CasOutcome::Done(r.version));
            }
            if !r.failed_replicas.is_empty() {
                if r.version != expected + 1 {
                    return Err(NetError::Protocol(format!("{addr} partly wrote version {} for expected {expected}", r.version)));
                }
                let failed = r.failed_replicas.iter().map(|a| NetAddr::from(a.as_str())).collect();
                return Ok(CasOutcome::Partial { version: r.version, failed });
            }
            if r.version == expected {
                return Err(NetError::Protocol(format!("{addr} refused a CAS at the version it holds")));
            }
            Ok(CasOutcome::Conflict(if r.found { Record { version: r.version, deleted: r.deleted, data: r.data } } else { Record::default() }))
        }
        .await;
        self.observe(addr, &r);
        r
    }

    /// Asks the peer at `addr` to move its shards away, leave the ring and exit.
    pub async fn drain(&self, addr: &NetAddr, budget: Duration) -> Result<pb::DrainResponse, NetError> {
        let mut c = self.client(addr, budget)?;
        let r = with_deadline(budget, c.drain(Self::request(pb::Empty {}, budget))).await.map_err(|s| net_error(addr, s))?;
        Ok(r.into_inner())
    }

    async fn ring_call(&self, to: &NetAddr, req: RingRequest<NetAddr>) -> Result<RingResponse<NetAddr>, NetError> {
        let mut c = self.client(to, self.ring_timeout)?;
        let t = self.ring_timeout;
        let conv = |s: Status| net_error(to, s);
        match req {
            // Lookups and the calls of every maintenance round go over the direct lane:
            // through HTTP/2 they were most of an idle peer's CPU.
            RingRequest::FindNext { key, avoid } => {
                let msg = pb::FindNextRequest { key: key.to_bytes().to_vec(), avoid: avoid.iter().map(|a| a.to_string()).collect() };
                let r = self.on_lane(to, t, self.lane.find_next(to, &msg)).await?;
                Ok(RingResponse::Route(route_from(&r).map_err(|s| net_error(to, s))?))
            }
            RingRequest::Neighbors { vnode } => {
                let msg = pb::VnodeRequest { vnode_id: vnode.to_bytes().to_vec() };
                let r = self.on_lane(to, t, self.lane.neighbors(to, &msg)).await?;
                Ok(RingResponse::Neighbors(neighbors_from(&r).map_err(|s| net_error(to, s))?))
            }
            RingRequest::Notify { vnode, candidate, as_successor } => {
                let msg = pb::NotifyRequest { vnode_id: vnode.to_bytes().to_vec(), candidate: Some(contact_to(&candidate)), as_successor };
                let r = self.on_lane(to, t, self.lane.notify(to, &msg)).await?;
                Ok(RingResponse::Notified(r.accepted))
            }
            RingRequest::Fingers { vnode } => {
                let r = with_deadline(t, c.fingers(Self::request(pb::VnodeRequest { vnode_id: vnode.to_bytes().to_vec() }, t)))
                    .await
                    .map_err(conv)?;
                Ok(RingResponse::Fingers(contacts_from(&r.get_ref().fingers).map_err(|s| net_error(to, s))?))
            }
            RingRequest::Leave { vnode, leaving, new_pred, new_succ } => {
                let msg = pb::LeaveRequest {
                    vnode_id: vnode.to_bytes().to_vec(),
                    leaving: Some(contact_to(&leaving)),
                    new_predecessor: new_pred.as_ref().map(contact_to),
                    new_successors: contacts_to(&new_succ),
                };
                with_deadline(t, c.leave(Self::request(msg, t))).await.map_err(conv)?;
                Ok(RingResponse::Ok)
            }
            RingRequest::Ping => {
                self.peer_info(to).await?;
                Ok(RingResponse::Ok)
            }
        }
    }
}

/// A client-side bound on top of the gRPC deadline: connecting to a dead or frozen
/// peer must not take longer than the call's budget.
/// A call's whole budget: room for a connect on top of the call, but never more than the
/// call itself gets.
fn call_budget(t: Duration) -> Duration {
    t + CONNECT_TIMEOUT.min(t)
}

async fn with_deadline<T>(
    t: Duration,
    fut: impl Future<Output = Result<tonic::Response<T>, Status>>,
) -> Result<tonic::Response<T>, Status> {
    let budget = call_budget(t);
    match tokio::time::timeout(budget, fut).await {
        Ok(r) => r,
        Err(_) => Err(Status::deadline_exceeded(format!("no answer within {} ms", budget.as_millis()))),
    }
}

impl Transport<NetAddr> for GrpcNet {
    fn call(&self, to: &NetAddr, req: RingRequest<NetAddr>) -> impl Future<Output = Result<RingResponse<NetAddr>, NetError>> + Send {
        let to = to.clone();
        async move {
            let r = self.ring_call(&to, req).await;
            self.observe(&to, &r);
            r
        }
    }

    fn suspects(&self) -> Vec<NetAddr> {
        self.suspected()
    }
}

/// Checks one record answer against what was asked (`known`: the version the asker has).
fn fetched_from(addr: &NetAddr, known: u64, r: pb::GetRecordResponse) -> Result<Fetched, NetError> {
    if r.unchanged {
        if r.version != known || known == 0 {
            return Err(NetError::Protocol(format!("{addr} said unchanged for version {} when asked about {known}", r.version)));
        }
        return Ok(Fetched::Unchanged(known));
    }
    if !r.found {
        return Ok(Fetched::Got(Record::default()));
    }
    if r.version == 0 {
        return Err(NetError::Protocol(format!("{addr} sent a record with version 0")));
    }
    Ok(Fetched::Got(Record { version: r.version, deleted: r.deleted, data: r.data }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_is_a_timeout_and_only_a_failed_connection_is_unreachable() {
        assert!(matches!(net_error("p", Status::deadline_exceeded("late")), NetError::Timeout(_)));
        // What tonic's client-side grpc-timeout produces.
        assert!(matches!(net_error("p", Status::cancelled(tonic::TimeoutExpired(()).to_string())), NetError::Timeout(_)));
        assert!(matches!(net_error("p", Status::cancelled("the caller went away")), NetError::Unreachable(_)));
        assert!(matches!(net_error("p", Status::unavailable("connection refused")), NetError::Unreachable(_)));
        assert!(matches!(net_error("p", Status::invalid_argument("bad key")), NetError::Refused(_)));
    }
}
