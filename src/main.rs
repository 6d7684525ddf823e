fn main() {
    let peers: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(1000);
    let cfg = mutualstore::sim::run::SimConfig { peers, fail_fraction: 0.5, lookups: 10000, ..Default::default() };
    let r = mutualstore::sim::run::run(&cfg, |m| eprintln!("{m}"));
    println!("{}", serde_json::to_string_pretty(&r).unwrap());
}
