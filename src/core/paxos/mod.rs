//! CASPaxos on one register, the pool (Rystsov, "CASPaxos: Replicated State Machines without
//! logs", 2018), as sans-IO state machines.
//!
//! Every peer is both an acceptor and a proposer; the acceptors are the static peer list. A change
//! is a function of the current pool: the proposer prepares a ballot, takes the value with the
//! highest accepted ballot from a majority of promises, applies the change, and has a majority
//! accept the result. A read is the identity change run as a full round, so it writes back what it
//! read (reads without write-back are a known linearizability trap).
//!
//! Nothing here does I/O: acceptors return what to persist and what to reply, and the driver must
//! make the persisted state durable before the reply leaves; proposers return messages, counter
//! reservations to persist (again before the messages leave), and outcomes.

mod acceptor;
mod proposer;

pub use acceptor::{Acceptor, AcceptorState};
pub use proposer::{Action, Outcome, Proposer, ProposerConfig};

use std::cmp::Ordering;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::pool::{NodeId, Pool};

/// A ballot: (counter, proposer id), ordered by counter, then id. Unique per proposer attempt:
/// a proposer never reuses a counter, across restarts too (it persists a reservation).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub struct Ballot {
    pub counter: u64,
    pub node: NodeId,
}

impl Ballot {
    /// The ballot below every real one (counter 0 is never used by a proposer).
    pub fn zero() -> Self {
        Self::default()
    }
    pub fn new(counter: u64, node: NodeId) -> Self {
        Self { counter, node }
    }
}

impl Ord for Ballot {
    fn cmp(&self, o: &Self) -> Ordering {
        self.counter
            .cmp(&o.counter)
            .then_with(|| self.node.cmp(&o.node))
    }
}

impl PartialOrd for Ballot {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

impl fmt::Display for Ballot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.counter, self.node)
    }
}

/// Messages between proposers and acceptors, and learn pushes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Msg {
    /// Phase 1a.
    Prepare { ballot: Ballot },
    /// Phase 1b: the acceptor promised `ballot`; it last accepted `value` under `accepted`.
    Promise {
        ballot: Ballot,
        accepted: Ballot,
        value: Pool,
    },
    /// Phase 2a.
    Accept { ballot: Ballot, value: Pool },
    /// Phase 2b.
    Accepted { ballot: Ballot },
    /// The acceptor refused `ballot`: it has seen `seen`, which is at least as high.
    Conflict { ballot: Ballot, seen: Ballot },
    /// A committed pool, pushed to every peer after a commit.
    Learn { pool: Pool },
}

/// What a node keeps on disk: the acceptor state and the proposer's counter reservation.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Durable {
    pub acceptor: AcceptorState,
    /// The proposer never uses a counter at or below this after a restart.
    pub counter_reserved: u64,
}

#[cfg(test)]
mod tests;
