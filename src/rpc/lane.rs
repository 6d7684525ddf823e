//! The direct lane: shard writes, record reads and writes, and the ring's lookup and
//! maintenance calls outside HTTP/2, on the same port as the gRPC service.
//!
//! Why: a 1 MiB shard sent as a gRPC message was copied twice more than the bytes need —
//! tonic encodes it into its own buffer at the sender, and gathers the HTTP/2 frames
//! into another at the receiver before prost sees it. In a sequential write those two
//! copies were a tenth of the mount's CPU and a fifth of each peer's, on a machine where
//! the write is bound by CPU. Here a shard goes from the sender's buffer to the socket
//! and from the socket into the buffer the disk image writes from: one copy each way,
//! the kernel's. A record read (what every open does, for close-to-open) is a small
//! call whose time was mostly hyper's: the request passes from the caller's task to the
//! connection's task and the answer back, at both ends. Here the caller writes and
//! reads its own connection. Chord's maintenance (a Neighbors and a Notify per vnode per
//! round, and a Neighbors per finger checked) and its lookups (FindNext, hop by hop:
//! every placement and every upkeep walk) are the same kind of small call, made around
//! a hundred times a second by every peer: over HTTP/2 they were most of an idle peer's
//! CPU.
//!
//! A connection says which it is in its first bytes: `MAGIC` for the lane, anything else
//! (the HTTP/2 preface) goes on to gRPC with those bytes replayed (`Prefixed`). In a
//! ring with a secret this happens inside the mutual-TLS session, so the lane admits
//! exactly the members gRPC admits, through the same gate.
//!
//! Wire format (little-endian), after the 8-byte `MAGIC`, any number of exchanges, one
//! at a time per connection:
//! - request: op `u8`, flags `u8`, head length `u16`, body length `u32`, head, body.
//!   Op 1, put shard: head = the shard header (`ShardMeta`), body = the shard's bytes,
//!   flag bit 0 = lazy. Op 2, get record, and op 3, get records: no head, body = a
//!   protobuf `GetRecordRequest` / `GetRecordsRequest`. Op 4, neighbors, op 5, notify,
//!   op 6, find next, op 7, put record, and op 8, compare-and-swap record: no head,
//!   body = a protobuf `VnodeRequest` / `NotifyRequest` / `FindNextRequest` /
//!   `PutRecordRequest` / `CasRecordRequest` (≤ 64 KiB, records' ≤ a block and 1 MiB).
//! - answer: gRPC status code `u8` (0 = OK), length `u32`, then that many bytes: on OK
//!   the result (nothing for a put, otherwise the call's protobuf response:
//!   `GetRecordResponse`, `GetRecordsResponse`, `NeighborsResponse`, `NotifyResponse`,
//!   `FindNextResponse`, `PutRecordResponse`, `CasRecordResponse`),
//!   otherwise the status message (UTF-8).
//!
//! A request the peer cannot frame (unknown op, lengths past the limits) is answered
//! with INVALID_ARGUMENT and the connection closed; a request it can frame but refuses
//! (bad checksum, full disk, draining, a malformed protobuf) is answered with the same
//! status the gRPC call gives, and the connection stays open. Every operation may be
//! repeated (a shard's key names its content; a read changes nothing; Chord's notify is
//! idempotent; a record replica keeps the newer version; a repeated compare-and-swap
//! fails with a conflict naming the first one's write, which its writer recognises), so
//! a client may retry one on a fresh connection.

use super::server::PeerService;
use super::{NetAddr, CONNECT_TIMEOUT};
use bytes::{BufMut, BytesMut};
use prost::Message;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tonic::Status;

/// First bytes of a lane connection ("MSLANE", version 1). Cannot begin an HTTP/2
/// preface ("PRI * ...") or a TLS record (0x16).
pub const MAGIC: [u8; 8] = *b"MSLANE\x00\x01";
pub const OP_PUT_SHARD: u8 = 1;
pub const OP_GET_RECORD: u8 = 2;
pub const OP_GET_RECORDS: u8 = 3;
pub const OP_NEIGHBORS: u8 = 4;
pub const OP_NOTIFY: u8 = 5;
pub const OP_FIND_NEXT: u8 = 6;
pub const OP_PUT_RECORD: u8 = 7;
pub const OP_CAS_RECORD: u8 = 8;
/// Every operation a peer answers.
const OPS: [u8; 8] = [OP_PUT_SHARD, OP_GET_RECORD, OP_GET_RECORDS, OP_NEIGHBORS, OP_NOTIFY, OP_FIND_NEXT, OP_PUT_RECORD, OP_CAS_RECORD];
pub const FLAG_LAZY: u8 = 1;
/// Largest shard header accepted (a `ShardMeta` is 56 bytes).
const MAX_META: usize = 1024;
/// Largest shard accepted: what a block may hold.
const MAX_DATA: usize = crate::blockstore::MAX_DATA_BYTES;
/// Largest body of any other request (a GetRecordRequest names at most 16 replicas).
const MAX_SMALL_BODY: usize = 64 << 10;
/// Largest body of a record write: a record as large as a block, and its request.
const MAX_RECORD_BODY: usize = super::MAX_MESSAGE_BYTES;
/// Longest message in a refusal.
const MAX_MESSAGE: usize = 64 << 10;
/// Largest answer: a record, as large as a gRPC message may be.
const MAX_ANSWER: usize = super::MAX_MESSAGE_BYTES;
/// A peer closes a lane connection idle this long; a client reuses one only if it has
/// been idle for less than half of it (so it never sends into a closing connection).
const SERVER_IDLE: Duration = Duration::from_secs(120);
const CLIENT_IDLE: Duration = Duration::from_secs(60);
/// Idle connections a client keeps per peer (one per concurrent shard write is opened).
const MAX_IDLE_PER_PEER: usize = 16;
/// Read buffer of a lane connection, at each end.
const READ_BUFFER: usize = 8 << 10;
/// Requests up to this size go out in one write (one TLS record, one send).
const ONE_WRITE_BELOW: usize = 16 << 10;
/// How long a peer waits for the first bytes of a connection.
const SNIFF_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a peer waits for the rest of a request once its header came.
const BODY_TIMEOUT: Duration = Duration::from_secs(20);

/// Anything a lane exchange runs over: TCP, or TLS over TCP.
pub trait LaneIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> LaneIo for T {}

// ---------------------------------------------------------------- the peer's side

/// What a new connection's first bytes say.
pub enum Sniffed<S> {
    Lane(S),
    /// Not the lane: the stream, with the bytes already read put back in front.
    Other(Prefixed<S>),
}

/// Reads just enough of a new connection to tell the lane from anything else: an
/// HTTP/2 client's first byte already differs, so gRPC connections wait for no more
/// than they sent.
pub async fn sniff<S: AsyncRead + Unpin>(mut s: S) -> io::Result<Sniffed<S>> {
    let mut got = Vec::with_capacity(MAGIC.len());
    let read = async {
        while got.len() < MAGIC.len() && MAGIC.starts_with(&got) {
            let mut b = [0u8; MAGIC.len()];
            let n = s.read(&mut b[..MAGIC.len() - got.len()]).await?;
            if n == 0 {
                break;
            }
            got.extend_from_slice(&b[..n]);
        }
        Ok::<(), io::Error>(())
    };
    tokio::time::timeout(SNIFF_TIMEOUT, read).await.map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no bytes from a new connection in 5 s"))??;
    Ok(if got == MAGIC { Sniffed::Lane(s) } else { Sniffed::Other(Prefixed { head: got, at: 0, io: s }) })
}

/// A stream whose first bytes were read already and are served again first.
pub struct Prefixed<S> {
    head: Vec<u8>,
    at: usize,
    io: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.at < self.head.len() {
            let n = (self.head.len() - self.at).min(out.remaining());
            let at = self.at;
            out.put_slice(&self.head[at..at + n]);
            self.at += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, out)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, data)
    }
    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected for Prefixed<S> {
    type ConnectInfo = S::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// Where the listener hands lane connections: the peer's service, while it runs.
#[derive(Clone)]
pub struct LaneServer {
    svc: PeerService,
    /// Ends (its sender is dropped) when the peer stops serving: open lane connections
    /// close with it, as gRPC's do.
    alive: tokio::sync::watch::Receiver<()>,
}

impl LaneServer {
    pub fn new(svc: PeerService, alive: tokio::sync::watch::Receiver<()>) -> LaneServer {
        LaneServer { svc, alive }
    }

    /// Serves one lane connection until the client closes it, it idles, it breaks the
    /// framing, or the peer stops.
    pub async fn serve(self, conn: impl LaneIo + 'static) {
        let LaneServer { svc, mut alive } = self;
        if alive.has_changed().is_err() {
            return;
        }
        // Buffered reads: a small request's header and body come in one read. A shard's
        // body is larger than the buffer and is read past it, straight into its own.
        let mut conn = tokio::io::BufReader::with_capacity(READ_BUFFER, conn);
        tokio::select! {
            r = serve_requests(&svc, &mut conn) => if let Err(e) = r {
                log::debug!("lane connection ended: {e}");
            },
            _ = alive.changed() => {}
        }
    }
}

async fn serve_requests(svc: &PeerService, conn: &mut (impl LaneIo + 'static)) -> io::Result<()> {
    loop {
        let mut h = [0u8; 8];
        match tokio::time::timeout(SERVER_IDLE, conn.read_exact(&mut h)).await {
            Err(_) => return Ok(()),
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(r) => r?,
        };
        let (op, flags) = (h[0], h[1]);
        let head_len = u16::from_le_bytes([h[2], h[3]]) as usize;
        let body_len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
        let (max_head, max_body) = match op {
            OP_PUT_SHARD => (MAX_META, MAX_DATA),
            _ => (0, max_body(op)),
        };
        let framing = if !OPS.contains(&op) {
            Some(format!("unknown lane operation {op}"))
        } else if head_len > max_head || body_len > max_body {
            Some(format!("operation {op} with a {head_len}-byte head and a {body_len}-byte body (at most {max_head} and {max_body})"))
        } else {
            None
        };
        if let Some(why) = framing {
            answer(conn, &Err(Status::invalid_argument(why))).await?;
            return Err(io::Error::new(io::ErrorKind::InvalidData, "unframeable lane request"));
        }
        let read = async {
            let mut head = vec![0u8; head_len];
            conn.read_exact(&mut head).await?;
            let mut body = BytesMut::with_capacity(body_len);
            while body.len() < body_len {
                let want = body_len - body.len();
                if conn.read_buf(&mut (&mut body).limit(want)).await? == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
            }
            Ok::<_, io::Error>((head, body.freeze()))
        };
        let (head, body) = tokio::time::timeout(BODY_TIMEOUT, read)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "lane request body not sent within 20 s"))??;
        let r = match op {
            OP_PUT_SHARD => svc.take_shard(head, body, flags & FLAG_LAZY != 0).await.map(|()| Vec::new()),
            OP_GET_RECORD => match decoded(body, "GetRecordRequest") {
                Ok(req) => svc.read_record(req).await.map(|a| a.encode_to_vec()),
                Err(s) => Err(s),
            },
            OP_GET_RECORDS => match decoded(body, "GetRecordsRequest") {
                Ok(req) => svc.read_records(req).await.map(|a| a.encode_to_vec()),
                Err(s) => Err(s),
            },
            OP_NEIGHBORS => decoded(body, "VnodeRequest").and_then(|req| svc.ring_neighbors(req)).map(|a| a.encode_to_vec()),
            OP_NOTIFY => decoded(body, "NotifyRequest").and_then(|req| svc.ring_notify(req)).map(|a| a.encode_to_vec()),
            OP_PUT_RECORD => match decoded(body, "PutRecordRequest") {
                Ok(req) => svc.store_record(req).await.map(|a| a.encode_to_vec()),
                Err(s) => Err(s),
            },
            OP_CAS_RECORD => match decoded(body, "CasRecordRequest") {
                Ok(req) => svc.swap_record(req).await.map(|a| a.encode_to_vec()),
                Err(s) => Err(s),
            },
            _ => decoded(body, "FindNextRequest").and_then(|req| svc.ring_find_next(req)).map(|a| a.encode_to_vec()),
        };
        answer(conn, &r).await?;
    }
}

/// Largest body of a request with a protobuf body.
fn max_body(op: u8) -> usize {
    match op {
        OP_PUT_RECORD | OP_CAS_RECORD => MAX_RECORD_BODY,
        _ => MAX_SMALL_BODY,
    }
}

/// A request's protobuf body, or the INVALID_ARGUMENT the gRPC call would give.
fn decoded<Q: Message + Default>(body: bytes::Bytes, what: &str) -> Result<Q, Status> {
    Q::decode(body).map_err(|e| Status::invalid_argument(format!("{what}: {e}")))
}

async fn answer(conn: &mut (impl LaneIo + 'static), r: &Result<Vec<u8>, Status>) -> io::Result<()> {
    let (code, bytes) = match r {
        Ok(b) => (0u8, b.as_slice()),
        Err(s) => (s.code() as i32 as u8, &s.message().as_bytes()[..s.message().len().min(MAX_MESSAGE)]),
    };
    let mut out = Vec::with_capacity(5 + bytes.len());
    out.push(code);
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
    conn.write_all(&out).await?;
    conn.flush().await
}

// ---------------------------------------------------------------- the client's side

/// Why a lane exchange failed.
#[derive(Debug)]
pub enum LaneError {
    /// The peer answered with this status.
    Status(Status),
    /// The connection failed (connect, TLS, I/O).
    Io(io::Error),
    /// The peer's answer makes no sense (too long, not the message it should be).
    Protocol(String),
}

type Conn = tokio::io::BufReader<Box<dyn LaneIo>>;
type Pooled = (Instant, Conn);

/// Bulk connections to other peers: idle ones kept per address, a new one opened
/// whenever all are busy.
pub struct LanePool {
    idle: Mutex<HashMap<NetAddr, Vec<Pooled>>>,
    tls: Option<tokio_rustls::TlsConnector>,
}

impl LanePool {
    pub fn new(tls: Option<Arc<tokio_rustls::rustls::ClientConfig>>) -> LanePool {
        LanePool { idle: Mutex::new(HashMap::new()), tls: tls.map(tokio_rustls::TlsConnector::from) }
    }

    /// Stores a shard at `addr` (the caller bounds the time).
    pub async fn put_shard(&self, addr: &NetAddr, meta: &[u8], data: &[u8], lazy: bool) -> Result<(), LaneError> {
        if meta.len() > MAX_META || data.len() > MAX_DATA {
            return Err(LaneError::Status(Status::invalid_argument(format!("a shard of {} bytes with a {}-byte header is too large to send", data.len(), meta.len()))));
        }
        self.call(addr, OP_PUT_SHARD, if lazy { FLAG_LAZY } else { 0 }, meta, data).await.map(drop)
    }

    /// A record read (see the GetRecord call), answered by `addr`.
    pub async fn get_record(&self, addr: &NetAddr, req: &super::pb::GetRecordRequest) -> Result<super::pb::GetRecordResponse, LaneError> {
        self.call_proto(addr, OP_GET_RECORD, req).await
    }

    /// Many record reads in one exchange (see the GetRecords call).
    pub async fn get_records(&self, addr: &NetAddr, req: &super::pb::GetRecordsRequest) -> Result<super::pb::GetRecordsResponse, LaneError> {
        self.call_proto(addr, OP_GET_RECORDS, req).await
    }

    /// A vnode's neighbours (see the Neighbors call): Chord's maintenance asks this
    /// several times a second per vnode.
    pub async fn neighbors(&self, addr: &NetAddr, req: &super::pb::VnodeRequest) -> Result<super::pb::NeighborsResponse, LaneError> {
        self.call_proto(addr, OP_NEIGHBORS, req).await
    }

    /// Chord's notify (see the Notify call).
    pub async fn notify(&self, addr: &NetAddr, req: &super::pb::NotifyRequest) -> Result<super::pb::NotifyResponse, LaneError> {
        self.call_proto(addr, OP_NOTIFY, req).await
    }

    /// One step of a lookup (see the FindNext call): every walk of a stripe's holders.
    pub async fn find_next(&self, addr: &NetAddr, req: &super::pb::FindNextRequest) -> Result<super::pb::FindNextResponse, LaneError> {
        self.call_proto(addr, OP_FIND_NEXT, req).await
    }

    /// A record replica's write (see the PutRecord call).
    pub async fn put_record(&self, addr: &NetAddr, req: &super::pb::PutRecordRequest) -> Result<super::pb::PutRecordResponse, LaneError> {
        self.call_proto(addr, OP_PUT_RECORD, req).await
    }

    /// A compare-and-swap at a record's primary (see the CasRecord call). Retried like
    /// any exchange: a repeat that finds the first one's write answers with a conflict
    /// naming that record, which the writer recognises as its own (its bytes are sealed
    /// under a fresh salt).
    pub async fn cas_record(&self, addr: &NetAddr, req: &super::pb::CasRecordRequest) -> Result<super::pb::CasRecordResponse, LaneError> {
        self.call_proto(addr, OP_CAS_RECORD, req).await
    }

    /// An exchange whose request and answer are protobuf messages.
    async fn call_proto<Q: Message, A: Message + Default>(&self, addr: &NetAddr, op: u8, req: &Q) -> Result<A, LaneError> {
        let body = req.encode_to_vec();
        if body.len() > max_body(op) {
            return Err(LaneError::Status(Status::invalid_argument(format!("a {}-byte request for lane operation {op}", body.len()))));
        }
        let answer = self.call(addr, op, 0, &[], &body).await?;
        A::decode(answer.as_slice()).map_err(|e| LaneError::Protocol(format!("the answer to lane operation {op}: {e}")))
    }

    /// One exchange; the answer's bytes on OK. Retried once on a fresh connection when a
    /// reused one fails before the answer: the peer may have closed it.
    async fn call(&self, addr: &NetAddr, op: u8, flags: u8, head: &[u8], body: &[u8]) -> Result<Vec<u8>, LaneError> {
        let mut h = Vec::with_capacity(8 + head.len());
        h.extend_from_slice(&[op, flags]);
        h.extend_from_slice(&(head.len() as u16).to_le_bytes());
        h.extend_from_slice(&(body.len() as u32).to_le_bytes());
        h.extend_from_slice(head);
        if let Some(mut c) = self.take_idle(addr) {
            match exchange(&mut c, &h, body).await {
                Ok(r) => {
                    self.give_back(addr, c);
                    return r.map_err(LaneError::Status);
                }
                Err(e) => log::debug!("{addr}: reused lane connection failed ({e}); retrying on a new one"),
            }
        }
        let mut c = self.connect(addr).await.map_err(LaneError::Io)?;
        let r = exchange(&mut c, &h, body).await.map_err(|e| match e.kind() {
            io::ErrorKind::InvalidData if e.get_ref().is_some_and(|i| i.is::<AnswerTooLong>()) => LaneError::Protocol(e.to_string()),
            _ => LaneError::Io(e),
        })?;
        self.give_back(addr, c);
        r.map_err(LaneError::Status)
    }

    fn take_idle(&self, addr: &NetAddr) -> Option<Conn> {
        let mut m = self.idle.lock();
        let v = m.get_mut(addr)?;
        v.retain(|(t, _)| t.elapsed() < CLIENT_IDLE);
        v.pop().map(|(_, c)| c)
    }

    fn give_back(&self, addr: &NetAddr, c: Conn) {
        let mut m = self.idle.lock();
        let v = m.entry(addr.clone()).or_default();
        if v.len() < MAX_IDLE_PER_PEER {
            v.push((Instant::now(), c));
        }
    }

    async fn connect(&self, addr: &NetAddr) -> io::Result<Conn> {
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&**addr))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("no TCP connection within {} ms", CONNECT_TIMEOUT.as_millis())))??;
        // The answer is small and must not wait for Nagle + delayed ACK.
        tcp.set_nodelay(true)?;
        let mut c: Box<dyn LaneIo> = match &self.tls {
            None => Box::new(tcp),
            Some(t) => {
                let name = tokio_rustls::rustls::pki_types::ServerName::try_from(crate::crypto::tls::SERVER_NAME).expect("a valid DNS name");
                let s = tokio::time::timeout(SNIFF_TIMEOUT, t.connect(name, tcp))
                    .await
                    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake not finished in 5 s"))??;
                Box::new(s)
            }
        };
        c.write_all(&MAGIC).await?;
        Ok(tokio::io::BufReader::with_capacity(READ_BUFFER, c))
    }
}

#[derive(Debug)]
struct AnswerTooLong(usize);

impl std::fmt::Display for AnswerTooLong {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "a lane answer of {} bytes", self.0)
    }
}

impl std::error::Error for AnswerTooLong {}

/// One request and its answer. Err: the connection failed; Ok(Err): the peer refused.
async fn exchange(c: &mut Conn, head: &[u8], body: &[u8]) -> io::Result<Result<Vec<u8>, Status>> {
    if head.len() + body.len() < ONE_WRITE_BELOW {
        let mut all = Vec::with_capacity(head.len() + body.len());
        all.extend_from_slice(head);
        all.extend_from_slice(body);
        c.write_all(&all).await?;
    } else {
        c.write_all(head).await?;
        c.write_all(body).await?;
    }
    c.flush().await?;
    let mut h = [0u8; 5];
    c.read_exact(&mut h).await?;
    let len = u32::from_le_bytes([h[1], h[2], h[3], h[4]]) as usize;
    let limit = if h[0] == 0 { MAX_ANSWER } else { MAX_MESSAGE };
    if len > limit {
        return Err(io::Error::new(io::ErrorKind::InvalidData, AnswerTooLong(len)));
    }
    let mut bytes = vec![0u8; len];
    c.read_exact(&mut bytes).await?;
    Ok(match h[0] {
        0 => Ok(bytes),
        code => Err(Status::new(tonic::Code::from_i32(code as i32), String::from_utf8_lossy(&bytes).into_owned())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sniffing_tells_the_lane_and_gives_grpc_its_bytes_back() {
        let (mut a, b) = tokio::io::duplex(1024);
        a.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
        let Sniffed::Other(mut p) = sniff(b).await.unwrap() else { panic!("an HTTP/2 preface taken for the lane") };
        let mut got = vec![0u8; 24];
        p.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "every byte replayed, in order");

        let (mut a, b) = tokio::io::duplex(1024);
        // Split across writes: the sniffer waits for the rest of a prefix of MAGIC.
        let writer = tokio::spawn(async move {
            a.write_all(&MAGIC[..3]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            a.write_all(&MAGIC[3..]).await.unwrap();
            a.write_all(b"next").await.unwrap();
            a
        });
        let Sniffed::Lane(mut s) = sniff(b).await.unwrap() else { panic!("the lane's magic not recognised") };
        let _a = writer.await.unwrap();
        let mut next = [0u8; 4];
        s.read_exact(&mut next).await.unwrap();
        assert_eq!(&next, b"next", "the lane's stream starts right after the magic");

        // A prefix of MAGIC and then something else is not the lane.
        let (mut a, b) = tokio::io::duplex(1024);
        a.write_all(b"MSBxyzzy").await.unwrap();
        assert!(matches!(sniff(b).await.unwrap(), Sniffed::Other(_)));
    }
}
