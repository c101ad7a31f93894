//! A deterministic simulation of health checking across peers: every peer probes every backend
//! through a lossy network, feeds its local view (`LocalHealth`), votes, and the agreed pool
//! ejects by majority under the cap; peers exchange heartbeats through the same network and
//! expire the votes of peers their detector declares dead.
//!
//! Consensus is modelled as an atomic change applied after a commit delay: the protocol itself
//! is checked by the Paxos simulation; this one checks the health rules (no false ejection under
//! loss, detection time when a backend really dies).

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::core::detector::{Detector, DetectorConfig, PeerState};
use crate::core::health::{Local, LocalHealth, Source, Thresholds};
use crate::core::pool::{Backend, BackendId, BackendState, NodeId, Pool, PoolChange, Rules};

#[derive(Clone, Debug)]
pub struct HealthSimConfig {
    pub peers: usize,
    pub backends: usize,
    pub probe_interval_ms: u64,
    pub heartbeat_ms: u64,
    /// Probability that a probe (or heartbeat) is lost or times out on a healthy path.
    pub loss: f64,
    pub thresholds: Thresholds,
    pub phi_threshold: f64,
    pub dead_after_ms: u64,
    /// Time for a vote to commit.
    pub commit_ms: u64,
    pub duration_ms: u64,
    /// Kill this backend at this time (for detection-time runs).
    pub kill: Option<(usize, u64)>,
}

impl Default for HealthSimConfig {
    fn default() -> Self {
        Self {
            peers: 3,
            backends: 3,
            probe_interval_ms: 1_000,
            heartbeat_ms: 250,
            loss: 0.05,
            thresholds: Thresholds {
                rise: 2,
                fall: 3,
                passive_failures: 0,
            },
            phi_threshold: 8.0,
            dead_after_ms: 5_000,
            commit_ms: 5,
            duration_ms: 3_600_000,
            kill: None,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct HealthReport {
    /// Times a healthy backend became `ejected` in the agreed pool.
    pub false_ejections: u64,
    /// Times a peer's local view of a healthy backend went down.
    pub false_local_downs: u64,
    /// Times a live peer was declared dead by another.
    pub false_peer_deaths: u64,
    /// Kill to local down on every peer, and kill to agreed ejection (ms), for `kill` runs.
    pub detect_local_ms: Option<u64>,
    pub detect_ejected_ms: Option<u64>,
}

enum Ev {
    Probe { peer: usize, backend: usize },
    Beat { from: usize },
    Commit { change: PoolChange },
    Check,
}

pub fn run(seed: u64, cfg: &HealthSimConfig) -> HealthReport {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let ids: Vec<NodeId> = (0..cfg.peers)
        .map(|i| NodeId::new(format!("p{i}")))
        .collect();
    let rules = Rules {
        cluster_size: cfg.peers,
        max_ejected_percent: 50,
    };
    let backends: Vec<Backend> = (0..cfg.backends)
        .map(|i| Backend::new(format!("b{i}"), format!("10.0.0.{i}:80"), 1))
        .collect();
    let mut pool = Pool::default()
        .apply(&PoolChange::seed(backends), &rules)
        .unwrap_or_default();
    let mut local: Vec<Vec<LocalHealth>> =
        vec![vec![LocalHealth::default(); cfg.backends]; cfg.peers];
    let dcfg = DetectorConfig {
        interval_ms: cfg.heartbeat_ms,
        phi_threshold: cfg.phi_threshold,
        dead_after_ms: cfg.dead_after_ms,
    };
    // detectors[i][j]: peer i's view of peer j.
    let mut detectors: Vec<Vec<Detector>> = (0..cfg.peers)
        .map(|_| (0..cfg.peers).map(|_| Detector::new(dcfg, 0)).collect())
        .collect();
    let mut peer_state = vec![vec![PeerState::Alive; cfg.peers]; cfg.peers];
    let mut queue: BinaryHeap<Reverse<(u64, u64, usize)>> = BinaryHeap::new();
    let mut events: Vec<Option<Ev>> = Vec::new();
    let mut seq = 0u64;
    let mut push = |queue: &mut BinaryHeap<Reverse<(u64, u64, usize)>>,
                    events: &mut Vec<Option<Ev>>,
                    at: u64,
                    e: Ev| {
        seq += 1;
        events.push(Some(e));
        queue.push(Reverse((at, seq, events.len() - 1)));
    };
    for p in 0..cfg.peers {
        for b in 0..cfg.backends {
            let at = rng.gen_range(0..cfg.probe_interval_ms);
            push(
                &mut queue,
                &mut events,
                at,
                Ev::Probe {
                    peer: p,
                    backend: b,
                },
            );
        }
        let at = rng.gen_range(0..cfg.heartbeat_ms);
        push(&mut queue, &mut events, at, Ev::Beat { from: p });
    }
    push(&mut queue, &mut events, 1_000, Ev::Check);
    let mut report = HealthReport::default();
    let dead_backend = cfg.kill.map(|(b, _)| b);
    let kill_at = cfg.kill.map(|(_, t)| t).unwrap_or(u64::MAX);
    let mut down_on: Vec<bool> = vec![false; cfg.peers];
    while let Some(Reverse((now, _, idx))) = queue.pop() {
        if now > cfg.duration_ms {
            break;
        }
        let Some(ev) = events[idx].take() else {
            continue;
        };
        match ev {
            Ev::Probe { peer, backend } => {
                let dead = dead_backend == Some(backend) && now >= kill_at;
                let ok = !dead && !rng.gen_bool(cfg.loss);
                if let Some(flip) = local[peer][backend].record(Source::Probe, ok, &cfg.thresholds)
                {
                    if flip == Local::Down && !dead {
                        report.false_local_downs += 1;
                    }
                    if dead && flip == Local::Down {
                        down_on[peer] = true;
                        if down_on.iter().all(|d| *d) && report.detect_local_ms.is_none() {
                            report.detect_local_ms = Some(now - kill_at);
                        }
                    }
                    let id = BackendId::new(format!("b{backend}"));
                    let change = match flip {
                        Local::Down => PoolChange::VoteDown {
                            id,
                            peer: ids[peer].clone(),
                        },
                        Local::Up => PoolChange::VoteUp {
                            id,
                            peer: ids[peer].clone(),
                        },
                    };
                    push(
                        &mut queue,
                        &mut events,
                        now + cfg.commit_ms,
                        Ev::Commit { change },
                    );
                }
                let jitter = rng.gen_range(0.9..=1.1);
                let next = now + (cfg.probe_interval_ms as f64 * jitter) as u64;
                push(&mut queue, &mut events, next, Ev::Probe { peer, backend });
            }
            Ev::Beat { from } => {
                for (to, row) in detectors.iter_mut().enumerate() {
                    if to != from && !rng.gen_bool(cfg.loss) {
                        row[from].heartbeat(now + rng.gen_range(0..5));
                    }
                }
                push(
                    &mut queue,
                    &mut events,
                    now + cfg.heartbeat_ms,
                    Ev::Beat { from },
                );
            }
            Ev::Commit { change } => {
                let before = pool.clone();
                if let Ok(next) = pool.apply(&change, &rules) {
                    pool = next;
                }
                for b in pool.backends.values() {
                    let was = before.backends.get(&b.id).map(|x| x.state);
                    if b.state == BackendState::Ejected && was != Some(BackendState::Ejected) {
                        let is_dead = dead_backend
                            .is_some_and(|d| b.id.as_str() == format!("b{d}"))
                            && now >= kill_at;
                        if is_dead {
                            report.detect_ejected_ms.get_or_insert(now - kill_at);
                        } else {
                            report.false_ejections += 1;
                        }
                    }
                }
            }
            Ev::Check => {
                for i in 0..cfg.peers {
                    for j in 0..cfg.peers {
                        if i == j {
                            continue;
                        }
                        let s = detectors[i][j].state(now);
                        if s == PeerState::Dead && peer_state[i][j] != PeerState::Dead {
                            report.false_peer_deaths += 1;
                            // Peer i expires j's votes.
                            push(
                                &mut queue,
                                &mut events,
                                now + cfg.commit_ms,
                                Ev::Commit {
                                    change: PoolChange::ExpireVotes {
                                        peer: ids[j].clone(),
                                    },
                                },
                            );
                        }
                        peer_state[i][j] = s;
                    }
                }
                push(&mut queue, &mut events, now + cfg.heartbeat_ms, Ev::Check);
            }
        }
    }
    report
}
