//! Backends as this peer uses them. An `Upstream` joins the parts that outlive pool versions:
//! where to dial (`net::Target`), the keep-alive connections (`conns`), this peer's local health
//! view (`health`), the in-flight count and the metric handles. The `Registry` keeps one
//! `Upstream` per backend id across versions, so pooled connections, load and health carry over.

mod conns;
pub mod h1;
mod health;

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metrics::{Counter, Gauge, Histogram};
use tokio_rustls::TlsConnector;

use conns::ConnPool;
pub use conns::{BackendConn, Sender};
use health::LocalView;

use crate::core::balance::Selector;
use crate::core::health::{Local, Source, Thresholds};
use crate::core::pool::{BackendId, Pool, Protocol};
use crate::net::Target;
use crate::ops::telemetry as names;
use crate::sync::MutexExt;

/// Why an attempt failed, as `shoal_upstream_errors_total{kind}` counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    Connect,
    Timeout,
    Reset,
    Status,
}

struct Metrics {
    by_class: names::StatusCounters,
    duration: Histogram,
    errors: [Counter; 4],
    up: Gauge,
    request_bytes: Counter,
    response_bytes: Counter,
}

impl Metrics {
    fn new(service: &str, id: &str) -> Self {
        // `service` last: the families from before services keep their labels' order.
        let labels = [
            ("backend", id.to_string()),
            ("service", service.to_string()),
        ];
        let err = |k: &'static str| metrics::counter!(names::UPSTREAM_ERRORS_TOTAL, "backend" => id.to_string(), "kind" => k, "service" => service.to_string());
        Self {
            by_class: names::StatusCounters::new(service, id),
            duration: metrics::histogram!(names::REQUEST_DURATION_SECONDS, &labels),
            errors: [err("connect"), err("timeout"), err("reset"), err("status")],
            up: metrics::gauge!(names::BACKEND_UP, &labels),
            request_bytes: metrics::counter!(names::REQUEST_BYTES_TOTAL, &labels),
            response_bytes: metrics::counter!(names::RESPONSE_BYTES_TOTAL, &labels),
        }
    }
}

/// One backend's runtime state on this peer.
pub struct Upstream {
    pub id: BackendId,
    pub addr: String,
    target: Target,
    conns: ConnPool,
    health: LocalView,
    inflight: AtomicU64,
    /// Responses this peer got from the backend (the status page's request rates).
    served: AtomicU64,
    /// Requests in flight to every backend (shared by all upstreams; for bounded load).
    total_inflight: Arc<AtomicU64>,
    metrics: Metrics,
}

impl Upstream {
    fn new(
        service: &str,
        id: BackendId,
        addr: String,
        target: Target,
        workers: usize,
        total: Arc<AtomicU64>,
    ) -> Self {
        let metrics = Metrics::new(service, id.as_str());
        metrics.up.set(1.0);
        Self {
            id,
            addr,
            target,
            conns: ConnPool::new(workers),
            health: LocalView::default(),
            inflight: AtomicU64::new(0),
            served: AtomicU64::new(0),
            total_inflight: total,
            metrics,
        }
    }

    /// Where to dial (health probes dial it too).
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// The backend's `host:port`, for requests that arrived without a Host.
    pub fn host_header(&self) -> Option<http::HeaderValue> {
        http::HeaderValue::from_str(self.target.authority()).ok()
    }

    /// This peer's own view, without side effects.
    pub fn is_up(&self) -> bool {
        self.health.is_up()
    }

    /// Which source took it down in this peer's view (None while up).
    pub fn down_by(&self) -> Option<crate::core::health::Source> {
        self.health.down_by()
    }

    /// Usable for a new request (see `LocalView::usable`).
    pub fn usable(&self, trial_every: Duration) -> bool {
        self.health.usable(trial_every)
    }

    pub fn inflight(&self) -> u64 {
        self.inflight.load(Ordering::Relaxed)
    }

    /// Count one request in flight until the guard drops; in the all-backends total too when
    /// bounded load needs it.
    pub fn start(self: &Arc<Self>, count_total: bool) -> InflightGuard {
        self.inflight.fetch_add(1, Ordering::Relaxed);
        if count_total {
            self.total_inflight.fetch_add(1, Ordering::Relaxed);
        }
        InflightGuard {
            upstream: self.clone(),
            count_total,
        }
    }

    /// Record an outcome into the local view; returns the new state when it flips (logged and
    /// shown in `shoal_backend_up` here, once per flip).
    pub fn record(&self, source: Source, ok: bool, t: &Thresholds) -> Option<Local> {
        let flip = self.health.record(source, ok, t)?;
        self.flipped(flip, Some(source))
    }

    /// This peer stopped probing it (`health.probers`): what its probes said no longer holds.
    pub fn forget_probes(&self) -> Option<Local> {
        let flip = self.health.forget_probes()?;
        self.flipped(flip, None)
    }

    fn flipped(&self, flip: Local, source: Option<Source>) -> Option<Local> {
        self.metrics
            .up
            .set(if flip == Local::Up { 1.0 } else { 0.0 });
        match flip {
            Local::Down => tracing::warn!(backend = %self.id, ?source, "backend down (local view)"),
            Local::Up => tracing::info!(backend = %self.id, ?source, "backend up (local view)"),
        }
        Some(flip)
    }

    /// The counter of request body bytes sent to this backend.
    pub fn request_bytes(&self) -> Counter {
        self.metrics.request_bytes.clone()
    }

    /// Count response body bytes received from this backend.
    pub fn count_response_bytes(&self, n: usize) {
        self.metrics.response_bytes.increment(n as u64);
    }

    /// Responses received from this backend so far.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    pub fn count_response(&self, status: u16, elapsed: Duration) {
        self.served.fetch_add(1, Ordering::Relaxed);
        self.metrics.by_class.count(status);
        self.metrics.duration.record(elapsed.as_secs_f64());
    }

    pub fn count_error(&self, kind: ErrorKind) {
        self.metrics.errors[kind as usize].increment(1);
    }

    /// An open connection for `worker` that needs no dial, if there is one (`now`: the caller's
    /// clock reading, to age parked connections by).
    pub fn pooled(&self, worker: usize, now: Instant) -> Option<BackendConn> {
        self.conns.pooled(worker, &self.target, now)
    }

    /// A new connection for `worker`.
    pub async fn connect(
        &self,
        worker: usize,
        connect_timeout: Duration,
    ) -> io::Result<BackendConn> {
        self.conns
            .connect(worker, &self.target, connect_timeout)
            .await
    }
}

/// Decrements the in-flight counts when dropped.
pub struct InflightGuard {
    upstream: Arc<Upstream>,
    count_total: bool,
}

impl InflightGuard {
    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.upstream.inflight.fetch_sub(1, Ordering::Relaxed);
        if self.count_total {
            self.upstream.total_inflight.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// The in-flight count (and an HTTP/2 connection's handle), kept with a response until its
/// body ends.
pub struct Lease {
    pub guard: InflightGuard,
    /// The worker whose runtime drives the connection.
    pub worker: usize,
    /// The shared HTTP/2 connection the response streams on.
    pub h2: Option<Sender>,
}

impl Lease {
    /// The exchange completed: an HTTP/1.1 connection that may carry another goes back to its
    /// worker's idle list.
    pub fn release(self, conn: Option<Box<h1::H1Conn>>) {
        if let Some(conn) = conn {
            self.guard.upstream.conns.checkin(self.worker, conn);
        }
    }
}

/// The upstream TLS connectors (ALPN http/1.1, and h2), made once per process: the system's
/// roots are read once, however many services have a registry.
fn upstream_tls() -> (Option<TlsConnector>, Option<TlsConnector>) {
    static TLS: std::sync::OnceLock<(Option<TlsConnector>, Option<TlsConnector>)> =
        std::sync::OnceLock::new();
    TLS.get_or_init(|| match crate::net::tls::upstream_client_config() {
        Ok(http1) => {
            let mut h2 = http1.clone();
            h2.alpn_protocols = vec![b"h2".to_vec()];
            (
                Some(TlsConnector::from(Arc::new(http1))),
                Some(TlsConnector::from(Arc::new(h2))),
            )
        }
        Err(e) => {
            tracing::warn!(error = %e, "upstream TLS unavailable");
            (None, None)
        }
    })
    .clone()
}

/// One `Upstream` per backend id, kept across pool versions.
pub struct Registry {
    known: Mutex<HashMap<BackendId, Arc<Upstream>>>,
    /// Upstream TLS offering ALPN http/1.1.
    tls: Option<TlsConnector>,
    /// Upstream TLS offering ALPN h2 (for `protocol = "h2"` backends).
    tls_h2: Option<TlsConnector>,
    /// Data-plane worker threads (each gets its own idle connections).
    workers: usize,
    total_inflight: Arc<AtomicU64>,
    /// The service whose backends these are (a metric label).
    service: Arc<str>,
}

impl Registry {
    pub fn new(service: &str, workers: usize) -> Self {
        let (tls, tls_h2) = upstream_tls();
        Self {
            known: Mutex::new(HashMap::new()),
            tls,
            tls_h2,
            workers,
            total_inflight: Arc::new(AtomicU64::new(0)),
            service: Arc::from(service),
        }
    }

    fn upstream(&self, id: BackendId, addr: String, target: Target) -> Arc<Upstream> {
        Arc::new(Upstream::new(
            &self.service,
            id,
            addr,
            target,
            self.workers,
            self.total_inflight.clone(),
        ))
    }

    /// Requests in flight to every backend.
    pub fn total_inflight(&self) -> u64 {
        self.total_inflight.load(Ordering::Relaxed)
    }

    pub fn get(&self, id: &BackendId) -> Option<Arc<Upstream>> {
        self.known.locked().get(id).cloned()
    }

    /// Every backend of `pool` with its upstream (for probes).
    pub fn of_pool(&self, pool: &Pool) -> Vec<Arc<Upstream>> {
        let known = self.known.locked();
        pool.backends
            .keys()
            .filter_map(|id| known.get(id).cloned())
            .collect()
    }

    /// Bring the registry to `pool` (new backends get an upstream, departed ones are forgotten
    /// and their idle connections close with them) and list the upstreams of the selector's
    /// members, indexed like `selector.members()`.
    pub fn members(&self, pool: &Pool, selector: &Selector) -> Arc<[Arc<Upstream>]> {
        let mut known = self.known.locked();
        known.retain(|id, u| {
            pool.backends
                .get(id)
                .is_some_and(|b| b.addr == u.addr && b.protocol.is_http1() != u.target.is_h2())
        });
        for b in pool.backends.values() {
            if known.contains_key(&b.id) {
                continue;
            }
            let h2 = b.protocol == Protocol::H2;
            let tls = if h2 { &self.tls_h2 } else { &self.tls };
            match Target::parse(&b.addr, tls.as_ref(), h2) {
                Ok(target) => {
                    known.insert(
                        b.id.clone(),
                        self.upstream(b.id.clone(), b.addr.clone(), target),
                    );
                }
                Err(e) => tracing::error!(backend = %b.id, error = %e, "cannot use backend"),
            }
        }
        selector
            .members()
            .iter()
            .map(|m| {
                known.get(&m.id).cloned().unwrap_or_else(|| {
                    // Unusable address: an upstream that always fails to connect.
                    self.upstream(m.id.clone(), String::new(), Target::unreachable())
                })
            })
            .collect()
    }
}
