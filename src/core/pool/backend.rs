//! A backend as the pool holds it, and the one place the rules for its address, id, weight
//! and protocol live.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::{BackendId, NodeId};

/// The agreed state of one backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    /// Takes new requests.
    Active,
    /// Takes no new requests; in-flight ones finish (set by an operator).
    Draining,
    /// Agreed down by a majority of peers' health checks.
    Ejected,
}

impl BackendState {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendState::Active => "active",
            BackendState::Draining => "draining",
            BackendState::Ejected => "ejected",
        }
    }
    pub const ALL: [BackendState; 3] = [
        BackendState::Active,
        BackendState::Draining,
        BackendState::Ejected,
    ];
}

/// One backend of the agreed pool.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Backend {
    pub id: BackendId,
    /// `host:port`, or `https://host:port` for upstream TLS.
    pub addr: String,
    /// 1..=1000.
    pub weight: u32,
    pub state: BackendState,
    /// Peers that currently see this backend down (their health votes).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub down_votes: BTreeSet<NodeId>,
    /// The discovery source that added it (id `NAME/IP:PORT`); None for backends added by hand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// How the peers talk to it (HTTP/1.1 unless it says `h2`).
    #[serde(default, skip_serializing_if = "Protocol::is_http1")]
    pub protocol: Protocol,
    /// When it last became usable (added, restored, undrained), Unix milliseconds, by the
    /// proposer's clock: every peer ramps it from this instant (`health.slow_start`). 0: not
    /// recorded (a pool written before it was).
    #[serde(default, skip_serializing_if = "super::is_zero")]
    pub usable_since: u64,
}

/// The protocol spoken to a backend: HTTP/1.1 (one request per connection at a time, kept
/// alive) or HTTP/2 (`h2`: h2c for `host:port`, ALPN h2 for `https://`; requests multiplexed).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Http1,
    H2,
}

impl Protocol {
    pub fn is_http1(&self) -> bool {
        *self == Protocol::Http1
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Protocol::Http1 => "http1",
            Protocol::H2 => "h2",
        }
    }
}

impl std::str::FromStr for Protocol {
    type Err = InvalidBackend;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "http1" => Ok(Protocol::Http1),
            "h2" => Ok(Protocol::H2),
            other => Err(InvalidBackend::Protocol(other.to_string())),
        }
    }
}

impl Backend {
    /// A checked backend: the address normalized, the id (the address by default) and weight
    /// within their rules. The first problem found is returned.
    pub fn checked(id: Option<&str>, addr: &str, weight: u32) -> Result<Backend, InvalidBackend> {
        let addr = normalize_addr(addr)?;
        let id = check_backend_id(id.unwrap_or(&addr))?;
        let weight = check_weight(weight)?;
        Ok(Backend::new(id.0, addr, weight))
    }

    /// Whether this backend keeps the rules (`checked` would give it back unchanged).
    pub fn check(&self) -> Result<(), InvalidBackend> {
        let checked = Backend::checked(Some(self.id.as_str()), &self.addr, self.weight)?;
        if checked.addr == self.addr {
            Ok(())
        } else {
            Err(InvalidBackend::Addr(self.addr.clone()))
        }
    }

    pub fn new(id: impl Into<String>, addr: impl Into<String>, weight: u32) -> Self {
        Self {
            id: BackendId::new(id),
            addr: addr.into(),
            weight,
            state: BackendState::Active,
            down_votes: BTreeSet::new(),
            source: None,
            protocol: Protocol::Http1,
            usable_since: 0,
        }
    }

    /// The same backend, spoken to with `protocol`.
    pub fn with_protocol(mut self, protocol: Protocol) -> Self {
        self.protocol = protocol;
        self
    }
}

/// Weights are 1..=`MAX_WEIGHT`.
pub const MAX_WEIGHT: u32 = 1000;

/// Why a backend's address, id or weight is not acceptable. The one place these rules live:
/// the config file, the admin API and `apply` all check with these functions.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum InvalidBackend {
    #[error("bad address {0:?} (expected host:port or https://host:port, e.g. 127.0.0.1:9001)")]
    Addr(String),
    #[error("bad id {0:?} (1 to 64 printable characters, no spaces or '/')")]
    Id(String),
    #[error("must be 1..={MAX_WEIGHT}, got {0}")]
    Weight(u32),
    #[error("unknown protocol {0:?} (expected \"http1\" or \"h2\")")]
    Protocol(String),
}

impl InvalidBackend {
    /// The field at fault, for messages that name it (`weight: must be ...`).
    pub fn field(&self) -> &'static str {
        match self {
            InvalidBackend::Addr(_) => "addr",
            InvalidBackend::Id(_) => "id",
            InvalidBackend::Weight(_) => "weight",
            InvalidBackend::Protocol(_) => "protocol",
        }
    }
}

/// `host:port` or `https://host:port`, normalized (an `http://` prefix and a trailing `/` are
/// dropped).
pub fn normalize_addr(s: &str) -> Result<String, InvalidBackend> {
    let (scheme, rest) = if let Some(r) = s.strip_prefix("https://") {
        ("https://", r)
    } else if let Some(r) = s.strip_prefix("http://") {
        ("", r)
    } else {
        ("", s)
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let bad = || InvalidBackend::Addr(s.to_string());
    let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
    // A DNS name is at most 253 bytes (255 with an IPv6 literal's brackets).
    let host_ok = (1..=255).contains(&host.len())
        && !host.contains('/')
        && (host.parse::<std::net::IpAddr>().is_ok()
            || (host.starts_with('[') && host.ends_with(']'))
            || host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-'));
    match port.parse::<u16>() {
        Ok(p) if p > 0 && host_ok => Ok(format!("{scheme}{rest}")),
        _ => Err(bad()),
    }
}

/// Backend ids: 1..=64 printable ASCII characters without spaces or `/`.
pub fn check_backend_id(s: &str) -> Result<BackendId, InvalidBackend> {
    if (1..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_graphic() && b != b'/') {
        Ok(BackendId::new(s))
    } else {
        Err(InvalidBackend::Id(s.to_string()))
    }
}

pub fn check_weight(w: u32) -> Result<u32, InvalidBackend> {
    if (1..=MAX_WEIGHT).contains(&w) {
        Ok(w)
    } else {
        Err(InvalidBackend::Weight(w))
    }
}
