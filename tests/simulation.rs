//! The consensus core under a deterministic simulation: many seeds of message loss, duplication,
//! reordering, partitions and crashes; safety online, linearizability offline, liveness after
//! healing. `SHOAL_SEEDS=N` runs N seeds per cluster size, `SHOAL_SEED=S` replays one with a
//! trace. A failure prints its seed.

use std::time::Instant;

use shoal::sim::{run, Check, SimConfig};

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Run `seeds` seeds (from `first`) on both cores; the first failure, replayed with a trace.
/// What a sweep did: commits, crashes that lost a disk, failed writes.
type Totals = (u64, u64, u64);

fn sweep(cfg: &SimConfig, first: u64, seeds: u64) -> Result<Totals, String> {
    let threads = 2u64;
    let results: Vec<Result<Totals, u64>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let mut totals = (0, 0, 0);
                    let mut seed = first + t;
                    while seed < first + seeds {
                        match run(seed, cfg) {
                            Ok(r) => {
                                totals.0 += r.commits;
                                totals.1 += r.disk_losses;
                                totals.2 += r.failed_writes;
                            }
                            Err(_) => return Err(seed),
                        }
                        seed += threads;
                    }
                    Ok(totals)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut totals = (0, 0, 0);
    let mut failed: Option<u64> = None;
    for r in results {
        match r {
            Ok(c) => {
                totals.0 += c.0;
                totals.1 += c.1;
                totals.2 += c.2;
            }
            Err(seed) => failed = Some(failed.map_or(seed, |f| f.min(seed))),
        }
    }
    match failed {
        None => Ok(totals),
        Some(seed) => {
            let mut traced = cfg.clone();
            traced.trace = true;
            let e = run(seed, &traced).expect_err("a failing seed fails again on replay");
            Err(e.to_string())
        }
    }
}

/// Where this run's fresh seeds start: `SHOAL_SEED_BASE`, else the clock (printed, so a
/// failure found there replays with `SHOAL_SEED`). Every run also sweeps the fixed range from 0.
fn fresh_base() -> u64 {
    env_u64("SHOAL_SEED_BASE").unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        // Far from the fixed range, and small enough to type.
        1_000_000 + t % 1_000_000_000
    })
}

/// Sweep the fixed range 0..seeds/2 and a fresh one of the same size; print both.
fn sweep_both(label: &str, cfg: &SimConfig, seeds: u64, base: u64) {
    let half = (seeds / 2).max(1);
    for first in [0, base] {
        let start = Instant::now();
        match sweep(cfg, first, half) {
            Ok((commits, lost, failed)) => println!(
                "{label}: seeds {first}..{} passed ({commits} commits, {lost} disks lost, {failed} failed writes) in {:.1?}",
                first + half,
                start.elapsed()
            ),
            Err(e) => panic!("{label}: {e}"),
        }
    }
}

#[test]
fn safety_and_liveness_over_many_seeds() {
    if let Some(seed) = env_u64("SHOAL_SEED") {
        for nodes in [1, 2, 3, 4, 5] {
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
    let base = fresh_base();
    println!("fresh seeds from {base} (SHOAL_SEED_BASE={base} repeats this run)");
    // 1 and 2: a voter alone, and a pair where the other voter is the whole catch-up quorum
    // (no crash there can keep a majority, so they run loss, delay and partitions only).
    // 4: an even number of voters, where a catch-up's read quorum (2 of the other 3) is not a
    // majority of all on its own.
    for nodes in [1, 2, 3, 4, 5] {
        let n = if nodes < 3 { seeds / 4 } else { seeds };
        sweep_both(&format!("{nodes} nodes"), &SimConfig::new(nodes), n, base);
    }
}

/// Membership changes (voters added and removed among the voters and two spare hosts, in any
/// order, down to one voter, and autopilot's steps as the lowest live voter would take them)
/// interleaved with pool changes, loss, partitions, crashes, disk
/// losses and failed writes: the same safety, linearizability and liveness checks.
/// `SHOAL_MEMBERSHIP_SEEDS=N` for more seeds, `SHOAL_SEED=S` replays one.
#[test]
fn membership_changes_keep_agreement_over_many_seeds() {
    if let Some(seed) = env_u64("SHOAL_SEED") {
        for nodes in [3, 5] {
            let mut cfg = SimConfig::membership(nodes, 2);
            cfg.trace = true;
            match run(seed, &cfg) {
                Ok(r) => println!("membership seed {seed}, {nodes} voters: ok {r:?}"),
                Err(e) => panic!("{e}"),
            }
        }
        return;
    }
    let seeds = env_u64("SHOAL_MEMBERSHIP_SEEDS").unwrap_or(4_000);
    let base = fresh_base();
    println!("fresh seeds from {base} (SHOAL_SEED_BASE={base} repeats this run)");
    for nodes in [3, 5] {
        let cfg = SimConfig::membership(nodes, 2);
        sweep_both(
            &format!("membership, {nodes} voters + 2 spares"),
            &cfg,
            seeds,
            base,
        );
        // The runs change the voters for real: count it on a sample.
        let (mut changes, mut top, mut autopilot) = (0, 0, 0);
        for seed in 0..200 {
            let r = run(seed, &cfg).expect("passed above");
            changes += r.membership_changes;
            top = top.max(r.max_epoch);
            autopilot += r.autopilot_steps;
        }
        println!("  200 of them: {changes} committed changes of the voters, epochs up to {top}; {autopilot} autopilot steps proposed");
        assert!(
            autopilot >= 50,
            "autopilot must take part: {autopilot} steps"
        );
        assert!(
            changes >= 200,
            "too few membership changes to mean anything: {changes}"
        );
    }
}

/// Which checks may catch a planted bug: a kind and a phrase of its reason.
type CaughtBy = &'static [(Check, &'static str)];

/// The checkers have teeth: each planted bug is caught within a few hundred seeds, by the check
/// that its harm falls under (not by a side effect of the double that plays it, nor by a
/// liveness timeout, which a bug could trip without the checkers seeing it).
#[test]
fn planted_bugs_are_caught() {
    // (name, config, what must catch it: a check and a phrase of its reason).
    let lost_commit: CaughtBy = &[
        (Check::Safety, "two different pools committed"),
        (Check::Safety, "learned a pool as version"),
        (Check::Safety, "after version"),
        (Check::Linearizability, "not linearizable"),
    ];
    let mut cases: Vec<(&str, SimConfig, CaughtBy)> = Vec::new();
    let mut c = SimConfig::new(3);
    c.faults.reply_before_persist = true;
    cases.push(("acceptor replies before it persists", c, lost_commit));
    let mut c = SimConfig::new(3);
    c.faults.blank_disk_votes = true;
    cases.push(("a voter that lost its disk votes at once", c, lost_commit));
    let mut c = SimConfig::new(3);
    c.faults.hide_accepted_ballots = true;
    cases.push((
        "proposer cannot find the highest-accepted value",
        c,
        lost_commit,
    ));
    let mut c = SimConfig::membership(3, 2);
    c.faults.mix_epochs = true;
    cases.push((
        "proposer continues from values of earlier memberships",
        c,
        lost_commit,
    ));

    for (name, cfg, by) in cases {
        // A planted bug may also stall a run (a liveness failure): that is no catch, so the
        // search goes on to the first seed a safety or linearizability check fails.
        let mut stalls = 0;
        let caught = (0..2_000u64).find_map(|seed| match run(seed, &cfg) {
            Err(f) if f.check == Check::Liveness => {
                stalls += 1;
                None
            }
            other => other.err(),
        });
        match caught {
            Some(f)
                if by
                    .iter()
                    .any(|(c, why)| f.check == *c && f.reason.contains(why)) =>
            {
                println!(
                    "{name}: caught at seed {} by {:?} ({stalls} stalled runs before): {}",
                    f.seed,
                    f.check,
                    f.reason.lines().next().unwrap_or("")
                )
            }
            Some(f) => panic!("{name}: caught by the wrong check: {f}"),
            None => panic!("{name}: not caught in 2,000 seeds"),
        }
    }
}

/// Health rules under 5% probe and heartbeat loss: no healthy backend is ejected and no live
/// peer declared dead over many simulated hours; a dead backend is detected in time.
#[test]
fn health_no_false_ejections_under_loss_and_timely_detection() {
    use shoal::sim::health::{run as health_run, HealthSimConfig};
    let seeds = env_u64("SHOAL_HEALTH_SEEDS").unwrap_or(48);
    let cfg = HealthSimConfig::default(); // 3 peers, 3 backends, 1 s probes, fall 3, rise 2, 5% loss
    let (mut false_ej, mut false_dead, mut local_downs) = (0, 0, 0);
    for seed in 0..seeds {
        let r = health_run(seed, &cfg);
        false_ej += r.false_ejections;
        false_dead += r.false_peer_deaths;
        local_downs += r.false_local_downs;
    }
    println!(
        "{seeds} simulated hours at 5% loss: {false_ej} false ejections, {false_dead} false peer deaths, {local_downs} momentary local downs"
    );
    assert_eq!(false_ej, 0);
    assert_eq!(false_dead, 0);

    // A killed backend: out of every peer's routing within interval * fall + one interval, and
    // ejected by agreement right after.
    let mut worst_local = 0;
    let mut worst_ejected = 0;
    for seed in 0..50 {
        let cfg = HealthSimConfig {
            duration_ms: 60_000,
            kill: Some((1, 20_000)),
            ..HealthSimConfig::default()
        };
        let r = health_run(seed, &cfg);
        let local = r.detect_local_ms.expect("every peer saw it down");
        let ejected = r.detect_ejected_ms.expect("the cluster ejected it");
        worst_local = worst_local.max(local);
        worst_ejected = worst_ejected.max(ejected);
    }
    println!("dead backend, 1 s probes, fall 3, 5% loss: worst kill->down on every peer {worst_local} ms, worst kill->ejected {worst_ejected} ms");
    assert!(worst_local <= 1_000 * 3 + 1_000 + 300, "{worst_local}");
    assert!(worst_ejected <= worst_local + 100);
}

/// Learners come and go (eight autoscaled learners beside three voters, each up for 5-120 s at a
/// time) and see every backend down, voting it down each time: no healthy backend is ever
/// ejected, and a dead one is still ejected by the voters. If every peer's vote counted, the
/// same runs would eject healthy backends (the check can fail).
#[test]
fn health_learners_coming_and_going_never_eject() {
    use shoal::sim::health::{run as health_run, HealthSimConfig};
    let seeds = env_u64("SHOAL_HEALTH_SEEDS").unwrap_or(24);
    let cfg = HealthSimConfig {
        learners: 8,
        ..HealthSimConfig::default()
    };
    let false_ej: u64 = (0..seeds)
        .map(|s| health_run(s, &cfg).false_ejections)
        .sum();
    println!("{seeds} simulated hours, 3 voters and 8 learners that see every backend down: {false_ej} false ejections");
    assert_eq!(false_ej, 0);
    let counted = HealthSimConfig {
        learner_votes_count: true,
        duration_ms: 600_000,
        ..cfg.clone()
    };
    let planted: u64 = (0..4)
        .map(|s| health_run(s, &counted).false_ejections)
        .sum();
    println!("  if learners' votes counted: {planted} false ejections in 4 x 10 simulated minutes");
    assert!(planted > 0, "the check must be able to fail");
    let worst = worst_ejection(&cfg);
    println!("  a dead backend with learners around: ejected at worst {worst} ms after it died");
}

/// Backend 1 killed 20 s into a minute, 20 seeds: the longest from its death to its ejection.
fn worst_ejection(cfg: &shoal::sim::health::HealthSimConfig) -> u64 {
    (0..20)
        .map(|seed| {
            let cfg = shoal::sim::health::HealthSimConfig {
                duration_ms: 60_000,
                kill: Some((1, 20_000)),
                crashes: false,
                ..cfg.clone()
            };
            let r = shoal::sim::health::run(seed, &cfg);
            r.detect_ejected_ms
                .unwrap_or_else(|| panic!("seed {seed}: the dead backend was never ejected"))
        })
        .max()
        .unwrap_or(0)
}

/// Agreed discovery under flapping, failing and disagreeing DNS answers: the pool holds exactly
/// the addresses in DNS at every step after it formed, and a removed address leaves within
/// remove_after plus a few intervals. 3 and 5 peers, 200 seeds each (10 simulated minutes).
#[test]
fn discovery_never_flaps_the_pool() {
    use shoal::sim::discovery::{run, DiscoverySimConfig};
    let seeds: u64 = std::env::var("SHOAL_DISCOVERY_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    for peers in [3, 5] {
        let cfg = DiscoverySimConfig {
            peers,
            ..Default::default()
        };
        let mut versions = 0;
        let mut worst_removal = 0;
        for seed in 0..seeds {
            let r = run(seed, &cfg);
            assert_eq!(
                r.wrong_steps, 0,
                "seed {seed}, {peers} peers: the pool was wrong at {:?}",
                r.first_wrong
            );
            let removal = r
                .removal_ms
                .unwrap_or_else(|| panic!("seed {seed}: never removed"));
            assert!(
                removal <= cfg.remove_after_ms + 3 * cfg.interval_ms,
                "seed {seed}: removal took {removal} ms"
            );
            worst_removal = worst_removal.max(removal);
            versions += r.versions;
        }
        println!(
            "discovery, {peers} peers, {seeds} seeds: no step with a wrong pool; {:.1} versions per run; removal at most {worst_removal} ms after DNS (remove_after {} ms)",
            versions as f64 / seeds as f64,
            cfg.remove_after_ms
        );
    }
}

/// Split probing (`health.probers = 3`, SPEC 2.2) over 48 simulated hours per seed, five voters
/// that crash and come back (never leaving less than a majority running) under 2% probe and
/// heartbeat loss: once the peers' views settle after each crash or restart, every backend is
/// probed by exactly min(3, live voters) peers, and no healthy backend is ever ejected. A
/// planted bug (a prober that keeps probing once replaced) is caught. Prints the probes per
/// backend per second.
///
/// (At 5% loss, fall 3 and 1 s probes, a healthy backend looks down to one prober about every
/// 4 hours; two of its three probers at once, about once in 400 backend-hours: a chance false
/// ejection that three voters without `probers` share; `health_no_false_ejections...` runs that
/// rate for an hour at a time.)
#[test]
fn health_split_probing_keeps_k_probers_through_crashes() {
    use shoal::sim::health::{run as health_run, HealthSimConfig};
    let seeds = env_u64("SHOAL_PROBER_SEEDS").unwrap_or(3);
    let cfg = HealthSimConfig {
        peers: 5,
        backends: 4,
        probers: 3,
        crashes: true,
        loss: 0.02,
        duration_ms: 48 * 3_600_000,
        ..HealthSimConfig::default()
    };
    let (mut violations, mut checks, mut crashes, mut false_ej, mut probes) = (0, 0, 0, 0, 0);
    let mut worst_replacement = 0;
    for seed in 0..seeds {
        let r = health_run(seed, &cfg);
        if r.prober_violations > 0 || r.false_ejections > 0 {
            panic!("seed {seed}: {r:?}");
        }
        violations += r.prober_violations;
        checks += r.prober_checks;
        crashes += r.crashes;
        false_ej += r.false_ejections;
        probes += r.probes;
        worst_replacement = worst_replacement.max(r.worst_replacement_ms);
    }
    let secs = (seeds * 48 * 3_600) as f64;
    println!(
        "{seeds} x 48 simulated hours, 5 voters, probers = 3, {crashes} crashes: {checks} settled checks, {violations} with other than 3 probers, {false_ej} false ejections; {:.2} probes per backend per second",
        probes as f64 / secs / 4.0
    );
    assert!(crashes > 10 * seeds && checks > 0);
    // A crashed prober's place is taken within dead_after (5 s) and one probe interval (1 s,
    // +10% jitter), counted from its last heartbeat (up to one heartbeat, 250 ms, before it).
    println!("  a crashed prober replaced at worst {worst_replacement} ms after it crashed");
    assert!(
        worst_replacement > 0 && worst_replacement <= 5_000 + 1_100 + 250,
        "{worst_replacement} ms"
    );
    assert_eq!((violations, false_ej), (0, 0));

    let planted = HealthSimConfig {
        probers_never_stop: true,
        duration_ms: 12 * 3_600_000,
        ..cfg.clone()
    };
    let caught: u64 = (0..2)
        .map(|s| health_run(s, &planted).prober_violations)
        .sum();
    assert!(caught > 0, "a prober that never stops must be caught");

    // A dead backend is still ejected by its probers, in time.
    let worst = worst_ejection(&cfg);
    println!("  a dead backend: ejected by its probers at worst {worst} ms after it died");
    assert!(worst <= 1_000 * 3 + 1_000 + 400, "{worst} ms");
}
