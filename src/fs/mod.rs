//! The filesystem: `mutualstore-fs mount`. Inodes and directories are records on the
//! ring (`meta`), file content is chunks stored as erasure-coded stripes (`erasure`).
//!
//! - `inode`: the stored inode format and directory-entry helpers
//! - `chunk`: chunk stripes, the chunk cache, reclaiming unreferenced stripes
//! - `file`: an open file's unpublished writes and its reads
//! - `ops`: the operations, async and FUSE-free
//! - `fuse`: the fuser binding and the errno mapping
//! - `mount`: the `mount` command

pub mod chunk;
pub mod error;
pub mod file;
pub mod fuse;
pub mod inode;
pub mod lease;
pub mod mount;
pub mod ops;
