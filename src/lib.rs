//! MutualStore: a peer-to-peer storage ring. See ARCHITECTURE.md for the map.
pub mod blockstore;
pub mod crypto;
pub mod erasure;
pub mod ring;
pub mod sim;
pub mod rpc;
pub mod identity;
pub mod peer;
pub mod files;
pub mod meta;
pub mod fs;
pub mod status;
