//! The bulk lane: shard writes outside HTTP/2, on the same port as the gRPC service.
//!
//! Why: a 1 MiB shard sent as a gRPC message was copied twice more than the bytes need —
//! tonic encodes it into its own buffer at the sender, and gathers the HTTP/2 frames
//! into another at the receiver before prost sees it. In a sequential write those two
//! copies were a tenth of the mount's CPU and a fifth of each peer's, on a machine where
//! the write is bound by CPU. Here a shard goes from the sender's buffer to the socket
//! and from the socket into the buffer the disk image writes from: one copy each way,
//! the kernel's.
//!
//! A connection says which it is in its first bytes: `MAGIC` for the bulk lane, anything
//! else (the HTTP/2 preface) goes on to gRPC with those bytes replayed (`Prefixed`). In a
//! ring with a secret this happens inside the mutual-TLS session, so the lane admits
//! exactly the members gRPC admits, through the same gate.
//!
//! Wire format (little-endian), after the 8-byte `MAGIC`, any number of exchanges, one
//! at a time per connection:
//! - request: op `u8` (1 = put shard), flags `u8` (bit 0: lazy), meta length `u16`,
//!   data length `u32`, then the shard header (`ShardMeta`) and the shard's bytes;
//! - answer: gRPC status code `u8` (0 = stored), message length `u32`, message (UTF-8).
//!
//! A request the peer cannot frame (unknown op, lengths past the limits) is answered
//! with INVALID_ARGUMENT and the connection closed; a request it can frame but refuses
//! (bad checksum, full disk, draining) is answered with the same status the gRPC call
//! gives, and the connection stays open. Shard writes are idempotent (a shard's key
//! names its content), so a client may retry one on a fresh connection.

use super::server::PeerService;
use super::{NetAddr, CONNECT_TIMEOUT};
use bytes::{BufMut, BytesMut};
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

/// First bytes of a bulk connection ("MSBULK", version 1). Cannot begin an HTTP/2
/// preface ("PRI * ...") or a TLS record (0x16).
pub const MAGIC: [u8; 8] = *b"MSBULK\x00\x01";
const OP_PUT_SHARD: u8 = 1;
const FLAG_LAZY: u8 = 1;
/// Largest shard header accepted (a `ShardMeta` is 56 bytes).
const MAX_META: usize = 1024;
/// Largest shard accepted: what a block may hold.
const MAX_DATA: usize = crate::blockstore::MAX_DATA_BYTES;
/// Longest message in an answer.
const MAX_MESSAGE: usize = 64 << 10;
/// A peer closes a bulk connection idle this long; a client reuses one only if it has
/// been idle for less than half of it (so it never sends into a closing connection).
const SERVER_IDLE: Duration = Duration::from_secs(120);
const CLIENT_IDLE: Duration = Duration::from_secs(60);
/// Idle connections a client keeps per peer (one per concurrent shard write is opened).
const MAX_IDLE_PER_PEER: usize = 16;
/// How long a peer waits for the first bytes of a connection.
const SNIFF_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a peer waits for the rest of a request once its header came.
const BODY_TIMEOUT: Duration = Duration::from_secs(20);

/// Anything a bulk exchange runs over: TCP, or TLS over TCP.
pub trait BulkIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> BulkIo for T {}

// ---------------------------------------------------------------- the peer's side

/// What a new connection's first bytes say.
pub enum Sniffed<S> {
    Bulk(S),
    /// Not the bulk lane: the stream, with the bytes already read put back in front.
    Other(Prefixed<S>),
}

/// Reads just enough of a new connection to tell the bulk lane from anything else: an
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
    Ok(if got == MAGIC { Sniffed::Bulk(s) } else { Sniffed::Other(Prefixed { head: got, at: 0, io: s }) })
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

/// Where the listener hands bulk connections: the peer's service, while it runs.
#[derive(Clone)]
pub struct BulkServer {
    svc: PeerService,
    /// Ends (its sender is dropped) when the peer stops serving: open bulk connections
    /// close with it, as gRPC's do.
    alive: tokio::sync::watch::Receiver<()>,
}

impl BulkServer {
    pub fn new(svc: PeerService, alive: tokio::sync::watch::Receiver<()>) -> BulkServer {
        BulkServer { svc, alive }
    }

    /// Serves one bulk connection until the client closes it, it idles, it breaks the
    /// framing, or the peer stops.
    pub async fn serve(self, conn: impl BulkIo + 'static) {
        let BulkServer { svc, mut alive } = self;
        if alive.has_changed().is_err() {
            return;
        }
        let mut conn = conn;
        tokio::select! {
            r = serve_requests(&svc, &mut conn) => if let Err(e) = r {
                log::debug!("bulk connection ended: {e}");
            },
            _ = alive.changed() => {}
        }
    }
}

async fn serve_requests(svc: &PeerService, conn: &mut (impl BulkIo + 'static)) -> io::Result<()> {
    loop {
        let mut h = [0u8; 8];
        match tokio::time::timeout(SERVER_IDLE, conn.read_exact(&mut h)).await {
            Err(_) => return Ok(()),
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(r) => r?,
        };
        let (op, flags) = (h[0], h[1]);
        let meta_len = u16::from_le_bytes([h[2], h[3]]) as usize;
        let data_len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
        let framing = if op != OP_PUT_SHARD {
            Some(format!("unknown bulk operation {op}"))
        } else if meta_len > MAX_META || data_len > MAX_DATA {
            Some(format!("shard header of {meta_len} bytes and data of {data_len} bytes (at most {MAX_META} and {MAX_DATA})"))
        } else {
            None
        };
        if let Some(why) = framing {
            answer(conn, &Err(Status::invalid_argument(why))).await?;
            return Err(io::Error::new(io::ErrorKind::InvalidData, "unframeable bulk request"));
        }
        let body = async {
            let mut meta = vec![0u8; meta_len];
            conn.read_exact(&mut meta).await?;
            let mut data = BytesMut::with_capacity(data_len);
            while data.len() < data_len {
                let want = data_len - data.len();
                if conn.read_buf(&mut (&mut data).limit(want)).await? == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
            }
            Ok::<_, io::Error>((meta, data.freeze()))
        };
        let (meta, data) = tokio::time::timeout(BODY_TIMEOUT, body)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "bulk request body not sent within 20 s"))??;
        let r = svc.take_shard(meta, data, flags & FLAG_LAZY != 0).await;
        answer(conn, &r).await?;
    }
}

async fn answer(conn: &mut (impl BulkIo + 'static), r: &Result<(), Status>) -> io::Result<()> {
    let (code, msg) = match r {
        Ok(()) => (0u8, ""),
        Err(s) => (s.code() as i32 as u8, s.message()),
    };
    let msg = &msg.as_bytes()[..msg.len().min(MAX_MESSAGE)];
    let mut out = Vec::with_capacity(5 + msg.len());
    out.push(code);
    out.extend_from_slice(&(msg.len() as u32).to_le_bytes());
    out.extend_from_slice(msg);
    conn.write_all(&out).await?;
    conn.flush().await
}

// ---------------------------------------------------------------- the client's side

/// Why a bulk exchange failed.
#[derive(Debug)]
pub enum BulkError {
    /// The peer answered with this status.
    Status(Status),
    /// The connection failed (connect, TLS, I/O, framing of the answer).
    Io(io::Error),
}

type Pooled = (Instant, Box<dyn BulkIo>);

/// Bulk connections to other peers: idle ones kept per address, a new one opened
/// whenever all are busy.
pub struct BulkPool {
    idle: Mutex<HashMap<NetAddr, Vec<Pooled>>>,
    tls: Option<tokio_rustls::TlsConnector>,
}

impl BulkPool {
    pub fn new(tls: Option<Arc<tokio_rustls::rustls::ClientConfig>>) -> BulkPool {
        BulkPool { idle: Mutex::new(HashMap::new()), tls: tls.map(tokio_rustls::TlsConnector::from) }
    }

    /// Stores a shard at `addr` (the caller bounds the time). Retried once on a fresh
    /// connection when a reused one fails before the answer: the peer may have closed it.
    pub async fn put_shard(&self, addr: &NetAddr, meta: &[u8], data: &[u8], lazy: bool) -> Result<(), BulkError> {
        if meta.len() > MAX_META || data.len() > MAX_DATA {
            return Err(BulkError::Status(Status::invalid_argument(format!("a shard of {} bytes with a {}-byte header is too large to send", data.len(), meta.len()))));
        }
        let mut head = Vec::with_capacity(8 + meta.len());
        head.extend_from_slice(&[OP_PUT_SHARD, if lazy { FLAG_LAZY } else { 0 }]);
        head.extend_from_slice(&(meta.len() as u16).to_le_bytes());
        head.extend_from_slice(&(data.len() as u32).to_le_bytes());
        head.extend_from_slice(meta);
        if let Some(mut c) = self.take_idle(addr) {
            match exchange(&mut c, &head, data).await {
                Ok(r) => {
                    self.give_back(addr, c);
                    return r.map_err(BulkError::Status);
                }
                Err(e) => log::debug!("{addr}: reused bulk connection failed ({e}); retrying on a new one"),
            }
        }
        let mut c = self.connect(addr).await.map_err(BulkError::Io)?;
        let r = exchange(&mut c, &head, data).await.map_err(BulkError::Io)?;
        self.give_back(addr, c);
        r.map_err(BulkError::Status)
    }

    fn take_idle(&self, addr: &NetAddr) -> Option<Box<dyn BulkIo>> {
        let mut m = self.idle.lock();
        let v = m.get_mut(addr)?;
        v.retain(|(t, _)| t.elapsed() < CLIENT_IDLE);
        v.pop().map(|(_, c)| c)
    }

    fn give_back(&self, addr: &NetAddr, c: Box<dyn BulkIo>) {
        let mut m = self.idle.lock();
        let v = m.entry(addr.clone()).or_default();
        if v.len() < MAX_IDLE_PER_PEER {
            v.push((Instant::now(), c));
        }
    }

    async fn connect(&self, addr: &NetAddr) -> io::Result<Box<dyn BulkIo>> {
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&**addr))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("no TCP connection within {} ms", CONNECT_TIMEOUT.as_millis())))??;
        // The answer is small and must not wait for Nagle + delayed ACK.
        tcp.set_nodelay(true)?;
        let mut c: Box<dyn BulkIo> = match &self.tls {
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
        Ok(c)
    }
}

/// One request and its answer. Err: the connection failed; Ok(Err): the peer refused.
async fn exchange(c: &mut Box<dyn BulkIo>, head: &[u8], data: &[u8]) -> io::Result<Result<(), Status>> {
    c.write_all(head).await?;
    c.write_all(data).await?;
    c.flush().await?;
    let mut h = [0u8; 5];
    c.read_exact(&mut h).await?;
    let len = u32::from_le_bytes([h[1], h[2], h[3], h[4]]) as usize;
    if len > MAX_MESSAGE {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("bulk answer with a {len}-byte message")));
    }
    let mut msg = vec![0u8; len];
    c.read_exact(&mut msg).await?;
    Ok(match h[0] {
        0 => Ok(()),
        code => Err(Status::new(tonic::Code::from_i32(code as i32), String::from_utf8_lossy(&msg).into_owned())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sniffing_tells_the_lane_and_gives_grpc_its_bytes_back() {
        let (mut a, b) = tokio::io::duplex(1024);
        a.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
        let Sniffed::Other(mut p) = sniff(b).await.unwrap() else { panic!("an HTTP/2 preface taken for the bulk lane") };
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
        let Sniffed::Bulk(mut s) = sniff(b).await.unwrap() else { panic!("the bulk magic not recognised") };
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
