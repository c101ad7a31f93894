//! The acceptor: promises and accepts ballots; its state must be durable before it replies.

use serde::{Deserialize, Serialize};

use super::{Ballot, Msg};
use crate::core::pool::Pool;

/// `promised`, `accepted` and `value`: everything an acceptor knows.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct AcceptorState {
    pub promised: Ballot,
    pub accepted: Ballot,
    pub value: Pool,
}

/// An acceptor. `handle` returns the reply and whether the state changed; when it did, the
/// driver must persist `state()` (and fsync) before sending the reply.
#[derive(Clone, Debug, Default)]
pub struct Acceptor {
    state: AcceptorState,
}

impl Acceptor {
    pub fn new(state: AcceptorState) -> Self {
        Self { state }
    }

    pub fn state(&self) -> &AcceptorState {
        &self.state
    }

    /// Promise at least `b` (a node that caught up after losing its state refuses every ballot
    /// up to the one it caught up with).
    pub fn promise_at_least(&mut self, b: &Ballot) {
        if *b > self.state.promised {
            self.state.promised = b.clone();
        }
    }

    /// Hold `value` as accepted under `ballot`, a round this node's proposer had accepted by
    /// others and committed while its own acceptor took no part (a catch-up): as if its Accept
    /// had reached this acceptor too. Nothing changes if the acceptor holds a later ballot.
    pub fn adopt(&mut self, ballot: &Ballot, value: &Pool) {
        if *ballot > self.state.accepted && *ballot >= self.state.promised {
            self.state.accepted = ballot.clone();
            self.state.value = value.clone();
            self.state.promised = ballot.clone();
        }
    }

    /// The highest ballot this acceptor has seen (what a conflict reports).
    fn seen(&self) -> Ballot {
        self.state.promised.clone().max(self.state.accepted.clone())
    }

    /// Handle a Prepare or Accept. Returns `(changed, reply)`; other messages get no reply.
    pub fn handle(&mut self, msg: &Msg) -> Option<(bool, Msg)> {
        match msg {
            Msg::Prepare { ballot } => Some(self.on_prepare(ballot)),
            Msg::Accept { ballot, value } => Some(self.on_accept(ballot, value)),
            _ => None,
        }
    }

    /// Phase 1b. A ballot must be strictly above both the promise and the accepted ballot (as
    /// in the TLA+ spec): a duplicate Prepare then costs only liveness, never safety. The reply
    /// carries the accepted value so the proposer can continue from the latest one.
    fn on_prepare(&mut self, b: &Ballot) -> (bool, Msg) {
        if *b <= self.state.promised || *b <= self.state.accepted {
            return (
                false,
                Msg::Conflict {
                    ballot: b.clone(),
                    seen: self.seen(),
                },
            );
        }
        self.state.promised = b.clone();
        (
            true,
            Msg::Promise {
                ballot: b.clone(),
                accepted: self.state.accepted.clone(),
                value: self.state.value.clone(),
            },
        )
    }

    /// Phase 2b. Refuse a ballot below the promise (a higher proposer has read since) or not
    /// above what was accepted (ballots are unique, so equal means a duplicate).
    fn on_accept(&mut self, b: &Ballot, value: &Pool) -> (bool, Msg) {
        if *b < self.state.promised || *b <= self.state.accepted {
            return (
                false,
                Msg::Conflict {
                    ballot: b.clone(),
                    seen: self.seen(),
                },
            );
        }
        // Promised never decreases: the accepted ballot is at least the promise here.
        if *b > self.state.promised {
            self.state.promised = b.clone();
        }
        self.state.accepted = b.clone();
        self.state.value = value.clone();
        (true, Msg::Accepted { ballot: b.clone() })
    }
}
