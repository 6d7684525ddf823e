//! Ring messages as domain types. The rpc module converts them to and from protobuf;
//! the in-memory network passes them as they are.

use super::id::Id;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Contact<A> {
    /// The vnode's position on the ring.
    pub id: Id,
    /// The peer that runs it.
    pub addr: A,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Route<A> {
    /// `owner` owns the key; `successors` follow it on the ring (closest first). The
    /// owner's whole arc is (`arc_from`, owner] as far as the answering peer knows (None:
    /// it does not know), so a client can place every key of that arc without asking again.
    Found { owner: Contact<A>, successors: Vec<Contact<A>>, arc_from: Option<Id> },
    /// Ask one of these next, best (closest preceding the key) first.
    Next(Vec<Contact<A>>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct NeighborsInfo<A> {
    pub vnode_exists: bool,
    pub pred: Option<Contact<A>>,
    pub succ: Vec<Contact<A>>,
    pub peer_capacity_bytes: u64,
    pub peer_share: f64,
    /// The peer's largest arc, (pred, vnode]: where a joiner that finds the peer
    /// over-loaded cuts (the sampled arc itself may be tiny).
    pub largest_arc: Option<(Id, Id)>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum RingRequest<A> {
    /// `avoid`: peers the asker found dead during this lookup.
    FindNext { key: Id, avoid: Vec<A> },
    Neighbors { vnode: Id },
    Notify { vnode: Id, candidate: Contact<A>, as_successor: bool },
    Fingers { vnode: Id },
    Leave { vnode: Id, leaving: Contact<A>, new_pred: Option<Contact<A>>, new_succ: Vec<Contact<A>> },
    Ping,
}

#[derive(Clone, Debug, PartialEq)]
pub enum RingResponse<A> {
    Route(Route<A>),
    Neighbors(NeighborsInfo<A>),
    Notified(bool),
    Fingers(Vec<Contact<A>>),
    Ok,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NetError {
    #[error("peer unreachable: {0}")]
    Unreachable(String),
    #[error("call timed out after {0} ms")]
    Timeout(u64),
    #[error("peer refused: {0}")]
    Refused(String),
    #[error("unexpected answer: {0}")]
    Protocol(String),
}
