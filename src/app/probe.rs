//! Active health probes: every backend this peer is assigned (all of them unless
//! `health.probers` is set) is probed (GET `health.path` with `X-Shoal-Peer: ID` on a fresh
//! connection of the backend's own protocol, HTTP/1.1 through the data plane's own client, or
//! HTTP/2; a 2xx within `health.timeout` passes) every `health.interval` with ±10% jitter, and
//! each result is handed to whoever owns the local view. This module knows no routing table
//! and no cluster: the consumer hands it a `Probed` (its own small seam), and `app` wires the
//! two.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Empty;
use rand::Rng;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::core::pool::BackendId;
use crate::net::Target;
use crate::ops::telemetry as names;

/// How often the supervisor looks for added or removed backends when nothing told it to.
const RECONCILE: Duration = Duration::from_secs(5);

/// How to probe, read before every probe (a reload changes it).
#[derive(Clone, Debug)]
pub struct ProbeSettings {
    pub path: String,
    pub timeout: Duration,
    pub interval: Duration,
}

/// What the prober needs from the side that owns the backends and their local view.
pub trait Probed: Send + Sync + 'static {
    /// The backends to probe now: id, address (a changed address restarts its probe), target.
    fn targets(&self) -> Vec<(BackendId, String, Target)>;
    fn settings(&self) -> ProbeSettings;
    /// The service the backends belong to (a metric label).
    fn service(&self) -> &str;
    /// This peer's id, sent with every probe as `X-Shoal-Peer`.
    fn peer(&self) -> &str;
    /// Whether this peer probes `id` now (`health.probers`: only its assigned probers do).
    fn assigned(&self, id: &BackendId) -> bool;
    /// This peer stopped probing `id` (another took its place): what its probes said is void.
    fn unassigned(&self, id: &BackendId);
    /// Changes whenever the backends or the settings may have changed.
    fn changes(&self) -> tokio::sync::watch::Receiver<u64>;
    /// One probe's result.
    fn record(&self, id: &BackendId, ok: bool);
    /// One probe's exchange with an HTTP/1 backend (GET `path` on a fresh connection; true for
    /// a 2xx answer read whole): the data plane's own client, so that a probe cannot pass where
    /// traffic's framing fails. HTTP/2 backends are probed here (`check`).
    fn exchange<'a>(
        &'a self,
        target: &'a Target,
        path: &'a str,
        peer: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send + 'a>>;
}

/// Probe every backend `probed` lists until `shutdown`.
pub fn spawn(probed: Arc<dyn Probed>, shutdown: CancellationToken) -> JoinHandle<()> {
    tokio::spawn(supervise(probed, shutdown))
}

/// One probe task per backend.
async fn supervise(probed: Arc<dyn Probed>, shutdown: CancellationToken) {
    let mut tasks: HashMap<BackendId, (String, JoinHandle<()>)> = HashMap::new();
    let mut tick = tokio::time::interval(RECONCILE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut changes = probed.changes();
    let mut told = true;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
            // (Once the sender is gone, only the tick.)
            r = changes.changed(), if told => told = r.is_ok(),
        }
        let current = probed.targets();
        tasks.retain(|id, (addr, handle)| {
            let keep = current.iter().any(|(i, a, _)| i == id && a == addr);
            if !keep {
                handle.abort();
            }
            keep
        });
        for (id, addr, target) in current {
            if let std::collections::hash_map::Entry::Vacant(slot) = tasks.entry(id) {
                let handle = tokio::spawn(probe_loop(probed.clone(), slot.key().clone(), target));
                slot.insert((addr, handle));
            }
        }
    }
    for (_, (_, h)) in tasks {
        h.abort();
    }
}

async fn probe_loop(probed: Arc<dyn Probed>, id: BackendId, target: Target) {
    let count = |result: &'static str| metrics::counter!(names::HEALTH_CHECKS_TOTAL, "backend" => id.to_string(), "result" => result, "service" => probed.service().to_string());
    let (pass, fail) = (count("pass"), count("fail"));
    // Spread probes of different backends (and peers) over the interval.
    let first = probed.settings().interval;
    let offset = rand::thread_rng().gen_range(0..=first.as_millis() as u64);
    tokio::time::sleep(Duration::from_millis(offset)).await;
    let mut probing = true;
    loop {
        let settings = probed.settings();
        let started = Instant::now();
        // Asked before every probe: a dead prober's place is taken within one interval of
        // this peer's detector declaring it dead.
        let assigned = probed.assigned(&id);
        if probing && !assigned {
            probed.unassigned(&id);
        }
        probing = assigned;
        if assigned {
            let ok = if target.is_h2() {
                check(&target, &settings.path, settings.timeout, probed.peer()).await
            } else {
                let exchange = probed.exchange(&target, &settings.path, probed.peer());
                matches!(
                    tokio::time::timeout(settings.timeout, exchange).await,
                    Ok(true)
                )
            };
            if ok { &pass } else { &fail }.increment(1);
            probed.record(&id, ok);
        }
        let interval = settings.interval.as_millis() as f64;
        let jittered = interval * rand::thread_rng().gen_range(0.9..=1.1);
        let next = Duration::from_millis(jittered as u64).saturating_sub(started.elapsed());
        tokio::time::sleep(next).await;
    }
}

/// One probe of an HTTP/2 backend on a fresh connection: GET `path`, pass on 2xx within
/// `timeout`.
pub async fn check(target: &Target, path: &str, timeout: Duration, peer: &str) -> bool {
    let attempt = async {
        let mut sender = target.connect::<Empty<Bytes>>().await.ok()?;
        let req = http::Request::get(path)
            .header(http::header::HOST, target.authority())
            .header(http::header::USER_AGENT, "shoal-health")
            .header(http::header::CONNECTION, "close")
            .header(crate::net::PEER_HEADER, peer)
            .body(Empty::new())
            .ok()?;
        let resp = sender.try_send_request(req).await.ok()?;
        Some(resp.status().is_success())
    };
    matches!(tokio::time::timeout(timeout, attempt).await, Ok(Some(true)))
}
