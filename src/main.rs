//! The `mutualstore-fs` command line: parses flags, validates them, and hands over to
//! the library. Every failure is one line on stderr and a non-zero exit.

use clap::{Parser, Subcommand};
use mutualstore::files::BlockClient;
use mutualstore::peer::{self, PeerConfig};
use mutualstore::ring::Id;
use mutualstore::rpc::NetAddr;
use mutualstore::sim::run::{run as run_sim, SimConfig};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "mutualstore-fs", version, about = "A peer-to-peer storage ring")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
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
    },
    /// Show the ring's peers and their load.
    Status {
        #[arg(long)]
        join: String,
        #[arg(long)]
        json: bool,
    },
    /// Store a file on the ring; prints its handle.
    Put {
        file: PathBuf,
        #[arg(long)]
        join: String,
    },
    /// Fetch a file by handle.
    Get {
        handle: String,
        #[arg(short, long)]
        output: PathBuf,
        #[arg(long)]
        join: String,
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

fn main() -> ExitCode {
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
        Cmd::Peer { listen, advertise, data, capacity, join, maintenance_s } => {
            if !(0.05..=3600.0).contains(&maintenance_s) {
                return Err(format!("--maintenance-s {maintenance_s} outside 0.05..3600"));
            }
            let cfg = PeerConfig {
                advertise: advertise.unwrap_or_else(|| listen.clone()),
                listen,
                data_dir: data,
                capacity_bytes: capacity,
                join,
                maintenance_interval: Duration::from_secs_f64(maintenance_s),
                fingers_per_round: 4,
            };
            runtime()?.block_on(async move {
                let p = peer::start(cfg).await?;
                println!("peer {} serving at {}", p.state.node.lock().peer_id.short(), p.addr);
                peer::wait_for_signal().await;
                log::info!("leaving the ring");
                p.leave_and_stop().await;
                Ok(())
            })
        }
        Cmd::Status { join, json } => runtime()?.block_on(async move {
            let net = mutualstore::rpc::client::GrpcNet::new();
            let addr = join_addr(&join)?;
            let st = mutualstore::status::collect(&net, &addr).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&st).map_err(|e| e.to_string())?);
            } else {
                println!("{}", mutualstore::status::table(&st));
            }
            Ok(())
        }),
        Cmd::Put { file, join } => runtime()?.block_on(async move {
            let client = BlockClient::new(vec![join_addr(&join)?]);
            check_reachable(&client, &join).await?;
            let handle = client.put_file(&file).await.map_err(|e| e.to_string())?;
            println!("{}", handle.to_hex());
            Ok(())
        }),
        Cmd::Get { handle, output, join } => runtime()?.block_on(async move {
            let h = Id::from_hex(handle.trim()).ok_or_else(|| format!("bad handle {handle:?}: want 40 hex digits"))?;
            let client = BlockClient::new(vec![join_addr(&join)?]);
            check_reachable(&client, &join).await?;
            let n = client.get_file(h, &output).await.map_err(|e| e.to_string())?;
            eprintln!("wrote {n} bytes to {}", output.display());
            Ok(())
        }),
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

async fn check_reachable(client: &BlockClient, join: &str) -> Result<(), String> {
    client.net.hello(&NetAddr::from(join), "").await.map(|_| ()).map_err(|e| format!("cannot reach {join}: {e}"))
}
