//! The typed changes peers agree on, the rules they apply under, and why one may not apply.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::{
    Backend, BackendId, InvalidBackend, NodeId, Pool, Protocol, ServiceDef, ServiceSeed,
    MAX_BACKENDS, MAX_POOL_BYTES,
};

/// What `apply_once` did. (A return value, matched at once: the pool is not boxed.)
#[derive(Clone, Debug, PartialEq, Eq)]
#[allow(clippy::large_enum_variant)]
pub enum Applied {
    /// The next pool (the same one if the change was a no-op).
    Next(Pool),
    /// This change (origin, seq) is already in the pool.
    Already,
}

/// Rules a change is applied under. Every peer is configured with the same values; the proposer's
/// are the ones that count, since the committed pool is what everyone learns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rules {
    /// Number of peers in the cluster (acceptors), this one included.
    pub cluster_size: usize,
    /// At most floor(pct * backends / 100) backends ejected at once.
    pub max_ejected_percent: u8,
    /// `health.probers`: each backend's health votes count among this many assigned probers
    /// (0: among all voters).
    pub probers: usize,
    /// The proposer's wall clock (Unix milliseconds) as it applies the change: a backend that
    /// becomes usable records it (`usable_since`). 0: not recorded.
    pub now_unix_ms: u64,
}

impl Rules {
    pub fn majority(&self) -> usize {
        self.cluster_size / 2 + 1
    }

    /// How many peers' health votes count for one backend: its assigned probers, or every voter.
    pub fn health_voters(&self) -> usize {
        match self.probers {
            0 => self.cluster_size,
            k => k.min(self.cluster_size),
        }
    }
}

impl Default for Rules {
    fn default() -> Self {
        Self {
            cluster_size: 1,
            max_ejected_percent: 50,
            probers: 0,
            now_unix_ms: 0,
        }
    }
}

/// A typed change to the pool.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum PoolChange {
    /// The identity: a read run as a full round.
    Read,
    /// Form the cluster: the pool from config, a new cluster id and the first voters; only
    /// when no pool exists yet.
    Seed {
        backends: Vec<Backend>,
        #[serde(default)]
        cluster_id: String,
        #[serde(default)]
        voters: BTreeSet<NodeId>,
        /// The services besides `default`, with their seed backends.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        services: Vec<ServiceSeed>,
    },
    AddBackend {
        backend: Backend,
    },
    RemoveBackend {
        id: BackendId,
    },
    SetWeight {
        id: BackendId,
        weight: u32,
    },
    /// Operator state: `Active` (undrain) or `Draining`.
    SetState {
        id: BackendId,
        draining: bool,
    },
    VoteDown {
        id: BackendId,
        peer: NodeId,
    },
    VoteUp {
        id: BackendId,
        peer: NodeId,
    },
    /// Forget every vote of a peer the detector declared dead.
    ExpireVotes {
        peer: NodeId,
    },
    /// Add a member: a voter (which starts a new membership epoch) or a recorded learner. A
    /// recorded learner added as a voter is promoted.
    AddPeer {
        id: NodeId,
        addr: String,
        #[serde(default)]
        learner: bool,
    },
    /// A membership change (`AddPeer` or `RemovePeer`) made by autopilot, and why: the pool
    /// keeps the reason, so every peer's `membership_changed` event names it.
    Autopilot {
        change: Box<PoolChange>,
        why: String,
    },
    /// Remove a member; removing a voter starts a new membership epoch and drops its votes.
    RemovePeer {
        id: NodeId,
    },
    /// Re-derive ejections from the recorded votes under the proposer's rules (after a reload
    /// changed the ejection cap); a new version only if a state changed.
    Settle,
    /// A peer's discovery vote for one source: the addresses (`IP:PORT`) its answers held
    /// within `remove_after`. An address joins the pool once a majority see it and leaves once
    /// a majority do not.
    Sightings {
        source: String,
        peer: NodeId,
        weight: u32,
        addrs: Vec<String>,
        /// The source's protocol, given to the backends it adds.
        #[serde(default, skip_serializing_if = "Protocol::is_http1")]
        protocol: Protocol,
    },
    /// A voter that started without its state caught up: the identity, one membership epoch
    /// up (the same voters), so that no ballot of its earlier life counts again. A promise it
    /// made before it lost its disk may still be on the wire or held by a proposer; every
    /// acceptor that holds this value refuses that ballot's epoch. No change for a non-voter.
    Fence {
        peer: NodeId,
    },
    /// A change to the backends of one service (`default` is the top-level one).
    Service {
        service: String,
        change: Box<PoolChange>,
    },
    /// Create or replace a service's definition; its backends stay.
    PutService {
        name: String,
        def: ServiceDef,
    },
    /// Remove a service and its pool.
    RemoveService {
        name: String,
    },
    /// A config file's services as one change: each definition replaces the agreed one, and a
    /// service new to the register is seeded with the file's backends.
    ApplyServices {
        services: Vec<ServiceSeed>,
    },
}

impl PoolChange {
    /// Seed `backends` with no cluster id or voters (tests, benches, a lone pool).
    pub fn seed(backends: Vec<Backend>) -> Self {
        PoolChange::Seed {
            backends,
            cluster_id: String::new(),
            voters: BTreeSet::new(),
            services: Vec::new(),
        }
    }

    /// `change` to service `service`'s backends (`default` needs no wrapping).
    pub fn in_service(service: &str, change: PoolChange) -> Self {
        if service == super::DEFAULT_SERVICE {
            return change;
        }
        PoolChange::Service {
            service: service.to_string(),
            change: Box::new(change),
        }
    }

    /// The change's name, as its JSON `op` says it.
    pub fn name(&self) -> &'static str {
        match self {
            PoolChange::Read => "read",
            PoolChange::Seed { .. } => "seed",
            PoolChange::AddBackend { .. } => "add_backend",
            PoolChange::RemoveBackend { .. } => "remove_backend",
            PoolChange::SetWeight { .. } => "set_weight",
            PoolChange::SetState { .. } => "set_state",
            PoolChange::VoteDown { .. } => "vote_down",
            PoolChange::VoteUp { .. } => "vote_up",
            PoolChange::ExpireVotes { .. } => "expire_votes",
            PoolChange::AddPeer { .. } => "add_peer",
            PoolChange::RemovePeer { .. } => "remove_peer",
            PoolChange::Autopilot { .. } => "autopilot",
            PoolChange::Settle => "settle",
            PoolChange::Sightings { .. } => "sightings",
            PoolChange::Fence { .. } => "fence",
            PoolChange::Service { .. } => "service",
            PoolChange::PutService { .. } => "put_service",
            PoolChange::RemoveService { .. } => "remove_service",
            PoolChange::ApplyServices { .. } => "apply_services",
        }
    }
}

/// Why a change was refused; the pool is unchanged.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum ChangeError {
    #[error("backend {0} already exists")]
    Exists(BackendId),
    #[error("backend {0} not found")]
    NotFound(BackendId),
    #[error("a pool exists already (version {0}); seeds apply only to a new cluster")]
    AlreadySeeded(u64),
    #[error("address {0} is already used by backend {1}")]
    AddrInUse(String, BackendId),
    #[error("{field}: {0}", field = .0.field())]
    Invalid(InvalidBackend),
    #[error("the pool holds at most {MAX_BACKENDS} backends")]
    Full,
    #[error("the pool would take {0} bytes, over the {MAX_POOL_BYTES} a peer frame may carry; nothing changed")]
    TooLarge(usize),
    #[error("peer {0} is already a member")]
    PeerExists(NodeId),
    #[error("peer {0} is not a member")]
    PeerNotFound(NodeId),
    #[error("peer {0} is the last voter; add another voter before removing it")]
    LastVoter(NodeId),
    #[error("{0}")]
    InvalidPeer(String),
    #[error("service {0} not found")]
    ServiceNotFound(String),
    #[error("{0}")]
    InvalidService(String),
    #[error("service default: {0}")]
    DefaultService(String),
    #[error("host {host} with path prefix {prefix} already routes to service {service}")]
    RouteTaken {
        host: String,
        prefix: String,
        service: String,
    },
}
