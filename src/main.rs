//! The `mutualstore-fs` command line: parses flags, validates them, and hands over to
//! the library. Every failure is one line on stderr and a non-zero exit.

use clap::{Args, Parser, Subcommand};
use mutualstore::crypto::secret::{self, RingSecret};
use mutualstore::crypto::tls::RingTls;
use std::sync::Arc;
use mutualstore::erasure::upkeep::UpkeepConfig;
use mutualstore::erasure::Code;
use mutualstore::files::{FileClient, Progress};
use mutualstore::peer::{self, PeerConfig};
use mutualstore::ring::Id;
use mutualstore::rpc::NetAddr;
use mutualstore::sim::run::{run as run_sim, SimConfig};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "mutualstore-fs", version, about = "A peer-to-peer storage ring", args_override_self = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// How a command proves it is a member of the ring.
#[derive(Args, Clone)]
struct Membership {
    /// File holding the ring secret (mode 0600; `init` creates one). Or set
    /// MUTUALSTORE_SECRET to the secret itself. Not needed for a ring made without `init`.
    #[arg(long, value_name = "FILE")]
    secret_file: Option<PathBuf>,
}

impl Membership {
    fn secret(&self) -> Result<Option<RingSecret>, String> {
        secret::given(self.secret_file.as_deref())
    }

    fn tls(&self) -> Result<Option<Arc<RingTls>>, String> {
        self.secret()?.map(|s| RingTls::new(&s).map(Arc::new)).transpose()
    }

    fn net(&self) -> Result<mutualstore::rpc::client::GrpcNet, String> {
        Ok(mutualstore::rpc::client::GrpcNet::new().with_tls(self.tls()?))
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a new ring: a secret in DIR (mode 0600), printed once for the other members.
    /// Then start its first peer with `peer --data DIR` (no --join).
    Init {
        /// The first peer's data directory.
        #[arg(long)]
        data: PathBuf,
    },
    /// Run a storage peer that contributes a disk image of CAPACITY to the ring.
    Peer {
        /// Address to listen on, host:port.
        #[arg(long)]
        listen: String,
        /// Address other peers reach us at (default: --listen).
        #[arg(long)]
        advertise: Option<String>,
        /// Data directory: identity and disk image live here.
        #[arg(long)]
        data: PathBuf,
        /// Capacity of the disk image, e.g. 2GiB, 500MiB.
        #[arg(long, value_parser = parse_size)]
        capacity: u64,
        /// Any peer of the ring to join; omit to start a new ring.
        #[arg(long)]
        join: Option<String>,
        /// Seconds between maintenance rounds (stabilize, fix fingers).
        #[arg(long, default_value_t = 1.0)]
        maintenance_s: f64,
        /// Erasure code of a new ring, K+M (K data + M parity shards per stripe). Fixed
        /// when the ring is created; a joiner takes the ring's.
        #[arg(long)]
        code: Option<Code>,
        /// Seconds a stripe may miss a shard before it is rebuilt on another peer.
        #[arg(long, default_value_t = 300.0)]
        grace_s: f64,
        /// Seconds between upkeep scans (repair, rebalance, scrub). A scan walks the set of
        /// every local stripe and asks its members what they hold: with 130 stripes per
        /// peer that was a quarter of a core-second per peer, in a burst that slowed
        /// whatever the user did then; repairs wait --grace-s anyway.
        #[arg(long, default_value_t = 30.0)]
        upkeep_s: f64,
        /// Cap on repair and rebalance traffic, e.g. 64MiB (per second); 0 = no cap.
        #[arg(long, value_parser = parse_size, default_value = "64MiB")]
        repair_rate: u64,
        /// On SIGTERM/SIGINT, move every shard to other peers before leaving.
        #[arg(long)]
        drain_on_exit: bool,
        #[command(flatten)]
        member: Membership,
    },
    /// Mount the ring as a filesystem at MOUNTPOINT (unmount with fusermount3 -u).
    Mount {
        mountpoint: PathBuf,
        /// Any peer of the ring.
        #[arg(long)]
        join: String,
        /// Stay in the foreground (logs on stderr) instead of detaching once mounted.
        #[arg(long)]
        foreground: bool,
        /// Also contribute storage: run a peer with its disk image in DIR.
        #[arg(long, requires = "capacity")]
        data: Option<PathBuf>,
        /// Capacity of that peer's disk image, e.g. 20GiB.
        #[arg(long, value_parser = parse_size, requires = "data")]
        capacity: Option<u64>,
        /// Address the in-process peer listens on (with --data).
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
        /// Address other peers reach the in-process peer at (default: --listen).
        #[arg(long)]
        advertise: Option<String>,
        /// Seconds before the chunks of deleted or overwritten data are deleted from
        /// the ring (readers of the old version on other mounts get this long).
        #[arg(long, default_value_t = 30.0)]
        reclaim_delay_s: f64,
        /// Log file of the detached mount process (default: /tmp/mutualstore-mount-<name>.log).
        #[arg(long)]
        log_file: Option<PathBuf>,
        /// The file key that encrypts this filesystem (mode 0600; created if missing).
        /// Default: $MUTUALSTORE_KEY_FILE, else ~/.config/mutualstore/fs.key. Every
        /// mount of one filesystem needs the same key; a different key is a different,
        /// separate filesystem in the same ring.
        #[arg(long, value_name = "FILE")]
        key_file: Option<PathBuf>,
        #[command(flatten)]
        member: Membership,
    },
    /// Ask a peer to move its shards to others, leave the ring and exit.
    Leave {
        /// The peer that leaves.
        #[arg(long)]
        join: String,
        #[command(flatten)]
        member: Membership,
    },
    /// Show the ring's peers and their load.
    Status {
        #[arg(long)]
        join: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        member: Membership,
    },
    /// Store a file on the ring; prints its handle.
    Put {
        file: PathBuf,
        #[arg(long)]
        join: String,
        /// Shards of each stripe that must be durable before the write is acknowledged
        /// (default k+1; never below k; the rest are completed by repair).
        #[arg(long)]
        write_quorum: Option<usize>,
        #[command(flatten)]
        member: Membership,
    },
    /// Fetch a file by handle.
    Get {
        handle: String,
        #[arg(short, long)]
        output: PathBuf,
        #[arg(long)]
        join: String,
        #[command(flatten)]
        member: Membership,
    },
    /// Measure erasure encode/decode throughput on one core (a benchmark, not a test).
    BenchCodec {
        #[arg(long, default_value = "4+2")]
        code: Code,
        #[arg(long, value_parser = parse_size, default_value = "1MiB")]
        shard: u64,
        #[arg(long, default_value_t = 50)]
        rounds: usize,
    },
    /// Simulate a ring of many peers running the real ring code in memory.
    Sim {
        #[arg(long, default_value_t = 1000)]
        peers: usize,
        /// Fraction of peers that fail at once after the ring forms.
        #[arg(long, default_value_t = 0.0)]
        fail: f64,
        #[arg(long, default_value_t = 10_000)]
        lookups: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long)]
        json: bool,
    },
}

fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("{s:?} is not a size (try 2GiB)"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "kb" => 1e3,
        "m" | "mib" => 1024.0 * 1024.0,
        "mb" => 1e6,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "gb" => 1e9,
        "t" | "tib" => 1024.0f64.powi(4),
        "tb" => 1e12,
        other => return Err(format!("unknown size unit {other:?} in {s:?}")),
    };
    let v = n * mult;
    if !v.is_finite() || !(0.0..=1e18).contains(&v) {
        return Err(format!("size {s:?} out of range"));
    }
    Ok(v as u64)
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| format!("cannot start runtime: {e}"))
}

/// Chunks, stripes and shards are 1-16 MiB buffers, allocated and freed per chunk. By
/// default glibc serves those with fresh mmaps, so every one is page-faulted in and
/// zeroed by the kernel (perf of a sequential write: 9 % of all CPU in clear_page);
/// kept in the heap, they are reused. The mount's peak RSS while copying 5 GiB stays
/// 277 MiB (it was 290 before), because what is live at once is bounded anyway (64 MiB of dirty
/// chunks, a few stripes in flight).
fn keep_big_buffers_in_the_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes the allocator's thresholds; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 20);
    }
}

fn main() -> ExitCode {
    keep_big_buffers_in_the_heap();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mutualstore-fs: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.cmd {
        Cmd::Init { data } => {
            std::fs::create_dir_all(&data).map_err(|e| format!("cannot create {}: {e}", data.display()))?;
            let path = data.join(secret::SECRET_FILE);
            if path.exists() || data.join(mutualstore::identity::IDENTITY_FILE).exists() {
                return Err(format!("{} already belongs to a ring", data.display()));
            }
            let s = RingSecret::generate();
            s.save(&path)?;
            println!("created ring {}; its secret is stored in {} (mode 600).", s.ring_id(), path.display());
            println!("Start the first peer:   mutualstore-fs peer --data {} --listen HOST:PORT --capacity SIZE", data.display());
            println!("Other peers and mounts: --secret-file <a 0600 copy of that file>, or MUTUALSTORE_SECRET set to:");
            println!("{}", s.to_text());
            Ok(())
        }
        Cmd::Peer { listen, advertise, data, capacity, join, maintenance_s, code, grace_s, upkeep_s, repair_rate, drain_on_exit, member } => {
            if !(0.05..=3600.0).contains(&maintenance_s) {
                return Err(format!("--maintenance-s {maintenance_s} outside 0.05..3600"));
            }
            if !(0.0..=86400.0 * 30.0).contains(&grace_s) {
                return Err(format!("--grace-s {grace_s} outside 0..2592000"));
            }
            if !(0.1..=86400.0).contains(&upkeep_s) {
                return Err(format!("--upkeep-s {upkeep_s} outside 0.1..86400"));
            }
            let cfg = PeerConfig {
                advertise: advertise.unwrap_or_else(|| listen.clone()),
                listen,
                data_dir: data,
                capacity_bytes: capacity,
                join,
                maintenance_interval: Duration::from_secs_f64(maintenance_s),
                fingers_per_round: 4,
                code,
                upkeep: UpkeepConfig {
                    interval: Duration::from_secs_f64(upkeep_s),
                    grace: Duration::from_secs_f64(grace_s),
                    rate_bytes_per_sec: repair_rate,
                    ..UpkeepConfig::default()
                },
                secret: member.secret()?,
                fault: None,
            };
            mutualstore::peer::runtime()?.block_on(async move {
                let p = peer::start(cfg).await?;
                println!("peer {} serving at {} (ring code {})", p.state.node.lock().peer_id.short(), p.addr, p.state.code);
                tokio::select! {
                    _ = peer::wait_for_signal() => {
                        if drain_on_exit {
                            log::info!("draining: moving shards to other peers before leaving");
                            let r = p.drain_and_stop().await;
                            if r.left > 0 {
                                return Err(format!("drained {} shards but {} could not be moved", r.moved, r.left));
                            }
                        } else {
                            log::info!("leaving the ring");
                            p.leave_and_stop().await;
                        }
                    }
                    _ = p.drained() => {
                        log::info!("drained and left the ring");
                        p.stop_abruptly().await;
                    }
                }
                Ok(())
            })
        }
        Cmd::Mount { mountpoint, join, foreground, data, capacity, listen, advertise, reclaim_delay_s, log_file, key_file, member } => {
            if !(0.0..=86400.0).contains(&reclaim_delay_s) {
                return Err(format!("--reclaim-delay-s {reclaim_delay_s} outside 0..86400"));
            }
            let join_a = join_addr(&join)?;
            let ring_secret = member.secret()?;
            let key_path = match key_file.or_else(|| std::env::var_os(mutualstore::crypto::seal::KEY_FILE_ENV).map(PathBuf::from)) {
                Some(p) => p,
                None => PathBuf::from(std::env::var_os("HOME").ok_or("no --key-file given and no HOME to keep a default key in")?).join(".config/mutualstore/fs.key"),
            };
            // Created here, before detaching, so that the notice reaches the user.
            let (key, created) = mutualstore::crypto::seal::FileKey::load_or_create(&key_path)?;
            if created {
                eprintln!("created a new file key at {} (mode 600): keep a copy; without it these files cannot be read", key_path.display());
            }
            if !foreground {
                let log = log_file.unwrap_or_else(|| {
                    let name: String = mountpoint.to_string_lossy().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
                    PathBuf::from(format!("/tmp/mutualstore-mount-{name}.log"))
                });
                let mut args: Vec<String> = std::env::args().skip(1).collect();
                args.push("--foreground".into());
                return mutualstore::fs::mount::run_detached(&mountpoint, args, &log);
            }
            let peer = match (data, capacity) {
                (Some(data_dir), Some(capacity_bytes)) => {
                    let cfg = PeerConfig {
                        advertise: advertise.unwrap_or_else(|| listen.clone()),
                        listen,
                        data_dir,
                        capacity_bytes,
                        join: Some(join.clone()),
                        maintenance_interval: Duration::from_secs(1),
                        fingers_per_round: 4,
                        code: None,
                        upkeep: UpkeepConfig::default(),
                        secret: ring_secret.clone(),
                        fault: None,
                    };
                    cfg.validate()?;
                    Some(cfg)
                }
                _ => None,
            };
            mutualstore::fs::mount::run_foreground(mutualstore::fs::mount::MountConfig {
                mountpoint,
                join: join_a,
                peer,
                reclaim_delay: Duration::from_secs_f64(reclaim_delay_s),
                key,
                tls: ring_secret.map(|s| RingTls::new(&s).map(Arc::new)).transpose()?,
            })
        }
        Cmd::Leave { join, member } => runtime()?.block_on(async move {
            let addr = join_addr(&join)?;
            let net = member.net()?;
            net.hello(&addr, "").await.map_err(|e| format!("cannot reach {join}: {e}"))?;
            let r = net.drain(&addr, Duration::from_secs(3600)).await.map_err(|e| format!("drain of {join} failed: {e}"))?;
            if r.shards_left > 0 {
                return Err(format!("{join} moved {} shards but {} could not be moved; it has left the ring anyway", r.shards_moved, r.shards_left));
            }
            println!("{join} moved {} shards and left the ring", r.shards_moved);
            Ok(())
        }),
        Cmd::Status { join, json, member } => runtime()?.block_on(async move {
            let net = member.net()?;
            let addr = join_addr(&join)?;
            let st = mutualstore::status::collect(&net, &addr).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&st).map_err(|e| e.to_string())?);
            } else {
                println!("{}", mutualstore::status::table(&st));
            }
            Ok(())
        }),
        Cmd::Put { file, join, write_quorum, member } => runtime()?.block_on(async move {
            let mut client = FileClient::connect_writer(join_addr(&join)?, member.tls()?).await?;
            if let Some(q) = write_quorum {
                let code = client.code();
                if q < code.k as usize || q > code.total() as usize {
                    return Err(format!("--write-quorum {q}: must be between k = {} and k+m = {} for code {code}", code.k, code.total()));
                }
                client.stripes.write_quorum = q;
            }
            let len = std::fs::metadata(&file).map_err(|e| format!("{}: {e}", file.display()))?.len();
            let (bar, progress) = progress_bar(len, "put");
            let handle = client.put_file(&file, progress).await.map_err(|e| e.to_string());
            bar.finish_and_clear();
            println!("{}", handle?.to_hex());
            Ok(())
        }),
        Cmd::Get { handle, output, join, member } => runtime()?.block_on(async move {
            let h = Id::from_hex(handle.trim()).ok_or_else(|| format!("bad handle {handle:?}: want 40 hex digits"))?;
            let client = FileClient::connect(join_addr(&join)?, member.tls()?).await?;
            let manifest = client.manifest(h).await.map_err(|e| e.to_string())?;
            let (bar, progress) = progress_bar(manifest.0, "get");
            let n = client.get_manifest(manifest, &output, progress).await.map_err(|e| e.to_string());
            bar.finish_and_clear();
            eprintln!("wrote {} bytes to {}", n?, output.display());
            Ok(())
        }),
        Cmd::BenchCodec { code, shard, rounds } => {
            if !(64..=(16 << 20)).contains(&shard) || shard % 64 != 0 {
                return Err(format!("--shard {shard}: want a multiple of 64 bytes up to 16 MiB"));
            }
            if !(1..=100_000).contains(&rounds) {
                return Err(format!("--rounds {rounds} outside 1..100000"));
            }
            let r = mutualstore::erasure::bench::run(code, shard as usize, rounds)?;
            println!("{}", serde_json::to_string_pretty(&r).map_err(|e| e.to_string())?);
            Ok(())
        }
        Cmd::Sim { peers, fail, lookups, seed, json } => {
            if !(1..=1_000_000).contains(&peers) {
                return Err(format!("--peers {peers} outside 1..1000000"));
            }
            if !(0.0..1.0).contains(&fail) {
                return Err(format!("--fail {fail} must be in [0, 1)"));
            }
            let cfg = SimConfig { peers, fail_fraction: fail, lookups, seed, ..SimConfig::default() };
            let report = run_sim(&cfg, |m| log::info!("{m}"));
            if json {
                println!("{}", serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?);
            } else {
                println!("{report:#?}");
            }
            Ok(())
        }
    }
}

fn join_addr(s: &str) -> Result<NetAddr, String> {
    mutualstore::rpc::convert::addr_from(s).map_err(|st| format!("--join {s:?}: {}", st.message()))
}

/// A progress bar on stderr when it is a terminal (hidden otherwise, so scripts and
/// logs stay clean).
fn progress_bar(len: u64, verb: &str) -> (indicatif::ProgressBar, Option<Progress>) {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return (indicatif::ProgressBar::hidden(), None);
    }
    let bar = indicatif::ProgressBar::new(len);
    let style = indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> ");
    bar.set_style(style);
    bar.set_message(verb.to_string());
    let b = bar.clone();
    (bar, Some(std::sync::Arc::new(move |n| b.set_position(n))))
}
