//! The ids peers and backends go by, and the rules for a peer's id and address.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A peer's id (`node.id`): `[a-z0-9-]{1,32}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(pub String);

impl NodeId {
    pub fn new(id: impl Into<String>) -> Self {
        Self(id.into())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<String> for NodeId {
    fn from(s: String) -> Self {
        NodeId(s)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A backend's stable id: what hashing uses, so that it never depends on list position.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct BackendId(pub String);

impl BackendId {
    pub fn new(id: impl Into<String>) -> Self {
        Self(id.into())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for BackendId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A member to add: a valid node id and a `host:port` cluster address.
pub fn check_peer(id: &NodeId, addr: &str) -> Result<(), String> {
    if !valid_node_id(id.as_str()) {
        return Err(format!(
            "peer id {id:?}: expected 1-32 characters of a-z, 0-9 and -"
        ));
    }
    if !valid_peer_addr(addr) {
        return Err(format!("peer address {addr:?}: expected HOST:PORT"));
    }
    Ok(())
}

/// A peer's cluster address: `host:port`, port above 0.
pub fn valid_peer_addr(addr: &str) -> bool {
    addr.rsplit_once(':').is_some_and(|(host, port)| {
        !host.is_empty()
            && !host.contains('/')
            && !host.contains(' ')
            && port.parse::<u16>().is_ok_and(|p| p > 0)
    })
}

/// Node ids: `[a-z0-9-]{1,32}`.
pub fn valid_node_id(s: &str) -> bool {
    (1..=32).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}
