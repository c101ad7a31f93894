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
pub const BUILD_INFO: &str = "shoal_build_info";
pub const QUORUM: &str = "shoal_quorum";
pub const MEMBERS: &str = "shoal_members";
pub const REQUEST_BYTES_TOTAL: &str = "shoal_request_bytes_total";
pub const RESPONSE_BYTES_TOTAL: &str = "shoal_response_bytes_total";
pub const BACKEND_INFLIGHT: &str = "shoal_backend_inflight";
pub const ROUTE_MISSES_TOTAL: &str = "shoal_route_misses_total";
pub const EJECTION_CAP: &str = "shoal_ejection_cap";
pub const DISCOVERY_RESOLUTIONS_TOTAL: &str = "shoal_discovery_resolutions_total";
pub const CERTIFICATE_EXPIRY_TIMESTAMP_SECONDS: &str = "shoal_certificate_expiry_timestamp_seconds";

/// The commit this binary was built from (`unknown` outside a git checkout).
pub const COMMIT: &str = env!("SHOAL_COMMIT");

/// Label value for requests that reached no backend.
pub const NO_BACKEND: &str = "none";

/// `shoal_requests_total{backend, code}` for one backend, by status class (`1xx`..`5xx`):
/// handles made once, so counting a response is one atomic add.
pub struct StatusCounters([metrics::Counter; 5]);

impl StatusCounters {
    pub fn new(service: &str, backend: &str) -> Self {
        Self(["1xx", "2xx", "3xx", "4xx", "5xx"].map(|c| {
            metrics::counter!(REQUESTS_TOTAL, "backend" => backend.to_string(), "code" => c, "service" => service.to_string())
        }))
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
    describe_gauge!(
        BUILD_INFO,
        "Always 1; the labels name the version and commit."
    );
    describe_gauge!(
        QUORUM,
        "1 while this peer reaches a majority of the voters."
    );
    describe_gauge!(MEMBERS, "Agreed members of the cluster, by role.");
    describe_counter!(
        REQUEST_BYTES_TOTAL,
        Unit::Bytes,
        "Request body bytes sent to a backend."
    );
    describe_counter!(
        RESPONSE_BYTES_TOTAL,
        Unit::Bytes,
        "Response body bytes received from a backend."
    );
    describe_gauge!(
        BACKEND_INFLIGHT,
        "Requests in flight to a backend from this peer."
    );
    describe_counter!(CONFIG_RELOADS_TOTAL, "Config reloads (SIGHUP), by result.");
    describe_counter!(
        ROUTE_MISSES_TOTAL,
        "Requests answered 404: no service takes their host and path, and default has no backends."
    );
    describe_gauge!(
        CERTIFICATE_EXPIRY_TIMESTAMP_SECONDS,
        Unit::Seconds,
        "When a certificate this peer serves expires (Unix time)."
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
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    res.ok().map(|_| handle)
}

/// The process collector's families (`process_*`, as Prometheus client libraries export them),
/// read from /proc at scrape time; empty where /proc is missing.
pub fn process_metrics() -> String {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return String::new();
    };
    // Fields after the command name (which may hold spaces) start at state (field 3).
    let Some((_, rest)) = stat.rsplit_once(") ") else {
        return String::new();
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| {
        f.get(n - 3)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // SAFETY: sysconf reads a system constant.
    let ticks = match unsafe { libc::sysconf(libc::_SC_CLK_TCK) } {
        t if t > 0 => t as f64,
        _ => 100.0,
    };
    // SAFETY: as above.
    let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        p if p > 0 => p as f64,
        _ => 4096.0,
    };
    let boot = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| {
                    l.strip_prefix("btime ")
                        .map(|v| v.trim().parse::<f64>().ok())
                })
                .flatten()
        })
        .unwrap_or(0.0);
    let fds = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count() as f64)
        .unwrap_or(0.0);
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit through a valid pointer.
    let max_fds = match unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } {
        0 => lim.rlim_cur as f64,
        _ => 0.0,
    };
    let families: [(&str, &str, &str, f64); 7] = [
        (
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            (field(14) + field(15)) / ticks,
        ),
        (
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            field(24) * page,
        ),
        (
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
            field(23),
        ),
        (
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            boot + field(22) / ticks,
        ),
        (
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            fds,
        ),
        (
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
            max_fds,
        ),
        (
            "process_threads",
            "gauge",
            "Number of OS threads in the process.",
            field(20),
        ),
    ];
    let mut out = String::new();
    for (name, kind, help, v) in families {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"
        ));
    }
    out
}

/// The value of label `name` in an exposition line.
fn label<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let mut rest = line.split_once('{')?.1;
    loop {
        let (k, after) = rest.split_once("=\"")?;
        let (v, after) = after.split_once('"')?;
        if k.trim_start_matches(',') == name {
            return Some(v);
        }
        rest = after;
    }
}

/// Drop the series of services and backends that left the pool: every line of a `shoal_`
/// family whose `service` label names a service not in `services`, or whose (`service`,
/// `backend`) labels name a backend not in `backends` ("none" is kept: requests answered
/// without a backend, or routed nowhere).
pub fn without_removed_backends(
    text: &str,
    services: &std::collections::HashSet<&str>,
    backends: &std::collections::HashSet<(&str, &str)>,
) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let service = label(line, "service");
        let removed = line.starts_with("shoal_")
            && (service.is_some_and(|s| s != NO_BACKEND && !services.contains(s))
                || label(line, "backend").is_some_and(|b| {
                    let service = service.unwrap_or("default");
                    b != NO_BACKEND && !backends.contains(&(service, b))
                }));
        if !removed {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Drop the per-peer gauges (`shoal_peer_up`, `shoal_peer_phi`) of peers this node no longer
/// knows (a learner that left and was forgotten): its series would otherwise stay for good.
pub fn without_departed_peers(text: &str, current: &std::collections::HashSet<&str>) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let departed = (line.starts_with("shoal_peer_up{") || line.starts_with("shoal_peer_phi{"))
            && line
                .split_once("peer=\"")
                .and_then(|(_, rest)| rest.split_once('"'))
                .is_some_and(|(p, _)| !current.contains(p));
        if !departed {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn departed_peers_leave_the_exposition() {
        let text = "shoal_peer_up{peer=\"a\"} 1\nshoal_peer_up{peer=\"l9\"} 0\nshoal_peer_phi{peer=\"l9\"} 9\nshoal_peer_auth_failures_total{peer=\"l9\"} 1\n";
        let out = without_departed_peers(text, &std::collections::HashSet::from(["a"]));
        assert_eq!(
            out,
            "shoal_peer_up{peer=\"a\"} 1\nshoal_peer_auth_failures_total{peer=\"l9\"} 1\n"
        );
    }

    #[test]
    fn removed_backends_leave_the_exposition() {
        let text = "# TYPE shoal_backend_up gauge\nshoal_backend_up{backend=\"a\",service=\"default\"} 1\nshoal_backend_up{backend=\"a\",service=\"api\"} 1\nshoal_backend_up{backend=\"gone\",service=\"default\"} 0\nshoal_requests_total{backend=\"none\",code=\"5xx\",service=\"default\"} 3\nshoal_pool_version 4\n";
        let services = std::collections::HashSet::from(["default"]);
        let current = std::collections::HashSet::from([("default", "a")]);
        let text = format!(
            "{text}shoal_requests_total{{backend=\"none\",code=\"5xx\",service=\"api\"}} 1\n"
        );
        let out = without_removed_backends(&text, &services, &current);
        assert!(out.contains("backend=\"a\",service=\"default\""));
        assert!(!out.contains("service=\"api\""), "{out}");
        assert!(!out.contains("gone"));
        assert!(out.contains("backend=\"none\""));
        assert!(out.contains("shoal_pool_version 4"));
    }

    #[test]
    fn process_families_are_read_from_proc() {
        // Spend a few clock ticks of CPU first (a fresh process may have used none yet).
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < std::time::Duration::from_millis(100) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let text = process_metrics();
        for name in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_start_time_seconds",
        ] {
            let v: f64 = text
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .unwrap_or_else(|| panic!("{name} missing: {text}"))
                .parse()
                .unwrap();
            assert!(v > 0.0, "{name} = {v}");
        }
    }
}
