//! `mutualstore-fs mount`: checks its inputs, connects to the ring (optionally running
//! a storage peer in-process), mounts, serves until unmounted, then publishes what is
//! open and reclaims what is queued. Without --foreground it starts itself again in
//! the background and returns once the mount is ready (or with the child's error).

use super::chunk::{chunk_bytes_for, Reclaimer};
use super::file::DataCtx;
use super::fuse::FuseFs;
use super::ops::Fs;
use crate::crypto::seal::FileKey;
use crate::crypto::tls::RingTls;
use crate::files::FileClient;
use crate::meta::client::RecordClient;
use crate::peer::{self, PeerConfig};
use crate::rpc::NetAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// FUSE request threads: enough that a slow ring call does not stall stat and readdir.
const FUSE_THREADS: usize = 6;
/// Chunks kept in memory for reads (each up to k MiB).
const CACHE_CHUNKS: usize = 16;

pub struct MountConfig {
    pub mountpoint: PathBuf,
    pub join: NetAddr,
    /// Run a storage peer in this process as well.
    pub peer: Option<PeerConfig>,
    pub reclaim_delay: Duration,
    /// Encrypts everything this mount stores, and names the filesystem it mounts.
    pub key: FileKey,
    /// Ring membership (None: a ring without a secret).
    pub tls: Option<Arc<RingTls>>,
}

fn check_mountpoint(p: &Path) -> Result<PathBuf, String> {
    let md = std::fs::metadata(p).map_err(|e| format!("mountpoint {}: {e}", p.display()))?;
    if !md.is_dir() {
        return Err(format!("mountpoint {} is not a directory", p.display()));
    }
    if !Path::new("/dev/fuse").exists() {
        return Err("no /dev/fuse: load the fuse module (modprobe fuse) or run where FUSE is available".into());
    }
    std::fs::canonicalize(p).map_err(|e| format!("mountpoint {}: {e}", p.display()))
}

/// Is a mutualstore filesystem mounted at `p` (canonical path)?
pub fn is_mounted(p: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return false };
    let want = p.to_string_lossy();
    info.lines().any(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        let sep = f.iter().position(|x| *x == "-");
        f.len() > 4 && f[4] == want && sep.is_some_and(|s| f.get(s + 1).is_some_and(|t| t.contains("mutualstore")))
    })
}

/// Mounts and serves until unmounted (fusermount -u, SIGTERM or SIGINT).
pub fn run_foreground(cfg: MountConfig) -> Result<(), String> {
    let mountpoint = check_mountpoint(&cfg.mountpoint)?;
    // Chunk buffers are allocated and freed on many threads; glibc's default of one
    // arena per thread kept freed buffers resident (RSS well above what is live).
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    let rt = peer::runtime()?;
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let (fs, reclaim_task, local_peer) = rt.block_on(async {
        let (join, local_peer) = match cfg.peer {
            Some(pc) => {
                let p = peer::start(pc).await?;
                log::info!("storage peer {} serving at {}", p.state.node.lock().peer_id.short(), p.addr);
                (p.addr.clone(), Some(p))
            }
            None => (cfg.join.clone(), None),
        };
        let client = tokio::time::timeout(Duration::from_secs(15), FileClient::connect_writer(join.clone(), cfg.tls.clone()))
            .await
            .map_err(|_| format!("cannot reach {join}: no answer in 15 s"))??;
        let stripes = client.stripes;
        let key = Arc::new(cfg.key.clone());
        let records = RecordClient::new(stripes.clone()).with_key(key.clone());
        let (reclaimer, task) = Reclaimer::start(stripes.clone(), cfg.reclaim_delay, shutdown_rx.clone());
        let data = DataCtx { chunk_bytes: chunk_bytes_for(stripes.code.k), stripes, cache: Fs::chunk_cache(CACHE_CHUNKS, key.clone()) };
        let fs = Arc::new(Fs::new(records, data, key.fsid().to_string(), reclaimer));
        fs.init_root().await.map_err(|e| format!("cannot read or create the root directory: {e}"))?;
        tokio::spawn(fs.clone().keep_leases(shutdown_rx));
        Ok::<_, String>((fs, task, local_peer))
    })?;

    let notifier = Arc::new(OnceLock::new());
    let ffs = FuseFs { fs: fs.clone(), rt: rt.handle().clone(), notifier: notifier.clone(), stats: Arc::default() };
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName("mutualstore".into()),
        fuser::MountOption::Subtype("mutualstore".into()),
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::NoAtime,
    ];
    // auto_unmount: if this process dies, fusermount unmounts for us, so the mountpoint
    // is reusable after a crash. It needs allow_root/allow_other, which only root may
    // ask for without /etc/fuse.conf's user_allow_other.
    if unsafe { libc::geteuid() } == 0 {
        config.mount_options.push(fuser::MountOption::AutoUnmount);
        config.acl = fuser::SessionACL::All;
    }
    config.n_threads = Some(FUSE_THREADS);
    let mut session = fuser::Session::new(ffs, &mountpoint, &config).map_err(|e| format!("cannot mount at {}: {e}", mountpoint.display()))?;
    let _ = notifier.set(session.notifier());
    let mut unmounter = session.unmount_callable();
    rt.spawn(async move {
        peer::wait_for_signal().await;
        log::info!("signal received: unmounting");
        if let Err(e) = unmounter.unmount() {
            log::warn!("unmount: {e}");
        }
    });
    println!("mounted the ring at {} on {}", cfg.join, mountpoint.display());
    let served = session.run();
    // Unmounted: publish anything still open, delete what is queued, leave.
    rt.block_on(async {
        fs.flush_all().await;
        let _ = shutdown_tx.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(60), reclaim_task).await;
        if let Some(p) = local_peer {
            p.leave_and_stop().await;
        }
    });
    match served {
        // The kernel ended the connection: ENODEV on a clean unmount, or ECONNABORTED
        // when one of the session's threads saw the end first and closed its channel
        // (seen after `fusermount -uz` with a file still open). Either way the
        // filesystem is unmounted and everything above has been flushed.
        Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => {
            log::info!("the kernel closed the FUSE connection ({e})");
            Ok(())
        }
        r => r.map_err(|e| format!("FUSE session ended with an error: {e}")),
    }
}

/// Starts `args` (this program with --foreground added) in the background and waits
/// for the mount to appear; the child's log goes to `log`.
pub fn run_detached(mountpoint: &Path, args: Vec<String>, log: &Path) -> Result<(), String> {
    let canonical = check_mountpoint(mountpoint)?;
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    let out = std::fs::OpenOptions::new().create(true).append(true).open(log).map_err(|e| format!("log file {}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(&args).stdin(std::process::Stdio::null()).stdout(out).stderr(err);
    use std::os::unix::process::CommandExt;
    // Its own session: the mount outlives the shell that started it.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| format!("cannot start the mount process: {e}"))?;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if is_mounted(&canonical) {
            println!("mounted at {} (pid {}, log {}); unmount with: fusermount3 -u {}", canonical.display(), child.id(), log.display(), canonical.display());
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let last = text.lines().rev().find(|l| l.contains("mutualstore-fs:")).or_else(|| text.lines().last()).unwrap_or("");
            return Err(format!("mount failed ({status}): {}", last.trim_start_matches("mutualstore-fs: ")));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    Err(format!("the mount did not come up within 30 s; see {}", log.display()))
}
