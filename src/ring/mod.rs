//! The Chord ring: ids, per-peer state, routing, maintenance and vnode placement.
//! Everything here is sans-I/O except through the `Transport` trait the caller provides.
pub mod driver;
pub mod id;
pub mod lookup;
pub mod msg;
pub mod node;
pub mod vnode_position;

pub use id::Id;
pub use msg::{Contact, NeighborsInfo, NetError, RingRequest, RingResponse, Route};
pub use node::{Addr, Node, RingConfig, Vnode};
