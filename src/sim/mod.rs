//! In-process networks of ring nodes: the seeded fault-injecting network used by tests
//! and the large-scale simulation behind `mutualstore-fs sim`.
pub mod net;
pub mod run;
