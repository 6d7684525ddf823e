//! Real FUSE mounts of `mutualstore-fs mount` for tests: each mounts in a temporary
//! directory and is always unmounted (and its process killed) when dropped, even when
//! the test fails.

use super::procs::BIN;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Mount {
    pub dir: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

/// Fails the test (with the reason) where FUSE cannot work, instead of skipping it.
pub fn need_fuse() {
    assert!(Path::new("/dev/fuse").exists(), "these tests need /dev/fuse (FUSE); .ci/run installs fuse3");
    assert!(
        Command::new("fusermount3").arg("-V").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success()),
        "these tests need fusermount3 (apt-get install -y fuse3)"
    );
}

pub fn is_mounted(dir: &Path) -> bool {
    let want = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines().any(|l| l.split(' ').nth(4) == Some(want.to_str().unwrap_or("")))
}

impl Mount {
    /// Mounts the ring reached at `join` at `dir` (created), in the foreground as a
    /// child process; waits until the mount is up.
    pub fn start(dir: &Path, join: &str, extra: &[String]) -> Mount {
        need_fuse();
        std::fs::create_dir_all(dir).unwrap();
        let log = dir.with_extension("log");
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        let child = Command::new(BIN)
            .arg("mount")
            .arg(dir)
            .args(["--join", join, "--foreground", "--reclaim-delay-s", "1"])
            .args(extra)
            .env("RUST_LOG", std::env::var("MS_TEST_MOUNT_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .spawn()
            .expect("spawn mount");
        let mut m = Mount { dir: dir.to_path_buf(), log, child: Some(child) };
        let start = Instant::now();
        while !is_mounted(dir) {
            if let Some(Ok(Some(st))) = m.child.as_mut().map(|c| c.try_wait()) {
                panic!("mount exited ({st}) before mounting; log:\n{}", m.log_text());
            }
            assert!(start.elapsed() < Duration::from_secs(30), "mount did not come up in 30 s; log:\n{}", m.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
        m
    }

    pub fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("mount process running").id()
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    /// Waits (bounded) for the mount process to exit; its status if it did.
    pub fn wait_exit(&mut self, max: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        loop {
            let c = self.child.as_mut()?;
            if let Ok(Some(st)) = c.try_wait() {
                self.child = None;
                return Some(st);
            }
            if start.elapsed() > max {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// kill -9 the mount process; waits until it is gone and the mountpoint is free.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let start = Instant::now();
        // auto_unmount detaches it; give that a moment, then do it ourselves.
        while is_mounted(&self.dir) && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(100));
        }
        if is_mounted(&self.dir) {
            let _ = Command::new("fusermount3").arg("-uz").arg(&self.dir).status();
        }
    }

    /// fusermount3 -u (lazy with `lazy`); the exit status of the mount process.
    pub fn unmount(&mut self, lazy: bool) -> Option<std::process::ExitStatus> {
        let st = Command::new("fusermount3").arg(if lazy { "-uz" } else { "-u" }).arg(&self.dir).status().expect("fusermount3");
        assert!(st.success(), "fusermount3 -u {} failed", self.dir.display());
        self.wait_exit(Duration::from_secs(60))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log_text();
            let tail: Vec<&str> = log.lines().rev().take(80).collect();
            eprintln!("--- last lines of {} ---", self.log.display());
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
        if is_mounted(&self.dir) {
            let _ = Command::new("fusermount3").arg("-uz").arg(&self.dir).stderr(Stdio::null()).status();
        }
        if self.wait_exit(Duration::from_secs(10)).is_none() {
            if let Some(mut c) = self.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}
