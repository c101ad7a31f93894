//! What changed from one agreed pool to the next, for the event log.

use std::collections::BTreeMap;

use super::{Backend, BackendId, BackendState, NodeId, Pool};

/// What changed from one agreed pool to the next, for the event log.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PoolDiff {
    /// One readable line per change ("added web-4", "web-2 draining", ...).
    pub changes: Vec<String>,
    /// Backends the cluster ejected (service, id), with the peers that voted them down.
    pub ejected: Vec<(String, BackendId, Vec<NodeId>)>,
    /// Backends the cluster restored (service, id).
    pub restored: Vec<(String, BackendId)>,
    /// The peer whose proposal made the new pool, when one did.
    pub through: Option<NodeId>,
    /// The voters, when they changed.
    pub voters: Option<Vec<NodeId>>,
}

impl PoolDiff {
    pub fn between(old: &Pool, new: &Pool) -> PoolDiff {
        let mut d = PoolDiff::default();
        d.backends(super::DEFAULT_SERVICE, &old.backends, &new.backends);
        for (name, s) in &new.services {
            match old.services.get(name) {
                None => d.changes.push(format!("service {name} added")),
                Some(o) if o.def != s.def => d.changes.push(format!("service {name} redefined")),
                Some(_) => {}
            }
            let none = Default::default();
            let before = old.services.get(name).map_or(&none, |o| &o.backends);
            d.backends(name, before, &s.backends);
        }
        for name in old.services.keys() {
            if !new.services.contains_key(name) {
                d.changes.push(format!("service {name} removed"));
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

    /// The changes of one service's backends (named unless it is `default`).
    fn backends(
        &mut self,
        service: &str,
        old: &BTreeMap<BackendId, Backend>,
        new: &BTreeMap<BackendId, Backend>,
    ) {
        let at = super::service_prefix(service);
        for (id, b) in new {
            let Some(o) = old.get(id) else {
                self.changes
                    .push(format!("{at}added {id} ({}, weight {})", b.addr, b.weight));
                continue;
            };
            if o.weight != b.weight {
                self.changes
                    .push(format!("{at}{id} weight {} -> {}", o.weight, b.weight));
            }
            for p in b.down_votes.difference(&o.down_votes) {
                self.changes.push(format!("{at}{p} votes {id} down"));
            }
            for p in o.down_votes.difference(&b.down_votes) {
                self.changes.push(format!("{at}{p} votes {id} up"));
            }
            if o.state != b.state {
                self.changes.push(format!("{at}{id} {}", b.state.as_str()));
                match (o.state, b.state) {
                    (_, BackendState::Ejected) => self.ejected.push((
                        service.to_string(),
                        id.clone(),
                        b.down_votes.iter().cloned().collect(),
                    )),
                    (BackendState::Ejected, _) => {
                        self.restored.push((service.to_string(), id.clone()))
                    }
                    _ => {}
                }
            }
        }
        for id in old.keys() {
            if !new.contains_key(id) {
                self.changes.push(format!("{at}removed {id}"));
            }
        }
    }
}
