//! Unit tests for the disk image, including simulated crashes at each step
//! of the write protocol and a model-checked proptest.

use super::*;
use proptest::prelude::*;
use std::collections::HashMap;
use std::sync::Arc;

const MIB: u64 = 1 << 20;

fn key(n: u32) -> BlockKey {
    let mut k = [0u8; 20];
    k[16..].copy_from_slice(&n.to_be_bytes());
    k
}

fn pattern(seed: u32, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// Usable units after the superblock, as bytes.
fn usable(img: &DiskImage) -> u64 {
    (img.capacity_bytes() / UNIT - 1) * UNIT
}

fn assert_accounting(img: &DiskImage) {
    assert_eq!(
        img.used_bytes() + img.free_bytes(),
        usable(img),
        "used + free must cover the image"
    );
}

fn entry(img: &DiskImage, k: &BlockKey) -> Entry {
    img.index.lock().live[k]
}

fn orphans(img: &DiskImage) -> usize {
    img.orphans_at_open
        .load(std::sync::atomic::Ordering::Relaxed)
}

/// Reopens and checks that the chain left behind was intact: every
/// header the scan met verified (no orphan runs).
fn reopen(img: DiskImage, dir: &Path) -> DiskImage {
    let img = reopen_damaged(img, dir);
    assert_eq!(orphans(&img), 0, "clean shutdown left unreadable headers");
    img
}

fn reopen_damaged(img: DiskImage, dir: &Path) -> DiskImage {
    let cap = img.capacity_bytes();
    drop(img); // releases the flock before the new open
    DiskImage::open(dir, cap).expect("reopen")
}

#[test]
fn put_get_delete_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let img = DiskImage::open(dir.path(), 4 * MIB).unwrap();
    assert!(img.is_empty());
    assert_accounting(&img);
    let data = pattern(1, 5000);
    img.put(&key(1), b"m", &data).unwrap();
    assert!(img.contains(&key(1)));
    assert_eq!(
        img.get(&key(1)).unwrap(),
        Some(Block {
            meta: b"m".to_vec(),
            data
        })
    );
    assert_eq!(img.used_bytes(), 2 * UNIT);
    assert_accounting(&img);
    assert!(img.delete(&key(1)).unwrap());
    assert!(!img.delete(&key(1)).unwrap());
    assert_eq!(img.get(&key(1)).unwrap(), None);
    assert_eq!(img.used_bytes(), 0);
    assert_accounting(&img);
}

#[test]
fn rejects_bad_arguments() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        DiskImage::open(dir.path(), MIB - 1),
        Err(StoreError::Invalid(_))
    ));
    let img = DiskImage::open(dir.path(), 4 * MIB).unwrap();
    let r = img.put(&key(1), &[0; MAX_META_BYTES + 1], b"");
    assert!(matches!(r, Err(StoreError::Invalid(_))));
    let r = img.put(&key(1), b"", &vec![0; MAX_DATA_BYTES + 1]);
    assert!(matches!(r, Err(StoreError::Invalid(_))));
    assert!(img.is_empty());
    assert_accounting(&img);
}

#[test]
fn max_size_block_and_max_meta_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let img = DiskImage::open(dir.path(), 20 * MIB).unwrap();
    let data = pattern(9, MAX_DATA_BYTES);
    let meta = [0xabu8; MAX_META_BYTES];
    img.put(&key(9), &meta, &data).unwrap();
    let img = reopen(img, dir.path());
    let b = img.get(&key(9)).unwrap().unwrap();
    assert_eq!(b.meta, meta);
    assert!(b.data == data);
    assert_eq!(img.used_bytes(), 4097 * UNIT);
}

#[test]
fn replace_keeps_one_version_and_frees_the_old() {
    let dir = tempfile::tempdir().unwrap();
    let img = DiskImage::open(dir.path(), 4 * MIB).unwrap();
    img.put(&key(1), b"v1", &pattern(1, 20_000)).unwrap();
    img.put(&key(1), b"v2", &pattern(2, 100)).unwrap();
    assert_eq!(img.len(), 1);
    assert_eq!(img.used_bytes(), UNIT);
    assert_accounting(&img);
    let img = reopen(img, dir.path());
    assert_eq!(img.get(&key(1)).unwrap().unwrap().meta, b"v2");
    assert_eq!(img.used_bytes(), UNIT);
    assert_accounting(&img);
}

#[test]
fn keys_sorted_big_endian() {
    let dir = tempfile::tempdir().unwrap();
    let img = DiskImage::open(dir.path(), 4 * MIB).unwrap();
    let mut hi = [0u8; 20];
    hi[0] = 1;
    for k in [key(300), hi, key(2), key(1)] {
        img.put(&k, b"", b"x").unwrap();
    }
    assert_eq!(img.keys(), vec![key(1), key(2), key(300), hi]);
}

#[test]
fn full_is_an_error_and_space_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let img = DiskImage::open(dir.path(), MIB).unwrap();
    let data = pattern(3, 100_000); // 25 units
    let mut n = 0;
    let err = loop {
        match img.put(&key(n), b"", &data) {
            Ok(()) => n += 1,
            Err(e) => break e,
        }
        assert!(n < 100, "never became full");
    };
    assert!(
        matches!(err, StoreError::Full { needed_bytes, .. } if needed_bytes == 25 * UNIT),
        "{err}"
    );
    assert_eq!(n, 255 / 25);
    img.delete(&key(0)).unwrap();
    img.put(&key(1000), b"", &data).unwrap();
    assert_accounting(&img);
}

#[test]
fn second_open_of_same_image_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = DiskImage::open(dir.path(), 2 * MIB).unwrap();
    assert!(matches!(
        DiskImage::open(dir.path(), 2 * MIB),
        Err(StoreError::BadImage { .. })
    ));
    drop(img);
    DiskImage::open(dir.path(), 2 * MIB).unwrap();
}

#[test]
fn flipped_data_byte_is_reported_corrupt_not_returned() {
    let dir = tempfile::tempdir().unwrap();
    let img = DiskImage::open(dir.path(), 4 * MIB).unwrap();
    img.put(&key(1), b"", &pattern(1, 9000)).unwrap();
    img.put(&key(2), b"", &pattern(2, 9000)).unwrap();
    let at = entry(&img, &key(1)).unit * UNIT + HEADER_LEN as u64 + 4000;
    let mut b = [0u8; 1];
    img.file.read_exact_at(&mut b, at).unwrap();
    img.file.write_all_at(&[b[0] ^ 0x40], at).unwrap();
    assert!(matches!(img.get(&key(1)), Err(StoreError::Corrupt { .. })));
    assert!(img.get(&key(2)).unwrap().is_some());
    assert_eq!(img.corrupt_keys(), vec![key(1)]);
    assert_eq!(img.scrub(), vec![key(1)]);
    // Rewriting the block heals it.
    img.put(&key(1), b"", b"fresh").unwrap();
    assert!(img.corrupt_keys().is_empty());
    assert!(img.scrub().is_empty());
}

#[test]
fn crash_before_commit_leaves_block_absent_and_space_free() {
    let dir = tempfile::tempdir().unwrap();
    let img = DiskImage::open(dir.path(), 4 * MIB).unwrap();
    img.put(&key(1), b"", &pattern(1, 10)).unwrap();
    let res = img.reserve(units_for(50_000), true).unwrap();
    // Data written and synced, header never written: then "kill -9".
    img.file
        .write_all_at(&pattern(2, 50_000), res.unit * UNIT + HEADER_LEN as u64)
        .unwrap();
    img.sync().unwrap();
    let img = reopen(img, dir.path());
    assert_eq!(img.keys(), vec![key(1)]);
    assert_accounting(&img);
}

#[test]
fn crash_after_commit_before_free_keeps_newest_and_never_resurrects() {
    let dir = tempfile::tempdir().unwrap();
    let img = DiskImage::open(dir.path(), 4 * MIB).unwrap();
    img.put(&key(1), b"old", &pattern(1, 7000)).unwrap();
    // A spacer, so freeing the new version cannot merge over the old one.
    img.put(&key(2), b"", &pattern(2, 10)).unwrap();
    // New version committed on disk, process dies before install/free.
    let data = pattern(2, 300);
    let res = img.reserve(units_for(data.len()), true).unwrap();
    let h = Header::block(&key(1), b"new", data.len(), crc32c::crc32c(&data), res.seq);
    img.write_record(&res, &h, &data).unwrap();
    let img = reopen(img, dir.path());
    assert_eq!(img.get(&key(1)).unwrap().unwrap().meta, b"new");
    assert_eq!(img.used_bytes(), 2 * UNIT);
    assert_accounting(&img);
    img.delete(&key(1)).unwrap();
    let img = reopen(img, dir.path());
    assert_eq!(img.keys(), vec![key(2)], "superseded version came back");
    assert_accounting(&img);
}

#[test]
fn torn_header_drops_only_that_block_and_space_is_reused() {
    let dir = tempfile::tempdir().unwrap();
    let img = DiskImage::open(dir.path(), 4 * MIB).unwrap();
    for i in 0..5 {
        img.put(&key(i), b"", &pattern(i, 10_000)).unwrap();
    }
    let at = entry(&img, &key(2)).unit * UNIT + 40;
    img.file.write_all_at(b"torn!", at).unwrap();
    let img = reopen_damaged(img, dir.path());
    assert_eq!(orphans(&img), 1);
    assert_eq!(img.keys(), vec![key(0), key(1), key(3), key(4)]);
    for i in [0, 1, 3, 4] {
        assert_eq!(img.get(&key(i)).unwrap().unwrap().data, pattern(i, 10_000));
    }
    assert_accounting(&img);
    // The healed image reopens identically.
    let img = reopen(img, dir.path());
    assert_eq!(img.len(), 4);
    assert_accounting(&img);
}

#[test]
fn concurrent_puts_gets_and_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let img = Arc::new(DiskImage::open(dir.path(), 32 * MIB).unwrap());
    let threads: Vec<_> = (0..4u32)
        .map(|t| {
            let img = Arc::clone(&img);
            std::thread::spawn(move || {
                for i in 0..60u32 {
                    let n = t * 1000 + i;
                    let shared = key(1_000_000 + i % 7); // contended across threads
                    let len = (n as usize * 397) % 30_000;
                    img.put(&key(n), &n.to_le_bytes(), &pattern(n, len))
                        .unwrap();
                    img.put(&shared, &n.to_le_bytes(), &pattern(n, len))
                        .unwrap();
                    assert_eq!(img.get(&key(n)).unwrap().unwrap().data, pattern(n, len));
                    // Any version of the shared key must be self-consistent.
                    if let Some(b) = img.get(&shared).unwrap() {
                        let m = u32::from_le_bytes(b.meta[..4].try_into().unwrap());
                        assert_eq!(b.data, pattern(m, (m as usize * 397) % 30_000));
                    }
                    if i % 3 == 0 {
                        assert!(img.delete(&key(n)).unwrap());
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert!(img.corrupt_keys().is_empty());
    assert_accounting(&img);
    let used = img.used_bytes();
    let before: Vec<_> = img.keys().iter().map(|k| img.get(k).unwrap()).collect();
    let img = Arc::into_inner(img).unwrap();
    let img = reopen(img, dir.path());
    assert_eq!(img.len(), 4 * 40 + 7);
    assert_eq!(img.used_bytes(), used);
    // Memory and disk agree on which version of each contended key won.
    let after: Vec<_> = img.keys().iter().map(|k| img.get(k).unwrap()).collect();
    assert!(before == after, "versions differ after reopen");
    assert!(img.scrub().is_empty());
}

/// Two puts of one key overlap; the one that reserved later (higher seq)
/// publishes first. The earlier one must lose, in memory as on disk.
#[test]
fn overlapping_puts_of_one_key_keep_the_later_reservation() {
    let dir = tempfile::tempdir().unwrap();
    let img = DiskImage::open(dir.path(), 4 * MIB).unwrap();
    let write = |res: &Reservation, meta: &[u8], data: &[u8]| {
        let h = Header::block(&key(1), meta, data.len(), crc32c::crc32c(data), res.seq);
        img.write_record(res, &h, data).unwrap();
    };
    let (d1, d2) = (pattern(1, 5000), pattern(2, 9000));
    let early = img.reserve(units_for(d1.len()), true).unwrap();
    let late = img.reserve(units_for(d2.len()), true).unwrap();
    write(&late, b"late", &d2);
    img.install(&key(1), &late, d2.len(), true);
    write(&early, b"early", &d1);
    img.install(&key(1), &early, d1.len(), true);
    assert_eq!(img.get(&key(1)).unwrap().unwrap().meta, b"late");
    assert_eq!(img.used_bytes(), units_for(d2.len()) * UNIT);
    assert_accounting(&img);
    let img = reopen(img, dir.path());
    assert_eq!(img.get(&key(1)).unwrap().unwrap().meta, b"late");
    assert_accounting(&img);
}

/// Readers racing a writer that keeps replacing the same keys (so freed
/// extents are reused at once) must never see Corrupt or a mixed version.
/// Large records are read around the page cache (O_DIRECT where the filesystem allows
/// it): what was just written, synced or not, reads back exactly, and a byte flipped
/// through the page cache (as a buffered writer would) is still caught.
#[test]
fn large_records_read_directly_are_exact_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let img = DiskImage::open(dir.path(), 16 * MIB).unwrap();
    let big = |s: u32| pattern(s, DIRECT_READ_MIN + 12_345 * s as usize);
    img.put(&key(1), b"m1", &big(1)).unwrap();
    img.put_unsynced(&key(2), b"m2", &big(2)).unwrap();
    for _ in 0..2 {
        assert!(img.get(&key(1)).unwrap().unwrap().data == big(1));
        let b = img.get(&key(2)).unwrap().unwrap();
        assert!(b.data == big(2) && b.meta == b"m2", "an unsynced large record read back wrong");
    }
    let at = entry(&img, &key(1)).unit * UNIT + HEADER_LEN as u64 + DIRECT_READ_MIN as u64 - 7;
    let mut x = [0u8; 1];
    img.file.read_exact_at(&mut x, at).unwrap();
    img.file.write_all_at(&[x[0] ^ 0x01], at).unwrap();
    assert!(matches!(img.get(&key(1)), Err(StoreError::Corrupt { .. })), "a flipped byte in a large record was returned as data");
    assert!(img.get(&key(2)).unwrap().unwrap().data == big(2));
}

#[test]
fn reads_racing_replacements_never_report_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let img = Arc::new(DiskImage::open(dir.path(), 4 * MIB).unwrap());
    let len_of = |v: u32| 3000 + (v as usize % 3) * 5000;
    for k in 0..2 {
        img.put(&key(k), &0u32.to_le_bytes(), &pattern(0, len_of(0)))
            .unwrap();
    }
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let (img, done) = (Arc::clone(&img), Arc::clone(&done));
            std::thread::spawn(move || {
                let mut reads = 0u64;
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    for k in 0..2 {
                        let b = img.get(&key(k)).expect("read raced into Corrupt").unwrap();
                        let v = u32::from_le_bytes(b.meta[..4].try_into().unwrap());
                        assert!(b.data == pattern(v, len_of(v)));
                        reads += 1;
                    }
                }
                reads
            })
        })
        .collect();
    for v in 1..600u32 {
        img.put(&key(v % 2), &v.to_le_bytes(), &pattern(v, len_of(v)))
            .unwrap();
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    for r in readers {
        assert!(r.join().unwrap() > 0);
    }
    assert!(img.corrupt_keys().is_empty());
}

#[derive(Debug, Clone)]
enum Op {
    Put {
        k: u8,
        meta_len: usize,
        len: usize,
        seed: u32,
    },
    Delete {
        k: u8,
    },
    Reopen,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u8..10, 0usize..=MAX_META_BYTES, prop_oneof![0usize..9000, 0usize..300_000], any::<u32>())
            .prop_map(|(k, meta_len, len, seed)| Op::Put { k, meta_len, len, seed }),
        3 => (0u8..10).prop_map(|k| Op::Delete { k }),
        1 => Just(Op::Reopen),
    ]
}

fn check_model(img: &DiskImage, model: &HashMap<u8, Block>) {
    let mut want: Vec<BlockKey> = model.keys().map(|&k| key(k.into())).collect();
    want.sort();
    assert_eq!(img.keys(), want);
    for (&k, b) in model {
        assert_eq!(img.get(&key(k.into())).unwrap().as_ref(), Some(b));
    }
    let used: u64 = model.values().map(|b| units_for(b.data.len()) * UNIT).sum();
    assert_eq!(img.used_bytes(), used);
    assert_accounting(img);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn model_check_put_delete_reopen(ops in proptest::collection::vec(op_strategy(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let mut img = DiskImage::open(dir.path(), MIB).unwrap();
        let mut model: HashMap<u8, Block> = HashMap::new();
        for op in ops {
            match op {
                Op::Put { k, meta_len, len, seed } => {
                    let b = Block { meta: pattern(seed ^ 7, meta_len), data: pattern(seed, len) };
                    match img.put(&key(k.into()), &b.meta, &b.data) {
                        Ok(()) => { model.insert(k, b); }
                        Err(StoreError::Full { needed_bytes, free_bytes }) => {
                            prop_assert_eq!(needed_bytes, units_for(len) * UNIT);
                            prop_assert!(img.alloc.lock().free.best_fit(units_for(len)).is_none());
                            prop_assert!(free_bytes <= img.free_bytes());
                        }
                        Err(e) => panic!("put failed: {e}"),
                    }
                }
                Op::Delete { k } => {
                    prop_assert_eq!(img.delete(&key(k.into())).unwrap(), model.remove(&k).is_some());
                }
                Op::Reopen => img = reopen(img, dir.path()),
            }
            check_model(&img, &model);
        }
        let img = reopen(img, dir.path());
        check_model(&img, &model);
    }

    /// Corrupting random bytes of an image must never panic, and a read
    /// returns the original block, nothing, or Corrupt -- never wrong bytes.
    #[test]
    fn random_damage_never_yields_wrong_data(
        // Records occupy roughly the first 100 units; aim the damage there.
        flips in proptest::collection::vec((0u64..(100 * UNIT), any::<u8>()), 1..20)
    ) {
        let dir = tempfile::tempdir().unwrap();
        let img = DiskImage::open(dir.path(), 2 * MIB).unwrap();
        // Many small records, so flips hit headers as well as data.
        for i in 0..60 {
            img.put(&key(i), &[i as u8], &pattern(i, (i as usize * 331) % 6000)).unwrap();
        }
        let path = img.path().to_path_buf();
        drop(img);
        let f = OpenOptions::new().read(true).write(true).open(&path).unwrap();
        for (at, x) in flips {
            let mut b = [0u8; 1];
            f.read_exact_at(&mut b, at).unwrap();
            f.write_all_at(&[b[0] ^ x.max(1)], at).unwrap();
        }
        drop(f);
        let img = match DiskImage::open(dir.path(), 2 * MIB) {
            Ok(img) => img,
            Err(StoreError::BadImage { .. }) => return Ok(()), // superblock hit
            Err(e) => panic!("unexpected open error: {e}"),
        };
        for i in 0..60u32 {
            match img.get(&key(i)) {
                Ok(Some(b)) => {
                    prop_assert_eq!(b.meta, vec![i as u8]);
                    prop_assert!(b.data == pattern(i, (i as usize * 331) % 6000));
                }
                Ok(None) | Err(StoreError::Corrupt { .. }) => {}
                Err(e) => panic!("unexpected get error: {e}"),
            }
        }
        assert_accounting(&img);
        // The damaged image stays writable.
        img.put(&key(999), b"", &pattern(999, 3000)).unwrap();
        prop_assert_eq!(img.get(&key(999)).unwrap().unwrap().data, pattern(999, 3000));
    }
}

#[test]
fn unsynced_puts_read_back_survive_reopen_and_mix_with_durable_ones() {
    let dir = tempfile::tempdir().unwrap();
    let img = DiskImage::open(dir.path(), 8 * MIB).unwrap();
    for v in 0..20u32 {
        // Replacing one key again and again, as metadata records are.
        img.put_unsynced(&key(1), &v.to_be_bytes(), &pattern(v, 3000 + v as usize)).unwrap();
        img.put_unsynced(&key(100 + v), b"", &pattern(v, 100)).unwrap();
    }
    img.put(&key(2), b"durable", &pattern(7, 9000)).unwrap();
    img.sync_now().unwrap();
    assert_eq!(img.get(&key(1)).unwrap().unwrap().meta, 19u32.to_be_bytes());
    assert_accounting(&img);
    let img = reopen(img, dir.path());
    assert_eq!(img.get(&key(1)).unwrap().unwrap(), Block { meta: 19u32.to_be_bytes().to_vec(), data: pattern(19, 3019) });
    assert_eq!(img.get(&key(2)).unwrap().unwrap().data, pattern(7, 9000));
    assert_eq!(img.len(), 22);
    assert_accounting(&img);
}

#[test]
fn a_cached_read_follows_every_replace_and_delete_and_scrub_still_reads_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let img = DiskImage::open(dir.path(), 4 * MIB).unwrap();
    img.put(&key(1), b"v1", &pattern(1, 3000)).unwrap();
    assert_eq!(img.get_cached(&key(1)).unwrap().unwrap().data, pattern(1, 3000));
    // Cached now; a replacement must be seen at once, through either kind of write.
    img.put(&key(1), b"v2", &pattern(2, 5000)).unwrap();
    let b = img.get_cached(&key(1)).unwrap().unwrap();
    assert_eq!((b.meta.as_slice(), b.data), (&b"v2"[..], pattern(2, 5000)));
    img.put_unsynced(&key(1), b"v3", &pattern(3, 100)).unwrap();
    assert_eq!(img.get_cached(&key(1)).unwrap().unwrap().data, pattern(3, 100));
    img.delete(&key(1)).unwrap();
    assert!(img.get_cached(&key(1)).unwrap().is_none());
    // A damaged copy on disk behind a cached one: the cached read still answers the
    // verified bytes, and scrub (which reads the disk) finds the damage.
    img.put(&key(2), b"", &pattern(4, 9000)).unwrap();
    assert_eq!(img.get_cached(&key(2)).unwrap().unwrap().data, pattern(4, 9000));
    let at = entry(&img, &key(2)).unit * UNIT + HEADER_LEN as u64 + 10;
    let mut b = [0u8; 1];
    img.file.read_exact_at(&mut b, at).unwrap();
    img.file.write_all_at(&[b[0] ^ 1], at).unwrap();
    assert_eq!(img.get_cached(&key(2)).unwrap().unwrap().data, pattern(4, 9000));
    assert_eq!(img.scrub(), vec![key(2)]);
}
