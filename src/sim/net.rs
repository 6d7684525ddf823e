//! The in-memory network: N ring nodes in one process behind the same `Transport`
//! trait the gRPC peers use, with seeded fault controls (drop, partition, kill).
//!
//! Owns: delivery of ring requests between in-process nodes and the fault model. Every
//! call completes synchronously, so the protocol futures are always ready and a seeded
//! run driven from one thread (as the tests do) replays exactly.

use crate::ring::driver::Transport;
use crate::ring::{NetError, Node, RingRequest, RingResponse};
use parking_lot::Mutex;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

pub type SimAddr = u32;

pub struct SimNet {
    pub nodes: Vec<Arc<Mutex<Node<SimAddr>>>>,
    alive: Vec<bool>,
    /// Partition group per node; calls between different groups fail.
    group: Vec<u32>,
    drop_probability: f64,
    rng: Mutex<SmallRng>,
    pub now_ms: u64,
    pub calls: AtomicU64,
}

impl SimNet {
    pub fn new(seed: u64) -> Self {
        SimNet {
            nodes: Vec::new(),
            alive: Vec::new(),
            group: Vec::new(),
            drop_probability: 0.0,
            rng: Mutex::new(SmallRng::seed_from_u64(seed)),
            now_ms: 0,
            calls: AtomicU64::new(0),
        }
    }

    /// Adds a node; its address must be the next index.
    pub fn add(&mut self, node: Node<SimAddr>) -> SimAddr {
        let addr = self.nodes.len() as SimAddr;
        assert_eq!(node.addr, addr, "sim node address must equal its index");
        self.nodes.push(Arc::new(Mutex::new(node)));
        self.alive.push(true);
        self.group.push(0);
        addr
    }

    pub fn node(&self, a: SimAddr) -> &Arc<Mutex<Node<SimAddr>>> {
        &self.nodes[a as usize]
    }

    pub fn kill(&mut self, a: SimAddr) {
        self.alive[a as usize] = false;
    }

    pub fn revive(&mut self, a: SimAddr) {
        self.alive[a as usize] = true;
    }

    pub fn is_alive(&self, a: SimAddr) -> bool {
        self.alive[a as usize]
    }

    pub fn alive_addrs(&self) -> Vec<SimAddr> {
        (0..self.nodes.len() as SimAddr).filter(|&a| self.alive[a as usize]).collect()
    }

    /// Each call is lost with this probability (seeded).
    pub fn set_drop_probability(&mut self, p: f64) {
        self.drop_probability = p.clamp(0.0, 1.0);
    }

    /// Puts `members` in their own partition; everyone else stays in group 0.
    pub fn partition(&mut self, members: &[SimAddr], group: u32) {
        for &m in members {
            self.group[m as usize] = group;
        }
    }

    pub fn heal(&mut self) {
        self.group.iter_mut().for_each(|g| *g = 0);
    }

    fn deliver(&self, to: SimAddr, req: RingRequest<SimAddr>) -> Result<RingResponse<SimAddr>, NetError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let i = to as usize;
        if i >= self.nodes.len() || !self.alive[i] {
            return Err(NetError::Unreachable(format!("sim node {to} is down")));
        }
        if self.drop_probability > 0.0 && self.rng.lock().gen::<f64>() < self.drop_probability {
            return Err(NetError::Timeout(0));
        }
        Ok(self.nodes[i].lock().handle(req, self.now_ms))
    }

    /// Like `deliver`, but also refuses calls across a partition.
    fn deliver_from(&self, from: Option<SimAddr>, to: SimAddr, req: RingRequest<SimAddr>) -> Result<RingResponse<SimAddr>, NetError> {
        if let Some(f) = from {
            if self.group.get(f as usize) != self.group.get(to as usize) {
                return Err(NetError::Unreachable(format!("partition between {f} and {to}")));
            }
        }
        self.deliver(to, req)
    }

    /// A transport as seen by node `from` (partitions apply to it).
    pub fn endpoint(&self, from: SimAddr) -> Endpoint<'_> {
        Endpoint { net: self, from: Some(from) }
    }

    /// A transport for a client outside every partition.
    pub fn client(&self) -> Endpoint<'_> {
        Endpoint { net: self, from: None }
    }
}

pub struct Endpoint<'a> {
    net: &'a SimNet,
    from: Option<SimAddr>,
}

impl Transport<SimAddr> for Endpoint<'_> {
    fn call(
        &self,
        to: &SimAddr,
        req: RingRequest<SimAddr>,
    ) -> impl Future<Output = Result<RingResponse<SimAddr>, NetError>> + Send {
        std::future::ready(self.net.deliver_from(self.from, *to, req))
    }
}

/// Runs a protocol future over the in-memory network to completion. Every in-memory
/// call is ready at once, so one poll suffices.
pub fn run_ready<F: Future>(fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    let mut cx = Context::from_waker(Waker::noop());
    match fut.as_mut().poll(&mut cx) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("in-memory transport futures are always ready; a protocol awaited something else"),
    }
}
