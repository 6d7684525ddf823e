//! `status`: walks the ring from one peer (following every vnode's successor list) and
//! reports each peer's share of the keyspace next to its share of the capacity.

use crate::ring::driver::neighbors;
use crate::ring::Contact;
use crate::rpc::client::GrpcNet;
use crate::rpc::{NetAddr, PROTOCOL_VERSION};
use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};

/// Stop walking after this many peers (a status table of more is not for people).
const MAX_STATUS_PEERS: usize = 100_000;

#[derive(Clone, Debug, Serialize)]
pub struct PeerRow {
    pub id: String,
    pub addr: String,
    pub vnodes: usize,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub blocks: u64,
    pub keyspace_share: f64,
    pub capacity_share: f64,
    pub alive: bool,
    /// Stripes this peer coordinates, and of those the degraded ones.
    pub stripes: u64,
    pub degraded_stripes: u64,
    pub repair_queue: u64,
    pub draining: bool,
}

/// Ring-wide stripe health, summed over the peers (each stripe is counted by one peer).
#[derive(Clone, Debug, Default, Serialize)]
pub struct StripeHealth {
    pub stripes_total: u64,
    pub degraded_stripes: u64,
    /// Stripes with only k shards left: one more loss makes them unreadable.
    pub stripes_at_risk: u64,
    pub repair_queue: u64,
    pub repair_bytes_per_sec: f64,
    pub repaired_shards: u64,
    pub repaired_bytes: u64,
    pub moved_shards: u64,
    pub moved_bytes: u64,
    /// Stripes whose ring has fewer than k+m peers to hold them.
    pub unplaceable_stripes: u64,
    /// Every live peer has finished at least one upkeep scan (the figures are current).
    pub scanned: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct RingStatus {
    pub peers: Vec<PeerRow>,
    pub ring_size: usize,
    pub protocol_version: u32,
    /// The ring's erasure code, "k+m".
    pub code: String,
    pub code_k: u32,
    pub code_m: u32,
    #[serde(flatten)]
    pub health: StripeHealth,
}

pub async fn collect(net: &GrpcNet, join: &NetAddr) -> Result<RingStatus, String> {
    let first = net.peer_info(join).await.map_err(|e| format!("cannot reach {join}: {e}"))?;
    let (code_k, code_m) = (first.code_k, first.code_m);
    let mut health = StripeHealth { scanned: true, ..StripeHealth::default() };
    let mut rows: BTreeMap<String, PeerRow> = BTreeMap::new();
    let mut queue: VecDeque<(NetAddr, Option<crate::rpc::pb::PeerInfoResponse>)> = VecDeque::new();
    queue.push_back((join.clone(), Some(first)));
    let mut seen: std::collections::HashSet<NetAddr> = std::collections::HashSet::new();
    seen.insert(join.clone());
    while let Some((addr, pre)) = queue.pop_front() {
        let info = match pre {
            Some(i) => Ok(i),
            None => net.peer_info(&addr).await,
        };
        let Ok(info) = info else {
            rows.insert(addr.to_string(), PeerRow {
                id: String::from("?"),
                addr: addr.to_string(),
                vnodes: 0,
                capacity_bytes: 0,
                used_bytes: 0,
                blocks: 0,
                keyspace_share: 0.0,
                capacity_share: 0.0,
                alive: false,
                stripes: 0,
                degraded_stripes: 0,
                repair_queue: 0,
                draining: false,
            });
            continue;
        };
        let vnode_ids: Vec<crate::ring::Id> = info.vnode_ids.iter().filter_map(|v| crate::ring::Id::from_slice(v)).collect();
        for v in &vnode_ids {
            let c = Contact { id: *v, addr: addr.clone() };
            if let Ok(n) = neighbors(net, &c).await {
                for s in n.succ.iter().chain(n.pred.iter()) {
                    if seen.len() < MAX_STATUS_PEERS && seen.insert(s.addr.clone()) {
                        queue.push_back((s.addr.clone(), None));
                    }
                }
            }
        }
        let id = crate::ring::Id::from_slice(&info.peer_id).map(|i| i.to_hex()).unwrap_or_else(|| "?".into());
        let u = info.upkeep.unwrap_or_default();
        health.stripes_total += u.stripes;
        health.degraded_stripes += u.degraded;
        health.stripes_at_risk += u.at_risk;
        health.repair_queue += u.repair_queue;
        health.repair_bytes_per_sec += u.repair_bytes_per_sec;
        health.repaired_shards += u.repaired_shards;
        health.repaired_bytes += u.repaired_bytes;
        health.moved_shards += u.moved_shards;
        health.moved_bytes += u.moved_bytes;
        health.unplaceable_stripes += u.unplaceable;
        health.scanned &= u.scans > 0;
        rows.insert(addr.to_string(), PeerRow {
            id,
            addr: addr.to_string(),
            vnodes: vnode_ids.len(),
            capacity_bytes: info.capacity_bytes,
            used_bytes: info.used_bytes,
            blocks: info.blocks,
            keyspace_share: info.keyspace_share,
            capacity_share: 0.0,
            alive: true,
            stripes: u.stripes,
            degraded_stripes: u.degraded,
            repair_queue: u.repair_queue,
            draining: info.draining,
        });
    }
    let total: f64 = rows.values().filter(|r| r.alive).map(|r| r.capacity_bytes as f64).sum();
    for r in rows.values_mut() {
        if r.alive && total > 0.0 {
            r.capacity_share = r.capacity_bytes as f64 / total;
        }
    }
    let peers: Vec<PeerRow> = rows.into_values().collect();
    let ring_size = peers.iter().filter(|r| r.alive).count();
    Ok(RingStatus { peers, ring_size, protocol_version: PROTOCOL_VERSION, code: format!("{code_k}+{code_m}"), code_k, code_m, health })
}

pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

pub fn table(st: &RingStatus) -> String {
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY);
    t.set_header(vec!["id", "address", "vnodes", "capacity", "used", "blocks", "keyspace", "capacity share", "stripes", "degraded", "alive"]);
    for p in &st.peers {
        t.add_row(vec![
            p.id.chars().take(8).collect::<String>(),
            p.addr.clone(),
            p.vnodes.to_string(),
            human_bytes(p.capacity_bytes),
            human_bytes(p.used_bytes),
            p.blocks.to_string(),
            format!("{:.1}%", p.keyspace_share * 100.0),
            format!("{:.1}%", p.capacity_share * 100.0),
            p.stripes.to_string(),
            p.degraded_stripes.to_string(),
            if !p.alive { "NO".into() } else if p.draining { "draining".into() } else { "yes".into() },
        ]);
    }
    let h = &st.health;
    format!(
        "{t}\nring: {} peers alive, protocol v{}, code {}\nstripes: {} total, {} degraded, {} at risk (only k shards left), {} unplaceable\nrepair: {} queued, {}/s now, {} shards ({}) rebuilt; {} shards ({}) moved by rebalance{}",
        st.ring_size,
        st.protocol_version,
        st.code,
        h.stripes_total,
        h.degraded_stripes,
        h.stripes_at_risk,
        h.unplaceable_stripes,
        h.repair_queue,
        human_bytes(h.repair_bytes_per_sec as u64),
        h.repaired_shards,
        human_bytes(h.repaired_bytes),
        h.moved_shards,
        human_bytes(h.moved_bytes),
        if h.scanned { "" } else { "\n(some peers have not finished an upkeep scan yet)" }
    )
}
