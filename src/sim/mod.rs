//! A deterministic simulation of N peers running the consensus core over an in-memory network.
//!
//! One seeded RNG drives everything: message loss, duplication, delay (hence reordering),
//! partitions (majority/minority, one-way, one node isolated), crashes and restarts of any
//! minority (keeping only what was persisted), and clients issuing changes and reads. Safety is
//! checked online as events happen, the client history offline for linearizability, and
//! liveness after the network heals. The same seed gives the same run; a failure names its seed
//! and `trace` replays it with a readable event log.

#![forbid(unsafe_code)]

pub mod discovery;
pub mod health;
pub mod linearizability;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::fmt::Write as _;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::core::paxos::{Ballot, Durable, Effects, Msg, Node as Core, Outcome, ProposerConfig};
use crate::core::pool::{Backend, BackendId, NodeId, Pool, PoolChange, Rules, ServiceDef};
use linearizability::{Operation, Seen};

/// What to simulate.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub nodes: usize,
    pub clients: usize,
    pub ops_per_client: usize,
    /// Simulated milliseconds of faults before the network heals.
    pub fault_ms: u64,
    pub drop: f64,
    pub duplicate: f64,
    pub max_delay_ms: u64,
    /// The chance that a message outlives a round: held for one to four phase timeouts, so it
    /// arrives after its proposer gave up, retried, or the sender lost its disk.
    pub late: f64,
    pub partitions: bool,
    /// Nodes stall now and then (a GC pause, a stopped VM): nothing they receive is handled and
    /// no timer of theirs fires until they resume, messages first, so a round of theirs can
    /// outlive everything that happened meanwhile.
    pub pauses: bool,
    pub crashes: bool,
    /// Some crashes lose the disk: the node comes back with an empty `data_dir` (never more
    /// than a minority of voters without usable state at once).
    pub disk_loss: bool,
    /// The chance that a write of the Paxos state fails (nothing that needed it may happen).
    pub write_failures: f64,
    /// Planted bugs, played by doubles the simulation owns (never by the production types).
    pub faults: Faults,
    /// Record a readable event log (for replaying a failing seed).
    pub trace: bool,
    /// Every node reads the register periodically (as peers do to catch up).
    pub periodic_reads: bool,
    /// The cluster forms with its voters (a seed), and clients add and remove voters among
    /// `nodes + spares` node ids while pool changes, faults and disk losses go on.
    pub membership: bool,
    /// Nodes that start outside the membership (new hosts), up and empty.
    pub spares: usize,
}

impl SimConfig {
    pub fn new(nodes: usize) -> Self {
        Self {
            nodes,
            clients: 3,
            ops_per_client: 8,
            fault_ms: 6_000,
            drop: 0.05,
            duplicate: 0.03,
            max_delay_ms: 30,
            late: 0.01,
            partitions: true,
            pauses: true,
            crashes: true,
            disk_loss: true,
            write_failures: 0.01,
            faults: Faults::default(),
            trace: false,
            periodic_reads: true,
            membership: false,
            spares: 0,
        }
    }

    /// Membership changes on: `nodes` voters form the cluster, `spares` more hosts may join.
    pub fn membership(nodes: usize, spares: usize) -> Self {
        Self {
            membership: true,
            spares,
            ..Self::new(nodes)
        }
    }
}

/// Planted bugs, for proving that the checkers catch them. Each is a double around the real
/// acceptor and proposer: a disk or a network that misbehaves in one precise way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Faults {
    /// The disk acknowledges an acceptor's write before it is durable: replies leave first, the
    /// state lands later (or never, if the node crashes meanwhile).
    pub reply_before_persist: bool,
    /// A disk that was lost comes back as a blank state that claims to vote (an empty
    /// `data_dir` taken for a new acceptor), so a wiped voter votes at once.
    pub blank_disk_votes: bool,
    /// The network strips the accepted ballot from promises to proposers, so a proposer cannot
    /// tell which value is the highest-accepted one and continues from an arbitrary one.
    pub hide_accepted_ballots: bool,
    /// The network relabels the accepted ballot in promises with the proposer's epoch, so a
    /// proposer continues from values accepted under earlier memberships (an unchosen change of
    /// the voters among them) as if they were its epoch's.
    pub mix_epochs: bool,
}

/// The kinds of checks a run makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// An online safety property (agreement, no lost commit, ballots, the ejection cap).
    Safety,
    /// The client history is not linearizable, or the checker could not decide it.
    Linearizability,
    /// Nothing committed in time after the network healed, or a peer did not learn.
    Liveness,
}

/// A failed run: which seed, which property, and (when traced) the events before it.
#[derive(Debug)]
pub struct Failure {
    pub seed: u64,
    pub nodes: usize,
    /// Which kind of check failed.
    pub check: Check,
    pub reason: String,
    pub trace: Vec<String>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "seed {} ({} nodes): {:?}: {}",
            self.seed, self.nodes, self.check, self.reason
        )?;
        writeln!(
            f,
            "replay: SHOAL_SEED={} cargo test --release --test simulation -- --nocapture",
            self.seed
        )?;
        // The last 120 events, or all of them with SHOAL_TRACE_ALL=1.
        let from = if std::env::var_os("SHOAL_TRACE_ALL").is_some() {
            0
        } else {
            self.trace.len().saturating_sub(120)
        };
        for line in &self.trace[from..] {
            writeln!(f, "  {line}")?;
        }
        Ok(())
    }
}

/// What a run did, for reports and benches.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub commits: u64,
    pub rejects: u64,
    pub unknown: u64,
    pub not_applied: u64,
    pub messages: u64,
    pub prepares: u64,
    pub final_version: u64,
    /// Crashes that lost the disk, and writes that failed.
    pub disk_losses: u64,
    pub failed_writes: u64,
    /// Committed changes of the voters, and the highest membership epoch reached.
    pub membership_changes: u64,
    /// Membership changes proposed as autopilot decided them.
    pub autopilot_steps: u64,
    pub max_epoch: u64,
}

const PHASE_TIMEOUT: u64 = 200;
/// Proposer timing in the simulation (simulated milliseconds).
const PROPOSER: ProposerConfig = ProposerConfig {
    phase_timeout: PHASE_TIMEOUT,
    deadline: 3_000,
    backoff_base: 20,
    backoff_cap: 1_000,
};

fn node_ids(n: usize) -> Vec<NodeId> {
    (0..n).map(|i| NodeId::new(format!("n{i}"))).collect()
}
const READ_PERIOD: u64 = 1_000;
const LIVENESS_MS: u64 = 5_000;

// Most events are deliveries; boxing their message would only add an allocation each.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
enum Event {
    Deliver {
        from: usize,
        to: usize,
        msg: Msg,
    },
    Wake {
        node: usize,
        incarnation: u64,
    },
    ClientNext {
        client: usize,
    },
    Crash,
    Restart {
        node: usize,
    },
    Partition,
    Pause,
    Heal,
    Persist {
        node: usize,
        incarnation: u64,
        state: Box<Durable>,
    },
    PeriodicRead {
        node: usize,
    },
    EndFaults,
}

/// One simulated peer: the core `Node` the cluster driver runs, and its disk.
struct Node {
    id: NodeId,
    up: bool,
    /// Counts starts, so events of an earlier life are ignored.
    incarnation: u64,
    core: Core,
    /// What survives a crash (None: an empty `data_dir`).
    disk: Option<Durable>,
    /// The learned pool, as the driver keeps it beside the Paxos state (lost with the disk).
    learned_disk: Pool,
    /// The client operation this node's proposer runs (index into history).
    serving: Option<usize>,
    /// When the last delayed write lands (a planted slow disk writes in order).
    persist_at: u64,
    /// Stalled until then: what arrives waits.
    paused_until: u64,
}

struct Sim {
    cfg: SimConfig,
    rng: ChaCha8Rng,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<(u64, u64, usize)>>,
    events: Vec<Option<Event>>,
    nodes: Vec<Node>,
    rules: Rules,
    /// Blocked links (from, to).
    blocked: BTreeSet<(usize, usize)>,
    /// Whether the partition holds what it blocks (delivered at the heal, as a link that stalls
    /// and then flushes) rather than dropping it.
    holding: bool,
    /// What a holding partition keeps.
    held: Vec<(usize, usize, Msg)>,
    faulting: bool,
    history: Vec<Operation>,
    /// Per history entry: the highest version committed-and-answered before it was invoked.
    floor: Vec<u64>,
    client_ops_left: Vec<usize>,
    committed: BTreeMap<u64, Pool>,
    /// Highest version of any answered commit, and when.
    answered_max: u64,
    report: Report,
    trace: Vec<String>,
    error: Option<(Check, String)>,
}

/// Run one seed.
pub fn run(seed: u64, cfg: &SimConfig) -> Result<Report, Failure> {
    let mut sim = Sim::new(seed, cfg.clone());
    sim.run();
    match sim.error.take() {
        None => Ok(sim.report),
        Some((check, reason)) => Err(Failure {
            seed,
            nodes: cfg.nodes,
            check,
            reason,
            trace: std::mem::take(&mut sim.trace),
        }),
    }
}

impl Sim {
    fn new(seed: u64, cfg: SimConfig) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let ids = node_ids(cfg.nodes);
        let all = node_ids(cfg.nodes + cfg.spares);
        // Half the runs start as a brand-new cluster (no voter has state: they must recognise
        // that and form it); the others from voters whose state is initialized.
        let fresh = rng.gen_bool(0.5);
        let nodes = all
            .iter()
            .enumerate()
            .map(|(i, id)| {
                // Spares are new hosts: empty.
                let disk = (!fresh && i < cfg.nodes).then(Durable::default);
                let core = Core::new(
                    id.clone(),
                    ids.clone(),
                    PROPOSER,
                    disk.clone(),
                    Pool::default(),
                    rng.gen(),
                );
                Node {
                    id: id.clone(),
                    up: true,
                    incarnation: 0,
                    core,
                    disk,
                    learned_disk: Pool::default(),
                    serving: None,
                    persist_at: 0,
                    paused_until: 0,
                }
            })
            .collect();
        let rules = Rules {
            cluster_size: cfg.nodes,
            max_ejected_percent: 50,
            ..Rules::default()
        };
        let mut sim = Sim {
            client_ops_left: vec![cfg.ops_per_client; cfg.clients],
            cfg,
            rng,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            events: Vec::new(),
            nodes,
            rules,
            blocked: BTreeSet::new(),
            holding: false,
            held: Vec::new(),
            faulting: true,
            history: Vec::new(),
            floor: Vec::new(),
            committed: BTreeMap::new(),
            answered_max: 0,
            report: Report::default(),
            trace: Vec::new(),
            error: None,
        };
        for c in 0..sim.cfg.clients {
            let at = sim.rng.gen_range(0..50);
            sim.schedule(at, Event::ClientNext { client: c });
        }
        for n in 0..sim.nodes.len() {
            // With membership, the first reads come early: they form the cluster.
            let first = if sim.cfg.membership { 50 } else { READ_PERIOD };
            let at = sim.rng.gen_range(0..first);
            sim.schedule(at, Event::PeriodicRead { node: n });
        }
        if sim.cfg.crashes {
            let at = sim.rng.gen_range(100..800);
            sim.schedule(at, Event::Crash);
        }
        if sim.cfg.partitions {
            let at = sim.rng.gen_range(100..800);
            sim.schedule(at, Event::Partition);
        }
        if sim.cfg.pauses {
            let at = sim.rng.gen_range(100..1500);
            sim.schedule(at, Event::Pause);
        }
        let end = sim.cfg.fault_ms;
        sim.schedule(end, Event::EndFaults);
        sim
    }

    fn log(&mut self, f: impl FnOnce() -> String) {
        if self.cfg.trace {
            let line = format!("{:>6}ms {}", self.now, f());
            self.trace.push(line);
        }
    }

    fn fail(&mut self, check: Check, reason: String) {
        if self.error.is_none() {
            self.log(|| format!("VIOLATION ({check:?}): {reason}"));
            self.error = Some((check, reason));
        }
    }

    fn schedule(&mut self, delay: u64, e: Event) {
        self.seq += 1;
        let idx = self.events.len();
        self.events.push(Some(e));
        self.queue.push(Reverse((self.now + delay, self.seq, idx)));
    }

    fn run(&mut self) {
        let horizon = self.cfg.fault_ms + LIVENESS_MS + 2 * READ_PERIOD;
        while let Some(Reverse((t, _, idx))) = self.queue.pop() {
            if self.error.is_some() || t > horizon {
                break;
            }
            self.now = t;
            let Some(e) = self.events[idx].take() else {
                continue;
            };
            self.step(e);
        }
        if self.error.is_some() {
            return;
        }
        self.finish_checks();
    }

    fn step(&mut self, e: Event) {
        // A stalled node handles nothing until it resumes: what arrives first, then its timers.
        let stalled = match &e {
            Event::Deliver { to: n, .. } | Event::PeriodicRead { node: n } => Some((*n, 0)),
            Event::Wake { node: n, .. } => Some((*n, 1)),
            _ => None,
        };
        if let Some((n, after)) = stalled {
            let until = self.nodes[n].paused_until;
            if until > self.now {
                self.schedule(until - self.now + after, e);
                return;
            }
        }
        match e {
            Event::Pause => self.pause(),
            Event::Deliver { from, to, msg } => self.deliver(from, to, msg),
            Event::Wake { node, incarnation } => {
                if self.nodes[node].up && self.nodes[node].incarnation == incarnation {
                    let now = self.now;
                    self.nodes[node].core.tick(now);
                    self.pump(node);
                }
            }
            Event::ClientNext { client } => self.client_next(client),
            Event::Crash => self.crash(),
            Event::Restart { node } => self.restart(node),
            Event::Partition => self.partition(),
            Event::Heal => self.heal(),
            Event::Persist {
                node,
                incarnation,
                state,
            } => {
                if self.nodes[node].up && self.nodes[node].incarnation == incarnation {
                    self.write_disk(node, *state);
                }
            }
            Event::PeriodicRead { node } => self.periodic_read(node),
            Event::EndFaults => self.end_faults(),
        }
    }

    /// The partition heals; with faults on, the next one is scheduled.
    fn heal(&mut self) {
        self.blocked.clear();
        self.release_held();
        self.log(|| "heal".into());
        if self.faulting && self.cfg.partitions {
            let at = self.rng.gen_range(200..1500);
            self.schedule(at, Event::Partition);
        }
    }

    /// A node's periodic round (or, outside the membership, its fetch of the latest pool),
    /// and the next one scheduled.
    fn periodic_read(&mut self, node: usize) {
        if !self.cfg.periodic_reads {
            return;
        }
        let outside = self.nodes[node].core.consensus() == crate::core::paxos::Consensus::NotMember
            && self.nodes[node].core.learned().exists()
            && !self.nodes[node].core.is_catching_up();
        if self.nodes[node].up && outside {
            // As the driver does: a node outside the membership asks a voter for the
            // latest pool instead of running a round.
            let voters = self.nodes[node].core.voters();
            if let Some(v) = voters.choose(&mut self.rng) {
                let to = self.index_of(v);
                self.send(node, to, Msg::Fetch);
            }
        } else if self.nodes[node].up
            && !self.nodes[node].core.is_busy()
            && self.nodes[node].core.may_lag()
        {
            // As the driver does, a lone voter that holds what it learned reads nothing.
            match self.read_or_seed(node) {
                // Forming is a change like any other: it joins the history (its own
                // client, which issues nothing else).
                seed @ PoolChange::Seed { .. } => {
                    let client = self.cfg.clients + 1;
                    self.issue(client, node, seed);
                }
                // A catch-up round commits a fence: it joins the history too.
                read if self.nodes[node].core.is_catching_up() => {
                    let client = self.cfg.clients + 2;
                    self.issue(client, node, read);
                }
                read => self.start_change(node, read, None),
            }
        }
        // With membership the first reads came at once (they form the cluster): spread
        // the later ones, as peers started at different times do.
        let next = if self.cfg.membership {
            self.rng.gen_range(READ_PERIOD / 2..READ_PERIOD * 3 / 2)
        } else {
            READ_PERIOD
        };
        self.schedule(next, Event::PeriodicRead { node });
    }

    /// The end of the faults: the network heals, everyone restarts, and a liveness probe starts.
    fn end_faults(&mut self) {
        self.faulting = false;
        self.blocked.clear();
        self.release_held();
        self.cfg.drop = 0.0;
        self.cfg.duplicate = 0.0;
        self.cfg.write_failures = 0.0;
        self.log(|| "faults end: network healed, everyone restarts".into());
        for n in 0..self.nodes.len() {
            if !self.nodes[n].up {
                self.restart(n);
            }
        }
        // Liveness probe: a change must commit within LIVENESS_MS from here.
        let target = self.rng.gen_range(0..self.nodes.len());
        self.liveness_probe(target);
    }

    /// What a node's periodic round is: as the driver does, a voter that knows no pool forms
    /// the cluster (with membership on), any other reads.
    fn read_or_seed(&mut self, node: usize) -> PoolChange {
        let core = &self.nodes[node].core;
        if self.cfg.membership
            && !core.learned().exists()
            && core.consensus() == crate::core::paxos::Consensus::Voting
        {
            PoolChange::Seed {
                backends: Vec::new(),
                cluster_id: "sim".into(),
                voters: node_ids(self.cfg.nodes).into_iter().collect(),
                services: Vec::new(),
            }
        } else {
            PoolChange::Read
        }
    }

    fn liveness_probe(&mut self, node: usize) {
        let client = self.cfg.clients; // a separate client id
        let change = PoolChange::Read;
        if self.nodes[node].core.is_busy() {
            // Wait for the node's current change to finish; retry shortly.
            self.schedule(50, Event::ClientNext { client });
            return;
        }
        self.issue(client, node, change);
    }

    fn send(&mut self, from: usize, to: usize, msg: Msg) {
        self.report.messages += 1;
        if matches!(msg, Msg::Prepare { .. }) {
            self.report.prepares += 1;
        }
        if from == to {
            let d = self.rng.gen_range(0..=1);
            self.schedule(d, Event::Deliver { from, to, msg });
            return;
        }
        if self.blocked.contains(&(from, to)) {
            if self.holding {
                self.held.push((from, to, msg));
            }
            return;
        }
        if self.rng.gen_bool(self.cfg.drop) {
            return;
        }
        let d = if self.rng.gen_bool(self.cfg.late) {
            self.rng.gen_range(PHASE_TIMEOUT..=PHASE_TIMEOUT * 4)
        } else {
            self.rng.gen_range(1..=self.cfg.max_delay_ms)
        };
        if self.rng.gen_bool(self.cfg.duplicate) {
            let d2 = self.rng.gen_range(1..=self.cfg.max_delay_ms * 3);
            self.schedule(
                d2,
                Event::Deliver {
                    from,
                    to,
                    msg: msg.clone(),
                },
            );
        }
        self.schedule(d, Event::Deliver { from, to, msg });
    }

    fn deliver(&mut self, from: usize, to: usize, mut msg: Msg) {
        if !self.nodes[to].up {
            return;
        }
        if let (true, Msg::Promise { accepted, .. }) =
            (self.cfg.faults.hide_accepted_ballots, &mut msg)
        {
            *accepted = Ballot::zero();
        }
        if let (
            true,
            Msg::Promise {
                ballot, accepted, ..
            },
        ) = (self.cfg.faults.mix_epochs, &mut msg)
        {
            accepted.epoch = ballot.epoch;
        }
        let (id, from_id) = (self.nodes[to].id.clone(), self.nodes[from].id.clone());
        self.log(|| format!("{id} <- {from_id}: {}", brief(&msg)));
        let now = self.now;
        self.nodes[to].core.step(&from_id, msg, now);
        self.pump(to);
    }

    /// Carry out what a node produced, as the cluster driver does: what may happen now, then
    /// its write (which may fail), then what waited for the write.
    fn pump(&mut self, node: usize) {
        let ready = self.nodes[node].core.ready();
        self.carry(node, ready.now);
        if let Some(write) = ready.write {
            let ok = !self.rng.gen_bool(self.cfg.write_failures);
            if !ok {
                self.report.failed_writes += 1;
                let id = self.nodes[node].id.clone();
                self.log(|| format!("{id}: write failed"));
            } else if self.cfg.faults.reply_before_persist {
                // The disk says done at once and writes later (or never, if the node crashes),
                // in order, as one disk does: the bug is the early answer, not a reordering.
                let inc = self.nodes[node].incarnation;
                let at = (self.now + self.rng.gen_range(1..200)).max(self.nodes[node].persist_at);
                self.nodes[node].persist_at = at;
                let lag = at - self.now;
                let state = Box::new(write.state.clone());
                self.schedule(
                    lag,
                    Event::Persist {
                        node,
                        incarnation: inc,
                        state,
                    },
                );
            } else {
                self.write_disk(node, write.state.clone());
            }
            let held = self.nodes[node].core.written(write, ok);
            self.carry(node, held);
        }
        if let Some(w) = self.nodes[node].core.next_wakeup() {
            let inc = self.nodes[node].incarnation;
            let delay = w.saturating_sub(self.now);
            self.schedule(
                delay,
                Event::Wake {
                    node,
                    incarnation: inc,
                },
            );
        }
    }

    fn carry(&mut self, node: usize, effects: Effects) {
        if let Some(p) = effects.learned {
            // Learned pools are only ever committed ones (a seal that moved a proposer to a new
            // epoch is learned without an outcome): one pool per version here too.
            match self.committed.get(&p.version) {
                Some(q) if *q != p => {
                    let v = p.version;
                    self.fail(
                        Check::Safety,
                        format!("a node learned a pool as version {v} that differs from the one committed"),
                    );
                }
                Some(_) => {}
                None => self.record_commit(&p),
            }
            self.nodes[node].learned_disk = p;
        }
        for (to, msg) in effects.messages {
            let to = self.index_of(&to);
            self.send(node, to, msg);
        }
        for o in effects.outcomes {
            self.done(node, o);
        }
    }

    /// The disk now holds `state`. Property 4: an acceptor's ballots never decrease, across
    /// restarts too (checked on what is on disk; a lost disk starts over).
    fn write_disk(&mut self, node: usize, state: Durable) {
        if let Some(old) = &self.nodes[node].disk {
            if state.acceptor.promised < old.acceptor.promised
                || state.acceptor.accepted < old.acceptor.accepted
            {
                let id = self.nodes[node].id.clone();
                self.fail(
                    Check::Safety,
                    format!("acceptor {id}'s ballots decreased on disk"),
                );
            }
        }
        self.nodes[node].disk = Some(state);
    }

    /// A version seen committed for the first time.
    fn record_commit(&mut self, p: &Pool) {
        if p.epoch > self.report.max_epoch && p.epoch > 1 {
            // Epoch 1 is the formed cluster; every later one is a change of the voters.
            self.report.membership_changes += p.epoch - self.report.max_epoch.max(1);
        }
        self.report.max_epoch = self.report.max_epoch.max(p.epoch);
        self.committed.insert(p.version, p.clone());
    }

    fn index_of(&self, id: &NodeId) -> usize {
        self.nodes.iter().position(|n| &n.id == id).unwrap_or(0)
    }

    fn done(&mut self, node: usize, outcome: Outcome) {
        let op = self.nodes[node].serving.take();
        let id = self.nodes[node].id.clone();
        self.log(|| format!("{id} done: {}", brief_outcome(&outcome)));
        // Online checks on anything committed.
        let committed = match &outcome {
            Outcome::Committed(p) | Outcome::AlreadyCommitted(p) | Outcome::Rejected(_, p) => {
                Some(p.clone())
            }
            _ => None,
        };
        match &outcome {
            Outcome::Committed(_) | Outcome::AlreadyCommitted(_) => self.report.commits += 1,
            Outcome::Rejected(..) => self.report.rejects += 1,
            Outcome::Unknown => self.report.unknown += 1,
            Outcome::NotApplied => self.report.not_applied += 1,
        }
        if let Some(p) = &committed {
            // Property 1: one pool per version.
            match self.committed.get(&p.version) {
                Some(q) if q != p => {
                    let v = p.version;
                    self.fail(
                        Check::Safety,
                        format!("two different pools committed as version {v}"),
                    );
                }
                Some(_) => {}
                None => self.record_commit(p),
            }
            // Property 5: the ejection cap.
            if p.ejected_count() > p.ejection_cap(&self.rules) {
                self.fail(
                    Check::Safety,
                    format!(
                        "version {} ejects {} backends, over the cap",
                        p.version,
                        p.ejected_count()
                    ),
                );
            }
        }
        if let Some(i) = op {
            let seen = match outcome {
                Outcome::Committed(p) => Seen::Committed(p),
                Outcome::AlreadyCommitted(_) => Seen::Happened,
                Outcome::Rejected(e, p) => Seen::Rejected(e, p),
                Outcome::Unknown => Seen::Unknown,
                Outcome::NotApplied => {
                    // It did not happen: it leaves the history.
                    self.history[i].response = u64::MAX;
                    self.history[i].seen = Seen::Unknown;
                    self.history[i].change = PoolChange::Read;
                    self.client_after(i);
                    return;
                }
            };
            if let Some(p) = committed {
                // Property 2: an answered commit is never lost: later operations see it.
                if p.version < self.floor[i] {
                    let (v, f) = (p.version, self.floor[i]);
                    self.fail(
                        Check::Safety,
                        format!("operation {i} saw version {v} after version {f} was answered"),
                    );
                }
                self.answered_max = self.answered_max.max(p.version);
            }
            self.history[i].response = if seen == Seen::Unknown {
                u64::MAX
            } else {
                self.now
            };
            self.history[i].seen = seen;
            self.client_after(i);
        }
    }

    fn client_after(&mut self, i: usize) {
        let client = self.history[i].client;
        if client == self.cfg.clients && !matches!(self.history[i].seen, Seen::Committed(_)) {
            // The liveness probe retries until it commits (or the horizon ends the run).
            self.schedule(50, Event::ClientNext { client });
        } else if client < self.cfg.clients {
            let at = self.rng.gen_range(0..100);
            self.schedule(at, Event::ClientNext { client });
        }
    }

    /// Autopilot's step as the lowest live voter of the latest membership would take it now
    /// (crashed voters dead long enough, every live non-voter ready): the same `decide`, made
    /// a change through the same `Node` as any other.
    fn autopilot_change(&mut self) -> Option<PoolChange> {
        use crate::core::autopilot::{decide, Ready, Settings, View};
        let latest = self
            .nodes
            .iter()
            .map(|n| n.core.learned())
            .max_by_key(|p| p.version)?;
        let voters = latest.voters.clone();
        let alive: std::collections::BTreeSet<NodeId> = self
            .nodes
            .iter()
            .filter(|n| n.up)
            .map(|n| n.id.clone())
            .collect();
        let me = voters.iter().find(|v| alive.contains(*v))?.clone();
        let view = View {
            me,
            dead_since: voters
                .iter()
                .filter(|v| !alive.contains(*v))
                .map(|v| (v.clone(), 0))
                .collect(),
            learners: alive
                .iter()
                .filter(|n| !voters.contains(*n))
                .map(|id| Ready {
                    id: id.clone(),
                    addr: "sim:7001".into(),
                    since: 0,
                })
                .collect(),
            voters,
            alive,
            now: 1,
        };
        let settings = Settings {
            voters: self.cfg.nodes,
            dead_after_ms: 1,
            stabilization_ms: 0,
        };
        let step = decide(&view, &settings)?;
        self.report.autopilot_steps += 1;
        Some(step.into_change())
    }

    fn random_change(&mut self) -> PoolChange {
        let b: u32 = self.rng.gen_range(0..4);
        let id = BackendId::new(format!("b{b}"));
        let peer = NodeId::new(format!("n{}", self.rng.gen_range(0..self.nodes.len())));
        if self.cfg.membership && self.rng.gen_bool(0.25) {
            if self.rng.gen_bool(0.3) {
                if let Some(change) = self.autopilot_change() {
                    return change;
                }
            }
            return if self.rng.gen_bool(0.5) {
                PoolChange::AddPeer {
                    id: peer,
                    addr: "sim:7001".into(),
                    learner: false,
                }
            } else {
                PoolChange::RemovePeer { id: peer }
            };
        }
        // A third of the changes go to services s1 and s2 (one register holds every service's
        // pool): definitions come and go, and their backends change by the same rules.
        let service = match self.rng.gen_range(0..6) {
            0 => Some("s1"),
            1 => Some("s2"),
            _ => None,
        };
        if let Some(name) = service {
            match self.rng.gen_range(0..8) {
                0 => {
                    let hosts = if self.rng.gen_bool(0.5) {
                        vec![format!("{name}.test")]
                    } else {
                        Vec::new()
                    };
                    let path_prefix = self.rng.gen_bool(0.5).then(|| format!("/{name}/"));
                    return PoolChange::PutService {
                        name: name.into(),
                        def: ServiceDef {
                            hosts,
                            path_prefix,
                            ..ServiceDef::default()
                        },
                    };
                }
                1 => return PoolChange::RemoveService { name: name.into() },
                _ => {}
            }
        }
        let change = self.backend_change(id, b, peer);
        match service {
            Some(name) => PoolChange::in_service(name, change),
            None => change,
        }
    }

    fn backend_change(&mut self, id: BackendId, b: u32, peer: NodeId) -> PoolChange {
        match self.rng.gen_range(0..9) {
            0 | 1 => PoolChange::AddBackend {
                backend: Backend::new(format!("b{b}"), format!("10.0.0.{b}:80"), 1),
            },
            2 => PoolChange::RemoveBackend { id },
            3 => PoolChange::SetWeight {
                id,
                weight: self.rng.gen_range(1..5),
            },
            4 => PoolChange::SetState {
                id,
                draining: self.rng.gen_bool(0.5),
            },
            5 => PoolChange::VoteDown { id, peer },
            6 => PoolChange::VoteUp { id, peer },
            _ => PoolChange::Read,
        }
    }

    fn client_next(&mut self, client: usize) {
        if client == self.cfg.clients {
            let n = self.rng.gen_range(0..self.nodes.len());
            self.liveness_probe(n);
            return;
        }
        if self.client_ops_left[client] == 0 || !self.faulting {
            return;
        }
        if self.cfg.membership && !self.committed.values().any(|p| !p.voters.is_empty()) {
            // Changes start once the cluster has formed.
            self.schedule(20, Event::ClientNext { client });
            return;
        }
        let mut idle: Vec<usize> = (0..self.nodes.len())
            .filter(|&n| self.nodes[n].up && !self.nodes[n].core.is_busy())
            .collect();
        idle.shuffle(&mut self.rng);
        let Some(&node) = idle.first() else {
            self.schedule(10, Event::ClientNext { client });
            return;
        };
        self.client_ops_left[client] -= 1;
        let change = self.random_change();
        self.issue(client, node, change);
    }

    fn issue(&mut self, client: usize, node: usize, change: PoolChange) {
        let i = self.history.len();
        // A read at a node catching up is its catch-up round: it commits a fence.
        let recorded = if change == PoolChange::Read && self.nodes[node].core.is_catching_up() {
            PoolChange::Fence {
                peer: self.nodes[node].id.clone(),
            }
        } else {
            change.clone()
        };
        self.history.push(Operation {
            client,
            change: recorded,
            invoke: self.now,
            response: u64::MAX,
            seen: Seen::Unknown,
        });
        self.floor.push(self.answered_max);
        self.start_change(node, change, Some(i));
    }

    fn start_change(&mut self, node: usize, change: PoolChange, op: Option<usize>) {
        let id = self.nodes[node].id.clone();
        self.log(|| format!("{id} proposes {change:?}"));
        let now = self.now;
        let rules = self.rules;
        // A read no client waits for is the node's periodic one, as the driver runs it.
        let started = if op.is_none() && change == PoolChange::Read {
            self.nodes[node].core.propose_background(rules, now)
        } else {
            self.nodes[node].core.propose(change, rules, now)
        };
        if started {
            self.nodes[node].serving = op;
            self.pump(node);
        } else if op.is_some() {
            // Refused at once (a node catching up takes no changes): nothing happened.
            self.nodes[node].serving = op;
            self.done(node, Outcome::NotApplied);
        }
    }

    fn crash(&mut self) {
        if !self.faulting {
            return;
        }
        let minority = (self.nodes.len() - 1) / 2;
        let down = self.nodes.iter().filter(|n| !n.up).count();
        let up: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].up)
            .collect();
        if down < minority {
            let &victim = up.choose(&mut self.rng).unwrap_or(&0);
            let id = self.nodes[victim].id.clone();
            self.log(|| format!("crash {id}"));
            let outcome = self.nodes[victim].core.cancel();
            self.nodes[victim].up = false;
            self.nodes[victim].incarnation += 1;
            // Lose the disk too, unless that would leave a majority of voters without state.
            let stateless = (0..self.nodes.len())
                .filter(|&i| i != victim && !self.has_state(i))
                .count();
            let may_lose = if self.cfg.membership {
                stateless == 0 && self.disk_loss_leaves_majorities(victim)
            } else {
                stateless < minority
            };
            if self.cfg.disk_loss && may_lose && self.rng.gen_bool(0.3) {
                self.log(|| format!("{id} lost its disk"));
                self.report.disk_losses += 1;
                self.nodes[victim].learned_disk = Pool::default();
                self.nodes[victim].disk = if self.cfg.faults.blank_disk_votes {
                    Some(Durable::default())
                } else {
                    None
                };
            }
            if let Some(o) = outcome {
                if self.nodes[victim].serving.is_some() {
                    self.done(victim, o);
                }
            }
            let at = self.rng.gen_range(200..1500);
            self.schedule(at, Event::Restart { node: victim });
        }
        let at = self.rng.gen_range(300..2000);
        self.schedule(at, Event::Crash);
    }

    /// Whether `victim` may lose its disk within the guarantee (a minority of voters lose their
    /// state): every membership that any node has accepted, learned or seen committed, and any
    /// that one change may still make of it, keeps a majority of its voters with state, counting
    /// the victim as lost (one at a time).
    fn disk_loss_leaves_majorities(&self, victim: usize) -> bool {
        let id = &self.nodes[victim].id;
        let mut sets: Vec<&std::collections::BTreeSet<NodeId>> = Vec::new();
        for n in &self.nodes {
            if let Some(d) = &n.disk {
                sets.push(&d.acceptor.value.voters);
            }
            sets.push(&n.learned_disk.voters);
            sets.push(&n.core.learned().voters);
        }
        if let Some(p) = self.committed.values().next_back() {
            sets.push(&p.voters);
        }
        // At least three: a change in flight may shrink a membership by one voter, and a
        // membership of one voter that lost its disk has nothing to catch up from (refused, not
        // lost: the operator's --force-new-cluster).
        sets.iter().filter(|s| s.contains(id)).all(|s| s.len() >= 3)
    }

    /// Whether a node holds voting state: its disk says so, or (up) it caught up.
    fn has_state(&self, node: usize) -> bool {
        let n = &self.nodes[node];
        let on_disk = n.disk.as_ref().is_some_and(|d| d.voting);
        on_disk || (n.up && n.core.consensus() == crate::core::paxos::Consensus::Voting)
    }

    fn restart(&mut self, node: usize) {
        if self.nodes[node].up {
            return;
        }
        let ids = node_ids(self.cfg.nodes);
        let seed = self.rng.gen();
        let n = &mut self.nodes[node];
        n.up = true;
        n.incarnation += 1;
        // Only what was persisted survives: the Paxos state and the learned pool.
        n.core = Core::new(
            n.id.clone(),
            ids,
            PROPOSER,
            n.disk.clone(),
            n.learned_disk.clone(),
            seed,
        );
        n.serving = None;
        let id = n.id.clone();
        self.log(|| format!("restart {id}"));
    }

    fn partition(&mut self) {
        if !self.faulting {
            return;
        }
        let n = self.nodes.len();
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut self.rng);
        self.blocked.clear();
        let kind = self.rng.gen_range(0..3);
        match kind {
            0 => {
                // Majority / minority.
                let minority = (n - 1) / 2;
                let (small, big) = order.split_at(minority.max(1));
                for &a in small {
                    for &b in big {
                        self.blocked.insert((a, b));
                        self.blocked.insert((b, a));
                    }
                }
            }
            1 => {
                // One-way: a few random links drop in one direction only.
                for _ in 0..n {
                    let a = self.rng.gen_range(0..n);
                    let b = self.rng.gen_range(0..n);
                    if a != b {
                        self.blocked.insert((a, b));
                    }
                }
            }
            _ => {
                // Isolate one node.
                let x = order[0];
                for b in 0..n {
                    if b != x {
                        self.blocked.insert((x, b));
                        self.blocked.insert((b, x));
                    }
                }
            }
        }
        self.holding = self.rng.gen_bool(0.5);
        let (blocked, how) = (
            self.blocked.len(),
            if self.holding { "held" } else { "blocked" },
        );
        self.log(|| format!("partition kind {kind}: {blocked} links {how}"));
        let at = self.rng.gen_range(300..2000);
        self.schedule(at, Event::Heal);
    }

    /// Stall one node for a while (one to four phase timeouts).
    fn pause(&mut self) {
        if !self.faulting {
            return;
        }
        let n = self.rng.gen_range(0..self.nodes.len());
        let d = self.rng.gen_range(PHASE_TIMEOUT / 2..=PHASE_TIMEOUT * 4);
        self.nodes[n].paused_until = self.now + d;
        let id = self.nodes[n].id.clone();
        self.log(|| format!("{id} stalls for {d} ms"));
        let at = self.rng.gen_range(300..2500);
        self.schedule(at, Event::Pause);
    }

    /// A holding partition healed: what it kept arrives now, in a burst.
    fn release_held(&mut self) {
        for (from, to, msg) in std::mem::take(&mut self.held) {
            let d = self.rng.gen_range(1..=self.cfg.max_delay_ms);
            self.schedule(d, Event::Deliver { from, to, msg });
        }
    }

    fn finish_checks(&mut self) {
        // Liveness: after healing, the probe (and the periodic reads) committed.
        let heal = self.cfg.fault_ms;
        let probe = self.history.iter().find(|o| {
            o.client == self.cfg.clients && o.invoke >= heal && matches!(o.seen, Seen::Committed(_))
        });
        match probe {
            None => {
                self.fail(
                    Check::Liveness,
                    "no change committed within 5 s of the network healing".into(),
                );
                return;
            }
            Some(o) if o.response > heal + LIVENESS_MS => {
                let took = o.response - heal;
                self.fail(
                    Check::Liveness,
                    format!("the first change after healing took {took} ms"),
                );
                return;
            }
            _ => {}
        }
        // Every live peer learned the latest committed version (with membership: every voter
        // of the latest membership; the others learn when they ask).
        let latest = self.committed.keys().next_back().copied().unwrap_or(0);
        let voters = self
            .committed
            .values()
            .next_back()
            .map(|p| p.voters.clone())
            .unwrap_or_default();
        for i in 0..self.nodes.len() {
            let n = &self.nodes[i];
            if self.cfg.membership && !voters.contains(&n.id) {
                continue;
            }
            if n.core.learned().version < latest {
                let (id, v) = (n.id.clone(), n.core.learned().version);
                self.fail(
                    Check::Liveness,
                    format!("{id} learned only version {v} of {latest} after healing"),
                );
                return;
            }
        }
        self.report.final_version = latest;
        // Property 3: the client history is linearizable.
        let ops: Vec<Operation> = self
            .history
            .iter()
            .filter(|o| !(o.seen == Seen::Unknown && o.change == PoolChange::Read))
            .cloned()
            .collect();
        let e = match linearizability::check(&ops, &self.rules, 2_000_000) {
            Ok(()) => return,
            Err(linearizability::CheckError::Undecided { steps }) => {
                let n = ops.len();
                self.fail(
                    Check::Linearizability,
                    format!(
                        "the checker could not decide a history of {n} operations in {steps} steps"
                    ),
                );
                return;
            }
            Err(linearizability::CheckError::NotLinearizable(e)) => e,
        };
        {
            let mut msg = format!(
                "history of {} operations is not linearizable; longest valid order:",
                ops.len()
            );
            for i in e.best_prefix {
                let o = &ops[i];
                let _ = write!(
                    msg,
                    "\n    c{} {:?} [{}..{}]",
                    o.client, o.change, o.invoke, o.response
                );
            }
            let _ = write!(msg, "\n  whole history:");
            for o in &ops {
                let seen = match &o.seen {
                    Seen::Committed(p) => format!("committed v{}", p.version),
                    Seen::Rejected(e, p) => format!("rejected ({e}) at v{}", p.version),
                    Seen::Happened => "already committed".to_string(),
                    Seen::Unknown => "unknown".to_string(),
                };
                let _ = write!(
                    msg,
                    "\n    c{} {:?} [{}..{}] {seen}",
                    o.client, o.change, o.invoke, o.response
                );
            }
            self.fail(Check::Linearizability, msg);
        }
    }
}

fn brief(m: &Msg) -> String {
    match m {
        Msg::Prepare { ballot } => format!("prepare {ballot}"),
        Msg::Promise {
            ballot,
            accepted,
            value,
        } => format!("promise {ballot} (accepted {accepted}, v{})", value.version),
        Msg::Accept { ballot, value } => format!("accept {ballot} v{}", value.version),
        Msg::Accepted { ballot } => format!("accepted {ballot}"),
        Msg::Conflict { ballot, seen } => format!("conflict {ballot} (seen {seen})"),
        Msg::NotVoting { ballot, formed } => format!("not voting {ballot} (formed {formed})"),
        Msg::Learn { pool } => format!("learn v{} (epoch {})", pool.version, pool.epoch),
        Msg::Fetch => "fetch".into(),
    }
}

fn brief_outcome(o: &Outcome) -> String {
    match o {
        Outcome::Committed(p) => format!("committed v{}", p.version),
        Outcome::AlreadyCommitted(p) => format!("already committed (now v{})", p.version),
        Outcome::Rejected(e, p) => format!("rejected ({e}) at v{}", p.version),
        Outcome::NotApplied => "not applied".into(),
        Outcome::Unknown => "unknown".into(),
    }
}
