//! Fuzz targets, driven by proptest: hostile bytes into every gRPC request decoder and the
//! handler behind it (on a real in-process peer), every response decoder a client trusts,
//! the record, inode, manifest, shard-header and sealed-object parsers, and the disk-image
//! parser (random damage to a real image, then open and read). A target passes when
//! nothing panics or hangs and no damaged input is ever returned as data.
//!
//! In the suite each target runs briefly (FUZZ_CASES, default 64 cases) so they cannot
//! rot; a long run is `FUZZ_CASES=20000 cargo test --release --test fuzz` (SECURITY.md
//! records the runs and what they found).

mod common;

use mutualstore::blockstore::DiskImage;
use mutualstore::crypto::seal::{unpad, FileKey, Purpose};
use mutualstore::crypto::secret::RingSecret;
use mutualstore::erasure::stripe::ShardMeta;
use mutualstore::rpc::pb;
use mutualstore::rpc::pb::peer_server::Peer;
use mutualstore::rpc::server::PeerService;
use prost::Message;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use std::time::Duration;

fn cases() -> u32 {
    std::env::var("FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64)
}

fn runner() -> TestRunner {
    TestRunner::new(Config { cases: cases(), failure_persistence: None, ..Config::default() })
}

/// Random bytes, or a valid message of the kind with some bytes flipped or cut: plain
/// random bytes rarely decode, damaged real messages reach the handlers' checks.
fn hostile(valid: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    let damaged = (prop::sample::select(valid), prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6), any::<prop::sample::Index>())
        .prop_map(|(mut v, flips, cut)| {
            if !v.is_empty() {
                for (i, x) in flips {
                    let at = i.index(v.len());
                    v[at] ^= x;
                }
                if cut.index(8) == 0 {
                    v.truncate(cut.index(v.len()));
                }
            }
            v
        });
    prop_oneof![prop::collection::vec(any::<u8>(), 0..300), damaged]
}

/// Address fields of fuzzed messages are made to point at a closed loopback port: the
/// handlers may call them, and a test reaches nothing but 127.0.0.1.
fn tame(a: &mut String) {
    if mutualstore::rpc::convert::addr_from(a).is_ok() {
        *a = "127.0.0.1:1".into();
    }
}

fn tame_contact(c: &mut Option<pb::Contact>) {
    if let Some(c) = c {
        tame(&mut c.addr);
    }
}

fn contact(addr: &str) -> pb::Contact {
    pb::Contact { vnode_id: vec![7; 20], addr: addr.into() }
}

fn valid_requests() -> Vec<Vec<u8>> {
    let id = vec![3u8; 20];
    let meta = mutualstore::erasure::stripe::make_stripe(mutualstore::erasure::Code::new(2, 1).unwrap(), b"fuzz").unwrap().1[0].clone();
    vec![
        pb::HelloRequest { protocol_version: mutualstore::rpc::PROTOCOL_VERSION, addr: "127.0.0.1:1".into() }.encode_to_vec(),
        pb::FindNextRequest { key: id.clone(), avoid: vec!["127.0.0.1:1".into()] }.encode_to_vec(),
        pb::VnodeRequest { vnode_id: id.clone() }.encode_to_vec(),
        pb::NotifyRequest { vnode_id: id.clone(), candidate: Some(contact("127.0.0.1:1")), as_successor: true }.encode_to_vec(),
        pb::LeaveRequest { vnode_id: id.clone(), leaving: Some(contact("127.0.0.1:1")), new_predecessor: Some(contact("127.0.0.1:1")), new_successors: vec![contact("127.0.0.1:1")] }.encode_to_vec(),
        pb::PutShardRequest { meta: meta.meta.encode(), data: meta.data.clone(), lazy: true }.encode_to_vec(),
        pb::GetShardRequest { stripe: meta.meta.stripe.to_bytes().to_vec(), skip_mask: 1 }.encode_to_vec(),
        pb::HoldingsRequest { stripes: vec![id.clone(), id.clone()] }.encode_to_vec(),
        pb::DeleteShardRequest { stripe: id.clone(), index: 1 }.encode_to_vec(),
        pb::GetRecordRequest { key: id.clone(), known_version: 2, as_primary: true, replicas: vec!["127.0.0.1:1".into()] }.encode_to_vec(),
        pb::GetRecordsRequest { items: vec![pb::GetRecordRequest { key: id.clone(), known_version: 0, ..Default::default() }, pb::GetRecordRequest { key: vec![7; 20], known_version: 3, ..Default::default() }] }.encode_to_vec(),
        pb::PutRecordRequest { key: id.clone(), version: 3, deleted: false, data: vec![1, 2, 3], durable: false }.encode_to_vec(),
        pb::CasRecordRequest { key: id.clone(), expected: 0, deleted: false, data: vec![9; 40], replicas: vec!["127.0.0.1:1".into()], durable: false, insist: true }.encode_to_vec(),
        pb::PutBlockRequest { key: id.clone(), meta: vec![1], data: vec![2; 100] }.encode_to_vec(),
        pb::GetBlockRequest { key: id.clone() }.encode_to_vec(),
        pb::DeleteBlockRequest { key: id.clone() }.encode_to_vec(),
        pb::ListKeysRequest { from_exclusive: id.clone(), to_inclusive: vec![9; 20], limit: 10 }.encode_to_vec(),
    ]
}

/// Feeds `bytes` to every request decoder; each message that decodes goes to its handler.
/// Returns how many handlers ran.
async fn feed(svc: &PeerService, bytes: &[u8]) -> u64 {
    use tonic::Request;
    let mut ran = 0;
    macro_rules! call {
        ($ty:ty, $method:ident, $tame:expr) => {
            if let Ok(mut m) = <$ty>::decode(bytes) {
                #[allow(clippy::redundant_closure_call)]
                ($tame)(&mut m);
                let _ = tokio::time::timeout(Duration::from_secs(20), svc.$method(Request::new(m))).await.expect(concat!(stringify!($method), " hung"));
                ran += 1;
            }
        };
    }
    call!(pb::HelloRequest, hello, |m: &mut pb::HelloRequest| tame(&mut m.addr));
    call!(pb::FindNextRequest, find_next, |m: &mut pb::FindNextRequest| m.avoid.iter_mut().for_each(tame));
    call!(pb::VnodeRequest, neighbors, |_: &mut pb::VnodeRequest| ());
    call!(pb::VnodeRequest, fingers, |_: &mut pb::VnodeRequest| ());
    call!(pb::NotifyRequest, notify, |m: &mut pb::NotifyRequest| tame_contact(&mut m.candidate));
    call!(pb::LeaveRequest, leave, |m: &mut pb::LeaveRequest| {
        tame_contact(&mut m.leaving);
        tame_contact(&mut m.new_predecessor);
        m.new_successors.iter_mut().for_each(|c| tame(&mut c.addr));
    });
    call!(pb::PutShardRequest, put_shard, |_: &mut pb::PutShardRequest| ());
    call!(pb::GetShardRequest, get_shard, |_: &mut pb::GetShardRequest| ());
    call!(pb::HoldingsRequest, holdings, |_: &mut pb::HoldingsRequest| ());
    call!(pb::DeleteShardRequest, delete_shard, |_: &mut pb::DeleteShardRequest| ());
    call!(pb::GetRecordRequest, get_record, |_: &mut pb::GetRecordRequest| ());
    call!(pb::GetRecordsRequest, get_records, |_: &mut pb::GetRecordsRequest| ());
    call!(pb::PutRecordRequest, put_record, |_: &mut pb::PutRecordRequest| ());
    call!(pb::CasRecordRequest, cas_record, |m: &mut pb::CasRecordRequest| m.replicas.iter_mut().for_each(tame));
    call!(pb::PutBlockRequest, put_block, |_: &mut pb::PutBlockRequest| ());
    call!(pb::GetBlockRequest, get_block, |_: &mut pb::GetBlockRequest| ());
    call!(pb::DeleteBlockRequest, delete_block, |_: &mut pb::DeleteBlockRequest| ());
    call!(pb::ListKeysRequest, list_keys, |_: &mut pb::ListKeysRequest| ());
    ran
}

#[test]
fn fuzz_every_request_decoder_and_handler() {
    let tmp = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let peer = rt.block_on(mutualstore::peer::start(common::peer_config(&tmp.path().join("p"), common::GIB, None))).unwrap();
    let svc = PeerService { state: peer.state.clone() };
    let n = std::cell::Cell::new(0u64);
    let handled = std::cell::Cell::new(0u64);
    runner()
        .run(&hostile(valid_requests()), |bytes| {
            handled.set(handled.get() + rt.block_on(feed(&svc, &bytes)));
            n.set(n.get() + 1);
            Ok(())
        })
        .unwrap();
    assert!(handled.get() > n.get(), "hostile inputs rarely decode: {} handler calls for {} inputs", handled.get(), n.get());
    // Still serving after all that.
    let info = rt.block_on(svc.peer_info(tonic::Request::new(pb::Empty {}))).expect("the peer answers after fuzzing");
    assert_eq!(info.into_inner().protocol_version, mutualstore::rpc::PROTOCOL_VERSION);
    eprintln!("fuzz_every_request_decoder_and_handler: {} inputs, {} handler calls", n.get(), handled.get());
}

/// Hostile bytes into the direct lane of a real peer (shard writes and record reads),
/// over a real TLS connection: the peer answers or closes, never hangs; afterwards it
/// serves gRPC, and what a reader gets of the stripe the valid requests carried is that
/// stripe's bytes or a refusal, never damaged bytes.
#[test]
fn fuzz_the_direct_lane_on_a_real_socket() {
    use mutualstore::erasure::stripe::make_stripe;
    use mutualstore::erasure::Code;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tmp = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let peer = rt.block_on(mutualstore::peer::start(common::peer_config(&tmp.path().join("p"), common::GIB, None))).unwrap();
    let addr = peer.addr.clone();
    let (stripe, shards) = make_stripe(Code::new(2, 1).unwrap(), &[0x5au8; 200]).unwrap();
    let mut valid: Vec<Vec<u8>> = shards.iter().flat_map(|s| [common::lane_put(&s.meta.encode(), &s.data, false), common::lane_put(&s.meta.encode(), &s.data, true)]).collect();
    for as_primary in [false, true] {
        let req = pb::GetRecordRequest { key: stripe.to_bytes().to_vec(), known_version: 1, as_primary, replicas: vec!["127.0.0.1:1".into()] };
        valid.push(common::lane_request(2, &req.encode_to_vec()));
    }
    let many = pb::GetRecordsRequest { items: (0..3u8).map(|i| pb::GetRecordRequest { key: vec![i; 20], known_version: i as u64, ..Default::default() }).collect() };
    // The ring's calls: a vnode of this peer's and a stranger offered as its predecessor.
    let vnode = peer.state.node.lock().vnode_ids()[0].to_bytes().to_vec();
    let stranger = pb::Contact { vnode_id: vec![9u8; 20], addr: "127.0.0.1:1".into() };
    let small: [(u8, Vec<u8>); 4] = [
        (3, many.encode_to_vec()),
        (4, pb::VnodeRequest { vnode_id: vnode.clone() }.encode_to_vec()),
        (5, pb::NotifyRequest { vnode_id: vnode, candidate: Some(stranger), as_successor: false }.encode_to_vec()),
        (6, pb::FindNextRequest { key: vec![7u8; 20], avoid: vec!["127.0.0.1:1".into()] }.encode_to_vec()),
    ];
    valid.extend(small.iter().map(|(op, body)| common::lane_request(*op, body)));
    let (n, answered) = (std::cell::Cell::new(0u64), std::cell::Cell::new(0u64));
    runner()
        .run(&hostile(valid), |bytes| {
            rt.block_on(async {
                // Past the gate's burst a long run waits for the next admission (64/s).
                let mut c = None;
                for _ in 0..200 {
                    match common::try_raw_lane(&addr).await {
                        Ok(s) => {
                            c = Some(s);
                            break;
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(25)).await,
                    }
                }
                let mut c = c.expect("no lane connection admitted in 5 s");
                let _ = c.write_all(&bytes).await;
                let _ = c.shutdown().await;
                let mut back = Vec::new();
                tokio::time::timeout(Duration::from_secs(30), c.read_to_end(&mut back)).await.expect("the peer hung a lane connection").ok();
                if !back.is_empty() {
                    answered.set(answered.get() + 1);
                }
            });
            n.set(n.get() + 1);
            Ok(())
        })
        .unwrap();
    assert!(answered.get() > 0, "no input of {} got an answer", n.get());
    let info = rt.block_on(PeerService { state: peer.state.clone() }.peer_info(tonic::Request::new(pb::Empty {}))).expect("the peer answers after fuzzing");
    assert_eq!(info.into_inner().protocol_version, mutualstore::rpc::PROTOCOL_VERSION);
    // A peer checks a shard against its header's length and CRC only; the hash is the
    // reader's check, and the stripe key the last word: an input that damaged the header
    // alone may be stored, and must then be refused by the reader (a shard failing its
    // hash), or fail to assemble (a consistent forgery) — never read as the stripe.
    let mut served = Vec::new();
    for i in 0..shards.len() {
        match rt.block_on(peer.net.get_shard(&addr, stripe, !(1u64 << i))) {
            Ok(Some(got)) => served.push(got),
            Ok(None) => {}
            Err(e) => assert!(matches!(e, mutualstore::ring::NetError::Protocol(_)), "shard {i}: {e}"),
        }
    }
    for a in 0..served.len() {
        for b in a + 1..served.len() {
            if let Ok(data) = mutualstore::erasure::stripe::assemble(stripe, Code::new(2, 1).unwrap(), 200, [&served[a], &served[b]]) {
                assert_eq!(data, vec![0x5au8; 200], "shards {} and {} assemble to other bytes", served[a].meta.index, served[b].meta.index);
            }
        }
    }
    eprintln!("fuzz_the_direct_lane_on_a_real_socket: {} inputs, {} answered", n.get(), answered.get());
}

fn valid_responses() -> Vec<Vec<u8>> {
    let id = vec![5u8; 20];
    vec![
        pb::HelloResponse { protocol_version: mutualstore::rpc::PROTOCOL_VERSION, peer_id: id.clone(), code_k: 4, code_m: 2 }.encode_to_vec(),
        pb::FindNextResponse { found: true, owner: Some(contact("127.0.0.1:2")), successors: vec![contact("127.0.0.1:3")], next: vec![contact("127.0.0.1:4")], arc_from: vec![4u8; 20] }.encode_to_vec(),
        pb::NeighborsResponse { predecessor: Some(contact("127.0.0.1:2")), successors: vec![contact("127.0.0.1:3")], peer_capacity_bytes: 1 << 30, peer_keyspace_share: 0.5, vnode_exists: true, largest_arc_pred: id.clone(), largest_arc_vnode: vec![6u8; 20] }.encode_to_vec(),
        pb::GetShardResponse { found: true, meta: vec![b'S'; 52], data: vec![1; 64].into() }.encode_to_vec(),
        pb::GetRecordResponse { found: true, version: 2, deleted: false, data: vec![1; 30], unchanged: false, authoritative: true }.encode_to_vec(),
        pb::GetRecordsResponse { items: vec![pb::GetRecordsItem { skipped: false, record: Some(pb::GetRecordResponse { found: true, version: 2, deleted: false, data: vec![1; 30], ..Default::default() }) }, pb::GetRecordsItem { skipped: true, record: None }] }.encode_to_vec(),
        pb::CasRecordResponse { ok: false, version: 4, found: true, deleted: false, data: vec![2; 30], failed_replicas: vec!["127.0.0.1:5".into()] }.encode_to_vec(),
    ]
}

#[test]
fn fuzz_every_response_decoder_a_client_trusts() {
    use mutualstore::rpc::convert::*;
    let n = std::cell::Cell::new(0u64);
    runner()
        .run(&hostile(valid_responses()), |bytes| {
            if let Ok(r) = pb::HelloResponse::decode(&bytes[..]) {
                let _ = code_from(r.code_k, r.code_m);
                let _ = mutualstore::ring::Id::from_slice(&r.peer_id);
            }
            if let Ok(r) = pb::FindNextResponse::decode(&bytes[..]) {
                let _ = route_from(&r);
            }
            if let Ok(r) = pb::NeighborsResponse::decode(&bytes[..]) {
                let _ = neighbors_from(&r);
            }
            if let Ok(r) = pb::FingersResponse::decode(&bytes[..]) {
                let _ = contacts_from(&r.fingers);
            }
            if let Ok(r) = pb::GetShardResponse::decode(&bytes[..]) {
                if let Ok(m) = ShardMeta::decode(&r.meta) {
                    let _ = m.verifies(&r.data);
                }
            }
            let _ = pb::GetRecordResponse::decode(&bytes[..]);
            let _ = pb::GetRecordsResponse::decode(&bytes[..]);
            let _ = pb::CasRecordResponse::decode(&bytes[..]);
            let _ = pb::PeerInfoResponse::decode(&bytes[..]);
            n.set(n.get() + 1);
            Ok(())
        })
        .unwrap();
    eprintln!("fuzz_every_response_decoder_a_client_trusts: {} inputs", n.get());
}

#[test]
fn fuzz_stored_formats_records_inodes_manifests_sealed_objects() {
    let key = FileKey::from_bytes([9; 32]);
    let inode = mutualstore::fs::inode::new_inode(mutualstore::fs::inode::Kind::Dir, 0o755, 0, 0);
    let sealed = key.seal(Purpose::Record, b"ctx", &mutualstore::crypto::seal::pad(&mutualstore::fs::inode::encode(&inode)));
    let manifest = mutualstore::files::encode_manifest(5, &[mutualstore::files::StripeRef { key: mutualstore::ring::Id::sha1(b"s"), len: 5 }]);
    let valid = vec![sealed.clone(), mutualstore::fs::inode::encode(&inode), manifest, mutualstore::meta::encode_meta(3, false), ShardMeta::decode(&[0; 52]).map(|m| m.encode()).unwrap_or_default()];
    let n = std::cell::Cell::new(0u64);
    runner()
        .run(&hostile(valid), |bytes| {
            let _ = mutualstore::meta::decode_meta(&bytes);
            let _ = mutualstore::fs::inode::decode(&bytes);
            let _ = mutualstore::files::decode_manifest(&bytes, 4 << 20);
            let _ = ShardMeta::decode(&bytes);
            let _ = unpad(bytes.clone());
            let _ = RingSecret::parse(&String::from_utf8_lossy(&bytes));
            // A sealed object opens only if it is exactly what was sealed.
            if let Ok(plain) = key.open(Purpose::Record, b"ctx", bytes.clone()) {
                prop_assert!(bytes == sealed, "a damaged sealed object opened");
                prop_assert!(!plain.is_empty());
            }
            n.set(n.get() + 1);
            Ok(())
        })
        .unwrap();
    eprintln!("fuzz_stored_formats: {} inputs", n.get());
}

#[test]
fn fuzz_disk_image_parser_with_damaged_images() {
    let tmp = tempfile::tempdir().unwrap();
    let pristine = tmp.path().join("pristine");
    let blocks: Vec<([u8; 20], Vec<u8>)> = (0..24u8).map(|i| ([i; 20], common::procs::bytes(100 + 997 * i as usize, i as u64))).collect();
    {
        let img = DiskImage::open(&pristine, 4 << 20).unwrap();
        for (k, d) in &blocks {
            img.put(k, b"meta", d).unwrap();
        }
    }
    let files: Vec<_> = std::fs::read_dir(&pristine).unwrap().flatten().map(|e| e.path()).filter(|p| p.is_file()).collect();
    let image = files.iter().max_by_key(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)).unwrap().clone();
    let name = image.file_name().unwrap().to_owned();
    let original = std::fs::read(&image).unwrap();
    // Damage lands where the image has content (superblock, headers, data) most of the time.
    let used = original.iter().rposition(|b| *b != 0).unwrap_or(0) + 1;
    let damage = prop::collection::vec((0..used, any::<u8>(), 1..64usize), 1..8);
    let n = std::cell::Cell::new(0u64);
    runner()
        .run(&damage, |hits| {
            let dir = tmp.path().join(format!("case{}", n.get()));
            std::fs::create_dir(&dir).unwrap();
            for f in &files {
                std::fs::copy(f, dir.join(f.file_name().unwrap())).unwrap();
            }
            let mut bytes = original.clone();
            for (at, x, len) in hits {
                for b in bytes.iter_mut().skip(at).take(len) {
                    *b ^= x | 1;
                }
            }
            std::fs::write(dir.join(&name), &bytes).unwrap();
            if let Ok(img) = DiskImage::open(&dir, 4 << 20) {
                for (k, d) in &blocks {
                    if let Ok(Some(b)) = img.get(k) {
                        prop_assert!(b.data == *d, "damaged block returned as data");
                    }
                }
                let _ = img.scrub();
            }
            std::fs::remove_dir_all(&dir).unwrap();
            n.set(n.get() + 1);
            Ok(())
        })
        .unwrap();
    eprintln!("fuzz_disk_image_parser: {} damaged images", n.get());
}
