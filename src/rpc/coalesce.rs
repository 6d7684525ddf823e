//! A TCP stream that sends what was written between two flushes as one send, and lets a
//! small flush wait one turn of the scheduler for the bytes that usually follow it. Both
//! ends use it: tonic channels connect through `Connector`, peers accept into `Coalesce`.
//!
//! Why: hyper's HTTP/2 client writes a request's HEADERS when the stream opens and its
//! DATA when a second task has piped the body, and flushes each on its own; through TLS
//! that is two records and two sends for every small call (strace of cold small-file
//! reads: 12.5 sends per file from the mount, and two per answer from a peer). Here the
//! HEADERS wait until the connection task has been polled once more, by which time the
//! DATA has joined them: the mount's sends fell by two thirds, and its CPU and the
//! peers' by about a tenth. Bulk transfers are neither held nor copied: only writes that
//! add up to less than HOLD_BELOW are gathered.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use super::CONNECT_TIMEOUT;

/// Writes are gathered while they add up to less than this, and a flush of them waits
/// one scheduler turn for more; anything larger goes straight to the socket.
const HOLD_BELOW: usize = 4 << 10;

pub struct Coalesce<T> {
    io: T,
    buf: Vec<u8>,
    /// How much of `buf` is already sent.
    sent: usize,
    /// The current flush has already waited its turn.
    held: bool,
}

impl<T> Coalesce<T> {
    pub fn new(io: T) -> Self {
        Coalesce { io, buf: Vec::new(), sent: 0, held: false }
    }

}

impl<T: AsyncWrite + Unpin> Coalesce<T> {
    fn pending(&self) -> usize {
        self.buf.len() - self.sent
    }

    /// Sends everything buffered.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.buf.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.buf[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.buf.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesce<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, out)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesce<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(data)])
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if me.pending() + total >= HOLD_BELOW {
            // Not small: what is held goes first, then this, uncopied.
            ready!(me.poll_drain(cx))?;
            if total >= HOLD_BELOW {
                return Pin::new(&mut me.io).poll_write_vectored(cx, bufs);
            }
        }
        for b in bufs {
            me.buf.extend_from_slice(b);
        }
        Poll::Ready(Ok(total))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        let pending = me.pending();
        if pending > 0 && pending < HOLD_BELOW && !me.held {
            // Woken at once: the task runs again after whatever else is ready (the body
            // pipe), never later.
            me.held = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        ready!(me.poll_drain(cx))?;
        me.held = false;
        Pin::new(&mut me.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        ready!(me.poll_drain(cx))?;
        Pin::new(&mut me.io).poll_shutdown(cx)
    }
}

impl<T: tonic::transport::server::Connected> tonic::transport::server::Connected for Coalesce<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// Connects TCP for a tonic channel (TLS, when configured, goes on top).
#[derive(Clone, Copy, Default)]
pub struct Connector;

impl tonic::codegen::Service<tonic::codegen::http::Uri> for Connector {
    type Response = hyper_util::rt::TokioIo<Coalesce<TcpStream>>;
    type Error = io::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: tonic::codegen::http::Uri) -> Self::Future {
        Box::pin(async move {
            let host = uri.host().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("no host in {uri}")))?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let port = uri.port_u16().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("no port in {uri}")))?;
            // Bounds the TCP connect only, as tonic's own connector did: a TLS handshake
            // with a peer that accepted and then went silent (frozen) is left to the
            // call's deadline, a timeout, not a refusal that keeps the peer out of
            // successor lists for REFUSED_TTL_MS (bounding both here made a frozen
            // peer look refused).
            let s = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((host, port))).await {
                Ok(s) => s?,
                Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, format!("no TCP connection to {host}:{port} within {CONNECT_TIMEOUT:?}"))),
            };
            s.set_nodelay(true)?;
            Ok(hyper_util::rt::TokioIo::new(Coalesce::new(s)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Counts the writes that reach the inner stream.
    struct Counting {
        writes: Vec<Vec<u8>>,
    }

    impl AsyncWrite for Counting {
        fn poll_write(mut self: Pin<&mut Self>, _cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
            self.writes.push(data.to_vec());
            Poll::Ready(Ok(data.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn small_flushes_are_held_one_turn_and_sent_as_one_write() {
        let mut c = Coalesce::new(Counting { writes: Vec::new() });
        c.write_all(b"headers").await.unwrap();
        // The first poll of the flush holds the bytes back...
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(Pin::new(&mut c).poll_flush(&mut cx).is_pending());
        assert!(c.io.writes.is_empty());
        // ...more bytes join them, and the next flush sends both at once.
        c.write_all(b"+data").await.unwrap();
        c.flush().await.unwrap();
        assert_eq!(c.io.writes, vec![b"headers+data".to_vec()]);
        // Nothing left: a flush passes straight through.
        c.flush().await.unwrap();
        assert_eq!(c.io.writes.len(), 1);
    }

    #[tokio::test]
    async fn big_writes_bypass_the_buffer_in_order() {
        let mut c = Coalesce::new(Counting { writes: Vec::new() });
        c.write_all(b"small").await.unwrap();
        let big = vec![7u8; 64 << 10];
        c.write_all(&big).await.unwrap();
        c.write_all(b"tail").await.unwrap();
        c.write_all(&vec![1u8; HOLD_BELOW]).await.unwrap();
        c.flush().await.unwrap();
        let sizes: Vec<usize> = c.io.writes.iter().map(|w| w.len()).collect();
        // What was held goes before the big write; the big ones go out whole, uncopied.
        assert_eq!(sizes, vec![5, 64 << 10, 4, HOLD_BELOW]);
        let all: Vec<u8> = c.io.writes.concat();
        assert_eq!(&all[..5], b"small");
        assert_eq!(&all[5 + (64 << 10)..][..4], b"tail");
        c.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn bytes_arrive_intact_over_a_real_socket() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let reader = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            got
        });
        let mut c = Coalesce::new(TcpStream::connect(addr).await.unwrap());
        let mut want = Vec::new();
        for i in 0..200u32 {
            let piece = vec![(i % 251) as u8; (i as usize * 997) % 150_000];
            c.write_all(&piece).await.unwrap();
            want.extend_from_slice(&piece);
            if i % 3 == 0 {
                c.flush().await.unwrap();
            }
        }
        c.shutdown().await.unwrap();
        assert_eq!(reader.await.unwrap(), want);
    }
}
