//! The proposer: runs one change at a time through prepare and accept, with seeded backoff.

use std::collections::{BTreeMap, BTreeSet};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{Ballot, Msg};
use crate::core::pool::{Applied, ChangeError, NodeId, Pool, PoolChange, Rules};

/// Timing of a proposer, in milliseconds of the caller's clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProposerConfig {
    /// How long a phase waits for a majority before trying again.
    pub phase_timeout: u64,
    /// How long one change may take in all before its outcome is given up on.
    pub deadline: u64,
    /// Backoff after a conflict: uniform in [0, min(cap, base * 2^attempt)] (full jitter).
    pub backoff_base: u64,
    pub backoff_cap: u64,
}

impl Default for ProposerConfig {
    fn default() -> Self {
        Self {
            phase_timeout: 500,
            deadline: 5_000,
            backoff_base: 20,
            backoff_cap: 1_000,
        }
    }
}

/// How a change ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A majority accepted the change's result.
    Committed(Pool),
    /// An earlier attempt of this change committed (its accept went unanswered); `Pool` is the
    /// current value, which includes it.
    AlreadyCommitted(Pool),
    /// The precondition failed against `Pool`, which a majority accepted (written back).
    Rejected(ChangeError, Pool),
    /// Gave up before any accept carrying the change was sent: it did not happen.
    NotApplied,
    /// Gave up after sending accepts (by the deadline): it may or may not have committed.
    Unknown,
}

/// What the driver must do, in order. A `SaveCounter` must be durable before any later `Send`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Send(NodeId, Msg),
    SaveCounter(u64),
    Done(Outcome),
    /// The register of this proposer's epoch is sealed: this value, which names the next
    /// membership, is chosen. The change in progress waits (in backoff) for the driver to learn
    /// it and move the proposer to the new epoch (`set_epoch`, `set_acceptors`), then runs there.
    Moved(Pool),
}

/// Counters reserved per write, so a proposer persists once per this many rounds.
const RESERVE: u64 = 1_000;

// One per proposer: the accepted value lives inline rather than in a box of its own.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Phase {
    /// Waiting to start the next attempt.
    Backoff,
    Preparing {
        ballot: Ballot,
        promises: BTreeMap<NodeId, (Ballot, Pool)>,
    },
    Accepting {
        ballot: Ballot,
        value: Pool,
        /// What committing `value` means for the change.
        result: Meaning,
        oks: BTreeSet<NodeId>,
    },
}

/// What committing the accepted value means for the change.
#[derive(Debug)]
enum Meaning {
    /// The change applied (or was a no-op).
    Applied,
    /// An earlier attempt of this change is already in the value.
    Already,
    /// The precondition failed; the value is what was read.
    Rejected(ChangeError),
    /// The value read was sealed (it names a later membership epoch): written back unchanged,
    /// the change then runs in the new epoch.
    Moved,
}

#[derive(Debug)]
struct Op {
    change: PoolChange,
    /// Tags the change in the pool (`apply_once`), so a retry never applies it twice. Chosen
    /// when the first accept carrying the change leaves: above this proposer's counter and above
    /// the last tag the pool holds for it, so it is unique even after a lost disk restarted the
    /// counter; fixed from then on, for the retries.
    seq: Option<u64>,
    rules: Rules,
    started: u64,
    attempt: u32,
    /// An accept carrying a real change was sent: a failure now leaves the outcome unknown.
    sent_change: bool,
    /// A background read: it gives up (not applied) at its first conflict instead of retrying,
    /// since another proposer's round will push what it commits anyway. Periodic reads by
    /// every peer would otherwise keep preempting a change that waits in backoff.
    yields: bool,
    phase: Phase,
    wake_at: u64,
}

/// One peer's proposer.
#[derive(Debug)]
pub struct Proposer {
    id: NodeId,
    incarnation: u64,
    /// The ballot under which a majority accepted the value of the last change that finished
    /// with one (None when it gave up): a catch-up's node holds that value under it.
    committed_at: Option<Ballot>,
    /// The membership epoch this proposer's ballots belong to.
    epoch: u64,
    /// The latest value known chosen with this epoch's membership: where a round starts when no
    /// acceptor of the majority accepted anything in this epoch yet.
    base: Pool,
    acceptors: Vec<NodeId>,
    cfg: ProposerConfig,
    counter: u64,
    reserved: u64,
    rng: ChaCha8Rng,
    op: Option<Op>,
    conflicts: u64,
}

impl Proposer {
    /// `acceptors` lists every peer, this one included. `counter_reserved` comes from storage:
    /// counters at or below it may have been used before a restart.
    pub fn new(
        id: NodeId,
        acceptors: Vec<NodeId>,
        cfg: ProposerConfig,
        counter_reserved: u64,
        seed: u64,
    ) -> Self {
        Self {
            committed_at: None,
            id,
            incarnation: 0,
            epoch: 0,
            base: Pool::default(),
            acceptors,
            cfg,
            counter: counter_reserved,
            reserved: counter_reserved,
            rng: ChaCha8Rng::seed_from_u64(seed),
            op: None,
            conflicts: 0,
        }
    }

    pub fn id(&self) -> &NodeId {
        &self.id
    }

    /// Ballots carry `incarnation` from now on (a node that lost its disk picks a new one).
    pub fn set_incarnation(&mut self, incarnation: u64) {
        self.incarnation = incarnation;
    }

    /// The epoch of the next rounds and the latest value known chosen in it (its membership's
    /// epoch must be `epoch`).
    pub fn set_epoch(&mut self, epoch: u64, base: Pool) {
        if epoch != self.epoch {
            // A round in flight belongs to the old epoch's register (sealed, or this proposer
            // would not have learned a later one): abandon it; the change runs again in the new
            // epoch, where its tag (`apply_once`) finds it if the old round's value got in.
            if let Some(op) = self.op.as_mut() {
                if !matches!(op.phase, Phase::Backoff) {
                    op.phase = Phase::Backoff;
                    op.wake_at = 0;
                }
            }
        }
        self.epoch = epoch;
        self.base = base;
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The change in progress, if any.
    pub fn change(&self) -> Option<&PoolChange> {
        self.op.as_ref().map(|o| &o.change)
    }

    /// The acceptors of the next change (a majority of them must answer). Called between
    /// rounds only (or with `set_epoch` to a new epoch, which abandons the round in flight): a
    /// round counts its answers against the quorum it started with.
    pub fn set_acceptors(&mut self, acceptors: Vec<NodeId>) {
        self.acceptors = acceptors;
    }

    /// The ballot of the round in progress, if any.
    pub fn current_ballot(&self) -> Option<&Ballot> {
        match &self.op.as_ref()?.phase {
            Phase::Preparing { ballot, .. } | Phase::Accepting { ballot, .. } => Some(ballot),
            Phase::Backoff => None,
        }
    }

    /// The highest counter this proposer has used or seen.
    pub fn counter(&self) -> u64 {
        self.counter
    }

    /// A counter reservation was not written: only `durable` is. The next round reserves again
    /// before any ballot above it leaves.
    pub fn reservation_lost(&mut self, durable: u64) {
        self.reserved = durable;
    }

    pub fn majority(&self) -> usize {
        self.acceptors.len() / 2 + 1
    }

    /// A ballot seen elsewhere on this node (its acceptor got a Prepare or Accept): start the
    /// next round above it, so a proposer that was idle does not lose a round to catch up.
    /// Always safe: ballots only need to be unique and increasing per proposer.
    pub fn observe(&mut self, ballot: &Ballot) {
        self.counter = self.counter.max(ballot.counter);
    }

    /// Rounds lost to a higher ballot so far (for metrics).
    pub fn conflicts(&self) -> u64 {
        self.conflicts
    }

    pub fn is_busy(&self) -> bool {
        self.op.is_some()
    }

    /// When `tick` next needs calling, if a change is in progress.
    pub fn next_wakeup(&self) -> Option<u64> {
        self.op.as_ref().map(|o| o.wake_at)
    }

    /// Start a change. Returns false (and does nothing) if one is already in progress.
    pub fn propose(
        &mut self,
        change: PoolChange,
        rules: Rules,
        now: u64,
        out: &mut Vec<Action>,
    ) -> bool {
        if self.op.is_some() {
            return false;
        }
        self.op = Some(Op {
            change,
            seq: None,
            rules,
            started: now,
            attempt: 0,
            sent_change: false,
            yields: false,
            phase: Phase::Backoff,
            wake_at: now,
        });
        self.start_round(now, out);
        true
    }

    /// Make the change in progress a background read that yields at its first conflict.
    pub fn yield_on_conflict(&mut self) {
        if let Some(op) = self.op.as_mut() {
            op.yields = op.change == PoolChange::Read;
        }
    }

    /// Whether the change in progress is a background read that yields at a conflict.
    pub fn yields(&self) -> bool {
        self.op.as_ref().is_some_and(|op| op.yields)
    }

    /// Abandon the change in progress (e.g. the node is shutting down).
    pub fn cancel(&mut self) -> Option<Outcome> {
        self.op.take().map(|op| {
            if op.sent_change {
                Outcome::Unknown
            } else {
                Outcome::NotApplied
            }
        })
    }

    fn start_round(&mut self, now: u64, out: &mut Vec<Action>) {
        let Some(op) = self.op.as_mut() else { return };
        self.counter += 1;
        if self.counter > self.reserved {
            // Persisted before the Prepare leaves: a restart resumes above every used counter.
            self.reserved = self.counter + RESERVE;
            out.push(Action::SaveCounter(self.reserved));
        }
        let ballot = Ballot {
            epoch: self.epoch,
            counter: self.counter,
            node: self.id.clone(),
            incarnation: self.incarnation,
        };
        op.phase = Phase::Preparing {
            ballot: ballot.clone(),
            promises: BTreeMap::new(),
        };
        op.wake_at = now + self.cfg.phase_timeout;
        for a in &self.acceptors {
            out.push(Action::Send(
                a.clone(),
                Msg::Prepare {
                    ballot: ballot.clone(),
                },
            ));
        }
    }

    /// Back off, then retry until the deadline. Retrying is safe even after an accept carrying
    /// the change went out: the change is tagged (`apply_once`), so a retry that finds it
    /// committed reports that instead of applying it again.
    fn retry_later(&mut self, now: u64, out: &mut Vec<Action>) {
        let Some(op) = self.op.as_mut() else { return };
        if now.saturating_sub(op.started) >= self.cfg.deadline {
            let outcome = if op.sent_change {
                Outcome::Unknown
            } else {
                Outcome::NotApplied
            };
            self.finish(outcome, out);
            return;
        }
        op.attempt += 1;
        let ceiling = self
            .cfg
            .backoff_base
            .saturating_mul(1u64 << op.attempt.min(16))
            .min(self.cfg.backoff_cap);
        op.wake_at = now + self.rng.gen_range(0..=ceiling);
        op.phase = Phase::Backoff;
    }

    fn finish(&mut self, outcome: Outcome, out: &mut Vec<Action>) {
        if !matches!(
            outcome,
            Outcome::Committed(_) | Outcome::AlreadyCommitted(_) | Outcome::Rejected(..)
        ) {
            self.committed_at = None;
        }
        self.op = None;
        out.push(Action::Done(outcome));
    }

    /// The ballot the last finished change's value was accepted under by a majority.
    pub fn committed_at(&self) -> Option<&Ballot> {
        self.committed_at.as_ref()
    }

    /// Timers: retry a stalled phase, or start the next attempt after a backoff.
    pub fn tick(&mut self, now: u64, out: &mut Vec<Action>) {
        let Some(op) = self.op.as_ref() else { return };
        if now < op.wake_at {
            return;
        }
        match op.phase {
            Phase::Backoff => self.start_round(now, out),
            // No majority answered in time.
            Phase::Preparing { .. } | Phase::Accepting { .. } => self.retry_later(now, out),
        }
    }

    /// A reply from acceptor `from`.
    pub fn on_message(&mut self, from: &NodeId, msg: &Msg, now: u64, out: &mut Vec<Action>) {
        let majority = self.majority();
        let Some(op) = self.op.as_mut() else { return };
        match (msg, &mut op.phase) {
            (
                Msg::Promise {
                    ballot,
                    accepted,
                    value,
                },
                Phase::Preparing {
                    ballot: mine,
                    promises,
                },
            ) if ballot == mine => {
                promises.insert(from.clone(), (accepted.clone(), value.clone()));
                if promises.len() >= majority {
                    self.promised(now, out);
                }
            }
            (
                Msg::Accepted { ballot },
                Phase::Accepting {
                    ballot: mine, oks, ..
                },
            ) if ballot == mine => {
                oks.insert(from.clone());
                if oks.len() >= majority {
                    self.chosen(now, out);
                }
            }
            (Msg::Conflict { ballot, seen }, phase) => {
                let mine = match phase {
                    Phase::Preparing { ballot, .. } | Phase::Accepting { ballot, .. } => ballot,
                    Phase::Backoff => return,
                };
                if ballot != mine {
                    return;
                }
                // Fast-forward past the ballot that beat us, so the next attempt can win.
                self.counter = self.counter.max(seen.counter);
                self.conflicts += 1;
                if op.yields && !op.sent_change {
                    self.finish(Outcome::NotApplied, out);
                    return;
                }
                self.retry_later(now, out);
            }
            _ => {}
        }
    }

    /// A majority promised: continue from the value with the highest accepted ballot of this
    /// epoch among them, apply the change to it, and ask every acceptor to accept the result.
    fn promised(&mut self, now: u64, out: &mut Vec<Action>) {
        let Some(op) = self.op.as_mut() else { return };
        let Phase::Preparing {
            ballot: mine,
            promises,
        } = &op.phase
        else {
            return;
        };
        // Any value chosen in this epoch is among a majority of this epoch's voters (quorums
        // intersect). Values accepted under earlier epochs belong to sealed registers; where
        // none of this epoch shows, the register still holds its starting value, the seal that
        // opened the epoch (or a later value known chosen).
        let epoch = mine.epoch;
        let current = promises
            .values()
            .filter(|(b, _)| b.epoch == epoch)
            .max_by(|a, b| a.0.cmp(&b.0))
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| self.base.clone());
        let seq = op.seq.unwrap_or_else(|| {
            let last = current.applied.get(&self.id).copied().unwrap_or(0);
            last.max(self.counter) + 1
        });
        let applied = if current.epoch > epoch {
            // Sealed: this epoch's register never changes again.
            None
        } else {
            Some(current.apply_once(&op.change, &op.rules, &self.id, seq))
        };
        let (value, result) = match applied {
            None => (current.clone(), Meaning::Moved),
            Some(Ok(Applied::Next(next))) => (next, Meaning::Applied),
            // Write back what we read, so that the earlier commit is surely chosen.
            Some(Ok(Applied::Already)) => (current.clone(), Meaning::Already),
            Some(Err(e)) => (current.clone(), Meaning::Rejected(e)),
        };
        // Once a value that differs from what was read has gone out, giving up leaves the
        // outcome unknown (a read, a no-op or a rejection only writes back what it read).
        if value != current {
            op.sent_change = true;
            op.seq = Some(seq);
        }
        let ballot = mine.clone();
        op.phase = Phase::Accepting {
            ballot: ballot.clone(),
            value: value.clone(),
            result,
            oks: BTreeSet::new(),
        };
        op.wake_at = now + self.cfg.phase_timeout;
        for a in &self.acceptors {
            out.push(Action::Send(
                a.clone(),
                Msg::Accept {
                    ballot: ballot.clone(),
                    value: value.clone(),
                },
            ));
        }
    }

    /// A majority accepted: the value is chosen; say what it means for the change.
    fn chosen(&mut self, now: u64, out: &mut Vec<Action>) {
        let Some(op) = self.op.as_mut() else { return };
        let Phase::Accepting {
            ballot: mine,
            value,
            result,
            ..
        } = &op.phase
        else {
            return;
        };
        let outcome = match result {
            Meaning::Moved => {
                let sealed = value.clone();
                op.phase = Phase::Backoff;
                op.wake_at = now;
                out.push(Action::Moved(sealed));
                return;
            }
            Meaning::Applied => Outcome::Committed(value.clone()),
            Meaning::Already => Outcome::AlreadyCommitted(value.clone()),
            Meaning::Rejected(e) => Outcome::Rejected(e.clone(), value.clone()),
        };
        self.committed_at = Some(mine.clone());
        self.finish(outcome, out);
    }
}
