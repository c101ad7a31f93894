//! What changed from one agreed pool to the next, for the event log.

use super::{BackendId, BackendState, NodeId, Pool};

/// What changed from one agreed pool to the next, for the event log.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PoolDiff {
    /// One readable line per change ("added web-4", "web-2 draining", ...).
    pub changes: Vec<String>,
    /// Backends the cluster ejected, with the peers that voted them down.
    pub ejected: Vec<(BackendId, Vec<NodeId>)>,
    /// Backends the cluster restored.
    pub restored: Vec<BackendId>,
    /// The peer whose proposal made the new pool, when one did.
    pub through: Option<NodeId>,
    /// The voters, when they changed.
    pub voters: Option<Vec<NodeId>>,
}

impl PoolDiff {
    pub fn between(old: &Pool, new: &Pool) -> PoolDiff {
        let mut d = PoolDiff::default();
        for (id, b) in &new.backends {
            let Some(o) = old.backends.get(id) else {
                d.changes
                    .push(format!("added {id} ({}, weight {})", b.addr, b.weight));
                continue;
            };
            if o.weight != b.weight {
                d.changes
                    .push(format!("{id} weight {} -> {}", o.weight, b.weight));
            }
            for p in b.down_votes.difference(&o.down_votes) {
                d.changes.push(format!("{p} votes {id} down"));
            }
            for p in o.down_votes.difference(&b.down_votes) {
                d.changes.push(format!("{p} votes {id} up"));
            }
            if o.state != b.state {
                d.changes.push(format!("{id} {}", b.state.as_str()));
                match (o.state, b.state) {
                    (_, BackendState::Ejected) => d
                        .ejected
                        .push((id.clone(), b.down_votes.iter().cloned().collect())),
                    (BackendState::Ejected, _) => d.restored.push(id.clone()),
                    _ => {}
                }
            }
        }
        for id in old.backends.keys() {
            if !new.backends.contains_key(id) {
                d.changes.push(format!("removed {id}"));
            }
        }
        if old.learners != new.learners {
            let names: Vec<&str> = new.learners.iter().map(|n| n.as_str()).collect();
            d.changes
                .push(format!("recorded learners {}", names.join(", ")));
        }
        if old.voters != new.voters {
            let v: Vec<NodeId> = new.voters.iter().cloned().collect();
            let names: Vec<&str> = v.iter().map(|n| n.as_str()).collect();
            d.changes.push(format!("voters {}", names.join(", ")));
            d.voters = Some(v);
        }
        let moved: Vec<&NodeId> = new
            .applied
            .iter()
            .filter(|(p, seq)| old.applied.get(*p) != Some(*seq))
            .map(|(p, _)| p)
            .collect();
        d.through = match (&new.through, &moved[..]) {
            (Some(p), _) => Some(p.clone()),
            // A pool written without `through`: the one proposer whose tag moved.
            (None, [one]) => Some((*one).clone()),
            (None, _) => None,
        };
        d
    }
}
