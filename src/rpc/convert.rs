//! Protobuf <-> domain conversion with validation. Every length, id and count that
//! arrives from the network is checked here.

use super::pb;
use super::{NetAddr, MAX_ADDR_LEN, MAX_CONTACTS};
use crate::ring::{Contact, Id, NeighborsInfo, Route};
use tonic::Status;

pub fn id_from(bytes: &[u8], what: &str) -> Result<Id, Status> {
    Id::from_slice(bytes)
        .ok_or_else(|| Status::invalid_argument(format!("{what} must be 20 bytes, got {}", bytes.len())))
}

pub fn addr_from(s: &str) -> Result<NetAddr, Status> {
    if s.is_empty() || s.len() > MAX_ADDR_LEN || !s.contains(':') || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(Status::invalid_argument(format!("bad peer address {:?}", truncate(s))));
    }
    Ok(NetAddr::from(s))
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

pub fn contact_from(c: &pb::Contact) -> Result<Contact<NetAddr>, Status> {
    Ok(Contact { id: id_from(&c.vnode_id, "contact vnode_id")?, addr: addr_from(&c.addr)? })
}

pub fn contact_opt_from(c: &Option<pb::Contact>) -> Result<Option<Contact<NetAddr>>, Status> {
    c.as_ref().map(contact_from).transpose()
}

pub fn contacts_from(list: &[pb::Contact]) -> Result<Vec<Contact<NetAddr>>, Status> {
    if list.len() > MAX_CONTACTS {
        return Err(Status::invalid_argument(format!("{} contacts, at most {MAX_CONTACTS}", list.len())));
    }
    list.iter().map(contact_from).collect()
}

pub fn contact_to(c: &Contact<NetAddr>) -> pb::Contact {
    pb::Contact { vnode_id: c.id.to_bytes().to_vec(), addr: c.addr.to_string() }
}

pub fn contacts_to(list: &[Contact<NetAddr>]) -> Vec<pb::Contact> {
    list.iter().map(contact_to).collect()
}

pub fn route_to(r: &Route<NetAddr>) -> pb::FindNextResponse {
    match r {
        Route::Found { owner, successors, arc_from } => pb::FindNextResponse {
            found: true,
            owner: Some(contact_to(owner)),
            successors: contacts_to(successors),
            next: Vec::new(),
            arc_from: arc_from.map(|f| f.to_bytes().to_vec()).unwrap_or_default(),
        },
        Route::Next(list) => pb::FindNextResponse { found: false, owner: None, successors: Vec::new(), next: contacts_to(list), arc_from: Vec::new() },
    }
}

pub fn route_from(r: &pb::FindNextResponse) -> Result<Route<NetAddr>, Status> {
    if r.found {
        let owner = r.owner.as_ref().ok_or_else(|| Status::invalid_argument("found without owner"))?;
        let arc_from = if r.arc_from.is_empty() { None } else { Some(id_from(&r.arc_from, "arc_from")?) };
        Ok(Route::Found { owner: contact_from(owner)?, successors: contacts_from(&r.successors)?, arc_from })
    } else {
        Ok(Route::Next(contacts_from(&r.next)?))
    }
}

pub fn neighbors_to(n: &NeighborsInfo<NetAddr>) -> pb::NeighborsResponse {
    pb::NeighborsResponse {
        predecessor: n.pred.as_ref().map(contact_to),
        successors: contacts_to(&n.succ),
        peer_capacity_bytes: n.peer_capacity_bytes,
        peer_keyspace_share: n.peer_share,
        vnode_exists: n.vnode_exists,
        largest_arc_pred: n.largest_arc.map(|(p, _)| p.to_bytes().to_vec()).unwrap_or_default(),
        largest_arc_vnode: n.largest_arc.map(|(_, v)| v.to_bytes().to_vec()).unwrap_or_default(),
    }
}

pub fn neighbors_from(n: &pb::NeighborsResponse) -> Result<NeighborsInfo<NetAddr>, Status> {
    let share = n.peer_keyspace_share;
    if !share.is_finite() || !(0.0..=1.0 + 1e-9).contains(&share) {
        return Err(Status::invalid_argument(format!("keyspace share {share} outside 0..1")));
    }
    if n.peer_capacity_bytes > crate::rpc::MAX_PEER_CAPACITY {
        return Err(Status::invalid_argument(format!("peer capacity {} bytes is over the limit of {}", n.peer_capacity_bytes, crate::rpc::MAX_PEER_CAPACITY)));
    }
    Ok(NeighborsInfo {
        vnode_exists: n.vnode_exists,
        pred: contact_opt_from(&n.predecessor)?,
        succ: contacts_from(&n.successors)?,
        peer_capacity_bytes: n.peer_capacity_bytes,
        peer_share: share,
        largest_arc: match (n.largest_arc_pred.is_empty(), n.largest_arc_vnode.is_empty()) {
            (true, true) => None,
            _ => Some((id_from(&n.largest_arc_pred, "largest_arc_pred")?, id_from(&n.largest_arc_vnode, "largest_arc_vnode")?)),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_ids_and_addrs_are_invalid_argument() {
        assert_eq!(id_from(&[1, 2, 3], "key").unwrap_err().code(), tonic::Code::InvalidArgument);
        assert!(id_from(&[0u8; 20], "key").is_ok());
        for bad in ["", "nocolon", "a b:1", &"x".repeat(300)] {
            assert_eq!(addr_from(bad).unwrap_err().code(), tonic::Code::InvalidArgument, "{bad:?}");
        }
        let too_many = vec![pb::Contact { vnode_id: vec![0; 20], addr: "h:1".into() }; MAX_CONTACTS + 1];
        assert!(contacts_from(&too_many).is_err());
        let bad_share = pb::NeighborsResponse { peer_keyspace_share: f64::NAN, ..Default::default() };
        assert!(neighbors_from(&bad_share).is_err());
        let half_arc = pb::NeighborsResponse { largest_arc_pred: vec![0; 20], ..Default::default() };
        assert_eq!(neighbors_from(&half_arc).unwrap_err().code(), tonic::Code::InvalidArgument);
        let found_without_owner = pb::FindNextResponse { found: true, ..Default::default() };
        assert!(route_from(&found_without_owner).is_err());
    }

    #[test]
    fn route_roundtrips() {
        let c = Contact { id: Id::sha1(b"x"), addr: NetAddr::from("127.0.0.1:1") };
        let r = Route::Found { owner: c.clone(), successors: vec![c.clone()], arc_from: Some(Id::sha1(b"y")) };
        assert_eq!(route_from(&route_to(&r)).unwrap(), r);
        let r = Route::Found { owner: c.clone(), successors: vec![c.clone()], arc_from: None };
        assert_eq!(route_from(&route_to(&r)).unwrap(), r);
        let r = Route::Next(vec![c]);
        assert_eq!(route_from(&route_to(&r)).unwrap(), r);
    }
}

pub fn code_from(k: u32, m: u32) -> Result<crate::erasure::Code, Status> {
    let (Ok(k), Ok(m)) = (u8::try_from(k), u8::try_from(m)) else {
        return Err(Status::invalid_argument(format!("code {k}+{m} out of range")));
    };
    crate::erasure::Code::new(k, m).map_err(Status::invalid_argument)
}
