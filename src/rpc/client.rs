//! Calls to other peers over gRPC: the `Transport` the ring driver uses in a real
//! peer, plus block and status calls. One lazily connected channel per address; every
//! call has a deadline.

use super::convert::*;
use super::pb;
use super::pb::peer_client::PeerClient;
use super::{NetAddr, BLOCK_CALL_TIMEOUT, CONNECT_TIMEOUT, MAX_MESSAGE_BYTES, PROTOCOL_VERSION, RING_CALL_TIMEOUT};
use crate::ring::driver::Transport;
use crate::ring::{Id, NetError, RingRequest, RingResponse};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

#[derive(Default)]
pub struct GrpcNet {
    channels: Mutex<HashMap<NetAddr, Channel>>,
}

pub fn net_error(addr: &str, s: Status) -> NetError {
    match s.code() {
        Code::DeadlineExceeded => NetError::Timeout(0),
        Code::Unavailable | Code::Unknown | Code::Cancelled => NetError::Unreachable(format!("{addr}: {}", s.message())),
        _ => NetError::Refused(format!("{addr}: {}", s.message())),
    }
}

pub struct BlockReply {
    pub meta: Vec<u8>,
    pub data: Vec<u8>,
}

impl GrpcNet {
    pub fn new() -> Self {
        Self::default()
    }

    fn client(&self, addr: &NetAddr, timeout: Duration) -> Result<PeerClient<Channel>, NetError> {
        let channel = {
            let mut map = self.channels.lock();
            match map.get(addr) {
                Some(c) => c.clone(),
                None => {
                    let ep = Endpoint::from_shared(format!("http://{addr}"))
                        .map_err(|e| NetError::Unreachable(format!("bad address {addr}: {e}")))?
                        .connect_timeout(CONNECT_TIMEOUT)
                        .tcp_nodelay(true);
                    let c = ep.connect_lazy();
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

    /// Checks that `addr` answers and speaks our protocol version.
    pub async fn hello(&self, addr: &NetAddr, my_addr: &str) -> Result<Id, NetError> {
        let mut c = self.client(addr, RING_CALL_TIMEOUT)?;
        let req = Self::request(pb::HelloRequest { protocol_version: PROTOCOL_VERSION, addr: my_addr.to_string() }, RING_CALL_TIMEOUT);
        let r = with_deadline(RING_CALL_TIMEOUT, c.hello(req)).await.map_err(|s| net_error(addr, s))?.into_inner();
        if r.protocol_version != PROTOCOL_VERSION {
            return Err(NetError::Refused(format!(
                "{addr} speaks protocol v{}, we speak v{PROTOCOL_VERSION}",
                r.protocol_version
            )));
        }
        Id::from_slice(&r.peer_id).ok_or_else(|| NetError::Protocol(format!("{addr} sent a bad peer id")))
    }

    pub async fn peer_info(&self, addr: &NetAddr) -> Result<pb::PeerInfoResponse, NetError> {
        let mut c = self.client(addr, RING_CALL_TIMEOUT)?;
        let r = with_deadline(RING_CALL_TIMEOUT, c.peer_info(Self::request(pb::Empty {}, RING_CALL_TIMEOUT)))
            .await
            .map_err(|s| net_error(addr, s))?;
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

    async fn ring_call(&self, to: &NetAddr, req: RingRequest<NetAddr>) -> Result<RingResponse<NetAddr>, NetError> {
        let mut c = self.client(to, RING_CALL_TIMEOUT)?;
        let t = RING_CALL_TIMEOUT;
        let conv = |s: Status| net_error(to, s);
        match req {
            RingRequest::FindNext { key } => {
                let r = with_deadline(t, c.find_next(Self::request(pb::FindNextRequest { key: key.to_bytes().to_vec() }, t)))
                    .await
                    .map_err(conv)?;
                Ok(RingResponse::Route(route_from(r.get_ref()).map_err(|s| net_error(to, s))?))
            }
            RingRequest::Neighbors { vnode } => {
                let r = with_deadline(t, c.neighbors(Self::request(pb::VnodeRequest { vnode_id: vnode.to_bytes().to_vec() }, t)))
                    .await
                    .map_err(conv)?;
                Ok(RingResponse::Neighbors(neighbors_from(r.get_ref()).map_err(|s| net_error(to, s))?))
            }
            RingRequest::Notify { vnode, candidate, as_successor } => {
                let msg = pb::NotifyRequest { vnode_id: vnode.to_bytes().to_vec(), candidate: Some(contact_to(&candidate)), as_successor };
                let r = with_deadline(t, c.notify(Self::request(msg, t))).await.map_err(conv)?;
                Ok(RingResponse::Notified(r.get_ref().accepted))
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
async fn with_deadline<T>(
    t: Duration,
    fut: impl Future<Output = Result<tonic::Response<T>, Status>>,
) -> Result<tonic::Response<T>, Status> {
    match tokio::time::timeout(t + CONNECT_TIMEOUT, fut).await {
        Ok(r) => r,
        Err(_) => Err(Status::deadline_exceeded(format!("no answer within {} ms", (t + CONNECT_TIMEOUT).as_millis()))),
    }
}

impl Transport<NetAddr> for GrpcNet {
    fn call(&self, to: &NetAddr, req: RingRequest<NetAddr>) -> impl Future<Output = Result<RingResponse<NetAddr>, NetError>> + Send {
        let to = to.clone();
        async move { self.ring_call(&to, req).await }
    }
}
