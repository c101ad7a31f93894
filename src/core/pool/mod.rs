//! The agreed backend pool: its types, the typed changes peers agree on, and `apply`.
//!
//! The pool is the single CASPaxos register. Changes are functions of the current pool (not whole
//! new lists), so concurrent changes to different backends commute; each change either returns a
//! new pool (version + 1 when anything changed) or says why its precondition failed and changes
//! nothing. Everything is ordered (`BTreeMap`, `BTreeSet`), so equal pools serialize equal and
//! hash equal on every peer.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

mod backend;
mod change;
mod diff;
mod ids;
mod membership;
mod service;
mod sightings;

pub use backend::*;
pub use change::*;
pub use diff::*;
pub use ids::*;
pub use service::*;
pub use sightings::*;

/// The register value. Version 0 with no backends means "no pool agreed yet".
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Pool {
    pub version: u64,
    pub backends: BTreeMap<BackendId, Backend>,
    /// Per proposer, the sequence number of the last change it applied: a proposer that retries
    /// a change after an unanswered accept finds it here instead of applying it twice.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub applied: BTreeMap<NodeId, u64>,
    /// Per proposer in `applied`, the version its last change made: which entries are oldest
    /// when `applied` is trimmed to `MAX_APPLIED` (learners come and go, each with an id).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub applied_at: BTreeMap<NodeId, u64>,
    /// The cluster's id, made when it formed (empty in a pool written without one).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cluster_id: String,
    /// The agreed voters: quorums are counted among them (empty in a pool written
    /// without an agreed membership: then each peer's configured list).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub voters: BTreeSet<NodeId>,
    /// The membership epoch: rises with every change of the voters.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub epoch: u64,
    /// Discovered addresses with the peers that see them (their discovery votes).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sightings: BTreeMap<BackendId, Sighting>,
    /// The cluster addresses of members added through the membership API (voters of the first
    /// membership are found through each peer's `cluster.peers`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub addrs: BTreeMap<NodeId, String>,
    /// Learners recorded in the membership (`peers add --learner`). Learners need no record to
    /// join; a recorded one is listed and pushed to by address.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub learners: BTreeSet<NodeId>,
    /// The peer whose change made this version (none in a pool written without it):
    /// a peer that learns several versions at once still names who made the last one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub through: Option<NodeId>,
    /// The services besides `default` (whose backends are `backends` above), by name. Shared:
    /// a pool is cloned at every step of a round, and a change touches one service at most.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub services: BTreeMap<String, std::sync::Arc<Service>>,
    /// Why the last membership change was made, when autopilot made it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub membership_note: Option<String>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// `b` is active now and was not (or did not exist) in `before`.
fn became_usable(before: &BTreeMap<BackendId, Backend>, b: &Backend) -> bool {
    b.state == BackendState::Active
        && before
            .get(&b.id)
            .is_none_or(|old| old.state != BackendState::Active)
}

fn stamp(
    before: &BTreeMap<BackendId, Backend>,
    after: &mut BTreeMap<BackendId, Backend>,
    now: u64,
) {
    for b in after.values_mut() {
        if became_usable(before, b) {
            b.usable_since = now;
        }
    }
}

/// The pool holds at most this many backends, so that the register (with its votes) always fits
/// in one peer frame with room to spare: a full pool can never wedge the cluster.
pub const MAX_BACKENDS: usize = 10_000;
/// The pool's encoded size is capped well below the 16 MiB peer frame (a Promise or an Accept
/// carries one pool): a change that would pass it is refused, so that replication never stalls
/// on a frame every receiver drops. Counts alone cannot bound it (votes and sightings add up).
pub const MAX_POOL_BYTES: usize = 12 * 1024 * 1024;
/// Pools with fewer entries than this are far below `MAX_POOL_BYTES` (every field is bounded:
/// ids 64 bytes, addresses 270, peer ids 32): no need to measure them.
const MEASURE_FROM: usize = 2_000;
/// `applied` keeps at most this many proposers (the members always): the oldest others go.
/// A proposer retries one change for at most its deadline (seconds); this many other proposers
/// committing meanwhile is far beyond any cluster.
pub const MAX_APPLIED: usize = 1_024;

impl Pool {
    /// True once any pool has been agreed (seeded or changed).
    pub fn exists(&self) -> bool {
        self.version > 0
    }

    pub fn ejected_count(&self) -> usize {
        self.backends
            .values()
            .filter(|b| b.state == BackendState::Ejected)
            .count()
    }

    /// floor(max_ejected_percent * backends / 100): a lone backend is never ejected.
    pub fn ejection_cap(&self, rules: &Rules) -> usize {
        self.backends.len() * rules.max_ejected_percent as usize / 100
    }

    /// Apply `change` under `rules`. `Ok` holds the next pool (same version when nothing changed,
    /// e.g. a read or a repeated vote); `Err` says why the precondition failed.
    pub fn apply(&self, change: &PoolChange, rules: &Rules) -> Result<Pool, ChangeError> {
        let mut next = self.clone();
        match change {
            PoolChange::Read => return Ok(next),
            PoolChange::Fence { peer } => {
                if self.exists() && (self.voters.is_empty() || self.voters.contains(peer)) {
                    next.epoch += 1;
                    next.version += 1;
                }
                return Ok(next);
            }
            PoolChange::Seed {
                backends,
                cluster_id,
                voters,
                services,
            } => return self.seeded(backends, cluster_id, voters, services),
            PoolChange::AddBackend { backend } => next.add_backend(backend)?,
            PoolChange::RemoveBackend { id } => {
                if next.backends.remove(id).is_none() {
                    return Err(ChangeError::NotFound(id.clone()));
                }
            }
            PoolChange::SetWeight { id, weight } => {
                weight_ok(*weight)?;
                next.get_mut(id)?.weight = *weight;
            }
            PoolChange::SetState { id, draining } => {
                let b = next.get_mut(id)?;
                if *draining {
                    b.state = BackendState::Draining;
                } else if b.state == BackendState::Draining {
                    // Undrain; `settle` below may eject it at once if a majority sees it down.
                    b.state = BackendState::Active;
                }
            }
            // Only voters vote (learners come and go; they never eject or restore).
            PoolChange::VoteDown { peer, .. }
            | PoolChange::VoteUp { peer, .. }
            | PoolChange::Sightings { peer, .. }
                if !self.may_vote(peer) =>
            {
                return Ok(next)
            }
            PoolChange::VoteDown { id, peer } => {
                next.get_mut(id)?.down_votes.insert(peer.clone());
            }
            PoolChange::VoteUp { id, peer } => {
                next.get_mut(id)?.down_votes.remove(peer);
            }
            PoolChange::AddPeer { id, addr, learner } => next.add_peer(id, addr, *learner)?,
            PoolChange::RemovePeer { id } => next.remove_peer(id)?,
            PoolChange::Autopilot { change, why } => return self.autopiloted(change, why, rules),
            PoolChange::ExpireVotes { peer } => next.forget_votes(peer),
            PoolChange::Settle => {}
            PoolChange::Sightings {
                source,
                peer,
                weight,
                addrs,
                protocol,
            } => next.record_sightings(source, peer, *weight, addrs, *protocol)?,
            PoolChange::Service { service, change } => {
                next.apply_in_service(service, change, rules)?
            }
            PoolChange::PutService { name, def } => next.put_service(name, def)?,
            PoolChange::RemoveService { name } => next.remove_service(name)?,
            PoolChange::ApplyServices { services } => next.apply_services(services)?,
        }
        self.settled(next, change, rules)
    }

    /// `AddBackend`: a new backend, active, if its id and address are new and there is room.
    fn add_backend(&mut self, backend: &Backend) -> Result<(), ChangeError> {
        backend.check().map_err(ChangeError::Invalid)?;
        if self.backends.len() >= MAX_BACKENDS {
            return Err(ChangeError::Full);
        }
        if self.backends.contains_key(&backend.id) {
            return Err(ChangeError::Exists(backend.id.clone()));
        }
        if let Some(other) = self.backends.values().find(|b| b.addr == backend.addr) {
            return Err(ChangeError::AddrInUse(
                backend.addr.clone(),
                other.id.clone(),
            ));
        }
        let mut b = backend.clone();
        b.state = BackendState::Active;
        b.down_votes.clear();
        self.backends.insert(b.id.clone(), b);
        Ok(())
    }

    /// `Seed`: the cluster's first pool, its id and first voters, its services.
    fn seeded(
        &self,
        backends: &[Backend],
        cluster_id: &str,
        voters: &BTreeSet<NodeId>,
        services: &[ServiceSeed],
    ) -> Result<Pool, ChangeError> {
        if self.exists() {
            return Err(ChangeError::AlreadySeeded(self.version));
        }
        let mut next = self.clone();
        next.cluster_id = cluster_id.to_string();
        next.voters = voters.clone();
        // Forming seals the formation register (epoch 0): the cluster lives in epoch 1.
        next.epoch = self.epoch + u64::from(!voters.is_empty());
        if backends.len() > MAX_BACKENDS {
            return Err(ChangeError::Full);
        }
        for b in backends {
            b.check().map_err(ChangeError::Invalid)?;
            let mut b = b.clone();
            b.state = BackendState::Active;
            b.down_votes.clear();
            next.backends.insert(b.id.clone(), b);
        }
        next.apply_services(services)?;
        // Seeded backends start usable at their whole weight (no `usable_since`): a forming
        // cluster has no traffic to ramp into, as Envoy skips the hosts a cluster is created
        // with. Seeding always creates the pool, even an empty one.
        next.version = self.version + 1;
        Ok(next)
    }

    /// What follows every change that applied: ejections re-derived from the votes (among the
    /// agreed voters, or the rules' size where none are agreed), discovery settled, newly
    /// usable backends stamped, the size bound kept, and the version raised if anything changed.
    fn settled(
        &self,
        mut next: Pool,
        change: &PoolChange,
        rules: &Rules,
    ) -> Result<Pool, ChangeError> {
        let rules = &Rules {
            cluster_size: if next.voters.is_empty() {
                rules.cluster_size
            } else {
                next.voters.len()
            },
            ..*rules
        };
        next.settle_discovery(rules);
        next.settle(rules);
        // The other services' ejections follow a change of the voters, a dead peer's votes
        // going, and a re-settle (their own changes settle inside `apply_in_service`).
        let forget = match change {
            PoolChange::ExpireVotes { peer } | PoolChange::RemovePeer { id: peer } => Some(peer),
            _ => None,
        };
        if forget.is_some() || next.voters != self.voters || matches!(change, PoolChange::Settle) {
            next.settle_services(rules, forget);
        }
        if rules.now_unix_ms > 0 {
            next.stamp_usable(self, rules.now_unix_ms);
        }
        let entries = next.backends.len()
            + next.sightings.len()
            + next
                .services
                .values()
                .map(|s| 1 + s.backends.len() + s.sightings.len())
                .sum::<usize>();
        if entries >= MEASURE_FROM {
            let size = next.canonical_bytes().len();
            if size > MAX_POOL_BYTES && size > self.canonical_bytes().len() {
                return Err(ChangeError::TooLarge(size));
            }
        }
        if next.backends != self.backends
            || next.sightings != self.sightings
            || next.voters != self.voters
            || next.learners != self.learners
            || next.addrs != self.addrs
            || next.epoch != self.epoch
            || next.services != self.services
            || !self.exists()
        {
            next.version = self.version + 1;
        }
        Ok(next)
    }

    /// Record `now` as `usable_since` of every backend this change made usable (added,
    /// restored, undrained), in every service.
    fn stamp_usable(&mut self, before: &Pool, now: u64) {
        stamp(&before.backends, &mut self.backends, now);
        let none = BTreeMap::new();
        for (name, service) in self.services.iter_mut() {
            let old = before.services.get(name);
            if old.is_some_and(|o| std::sync::Arc::ptr_eq(o, service)) {
                continue;
            }
            let old = old.map_or(&none, |o| &o.backends);
            if service.backends.values().any(|b| became_usable(old, b)) {
                stamp(old, &mut std::sync::Arc::make_mut(service).backends, now);
            }
        }
    }

    /// Whether `peer`'s health and discovery votes count: any peer's before voters are agreed,
    /// else only a voter's.
    pub fn may_vote(&self, peer: &NodeId) -> bool {
        self.voters.is_empty() || self.voters.contains(peer)
    }

    /// How many of `peers` are voters (all of them before voters are agreed).
    fn counted(&self, peers: &BTreeSet<NodeId>) -> usize {
        if self.voters.is_empty() {
            peers.len()
        } else {
            peers.intersection(&self.voters).count()
        }
    }

    /// Re-derive `ejected`/`active` from the votes, in id order, never beyond the cap.
    ///
    /// Eject when at least a majority of all peers (or of a backend's `probers` assigned
    /// probers) vote down; restore when at least a majority see it up (votes down <= n -
    /// majority). With an odd cluster the two thresholds meet; with
    /// an even one there is a band where the state holds (hysteresis).
    fn settle(&mut self, rules: &Rules) {
        let counted = rules.health_voters();
        let majority = counted / 2 + 1;
        let up_limit = counted.saturating_sub(majority);
        let down: BTreeMap<BackendId, usize> = self
            .backends
            .values()
            .map(|b| (b.id.clone(), self.counted(&b.down_votes)))
            .collect();
        for b in self.backends.values_mut() {
            if b.state == BackendState::Ejected && down[&b.id] <= up_limit {
                b.state = BackendState::Active;
            }
        }
        let cap = self.ejection_cap(rules);
        let mut ejected = self.ejected_count();
        // A smaller pool (or a lower cap) may leave too many ejected: restore the ones the
        // fewest peers see down first (ties by id), so the cap always holds.
        if ejected > cap {
            let mut over: Vec<(usize, BackendId)> = self
                .backends
                .values()
                .filter(|b| b.state == BackendState::Ejected)
                .map(|b| (down[&b.id], b.id.clone()))
                .collect();
            over.sort();
            for (_, id) in over.into_iter().take(ejected - cap) {
                if let Some(b) = self.backends.get_mut(&id) {
                    b.state = BackendState::Active;
                }
            }
            ejected = cap;
        }
        for b in self.backends.values_mut() {
            if ejected >= cap {
                break;
            }
            if b.state == BackendState::Active && down[&b.id] >= majority {
                b.state = BackendState::Ejected;
                ejected += 1;
            }
        }
    }

    /// Apply a change tagged with its proposer and a sequence number unique to that proposer,
    /// at most once: if the pool already holds this change, say so instead.
    pub fn apply_once(
        &self,
        change: &PoolChange,
        rules: &Rules,
        origin: &NodeId,
        seq: u64,
    ) -> Result<Applied, ChangeError> {
        if self.applied.get(origin).is_some_and(|&s| s >= seq) {
            return Ok(Applied::Already);
        }
        let mut next = self.apply(change, rules)?;
        if next.version != self.version {
            next.applied.insert(origin.clone(), seq);
            next.applied_at.insert(origin.clone(), next.version);
            next.through = Some(origin.clone());
            next.trim_applied();
        }
        Ok(Applied::Next(next))
    }

    /// Keep `applied` to `MAX_APPLIED` proposers: members always, then the most recent others.
    fn trim_applied(&mut self) {
        if self.applied.len() <= MAX_APPLIED {
            return;
        }
        let mut others: Vec<(u64, NodeId)> = self
            .applied
            .keys()
            .filter(|id| !self.voters.contains(*id) && !self.learners.contains(*id))
            .map(|id| (self.applied_at.get(id).copied().unwrap_or(0), id.clone()))
            .collect();
        others.sort();
        let excess = self.applied.len() - MAX_APPLIED;
        for (_, id) in others.into_iter().take(excess) {
            self.applied.remove(&id);
            self.applied_at.remove(&id);
        }
    }

    fn get_mut(&mut self, id: &BackendId) -> Result<&mut Backend, ChangeError> {
        self.backends
            .get_mut(id)
            .ok_or_else(|| ChangeError::NotFound(id.clone()))
    }

    /// Canonical bytes: equal pools give equal bytes on every peer.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        // Serializing plain structs, strings and ordered maps cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// A hash of the canonical pool below 2^53, so it is exact as an f64 gauge.
    pub fn fingerprint(&self) -> u64 {
        crate::core::balance::hash::hash_bytes(&self.canonical_bytes(), 0x5EED_F1A6)
            & ((1u64 << 53) - 1)
    }
}

pub(super) fn weight_ok(w: u32) -> Result<(), ChangeError> {
    check_weight(w).map(drop).map_err(ChangeError::Invalid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backend_protocol_is_stored_only_when_not_http1() {
        let plain = Backend::new("a", "127.0.0.1:1", 1);
        let text = serde_json::to_string(&plain).unwrap();
        assert!(!text.contains("protocol"), "{text}");
        let back: Backend = serde_json::from_str(&text).unwrap();
        assert_eq!(back.protocol, Protocol::Http1);
        let h2 = plain.with_protocol(Protocol::H2);
        let text = serde_json::to_string(&h2).unwrap();
        assert!(text.contains(r#""protocol":"h2""#), "{text}");
        assert_eq!(serde_json::from_str::<Backend>(&text).unwrap(), h2);
        assert_eq!("h2".parse::<Protocol>(), Ok(Protocol::H2));
        assert_eq!(
            "h3".parse::<Protocol>(),
            Err(InvalidBackend::Protocol("h3".into()))
        );
    }

    fn rules(n: usize) -> Rules {
        Rules {
            cluster_size: n,
            ..Rules::default()
        }
    }

    fn seeded(n: usize) -> Pool {
        let backends = (0..n)
            .map(|i| Backend::new(format!("b{i}"), format!("127.0.0.1:{}", 9000 + i), 1))
            .collect();
        Pool::default()
            .apply(&PoolChange::seed(backends), &rules(3))
            .unwrap()
    }

    fn id(s: &str) -> BackendId {
        BackendId::new(s)
    }
    fn peer(s: &str) -> NodeId {
        NodeId::new(s)
    }

    fn formed(voters: &[&str]) -> Pool {
        let backends = (0..3)
            .map(|i| Backend::new(format!("b{i}"), format!("127.0.0.1:{}", 9000 + i), 1))
            .collect();
        Pool::default()
            .apply(
                &PoolChange::Seed {
                    backends,
                    cluster_id: "x".into(),
                    voters: voters.iter().map(|v| peer(v)).collect(),
                    services: Vec::new(),
                },
                &rules(voters.len()),
            )
            .unwrap()
    }

    #[test]
    fn membership_changes_follow_their_rules() {
        let r = rules(3);
        let p = formed(&["a", "b", "c"]);
        assert_eq!(p.epoch, 1);
        let add = |id: &str, learner: bool| PoolChange::AddPeer {
            id: peer(id),
            addr: "10.0.0.4:7001".into(),
            learner,
        };
        // A voter: a new epoch, a new version, its address recorded.
        let q = p.apply(&add("d", false), &r).unwrap();
        assert_eq!((q.epoch, q.version), (2, p.version + 1));
        assert!(q.voters.contains(&peer("d")));
        assert_eq!(q.addrs[&peer("d")], "10.0.0.4:7001");
        assert_eq!(
            q.apply(&add("d", false), &r),
            Err(ChangeError::PeerExists(peer("d")))
        );
        assert!(matches!(
            p.apply(
                &PoolChange::AddPeer {
                    id: peer("D!"),
                    addr: "x:1".into(),
                    learner: false
                },
                &r
            ),
            Err(ChangeError::InvalidPeer(_))
        ));
        assert!(matches!(
            p.apply(
                &PoolChange::AddPeer {
                    id: peer("d"),
                    addr: "nowhere".into(),
                    learner: false
                },
                &r
            ),
            Err(ChangeError::InvalidPeer(_))
        ));
        // A learner: recorded, the epoch (the quorum) unchanged; promoted by adding it as a voter.
        let l = p.apply(&add("l", true), &r).unwrap();
        assert_eq!(l.epoch, p.epoch);
        assert!(l.learners.contains(&peer("l")) && !l.voters.contains(&peer("l")));
        let promoted = l.apply(&add("l", false), &r).unwrap();
        assert!(promoted.voters.contains(&peer("l")) && promoted.learners.is_empty());
        // Removing a voter: a new epoch, and its votes go with it.
        let voted = p
            .apply(
                &PoolChange::VoteDown {
                    id: id("b0"),
                    peer: peer("c"),
                },
                &r,
            )
            .unwrap();
        let gone = voted
            .apply(&PoolChange::RemovePeer { id: peer("c") }, &r)
            .unwrap();
        assert_eq!(gone.epoch, 2);
        assert!(gone.backends[&id("b0")].down_votes.is_empty());
        assert_eq!(
            gone.apply(&PoolChange::RemovePeer { id: peer("c") }, &r),
            Err(ChangeError::PeerNotFound(peer("c")))
        );
        let one = formed(&["a"]);
        assert_eq!(
            one.apply(&PoolChange::RemovePeer { id: peer("a") }, &r),
            Err(ChangeError::LastVoter(peer("a")))
        );
        // No membership to change before the cluster formed.
        assert!(matches!(
            Pool::default().apply(&add("d", false), &r),
            Err(ChangeError::InvalidPeer(_))
        ));
    }

    #[test]
    fn only_voters_votes_count() {
        let r = rules(3);
        let p = formed(&["a", "b", "c"]);
        // A learner's vote changes nothing, not even the version.
        let q = p
            .apply(
                &PoolChange::VoteDown {
                    id: id("b0"),
                    peer: peer("l"),
                },
                &r,
            )
            .unwrap();
        assert_eq!(q, p);
        // Two of three voters eject (cap 1 of 3).
        let q = q
            .apply(
                &PoolChange::VoteDown {
                    id: id("b0"),
                    peer: peer("a"),
                },
                &r,
            )
            .unwrap();
        assert_eq!(q.backends[&id("b0")].state, BackendState::Active);
        let q = q
            .apply(
                &PoolChange::VoteDown {
                    id: id("b0"),
                    peer: peer("b"),
                },
                &r,
            )
            .unwrap();
        assert_eq!(q.backends[&id("b0")].state, BackendState::Ejected);
        // After growing to five voters the same two votes are no majority: restored.
        let add = |id: &str| PoolChange::AddPeer {
            id: peer(id),
            addr: "h:1".into(),
            learner: false,
        };
        let q = q
            .apply(&add("d"), &r)
            .unwrap()
            .apply(&add("e"), &r)
            .unwrap();
        assert_eq!(q.backends[&id("b0")].state, BackendState::Active);
    }

    #[test]
    fn settle_applies_a_changed_cap_to_recorded_votes() {
        let capped = Rules {
            cluster_size: 1,
            max_ejected_percent: 0,
            ..Rules::default()
        };
        let p = seeded(2)
            .apply(
                &PoolChange::VoteDown {
                    id: id("b0"),
                    peer: peer("a"),
                },
                &capped,
            )
            .unwrap();
        assert_eq!(p.backends[&id("b0")].state, BackendState::Active);
        // Same cap: nothing to do, same version.
        assert_eq!(p.apply(&PoolChange::Settle, &capped).unwrap(), p);
        let raised = Rules {
            max_ejected_percent: 50,
            ..capped
        };
        let q = p.apply(&PoolChange::Settle, &raised).unwrap();
        assert_eq!(q.backends[&id("b0")].state, BackendState::Ejected);
        assert_eq!(q.version, p.version + 1);
        // Lowered again: restored.
        let r = q.apply(&PoolChange::Settle, &capped).unwrap();
        assert_eq!(r.backends[&id("b0")].state, BackendState::Active);
    }

    #[test]
    fn diff_names_each_change_and_the_proposer() {
        let r = rules(3);
        let p = seeded(3);
        let mut q = p
            .apply(
                &PoolChange::VoteDown {
                    id: id("b1"),
                    peer: peer("a"),
                },
                &r,
            )
            .unwrap();
        q = q
            .apply(
                &PoolChange::VoteDown {
                    id: id("b1"),
                    peer: peer("b"),
                },
                &r,
            )
            .unwrap();
        q.applied.insert(peer("b"), 7);
        let d = PoolDiff::between(&p, &q);
        assert_eq!(
            d.changes,
            vec!["a votes b1 down", "b votes b1 down", "b1 ejected"]
        );
        assert_eq!(
            d.ejected,
            vec![("default".into(), id("b1"), vec![peer("a"), peer("b")])]
        );
        assert_eq!(d.through, Some(peer("b")));
        let back = PoolDiff::between(&q, &p);
        assert_eq!(back.restored, vec![("default".into(), id("b1"))]);
        let gone = q
            .apply(&PoolChange::RemoveBackend { id: id("b2") }, &r)
            .unwrap();
        assert_eq!(PoolDiff::between(&q, &gone).changes, vec!["removed b2"]);
    }

    /// A peer that learns two versions at once (its own vote and another's) still names the
    /// peer whose change made the last one.
    #[test]
    fn diff_over_several_versions_names_the_last_proposer() {
        let r = rules(3);
        let p = seeded(3);
        let vote = |by: &str| PoolChange::VoteDown {
            id: id("b1"),
            peer: peer(by),
        };
        let Applied::Next(q) = p.apply_once(&vote("a"), &r, &peer("a"), 1).unwrap() else {
            panic!("not applied")
        };
        let Applied::Next(q) = q.apply_once(&vote("c"), &r, &peer("c"), 4).unwrap() else {
            panic!("not applied")
        };
        assert_eq!(q.version, p.version + 2);
        let d = PoolDiff::between(&p, &q);
        assert_eq!(
            d.changes,
            vec!["a votes b1 down", "c votes b1 down", "b1 ejected"]
        );
        assert_eq!(d.through, Some(peer("c")));
        // Stored with the pool, so every peer reads the same.
        let text = serde_json::to_string(&q).unwrap();
        assert_eq!(serde_json::from_str::<Pool>(&text).unwrap(), q);
    }

    #[test]
    fn seed_only_once() {
        let p = seeded(3);
        assert_eq!(p.version, 1);
        assert_eq!(p.backends.len(), 3);
        let err = p.apply(&PoolChange::seed(vec![]), &rules(3)).unwrap_err();
        assert_eq!(err, ChangeError::AlreadySeeded(1));
    }

    #[test]
    fn read_and_noop_keep_version() {
        let p = seeded(3);
        assert_eq!(p.apply(&PoolChange::Read, &rules(3)).unwrap(), p);
        // VoteUp from a peer that never voted down changes nothing.
        let q = p
            .apply(
                &PoolChange::VoteUp {
                    id: id("b0"),
                    peer: peer("a"),
                },
                &rules(3),
            )
            .unwrap();
        assert_eq!(q.version, p.version);
    }

    #[test]
    fn add_remove_weight_drain() {
        let p = seeded(2);
        let r = rules(3);
        let p2 = p
            .apply(
                &PoolChange::AddBackend {
                    backend: Backend::new("web", "127.0.0.1:1", 5),
                },
                &r,
            )
            .unwrap();
        assert_eq!(p2.version, 2);
        assert!(matches!(
            p2.apply(
                &PoolChange::AddBackend {
                    backend: Backend::new("web", "127.0.0.1:2", 5)
                },
                &r
            ),
            Err(ChangeError::Exists(_))
        ));
        assert!(matches!(
            p2.apply(
                &PoolChange::AddBackend {
                    backend: Backend::new("other", "127.0.0.1:1", 5)
                },
                &r
            ),
            Err(ChangeError::AddrInUse(..))
        ));
        let p3 = p2
            .apply(
                &PoolChange::SetWeight {
                    id: id("web"),
                    weight: 7,
                },
                &r,
            )
            .unwrap();
        assert_eq!(p3.backends[&id("web")].weight, 7);
        assert_eq!(
            p3.apply(
                &PoolChange::SetWeight {
                    id: id("web"),
                    weight: 0
                },
                &r
            ),
            Err(ChangeError::Invalid(InvalidBackend::Weight(0)))
        );
        let p4 = p3
            .apply(
                &PoolChange::SetState {
                    id: id("web"),
                    draining: true,
                },
                &r,
            )
            .unwrap();
        assert_eq!(p4.backends[&id("web")].state, BackendState::Draining);
        let p5 = p4
            .apply(&PoolChange::RemoveBackend { id: id("web") }, &r)
            .unwrap();
        assert_eq!(p5.version, 5);
        assert!(matches!(
            p5.apply(&PoolChange::RemoveBackend { id: id("web") }, &r),
            Err(ChangeError::NotFound(_))
        ));
    }

    #[test]
    fn with_probers_a_majority_of_the_assigned_ejects_and_restores() {
        // Five voters, three probers per backend: two votes are that majority.
        let r = Rules {
            probers: 3,
            ..rules(5)
        };
        let vote = |p: Pool, who: &str, down: bool| {
            let (id, peer) = (id("b0"), peer(who));
            let change = if down {
                PoolChange::VoteDown { id, peer }
            } else {
                PoolChange::VoteUp { id, peer }
            };
            p.apply(&change, &r).unwrap()
        };
        let mut p = vote(seeded(4), "a", true);
        assert_eq!(p.backends[&id("b0")].state, BackendState::Active);
        p = vote(p, "b", true);
        assert_eq!(p.backends[&id("b0")].state, BackendState::Ejected);
        // Without probers, two of five is no majority.
        let all = p.apply(&PoolChange::Settle, &rules(5)).unwrap();
        assert_eq!(all.backends[&id("b0")].state, BackendState::Active);
        // More probers than voters: a majority of the voters.
        let wide = Rules {
            probers: 9,
            ..rules(5)
        };
        let wide = p.apply(&PoolChange::Settle, &wide).unwrap();
        assert_eq!(wide.backends[&id("b0")].state, BackendState::Active);
        // One of the two sees it up again: at most one down vote of three is a restore.
        p = vote(p, "a", false);
        assert_eq!(p.backends[&id("b0")].state, BackendState::Active);
    }

    #[test]
    fn usable_since_is_the_instant_a_change_made_a_backend_usable() {
        let at = |t: u64| Rules {
            now_unix_ms: t,
            ..rules(3)
        };
        let since = |p: &Pool, b: &str| p.backends[&id(b)].usable_since;
        let p = Pool::default()
            .apply(
                &PoolChange::seed(vec![Backend::new("b0", "127.0.0.1:1", 1)]),
                &at(100),
            )
            .unwrap();
        assert_eq!(since(&p, "b0"), 0, "seeded: whole from the start");
        let add = PoolChange::AddBackend {
            backend: Backend::new("b1", "127.0.0.1:2", 1),
        };
        let p = p.apply(&add, &at(200)).unwrap();
        assert_eq!((since(&p, "b0"), since(&p, "b1")), (0, 200));
        // A weight change or a vote that ejects nothing keeps it.
        let p = p
            .apply(
                &PoolChange::SetWeight {
                    id: id("b1"),
                    weight: 5,
                },
                &at(300),
            )
            .unwrap();
        assert_eq!(since(&p, "b1"), 200);
        // Drained then undrained: usable again from the undrain.
        let drain = |d| PoolChange::SetState {
            id: id("b1"),
            draining: d,
        };
        let p = p.apply(&drain(true), &at(400)).unwrap();
        assert_eq!(since(&p, "b1"), 200);
        let p = p.apply(&drain(false), &at(500)).unwrap();
        assert_eq!(since(&p, "b1"), 500);
        // Ejected (a cap of one in four needs four backends) and restored: from the restore.
        let mut p = p;
        for (n, b) in ["b2", "b3"].iter().enumerate() {
            let backend = Backend::new(*b, format!("127.0.0.1:{}", 10 + n), 1);
            p = p
                .apply(&PoolChange::AddBackend { backend }, &at(600))
                .unwrap();
        }
        for who in ["a", "b"] {
            let down = PoolChange::VoteDown {
                id: id("b1"),
                peer: peer(who),
            };
            p = p.apply(&down, &at(700)).unwrap();
        }
        assert_eq!(p.backends[&id("b1")].state, BackendState::Ejected);
        assert_eq!(since(&p, "b1"), 500);
        let up = PoolChange::VoteUp {
            id: id("b1"),
            peer: peer("a"),
        };
        let p = p.apply(&up, &at(800)).unwrap();
        assert_eq!(p.backends[&id("b1")].state, BackendState::Active);
        assert_eq!(since(&p, "b1"), 800);
        // Inside a service, the same.
        let p = p
            .apply(
                &PoolChange::PutService {
                    name: "api".into(),
                    def: ServiceDef {
                        hosts: vec!["api.test".into()],
                        ..ServiceDef::default()
                    },
                },
                &at(900),
            )
            .unwrap();
        let add = PoolChange::in_service(
            "api",
            PoolChange::AddBackend {
                backend: Backend::new("s0", "127.0.0.1:20", 1),
            },
        );
        let p = p.apply(&add, &at(1_000)).unwrap();
        assert_eq!(p.backends_of("api").unwrap()[&id("s0")].usable_since, 1_000);
        assert_eq!(since(&p, "b0"), 0);
    }

    #[test]
    fn ejection_needs_majority_and_respects_cap() {
        let r = rules(3);
        let mut p = seeded(3); // cap = floor(50% * 3) = 1
        p = p
            .apply(
                &PoolChange::VoteDown {
                    id: id("b0"),
                    peer: peer("a"),
                },
                &r,
            )
            .unwrap();
        assert_eq!(p.backends[&id("b0")].state, BackendState::Active);
        p = p
            .apply(
                &PoolChange::VoteDown {
                    id: id("b0"),
                    peer: peer("b"),
                },
                &r,
            )
            .unwrap();
        assert_eq!(p.backends[&id("b0")].state, BackendState::Ejected);
        for who in ["a", "b", "c"] {
            p = p
                .apply(
                    &PoolChange::VoteDown {
                        id: id("b1"),
                        peer: peer(who),
                    },
                    &r,
                )
                .unwrap();
        }
        // The cap holds b1 active although every peer sees it down.
        assert_eq!(p.backends[&id("b1")].state, BackendState::Active);
        assert_eq!(p.ejected_count(), 1);
        // b0 comes back: a majority sees it up. Then b1 may take the freed slot.
        p = p
            .apply(
                &PoolChange::VoteUp {
                    id: id("b0"),
                    peer: peer("a"),
                },
                &r,
            )
            .unwrap();
        assert_eq!(p.backends[&id("b0")].state, BackendState::Active);
        assert_eq!(p.backends[&id("b1")].state, BackendState::Ejected);
    }

    #[test]
    fn lone_backend_is_never_ejected() {
        let r = rules(3);
        let mut p = seeded(1);
        for who in ["a", "b", "c"] {
            p = p
                .apply(
                    &PoolChange::VoteDown {
                        id: id("b0"),
                        peer: peer(who),
                    },
                    &r,
                )
                .unwrap();
        }
        assert_eq!(p.ejected_count(), 0);
    }

    #[test]
    fn removing_backends_never_leaves_too_many_ejected() {
        let r = rules(3);
        let mut p = seeded(2); // cap 1
        for who in ["a", "b"] {
            p = p
                .apply(
                    &PoolChange::VoteDown {
                        id: id("b0"),
                        peer: peer(who),
                    },
                    &r,
                )
                .unwrap();
        }
        assert_eq!(p.ejected_count(), 1);
        p = p
            .apply(&PoolChange::RemoveBackend { id: id("b1") }, &r)
            .unwrap();
        assert_eq!(
            p.backends[&id("b0")].state,
            BackendState::Active,
            "a lone backend is never ejected"
        );
    }

    #[test]
    fn expired_votes_restore() {
        let r = rules(3);
        let mut p = seeded(3);
        for who in ["a", "b"] {
            p = p
                .apply(
                    &PoolChange::VoteDown {
                        id: id("b2"),
                        peer: peer(who),
                    },
                    &r,
                )
                .unwrap();
        }
        assert_eq!(p.backends[&id("b2")].state, BackendState::Ejected);
        p = p
            .apply(&PoolChange::ExpireVotes { peer: peer("b") }, &r)
            .unwrap();
        assert_eq!(p.backends[&id("b2")].state, BackendState::Active);
    }

    #[test]
    fn fingerprint_is_canonical_and_below_2_53() {
        let a = seeded(3);
        let b = seeded(3);
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert!(a.fingerprint() < (1 << 53));
        let c = a
            .apply(
                &PoolChange::SetWeight {
                    id: id("b1"),
                    weight: 2,
                },
                &rules(3),
            )
            .unwrap();
        assert_ne!(a.fingerprint(), c.fingerprint());
    }

    #[test]
    fn backend_rules() {
        assert_eq!(normalize_addr("127.0.0.1:9001").unwrap(), "127.0.0.1:9001");
        assert_eq!(normalize_addr("http://web:80/").unwrap(), "web:80");
        assert_eq!(
            normalize_addr("https://web:443").unwrap(),
            "https://web:443"
        );
        assert_eq!(normalize_addr("[::1]:80").unwrap(), "[::1]:80");
        assert!(normalize_addr("web").is_err());
        assert!(normalize_addr("web:0").is_err());
        assert!(normalize_addr("a b:80").is_err());
        assert!(check_backend_id("web-1").is_ok());
        assert!(check_backend_id("a/b").is_err());
        assert!(check_backend_id("").is_err());
        assert_eq!(check_weight(0), Err(InvalidBackend::Weight(0)));
        assert_eq!(check_weight(1000), Ok(1000));
        let b = Backend::checked(None, "http://10.0.0.1:80", 2).unwrap();
        assert_eq!(
            (b.id.as_str(), b.addr.as_str(), b.weight),
            ("10.0.0.1:80", "10.0.0.1:80", 2)
        );
        let e = Backend::checked(Some("x y"), "10.0.0.1:80", 1).unwrap_err();
        assert_eq!(
            format!("{}: {e}", e.field()),
            "id: bad id \"x y\" (1 to 64 printable characters, no spaces or '/')"
        );
        // apply keeps the same rules: an unnormalized or out-of-range backend is refused.
        let p = Pool::default();
        let add = |b: Backend| p.apply(&PoolChange::AddBackend { backend: b }, &Rules::default());
        assert!(add(Backend::new("w", "http://10.0.0.1:80", 1)).is_err());
        assert!(add(Backend::new("w", "10.0.0.1:80", 1001)).is_err());
        assert!(add(Backend::new("w", "10.0.0.1:80", 1)).is_ok());
    }

    #[test]
    fn the_pool_size_is_capped() {
        let backends: Vec<Backend> = (0..MAX_BACKENDS)
            .map(|i| {
                Backend::new(
                    format!("b{i}"),
                    format!("10.{}.{}.{}:80", i / 65536, (i / 256) % 256, i % 256),
                    1,
                )
            })
            .collect();
        let full = Pool::default()
            .apply(&PoolChange::seed(backends), &Rules::default())
            .unwrap();
        let more = PoolChange::AddBackend {
            backend: Backend::new("x", "10.255.0.1:80", 1),
        };
        assert_eq!(full.apply(&more, &Rules::default()), Err(ChangeError::Full));
        // A full register stays well inside one peer frame (16 MiB), votes and all.
        assert!(full.canonical_bytes().len() < 4 * 1024 * 1024);
    }

    /// `applied` stays bounded as learners come and go: members always kept, then the most
    /// recent others, and a retry of a kept proposer is still found.
    #[test]
    fn applied_keeps_at_most_max_applied_proposers() {
        let next = |a: Applied| match a {
            Applied::Next(q) => q,
            Applied::Already => panic!("applied as already"),
        };
        let mut p = Pool::default()
            .apply(&PoolChange::seed(vec![]), &rules(3))
            .unwrap();
        p.voters = [peer("a")].into_iter().collect();
        p = next(
            p.apply_once(&PoolChange::Read, &rules(1), &peer("a"), 1)
                .unwrap(),
        );
        let add = |i: usize| PoolChange::AddBackend {
            backend: Backend::new(
                format!("b{i}"),
                format!("10.0.{}.{}:80", i / 250, i % 250),
                1,
            ),
        };
        p = next(p.apply_once(&add(0), &rules(1), &peer("a"), 2).unwrap());
        for i in 1..MAX_APPLIED + 100 {
            let id = NodeId::new(format!("learner-{i}"));
            p = next(p.apply_once(&add(i), &rules(1), &id, 1).unwrap());
        }
        assert_eq!(p.applied.len(), MAX_APPLIED);
        assert_eq!(p.applied_at.len(), MAX_APPLIED);
        assert!(p.applied.contains_key(&peer("a")), "a voter is kept");
        assert!(!p.applied.contains_key(&NodeId::new("learner-1")));
        let last = NodeId::new(format!("learner-{}", MAX_APPLIED + 99));
        let retry = add(MAX_APPLIED + 99);
        assert_eq!(
            p.apply_once(&retry, &rules(1), &last, 1).unwrap(),
            Applied::Already
        );
    }

    /// A change that would make the pool too large for a peer frame is refused; the pool is
    /// unchanged. Addresses are bounded (a DNS name is at most 253 bytes).
    #[test]
    fn a_pool_never_outgrows_a_peer_frame() {
        assert!(normalize_addr(&format!("{}:80", "h".repeat(255))).is_ok());
        assert!(normalize_addr(&format!("{}:80", "h".repeat(256))).is_err());
        let mut p = Pool::default()
            .apply(&PoolChange::seed(vec![]), &rules(3))
            .unwrap();
        let host = "h".repeat(250);
        for i in 0..(MAX_POOL_BYTES / 300) {
            let addr = format!("{host}{i}:80");
            p.sightings.insert(
                discovered_id("dns", &addr),
                Sighting {
                    source: "dns".into(),
                    addr,
                    weight: 1,
                    seen_by: BTreeSet::new(),
                    protocol: Protocol::default(),
                },
            );
        }
        let add = PoolChange::AddBackend {
            backend: Backend::new("x", "10.0.0.1:80", 1),
        };
        match p.apply(&add, &rules(3)) {
            Err(ChangeError::TooLarge(size)) => assert!(size > MAX_POOL_BYTES),
            other => panic!("{other:?}"),
        }
        // Back under the cap, it applies.
        p.sightings.clear();
        assert!(p.apply(&add, &rules(3)).is_ok());
    }
}
