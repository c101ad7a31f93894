//! The data plane: client listeners, forwarding, the upstream connection pools.

pub mod body;
pub mod conn;
pub mod error;
pub mod forward;
pub mod router;
pub mod server;
pub mod upstream;

use std::sync::Arc;

use metrics::Counter;

use crate::telemetry as names;
use router::Router;

/// Shared by every client connection of one peer.
pub struct Proxy {
    pub router: Arc<Router>,
    retries: Counter,
    /// `shoal_requests_total{backend="none"}` by status class: answered without a backend.
    local_responses: names::StatusCounters,
}

impl Proxy {
    pub fn new(router: Arc<Router>) -> Arc<Self> {
        Arc::new(Self {
            router,
            retries: metrics::counter!(names::RETRIES_TOTAL),
            local_responses: names::StatusCounters::new(names::NO_BACKEND),
        })
    }
}
