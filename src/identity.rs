//! A peer's persistent identity: its id, its vnode positions and the capacity they were
//! chosen for. Stored as JSON in the data directory (written to a temp file, fsynced,
//! renamed), so a restarted peer comes back at the same places on the ring.

use crate::ring::Id;
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const IDENTITY_FILE: &str = "identity.json";
pub const IDENTITY_FORMAT: u32 = 1;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Identity {
    pub format: u32,
    pub peer_id: String,
    pub vnode_ids: Vec<String>,
    pub capacity_bytes: u64,
    /// The erasure code of the ring this peer belongs to ("4+2"), fixed at ring creation.
    #[serde(default)]
    pub ring_code: Option<String>,
}

impl Identity {
    pub fn new(peer_id: Id, vnodes: &[Id], capacity_bytes: u64) -> Identity {
        Identity {
            format: IDENTITY_FORMAT,
            peer_id: peer_id.to_hex(),
            vnode_ids: vnodes.iter().map(|v| v.to_hex()).collect(),
            capacity_bytes,
            ring_code: None,
        }
    }

    pub fn path(dir: &Path) -> PathBuf {
        dir.join(IDENTITY_FILE)
    }

    pub fn load(dir: &Path) -> Result<Option<Identity>, String> {
        let p = Self::path(dir);
        let text = match fs::read_to_string(&p) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("cannot read {}: {e}", p.display())),
        };
        let id: Identity = serde_json::from_str(&text).map_err(|e| format!("{} is not a valid identity: {e}", p.display()))?;
        if id.format != IDENTITY_FORMAT {
            return Err(format!("{}: identity format {} is not supported (want {IDENTITY_FORMAT})", p.display(), id.format));
        }
        id.peer_id()?;
        let v = id.vnodes()?;
        if v.is_empty() {
            return Err(format!("{}: no vnodes", p.display()));
        }
        Ok(Some(id))
    }

    pub fn save(&self, dir: &Path) -> Result<(), String> {
        let p = Self::path(dir);
        let tmp = dir.join(format!("{IDENTITY_FILE}.tmp"));
        let body = serde_json::to_string_pretty(self).map_err(|e| e.to_string())?;
        let write = || -> std::io::Result<()> {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(body.as_bytes())?;
            f.sync_all()?;
            fs::rename(&tmp, &p)?;
            fs::File::open(dir)?.sync_all()
        };
        write().map_err(|e| format!("cannot write {}: {e}", p.display()))
    }

    pub fn peer_id(&self) -> Result<Id, String> {
        Id::from_hex(&self.peer_id).ok_or_else(|| format!("bad peer id {:?}", self.peer_id))
    }

    pub fn vnodes(&self) -> Result<Vec<Id>, String> {
        self.vnode_ids.iter().map(|s| Id::from_hex(s).ok_or_else(|| format!("bad vnode id {s:?}"))).collect()
    }
}
