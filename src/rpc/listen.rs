//! A peer's incoming connections: accepted, rate-limited per source address (a storm of
//! connections or joins from one address is turned away before it costs anything), and,
//! in a ring with a secret, put through a mutual-TLS handshake that only members pass.
//! Every refusal is logged (at most once per address per LOG_EVERY, with a count).

use super::lane::{sniff, LaneServer, Prefixed, Sniffed};
use super::coalesce::Coalesce;
use crate::crypto::tls::RingTls;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::wrappers::ReceiverStream;

/// New connections one address may open at once, and per second after that. Members
/// keep one long-lived connection to each other, so even a 50-peer ring in one process
/// (one source address) stays far below this.
const BURST: f64 = 256.0;
const PER_SECOND: f64 = 64.0;
/// Handshakes in progress at once, and how long one may take.
const MAX_HANDSHAKES: usize = 128;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
const LOG_EVERY: Duration = Duration::from_secs(10);

#[derive(Default)]
struct PerAddr {
    tokens: f64,
    last: Option<Instant>,
    /// Per kind of refusal: refusals not yet reported, and when one last was.
    refused: [u64; 2],
    logged: [Option<Instant>; 2],
}

/// Why a connection was turned away (each kind is reported on its own).
#[derive(Clone, Copy)]
enum Refusal {
    /// Too many connections or handshakes from one address.
    Storm = 0,
    /// The handshake failed: not a member.
    Handshake = 1,
}

/// Per-address token buckets and log throttling.
#[derive(Default)]
pub struct Gate {
    addrs: Mutex<HashMap<IpAddr, PerAddr>>,
}

impl Gate {
    /// Whether a new connection from `ip` may proceed now.
    pub fn admit(&self, ip: IpAddr, now: Instant) -> bool {
        let mut m = self.addrs.lock();
        if m.len() > 65_536 {
            m.retain(|_, a| a.last.is_some_and(|t| now.duration_since(t) < Duration::from_secs(60)));
        }
        let a = m.entry(ip).or_default();
        a.tokens = match a.last {
            None => BURST,
            Some(t) => (a.tokens + now.duration_since(t).as_secs_f64() * PER_SECOND).min(BURST),
        };
        a.last = Some(now);
        if a.tokens >= 1.0 {
            a.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Logs a refusal of `ip`, unless one of its kind was logged recently (then it is
    /// counted, and the count goes with the next report).
    fn refused(&self, ip: IpAddr, kind: Refusal, why: &str) {
        let now = Instant::now();
        let k = kind as usize;
        let mut m = self.addrs.lock();
        let a = m.entry(ip).or_default();
        a.refused[k] += 1;
        if a.logged[k].is_none_or(|t| now.duration_since(t) >= LOG_EVERY) {
            a.logged[k] = Some(now);
            let n = std::mem::take(&mut a.refused[k]);
            if n > 1 {
                log::warn!("refused a connection from {ip}: {why} ({n} refused since the last report)");
            } else {
                log::warn!("refused a connection from {ip}: {why}");
            }
        }
    }
}

fn nodelay(s: &TcpStream) {
    // Small replies must not wait for Nagle + delayed ACK (40 ms each on Linux).
    if let Err(e) = s.set_nodelay(true) {
        log::debug!("TCP_NODELAY: {e}");
    }
}

/// The next connection the gate lets in (TCP_NODELAY set, each flush sent as one send:
/// see `coalesce`); refusals are logged.
async fn next_admitted(listener: &TcpListener, gate: &Gate) -> (Conn, std::net::SocketAddr) {
    loop {
        let (s, from) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                log::warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if !gate.admit(from.ip(), Instant::now()) {
            gate.refused(from.ip(), Refusal::Storm, "too many connections from one address");
            continue;
        }
        nodelay(&s);
        return (Coalesce::new(s), from);
    }
}

/// Plain connections (a ring without a secret), rate-limited. Lane connections go
/// to `lane`; the rest come out here for gRPC.
pub fn plain(listener: TcpListener, lane: LaneServer) -> ReceiverStream<Result<GrpcConn, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let gate = Gate::default();
    tokio::spawn(async move {
        loop {
            let (s, _) = next_admitted(&listener, &gate).await;
            if tx.is_closed() {
                return;
            }
            tokio::spawn(route(s, lane.clone(), tx.clone()));
        }
    });
    ReceiverStream::new(rx)
}

/// Hands a connection to the direct lane or to gRPC by its first bytes.
async fn route<S>(s: S, lane: LaneServer, tx: tokio::sync::mpsc::Sender<Result<Prefixed<S>, std::io::Error>>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    match sniff(s).await {
        Ok(Sniffed::Lane(s)) => lane.serve(s).await,
        Ok(Sniffed::Other(s)) => {
            let _ = tx.send(Ok(s)).await;
        }
        Err(e) => log::debug!("a new connection: {e}"),
    }
}

pub type Conn = Coalesce<TcpStream>;
pub type GrpcConn = Prefixed<Conn>;
pub type TlsConn = Prefixed<tokio_rustls::server::TlsStream<Conn>>;

/// Connections from members only: each must complete a mutual-TLS handshake under the
/// ring's authority. Lane connections (inside TLS) go to `lane`.
pub fn tls(listener: TcpListener, tls: Arc<RingTls>, lane: LaneServer) -> ReceiverStream<Result<TlsConn, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let gate = Arc::new(Gate::default());
    let acceptor = tls.acceptor();
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let (s, from) = next_admitted(&listener, &gate).await;
            if tx.is_closed() {
                return;
            }
            let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                gate.refused(from.ip(), Refusal::Storm, "too many handshakes in progress");
                continue;
            };
            let (acceptor, tx, gate, ring, lane) = (acceptor.clone(), tx.clone(), gate.clone(), tls.ring_id.clone(), lane.clone());
            tokio::spawn(async move {
                let r = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(s)).await;
                drop(permit);
                match r {
                    Ok(Ok(conn)) => route(conn, lane, tx).await,
                    Ok(Err(e)) => gate.refused(from.ip(), Refusal::Handshake, &format!("TLS handshake failed: {e} (not a member of ring {ring}?)")),
                    Err(_) => gate.refused(from.ip(), Refusal::Handshake, "TLS handshake not finished in 5 s"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_storm_from_one_address_is_cut_and_others_pass() {
        let g = Gate::default();
        let t0 = Instant::now();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let admitted = (0..10_000).filter(|_| g.admit(a, t0)).count();
        assert_eq!(admitted, BURST as usize);
        assert!(g.admit(b, t0), "another address is not affected");
        // One second later the bucket has refilled by PER_SECOND.
        let t1 = t0 + Duration::from_secs(1);
        let later = (0..10_000).filter(|_| g.admit(a, t1)).count();
        assert_eq!(later, PER_SECOND as usize);
    }
}
