//! The wire: gRPC (tonic/prost) between peers and from clients. The only module that
//! knows protobuf types; everything crossing it is converted to domain types and
//! validated at the boundary (a bad message is `InvalidArgument`, never a panic).

pub mod lane;
pub mod client;
pub mod codec;
pub mod coalesce;
pub mod convert;
pub mod fault;
pub mod listen;
pub mod server;

pub mod pb {
    tonic::include_proto!("mutualstore.v1");
}

use std::sync::Arc;
use std::time::Duration;

/// Bumped whenever a message changes meaning. Exchanged in Hello; a peer refuses a joiner
/// that speaks another version.
pub const PROTOCOL_VERSION: u32 = 9;
/// Largest gRPC message either side accepts: one block plus headers.
pub const MAX_MESSAGE_BYTES: usize = crate::blockstore::MAX_DATA_BYTES + (1 << 20);
/// Deadline of a ring-maintenance call (FindNext, Neighbors, Notify, ...).
pub const RING_CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Deadline of a block transfer.
pub const BLOCK_CALL_TIMEOUT: Duration = Duration::from_secs(20);
/// Deadline of a record compare-and-swap: the primary's own calls to the replicas
/// (RING_CALL_TIMEOUT each, in parallel) fit inside it twice.
pub const RECORD_CAS_TIMEOUT: Duration = Duration::from_secs(5);
/// Most replicas a CAS request may name.
pub const MAX_RECORD_REPLICAS: usize = 16;
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Most stripes one Holdings request may ask about.
pub const MAX_HOLDINGS_STRIPES: usize = 4096;
/// Most records one GetRecords request may ask for.
pub const MAX_RECORDS_PER_CALL: usize = 1024;
/// A GetRecords answer stops carrying record data past this many bytes (the rest are
/// `skipped`), well inside MAX_MESSAGE_BYTES whatever the records' sizes.
pub const MAX_RECORDS_ANSWER_BYTES: usize = 8 << 20;
/// Longest "host:port" we accept in a message.
pub const MAX_ADDR_LEN: usize = 256;
/// Largest capacity a peer may declare (1 PiB): a claim beyond it is refused, so one
/// peer cannot make joiners place their vnodes around an absurd figure.
pub const MAX_PEER_CAPACITY: u64 = 1 << 50;
/// Most contacts one message may carry (successor lists, fingers).
pub const MAX_CONTACTS: usize = 512;

/// HTTP/2 flow control and framing, the same at both ends. hyper's defaults (a server
/// window of 1 MiB per stream and per connection, 16 KiB frames) made a 1 MiB shard
/// wait for a window update half-way, made the shards of concurrent stripes to one peer
/// take turns, and cut every shard into 64 frames, each parsed, woken for and copied on
/// its own. With these, a shard is one frame sent without waiting: CPU per GiB read
/// fell 1.5 → 1.25 s in the mount, per GiB written 3.3 → 2.85 s (BENCHMARKS.md, tenth
/// sitting). What the windows cost is memory only when a receiver stops reading.
pub const H2_STREAM_WINDOW: u32 = 4 << 20;
pub const H2_CONNECTION_WINDOW: u32 = 16 << 20;
pub const H2_MAX_FRAME: u32 = 1 << 20;

/// A peer's network address ("host:port"), cheap to clone.
pub type NetAddr = Arc<str>;
