//! The filesystem over 6 real peer processes (4+2) on real FUSE mounts: two mounts see
//! one consistent tree; files survive two peer losses and fail fast (never wrong) after
//! three; a frozen peer does not stall readers; a killed mount loses nothing it fsynced
//! and its mountpoint is reusable; unmounting with files open loses nothing closed;
//! directory leases (creates decided and published by one mount) keep all of that.

mod common;

use common::mount::Mount;
use common::procs::*;
use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Six peers, 4+2, mounted at once: the ring is still settling, which is the harder case
/// for metadata (clients' and peers' views of who owns a key differ for a moment).
fn ring6(root: &Path) -> ProcRing {
    ProcRing::start(&root.join("ring"), 6, "4+2", "1GiB", 600.0)
}

fn drop_caches() {
    let _ = std::process::Command::new("sync").status();
    let _ = fs::write("/proc/sys/vm/drop_caches", "3");
}

/// Runs `f` on a thread and gives up waiting after `max` (the thread is left behind).
fn bounded<T: Send + 'static>(max: Duration, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(max).ok()
}

#[test]
fn two_mounts_see_one_consistent_tree() {
    let tmp = tempfile::tempdir().unwrap();
    let ring = ring6(tmp.path());
    let a = Mount::start(&tmp.path().join("a"), &ring.addr(0), &ring.member_args());
    let b = Mount::start(&tmp.path().join("b"), &ring.addr(3), &ring.member_args());

    // Close-to-open: what A closed, B opens whole; small (inline) and chunked sizes.
    for round in 0..8u64 {
        let data = bytes(1000 + round as usize * 700_000, round);
        fs::write(a.path("shared"), &data).unwrap();
        let got = fs::read(b.path("shared")).unwrap();
        assert!(got == data, "round {round}: B read {} bytes, A wrote {}", got.len(), data.len());
    }

    // Never torn: A rewrites a two-chunk file again and again, each version one byte
    // value throughout; every read on B sees exactly one version.
    let len = 6 << 20;
    fs::write(a.path("torn"), vec![0u8; len]).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (path, stop) = (b.path("torn"), stop.clone());
        std::thread::spawn(move || {
            let mut reads = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let got = fs::read(&path).unwrap();
                assert_eq!(got.len(), len, "read a version of another length");
                assert!(got.iter().all(|x| *x == got[0]), "torn read: a mix of versions");
                reads += 1;
            }
            reads
        })
    };
    for v in 1..=12u8 {
        fs::write(a.path("torn"), vec![v; len]).unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let reads = reader.join().expect("reader saw a torn or short file");
    assert!(reads > 0);
    assert_eq!(fs::read(b.path("torn")).unwrap(), vec![12u8; len]);

    // A link made on B while A's cache still says one name: A's unlink of its name
    // must not delete the file (A deletes the record only at a version with one link),
    // and B's open right after must see A's change, not what B itself wrote a few
    // milliseconds before (repeated: how soon the open comes varies with the machine).
    for round in 0..6 {
        let (one, two) = (format!("ln{round}"), format!("ln{round}b"));
        fs::write(a.path(&one), b"two names").unwrap();
        assert_eq!(fs::metadata(a.path(&one)).unwrap().nlink(), 1);
        fs::hard_link(b.path(&one), b.path(&two)).unwrap();
        fs::remove_file(a.path(&one)).unwrap();
        assert_eq!(fs::read(b.path(&two)).unwrap(), b"two names");
        assert_eq!(fs::read(a.path(&two)).unwrap(), b"two names");
        assert_eq!(fs::metadata(b.path(&two)).unwrap().nlink(), 1, "round {round}: B's open kept its own stale inode");
    }

    // Concurrent creates, renames and unlinks in one directory from both mounts.
    fs::create_dir(a.path("c")).unwrap();
    let work = |m: PathBuf, tag: char| {
        std::thread::spawn(move || {
            for i in 0..150 {
                fs::write(m.join(format!("c/{tag}{i:03}")), format!("{tag}{i}")).unwrap();
            }
            for i in (0..150).step_by(2) {
                fs::rename(m.join(format!("c/{tag}{i:03}")), m.join(format!("c/{tag}r{i:03}"))).unwrap();
            }
            for i in (1..150).step_by(3).filter(|i| i % 2 == 1) {
                fs::remove_file(m.join(format!("c/{tag}{i:03}"))).unwrap();
            }
        })
    };
    let (ta, tb) = (work(a.dir.clone(), 'a'), work(b.dir.clone(), 'b'));
    ta.join().unwrap();
    tb.join().unwrap();
    let mut want = BTreeSet::new();
    for tag in ['a', 'b'] {
        for i in 0..150 {
            if i % 2 == 0 {
                want.insert(format!("{tag}r{i:03}"));
            } else if i % 3 != 1 {
                want.insert(format!("{tag}{i:03}"));
            }
        }
    }
    for m in [&a, &b] {
        let got: BTreeSet<String> = fs::read_dir(m.path("c")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        assert_eq!(got, want, "{} lists a different set", m.dir.display());
        for name in &got {
            let content = fs::read_to_string(m.path(&format!("c/{name}"))).unwrap_or_else(|e| panic!("dangling entry {name}: {e}"));
            let i: usize = name.trim_start_matches(|c: char| c.is_alphabetic()).parse().unwrap();
            assert_eq!(content, format!("{}{i}", &name[..1]));
        }
    }
}

/// A mount that creates files in a directory holds its lease and publishes closed files
/// in the background: B must still find each file A has closed at once (it asks for the
/// lease and waits for A to publish), exclusive creates of one name from both mounts
/// must never both succeed, and the lease of a killed holder must lapse, so the other
/// mount's changes go through within seconds and nothing listed dangles.
#[test]
fn directory_leases_keep_close_to_open_exclusive_create_and_lapse_when_the_holder_dies() {
    let tmp = tempfile::tempdir().unwrap();
    let ring = ring6(tmp.path());
    let mut a = Mount::start(&tmp.path().join("a"), &ring.addr(0), &ring.member_args());
    let b = Mount::start(&tmp.path().join("b"), &ring.addr(3), &ring.member_args());

    fs::create_dir(a.path("d")).unwrap();
    for i in 0..150 {
        fs::write(a.path(&format!("d/f{i}")), format!("content {i}")).unwrap();
        if i % 10 == 9 {
            let got = fs::read_to_string(b.path(&format!("d/f{i}"))).unwrap_or_else(|e| panic!("B cannot open d/f{i} that A closed: {e}"));
            assert_eq!(got, format!("content {i}"));
        }
    }
    let listed: BTreeSet<String> = fs::read_dir(b.path("d")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    let want: BTreeSet<String> = (0..150).map(|i| format!("f{i}")).collect();
    assert_eq!(listed, want, "B lists another set than A created");

    // Exclusive creates of the same 80 names from both mounts at once: one wins each.
    fs::create_dir(a.path("e")).unwrap();
    let race = |root: PathBuf, tag: &'static str| {
        std::thread::spawn(move || {
            (0..80)
                .map(|i| match fs::OpenOptions::new().write(true).create_new(true).open(root.join(format!("e/x{i}"))) {
                    Ok(mut f) => {
                        f.write_all(tag.as_bytes()).unwrap();
                        true
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
                    Err(e) => panic!("{tag}: create_new e/x{i}: {e}"),
                })
                .collect::<Vec<bool>>()
        })
    };
    let (ra, rb) = (race(a.dir.clone(), "A"), race(b.dir.clone(), "B"));
    let (ra, rb) = (ra.join().unwrap(), rb.join().unwrap());
    for i in 0..80 {
        assert!(ra[i] != rb[i], "e/x{i}: exclusive create succeeded on {} mounts", if ra[i] { 2 } else { 0 });
        let winner = if ra[i] { "A" } else { "B" };
        for m in [&a, &b] {
            assert_eq!(fs::read_to_string(m.path(&format!("e/x{i}"))).unwrap(), winner, "e/x{i} on {}", m.dir.display());
        }
    }

    // The holder dies with its lease on k: B's create and listing there still finish.
    fs::create_dir(a.path("k")).unwrap();
    for i in 0..20 {
        fs::write(a.path(&format!("k/a{i}")), b"from A").unwrap();
    }
    a.kill9();
    let done = bounded(Duration::from_secs(60), {
        let root = b.dir.clone();
        move || {
            fs::write(root.join("k/b0"), b"from B").unwrap();
            fs::read_dir(root.join("k")).unwrap().map(|e| e.unwrap().path()).collect::<Vec<PathBuf>>()
        }
    });
    let listed = done.expect("B's create in a directory whose lease holder was killed did not finish");
    assert!(listed.iter().any(|p| p.ends_with("b0")));
    for p in listed {
        fs::metadata(&p).unwrap_or_else(|e| panic!("dangling entry {}: {e}", p.display()));
    }
}

/// Directories made under a lease are decided locally and put on the ring later (record,
/// then entry, with the parent's files): another mount must still find each one, and
/// what is inside, as soon as mkdir and close have returned; the maker must be able to
/// use a new directory at once (rmdir, rename, errors for a taken name); and an unmount
/// right after must leave the whole tree on the ring.
#[test]
fn directories_made_under_a_lease_are_seen_at_once_and_kept_at_unmount() {
    let tmp = tempfile::tempdir().unwrap();
    let ring = ring6(tmp.path());
    let mut a = Mount::start(&tmp.path().join("a"), &ring.addr(0), &ring.member_args());
    let b = Mount::start(&tmp.path().join("b"), &ring.addr(3), &ring.member_args());

    fs::create_dir(a.path("t")).unwrap();
    for i in 0..40 {
        let deep = format!("t/d{i}/s{i}/u{i}");
        fs::create_dir_all(a.path(&deep)).unwrap();
        fs::write(a.path(&format!("{deep}/f")), format!("deep {i}")).unwrap();
        if i % 4 == 3 {
            let got = fs::read_to_string(b.path(&format!("{deep}/f"))).unwrap_or_else(|e| panic!("B cannot open {deep}/f that A just made: {e}"));
            assert_eq!(got, format!("deep {i}"));
        }
    }
    let listed: BTreeSet<String> = fs::read_dir(b.path("t")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert_eq!(listed, (0..40).map(|i| format!("d{i}")).collect::<BTreeSet<_>>(), "B lists another set of directories than A made");
    assert!(fs::metadata(b.path("t/d0/s0")).unwrap().is_dir());

    // On the maker, a directory is usable the moment mkdir returns (in "own", which B
    // has not touched, so A holds its lease: B's reads above made A let go of t's).
    fs::create_dir(a.path("own")).unwrap();
    fs::create_dir(a.path("own/fresh")).unwrap();
    assert_eq!(fs::create_dir(a.path("own/fresh")).unwrap_err().kind(), std::io::ErrorKind::AlreadyExists);
    let e = fs::OpenOptions::new().write(true).create(true).open(a.path("own/fresh")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EISDIR), "opening a new directory for writing: {e}");
    fs::remove_dir(a.path("own/fresh")).unwrap();
    assert!(fs::metadata(a.path("own/fresh")).is_err());
    fs::create_dir(a.path("own/moving")).unwrap();
    fs::write(a.path("own/moving/inside"), b"carried along").unwrap();
    fs::rename(a.path("own/moving"), a.path("own/moved")).unwrap();
    fs::create_dir(a.path("own/gone")).unwrap();
    fs::write(a.path("own/gone/f"), b"x").unwrap();
    assert_eq!(fs::remove_dir(a.path("own/gone")).unwrap_err().raw_os_error(), Some(libc::ENOTEMPTY));
    fs::create_dir_all(a.path("own/synced/inner")).unwrap();
    fs::File::open(a.path("own/synced")).unwrap().sync_all().expect("fsync of a directory made a moment ago");
    fs::File::open(a.path("own")).unwrap().sync_all().expect("fsync of a directory with a new entry");
    assert!(fs::metadata(b.path("own/synced/inner")).unwrap().is_dir());
    assert_eq!(fs::read(b.path("own/moved/inside")).unwrap(), b"carried along");
    assert!(fs::metadata(b.path("own/moving")).is_err(), "B still sees the old name of a renamed new directory");

    // Made and filled, then unmounted at once: all of it is on the ring.
    for i in 0..30 {
        fs::create_dir_all(a.path(&format!("late/x{i}/y"))).unwrap();
        fs::write(a.path(&format!("late/x{i}/y/g")), format!("late {i}")).unwrap();
    }
    a.unmount(false).expect("the mount did not exit after fusermount -u");
    drop(a);
    for i in 0..30 {
        let got = fs::read_to_string(b.path(&format!("late/x{i}/y/g"))).unwrap_or_else(|e| panic!("late/x{i}/y/g lost at unmount: {e}"));
        assert_eq!(got, format!("late {i}"));
    }
    for dir in ["t", "own", "late"] {
        for e in walk(&b.path(dir)) {
            fs::metadata(&e).unwrap_or_else(|x| panic!("dangling entry {}: {x}", e.display()));
        }
    }
}

/// Every path under `root`, depth first.
fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(root).unwrap() {
        let p = e.unwrap().path();
        if fs::symlink_metadata(&p).unwrap().is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

fn make_tree(root: &Path, files: usize) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for i in 0..files {
        let rel = PathBuf::from(format!("d{}/e{}/f{i}", i % 10, i % 7));
        fs::create_dir_all(root.join(rel.parent().unwrap())).unwrap();
        let len = if i % 200 == 0 { (5 << 20) + i } else if i % 10 == 1 { 100_000 } else { (i * 131) % 6000 };
        fs::write(root.join(&rel), bytes(len, i as u64)).unwrap();
        out.push(rel);
    }
    out
}

#[test]
fn survives_two_peer_losses_and_fails_fast_after_three() {
    let tmp = tempfile::tempdir().unwrap();
    let mut ring = ring6(tmp.path());
    let m = Mount::start(&tmp.path().join("mnt"), &ring.addr(0), &ring.member_args());
    let src = tmp.path().join("src");
    let files = make_tree(&src, 2000);
    let st = std::process::Command::new("cp").arg("-r").arg(&src).arg(m.path("tree")).status().unwrap();
    assert!(st.success(), "cp -r onto the mount");

    ring.kill(2);
    ring.kill(4);
    drop_caches();
    let t = Instant::now();
    for rel in &files {
        let got = fs::read(m.path("tree").join(rel)).unwrap_or_else(|e| panic!("{} with 2 peers down: {e}", rel.display()));
        assert!(got == fs::read(src.join(rel)).unwrap(), "{} differs with 2 peers down", rel.display());
    }
    eprintln!("read back 2000 files with 2 of 6 peers down in {:?}", t.elapsed());
    let new = bytes(5 << 20, 77);
    fs::write(m.path("new"), &new).unwrap();
    assert!(fs::read(m.path("new")).unwrap() == new, "new write with 2 peers down");

    ring.kill(5);
    drop_caches();
    // The first big file was read long ago: not in the mount's chunk cache.
    let (path, want) = (m.path("tree").join(&files[0]), fs::read(src.join(&files[0])).unwrap());
    let start = Instant::now();
    let r = bounded(Duration::from_secs(45), move || fs::read(path)).expect("a read with 3 of 6 peers down hangs");
    match r {
        Ok(got) => assert!(got == want, "with 3 of 6 peers down a read returned WRONG bytes"),
        Err(e) => {
            assert_eq!(e.raw_os_error(), Some(libc::EIO), "expected EIO, got {e}");
            assert!(start.elapsed() < Duration::from_secs(30), "EIO took {:?}", start.elapsed());
        }
    }
    let root = m.dir.clone();
    let ls = bounded(Duration::from_secs(30), move || fs::read_dir(root).map(|d| d.count()));
    assert!(ls.is_some(), "ls of the root hangs with 3 peers down");
}

#[test]
fn readers_progress_while_a_peer_is_frozen() {
    let tmp = tempfile::tempdir().unwrap();
    let ring = ring6(tmp.path());
    let a = Mount::start(&tmp.path().join("a"), &ring.addr(0), &ring.member_args());
    let data = bytes(24 << 20, 5);
    fs::write(a.path("f"), &data).unwrap();
    let small: Vec<Vec<u8>> = (0..20).map(|i| bytes(3000 + i, i as u64)).collect();
    for (i, s) in small.iter().enumerate() {
        fs::write(a.path(&format!("s{i}")), s).unwrap();
    }
    // A second mount: nothing cached.
    let b = Mount::start(&tmp.path().join("b"), &ring.addr(1), &ring.member_args());
    ring.signal(3, libc::SIGSTOP);
    let (path, dir) = (b.path("f"), b.dir.clone());
    let start = Instant::now();
    let got = bounded(Duration::from_secs(120), move || {
        let big = fs::read(path).unwrap();
        let small: Vec<Vec<u8>> = (0..20).map(|i| fs::read(dir.join(format!("s{i}"))).unwrap()).collect();
        (big, small)
    });
    ring.signal(3, libc::SIGCONT);
    let (big, got_small) = got.expect("reads stalled behind a frozen peer");
    assert!(big == data && got_small == small, "wrong bytes with a frozen peer");
    eprintln!("read 24 MiB + 20 small files with one peer frozen in {:?}", start.elapsed());
}

#[test]
fn killed_mount_keeps_what_it_fsynced_and_unmount_keeps_what_was_closed() {
    let tmp = tempfile::tempdir().unwrap();
    let ring = ring6(tmp.path());
    let dir = tmp.path().join("mnt");
    let mut m = Mount::start(&dir, &ring.addr(0), &ring.member_args());
    fs::create_dir(m.path("w")).unwrap();
    let synced: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
    let writer = {
        let (root, synced) = (m.path("w"), synced.clone());
        std::thread::spawn(move || {
            for i in 0..100_000u64 {
                let name = format!("f{i}");
                let len = if i % 5 == 0 { 1 << 20 } else { 20_000 };
                let mut f = match fs::File::create(root.join(&name)) {
                    Ok(f) => f,
                    Err(_) => return,
                };
                if f.write_all(&bytes(len, i)).is_err() || f.sync_all().is_err() {
                    return;
                }
                synced.lock().unwrap().push((name, len as u64));
            }
        })
    };
    std::thread::sleep(Duration::from_secs(3));
    m.kill9();
    writer.join().unwrap();
    let synced = synced.lock().unwrap().clone();
    assert!(synced.len() > 5, "the writer got only {} files through before the kill", synced.len());
    assert!(!common::mount::is_mounted(&dir), "mountpoint still mounted after the kill");

    let mut m = Mount::start(&dir, &ring.addr(1), &ring.member_args());
    for (name, len) in &synced {
        let i: u64 = name[1..].parse().unwrap();
        let got = fs::read(m.path(&format!("w/{name}"))).unwrap_or_else(|e| panic!("fsynced {name} lost: {e}"));
        assert!(got == bytes(*len as usize, i), "fsynced {name} damaged");
    }
    // No dangling entries: everything listed can be opened.
    for e in fs::read_dir(m.path("w")).unwrap() {
        let e = e.unwrap();
        fs::metadata(e.path()).unwrap_or_else(|x| panic!("dangling entry {:?}: {x}", e.file_name()));
    }

    // Unmount with a file open: the process exits, and what was closed is kept.
    let mut open = fs::File::create(m.path("open")).unwrap();
    open.write_all(b"written before the unmount").unwrap();
    fs::write(m.path("closed"), b"closed before the unmount").unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let d2 = dir.clone();
    std::thread::spawn(move || {
        let st = std::process::Command::new("fusermount3").arg("-uz").arg(&d2).status();
        let _ = tx.send(st);
    });
    assert!(rx.recv_timeout(Duration::from_secs(30)).unwrap().unwrap().success());
    drop(open);
    let status = m.wait_exit(Duration::from_secs(60)).expect("the mount process did not exit after fusermount -u");
    assert!(status.success(), "mount exited with {status}; log:\n{}", m.log_text());
    let m = Mount::start(&dir, &ring.addr(2), &ring.member_args());
    assert_eq!(fs::read(m.path("closed")).unwrap(), b"closed before the unmount");
    assert_eq!(fs::read(m.path("open")).unwrap(), b"written before the unmount");
}
