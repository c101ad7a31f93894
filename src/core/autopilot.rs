//! Autopilot (`[cluster.autopilot]`): keep the cluster at its number of voters by removing a
//! voter dead for `dead_after` and promoting the learner that has been alive and caught up
//! longest (at least `stabilization`). Pure: the driver hands in what its detector and the
//! learners' progress say, and proposes the step it gets back through its own `Node`, one at a
//! time.

use std::collections::{BTreeMap, BTreeSet};

use super::pool::{NodeId, PoolChange};

/// `[cluster.autopilot]`, in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// The number of voters to keep.
    pub voters: usize,
    pub dead_after_ms: u64,
    pub stabilization_ms: u64,
}

/// A learner that could be promoted: alive, caught up, dialable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ready {
    pub id: NodeId,
    /// Its cluster address (`cluster.advertise`).
    pub addr: String,
    /// Since when it has been alive and caught up without a break (ms, the driver's clock).
    pub since: u64,
}

/// What this peer sees of the membership now.
#[derive(Clone, Debug, Default)]
pub struct View {
    pub me: NodeId,
    /// The agreed voters.
    pub voters: BTreeSet<NodeId>,
    /// Voters this peer's detector declares dead, with since when (ms).
    pub dead_since: BTreeMap<NodeId, u64>,
    /// Voters it sees alive (not suspect, not dead); itself included when it votes.
    pub alive: BTreeSet<NodeId>,
    pub learners: Vec<Ready>,
    pub now: u64,
}

/// One membership change and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    Remove {
        id: NodeId,
        why: String,
    },
    Promote {
        id: NodeId,
        addr: String,
        why: String,
    },
}

impl Step {
    /// The change that makes this step, carrying its reason.
    pub fn into_change(self) -> PoolChange {
        let (change, why) = match self {
            Step::Remove { id, why } => (PoolChange::RemovePeer { id }, why),
            Step::Promote { id, addr, why } => (
                PoolChange::AddPeer {
                    id,
                    addr,
                    learner: false,
                },
                why,
            ),
        };
        PoolChange::Autopilot {
            change: Box::new(change),
            why,
        }
    }
}

/// The next step, if any. Only the live voter with the lowest id acts (the others would propose
/// the same change, refused once one lands); nothing happens without a majority of the current
/// voters alive, or where the step would leave fewer than a majority of the new voters alive.
/// Dead voters go first (the one dead longest), then, below `voters`, the learner ready longest.
pub fn decide(v: &View, s: &Settings) -> Option<Step> {
    let alive = v.voters.iter().filter(|id| v.alive.contains(*id)).count();
    let majority = |n: usize| n / 2 + 1;
    if !v.voters.contains(&v.me) || !v.alive.contains(&v.me) || alive < majority(v.voters.len()) {
        return None;
    }
    if v.voters.iter().find(|id| v.alive.contains(*id)) != Some(&v.me) {
        return None;
    }
    let dead = v
        .dead_since
        .iter()
        .filter(|(id, since)| {
            v.voters.contains(*id)
                && **id != v.me
                && v.now.saturating_sub(**since) >= s.dead_after_ms
        })
        .min_by_key(|(id, since)| (**since, (*id).clone()));
    if let Some((id, since)) = dead {
        let secs = v.now.saturating_sub(*since) / 1_000;
        return Some(Step::Remove {
            id: id.clone(),
            why: format!(
                "voter {id} dead for {secs}s (autopilot.dead_after {}s)",
                s.dead_after_ms / 1_000
            ),
        });
    }
    if v.voters.len() >= s.voters || alive + 1 < majority(v.voters.len() + 1) {
        return None;
    }
    let ready = v
        .learners
        .iter()
        .filter(|l| {
            !v.voters.contains(&l.id) && v.now.saturating_sub(l.since) >= s.stabilization_ms
        })
        .min_by_key(|l| (l.since, l.id.clone()))?;
    let secs = v.now.saturating_sub(ready.since) / 1_000;
    Some(Step::Promote {
        id: ready.id.clone(),
        addr: ready.addr.clone(),
        why: format!(
            "{} voters of {} wanted; learner {} alive and caught up for {secs}s",
            v.voters.len(),
            s.voters,
            ready.id
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Settings = Settings {
        voters: 3,
        dead_after_ms: 300_000,
        stabilization_ms: 10_000,
    };

    fn ids(s: &[&str]) -> BTreeSet<NodeId> {
        s.iter().map(|i| NodeId::new(*i)).collect()
    }

    fn view(voters: &[&str], alive: &[&str]) -> View {
        View {
            me: NodeId::new("a"),
            voters: ids(voters),
            alive: ids(alive),
            now: 1_000_000,
            ..View::default()
        }
    }

    fn learner(id: &str, since: u64) -> Ready {
        Ready {
            id: NodeId::new(id),
            addr: format!("127.0.0.1:7{id}"),
            since,
        }
    }

    #[test]
    fn a_voter_dead_long_enough_goes_then_the_learner_ready_longest_comes_in() {
        let mut v = view(&["a", "b", "c"], &["a", "b"]);
        v.dead_since.insert(NodeId::new("c"), v.now - 299_000);
        v.learners = vec![learner("d", 0), learner("e", 500_000)];
        // Dead, but not for dead_after yet: nothing (the voters are at their number).
        assert_eq!(decide(&v, &S), None);
        v.dead_since.insert(NodeId::new("c"), v.now - 300_000);
        assert!(matches!(decide(&v, &S), Some(Step::Remove { id, .. }) if id.as_str() == "c"));
        // Removed: two voters, both alive; d has been ready longest.
        let mut v2 = view(&["a", "b"], &["a", "b"]);
        v2.learners = v.learners.clone();
        match decide(&v2, &S) {
            Some(Step::Promote { id, addr, why }) => {
                assert_eq!((id.as_str(), addr.as_str()), ("d", "127.0.0.1:7d"));
                assert!(why.contains("learner d"), "{why}");
            }
            other => panic!("{other:?}"),
        }
        // At three voters: nothing more.
        let mut v3 = view(&["a", "b", "d"], &["a", "b", "d"]);
        v3.learners = vec![learner("e", 0)];
        assert_eq!(decide(&v3, &S), None);
    }

    #[test]
    fn a_learner_not_stable_long_enough_waits() {
        let mut v = view(&["a", "b"], &["a", "b"]);
        v.learners = vec![learner("d", v.now - 9_999)];
        assert_eq!(decide(&v, &S), None);
        v.learners = vec![learner("d", v.now - 10_000)];
        assert!(matches!(decide(&v, &S), Some(Step::Promote { .. })));
    }

    #[test]
    fn never_without_a_majority_alive_and_only_the_lowest_live_voter_acts() {
        // Five voters, three dead for long: two alive are no majority.
        let mut v = view(&["a", "b", "c", "d", "e"], &["a", "b"]);
        for d in ["c", "d", "e"] {
            v.dead_since.insert(NodeId::new(d), 0);
        }
        assert_eq!(decide(&v, &S), None);
        // Two dead: the one dead longest goes first.
        v.alive = ids(&["a", "b", "c"]);
        v.dead_since.remove(&NodeId::new("c"));
        v.dead_since.insert(NodeId::new("e"), 5);
        let five = Settings { voters: 5, ..S };
        assert!(matches!(decide(&v, &five), Some(Step::Remove { id, .. }) if id.as_str() == "d"));
        // b does not act while a is alive; it does once a is not.
        v.me = NodeId::new("b");
        assert_eq!(decide(&v, &five), None);
        v.alive = ids(&["b", "c"]);
        v.voters = ids(&["a", "b", "c"]);
        v.dead_since = [(NodeId::new("a"), 0)].into_iter().collect();
        assert!(matches!(decide(&v, &five), Some(Step::Remove { id, .. }) if id.as_str() == "a"));
        // A learner is never this peer's to decide about.
        let mut l = view(&["b", "c"], &["b", "c"]);
        assert_eq!(decide(&l, &S), None);
        l.me = NodeId::new("b");
        l.learners = vec![learner("z", 0)];
        assert!(matches!(decide(&l, &S), Some(Step::Promote { .. })));
    }
}
