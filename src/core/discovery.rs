//! One peer's discovery vote for one source, from its own DNS answers (pure: answers and time
//! come in, the change to propose goes out).
//!
//! The vote is every address an answer held within `remove_after`: a flapping answer does not
//! flap the vote. A failed resolution (the resolver down) changes nothing: this peer keeps its
//! last vote instead of voting "empty". The pool counts the votes (`PoolChange::Sightings`): an
//! address joins once a majority of peers see it and leaves once a majority do not.

use std::collections::BTreeMap;

use super::pool::{normalize_addr, NodeId, Pool, PoolChange, Protocol};

#[derive(Debug)]
pub struct Tracker {
    source: String,
    weight: u32,
    protocol: Protocol,
    remove_after_ms: u64,
    revote_after_ms: u64,
    /// Each address of a successful answer, and when an answer last held it.
    last_seen: BTreeMap<String, u64>,
    /// No answer yet, or the last resolution failed: no vote.
    voting: bool,
    /// The vote proposed last and when, while the pool does not show it yet.
    pending: Option<(Vec<String>, u64)>,
}

impl Tracker {
    pub fn new(source: &str, weight: u32, remove_after_ms: u64, revote_after_ms: u64) -> Self {
        Self {
            source: source.to_string(),
            weight,
            protocol: Protocol::Http1,
            remove_after_ms,
            revote_after_ms,
            last_seen: BTreeMap::new(),
            voting: false,
            pending: None,
        }
    }

    /// The backends this source adds are spoken to with `protocol`.
    pub fn with_protocol(mut self, protocol: Protocol) -> Self {
        self.protocol = protocol;
        self
    }

    /// Record a resolution: `Some(addrs)` an answer (maybe empty: the name has no records),
    /// `None` a failure.
    pub fn answer(&mut self, now_ms: u64, answer: Option<&[String]>) {
        let Some(addrs) = answer else {
            self.voting = false;
            return;
        };
        self.voting = true;
        for a in addrs {
            if let Ok(a) = normalize_addr(a) {
                self.last_seen.insert(a, now_ms);
            }
        }
        let keep = self.remove_after_ms;
        self.last_seen
            .retain(|_, at| now_ms.saturating_sub(*at) < keep);
    }

    /// This peer's vote now: the addresses seen within `remove_after`, in order.
    pub fn vote(&self, now_ms: u64) -> Vec<String> {
        self.last_seen
            .iter()
            .filter(|(_, at)| now_ms.saturating_sub(**at) < self.remove_after_ms)
            .map(|(a, _)| a.clone())
            .collect()
    }

    /// The change to propose when the pool does not show this peer's vote (again after
    /// `revote_after`, in case a proposal was lost).
    pub fn reconcile(&mut self, pool: &Pool, me: &NodeId, now_ms: u64) -> Option<PoolChange> {
        if !self.voting || !pool.exists() {
            return None;
        }
        let want = self.vote(now_ms);
        let shown: Vec<String> = pool
            .sightings
            .values()
            .filter(|s| s.source == self.source && s.seen_by.contains(me))
            .map(|s| s.addr.clone())
            .collect();
        let settings_shown = pool
            .sightings
            .values()
            .filter(|s| s.source == self.source)
            .all(|s| s.weight == self.weight && s.protocol == self.protocol);
        if want == shown && settings_shown {
            self.pending = None;
            return None;
        }
        if let Some((v, at)) = &self.pending {
            if *v == want && now_ms.saturating_sub(*at) < self.revote_after_ms {
                return None;
            }
        }
        self.pending = Some((want.clone(), now_ms));
        Some(PoolChange::Sightings {
            source: self.source.clone(),
            peer: me.clone(),
            weight: self.weight,
            addrs: want,
            protocol: self.protocol,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::pool::{BackendId, Rules};

    fn rules() -> Rules {
        Rules {
            cluster_size: 3,
            max_ejected_percent: 50,
            ..Rules::default()
        }
    }

    fn vote(pool: &Pool, t: &mut Tracker, me: &str, now: u64) -> Pool {
        match t.reconcile(pool, &NodeId::new(me), now) {
            Some(c) => pool.apply(&c, &rules()).unwrap(),
            None => pool.clone(),
        }
    }

    fn ids(p: &Pool) -> Vec<String> {
        p.backends.keys().map(|k| k.as_str().to_string()).collect()
    }

    #[test]
    fn a_majority_adds_and_a_majority_removes() {
        let mut pool = Pool::default()
            .apply(&PoolChange::seed(vec![]), &rules())
            .unwrap();
        let mut t: Vec<Tracker> = (0..3).map(|_| Tracker::new("web", 2, 3000, 1000)).collect();
        let both = ["10.0.0.1:80".to_string(), "10.0.0.2:80".to_string()];
        // One peer sees two addresses: nothing joins.
        t[0].answer(0, Some(&both));
        pool = vote(&pool, &mut t[0], "a", 0);
        assert!(pool.backends.is_empty());
        assert_eq!(pool.sightings.len(), 2);
        // A second one: both join, as `web/IP:PORT` with the source's weight.
        t[1].answer(0, Some(&both));
        pool = vote(&pool, &mut t[1], "b", 0);
        assert_eq!(ids(&pool), vec!["web/10.0.0.1:80", "web/10.0.0.2:80"]);
        assert_eq!(pool.backends[&BackendId::new("web/10.0.0.1:80")].weight, 2);
        // The third sees only one of them; nothing changes.
        t[2].answer(0, Some(&both[..1]));
        pool = vote(&pool, &mut t[2], "c", 0);
        assert_eq!(ids(&pool).len(), 2);
        // .2 leaves the answers of a and b: it stays until remove_after, then leaves.
        for (i, me) in [(0, "a"), (1, "b")] {
            t[i].answer(1000, Some(&both[..1]));
            pool = vote(&pool, &mut t[i], me, 1000);
        }
        assert_eq!(ids(&pool).len(), 2, "held within remove_after");
        for (i, me) in [(0, "a"), (1, "b")] {
            t[i].answer(3500, Some(&both[..1]));
            pool = vote(&pool, &mut t[i], me, 3500);
        }
        assert_eq!(ids(&pool), vec!["web/10.0.0.1:80"]);
    }

    /// A source's protocol goes to the backends it adds, and a changed setting (a reload) is
    /// voted again and followed by them.
    #[test]
    fn the_sources_protocol_goes_to_its_backends() {
        let mut pool = Pool::default()
            .apply(&PoolChange::seed(vec![]), &rules())
            .unwrap();
        let addr = ["10.0.0.1:80".to_string()];
        let mut t: Vec<Tracker> = (0..2)
            .map(|_| Tracker::new("grpc", 1, 3000, 1000).with_protocol(Protocol::H2))
            .collect();
        for (i, me) in [(0, "a"), (1, "b")] {
            t[i].answer(0, Some(&addr));
            pool = vote(&pool, &mut t[i], me, 0);
        }
        let id = BackendId::new("grpc/10.0.0.1:80");
        assert_eq!(pool.backends[&id].protocol, Protocol::H2);
        // Stored with the vote (the pool's JSON), so every peer builds the same backend.
        let text = serde_json::to_string(&pool).unwrap();
        assert_eq!(serde_json::from_str::<Pool>(&text).unwrap(), pool);
        // Back to HTTP/1.1 on one peer: the vote differs from what the pool shows, so it is
        // proposed again, and the backend follows.
        let mut back = Tracker::new("grpc", 1, 3000, 1000);
        back.answer(10, Some(&addr));
        pool = vote(&pool, &mut back, "a", 10);
        assert_eq!(pool.backends[&id].protocol, Protocol::Http1);
        assert_eq!(ids(&pool), vec!["grpc/10.0.0.1:80"]);
    }

    #[test]
    fn a_failing_resolver_keeps_the_last_vote() {
        let pool = Pool::default()
            .apply(&PoolChange::seed(vec![]), &rules())
            .unwrap();
        let mut t = Tracker::new("web", 1, 3000, 1000);
        // Never answered: no vote at all (not an empty one).
        t.answer(0, None);
        assert!(t.reconcile(&pool, &NodeId::new("a"), 0).is_none());
        t.answer(0, Some(&["10.0.0.1:80".to_string()]));
        let pool = vote(&pool, &mut t, "a", 0);
        assert_eq!(pool.sightings.len(), 1);
        // Down for much longer than remove_after: no change proposed.
        t.answer(10_000, None);
        assert!(t.reconcile(&pool, &NodeId::new("a"), 60_000).is_none());
    }
}
