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
mod node;
mod proposer;

pub use acceptor::{Acceptor, AcceptorState};
pub use node::{Consensus, Effects, Node, Ready, Write};
pub use proposer::{Action, Outcome, Proposer, ProposerConfig};

use std::cmp::Ordering;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::pool::{NodeId, Pool};

/// A ballot: (membership epoch, counter, proposer id, incarnation), ordered in that order.
/// Unique per proposer attempt: a proposer never reuses a counter, across restarts too (it
/// persists a reservation), and a node that lost its disk starts a new incarnation, so it cannot
/// reuse a ballot of its earlier life either. The epoch says which membership's register the
/// ballot belongs to (see `node`): an acceptor that has seen a ballot of a later epoch refuses
/// every ballot of an earlier one.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub struct Ballot {
    #[serde(default, skip_serializing_if = "is_zero")]
    pub epoch: u64,
    pub counter: u64,
    pub node: NodeId,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub incarnation: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Ballot {
    /// The ballot below every real one (counter 0 is never used by a proposer).
    pub fn zero() -> Self {
        Self::default()
    }
    pub fn new(counter: u64, node: NodeId) -> Self {
        Self {
            epoch: 0,
            counter,
            node,
            incarnation: 0,
        }
    }
}

impl Ord for Ballot {
    fn cmp(&self, o: &Self) -> Ordering {
        self.epoch
            .cmp(&o.epoch)
            .then_with(|| self.counter.cmp(&o.counter))
            .then_with(|| self.node.cmp(&o.node))
            .then_with(|| self.incarnation.cmp(&o.incarnation))
    }
}

impl PartialOrd for Ballot {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

impl fmt::Display for Ballot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}.{}", self.epoch, self.counter, self.node)
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
    /// The acceptor does not vote yet: it started without its state (a lost or new disk) and
    /// has not caught up. `formed`: it knows of a formed cluster (it learned a pool).
    NotVoting { ballot: Ballot, formed: bool },
    /// A committed pool, pushed to every peer after a commit.
    Learn { pool: Pool },
    /// Asks for the latest pool the receiver learned (answered with `Learn`): how a learner
    /// catches up without running Paxos rounds.
    Fetch,
}

/// What a node keeps on disk: the acceptor state, the proposer's counter reservation, and
/// whether this acceptor may vote (false while a node that started without state catches up).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Durable {
    pub acceptor: AcceptorState,
    /// The proposer never uses a counter at or below this after a restart.
    pub counter_reserved: u64,
    /// This acceptor answers prepares and accepts (state written before this field existed
    /// belongs to a voter).
    #[serde(default = "yes")]
    pub voting: bool,
    /// Distinguishes this node's ballots from those of an earlier life that lost its disk.
    #[serde(default)]
    pub incarnation: u64,
}

fn yes() -> bool {
    true
}

/// Why `--force-new-cluster` cannot run.
#[derive(Debug, thiserror::Error)]
#[error("this peer knows no pool to recover from (its data_dir holds no agreed state)")]
pub struct NothingToRecover;

impl Durable {
    /// `--force-new-cluster`: the last resort when a majority of voters lost their disks. From
    /// this node's own last state (the newer of what its acceptor holds and what it learned), a
    /// new membership epoch with this node as the only voter, one version up, accepted under a
    /// ballot above every one this node has seen, under a new cluster id (`cluster_id`, minted
    /// by the caller): the old majority's peers, should they heal, are refused as another
    /// cluster rather than merged by version.
    pub fn force_new_cluster(
        &self,
        me: &NodeId,
        learned: &Pool,
        cluster_id: String,
    ) -> Result<(Durable, Pool), NothingToRecover> {
        let held = &self.acceptor.value;
        let last = if held.version >= learned.version {
            held
        } else {
            learned
        };
        if !last.exists() {
            return Err(NothingToRecover);
        }
        let mut pool = last.clone();
        pool.voters = [me.clone()].into_iter().collect();
        pool.epoch += 1;
        pool.version += 1;
        pool.through = Some(me.clone());
        pool.cluster_id = cluster_id;
        let counter = self
            .counter_reserved
            .max(self.acceptor.promised.counter)
            .max(self.acceptor.accepted.counter)
            + 1;
        // The new epoch's first ballot: above every ballot of the epochs before.
        let ballot = Ballot {
            epoch: pool.epoch.max(self.acceptor.promised.epoch + 1),
            counter,
            node: me.clone(),
            incarnation: self.incarnation,
        };
        pool.epoch = ballot.epoch;
        let durable = Durable {
            acceptor: AcceptorState {
                promised: ballot.clone(),
                accepted: ballot,
                value: pool.clone(),
            },
            counter_reserved: counter,
            voting: true,
            incarnation: self.incarnation,
        };
        Ok((durable, pool))
    }
}

impl Default for Durable {
    fn default() -> Self {
        Self {
            acceptor: AcceptorState::default(),
            counter_reserved: 0,
            voting: true,
            incarnation: 0,
        }
    }
}

#[cfg(test)]
mod tests;
