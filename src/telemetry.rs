//! Logging setup and every metric name, in one place, described at start-up.

use std::sync::OnceLock;

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::{fmt, layer::SubscriberExt, reload, util::SubscriberInitExt, EnvFilter};

use crate::config::{LogConfig, LogFormat};

pub const REQUESTS_TOTAL: &str = "shoal_requests_total";
pub const REQUEST_DURATION_SECONDS: &str = "shoal_request_duration_seconds";
pub const UPSTREAM_ERRORS_TOTAL: &str = "shoal_upstream_errors_total";
pub const RETRIES_TOTAL: &str = "shoal_retries_total";
pub const CLIENT_CONNECTIONS: &str = "shoal_client_connections";
pub const BACKEND_UP: &str = "shoal_backend_up";
pub const BACKEND_STATE: &str = "shoal_backend_state";
pub const HEALTH_CHECKS_TOTAL: &str = "shoal_health_checks_total";
pub const EJECTIONS_TOTAL: &str = "shoal_ejections_total";
pub const POOL_VERSION: &str = "shoal_pool_version";
pub const POOL_FINGERPRINT: &str = "shoal_pool_fingerprint";
pub const CLIENT_CONNECTIONS_REFUSED_TOTAL: &str = "shoal_client_connections_refused_total";
pub const PEER_AUTH_FAILURES_TOTAL: &str = "shoal_peer_auth_failures_total";
pub const PEER_UP: &str = "shoal_peer_up";
pub const PEER_PHI: &str = "shoal_peer_phi";
pub const PAXOS_ROUNDS_TOTAL: &str = "shoal_paxos_rounds_total";
pub const PAXOS_COMMIT_DURATION_SECONDS: &str = "shoal_paxos_commit_duration_seconds";
pub const CONFIG_RELOADS_TOTAL: &str = "shoal_config_reloads_total";
pub const CERTIFICATE_EXPIRY_TIMESTAMP_SECONDS: &str = "shoal_certificate_expiry_timestamp_seconds";

/// Label value for requests that reached no backend.
pub const NO_BACKEND: &str = "none";

/// `shoal_requests_total{backend, code}` for one backend, by status class (`1xx`..`5xx`):
/// handles made once, so counting a response is one atomic add.
pub struct StatusCounters([metrics::Counter; 5]);

impl StatusCounters {
    pub fn new(backend: &str) -> Self {
        Self(["1xx", "2xx", "3xx", "4xx", "5xx"].map(
            |c| metrics::counter!(REQUESTS_TOTAL, "backend" => backend.to_string(), "code" => c),
        ))
    }

    pub fn count(&self, status: u16) {
        self.0[(status / 100).clamp(1, 5) as usize - 1].increment(1);
    }
}

/// Describe every family, so each shows up with HELP and TYPE from the first scrape.
pub fn describe() {
    describe_counter!(
        REQUESTS_TOTAL,
        "Client requests answered, by backend and status class."
    );
    describe_histogram!(
        REQUEST_DURATION_SECONDS,
        Unit::Seconds,
        "Time from receiving a request to sending its response headers, by backend."
    );
    describe_counter!(
        UPSTREAM_ERRORS_TOTAL,
        "Failed attempts to a backend: connect, timeout, reset, or a 502/503/504 status."
    );
    describe_counter!(RETRIES_TOTAL, "Extra attempts made on another backend.");
    describe_gauge!(CLIENT_CONNECTIONS, "Open client connections.");
    describe_gauge!(
        BACKEND_UP,
        "This peer's own view of a backend: 1 up, 0 down."
    );
    describe_gauge!(
        BACKEND_STATE,
        "The agreed state of a backend: 1 for its current state."
    );
    describe_counter!(
        HEALTH_CHECKS_TOTAL,
        "Active health probes, by backend and result."
    );
    describe_counter!(
        EJECTIONS_TOTAL,
        "Times this peer learned a pool in which a backend became ejected."
    );
    describe_gauge!(POOL_VERSION, "Version of the pool this peer routes from.");
    describe_gauge!(
        POOL_FINGERPRINT,
        "Hash of the canonical pool (below 2^53); equal on peers that agree."
    );
    describe_counter!(
        CLIENT_CONNECTIONS_REFUSED_TOTAL,
        "Client connections refused beyond proxy.max_connections."
    );
    describe_counter!(
        PEER_AUTH_FAILURES_TOTAL,
        "Peer messages or handshakes that failed authentication."
    );
    describe_gauge!(PEER_UP, "1 while a peer is alive or suspect, 0 once dead.");
    describe_gauge!(PEER_PHI, "Phi-accrual suspicion of a peer.");
    describe_counter!(
        PAXOS_ROUNDS_TOTAL,
        "Paxos rounds this peer proposed, by result."
    );
    describe_histogram!(
        PAXOS_COMMIT_DURATION_SECONDS,
        Unit::Seconds,
        "Time from proposing a change to its commit."
    );
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Install the Prometheus recorder once per process and return its handle for `/metrics`.
pub fn prometheus() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&[
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0,
                ])
                .map(|b| b.build_recorder())
                .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
            let handle = recorder.handle();
            // Another recorder may exist (e.g. in tests); ours still renders what it records.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            handle
        })
        .clone()
}

/// Drain histogram samples every few seconds, whether or not anyone scrapes `/metrics` (they
/// pile up in memory until drained). Once per process; call from within a runtime.
pub fn spawn_upkeep(handle: &PrometheusHandle) {
    static STARTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if STARTED.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return;
    }
    let handle = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tick.tick().await;
            handle.run_upkeep();
        }
    });
}

/// Changes the log filter at run time (SIGHUP).
pub type LogReload = reload::Handle<EnvFilter, tracing_subscriber::Registry>;

/// Set up tracing from `[log]`; returns a handle to change the level later.
pub fn init_logging(cfg: &LogConfig) -> Option<LogReload> {
    let filter = EnvFilter::try_new(&cfg.level).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let res = match cfg.format {
        LogFormat::Text => registry
            .with(fmt::layer().with_writer(std::io::stderr))
            .try_init(),
        LogFormat::Json => registry
            .with(fmt::layer().json().with_writer(std::io::stderr))
            .try_init(),
    };
    res.ok().map(|_| handle)
}
