//! An offline linearizability checker for the pool register (Wing & Gong's search with Lowe's
//! memoization of (linearized set, state)).
//!
//! Each operation is a pool change with its invocation and response times and what the client
//! saw. Completed operations must all be placed, each between its invocation and response, in an
//! order where applying the changes one by one to the model gives exactly what each saw. An
//! operation whose outcome is unknown may be placed anywhere after its invocation, or not at all.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashSet;
use std::hash::{Hash, Hasher};

use crate::core::pool::{ChangeError, Pool, PoolChange, Rules};

/// What the client saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seen {
    Committed(Pool),
    Rejected(ChangeError, Pool),
    /// Committed, as an earlier attempt found later; the pool returned is a later one.
    Happened,
    /// No answer, or an answer that says it may or may not have happened.
    Unknown,
}

#[derive(Clone, Debug)]
pub struct Operation {
    pub client: usize,
    pub change: PoolChange,
    pub invoke: u64,
    /// `u64::MAX` when the outcome is unknown.
    pub response: u64,
    pub seen: Seen,
}

/// Why a history is not linearizable.
#[derive(Debug)]
pub struct NotLinearizable {
    /// The longest prefix order found, as indexes into the history.
    pub best_prefix: Vec<usize>,
}

/// Why a history was not found linearizable.
#[derive(Debug)]
pub enum CheckError {
    NotLinearizable(NotLinearizable),
    /// The search ran out of its budget before deciding: that is not a pass.
    Undecided {
        steps: u64,
    },
}

/// Check `history` from the empty pool under `rules`, within `budget` search steps. A history
/// the search cannot decide within its budget fails (the simulation sizes its histories so
/// that this does not happen).
pub fn check(history: &[Operation], rules: &Rules, budget: u64) -> Result<(), CheckError> {
    let mut s = Search {
        ops: history,
        rules,
        memo: HashSet::new(),
        done: vec![false; history.len()],
        order: Vec::new(),
        best: Vec::new(),
        steps: 0,
        budget,
    };
    if s.search(&Pool::default()) {
        Ok(())
    } else if s.steps >= budget {
        Err(CheckError::Undecided { steps: s.steps })
    } else {
        Err(CheckError::NotLinearizable(NotLinearizable {
            best_prefix: s.best,
        }))
    }
}

/// The register's value as clients see it: the version, every service's definition and
/// backends, and the membership. (`applied`, the proposers' retry tags, is bookkeeping the model
/// does not keep.)
fn same(a: &Pool, b: &Pool) -> bool {
    a.version == b.version
        && a.backends == b.backends
        && a.services == b.services
        && a.voters == b.voters
        && a.epoch == b.epoch
        && a.cluster_id == b.cluster_id
}

struct Search<'a> {
    ops: &'a [Operation],
    rules: &'a Rules,
    memo: HashSet<(Vec<u64>, u64)>,
    done: Vec<bool>,
    order: Vec<usize>,
    best: Vec<usize>,
    steps: u64,
    budget: u64,
}

impl Search<'_> {
    fn key(&self, state: &Pool) -> (Vec<u64>, u64) {
        let mut bits = vec![0u64; self.done.len().div_ceil(64)];
        for (i, d) in self.done.iter().enumerate() {
            if *d {
                bits[i / 64] |= 1 << (i % 64);
            }
        }
        let mut h = DefaultHasher::new();
        state.hash(&mut h);
        (bits, h.finish())
    }

    fn search(&mut self, state: &Pool) -> bool {
        self.steps += 1;
        if self.steps >= self.budget {
            return false;
        }
        if self.order.len() > self.best.len() {
            self.best = self.order.clone();
        }
        // Every completed operation placed: done (unknown ones may stay out).
        let pending_completed = self
            .ops
            .iter()
            .enumerate()
            .filter(|(i, o)| !self.done[*i] && o.seen != Seen::Unknown);
        let earliest_response = pending_completed.map(|(_, o)| o.response).min();
        let Some(earliest_response) = earliest_response else {
            return true;
        };
        // An operation may go next only if it was invoked before every pending completed
        // operation's response (else that one must come first).
        for i in 0..self.ops.len() {
            if self.done[i] || self.ops[i].invoke > earliest_response {
                continue;
            }
            let op = &self.ops[i];
            let next = match (state.apply(&op.change, self.rules), &op.seen) {
                (Ok(next), Seen::Committed(p)) if same(&next, p) => next,
                (Err(e), Seen::Rejected(err, p)) if e == *err && same(state, p) => state.clone(),
                (Ok(next), Seen::Unknown | Seen::Happened) => next,
                (Err(_), Seen::Unknown) => state.clone(),
                _ => continue,
            };
            self.done[i] = true;
            self.order.push(i);
            let key = self.key(&next);
            if self.memo.insert(key) && self.search(&next) {
                return true;
            }
            self.order.pop();
            self.done[i] = false;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::pool::{Backend, BackendId};

    fn add(id: &str) -> PoolChange {
        PoolChange::AddBackend {
            backend: Backend::new(id, format!("{id}:80"), 1),
        }
    }

    fn rules() -> Rules {
        Rules::default()
    }

    #[test]
    fn accepts_a_sequential_history_and_rejects_a_lost_write() {
        let p1 = Pool::default().apply(&add("x"), &rules()).unwrap();
        let ok = vec![
            Operation {
                client: 0,
                change: add("x"),
                invoke: 0,
                response: 10,
                seen: Seen::Committed(p1.clone()),
            },
            Operation {
                client: 1,
                change: PoolChange::Read,
                invoke: 20,
                response: 30,
                seen: Seen::Committed(p1.clone()),
            },
        ];
        assert!(check(&ok, &rules(), 1_000_000).is_ok());
        // The read after the commit sees the empty pool: the write was lost.
        let lost = vec![
            Operation {
                client: 0,
                change: add("x"),
                invoke: 0,
                response: 10,
                seen: Seen::Committed(p1),
            },
            Operation {
                client: 1,
                change: PoolChange::Read,
                invoke: 20,
                response: 30,
                seen: Seen::Committed(Pool::default()),
            },
        ];
        assert!(check(&lost, &rules(), 1_000_000).is_err());
    }

    #[test]
    fn concurrent_and_unknown_operations() {
        let px = Pool::default().apply(&add("x"), &rules()).unwrap();
        let pxy = px.apply(&add("y"), &rules()).unwrap();
        // Overlapping: y's result includes x, so x goes first though it answered later.
        let h = vec![
            Operation {
                client: 0,
                change: add("x"),
                invoke: 0,
                response: 50,
                seen: Seen::Committed(px.clone()),
            },
            Operation {
                client: 1,
                change: add("y"),
                invoke: 5,
                response: 40,
                seen: Seen::Committed(pxy.clone()),
            },
        ];
        assert!(check(&h, &rules(), 1_000_000).is_ok());
        // An unknown add that a later read shows did happen.
        let h = vec![
            Operation {
                client: 0,
                change: add("x"),
                invoke: 0,
                response: u64::MAX,
                seen: Seen::Unknown,
            },
            Operation {
                client: 1,
                change: PoolChange::Read,
                invoke: 100,
                response: 110,
                seen: Seen::Committed(px.clone()),
            },
            Operation {
                client: 1,
                change: PoolChange::RemoveBackend {
                    id: BackendId::new("x"),
                },
                invoke: 120,
                response: 130,
                seen: Seen::Committed(
                    px.apply(
                        &PoolChange::RemoveBackend {
                            id: BackendId::new("x"),
                        },
                        &rules(),
                    )
                    .unwrap(),
                ),
            },
        ];
        assert!(check(&h, &rules(), 1_000_000).is_ok());
        // ...or did not.
        let h = vec![
            Operation {
                client: 0,
                change: add("x"),
                invoke: 0,
                response: u64::MAX,
                seen: Seen::Unknown,
            },
            Operation {
                client: 1,
                change: PoolChange::Read,
                invoke: 100,
                response: 110,
                seen: Seen::Committed(Pool::default()),
            },
        ];
        assert!(check(&h, &rules(), 1_000_000).is_ok());
    }
}
