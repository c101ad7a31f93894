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
use crate::core::health::{is_prober, Local, LocalHealth, Source, Thresholds};
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
    /// Learners that come and go (autoscaled proxies): each is up for a while, then gone, then
    /// back. They cannot reach any backend (every probe fails), and cast votes as a voter would:
    /// the agreed pool (which names the voters) must not count them.
    pub learners: usize,
    /// Planted: the pool names no voters, so every peer's vote counts (learners' too).
    pub learner_votes_count: bool,
    /// `health.probers`: each backend is probed by this many live voters (0: by every peer).
    pub probers: usize,
    /// Voters crash (for 1 to 10 minutes, every 10 to 60 minutes each), never more at once
    /// than leaves a majority running.
    pub crashes: bool,
    /// Planted: a prober keeps probing (and voting) after it is no longer assigned.
    pub probers_never_stop: bool,
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
            learners: 0,
            learner_votes_count: false,
            probers: 0,
            crashes: false,
            probers_never_stop: false,
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
    /// Probes sent, by every peer.
    pub probes: u64,
    /// Checks (every heartbeat, once the peers' views have settled after a crash or restart)
    /// at which some backend was probed by other than min(probers, live voters) peers.
    pub prober_violations: u64,
    /// Checks made of that.
    pub prober_checks: u64,
    /// Voter crashes.
    pub crashes: u64,
}

enum Ev {
    Probe {
        peer: usize,
        backend: usize,
    },
    /// A learner starts or stops.
    Toggle {
        learner: usize,
    },
    /// A learner's probe, in one of its lives.
    LearnerProbe {
        learner: usize,
        backend: usize,
        life: u64,
    },
    Beat {
        from: usize,
    },
    /// A voter crashes, or starts again.
    Crash {
        peer: usize,
    },
    Restart {
        peer: usize,
    },
    Commit {
        change: PoolChange,
    },
    Check,
}

/// The events in the queue, in slots reused once taken (a 48-hour run makes millions).
#[derive(Default)]
struct Slots {
    items: Vec<Option<Ev>>,
    free: Vec<usize>,
}

impl Slots {
    fn put(&mut self, e: Ev) -> usize {
        match self.free.pop() {
            Some(i) => {
                self.items[i] = Some(e);
                i
            }
            None => {
                self.items.push(Some(e));
                self.items.len() - 1
            }
        }
    }

    fn take(&mut self, i: usize) -> Option<Ev> {
        let e = self.items[i].take()?;
        self.free.push(i);
        Some(e)
    }
}

/// The vote a peer proposes when its local view of backend `b{backend}` flips.
fn vote(flip: Local, backend: usize, peer: &NodeId) -> PoolChange {
    let id = BackendId::new(format!("b{backend}"));
    let peer = peer.clone();
    match flip {
        Local::Down => PoolChange::VoteDown { id, peer },
        Local::Up => PoolChange::VoteUp { id, peer },
    }
}

pub fn run(seed: u64, cfg: &HealthSimConfig) -> HealthReport {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let ids: Vec<NodeId> = (0..cfg.peers)
        .map(|i| NodeId::new(format!("p{i}")))
        .chain((0..cfg.learners).map(|i| NodeId::new(format!("l{i}"))))
        .collect();
    let total = cfg.peers + cfg.learners;
    // Learners' lives: up or gone.
    let mut learner_up = vec![false; cfg.learners];
    let rules = Rules {
        cluster_size: cfg.peers,
        max_ejected_percent: 50,
        probers: cfg.probers,
        ..Rules::default()
    };
    let backends: Vec<Backend> = (0..cfg.backends)
        .map(|i| Backend::new(format!("b{i}"), format!("10.0.0.{i}:80"), 1))
        .collect();
    // With learners or probers, the pool names its voters (as a formed cluster's does).
    let seed = if (cfg.learners > 0 || cfg.probers > 0) && !cfg.learner_votes_count {
        PoolChange::Seed {
            backends,
            cluster_id: "sim".into(),
            voters: ids[..cfg.peers].iter().cloned().collect(),
            services: Vec::new(),
        }
    } else {
        PoolChange::seed(backends)
    };
    let mut pool = Pool::default().apply(&seed, &rules).unwrap_or_default();
    let mut local: Vec<Vec<LocalHealth>> = vec![vec![LocalHealth::default(); cfg.backends]; total];
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
    let mut events = Slots::default();
    let mut seq = 0u64;
    let mut push =
        |queue: &mut BinaryHeap<Reverse<(u64, u64, usize)>>, events: &mut Slots, at: u64, e: Ev| {
            seq += 1;
            let slot = events.put(e);
            queue.push(Reverse((at, seq, slot)));
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
    for l in 0..cfg.learners {
        let at = rng.gen_range(0..30_000);
        push(&mut queue, &mut events, at, Ev::Toggle { learner: l });
    }
    push(&mut queue, &mut events, 1_000, Ev::Check);
    if cfg.crashes {
        for p in 0..cfg.peers {
            let at = rng.gen_range(600_000..3_600_000);
            push(&mut queue, &mut events, at, Ev::Crash { peer: p });
        }
    }
    let mut alive = vec![true; cfg.peers];
    // Whether each peer probed each backend at its last turn.
    let mut probing = vec![vec![true; cfg.backends]; cfg.peers];
    // The last crash or restart: views settle within dead_after and a few heartbeats.
    let mut last_turn = 0u64;
    let settle_ms = cfg.dead_after_ms + 20 * cfg.heartbeat_ms + 2 * cfg.probe_interval_ms;
    let mut report = HealthReport::default();
    let dead_backend = cfg.kill.map(|(b, _)| b);
    let kill_at = cfg.kill.map(|(_, t)| t).unwrap_or(u64::MAX);
    let mut down_on: Vec<bool> = vec![false; cfg.peers];
    // Probes of learners in the queue that belong to an earlier life.
    let mut life = vec![0u64; cfg.learners];
    while let Some(Reverse((now, _, idx))) = queue.pop() {
        if now > cfg.duration_ms {
            break;
        }
        let Some(ev) = events.take(idx) else {
            continue;
        };
        match ev {
            Ev::Toggle { learner } => {
                learner_up[learner] = !learner_up[learner];
                life[learner] += 1;
                if learner_up[learner] {
                    // A new process: fresh local views, probing from now on.
                    let peer = cfg.peers + learner;
                    local[peer] = vec![LocalHealth::default(); cfg.backends];
                    for b in 0..cfg.backends {
                        let at = now + rng.gen_range(0..cfg.probe_interval_ms);
                        push(
                            &mut queue,
                            &mut events,
                            at,
                            Ev::LearnerProbe {
                                learner,
                                backend: b,
                                life: life[learner],
                            },
                        );
                    }
                }
                let at = now + rng.gen_range(5_000..120_000);
                push(&mut queue, &mut events, at, Ev::Toggle { learner });
            }
            Ev::LearnerProbe {
                learner,
                backend,
                life: l,
            } => {
                if !learner_up[learner] || life[learner] != l {
                    continue;
                }
                let peer = cfg.peers + learner;
                // It reaches no backend.
                if let Some(flip) =
                    local[peer][backend].record(Source::Probe, false, &cfg.thresholds)
                {
                    let change = vote(flip, backend, &ids[peer]);
                    push(
                        &mut queue,
                        &mut events,
                        now + cfg.commit_ms,
                        Ev::Commit { change },
                    );
                }
                push(
                    &mut queue,
                    &mut events,
                    now + cfg.probe_interval_ms,
                    Ev::LearnerProbe {
                        learner,
                        backend,
                        life: l,
                    },
                );
            }
            Ev::Probe { peer, backend } => {
                let jitter = rng.gen_range(0.9..=1.1);
                let next = now + (cfg.probe_interval_ms as f64 * jitter) as u64;
                push(&mut queue, &mut events, next, Ev::Probe { peer, backend });
                if !alive[peer] {
                    continue;
                }
                if cfg.probers > 0 {
                    let dead_here: Vec<NodeId> = (0..cfg.peers)
                        .filter(|&j| peer_state[peer][j] == PeerState::Dead)
                        .map(|j| ids[j].clone())
                        .collect();
                    let id = BackendId::new(format!("b{backend}"));
                    let assigned =
                        is_prober(&id, &pool.voters, &dead_here, cfg.probers, &ids[peer])
                            || (cfg.probers_never_stop && probing[peer][backend]);
                    if !assigned {
                        // Its probes' verdict goes, and so does its vote.
                        local[peer][backend].forget_probes();
                        probing[peer][backend] = false;
                        if pool.backends[&id].down_votes.contains(&ids[peer]) {
                            let change = vote(Local::Up, backend, &ids[peer]);
                            push(
                                &mut queue,
                                &mut events,
                                now + cfg.commit_ms,
                                Ev::Commit { change },
                            );
                        }
                        continue;
                    }
                    probing[peer][backend] = true;
                }
                report.probes += 1;
                let dead = dead_backend == Some(backend) && now >= kill_at;
                let ok = !dead && !rng.gen_bool(cfg.loss);
                let flipped = local[peer][backend].record(Source::Probe, ok, &cfg.thresholds);
                // (A peer whose view went down just before the kill is down on it too.)
                if dead && local[peer][backend].state() == Local::Down && !down_on[peer] {
                    down_on[peer] = true;
                    if down_on.iter().all(|d| *d) && report.detect_local_ms.is_none() {
                        report.detect_local_ms = Some(now - kill_at);
                    }
                }
                if let Some(flip) = flipped {
                    if flip == Local::Down && !dead {
                        report.false_local_downs += 1;
                    }
                    let change = vote(flip, backend, &ids[peer]);
                    push(
                        &mut queue,
                        &mut events,
                        now + cfg.commit_ms,
                        Ev::Commit { change },
                    );
                }
            }
            Ev::Crash { peer } => {
                let running = alive.iter().filter(|a| **a).count();
                if running - 1 < cfg.peers / 2 + 1 {
                    // Not now: that would leave no majority running.
                    let at = now + rng.gen_range(60_000..600_000);
                    push(&mut queue, &mut events, at, Ev::Crash { peer });
                    continue;
                }
                alive[peer] = false;
                report.crashes += 1;
                last_turn = now;
                let at = now + rng.gen_range(60_000..600_000);
                push(&mut queue, &mut events, at, Ev::Restart { peer });
            }
            Ev::Restart { peer } => {
                // A new process: fresh local views and detectors.
                alive[peer] = true;
                last_turn = now;
                local[peer] = vec![LocalHealth::default(); cfg.backends];
                probing[peer] = vec![false; cfg.backends];
                detectors[peer] = (0..cfg.peers).map(|_| Detector::new(dcfg, now)).collect();
                peer_state[peer] = vec![PeerState::Alive; cfg.peers];
                let at = now + rng.gen_range(600_000..3_600_000);
                push(&mut queue, &mut events, at, Ev::Crash { peer });
            }
            Ev::Beat { from } => {
                for (to, row) in detectors.iter_mut().enumerate() {
                    if to != from && alive[from] && !rng.gen_bool(cfg.loss) {
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
                        if i == j || !alive[i] {
                            continue;
                        }
                        let s = detectors[i][j].state(now);
                        if s == PeerState::Dead && peer_state[i][j] != PeerState::Dead {
                            if alive[j] {
                                report.false_peer_deaths += 1;
                            }
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
                if cfg.probers > 0 && now >= last_turn + settle_ms {
                    let running = alive.iter().filter(|a| **a).count();
                    let want = cfg.probers.min(running);
                    for b in 0..cfg.backends {
                        let n = alive
                            .iter()
                            .zip(&probing)
                            .filter(|(up, probes)| **up && probes[b])
                            .count();
                        report.prober_checks += 1;
                        if n != want {
                            report.prober_violations += 1;
                        }
                    }
                }
                push(&mut queue, &mut events, now + cfg.heartbeat_ms, Ev::Check);
            }
        }
    }
    report
}
