//! The data plane: client listeners, forwarding, the routing table and the upstreams.
//!
//! Inside, imports run one way: `server` (listeners, connections; `server::h1`, Shoal's own
//! HTTP/1.1 loop) -> `forward` (one request: plan, attempt, on-outcome) -> `table` (the published
//! snapshot) -> `upstream` (connection pools, local health; `upstream::h1`, the HTTP/1.1 client)
//! -> `body` -> `client` (the client connection's byte stream and request body) -> `wire`
//! (HTTP/1.1 body decoding and field lines both ends share) -> `framing` (the one place a
//! message's length is decided); `response` and `error` turn results into client answers.
//! Nothing here knows the cluster or the admin API: `app` hands the table its pools.

#![forbid(unsafe_code)]

pub mod access;
pub mod body;
pub mod client;
pub mod conn;
pub mod deadline;
pub mod error;
pub mod forward;
pub mod framing;
pub mod response;
pub mod routes;
pub mod server;
pub mod table;
pub mod upstream;
pub mod wire;

pub use forward::Proxy;
