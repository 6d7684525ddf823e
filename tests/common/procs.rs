//! Peers as real processes of the `mutualstore-fs` binary on 127.0.0.1, for tests that
//! kill -9, SIGSTOP or drain them. Dropping the ring kills every process it started.

use mutualstore::rpc::client::GrpcNet;
use mutualstore::rpc::NetAddr;
use mutualstore::status::RingStatus;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_mutualstore-fs");

pub struct ProcPeer {
    pub child: Child,
    pub addr: NetAddr,
    pub dir: PathBuf,
}

pub struct ProcRing {
    pub root: PathBuf,
    pub peers: Vec<Option<ProcPeer>>,
    pub code: String,
    pub capacity: String,
    pub grace_s: f64,
    /// Where each peer last listened, so a restart comes back at the same address.
    pub last_addr: Vec<NetAddr>,
    /// Extra flags for peers started from now on.
    pub extra: Vec<String>,
    /// The ring's secret (a 0600 file under root) and the mounts' file key.
    pub secret_file: PathBuf,
    pub key_file: PathBuf,
    pub tls: Option<std::sync::Arc<mutualstore::crypto::tls::RingTls>>,
}

impl ProcRing {
    /// Starts `n` peers one after another, each joining the first.
    pub fn start(root: &Path, n: usize, code: &str, capacity: &str, grace_s: f64) -> ProcRing {
        std::fs::create_dir_all(root).unwrap();
        let secret = mutualstore::crypto::secret::RingSecret::generate();
        let secret_file = root.join("test-ring.secret");
        secret.save(&secret_file).unwrap();
        let tls = Some(std::sync::Arc::new(mutualstore::crypto::tls::RingTls::new(&secret).unwrap()));
        let key_file = root.join("fs.key");
        let mut r = ProcRing {
            root: root.to_path_buf(),
            peers: Vec::new(),
            code: code.into(),
            capacity: capacity.into(),
            grace_s,
            last_addr: Vec::new(),
            extra: Vec::new(),
            secret_file,
            key_file,
            tls,
        };
        for _ in 0..n {
            r.add_peer();
        }
        r
    }

    pub fn first_alive(&self) -> NetAddr {
        self.peers.iter().flatten().next().expect("a live peer").addr.clone()
    }

    pub fn addr(&self, i: usize) -> NetAddr {
        self.peers[i].as_ref().expect("peer is running").addr.clone()
    }

    /// Starts one more peer (joining a live one); returns its index.
    pub fn add_peer(&mut self) -> usize {
        let i = self.peers.len();
        self.peers.push(None);
        self.last_addr.push(NetAddr::from(""));
        self.spawn(i, "127.0.0.1:0");
        i
    }

    /// Starts one more peer listening at `listen` (with `self.extra`, e.g. --advertise).
    pub fn add_peer_at(&mut self, listen: &str) -> usize {
        let i = self.peers.len();
        self.peers.push(None);
        self.last_addr.push(NetAddr::from(""));
        self.spawn(i, listen);
        i
    }

    /// Starts peer `i` again from its data directory (after a kill).
    pub fn restart(&mut self, i: usize) {
        assert!(self.peers[i].is_none(), "peer {i} is still running");
        let listen = self.last_addr[i].to_string();
        self.spawn(i, &listen);
    }

    fn spawn(&mut self, i: usize, listen: &str) {
        let dir = self.root.join(format!("peer{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("peer.log")).unwrap();
        let mut cmd = Command::new(BIN);
        cmd.args(["peer", "--listen", listen, "--data"])
            .arg(&dir)
            .args(["--capacity", &self.capacity, "--maintenance-s", "0.2", "--upkeep-s", "1", "--grace-s", &self.grace_s.to_string()])
            .args(&self.extra)
            .arg("--secret-file")
            .arg(&self.secret_file)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        match self.peers.iter().flatten().next() {
            Some(p) => {
                cmd.args(["--join", &p.addr]);
            }
            _ => {
                cmd.args(["--code", &self.code]);
            }
        }
        let mut child = cmd.spawn().expect("spawn peer");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let addr = line
            .split_whitespace()
            .skip_while(|w| *w != "at")
            .nth(1)
            .unwrap_or_else(|| panic!("peer {i} did not start: {line:?}; log: {}", std::fs::read_to_string(dir.join("peer.log")).unwrap_or_default()))
            .to_string();
        self.last_addr[i] = NetAddr::from(addr.as_str());
        self.peers[i] = Some(ProcPeer { child, addr: NetAddr::from(addr.as_str()), dir });
    }

    /// kill -9.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.peers[i].take() {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }

    pub fn signal(&self, i: usize, sig: i32) {
        let p = self.peers[i].as_ref().expect("peer is running");
        let rc = unsafe { libc::kill(p.child.id() as i32, sig) };
        assert_eq!(rc, 0, "signal {sig} to peer {i}");
    }

    /// Waits (bounded) for the process of peer `i` to exit by itself.
    pub fn wait_exit(&mut self, i: usize, max: Duration) -> bool {
        let deadline = std::time::Instant::now() + max;
        loop {
            let p = self.peers[i].as_mut().expect("peer is running");
            if let Ok(Some(_)) = p.child.try_wait() {
                self.peers[i] = None;
                return true;
            }
            if std::time::Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A network handle with this ring's member credentials.
    pub fn net(&self) -> GrpcNet {
        GrpcNet::new().with_tls(self.tls.clone())
    }

    /// The flags a mount of this ring needs: the secret and the file key.
    pub fn member_args(&self) -> Vec<String> {
        vec!["--secret-file".into(), self.secret_file.display().to_string(), "--key-file".into(), self.key_file.display().to_string()]
    }

    pub fn alive(&self) -> usize {
        self.peers.iter().flatten().count()
    }

    pub async fn status(&self) -> Result<RingStatus, String> {
        let net = self.net();
        mutualstore::status::collect(&net, &self.first_alive()).await
    }

    /// Polls status until `pred` holds (bounded); returns the last status seen.
    pub async fn wait_status(&self, max: Duration, what: &str, pred: impl Fn(&RingStatus) -> bool) -> RingStatus {
        let deadline = tokio::time::Instant::now() + max;
        loop {
            if let Ok(st) = self.status().await {
                if pred(&st) {
                    return st;
                }
                if tokio::time::Instant::now() > deadline {
                    panic!("timed out waiting for {what}; last status:\n{}", mutualstore::status::table(&st));
                }
            } else if tokio::time::Instant::now() > deadline {
                panic!("timed out waiting for {what}; status unreachable");
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Waits until every peer has scanned and no stripe is degraded (and there are some).
    pub async fn wait_clean(&self, max: Duration) -> RingStatus {
        self.wait_status(max, "a clean ring", |st| st.health.scanned && st.health.degraded_stripes == 0 && st.health.stripes_total > 0).await
    }

    /// Waits until every live peer is in the ring and all have scanned since `after_scans`.
    pub async fn wait_ring(&self, max: Duration) -> RingStatus {
        let n = self.alive();
        self.wait_status(max, &format!("a ring of {n} live peers"), |st| st.ring_size == n && st.peers.iter().filter(|p| p.alive).count() == n).await
    }
}

impl Drop for ProcRing {
    fn drop(&mut self) {
        for i in 0..self.peers.len() {
            if let Some(p) = self.peers[i].as_mut() {
                unsafe { libc::kill(p.child.id() as i32, libc::SIGCONT) };
            }
            self.kill(i);
        }
    }
}

/// Runs the CLI (bounded); returns (success, stdout, stderr).
pub async fn cli(args: &[&str], max: Duration) -> (bool, String, String) {
    let child = tokio::process::Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn cli");
    match tokio::time::timeout(max, child.wait_with_output()).await {
        Ok(Ok(o)) => (o.status.success(), String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned()),
        Ok(Err(e)) => panic!("cli {args:?}: {e}"),
        Err(_) => panic!("cli {args:?} did not finish within {max:?}"),
    }
}

/// Seeded pseudo-random bytes.
pub fn bytes(len: usize, seed: u64) -> Vec<u8> {
    use rand::{Rng, SeedableRng};
    let mut v = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill(&mut v[..]);
    v
}
