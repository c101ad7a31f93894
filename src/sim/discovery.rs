//! A deterministic simulation of agreed discovery: every peer resolves every `interval` and gets
//! an answer that flaps (each true address missing with some probability), sometimes fails (the
//! resolver down), and one peer's resolver answers differently (an extra address, one missing).
//! Votes commit after a delay in the order they were proposed. The property: once the pool has
//! formed, it holds exactly the true addresses at every step (no flapping, no stray address),
//! and when an address really leaves DNS it leaves the pool within `remove_after` plus a few
//! intervals.
//!
//! As in the health simulation, consensus is an atomic change after a commit delay: the Paxos
//! simulation checks the protocol; this one checks the discovery rules.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::core::discovery::Tracker;
use crate::core::pool::{NodeId, Pool, PoolChange, Rules};

#[derive(Clone, Debug)]
pub struct DiscoverySimConfig {
    pub peers: usize,
    pub addresses: usize,
    pub interval_ms: u64,
    pub remove_after_ms: u64,
    /// Probability that an answer lacks a given true address.
    pub flap: f64,
    /// Probability that a resolution fails.
    pub fail: f64,
    pub commit_ms: u64,
    pub duration_ms: u64,
    /// The last address leaves DNS at this time.
    pub remove_at_ms: u64,
}

impl Default for DiscoverySimConfig {
    fn default() -> Self {
        Self {
            peers: 3,
            addresses: 4,
            interval_ms: 1000,
            remove_after_ms: 10_000,
            flap: 0.25,
            fail: 0.05,
            commit_ms: 20,
            duration_ms: 600_000,
            remove_at_ms: 400_000,
        }
    }
}

#[derive(Debug, Default)]
pub struct DiscoveryReport {
    /// Steps after formation where the pool did not hold exactly the addresses in DNS.
    pub wrong_steps: u64,
    pub first_wrong: Option<(u64, Vec<String>)>,
    /// Pool versions committed in all.
    pub versions: u64,
    /// Time from the removal from DNS to the removal from the pool.
    pub removal_ms: Option<u64>,
}

/// One peer's DNS answer: none when the lookup fails, else what DNS holds less the addresses
/// that flap out of this answer. `odd` is the odd peer's resolver: the address it never answers
/// and the stray one it answers besides.
fn resolve(
    rng: &mut ChaCha8Rng,
    cfg: &DiscoverySimConfig,
    in_dns: &[String],
    odd: Option<(&str, &str)>,
) -> Option<Vec<String>> {
    if rng.gen_bool(cfg.fail) {
        return None;
    }
    let mut a: Vec<String> = in_dns
        .iter()
        .filter(|_| !rng.gen_bool(cfg.flap))
        .cloned()
        .collect();
    if let Some((never, stray)) = odd {
        a.retain(|x| x != never);
        a.push(stray.to_string());
    }
    Some(a)
}

pub fn run(seed: u64, cfg: &DiscoverySimConfig) -> DiscoveryReport {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let rules = Rules {
        cluster_size: cfg.peers,
        max_ejected_percent: 50,
        ..Rules::default()
    };
    let ids: Vec<NodeId> = (0..cfg.peers)
        .map(|i| NodeId::new(format!("p{i}")))
        .collect();
    let truth: Vec<String> = (0..cfg.addresses)
        .map(|i| format!("10.0.0.{}:80", i + 1))
        .collect();
    let stray = "10.9.9.9:80".to_string();
    let mut trackers: Vec<Tracker> = (0..cfg.peers)
        .map(|_| Tracker::new("web", 1, cfg.remove_after_ms, 2000))
        .collect();
    let mut pool = Pool::default()
        .apply(&PoolChange::seed(vec![]), &rules)
        .expect("seed");
    // Votes in flight: (commit time, change).
    let mut inflight: Vec<(u64, PoolChange)> = Vec::new();
    let mut report = DiscoveryReport::default();
    let mut formed_at: Option<u64> = None;
    let offsets: Vec<u64> = (0..cfg.peers)
        .map(|_| rng.gen_range(0..cfg.interval_ms / 10) * 10)
        .collect();
    let mut t = 0;
    while t < cfg.duration_ms {
        // Commit what is due, in order.
        inflight.sort_by_key(|(at, _)| *at);
        while inflight.first().is_some_and(|(at, _)| *at <= t) {
            let (_, change) = inflight.remove(0);
            if let Ok(next) = pool.apply(&change, &rules) {
                if next.version != pool.version {
                    report.versions += 1;
                }
                pool = next;
            }
        }
        let in_dns: Vec<String> = if t >= cfg.remove_at_ms {
            truth[..truth.len() - 1].to_vec()
        } else {
            truth.clone()
        };
        for p in 0..cfg.peers {
            if !(t + offsets[p]).is_multiple_of(cfg.interval_ms) {
                continue;
            }
            let odd = (p == cfg.peers - 1).then(|| (truth[0].as_str(), stray.as_str()));
            let answer = resolve(&mut rng, cfg, &in_dns, odd);
            trackers[p].answer(t, answer.as_deref());
            if let Some(c) = trackers[p].reconcile(&pool, &ids[p], t) {
                inflight.push((t + cfg.commit_ms + rng.gen_range(0..cfg.commit_ms), c));
            }
        }
        // The property, once formed (every true address in).
        let have: Vec<String> = pool.backends.values().map(|b| b.addr.clone()).collect();
        let mut want = in_dns.clone();
        want.sort();
        if formed_at.is_none() && have == want {
            formed_at = Some(t);
        }
        if let Some(_formed) = formed_at {
            let leaving = t >= cfg.remove_at_ms
                && t < cfg.remove_at_ms + cfg.remove_after_ms + 3 * cfg.interval_ms;
            let ok = if leaving {
                // The leaving address may still be in; nothing else may differ.
                let mut with_old = truth.clone();
                with_old.sort();
                have == want || have == with_old
            } else {
                have == want
            };
            if t >= cfg.remove_at_ms && report.removal_ms.is_none() && have == want {
                report.removal_ms = Some(t - cfg.remove_at_ms);
            }
            if !ok {
                report.wrong_steps += 1;
                report.first_wrong.get_or_insert((t, have));
            }
        }
        t += 10;
    }
    if formed_at.is_none() {
        report.wrong_steps += 1;
        report.first_wrong = Some((cfg.duration_ms, vec!["never formed".into()]));
    }
    report
}
