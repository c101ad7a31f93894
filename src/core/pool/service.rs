//! Services: several web services behind the same peers, each with its own agreed pool, in the
//! one register. The top-level backends and sightings are the service `default`; every other
//! service is an entry of `Pool::services`, holding its definition (how requests reach it, and
//! its balancing and health keys that differ from the top-level ones) and its own backends.
//!
//! A change to one service's backends is the same typed change wrapped in `PoolChange::Service`:
//! it applies to that service's sub-pool, by the very same rules, and the register's version
//! rises once.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{Backend, BackendId, ChangeError, Pool, PoolChange, Rules, Sighting, MAX_BACKENDS};

/// The service the top-level config describes (`[[backends]]`, `[balance]`, `[health]`).
pub const DEFAULT_SERVICE: &str = "default";
/// At most this many services besides `default` (each is one host lookup entry and one table).
pub const MAX_SERVICES: usize = 5_000;
/// At most this many host patterns per service.
pub const MAX_HOSTS: usize = 100;

/// Keys of `[balance]` or `[health]` a service sets for itself, as given (the rest are the
/// top-level values of each peer's config). Ordered, so equal definitions encode equal.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Overrides(pub BTreeMap<String, serde_json::Value>);

impl Overrides {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// A whole number set for `key`, if any.
    pub fn number(&self, key: &str) -> Option<u64> {
        self.0.get(key).and_then(serde_json::Value::as_u64)
    }
}

impl Hash for Overrides {
    fn hash<H: Hasher>(&self, state: &mut H) {
        for (k, v) in &self.0 {
            k.hash(state);
            v.to_string().hash(state);
        }
    }
}

/// How requests reach a service, and the balancing and health keys it sets for itself.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceDef {
    /// Host patterns (lowercase, no port): exact, or `*.` + suffix; empty = any host.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// The path prefix a request's path starts with (none = "/").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// Remove the prefix before forwarding.
    #[serde(default)]
    pub strip_prefix: bool,
    #[serde(default, skip_serializing_if = "Overrides::is_empty")]
    pub balance: Overrides,
    #[serde(default, skip_serializing_if = "Overrides::is_empty")]
    pub health: Overrides,
}

/// One service besides `default`: its definition and its agreed backends.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Service {
    pub def: ServiceDef,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub backends: BTreeMap<BackendId, Backend>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sightings: BTreeMap<BackendId, Sighting>,
}

/// A service as a config file declares it: its definition and the backends that seed it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ServiceSeed {
    pub name: String,
    pub def: ServiceDef,
    #[serde(default)]
    pub backends: Vec<Backend>,
}

/// "NAME: " before an event's or log's text about a service other than `default` (whose texts
/// read as they did before services).
pub fn service_prefix(service: &str) -> String {
    if service == DEFAULT_SERVICE {
        String::new()
    } else {
        format!("{service}: ")
    }
}

/// Service names: `[a-z0-9-]{1,32}`, like node ids.
pub fn valid_service_name(s: &str) -> bool {
    super::valid_node_id(s)
}

/// A host pattern as stored: lowercase, no port; an exact name or `*.` + a name.
pub fn check_host_pattern(h: &str) -> Result<String, String> {
    let lower = h.to_ascii_lowercase();
    let name = lower.strip_prefix("*.").unwrap_or(&lower);
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(format!(
            "bad host pattern {h:?} (expected a host name without port, or \"*.\" and a name)"
        ));
    }
    Ok(lower)
}

/// A path prefix: starts with "/", a valid path, no query.
pub fn check_path_prefix(p: &str) -> Result<(), String> {
    let ok = p.starts_with('/')
        && p.len() <= 1024
        && !p.contains(['?', '#'])
        && p.parse::<http::uri::PathAndQuery>().is_ok();
    if ok {
        Ok(())
    } else {
        Err(format!(
            "bad path prefix {p:?} (expected a path starting with /, without query)"
        ))
    }
}

impl ServiceDef {
    /// The definition with its host patterns normalized, or why it is not valid (naming the
    /// key, e.g. `hosts[0]: ...`).
    pub fn checked(mut self) -> Result<ServiceDef, String> {
        if self.hosts.len() > MAX_HOSTS {
            return Err(format!("hosts: at most {MAX_HOSTS} patterns"));
        }
        let mut seen = BTreeSet::new();
        for (i, h) in self.hosts.iter_mut().enumerate() {
            *h = check_host_pattern(h).map_err(|e| format!("hosts[{i}]: {e}"))?;
            if !seen.insert(h.clone()) {
                return Err(format!("hosts[{i}]: {h:?} is listed twice"));
            }
        }
        if let Some(p) = &self.path_prefix {
            check_path_prefix(p).map_err(|e| format!("path_prefix: {e}"))?;
        }
        if self.strip_prefix && self.path_prefix.is_none() {
            return Err("strip_prefix: needs a path_prefix".into());
        }
        Ok(self)
    }

    /// The (host, prefix) pairs requests reach it by ("" for any host).
    pub fn routes(&self) -> Vec<(&str, &str)> {
        let prefix = self.path_prefix.as_deref().unwrap_or("/");
        if self.hosts.is_empty() {
            return vec![("", prefix)];
        }
        self.hosts.iter().map(|h| (h.as_str(), prefix)).collect()
    }
}

impl Pool {
    /// The pool of service `name` as its own register value: the same version, cluster and
    /// voters, that service's backends. `default` is the top-level one.
    pub fn service_view(&self, name: &str) -> Option<Pool> {
        if name == DEFAULT_SERVICE {
            let mut p = self.clone();
            p.services.clear();
            return Some(p);
        }
        let s = self.services.get(name)?;
        Some(Pool {
            version: self.version,
            backends: s.backends.clone(),
            sightings: s.sightings.clone(),
            cluster_id: self.cluster_id.clone(),
            voters: self.voters.clone(),
            epoch: self.epoch,
            through: self.through.clone(),
            ..Pool::default()
        })
    }

    /// The agreed backends of service `name` (`default`: the top-level ones).
    pub fn backends_of(&self, name: &str) -> Option<&BTreeMap<BackendId, Backend>> {
        if name == DEFAULT_SERVICE {
            return Some(&self.backends);
        }
        self.services.get(name).map(|s| &s.backends)
    }

    /// Every service's name, `default` first, then the others sorted.
    pub fn service_names(&self) -> impl Iterator<Item = &str> {
        std::iter::once(DEFAULT_SERVICE).chain(self.services.keys().map(String::as_str))
    }

    /// The rules a change to service `name` applies under: its own `max_ejected_percent` and
    /// `probers` where it sets them, else the proposer's.
    pub fn service_rules(&self, name: &str, rules: &Rules) -> Rules {
        let own = |key| {
            self.services
                .get(name)
                .and_then(|s| s.def.health.number(key))
        };
        let pct = own("max_ejected_percent")
            .and_then(|n| u8::try_from(n).ok())
            .filter(|n| *n <= 100);
        let probers = own("probers").and_then(|n| usize::try_from(n).ok());
        Rules {
            max_ejected_percent: pct.unwrap_or(rules.max_ejected_percent),
            probers: probers.unwrap_or(rules.probers),
            ..*rules
        }
    }

    /// `change` applied to service `name`'s pool.
    pub(super) fn apply_in_service(
        &mut self,
        name: &str,
        change: &PoolChange,
        rules: &Rules,
    ) -> Result<(), ChangeError> {
        match change {
            PoolChange::AddBackend { .. }
            | PoolChange::RemoveBackend { .. }
            | PoolChange::SetWeight { .. }
            | PoolChange::SetState { .. }
            | PoolChange::VoteDown { .. }
            | PoolChange::VoteUp { .. }
            | PoolChange::ExpireVotes { .. }
            | PoolChange::Settle
            | PoolChange::Read
            | PoolChange::Sightings { .. } => {}
            other => {
                return Err(ChangeError::InvalidService(format!(
                    "{} does not apply to one service",
                    other.name()
                )))
            }
        }
        if name == DEFAULT_SERVICE {
            let sub = self
                .service_view(name)
                .unwrap_or_default()
                .apply(change, rules)?;
            self.backends = sub.backends;
            self.sightings = sub.sightings;
            return Ok(());
        }
        let rules = self.service_rules(name, rules);
        let sub = self
            .service_view(name)
            .ok_or_else(|| ChangeError::ServiceNotFound(name.to_string()))?;
        let next = sub.apply(change, &rules)?;
        if let Some(s) = self.services.get_mut(name) {
            let s = Arc::make_mut(s);
            s.backends = next.backends;
            s.sightings = next.sightings;
        }
        Ok(())
    }

    /// Create or replace service `name`'s definition (its backends stay).
    pub(super) fn put_service(&mut self, name: &str, def: &ServiceDef) -> Result<(), ChangeError> {
        if name == DEFAULT_SERVICE {
            return Err(ChangeError::DefaultService(
                "its definition is the top-level [balance] and [health] of each peer's config"
                    .into(),
            ));
        }
        if !valid_service_name(name) {
            return Err(ChangeError::InvalidService(format!(
                "name {name:?}: expected 1-32 characters of a-z, 0-9 and -"
            )));
        }
        let def = def.clone().checked().map_err(ChangeError::InvalidService)?;
        if !self.services.contains_key(name) && self.services.len() >= MAX_SERVICES {
            return Err(ChangeError::InvalidService(format!(
                "at most {MAX_SERVICES} services"
            )));
        }
        for (other, s) in &self.services {
            if other == name {
                continue;
            }
            let theirs = s.def.routes();
            for (host, prefix) in def.routes() {
                if theirs.contains(&(host, prefix)) {
                    return Err(ChangeError::RouteTaken {
                        host: if host.is_empty() { "*any*" } else { host }.to_string(),
                        prefix: prefix.to_string(),
                        service: other.clone(),
                    });
                }
            }
        }
        let s = self.services.entry(name.to_string()).or_default();
        if s.def != def {
            Arc::make_mut(s).def = def;
        }
        Ok(())
    }

    pub(super) fn remove_service(&mut self, name: &str) -> Result<(), ChangeError> {
        if name == DEFAULT_SERVICE {
            return Err(ChangeError::DefaultService(
                "it is the top-level one and cannot be removed".into(),
            ));
        }
        self.services
            .remove(name)
            .map(drop)
            .ok_or_else(|| ChangeError::ServiceNotFound(name.to_string()))
    }

    /// Seed or update services from a config file: each definition replaces the agreed one; a
    /// service new to the register is seeded with its backends.
    pub(super) fn apply_services(&mut self, seeds: &[ServiceSeed]) -> Result<(), ChangeError> {
        for s in seeds {
            let new = !self.services.contains_key(&s.name);
            self.put_service(&s.name, &s.def)?;
            if new {
                if s.backends.len() > MAX_BACKENDS {
                    return Err(ChangeError::Full);
                }
                let svc = Arc::make_mut(self.services.get_mut(&s.name).expect("just put"));
                for b in &s.backends {
                    b.check().map_err(ChangeError::Invalid)?;
                    if svc.backends.contains_key(&b.id) {
                        return Err(ChangeError::Exists(b.id.clone()));
                    }
                    let mut b = b.clone();
                    b.state = super::BackendState::Active;
                    b.down_votes.clear();
                    svc.backends.insert(b.id.clone(), b);
                }
            }
        }
        Ok(())
    }

    /// Each service's ejections re-derived from its votes (after the voters changed).
    pub(super) fn settle_services(&mut self, rules: &Rules, forget: Option<&super::NodeId>) {
        let names: Vec<String> = self.services.keys().cloned().collect();
        for name in names {
            let rules = self.service_rules(&name, rules);
            let Some(mut sub) = self.service_view(&name) else {
                continue;
            };
            if let Some(peer) = forget {
                sub.forget_votes(peer);
            }
            sub.settle_discovery(&rules);
            sub.settle(&rules);
            if let Some(s) = self.services.get_mut(&name) {
                if s.backends != sub.backends || s.sightings != sub.sightings {
                    let s = Arc::make_mut(s);
                    s.backends = sub.backends;
                    s.sightings = sub.sightings;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::pool::{BackendState, NodeId};

    fn rules() -> Rules {
        Rules {
            cluster_size: 3,
            max_ejected_percent: 50,
            ..Rules::default()
        }
    }

    fn def(hosts: &[&str], prefix: Option<&str>) -> ServiceDef {
        ServiceDef {
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            path_prefix: prefix.map(str::to_string),
            ..ServiceDef::default()
        }
    }

    fn put(name: &str, d: ServiceDef) -> PoolChange {
        PoolChange::PutService {
            name: name.into(),
            def: d,
        }
    }

    fn add(service: &str, id: &str, port: u16) -> PoolChange {
        PoolChange::in_service(
            service,
            PoolChange::AddBackend {
                backend: Backend::new(id, format!("127.0.0.1:{port}"), 1),
            },
        )
    }

    fn apply(p: &Pool, c: &PoolChange) -> Pool {
        p.apply(c, &rules())
            .unwrap_or_else(|e| panic!("{c:?}: {e}"))
    }

    fn seeded() -> Pool {
        let p = apply(
            &Pool::default(),
            &PoolChange::seed(vec![Backend::new("d", "127.0.0.1:9000", 1)]),
        );
        apply(&p, &put("api", def(&["API.example.com"], None)))
    }

    #[test]
    fn a_change_to_one_service_leaves_the_others_and_bumps_the_version_once() {
        let p = seeded();
        assert_eq!(p.services["api"].def.hosts, ["api.example.com"]);
        let q = apply(&p, &add("api", "a", 9001));
        assert_eq!(q.version, p.version + 1);
        assert_eq!(q.backends, p.backends, "default untouched");
        assert!(q.services["api"]
            .backends
            .contains_key(&BackendId::new("a")));
        // The same address may serve two services; an id is unique within one.
        let r = apply(&q, &add("default", "a", 9001));
        assert!(r.backends.contains_key(&BackendId::new("a")));
        assert_eq!(
            r.apply(&add("api", "a", 9002), &rules()),
            Err(ChangeError::Exists(BackendId::new("a")))
        );
        // Changes to different services commute.
        let x = add("api", "x", 9100);
        let y = add("default", "y", 9101);
        let (xy, yx) = (apply(&apply(&r, &x), &y), apply(&apply(&r, &y), &x));
        assert_eq!(xy, yx);
        assert_eq!(
            r.apply(&add("nope", "z", 1), &rules()),
            Err(ChangeError::ServiceNotFound("nope".into()))
        );
    }

    #[test]
    fn definitions_are_checked_and_routes_are_unique() {
        let p = seeded();
        for (d, why) in [
            (def(&["bad host"], None), "hosts[0]"),
            (def(&["*."], None), "hosts[0]"),
            (def(&[], Some("v1")), "path_prefix"),
            (def(&["a.test", "A.test"], None), "hosts[1]"),
        ] {
            match p.apply(&put("x", d), &rules()) {
                Err(ChangeError::InvalidService(e)) => assert!(e.contains(why), "{e}"),
                other => panic!("{why}: {other:?}"),
            }
        }
        let strip = ServiceDef {
            strip_prefix: true,
            ..def(&[], None)
        };
        assert!(matches!(
            p.apply(&put("x", strip), &rules()),
            Err(ChangeError::InvalidService(_))
        ));
        assert!(matches!(
            p.apply(&put("other", def(&["api.example.com"], None)), &rules()),
            Err(ChangeError::RouteTaken { .. })
        ));
        // Same host, another prefix: fine; replacing one's own definition: fine.
        let q = apply(&p, &put("v2", def(&["api.example.com"], Some("/v2/"))));
        let r = apply(
            &q,
            &put("api", def(&["api.example.com", "*.example.org"], None)),
        );
        assert_eq!(r.services.len(), 2);
        assert!(matches!(
            r.apply(&put("default", def(&[], None)), &rules()),
            Err(ChangeError::DefaultService(_))
        ));
        assert!(matches!(
            r.apply(
                &PoolChange::RemoveService {
                    name: "default".into()
                },
                &rules()
            ),
            Err(ChangeError::DefaultService(_))
        ));
        let s = apply(&r, &PoolChange::RemoveService { name: "v2".into() });
        assert!(!s.services.contains_key("v2"));
        // A definition put again unchanged is no new version.
        let t = apply(&s, &put("api", s.services["api"].def.clone()));
        assert_eq!(t.version, s.version);
    }

    #[test]
    fn ejection_counts_each_service_by_its_own_cap_and_a_removed_voter_leaves_every_service() {
        let mut p = Pool::default()
            .apply(
                &PoolChange::Seed {
                    backends: vec![],
                    cluster_id: "c".into(),
                    voters: ["a", "b", "c"].into_iter().map(NodeId::new).collect(),
                    services: vec![ServiceSeed {
                        name: "api".into(),
                        def: ServiceDef {
                            health: Overrides(
                                [("max_ejected_percent".to_string(), serde_json::json!(0))]
                                    .into_iter()
                                    .collect(),
                            ),
                            ..def(&["api.test"], None)
                        },
                        backends: (0..3)
                            .map(|i| Backend::new(format!("a{i}"), format!("10.0.0.{i}:80"), 1))
                            .collect(),
                    }],
                },
                &rules(),
            )
            .unwrap();
        assert_eq!(p.services["api"].backends.len(), 3);
        for peer in ["a", "b"] {
            p = apply(
                &p,
                &PoolChange::in_service(
                    "api",
                    PoolChange::VoteDown {
                        id: BackendId::new("a0"),
                        peer: NodeId::new(peer),
                    },
                ),
            );
        }
        // api allows no ejection at all (its own cap), whatever the proposer's rules say.
        assert_eq!(
            p.services["api"].backends[&BackendId::new("a0")].state,
            BackendState::Active
        );
        let mut lenient = p.clone();
        Arc::make_mut(lenient.services.get_mut("api").unwrap())
            .def
            .health = Overrides::default();
        let q = apply(&lenient, &PoolChange::Settle);
        assert_eq!(
            q.services["api"].backends[&BackendId::new("a0")].state,
            BackendState::Ejected
        );
        // Removing a voter drops its votes in every service.
        let r = apply(
            &q,
            &PoolChange::RemovePeer {
                id: NodeId::new("a"),
            },
        );
        let a0 = &r.services["api"].backends[&BackendId::new("a0")];
        assert!(!a0.down_votes.contains(&NodeId::new("a")));
    }

    #[test]
    fn applying_a_file_seeds_only_services_new_to_the_register() {
        let p = seeded();
        let p = apply(&p, &add("api", "a", 9001));
        let seeds = vec![
            ServiceSeed {
                name: "api".into(),
                def: def(&["api.example.com"], Some("/api/")),
                backends: vec![Backend::new("other", "127.0.0.1:9500", 1)],
            },
            ServiceSeed {
                name: "web".into(),
                def: def(&["web.example.com"], None),
                backends: vec![Backend::new("w", "127.0.0.1:9600", 1)],
            },
        ];
        let q = apply(&p, &PoolChange::ApplyServices { services: seeds });
        assert_eq!(q.version, p.version + 1);
        assert_eq!(q.services["api"].def.path_prefix.as_deref(), Some("/api/"));
        let api: Vec<&str> = q.services["api"]
            .backends
            .keys()
            .map(|b| b.as_str())
            .collect();
        assert_eq!(api, ["a"], "an agreed service keeps its pool");
        assert!(q.services["web"]
            .backends
            .contains_key(&BackendId::new("w")));
    }
}
