//! Active health probes: every backend this peer is assigned (all of them unless
//! `health.probers` is set) is probed (GET `health.path` with `X-Shoal-Peer: ID` on a fresh
//! connection of the backend's own protocol, HTTP/1.1 through the data plane's own client, or
//! HTTP/2; a 2xx within `health.timeout` passes) every `health.interval` with ±10% jitter, and
//! each result is handed to whoever owns the local view. This module knows no routing table
//! and no cluster: the consumer hands it a `Probed` (its own small seam), and `app` wires the
//! two.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Empty;
use rand::Rng;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower::{ServiceBuilder, ServiceExt};

use crate::core::pool::BackendId;
use crate::net::Target;
use crate::ops::telemetry as names;

/// How often the supervisor looks for added or removed backends once `Probed::changes` can no
/// longer tell it (while it can, it waits for that alone: a thousand services' supervisors
/// mostly have nothing to do).
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
    tokio::spawn(supervise(probed, MAX_PROBES_IN_FLIGHT, shutdown))
}

/// One probe task per backend.
async fn supervise(probed: Arc<dyn Probed>, in_flight: usize, shutdown: CancellationToken) {
    let mut tasks: HashMap<BackendId, (String, JoinHandle<()>)> = HashMap::new();
    let limit = GlobalConcurrencyLimitLayer::new(in_flight);
    let mut tick = tokio::time::interval(RECONCILE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut changes = probed.changes();
    let mut told = true;
    loop {
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
                let handle = tokio::spawn(probe_loop(
                    probed.clone(),
                    slot.key().clone(),
                    target,
                    limit.clone(),
                ));
                slot.insert((addr, handle));
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            // (Once the sender is gone, only the tick.)
            _ = tick.tick(), if !told => {}
            r = changes.changed(), if told => told = r.is_ok(),
        }
    }
    for (_, (_, h)) in tasks {
        h.abort();
    }
}

/// Probes in flight at once in this process, across backends and services: a thousand
/// backends probed on one interval do not open a thousand connections in the same instant.
/// A probe waits for its turn outside its timeout (a busy prober is not a failing backend).
const MAX_PROBES_IN_FLIGHT: usize = 256;

/// One probe of one backend as a tower service: GET the path it is called with, on a fresh
/// connection; true for a 2xx read whole.
#[derive(Clone)]
struct Probe {
    probed: Arc<dyn Probed>,
    target: Arc<Target>,
}

impl tower::Service<String> for Probe {
    type Response = bool;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<bool, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, path: String) -> Self::Future {
        let (probed, target) = (self.probed.clone(), self.target.clone());
        Box::pin(async move {
            Ok(if target.is_h2() {
                check(&target, &path, probed.peer()).await
            } else {
                probed.exchange(&target, &path, probed.peer()).await
            })
        })
    }
}

async fn probe_loop(
    probed: Arc<dyn Probed>,
    id: BackendId,
    target: Target,
    limit: GlobalConcurrencyLimitLayer,
) {
    let count = |result: &'static str| metrics::counter!(names::HEALTH_CHECKS_TOTAL, "backend" => id.to_string(), "result" => result, "service" => probed.service().to_string());
    let (pass, fail) = (count("pass"), count("fail"));
    let probe = Probe {
        probed: probed.clone(),
        target: Arc::new(target),
    };
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
            // A turn among the probes in flight, then the probe within `health.timeout` (read
            // anew each time: a reload changes it). The turn is the stack's readiness, which
            // the timeout does not count: it times the call only.
            let stack = ServiceBuilder::new()
                .layer(limit.clone())
                .timeout(settings.timeout)
                .service(probe.clone());
            let ok = matches!(stack.oneshot(settings.path.clone()).await, Ok(true));
            if ok { &pass } else { &fail }.increment(1);
            probed.record(&id, ok);
        }
        let interval = settings.interval.as_millis() as f64;
        let jittered = interval * rand::thread_rng().gen_range(0.9..=1.1);
        let next = Duration::from_millis(jittered as u64).saturating_sub(started.elapsed());
        tokio::time::sleep(next).await;
    }
}

/// One probe of an HTTP/2 backend on a fresh connection: GET `path`, pass on 2xx.
async fn check(target: &Target, path: &str, peer: &str) -> bool {
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
    attempt.await == Some(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    /// Backends whose probes take `takes` each, counting how many run at once and what each
    /// backend's probes said.
    struct Fake {
        targets: Mutex<Vec<(BackendId, String, Target)>>,
        settings: ProbeSettings,
        takes: Duration,
        running: AtomicUsize,
        most: AtomicUsize,
        results: Mutex<HashMap<BackendId, Vec<bool>>>,
        changes: tokio::sync::watch::Sender<u64>,
    }

    fn target(i: usize) -> (BackendId, String, Target) {
        let addr = format!("127.0.0.1:{}", 10_000 + i);
        let t = Target::parse(&addr, None, false).unwrap();
        (BackendId::new(format!("b{i}")), addr, t)
    }

    impl Fake {
        fn new(n: usize, takes: Duration, timeout: Duration) -> Arc<Fake> {
            let targets = (0..n).map(target).collect();
            Arc::new(Fake {
                targets: Mutex::new(targets),
                settings: ProbeSettings {
                    path: "/healthz".into(),
                    timeout,
                    interval: Duration::from_millis(100),
                },
                takes,
                running: AtomicUsize::new(0),
                most: AtomicUsize::new(0),
                results: Mutex::new(HashMap::new()),
                changes: tokio::sync::watch::channel(0).0,
            })
        }

        fn said(&self, id: &str) -> Vec<bool> {
            let r = self.results.lock().unwrap();
            r.get(&BackendId::new(id)).cloned().unwrap_or_default()
        }
    }

    impl Probed for Fake {
        fn targets(&self) -> Vec<(BackendId, String, Target)> {
            self.targets.lock().unwrap().clone()
        }
        fn settings(&self) -> ProbeSettings {
            self.settings.clone()
        }
        fn service(&self) -> &str {
            "default"
        }
        fn peer(&self) -> &str {
            "a"
        }
        fn assigned(&self, _: &BackendId) -> bool {
            true
        }
        fn unassigned(&self, _: &BackendId) {}
        fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
            self.changes.subscribe()
        }
        fn record(&self, id: &BackendId, ok: bool) {
            let mut r = self.results.lock().unwrap();
            r.entry(id.clone()).or_default().push(ok);
        }
        fn exchange<'a>(
            &'a self,
            _: &'a Target,
            _: &'a str,
            _: &'a str,
        ) -> Pin<Box<dyn Future<Output = bool> + Send + 'a>> {
            Box::pin(async move {
                let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
                self.most.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(self.takes).await;
                self.running.fetch_sub(1, Ordering::SeqCst);
                true
            })
        }
    }

    #[tokio::test]
    async fn probes_wait_their_turn_outside_the_timeout() {
        // Eight backends every 100 ms, two probes at a time, each taking 60 ms of a 100 ms
        // timeout: two slots pass 33 probes a second where 80 are asked for, so a probe
        // waits about 180 ms for its turn, longer than its timeout, and still passes.
        let fake = Fake::new(8, Duration::from_millis(60), Duration::from_millis(100));
        let stop = CancellationToken::new();
        let task = tokio::spawn(supervise(fake.clone(), 2, stop.clone()));
        tokio::time::sleep(Duration::from_secs(3)).await;
        stop.cancel();
        task.await.unwrap();
        assert_eq!(fake.most.load(Ordering::SeqCst), 2, "at most two at once");
        // Throttled (about 240 asked for in 3 s, at most 100 fit), so probes did wait.
        let total: usize = (0..8).map(|i| fake.said(&format!("b{i}")).len()).sum();
        assert!(
            total <= 105,
            "{total} probes in 3 s through two 60 ms slots"
        );
        for i in 0..8 {
            let said = fake.said(&format!("b{i}"));
            assert!(said.len() >= 5, "b{i} probed {} times", said.len());
            assert!(said.iter().all(|ok| *ok), "b{i}: {said:?}");
        }
    }

    #[tokio::test]
    async fn a_probe_slower_than_the_timeout_fails() {
        let fake = Fake::new(1, Duration::from_millis(300), Duration::from_millis(100));
        let stop = CancellationToken::new();
        let task = tokio::spawn(supervise(fake.clone(), MAX_PROBES_IN_FLIGHT, stop.clone()));
        tokio::time::sleep(Duration::from_secs(2)).await;
        stop.cancel();
        task.await.unwrap();
        let said = fake.said("b0");
        assert!(said.len() >= 5, "probed {} times", said.len());
        assert!(said.iter().all(|ok| !ok), "{said:?}");
    }

    #[tokio::test]
    async fn the_supervisor_follows_the_backends_when_told() {
        // Told of a change, it starts probing an added backend and stops probing a removed
        // one at once (it does not tick while it can be told: 1,000 services' supervisors).
        let fake = Fake::new(1, Duration::from_millis(1), Duration::from_millis(100));
        let stop = CancellationToken::new();
        let task = tokio::spawn(supervise(fake.clone(), MAX_PROBES_IN_FLIGHT, stop.clone()));
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!fake.said("b0").is_empty());
        fake.targets.lock().unwrap().push(target(1));
        fake.changes.send_modify(|n| *n += 1);
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        assert!(fake.said("b1").len() >= 3, "b1: {:?}", fake.said("b1"));
        fake.targets.lock().unwrap().remove(0);
        fake.changes.send_modify(|n| *n += 1);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let before = fake.said("b0").len();
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        assert_eq!(fake.said("b0").len(), before, "b0 is probed no more");
        stop.cancel();
        task.await.unwrap();
    }
}
