//! The filesystem's POSIX surface on a real FUSE mount over real peer processes
//! (3 peers, 2+1): every call a program makes, checked against what Linux promises,
//! errno included; ordinary tools on the mount; df and space reclaim; ENOSPC.

mod common;

use common::mount::Mount;
use common::procs::*;
use std::ffi::CString;
use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

#[track_caller]
fn errno<T: std::fmt::Debug>(r: std::io::Result<T>) -> i32 {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn ring3(root: &Path) -> ProcRing {
    ProcRing::start(&root.join("ring"), 3, "2+1", "1GiB", 600.0)
}

#[test]
fn files_read_write_truncate_and_open_flags() {
    let tmp = tempfile::tempdir().unwrap();
    let ring = ring3(tmp.path());
    let m = Mount::start(&tmp.path().join("mnt"), &ring.first_alive(), &ring.member_args());

    // create, O_EXCL, O_TRUNC, O_APPEND
    fs::write(m.path("a"), b"hello").unwrap();
    assert_eq!(fs::read(m.path("a")).unwrap(), b"hello");
    assert_eq!(errno(OpenOptions::new().write(true).create_new(true).open(m.path("a"))), libc::EEXIST);
    OpenOptions::new().write(true).truncate(true).open(m.path("a")).unwrap().write_all(b"xy").unwrap();
    assert_eq!(fs::read(m.path("a")).unwrap(), b"xy");
    OpenOptions::new().append(true).open(m.path("a")).unwrap().write_all(b"123").unwrap();
    assert_eq!(fs::read(m.path("a")).unwrap(), b"xy123");
    assert_eq!(errno(fs::read(m.path("missing"))), libc::ENOENT);
    // A terminal probe (what Python and shells send on open) is told "not a terminal".
    {
        use std::os::fd::AsRawFd;
        let f = fs::File::open(m.path("a")).unwrap();
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        let r = unsafe { libc::ioctl(f.as_raw_fd(), libc::TCGETS, &mut t) };
        assert_eq!(errno(if r == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }), libc::ENOTTY);
    }

    // Writes at any offset, across chunk boundaries (2 MiB for 2+1), with holes,
    // checked against a model in memory, while open and after close.
    let mut model: Vec<u8> = Vec::new();
    let mut f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(m.path("r")).unwrap();
    let writes: &[(u64, usize, u64)] = &[(0, 3 << 20, 1), (100, 5000, 2), ((2 << 20) - 10, 100, 3), (7 << 20, 1000, 4), ((5 << 20) + 3, 70_000, 5), (1, 1, 6)];
    for &(off, len, seed) in writes {
        let data = bytes(len, seed);
        f.seek(SeekFrom::Start(off)).unwrap();
        f.write_all(&data).unwrap();
        let end = off as usize + len;
        if model.len() < end {
            model.resize(end, 0);
        }
        model[off as usize..end].copy_from_slice(&data);
    }
    let mut got = Vec::new();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.read_to_end(&mut got).unwrap();
    assert!(got == model, "content while open differs from the model");
    f.sync_all().unwrap();
    f.sync_data().unwrap();
    drop(f);
    assert!(fs::read(m.path("r")).unwrap() == model, "content after close differs");
    assert_eq!(fs::metadata(m.path("r")).unwrap().len(), model.len() as u64);

    // Truncate down, then up: the cut-off bytes must come back as zeros.
    let f = OpenOptions::new().write(true).open(m.path("r")).unwrap();
    f.set_len(1_000_003).unwrap();
    f.set_len(3_000_000).unwrap();
    drop(f);
    model.truncate(1_000_003);
    model.resize(3_000_000, 0);
    assert!(fs::read(m.path("r")).unwrap() == model, "truncate down then up");
    // truncate(2) by path, not open
    let c = cstr(&m.path("r"));
    assert_eq!(unsafe { libc::truncate(c.as_ptr(), 10) }, 0);
    assert_eq!(fs::read(m.path("r")).unwrap(), &model[..10]);

    // A file that grows from inline to chunks and shrinks back.
    let big = bytes(300_000, 9);
    fs::write(m.path("g"), &big).unwrap();
    assert_eq!(fs::read(m.path("g")).unwrap(), big);
    OpenOptions::new().write(true).open(m.path("g")).unwrap().set_len(1000).unwrap();
    assert_eq!(fs::read(m.path("g")).unwrap(), &big[..1000]);

    // Sparse file: a hole reads as zeros.
    let mut f = fs::File::create(m.path("sparse")).unwrap();
    f.seek(SeekFrom::Start(10 << 20)).unwrap();
    f.write_all(b"end").unwrap();
    drop(f);
    let s = fs::read(m.path("sparse")).unwrap();
    assert_eq!(s.len(), (10 << 20) + 3);
    assert!(s[..10 << 20].iter().all(|b| *b == 0) && &s[10 << 20..] == b"end");

    // Unlink while open: the open file stays readable until closed.
    fs::write(m.path("u"), b"still here").unwrap();
    let mut f = fs::File::open(m.path("u")).unwrap();
    fs::remove_file(m.path("u")).unwrap();
    assert_eq!(errno(fs::metadata(m.path("u"))), libc::ENOENT);
    let mut s = String::new();
    f.read_to_string(&mut s).unwrap();
    assert_eq!(s, "still here");
}

#[test]
fn directories_names_links_attributes_and_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let ring = ring3(tmp.path());
    let m = Mount::start(&tmp.path().join("mnt"), &ring.first_alive(), &ring.member_args());

    fs::create_dir(m.path("d")).unwrap();
    assert_eq!(errno(fs::create_dir(m.path("d"))), libc::EEXIST);
    fs::write(m.path("d/f"), b"1").unwrap();
    assert_eq!(errno(fs::remove_dir(m.path("d"))), libc::ENOTEMPTY);
    assert_eq!(errno(fs::remove_file(m.path("d"))), libc::EISDIR);
    assert_eq!(errno(fs::remove_dir(m.path("d/f"))), libc::ENOTDIR);
    assert_eq!(errno(fs::write(m.path("d/f/x"), b"")), libc::ENOTDIR);
    assert_eq!(errno(fs::read_dir(m.path("nope"))), libc::ENOENT);

    // rename: within a directory, across directories, over an existing file (atomic
    // replace), directories with content, and a directory over a non-empty one.
    fs::rename(m.path("d/f"), m.path("d/g")).unwrap();
    assert_eq!(errno(fs::metadata(m.path("d/f"))), libc::ENOENT);
    fs::create_dir(m.path("e")).unwrap();
    fs::rename(m.path("d/g"), m.path("e/g")).unwrap();
    assert_eq!(fs::read(m.path("e/g")).unwrap(), b"1");
    fs::write(m.path("e/h"), b"2").unwrap();
    fs::rename(m.path("e/h"), m.path("e/g")).unwrap();
    assert_eq!(fs::read(m.path("e/g")).unwrap(), b"2");
    assert_eq!(fs::read_dir(m.path("e")).unwrap().count(), 1);
    fs::create_dir_all(m.path("d/sub/deeper")).unwrap();
    fs::write(m.path("d/sub/deeper/x"), b"deep").unwrap();
    fs::rename(m.path("d/sub"), m.path("e/moved")).unwrap();
    assert_eq!(fs::read(m.path("e/moved/deeper/x")).unwrap(), b"deep");
    assert!(!m.path("d/sub").exists());
    fs::create_dir(m.path("full")).unwrap();
    fs::write(m.path("full/x"), b"").unwrap();
    assert_eq!(errno(fs::rename(m.path("e/moved"), m.path("full"))), libc::ENOTEMPTY);
    fs::create_dir(m.path("empty")).unwrap();
    fs::rename(m.path("e/moved"), m.path("empty")).unwrap();
    assert_eq!(fs::read(m.path("empty/deeper/x")).unwrap(), b"deep");

    // Hard links share content and count links.
    fs::write(m.path("l1"), b"linked").unwrap();
    fs::hard_link(m.path("l1"), m.path("e/l2")).unwrap();
    assert_eq!(fs::metadata(m.path("l1")).unwrap().nlink(), 2);
    assert_eq!(fs::metadata(m.path("l1")).unwrap().ino(), fs::metadata(m.path("e/l2")).unwrap().ino());
    OpenOptions::new().append(true).open(m.path("e/l2")).unwrap().write_all(b"!").unwrap();
    assert_eq!(fs::read(m.path("l1")).unwrap(), b"linked!");
    fs::remove_file(m.path("l1")).unwrap();
    assert_eq!(fs::read(m.path("e/l2")).unwrap(), b"linked!");
    assert_eq!(fs::metadata(m.path("e/l2")).unwrap().nlink(), 1);

    // Symlinks.
    std::os::unix::fs::symlink("e/l2", m.path("sym")).unwrap();
    assert_eq!(fs::read_link(m.path("sym")).unwrap(), Path::new("e/l2"));
    assert_eq!(fs::read(m.path("sym")).unwrap(), b"linked!");
    assert!(fs::symlink_metadata(m.path("sym")).unwrap().file_type().is_symlink());

    // chmod, chown, utimens and ctime.
    fs::set_permissions(m.path("e/l2"), fs::Permissions::from_mode(0o640)).unwrap();
    assert_eq!(fs::metadata(m.path("e/l2")).unwrap().mode() & 0o7777, 0o640);
    std::os::unix::fs::chown(m.path("e/l2"), Some(1234), Some(5678)).unwrap();
    let md = fs::metadata(m.path("e/l2")).unwrap();
    assert_eq!((md.uid(), md.gid()), (1234, 5678));
    let ctime_before = (md.ctime(), md.ctime_nsec());
    std::thread::sleep(Duration::from_millis(20));
    let times = [libc::timespec { tv_sec: 1_000_000_000, tv_nsec: 5 }, libc::timespec { tv_sec: 1_234_567_890, tv_nsec: 123_456_789 }];
    let c = cstr(&m.path("e/l2"));
    assert_eq!(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0) }, 0);
    let md = fs::metadata(m.path("e/l2")).unwrap();
    assert_eq!((md.mtime(), md.mtime_nsec()), (1_234_567_890, 123_456_789));
    assert_eq!((md.atime(), md.atime_nsec()), (1_000_000_000, 5));
    assert!((md.ctime(), md.ctime_nsec()) > ctime_before, "utimens changes ctime");
    let mtime_before = (md.mtime(), md.mtime_nsec());
    OpenOptions::new().append(true).open(m.path("e/l2")).unwrap().write_all(b"more").unwrap();
    assert!((fs::metadata(m.path("e/l2")).unwrap().mtime(),) > (mtime_before.0,), "a write moves mtime");

    // Names: up to 255 bytes of anything but '/' and NUL.
    let long = "n".repeat(255);
    fs::write(m.path(&long), b"ok").unwrap();
    assert_eq!(fs::read(m.path(&long)).unwrap(), b"ok");
    assert_eq!(errno(fs::write(m.path(&"n".repeat(256)), b"")), libc::ENAMETOOLONG);
    let odd = std::ffi::OsStr::from_bytes(b"sp ace\x01\xff\xfe\xc3\xa9");
    fs::write(m.dir.join(odd), b"odd").unwrap();
    assert_eq!(fs::read(m.dir.join(odd)).unwrap(), b"odd");
    assert!(fs::read_dir(&m.dir).unwrap().any(|e| e.unwrap().file_name() == odd));

    // Extended attributes.
    let c = cstr(&m.path("e/l2"));
    let name = CString::new("user.colour").unwrap();
    assert_eq!(unsafe { libc::setxattr(c.as_ptr(), name.as_ptr(), b"blue".as_ptr() as *const _, 4, 0) }, 0);
    let mut buf = [0u8; 16];
    let n = unsafe { libc::getxattr(c.as_ptr(), name.as_ptr(), buf.as_mut_ptr() as *mut _, buf.len()) };
    assert_eq!(&buf[..n as usize], b"blue");
    let n = unsafe { libc::listxattr(c.as_ptr(), buf.as_mut_ptr() as *mut _, buf.len()) };
    assert_eq!(&buf[..n as usize], b"user.colour\0");
    assert_eq!(unsafe { libc::removexattr(c.as_ptr(), name.as_ptr()) }, 0);
    let n = unsafe { libc::getxattr(c.as_ptr(), name.as_ptr(), buf.as_mut_ptr() as *mut _, buf.len()) };
    assert_eq!(n, -1);
    assert_eq!(std::io::Error::last_os_error().raw_os_error(), Some(libc::ENODATA));
}

#[test]
fn large_directory_lists_every_entry_with_offsets() {
    let tmp = tempfile::tempdir().unwrap();
    let ring = ring3(tmp.path());
    let m = Mount::start(&tmp.path().join("mnt"), &ring.first_alive(), &ring.member_args());
    fs::create_dir(m.path("big")).unwrap();
    const N: usize = 10_000;
    std::thread::scope(|s| {
        for t in 0..4 {
            let dir = m.path("big");
            s.spawn(move || {
                for i in (t..N).step_by(4) {
                    fs::File::create(dir.join(format!("entry-{i:05}"))).unwrap();
                }
            });
        }
    });
    let mut names: Vec<String> = fs::read_dir(m.path("big")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    let want: Vec<String> = (0..N).map(|i| format!("entry-{i:05}")).collect();
    assert_eq!(names.len(), N);
    assert!(names == want, "listing differs from the names created");

    // telldir/seekdir: an offset taken mid-listing resumes at the same entry.
    let c = cstr(&m.path("big"));
    unsafe {
        let d = libc::opendir(c.as_ptr());
        assert!(!d.is_null());
        for _ in 0..6000 {
            assert!(!libc::readdir(d).is_null());
        }
        let pos = libc::telldir(d);
        let next = std::ffi::CStr::from_ptr((*libc::readdir(d)).d_name.as_ptr()).to_owned();
        for _ in 0..100 {
            libc::readdir(d);
        }
        libc::seekdir(d, pos);
        let again = std::ffi::CStr::from_ptr((*libc::readdir(d)).d_name.as_ptr()).to_owned();
        assert_eq!(next, again);
        libc::closedir(d);
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn make_tree(root: &Path, files: usize, seed: u64) {
    for i in 0..files {
        let dir = root.join(format!("d{}/s{}", i % 7, i % 3));
        fs::create_dir_all(&dir).unwrap();
        let len = match i % 10 {
            0 => 3 << 20,
            1 => 100_000,
            _ => (i * 37) % 5000,
        };
        fs::write(dir.join(format!("f{i}.dat")), bytes(len, seed + i as u64)).unwrap();
    }
}

#[test]
fn ordinary_tools_work_on_the_mount() {
    let tmp = tempfile::tempdir().unwrap();
    let ring = ring3(tmp.path());
    let m = Mount::start(&tmp.path().join("mnt"), &ring.first_alive(), &ring.member_args());
    let src = tmp.path().join("src");
    make_tree(&src, 60, 100);
    let mnt = m.dir.to_str().unwrap().to_string();
    let srcs = src.to_str().unwrap();

    run(Command::new("cp").args(["-r", srcs, &format!("{mnt}/cp")]));
    run(Command::new("diff").args(["-r", srcs, &format!("{mnt}/cp")]));
    run(Command::new("cmp").args([&format!("{srcs}/d0/s0/f0.dat"), &format!("{mnt}/cp/d0/s0/f0.dat")]));
    let cat = Command::new("cat").arg(format!("{mnt}/cp/d0/s0/f0.dat")).output().unwrap();
    assert!(cat.stdout == fs::read(src.join("d0/s0/f0.dat")).unwrap(), "cat returns the bytes");

    run(Command::new("mv").args([&format!("{mnt}/cp"), &format!("{mnt}/moved")]));
    run(Command::new("diff").args(["-r", srcs, &format!("{mnt}/moved")]));

    let tar = tmp.path().join("t.tar");
    run(Command::new("tar").args(["-C", &format!("{mnt}/moved"), "-cf", tar.to_str().unwrap(), "."]));
    fs::create_dir(m.path("untar")).unwrap();
    run(Command::new("tar").args(["-C", &format!("{mnt}/untar"), "-xf", tar.to_str().unwrap()]));
    run(Command::new("diff").args(["-r", srcs, &format!("{mnt}/untar")]));

    run(Command::new("rsync").args(["-a", &format!("{srcs}/"), &format!("{mnt}/rs/")]));
    run(Command::new("diff").args(["-r", srcs, &format!("{mnt}/rs")]));
    let again = run(Command::new("rsync").args(["-ai", &format!("{srcs}/"), &format!("{mnt}/rs/")]));
    assert!(again.lines().all(|l| !l.starts_with(">f")), "a second rsync -a finds nothing to copy: {again}");
    let md_src = fs::metadata(src.join("d1/s1/f1.dat")).unwrap();
    let md_dst = fs::metadata(m.path("rs/d1/s1/f1.dat")).unwrap();
    assert_eq!(md_src.mtime(), md_dst.mtime(), "rsync -a keeps mtimes");

    let repo = format!("{mnt}/repo");
    let git = |args: &[&str]| run(Command::new("git").args(["-c", "user.name=t", "-c", "user.email=t@example.org", "-C", &repo]).args(args));
    fs::create_dir(m.path("repo")).unwrap();
    git(&["init", "-q"]);
    fs::write(m.path("repo/readme"), b"first\n").unwrap();
    git(&["add", "readme"]);
    git(&["commit", "-qm", "one"]);
    fs::write(m.path("repo/readme"), b"second\n").unwrap();
    git(&["commit", "-qam", "two"]);
    let log = git(&["log", "--oneline"]);
    assert_eq!(log.lines().count(), 2, "git log: {log}");
    git(&["fsck", "--strict"]);
    assert_eq!(git(&["show", "HEAD~1:readme"]), "first\n");

    run(Command::new("rm").args(["-r", &format!("{mnt}/moved")]));
    assert!(!m.path("moved").exists());
}

#[test]
fn df_shows_usable_space_and_deletes_give_it_back() {
    let tmp = tempfile::tempdir().unwrap();
    let ring = ProcRing::start(&tmp.path().join("ring"), 3, "2+1", "256MiB", 600.0);
    let m = Mount::start(&tmp.path().join("mnt"), &ring.first_alive(), &ring.member_args());
    let statvfs = |p: &Path| {
        let c = cstr(p);
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut s) }, 0);
        (s.f_blocks * s.f_frsize, (s.f_blocks - s.f_bfree) * s.f_frsize)
    };
    let (size, used0) = statvfs(&m.dir);
    // 3 x 256 MiB at 2+1: two thirds usable.
    assert!((500 << 20..=530 << 20).contains(&size), "df size {size}");
    fs::write(m.path("f"), bytes(40 << 20, 1)).unwrap();
    let wait_used = |pred: &dyn Fn(u64) -> bool, what: &str| {
        let start = std::time::Instant::now();
        loop {
            std::thread::sleep(Duration::from_millis(500));
            let (_, used) = statvfs(&m.dir);
            if pred(used) {
                return used;
            }
            assert!(start.elapsed() < Duration::from_secs(60), "df never showed {what}: used {used}");
        }
    };
    let used1 = wait_used(&|u| u >= used0 + (38 << 20), "the 40 MiB written");
    fs::remove_file(m.path("f")).unwrap();
    wait_used(&|u| u + (30 << 20) < used1, "the space of the deleted file back");

    // Filling the ring gets ENOSPC, not a hang or EIO.
    let mut f = fs::File::create(m.path("fill")).unwrap();
    let chunk = bytes(4 << 20, 2);
    let mut err = None;
    for _ in 0..400 {
        if let Err(e) = f.write_all(&chunk) {
            err = Some(e);
            break;
        }
    }
    let e = err.or_else(|| f.sync_all().err()).expect("writing 1.6 GiB into 512 MiB must fail");
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "full ring: {e}");
}

#[test]
fn mount_refuses_bad_input_with_one_line_and_nonzero_exit() {
    let tmp = tempfile::tempdir().unwrap();
    let ring = ring3(tmp.path());
    let file = tmp.path().join("a-file");
    fs::write(&file, b"").unwrap();
    let open_secret = tmp.path().join("open.secret");
    fs::copy(&ring.secret_file, &open_secret).unwrap();
    fs::set_permissions(&open_secret, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec![tmp.path().join("missing").display().to_string(), "--join".into(), ring.first_alive().to_string()], "mountpoint"),
        (vec![file.display().to_string(), "--join".into(), ring.first_alive().to_string()], "not a directory"),
        (vec![tmp.path().display().to_string(), "--join".into(), "127.0.0.1:1".into(), "--foreground".into()], "cannot reach"),
        (vec![tmp.path().display().to_string(), "--join".into(), "not an address".into()], "--join"),
        (vec![tmp.path().display().to_string(), "--join".into(), ring.first_alive().to_string(), "--secret-file".into(), "/nonexistent/ring.secret".into()], "secret file"),
        (vec![tmp.path().display().to_string(), "--join".into(), ring.first_alive().to_string(), "--secret-file".into(), open_secret.display().to_string()], "readable by others"),
    ];
    for (args, want) in cases {
        let start = std::time::Instant::now();
        // The ring's credentials first; a case's own --secret-file comes later and wins.
        let out = Command::new(BIN).arg("mount").args(ring.member_args()).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "mount {args:?} succeeded");
        assert!(err.contains(want), "mount {args:?}: stderr {err:?} does not say {want:?}");
        assert!(err.trim().lines().filter(|l| l.starts_with("mutualstore-fs:")).count() == 1, "one error line: {err:?}");
        assert!(start.elapsed() < Duration::from_secs(20), "mount {args:?} took {:?} to fail", start.elapsed());
        assert!(!common::mount::is_mounted(tmp.path()));
    }
}
