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
    /// The longest from a prober's crash to another voter's first probe of its backend.
    pub worst_replacement_ms: u64,
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

/// One run's world: the agreed pool, every peer's local views and detectors, the event queue.
struct World<'a> {
    cfg: &'a HealthSimConfig,
    rng: ChaCha8Rng,
    ids: Vec<NodeId>,
    rules: Rules,
    pool: Pool,
    /// local[peer][backend]: the peer's view (voters, then learners).
    local: Vec<Vec<LocalHealth>>,
    dcfg: DetectorConfig,
    /// detectors[i][j]: voter i's view of voter j, and the state it last reported.
    detectors: Vec<Vec<Detector>>,
    peer_state: Vec<Vec<PeerState>>,
    queue: BinaryHeap<Reverse<(u64, u64, usize)>>,
    events: Slots,
    seq: u64,
    /// Learners' lives: up or gone, and which life a queued probe belongs to.
    learner_up: Vec<bool>,
    life: Vec<u64>,
    alive: Vec<bool>,
    /// Whether each voter probed each backend at its last turn.
    probing: Vec<Vec<bool>>,
    /// Per backend: when one of its probers crashed, until another takes its place.
    orphaned_at: Vec<Option<u64>>,
    /// The last crash or restart: views settle within `settle_ms` of it.
    last_turn: u64,
    settle_ms: u64,
    dead_backend: Option<usize>,
    kill_at: u64,
    down_on: Vec<bool>,
    report: HealthReport,
}

pub fn run(seed: u64, cfg: &HealthSimConfig) -> HealthReport {
    let mut w = World::new(seed, cfg);
    while let Some(Reverse((now, _, idx))) = w.queue.pop() {
        if now > cfg.duration_ms {
            break;
        }
        let Some(ev) = w.events.take(idx) else {
            continue;
        };
        match ev {
            Ev::Toggle { learner } => w.toggle(now, learner),
            Ev::LearnerProbe {
                learner,
                backend,
                life,
            } => w.learner_probe(now, learner, backend, life),
            Ev::Probe { peer, backend } => w.probe(now, peer, backend),
            Ev::Crash { peer } => w.crash(now, peer),
            Ev::Restart { peer } => w.restart(now, peer),
            Ev::Beat { from } => w.beat(now, from),
            Ev::Commit { change } => w.commit(now, &change),
            Ev::Check => w.check(now),
        }
    }
    w.report
}

impl<'a> World<'a> {
    fn new(seed: u64, cfg: &'a HealthSimConfig) -> Self {
        let ids: Vec<NodeId> = (0..cfg.peers)
            .map(|i| NodeId::new(format!("p{i}")))
            .chain((0..cfg.learners).map(|i| NodeId::new(format!("l{i}"))))
            .collect();
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
        let seed_change = if (cfg.learners > 0 || cfg.probers > 0) && !cfg.learner_votes_count {
            PoolChange::Seed {
                backends,
                cluster_id: "sim".into(),
                voters: ids[..cfg.peers].iter().cloned().collect(),
                services: Vec::new(),
            }
        } else {
            PoolChange::seed(backends)
        };
        let dcfg = DetectorConfig {
            interval_ms: cfg.heartbeat_ms,
            phi_threshold: cfg.phi_threshold,
            dead_after_ms: cfg.dead_after_ms,
        };
        let mut w = World {
            cfg,
            rng: ChaCha8Rng::seed_from_u64(seed),
            pool: Pool::default()
                .apply(&seed_change, &rules)
                .unwrap_or_default(),
            rules,
            local: vec![vec![LocalHealth::default(); cfg.backends]; cfg.peers + cfg.learners],
            dcfg,
            detectors: (0..cfg.peers)
                .map(|_| (0..cfg.peers).map(|_| Detector::new(dcfg, 0)).collect())
                .collect(),
            peer_state: vec![vec![PeerState::Alive; cfg.peers]; cfg.peers],
            queue: BinaryHeap::new(),
            events: Slots::default(),
            seq: 0,
            learner_up: vec![false; cfg.learners],
            life: vec![0; cfg.learners],
            alive: vec![true; cfg.peers],
            probing: vec![vec![true; cfg.backends]; cfg.peers],
            orphaned_at: vec![None; cfg.backends],
            last_turn: 0,
            settle_ms: cfg.dead_after_ms + 20 * cfg.heartbeat_ms + 2 * cfg.probe_interval_ms,
            dead_backend: cfg.kill.map(|(b, _)| b),
            kill_at: cfg.kill.map(|(_, t)| t).unwrap_or(u64::MAX),
            down_on: vec![false; cfg.peers],
            ids,
            report: HealthReport::default(),
        };
        for p in 0..cfg.peers {
            for b in 0..cfg.backends {
                let at = w.rng.gen_range(0..cfg.probe_interval_ms);
                w.push(
                    at,
                    Ev::Probe {
                        peer: p,
                        backend: b,
                    },
                );
            }
            let at = w.rng.gen_range(0..cfg.heartbeat_ms);
            w.push(at, Ev::Beat { from: p });
        }
        for l in 0..cfg.learners {
            let at = w.rng.gen_range(0..30_000);
            w.push(at, Ev::Toggle { learner: l });
        }
        w.push(1_000, Ev::Check);
        if cfg.crashes {
            for p in 0..cfg.peers {
                let at = w.rng.gen_range(600_000..3_600_000);
                w.push(at, Ev::Crash { peer: p });
            }
        }
        w
    }

    fn push(&mut self, at: u64, e: Ev) {
        self.seq += 1;
        let slot = self.events.put(e);
        self.queue.push(Reverse((at, self.seq, slot)));
    }

    /// `peer`'s vote on `backend` commits after the commit delay.
    fn vote(&mut self, now: u64, flip: Local, backend: usize, peer: usize) {
        let change = vote(flip, backend, &self.ids[peer]);
        self.push(now + self.cfg.commit_ms, Ev::Commit { change });
    }

    /// A learner starts (a new process: fresh views, probing from now on) or stops.
    fn toggle(&mut self, now: u64, learner: usize) {
        self.learner_up[learner] = !self.learner_up[learner];
        self.life[learner] += 1;
        if self.learner_up[learner] {
            let peer = self.cfg.peers + learner;
            self.local[peer] = vec![LocalHealth::default(); self.cfg.backends];
            for b in 0..self.cfg.backends {
                let at = now + self.rng.gen_range(0..self.cfg.probe_interval_ms);
                let life = self.life[learner];
                self.push(
                    at,
                    Ev::LearnerProbe {
                        learner,
                        backend: b,
                        life,
                    },
                );
            }
        }
        let at = now + self.rng.gen_range(5_000..120_000);
        self.push(at, Ev::Toggle { learner });
    }

    /// A learner's probe: it reaches no backend, and votes on what it sees.
    fn learner_probe(&mut self, now: u64, learner: usize, backend: usize, life: u64) {
        if !self.learner_up[learner] || self.life[learner] != life {
            return;
        }
        let peer = self.cfg.peers + learner;
        if let Some(flip) =
            self.local[peer][backend].record(Source::Probe, false, &self.cfg.thresholds)
        {
            self.vote(now, flip, backend, peer);
        }
        self.push(
            now + self.cfg.probe_interval_ms,
            Ev::LearnerProbe {
                learner,
                backend,
                life,
            },
        );
    }

    /// Whether voter `peer` probes `backend` now (`probers`), as its own detectors see the others.
    fn assigned(&self, peer: usize, backend: usize) -> bool {
        let dead: Vec<NodeId> = (0..self.cfg.peers)
            .filter(|&j| self.peer_state[peer][j] == PeerState::Dead)
            .map(|j| self.ids[j].clone())
            .collect();
        let id = BackendId::new(format!("b{backend}"));
        is_prober(
            &id,
            &self.pool.voters,
            &dead,
            self.cfg.probers,
            &self.ids[peer],
        ) || (self.cfg.probers_never_stop && self.probing[peer][backend])
    }

    /// A voter's probe turn: probe (if it is its turn) through a lossy path, and vote on a flip.
    fn probe(&mut self, now: u64, peer: usize, backend: usize) {
        let jitter = self.rng.gen_range(0.9..=1.1);
        let next = now + (self.cfg.probe_interval_ms as f64 * jitter) as u64;
        self.push(next, Ev::Probe { peer, backend });
        if !self.alive[peer] {
            return;
        }
        if self.cfg.probers > 0 {
            if !self.assigned(peer, backend) {
                // Its probes' verdict goes, and so does its vote.
                self.local[peer][backend].forget_probes();
                self.probing[peer][backend] = false;
                let id = BackendId::new(format!("b{backend}"));
                if self.pool.backends[&id].down_votes.contains(&self.ids[peer]) {
                    self.vote(now, Local::Up, backend, peer);
                }
                return;
            }
            if !self.probing[peer][backend] {
                if let Some(at) = self.orphaned_at[backend].take() {
                    let took = now - at;
                    self.report.worst_replacement_ms = self.report.worst_replacement_ms.max(took);
                }
            }
            self.probing[peer][backend] = true;
        }
        self.report.probes += 1;
        let dead = self.dead_backend == Some(backend) && now >= self.kill_at;
        let ok = !dead && !self.rng.gen_bool(self.cfg.loss);
        let view = &mut self.local[peer][backend];
        let flipped = view.record(Source::Probe, ok, &self.cfg.thresholds);
        // (A peer whose view went down just before the kill is down on it too.)
        if dead && view.state() == Local::Down && !self.down_on[peer] {
            self.down_on[peer] = true;
            if self.down_on.iter().all(|d| *d) && self.report.detect_local_ms.is_none() {
                self.report.detect_local_ms = Some(now - self.kill_at);
            }
        }
        if let Some(flip) = flipped {
            if flip == Local::Down && !dead {
                self.report.false_local_downs += 1;
            }
            self.vote(now, flip, backend, peer);
        }
    }

    /// A voter crashes, unless that would leave no majority running (then later).
    fn crash(&mut self, now: u64, peer: usize) {
        let running = self.alive.iter().filter(|a| **a).count();
        if running - 1 < self.cfg.peers / 2 + 1 {
            let at = now + self.rng.gen_range(60_000..600_000);
            self.push(at, Ev::Crash { peer });
            return;
        }
        // Timed: a prober crashing among settled views, leaving its backend short of probers
        // (a crash before the last one's replacement voids that measurement).
        let settled = now >= self.last_turn + self.settle_ms;
        if !settled {
            self.orphaned_at = vec![None; self.cfg.backends];
        }
        self.alive[peer] = false;
        self.report.crashes += 1;
        let running = self.alive.iter().filter(|a| **a).count();
        for b in 0..self.cfg.backends {
            let left = (0..self.cfg.peers)
                .filter(|&p| self.alive[p] && self.probing[p][b])
                .count();
            if settled && self.probing[peer][b] && left < self.cfg.probers.min(running) {
                self.orphaned_at[b] = Some(now);
            }
        }
        self.last_turn = now;
        let at = now + self.rng.gen_range(60_000..600_000);
        self.push(at, Ev::Restart { peer });
    }

    /// A crashed voter starts again: a new process, with fresh local views and detectors.
    fn restart(&mut self, now: u64, peer: usize) {
        self.alive[peer] = true;
        self.orphaned_at = vec![None; self.cfg.backends];
        self.last_turn = now;
        self.local[peer] = vec![LocalHealth::default(); self.cfg.backends];
        self.probing[peer] = vec![false; self.cfg.backends];
        self.detectors[peer] = (0..self.cfg.peers)
            .map(|_| Detector::new(self.dcfg, now))
            .collect();
        self.peer_state[peer] = vec![PeerState::Alive; self.cfg.peers];
        let at = now + self.rng.gen_range(600_000..3_600_000);
        self.push(at, Ev::Crash { peer });
    }

    /// A running voter's heartbeat, lost on the way to some.
    fn beat(&mut self, now: u64, from: usize) {
        for to in 0..self.detectors.len() {
            if to != from && self.alive[from] && !self.rng.gen_bool(self.cfg.loss) {
                let at = now + self.rng.gen_range(0..5);
                self.detectors[to][from].heartbeat(at);
            }
        }
        self.push(now + self.cfg.heartbeat_ms, Ev::Beat { from });
    }

    /// A change commits: count every backend it ejected, rightly or not.
    fn commit(&mut self, now: u64, change: &PoolChange) {
        let before = self.pool.clone();
        if let Ok(next) = self.pool.apply(change, &self.rules) {
            self.pool = next;
        }
        for b in self.pool.backends.values() {
            let was = before.backends.get(&b.id).map(|x| x.state);
            if b.state == BackendState::Ejected && was != Some(BackendState::Ejected) {
                let is_dead = self
                    .dead_backend
                    .is_some_and(|d| b.id.as_str() == format!("b{d}"))
                    && now >= self.kill_at;
                if is_dead {
                    self.report
                        .detect_ejected_ms
                        .get_or_insert(now - self.kill_at);
                } else {
                    self.report.false_ejections += 1;
                }
            }
        }
    }

    /// Every running voter's detectors: a peer newly dead has its votes expired. With
    /// `probers`, once the views have settled: how many voters probe each backend.
    fn check(&mut self, now: u64) {
        let n = self.cfg.peers;
        for i in 0..n {
            for j in 0..n {
                if i == j || !self.alive[i] {
                    continue;
                }
                // As the driver counts a peer gone: declared dead, or silent for dead_after.
                let mut s = self.detectors[i][j].state(now);
                if self.detectors[i][j].silent_for(now) >= self.cfg.dead_after_ms {
                    s = PeerState::Dead;
                }
                if s == PeerState::Dead && self.peer_state[i][j] != PeerState::Dead {
                    if self.alive[j] {
                        self.report.false_peer_deaths += 1;
                    }
                    let peer = self.ids[j].clone();
                    self.push(
                        now + self.cfg.commit_ms,
                        Ev::Commit {
                            change: PoolChange::ExpireVotes { peer },
                        },
                    );
                }
                self.peer_state[i][j] = s;
            }
        }
        if self.cfg.probers > 0 && now >= self.last_turn + self.settle_ms {
            let running = self.alive.iter().filter(|a| **a).count();
            let want = self.cfg.probers.min(running);
            for b in 0..self.cfg.backends {
                let probing = self
                    .alive
                    .iter()
                    .zip(&self.probing)
                    .filter(|(up, probes)| **up && probes[b])
                    .count();
                self.report.prober_checks += 1;
                if probing != want {
                    self.report.prober_violations += 1;
                }
            }
        }
        self.push(now + self.cfg.heartbeat_ms, Ev::Check);
    }
}
