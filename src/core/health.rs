//! Health decisions, pure: this peer's own view of one backend (rise/fall counters for probes,
//! a consecutive-failure count for live traffic; `record` says when the view flips), and the
//! voter that turns the local view into health votes on the agreed pool.

use std::collections::{BTreeMap, BTreeSet};

use super::balance::hash::PROBER_SEED;
use super::pool::{BackendId, NodeId, Pool, PoolChange};

/// Up or down, as this peer sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Local {
    Up,
    Down,
}

/// Thresholds, from `[health]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Thresholds {
    /// Consecutive probe passes to come back up.
    pub rise: u32,
    /// Consecutive probe failures to go down.
    pub fall: u32,
    /// Consecutive failed live requests to go down; 0 = passive detection off.
    pub passive_failures: u32,
}

/// Where an observation came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Probe,
    Traffic,
}

/// The local view of one backend. Seeded backends start up (as in HAProxy and Pingora).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalHealth {
    state: Local,
    /// What took it down: only that source's evidence brings it back early (a backend that
    /// fails its health check but answers traffic stays down until `rise` probe passes).
    down_by: Option<Source>,
    /// Consecutive probe passes (while down) or failures (while up).
    probe_streak: u32,
    /// Consecutive failed live requests.
    traffic_failures: u32,
}

impl Default for LocalHealth {
    fn default() -> Self {
        Self {
            state: Local::Up,
            down_by: None,
            probe_streak: 0,
            traffic_failures: 0,
        }
    }
}

impl LocalHealth {
    pub fn state(&self) -> Local {
        self.state
    }

    /// Which source took it down (None while up).
    pub fn down_by(&self) -> Option<Source> {
        self.down_by
    }

    /// Record one outcome; returns the new state when it flips.
    ///
    /// A probe pass counts toward `rise` only while down; a probe failure toward `fall` only while
    /// up. Live traffic can take a backend down (`passive_failures` in a row); if traffic took
    /// it down, a successful live request (a trial) brings it back at once: it answered. If
    /// probes took it down, only `rise` probe passes do.
    pub fn record(&mut self, source: Source, ok: bool, t: &Thresholds) -> Option<Local> {
        match (source, ok, self.state) {
            (Source::Probe, true, Local::Up) | (Source::Probe, false, Local::Down) => {
                self.probe_streak = 0;
                None
            }
            (Source::Probe, true, Local::Down) => {
                self.probe_streak += 1;
                (self.probe_streak >= t.rise.max(1)).then(|| self.flip(Local::Up))
            }
            (Source::Probe, false, Local::Up) => {
                self.probe_streak += 1;
                (self.probe_streak >= t.fall.max(1)).then(|| {
                    self.down_by = Some(Source::Probe);
                    self.flip(Local::Down)
                })
            }
            (Source::Traffic, true, Local::Up) => {
                self.traffic_failures = 0;
                None
            }
            (Source::Traffic, true, Local::Down) => {
                (self.down_by == Some(Source::Traffic)).then(|| self.flip(Local::Up))
            }
            (Source::Traffic, false, Local::Up) => {
                self.traffic_failures += 1;
                (t.passive_failures > 0 && self.traffic_failures >= t.passive_failures).then(|| {
                    self.down_by = Some(Source::Traffic);
                    self.flip(Local::Down)
                })
            }
            (Source::Traffic, false, Local::Down) => None,
        }
    }

    /// This peer stopped probing the backend (another peer probes it now, `health.probers`):
    /// what its probes said no longer holds. Returns `Up` when probes had taken it down.
    pub fn forget_probes(&mut self) -> Option<Local> {
        self.probe_streak = 0;
        (self.down_by == Some(Source::Probe)).then(|| self.flip(Local::Up))
    }

    fn flip(&mut self, to: Local) -> Local {
        self.state = to;
        if to == Local::Up {
            self.down_by = None;
        }
        self.probe_streak = 0;
        self.traffic_failures = 0;
        to
    }
}

/// The voters that actively probe `backend` when each backend has `k` probers
/// (`health.probers`): the voters not in `dead`, ranked by the rendezvous hash of (backend id,
/// voter id), the first `k`. Every peer with the same view of who is dead picks the same ones;
/// a dead prober's place goes to the next in that backend's ranking, and the others keep theirs.
/// `k = 0`, or no agreed voters: every peer probes (None).
pub fn probers<'a>(
    backend: &BackendId,
    voters: &'a BTreeSet<NodeId>,
    dead: &[NodeId],
    k: usize,
) -> Option<Vec<&'a NodeId>> {
    if k == 0 || voters.is_empty() {
        return None;
    }
    let mut ranked: Vec<(u64, &NodeId)> = voters
        .iter()
        .filter(|v| !dead.contains(v))
        .map(|v| (rendezvous(backend, v), v))
        .collect();
    ranked.sort_unstable_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    Some(ranked.into_iter().take(k).map(|(_, v)| v).collect())
}

/// Whether `me` probes `backend` (see `probers`).
pub fn is_prober(
    backend: &BackendId,
    voters: &BTreeSet<NodeId>,
    dead: &[NodeId],
    k: usize,
    me: &NodeId,
) -> bool {
    probers(backend, voters, dead, k).is_none_or(|p| p.contains(&me))
}

fn rendezvous(backend: &BackendId, voter: &NodeId) -> u64 {
    let mut h = twox_hash::XxHash64::with_seed(PROBER_SEED);
    std::hash::Hasher::write(&mut h, backend.as_str().as_bytes());
    std::hash::Hasher::write_u8(&mut h, 0xff);
    std::hash::Hasher::write(&mut h, voter.as_str().as_bytes());
    std::hash::Hasher::finish(&h)
}

/// What a vote is about: a backend, or the votes of a dead peer.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum VoteKey {
    Backend(BackendId),
    Expire(NodeId),
}

/// This peer's health votes. `reconcile` compares the agreed pool with the local view and says
/// which changes to propose so that the pool's votes match what this peer sees, and which dead
/// peers' votes to expire. A vote not yet reflected in the pool is proposed again after
/// `revote_after_ms`, so a lost proposal or a restart heals itself.
#[derive(Debug)]
pub struct Voter {
    me: NodeId,
    revote_after_ms: u64,
    /// Proposed and not yet seen in the pool: (wanted up, when).
    pending: BTreeMap<VoteKey, (bool, u64)>,
}

impl Voter {
    pub fn new(me: NodeId, revote_after_ms: u64) -> Self {
        Self {
            me,
            revote_after_ms,
            pending: BTreeMap::new(),
        }
    }

    /// The changes to propose now.
    pub fn reconcile(
        &mut self,
        pool: &Pool,
        local_up: impl Fn(&BackendId) -> bool,
        dead: &[NodeId],
        now_ms: u64,
    ) -> Vec<PoolChange> {
        let mut out = Vec::new();
        if !pool.exists() {
            return out;
        }
        // What no longer needs a vote: a backend gone from the pool, a peer alive again or with
        // no vote left to expire (so the voter is idle again once the pool shows its changes).
        self.pending.retain(|key, _| match key {
            VoteKey::Backend(id) => pool.backends.contains_key(id),
            VoteKey::Expire(peer) => {
                dead.contains(peer) && pool.backends.values().any(|b| b.down_votes.contains(peer))
            }
        });
        for b in pool.backends.values() {
            let up = local_up(&b.id);
            if up != b.down_votes.contains(&self.me) {
                // The pool shows this peer's view already (the common case: nothing to make).
                if !self.pending.is_empty() {
                    self.pending.remove(&VoteKey::Backend(b.id.clone()));
                }
                continue;
            }
            let key = VoteKey::Backend(b.id.clone());
            if self.recently(&key, up, now_ms) {
                continue;
            }
            self.pending.insert(key, (up, now_ms));
            let (id, peer) = (b.id.clone(), self.me.clone());
            out.push(if up {
                PoolChange::VoteUp { id, peer }
            } else {
                PoolChange::VoteDown { id, peer }
            });
        }
        for peer in dead {
            if !pool.backends.values().any(|b| b.down_votes.contains(peer)) {
                continue;
            }
            let key = VoteKey::Expire(peer.clone());
            if self.recently(&key, true, now_ms) {
                continue;
            }
            self.pending.insert(key, (true, now_ms));
            out.push(PoolChange::ExpireVotes { peer: peer.clone() });
        }
        out
    }

    /// No vote is waiting to show in the pool.
    pub fn idle(&self) -> bool {
        self.pending.is_empty()
    }

    fn recently(&self, key: &VoteKey, up: bool, now_ms: u64) -> bool {
        self.pending.get(key).is_some_and(|&(want_up, at)| {
            want_up == up && now_ms.saturating_sub(at) < self.revote_after_ms
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::pool::{Backend, Rules};

    const T: Thresholds = Thresholds {
        rise: 2,
        fall: 3,
        passive_failures: 5,
    };

    #[test]
    fn probes_fall_and_rise() {
        let mut h = LocalHealth::default();
        assert_eq!(h.record(Source::Probe, false, &T), None);
        assert_eq!(h.record(Source::Probe, false, &T), None);
        assert_eq!(h.record(Source::Probe, false, &T), Some(Local::Down));
        assert_eq!(h.record(Source::Probe, true, &T), None);
        assert_eq!(h.record(Source::Probe, false, &T), None); // streak broken
        assert_eq!(h.record(Source::Probe, true, &T), None);
        assert_eq!(h.record(Source::Probe, true, &T), Some(Local::Up));
    }

    #[test]
    fn a_pass_resets_the_fall_streak() {
        let mut h = LocalHealth::default();
        h.record(Source::Probe, false, &T);
        h.record(Source::Probe, false, &T);
        h.record(Source::Probe, true, &T);
        h.record(Source::Probe, false, &T);
        assert_eq!(h.record(Source::Probe, false, &T), None);
        assert_eq!(h.state(), Local::Up);
    }

    #[test]
    fn traffic_failures_in_a_row() {
        let mut h = LocalHealth::default();
        for _ in 0..4 {
            assert_eq!(h.record(Source::Traffic, false, &T), None);
        }
        h.record(Source::Traffic, true, &T);
        for _ in 0..4 {
            assert_eq!(h.record(Source::Traffic, false, &T), None);
        }
        assert_eq!(h.record(Source::Traffic, false, &T), Some(Local::Down));
        assert_eq!(h.record(Source::Traffic, true, &T), Some(Local::Up));
    }

    #[test]
    fn traffic_cannot_undo_a_failed_health_check() {
        let mut h = LocalHealth::default();
        for _ in 0..3 {
            h.record(Source::Probe, false, &T);
        }
        assert_eq!(h.down_by(), Some(Source::Probe));
        assert_eq!(h.record(Source::Traffic, true, &T), None);
        assert_eq!(h.state(), Local::Down);
        h.record(Source::Probe, true, &T);
        assert_eq!(h.record(Source::Probe, true, &T), Some(Local::Up));
        assert_eq!(h.down_by(), None);
    }

    #[test]
    fn forgetting_probes_undoes_only_what_probes_did() {
        let mut h = LocalHealth::default();
        for _ in 0..3 {
            h.record(Source::Probe, false, &T);
        }
        assert_eq!(h.forget_probes(), Some(Local::Up));
        assert_eq!(h.state(), Local::Up);
        for _ in 0..5 {
            h.record(Source::Traffic, false, &T);
        }
        assert_eq!(h.state(), Local::Down);
        assert_eq!(h.forget_probes(), None);
        assert_eq!(h.state(), Local::Down);
    }

    #[test]
    fn passive_off() {
        let t = Thresholds {
            passive_failures: 0,
            ..T
        };
        let mut h = LocalHealth::default();
        for _ in 0..100 {
            assert_eq!(h.record(Source::Traffic, false, &t), None);
        }
    }

    fn voters(n: usize) -> BTreeSet<NodeId> {
        (0..n).map(|i| NodeId::new(format!("p{i}"))).collect()
    }

    #[test]
    fn probers_are_k_live_voters_and_a_dead_one_is_replaced_alone() {
        let all = voters(7);
        let mut counts = BTreeMap::new();
        for b in 0..300 {
            let id = BackendId::new(format!("b{b}"));
            let picked = probers(&id, &all, &[], 3).unwrap();
            assert_eq!(picked.len(), 3);
            for p in &picked {
                *counts.entry((*p).clone()).or_insert(0) += 1;
            }
            // One prober dies: the other two stay, one new one comes in, never the dead one.
            let dead = [picked[0].clone()];
            let after = probers(&id, &all, &dead, 3).unwrap();
            assert_eq!(after.len(), 3);
            assert!(!after.contains(&picked[0]));
            assert!(after.contains(&picked[1]) && after.contains(&picked[2]));
            // Fewer live voters than k: all of them.
            let dead: Vec<NodeId> = all.iter().skip(2).cloned().collect();
            assert_eq!(probers(&id, &all, &dead, 3).unwrap().len(), 2);
        }
        // Spread: every voter probes some backends, none far more than its share (900/7).
        assert_eq!(counts.len(), 7);
        assert!(
            counts.values().all(|&c| (80..=180).contains(&c)),
            "{counts:?}"
        );
        // Off, or no agreed voters: everyone probes.
        let x = BackendId::new("x");
        assert!(probers(&x, &all, &[], 0).is_none());
        assert!(is_prober(&x, &BTreeSet::new(), &[], 3, &NodeId::new("l")));
        assert!(!is_prober(&x, &all, &[], 3, &NodeId::new("learner")));
    }

    #[test]
    fn voter_follows_the_local_view_and_expires_dead_peers() {
        let me = NodeId::new("a");
        let mut pool = Pool::default()
            .apply(
                &PoolChange::seed(vec![Backend::new("x", "127.0.0.1:1", 1)]),
                &Rules::default(),
            )
            .unwrap();
        let x = BackendId::new("x");
        let mut v = Voter::new(me.clone(), 2_000);
        // Agreed and local views match: nothing to do.
        assert!(v.reconcile(&pool, |_| true, &[], 0).is_empty());
        // Local down: vote once, not again before the revote period, again after it.
        let down = v.reconcile(&pool, |_| false, &[], 10);
        assert_eq!(
            down,
            vec![PoolChange::VoteDown {
                id: x.clone(),
                peer: me.clone()
            }]
        );
        assert!(v.reconcile(&pool, |_| false, &[], 1_000).is_empty());
        assert_eq!(v.reconcile(&pool, |_| false, &[], 2_010), down);
        // The vote landed: nothing more; back up: vote up.
        pool.backends
            .get_mut(&x)
            .unwrap()
            .down_votes
            .insert(me.clone());
        assert!(v.reconcile(&pool, |_| false, &[], 2_020).is_empty());
        assert_eq!(
            v.reconcile(&pool, |_| true, &[], 2_030),
            vec![PoolChange::VoteUp {
                id: x.clone(),
                peer: me.clone()
            }]
        );
        // A dead peer's votes are expired, once per revote period.
        let b = NodeId::new("b");
        pool.backends
            .get_mut(&x)
            .unwrap()
            .down_votes
            .insert(b.clone());
        let dead = [b.clone()];
        let out = v.reconcile(&pool, |_| false, &dead, 3_000);
        assert_eq!(out, vec![PoolChange::ExpireVotes { peer: b.clone() }]);
        assert!(v.reconcile(&pool, |_| false, &dead, 3_100).is_empty());
        assert!(!v.idle());
        // The expiry landed: the voter is idle again (it ticks only while something waits).
        pool.backends.get_mut(&x).unwrap().down_votes.remove(&b);
        assert!(v.reconcile(&pool, |_| false, &dead, 3_200).is_empty());
        assert!(v.idle());
        // A vote on a backend that leaves the pool before it lands waits no more.
        assert_eq!(v.reconcile(&pool, |_| true, &[], 3_300).len(), 1);
        assert!(!v.idle());
        pool.backends.remove(&x);
        assert!(v.reconcile(&pool, |_| true, &[], 3_400).is_empty());
        assert!(v.idle());
    }
}
