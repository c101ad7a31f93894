//! One peer's consensus: acceptor, proposer and the learned pool joined into one machine, which
//! the cluster driver and the simulation both drive (raft-rs's `RawNode` is the model).
//!
//! `step`, `tick` and `propose` feed it; `ready` hands out what happened. What may happen at once
//! is in `Ready::now`. What depends on state not yet on disk (a promise, an accept, a counter
//! reservation) is held in a `Write`: the driver makes `Write::state` durable and then calls
//! `written`, and only that call hands out the held messages, outcomes and learned pool. A reply
//! before its fsync cannot be written by accident: the type keeps it.
//!
//! A voter that starts without state (a lost or new disk) does not vote until it has caught up
//! (DESIGN 3.1): it answers `NotVoting` to prepares and accepts, and runs identity rounds through
//! the *other* voters. Once one commits after its start, it promises that round's ballot (so it
//! refuses every ballot it might have answered in an earlier life: any such ballot is below one
//! that a majority of the others promised since) and votes from then on. A brand-new cluster
//! (every voter without state) is recognised when every other voter says it knows no formed
//! pool. A formed cluster whose reachable voters cannot make a majority of the others is refused,
//! and `refusal` says why and what to do.

use std::collections::BTreeSet;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{Acceptor, Action, Ballot, Durable, Msg, Outcome, Proposer, ProposerConfig};
use crate::core::pool::{Backend, NodeId, Pool, PoolChange, Rules, ServiceSeed};

/// Whether this node's acceptor takes part in quorums.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Consensus {
    /// Answers prepares and accepts.
    Voting,
    /// Started without state; catching up before it may vote.
    CatchingUp,
    /// Not among the agreed voters: learns, routes and proposes through the voters.
    NotMember,
}

impl Consensus {
    pub fn as_str(self) -> &'static str {
        match self {
            Consensus::Voting => "voting",
            Consensus::CatchingUp => "catching_up",
            Consensus::NotMember => "learner",
        }
    }
}

/// What happened, to carry out.
#[derive(Debug, Default)]
pub struct Effects {
    /// Messages to send.
    pub messages: Vec<(NodeId, Msg)>,
    /// Changes that finished, in order.
    pub outcomes: Vec<Outcome>,
    /// A newly learned pool (a higher version than any before), to publish and keep as a hint.
    pub learned: Option<Pool>,
}

/// State to make durable, and what may happen only once it is.
#[derive(Debug)]
pub struct Write {
    pub state: Durable,
    held: Effects,
}

/// The output of `ready`.
#[derive(Debug, Default)]
pub struct Ready {
    /// May happen now: nothing in it depends on unwritten state.
    pub now: Effects,
    /// Write `state`, then hand the write back to `Node::written` for the rest.
    pub write: Option<Write>,
}

/// How many failed catch-up rounds that saw a formed cluster make a refusal worth reporting.
const REFUSE_AFTER: u32 = 3;

#[derive(Debug)]
enum Mode {
    Voting,
    CatchingUp {
        /// The catch-up round in progress: its ballot, and which other voters said they know no
        /// formed pool (a brand-new cluster when that is all of them).
        ballot: Option<Ballot>,
        unformed: BTreeSet<NodeId>,
        /// Which other voters showed a formed pool, and how many rounds failed since.
        formed_by: BTreeSet<NodeId>,
        failed: u32,
    },
}

/// One peer's consensus state machine.
#[derive(Debug)]
pub struct Node {
    id: NodeId,
    acceptor: Acceptor,
    proposer: Proposer,
    /// The durable fields as they are in memory (the acceptor's come from it at `ready`).
    durable: Durable,
    /// What the last successful write left on disk: where a failed write rolls back to.
    on_disk: Durable,
    /// The state changed since the last `ready`: what follows waits for the write.
    dirty: bool,
    mode: Mode,
    learned: Pool,
    /// What `learned` was before a pool learned while a write was pending: a commit this node
    /// saw through its own unwritten acceptor state is not known to hold if that write fails.
    learned_before_write: Option<Pool>,
    /// Voters from the config: the membership until a formed pool names its own.
    config_voters: Vec<NodeId>,
    /// Everyone to push learned pools to (voters and configured peers, not this node).
    peers: BTreeSet<NodeId>,
    /// Whether the change in progress is this node's own catch-up round.
    catching_up_op: bool,
    rng: ChaCha8Rng,
    /// Produced before any state change since the last `ready`: free to happen now.
    out: Effects,
    /// Produced after one: waits for the write.
    held: Effects,
}

impl Node {
    /// A node. `durable` is what its disk holds (None: an empty `data_dir`); `voters` the
    /// configured voters, this node included; `hint` the last pool it learned (a routing hint).
    pub fn new(
        id: NodeId,
        voters: Vec<NodeId>,
        cfg: ProposerConfig,
        durable: Option<Durable>,
        hint: Pool,
        seed: u64,
    ) -> Node {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let fresh = durable.is_none();
        let mut durable = durable.unwrap_or_else(|| Durable {
            voting: false,
            incarnation: rng.gen_range(1..u64::MAX),
            ..Durable::default()
        });
        // A single-voter cluster is its own majority: nothing to catch up from.
        if fresh && voters.len() <= 1 {
            durable.voting = true;
        }
        let mut proposer = Proposer::new(
            id.clone(),
            voters.clone(),
            cfg,
            durable.counter_reserved,
            rng.gen(),
        );
        proposer.set_incarnation(durable.incarnation);
        let mode = if durable.voting {
            Mode::Voting
        } else {
            Mode::CatchingUp {
                ballot: None,
                unformed: BTreeSet::new(),
                formed_by: BTreeSet::new(),
                failed: 0,
            }
        };
        let peers = voters.iter().filter(|v| **v != id).cloned().collect();
        let on_disk = if fresh {
            Durable {
                voting: false,
                ..durable.clone()
            }
        } else {
            durable.clone()
        };
        let mut node = Node {
            acceptor: Acceptor::new(durable.acceptor.clone()),
            proposer,
            dirty: fresh && durable.voting,
            durable,
            on_disk,
            mode,
            learned: hint,
            learned_before_write: None,
            config_voters: voters,
            peers,
            catching_up_op: false,
            rng,
            out: Effects::default(),
            held: Effects::default(),
            id,
        };
        node.refresh_peers();
        node
    }

    pub fn consensus(&self) -> Consensus {
        if !self.voters().contains(&self.id) {
            return Consensus::NotMember;
        }
        match self.mode {
            Mode::CatchingUp { .. } => Consensus::CatchingUp,
            Mode::Voting => Consensus::Voting,
        }
    }

    /// Whether this node started without state and has not caught up yet (whether it is a
    /// voter or not): it finishes that with an identity round through the voters, so that it can
    /// vote at once if it is made a voter.
    pub fn is_catching_up(&self) -> bool {
        matches!(self.mode, Mode::CatchingUp { .. })
    }

    /// Whether a read round could teach this node a pool it has not learned. Not for the lone
    /// voter whose acceptor holds, written, exactly the pool it learned: every value chosen is
    /// accepted by a majority of the voters, that is by it, and it accepted nothing past what it
    /// learned (its read would go to itself alone and accept the same pool again). Any other
    /// node may have missed a push: a voter among others, one catching up, one outside the
    /// membership, a lone voter whose acceptor took a later value (another peer's proposal
    /// whose commit it did not hear of) or that has a write pending.
    pub fn may_lag(&self) -> bool {
        let alone = matches!(self.voters().as_slice(), [only] if *only == self.id);
        !(alone
            && matches!(self.mode, Mode::Voting)
            && !self.dirty
            && self.learned_before_write.is_none()
            && self.learned.exists()
            && self.acceptor.state().value == self.learned)
    }

    /// The pool learned so far (the highest version committed that this node knows).
    pub fn learned(&self) -> &Pool {
        &self.learned
    }

    /// The voters quorums are counted among: the agreed membership once the cluster formed,
    /// the configured one before.
    pub fn voters(&self) -> Vec<NodeId> {
        if self.learned.voters.is_empty() {
            self.config_voters.clone()
        } else {
            self.learned.voters.iter().cloned().collect()
        }
    }

    /// A majority of the voters.
    pub fn majority(&self) -> usize {
        self.voters().len() / 2 + 1
    }

    pub fn is_busy(&self) -> bool {
        self.proposer.is_busy()
    }

    /// When `tick` next needs calling.
    pub fn next_wakeup(&self) -> Option<u64> {
        self.proposer.next_wakeup()
    }

    /// Rounds lost to a higher ballot so far (for metrics).
    pub fn conflicts(&self) -> u64 {
        self.proposer.conflicts()
    }

    /// Why this node cannot catch up, when that has lasted a few rounds.
    pub fn refusal(&self) -> Option<String> {
        let Mode::CatchingUp {
            formed_by, failed, ..
        } = &self.mode
        else {
            return None;
        };
        if *failed < REFUSE_AFTER || formed_by.is_empty() || !self.voters().contains(&self.id) {
            return None;
        }
        let with_state: Vec<&str> = formed_by.iter().map(|n| n.as_str()).collect();
        let others = self.voters().len().saturating_sub(1);
        Some(format!(
            "this voter started without its Paxos state in a cluster that has formed ({} {} state), \
             and it may vote only after an identity round through a majority of the other voters \
             ({} of {}) that can vote; waiting for them. If a majority of the voters lost their \
             disks, restart the survivor with --force-new-cluster.",
            with_state.join(", "),
            if with_state.len() == 1 { "has" } else { "have" },
            others / 2 + 1,
            others,
        ))
    }

    /// The change that seeds a new cluster: the configured backends, a fresh cluster id, and
    /// the configured voters as the first membership. It applies only while no pool exists.
    pub fn seed(&mut self, backends: Vec<Backend>, services: Vec<ServiceSeed>) -> PoolChange {
        let id: u128 = self.rng.gen();
        PoolChange::Seed {
            backends,
            cluster_id: format!("{id:032x}"),
            voters: self.config_voters.iter().cloned().collect(),
            services,
        }
    }

    /// Start a change. Returns false (and does nothing) if one is in progress, or while this
    /// node catches up, for anything but a read (the caller runs the catch-up first), or if the
    /// other voters are too few to decide it.
    ///
    /// While catching up, a read is the catch-up round, and it commits `PoolChange::Fence`:
    /// one epoch up, so that a promise this node made in an earlier life (before it lost its
    /// disk) can never be counted with its new votes. Without it, a proposer holding such a
    /// promise could complete a majority with it after this node voted for something else
    /// (`a_promise_from_before_a_lost_disk_cannot_overwrite_a_later_commit` plays it).
    pub fn propose(&mut self, change: PoolChange, rules: Rules, now: u64) -> bool {
        self.start(change, rules, now, false)
    }

    /// A background read (a peer's periodic one): as `propose`, but it gives up at its first
    /// conflict, since the round that beat it pushes what it commits to every peer. A node
    /// catching up runs its catch-up round in full instead.
    pub fn propose_background(&mut self, rules: Rules, now: u64) -> bool {
        self.start(PoolChange::Read, rules, now, true)
    }

    /// Start a change; `background`: a read that yields at its first conflict (never a
    /// catch-up round).
    fn start(&mut self, change: PoolChange, rules: Rules, now: u64, background: bool) -> bool {
        if self.proposer.is_busy() {
            return false;
        }
        let catching_up = matches!(self.mode, Mode::CatchingUp { .. });
        let change = match change {
            PoolChange::Read if catching_up => PoolChange::Fence {
                peer: self.id.clone(),
            },
            _ if catching_up => return false,
            change => change,
        };
        let voters = self.voters();
        if !self.set_quorum(catching_up) {
            return false;
        }
        let rules = Rules {
            cluster_size: voters.len(),
            ..rules
        };
        let mut actions = Vec::new();
        self.proposer.propose(change, rules, now, &mut actions);
        if background && !catching_up {
            // Before `act`: this node's own acceptor may refuse the round at once.
            self.proposer.yield_on_conflict();
        }
        self.catching_up_op = catching_up;
        if let Mode::CatchingUp {
            ballot, unformed, ..
        } = &mut self.mode
        {
            *ballot = self.proposer.current_ballot().cloned();
            unformed.clear();
        }
        self.act(actions, now);
        true
    }

    /// Point the proposer at the learned epoch and its voters. While catching up, this node's
    /// own acceptor takes no part: the catch-up round counts a majority of the other voters.
    /// False when the voters that may answer cannot make that quorum.
    ///
    /// Why a majority of the others is enough for the read: the last commit is held by a
    /// majority of all the voters (q of n), of which at most this node was lost, so by q - 1
    /// of the n - 1 others; a read of (n - 1) / 2 + 1 of them meets that set, since
    /// (n - 1) / 2 + 1 + q - 1 > n - 1 for every n. That holds after the catch-up only because
    /// the caught-up node then holds the value it wrote back (`done`): the write-back reached
    /// (n - 1) / 2 + 1 others and this node, a majority of all. A caught-up voter that held
    /// nothing would leave the value with fewer than q voters, and a second wipe could lose it
    /// (4 voters: n3 caught up through {n0, n2} holding nothing; n2 wiped; n2 caught up through
    /// {n1, n3}, which hold only the value before the commit).
    ///
    /// Why the catch-up must also fence (`propose`): the write-back opens a new epoch, and the
    /// (n - 1) / 2 + 1 others that accepted it refuse every ballot of the epoch before. A
    /// proposer still counting a promise from this node's earlier life needs a majority of
    /// n in that old epoch; without one of the fencing acceptors it has at most
    /// n - 1 - ((n - 1) / 2 + 1) others plus the old promise, n - (n - 1) / 2 - 1 < n / 2 + 1,
    /// and one of them reports the fence, a seal, which moves it to the new epoch.
    fn set_quorum(&mut self, catching_up: bool) -> bool {
        let voters = self.voters();
        let acceptors: Vec<NodeId> = if catching_up {
            voters.into_iter().filter(|v| *v != self.id).collect()
        } else {
            voters
        };
        if acceptors.is_empty() {
            return false;
        }
        self.proposer
            .set_epoch(self.learned.epoch, self.learned.clone());
        self.proposer.set_acceptors(acceptors);
        true
    }

    /// After a seal moved this node to a new epoch mid-change: the change's new quorum.
    fn configure_proposer(&mut self) -> bool {
        self.set_quorum(matches!(self.mode, Mode::CatchingUp { .. }))
    }

    /// Abandon the change in progress (the node is shutting down).
    pub fn cancel(&mut self) -> Option<Outcome> {
        self.catching_up_op = false;
        self.proposer.cancel()
    }

    /// Timers: retry a stalled phase, or start the next attempt after a backoff.
    pub fn tick(&mut self, now: u64) {
        let mut actions = Vec::new();
        let before = self.proposer.current_ballot().cloned();
        self.proposer.tick(now, &mut actions);
        if let Mode::CatchingUp {
            ballot,
            unformed,
            failed,
            ..
        } = &mut self.mode
        {
            let after = self.proposer.current_ballot().cloned();
            if self.catching_up_op && after != before {
                // A new attempt (or the end of this one): new answers to collect.
                if before.is_some() {
                    *failed = failed.saturating_add(1);
                }
                *ballot = after;
                unformed.clear();
            }
        }
        self.act(actions, now);
    }

    /// A message from `from`.
    pub fn step(&mut self, from: &NodeId, msg: Msg, now: u64) {
        match msg {
            Msg::Prepare { ref ballot } | Msg::Accept { ref ballot, .. } => {
                if ballot.epoch == self.proposer.epoch() {
                    self.proposer.observe(ballot);
                }
                if ballot.epoch < self.learned.epoch && self.learned.exists() {
                    // A proposer of a sealed epoch: tell it what sealed it.
                    let pool = self.learned.clone();
                    self.send(from.clone(), Msg::Learn { pool });
                } else if ballot.epoch > self.learned.epoch {
                    // This node is behind: the proposer knows a later membership.
                    self.send(from.clone(), Msg::Fetch);
                }
                if let Some(reply) = self.accept(&msg) {
                    self.send(from.clone(), reply);
                }
            }
            Msg::Learn { pool } => self.learn(pool),
            Msg::Fetch => {
                if self.learned.exists() {
                    let pool = self.learned.clone();
                    self.send(from.clone(), Msg::Learn { pool });
                }
            }
            Msg::NotVoting { ref ballot, formed } => {
                self.note_answer(from, ballot, !formed, formed);
                // It may not know yet that it votes in this epoch.
                if ballot.epoch > 0 && ballot.epoch == self.learned.epoch {
                    let pool = self.learned.clone();
                    self.send(from.clone(), Msg::Learn { pool });
                }
            }
            other => {
                if let Msg::Conflict { ref seen, .. } = other {
                    if seen.epoch > self.learned.epoch || self.proposer.yields() {
                        // Beaten by a ballot of a later membership, or a background read
                        // yields: ask for what the peer learned instead (the round that beat
                        // this one may commit nothing new, and push nothing).
                        self.send(from.clone(), Msg::Fetch);
                    }
                }
                if let Msg::Promise {
                    ref ballot,
                    ref value,
                    ..
                } = other
                {
                    let formed = value.exists();
                    self.note_answer(from, ballot, !formed, formed);
                }
                let mut actions = Vec::new();
                self.proposer.on_message(from, &other, now, &mut actions);
                self.act(actions, now);
            }
        }
        self.maybe_brand_new();
    }

    /// Take what happened since the last call. What was produced before the first state change
    /// may happen now; the rest waits for the write.
    pub fn ready(&mut self) -> Ready {
        let now = std::mem::take(&mut self.out);
        let held = std::mem::take(&mut self.held);
        if !self.dirty {
            return Ready { now, write: None };
        }
        self.dirty = false;
        self.durable.acceptor = self.acceptor.state().clone();
        Ready {
            now,
            write: Some(Write {
                state: self.durable.clone(),
                held,
            }),
        }
    }

    /// Where an effect goes: after a state change it waits for the write.
    fn effects(&mut self) -> &mut Effects {
        if self.dirty {
            &mut self.held
        } else {
            &mut self.out
        }
    }

    /// The write of `write.state` finished: `ok` when it is durable. Then the held effects may
    /// happen. When it failed, none of them happens: this node goes back to what its disk holds
    /// (the round in progress is abandoned; its counter reservation is made again before any
    /// later ballot leaves), as if it had restarted.
    pub fn written(&mut self, write: Write, ok: bool) -> Effects {
        if ok {
            self.on_disk = write.state;
            self.learned_before_write = None;
            return write.held;
        }
        if let Some(before) = self.learned_before_write.take() {
            self.learned = before;
        }
        let mut lost = Effects::default();
        // Outcomes that needed the write are not known to hold.
        for o in write.held.outcomes {
            lost.outcomes.push(match o {
                Outcome::NotApplied => Outcome::NotApplied,
                _ => Outcome::Unknown,
            });
        }
        if let Some(o) = self.proposer.cancel() {
            lost.outcomes.push(o);
        }
        self.catching_up_op = false;
        // Back to what the disk holds, as after a restart.
        self.durable = self.on_disk.clone();
        self.acceptor = Acceptor::new(self.on_disk.acceptor.clone());
        self.proposer
            .reservation_lost(self.on_disk.counter_reserved);
        if !self.on_disk.voting && self.config_voters.len() <= 1 {
            // A lone voter votes from its start (`new`): it writes that again.
            self.durable.voting = true;
            self.dirty = true;
        } else if !self.on_disk.voting {
            self.mode = Mode::CatchingUp {
                ballot: None,
                unformed: BTreeSet::new(),
                formed_by: BTreeSet::new(),
                failed: 0,
            };
        }
        lost
    }

    fn note_answer(&mut self, from: &NodeId, ballot: &Ballot, unformed_answer: bool, formed: bool) {
        if let Mode::CatchingUp {
            ballot: Some(mine),
            unformed,
            formed_by,
            ..
        } = &mut self.mode
        {
            if mine == ballot {
                if unformed_answer {
                    unformed.insert(from.clone());
                }
                if formed {
                    formed_by.insert(from.clone());
                }
            }
        }
    }

    /// Every other voter said it knows no formed pool: nothing was ever committed, so this
    /// node's empty state is its whole history, and it may vote.
    fn maybe_brand_new(&mut self) {
        let Mode::CatchingUp { unformed, .. } = &self.mode else {
            return;
        };
        if self.learned.exists() {
            return;
        }
        let others: BTreeSet<NodeId> = self
            .voters()
            .into_iter()
            .filter(|v| *v != self.id)
            .collect();
        if !others.is_empty() && others.is_subset(unformed) {
            if let Some(o) = self.proposer.cancel() {
                self.effects().outcomes.push(o);
            }
            self.catching_up_op = false;
            self.start_voting(None);
        }
    }

    fn start_voting(&mut self, above: Option<Ballot>) {
        if let Some(b) = above {
            self.acceptor.promise_at_least(&b);
        }
        self.mode = Mode::Voting;
        self.durable.voting = true;
        self.dirty = true;
    }

    /// The acceptor's side: a voting acceptor answers (its state written before the answer
    /// leaves); one catching up, or not among the agreed voters, says it does not vote.
    fn accept(&mut self, msg: &Msg) -> Option<Msg> {
        let ballot = match msg {
            Msg::Prepare { ballot } | Msg::Accept { ballot, .. } => ballot.clone(),
            _ => return None,
        };
        let voting = matches!(self.mode, Mode::Voting) && self.voters().contains(&self.id);
        if !voting && ballot.epoch <= self.learned.epoch {
            return Some(Msg::NotVoting {
                ballot,
                formed: self.learned.exists(),
            });
        }
        if ballot.epoch > self.learned.epoch {
            // A ballot of an epoch this node has not learned: refused until it has (`step`
            // asked the proposer for it). An acceptor that promised a later epoch refuses
            // every ballot of the earlier ones, so it must be able to say what sealed them:
            // were the seal known only to the proposer, and that proposer lost its disk, no
            // one could move past the old epoch again.
            return Some(Msg::Conflict {
                seen: ballot.clone(),
                ballot,
            });
        }
        let (changed, reply) = self.acceptor.handle(msg)?;
        self.dirty |= changed;
        Some(reply)
    }

    fn send(&mut self, to: NodeId, msg: Msg) {
        self.effects().messages.push((to, msg));
    }

    /// A value this node saw chosen: learn it and, if it is news, push it to every peer.
    fn learned_commit(&mut self, pool: Pool) {
        let newer = !self.learned.exists() || pool.version > self.learned.version;
        self.learn(pool.clone());
        if newer {
            for p in self.peers.clone() {
                self.send(p, Msg::Learn { pool: pool.clone() });
            }
        }
    }

    fn learn(&mut self, pool: Pool) {
        if self.learned.exists() && pool.version <= self.learned.version {
            return;
        }
        let moved = pool.epoch != self.learned.epoch;
        if self.dirty && self.learned_before_write.is_none() {
            self.learned_before_write = Some(self.learned.clone());
        }
        self.learned = pool.clone();
        self.refresh_peers();
        self.effects().learned = Some(pool);
        if moved && self.proposer.is_busy() {
            // The change in progress continues in the new epoch, among its voters.
            self.proposer
                .set_epoch(self.learned.epoch, self.learned.clone());
            if !self.configure_proposer() {
                self.catching_up_op = false;
                if let Some(o) = self.proposer.cancel() {
                    self.effects().outcomes.push(o);
                }
            }
        }
    }

    fn refresh_peers(&mut self) {
        for v in self.learned.voters.iter().chain(&self.learned.learners) {
            if *v != self.id {
                self.peers.insert(v.clone());
            }
        }
    }

    /// Stop pushing to `peer` (a learner that left), unless it is a member.
    pub fn remove_listener(&mut self, peer: &NodeId) {
        if !self.learned.voters.contains(peer) && !self.learned.learners.contains(peer) {
            self.peers.remove(peer);
        }
    }

    /// Push learned pools to `peer` too (a learner that connected: learners need no record in
    /// the membership to follow the cluster).
    pub fn add_listener(&mut self, peer: NodeId) {
        if peer != self.id {
            self.peers.insert(peer);
        }
    }

    /// Carry out proposer actions; messages to this node's own acceptor are handled here (their
    /// state changes join the same write as everything else), after the messages to the others
    /// of the same batch: those depend on a counter reservation before them, never on this
    /// node's own promise, so they leave without waiting for its write.
    fn act(&mut self, actions: Vec<Action>, now: u64) {
        let (mine, rest): (Vec<Action>, Vec<Action>) = actions
            .into_iter()
            .partition(|a| matches!(a, Action::Send(to, _) if *to == self.id));
        let mut work: std::collections::VecDeque<Action> = rest.into_iter().chain(mine).collect();
        while let Some(a) = work.pop_front() {
            match a {
                Action::SaveCounter(c) => {
                    self.durable.counter_reserved = c;
                    self.dirty = true;
                }
                Action::Send(to, msg) if to == self.id => {
                    if let Some(reply) = self.accept(&msg) {
                        let mut more = Vec::new();
                        let me = self.id.clone();
                        self.proposer.on_message(&me, &reply, now, &mut more);
                        work.extend(more);
                    }
                }
                Action::Send(to, msg) => self.send(to, msg),
                Action::Done(o) => self.done(o),
                Action::Moved(pool) => {
                    // A chosen seal: learn the new membership and run the change there.
                    self.learned_commit(pool);
                    if !self.configure_proposer() {
                        let o = self.proposer.cancel();
                        self.catching_up_op = false;
                        if let Some(o) = o {
                            self.effects().outcomes.push(o);
                        }
                    }
                }
            }
        }
    }

    fn done(&mut self, outcome: Outcome) {
        let committed = match &outcome {
            Outcome::Committed(p) | Outcome::AlreadyCommitted(p) | Outcome::Rejected(_, p) => {
                Some(p.clone())
            }
            _ => None,
        };
        let catch_up = std::mem::take(&mut self.catching_up_op);
        if let Some(pool) = committed {
            if catch_up {
                // Caught up: hold the value the round wrote back, under the ballot a majority
                // of the others accepted it under (so it is held by a majority of all the
                // voters: see `set_quorum`), promise above it and vote from now on.
                let ballot = Ballot {
                    epoch: self.proposer.epoch(),
                    counter: self.proposer.counter(),
                    node: self.id.clone(),
                    incarnation: self.durable.incarnation,
                };
                if let Some(at) = self.proposer.committed_at().cloned() {
                    self.acceptor.adopt(&at, &pool);
                }
                self.start_voting(Some(ballot));
            }
            self.learned_commit(pool);
        }
        self.effects().outcomes.push(outcome);
    }
}
