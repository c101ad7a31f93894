//! The consensus core under a deterministic simulation: many seeds of message loss, duplication,
//! reordering, partitions and crashes; safety online, linearizability offline, liveness after
//! healing. `SHOAL_SEEDS=N` runs N seeds per cluster size, `SHOAL_SEED=S` replays one with a
//! trace. A failure prints its seed.

use std::time::Instant;

use shoal::sim::{run, SimConfig};

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Run `seeds` seeds (from `first`) on both cores; the first failure, replayed with a trace.
fn sweep(cfg: &SimConfig, first: u64, seeds: u64) -> Result<u64, String> {
    let threads = 2u64;
    let results: Vec<Result<u64, u64>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let mut commits = 0;
                    let mut seed = first + t;
                    while seed < first + seeds {
                        match run(seed, cfg) {
                            Ok(r) => commits += r.commits,
                            Err(_) => return Err(seed),
                        }
                        seed += threads;
                    }
                    Ok(commits)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut commits = 0;
    let mut failed: Option<u64> = None;
    for r in results {
        match r {
            Ok(c) => commits += c,
            Err(seed) => failed = Some(failed.map_or(seed, |f| f.min(seed))),
        }
    }
    match failed {
        None => Ok(commits),
        Some(seed) => {
            let mut traced = cfg.clone();
            traced.trace = true;
            let e = run(seed, &traced).expect_err("a failing seed fails again on replay");
            Err(e.to_string())
        }
    }
}

#[test]
fn safety_and_liveness_over_many_seeds() {
    if let Some(seed) = env_u64("SHOAL_SEED") {
        for nodes in [3, 5] {
            let mut cfg = SimConfig::new(nodes);
            cfg.trace = true;
            match run(seed, &cfg) {
                Ok(r) => println!("seed {seed}, {nodes} nodes: ok {r:?}"),
                Err(e) => panic!("{e}"),
            }
        }
        return;
    }
    let seeds = env_u64("SHOAL_SEEDS").unwrap_or(10_000);
    for nodes in [3, 5] {
        let start = Instant::now();
        let cfg = SimConfig::new(nodes);
        match sweep(&cfg, 0, seeds) {
            Ok(commits) => println!(
                "{nodes} nodes: {seeds} seeds passed ({commits} commits) in {:.1?}",
                start.elapsed()
            ),
            Err(e) => panic!("{e}"),
        }
    }
}

/// The checkers have teeth: each planted bug is caught within a few hundred seeds.
#[test]
fn planted_bugs_are_caught() {
    let mut cases: Vec<(&str, SimConfig)> = Vec::new();
    let mut c = SimConfig::new(3);
    c.reply_before_persist = true;
    cases.push(("acceptor replies before it persists", c));
    let mut c = SimConfig::new(3);
    c.faults.accept_below_promise = true;
    cases.push(("acceptor accepts a ballot below its promise", c));
    let mut c = SimConfig::new(3);
    c.faults.skip_highest_accepted = true;
    cases.push(("proposer skips the highest-accepted value", c));
    for (name, cfg) in cases {
        let caught = (0..500u64).find_map(|seed| run(seed, &cfg).err());
        match caught {
            Some(f) => println!(
                "{name}: caught at seed {}: {}",
                f.seed,
                f.reason.lines().next().unwrap_or("")
            ),
            None => panic!("{name}: not caught in 500 seeds"),
        }
    }
}
