//! Discovered addresses and the peers that see them (their discovery votes).

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use std::collections::BTreeMap;

use super::{
    normalize_addr, weight_ok, Backend, BackendId, ChangeError, NodeId, Pool, Protocol, Rules,
    MAX_BACKENDS,
};

/// An address that discovery found, and the peers whose latest answers hold it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Sighting {
    pub source: String,
    pub addr: String,
    pub weight: u32,
    pub seen_by: BTreeSet<NodeId>,
    /// The source's protocol (HTTP/1.1 unless it says `h2`).
    #[serde(default, skip_serializing_if = "Protocol::is_http1")]
    pub protocol: Protocol,
}

/// The id of a discovered backend: `NAME/IP:PORT`.
pub fn discovered_id(source: &str, addr: &str) -> BackendId {
    BackendId::new(format!("{source}/{addr}"))
}

impl Pool {
    /// `Sightings`: one peer's discovery vote for one source replaces its earlier one.
    pub(super) fn record_sightings(
        &mut self,
        source: &str,
        peer: &NodeId,
        weight: u32,
        addrs: &[String],
        protocol: Protocol,
    ) -> Result<(), ChangeError> {
        weight_ok(weight)?;
        if addrs.len() > MAX_BACKENDS {
            return Err(ChangeError::Full);
        }
        let mut want = BTreeSet::new();
        for a in addrs {
            let addr = normalize_addr(a).map_err(ChangeError::Invalid)?;
            want.insert(addr);
        }
        for s in self.sightings.values_mut().filter(|s| s.source == source) {
            if want.remove(&s.addr) {
                s.seen_by.insert(peer.clone());
                s.weight = weight;
                s.protocol = protocol;
            } else {
                s.seen_by.remove(peer);
            }
        }
        for addr in want {
            self.sightings.insert(
                discovered_id(source, &addr),
                Sighting {
                    source: source.to_string(),
                    addr,
                    weight,
                    seen_by: BTreeSet::from([peer.clone()]),
                    protocol,
                },
            );
        }
        self.sightings.retain(|_, s| !s.seen_by.is_empty());
        Ok(())
    }

    /// Discovered backends follow the sightings: one joins once a majority of peers see it, and
    /// leaves once a majority do not (a backend that only a minority still sees holds, with an
    /// even cluster, in the band between).
    pub(super) fn settle_discovery(&mut self, rules: &Rules) {
        let (n, majority) = (rules.cluster_size, rules.majority());
        for (id, s) in &self.sightings {
            if self.counted(&s.seen_by) >= majority
                && !self.backends.contains_key(id)
                && self.backends.len() < MAX_BACKENDS
            {
                let mut b = Backend::new(id.as_str(), s.addr.clone(), s.weight);
                b.source = Some(s.source.clone());
                self.backends.insert(id.clone(), b);
            }
        }
        // A discovered backend's protocol is its source's, from when it joins and whenever the
        // setting changes (the admin API does not change it).
        for (id, b) in self.backends.iter_mut().filter(|(_, b)| b.source.is_some()) {
            if let Some(s) = self.sightings.get(id) {
                b.protocol = s.protocol;
            }
        }
        let seen: BTreeMap<BackendId, usize> = self
            .sightings
            .iter()
            .map(|(id, s)| (id.clone(), self.counted(&s.seen_by)))
            .collect();
        self.backends.retain(|id, b| {
            if b.source.is_none() {
                return true;
            }
            let seen = seen.get(id).copied().unwrap_or(0);
            n.saturating_sub(seen) < majority
        });
    }
}
