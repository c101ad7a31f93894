//! The routing snapshot the data plane reads, and publishing a new one.
//!
//! A snapshot holds one pool version's selector, the upstreams for its members, and the live
//! settings. Requests load it with one atomic pointer load and keep it for their whole life;
//! `publish` builds the next one off the request path and swaps it in.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio_rustls::TlsConnector;

use super::upstream::{Target, Upstream};
use crate::config::{Config, HashKey};
use crate::core::balance::{BalanceSpec, Selector, Usable};
use crate::core::health::Thresholds;
use crate::core::pool::{BackendId, BackendState, Pool};
use crate::telemetry as names;

/// Settings read per request; replaced as a whole on reload.
#[derive(Clone, Debug)]
pub struct Settings {
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub retries: u32,
    pub hash_key: HashKey,
    pub balance: BalanceSpec,
    pub thresholds: Thresholds,
    pub panic_below_percent: u8,
    /// How often a locally-down backend gets a trial request; also the probe interval.
    pub trial_every: Duration,
    /// Active probe: path and timeout.
    pub probe_path: String,
    pub probe_timeout: Duration,
    pub access_log: bool,
}

impl Settings {
    pub fn from_config(c: &Config) -> Self {
        Self {
            connect_timeout: c.proxy.connect_timeout,
            request_timeout: c.proxy.request_timeout,
            retries: c.proxy.retries,
            hash_key: c.balance.hash_key.clone(),
            balance: c.balance.spec(),
            thresholds: c.health.thresholds(),
            panic_below_percent: c.health.panic_below_percent,
            trial_every: c.health.interval,
            probe_path: c.health.path.clone(),
            probe_timeout: c.health.timeout,
            access_log: c.log.access_log,
        }
    }
}

/// One pool version, ready to route.
pub struct Snapshot {
    pub pool: Arc<Pool>,
    pub selector: Arc<Selector>,
    /// Indexed like `selector.members()`.
    pub upstreams: Arc<[Arc<Upstream>]>,
    pub settings: Arc<Settings>,
    /// Fewer usable members than `panic_below_percent`: route to all. Re-evaluated on every
    /// local health flip, never per request.
    pub panic: AtomicBool,
    /// Requests in flight to this snapshot's members (for bounded load).
    total_inflight: Arc<AtomicU64>,
}

impl Snapshot {
    pub fn total_inflight(&self) -> &AtomicU64 {
        &self.total_inflight
    }

    fn evaluate_panic(&self) {
        let panic = self
            .selector
            .in_panic(self.settings.panic_below_percent, |m| {
                self.upstreams[m as usize].is_up()
            });
        if self.panic.swap(panic, Ordering::Relaxed) != panic {
            if panic {
                tracing::warn!(
                    version = self.pool.version,
                    "too few usable backends: routing to all (panic)"
                );
            } else {
                tracing::info!(
                    version = self.pool.version,
                    "enough usable backends again: panic over"
                );
            }
        }
    }
}

impl Usable for Snapshot {
    fn usable(&self, m: u32) -> bool {
        self.upstreams[m as usize].usable(self.settings.trial_every)
    }
    fn inflight(&self, m: u32) -> u64 {
        self.upstreams[m as usize].inflight()
    }
    fn total_inflight(&self) -> u64 {
        self.total_inflight.load(Ordering::Relaxed)
    }
}

/// Owns the current snapshot and the upstreams that outlive versions.
pub struct Router {
    current: ArcSwap<Snapshot>,
    upstreams: Mutex<HashMap<BackendId, Arc<Upstream>>>,
    tls: Option<TlsConnector>,
    total_inflight: Arc<AtomicU64>,
    /// Data-plane worker threads (each gets its own upstream connection pools).
    workers: usize,
    /// Told about every local health flip (the health voter listens).
    flips: Mutex<Option<tokio::sync::mpsc::UnboundedSender<BackendId>>>,
}

impl Router {
    pub fn new(settings: Settings, workers: usize) -> Arc<Self> {
        let tls = match crate::tls::upstream_client_config() {
            Ok(c) => Some(TlsConnector::from(c)),
            Err(e) => {
                tracing::warn!(error = %e, "upstream TLS unavailable");
                None
            }
        };
        let total_inflight = Arc::new(AtomicU64::new(0));
        let empty = Pool::default();
        let snapshot = Snapshot {
            selector: Arc::new(Selector::build(&empty, settings.balance)),
            pool: Arc::new(empty),
            upstreams: Arc::from(Vec::new()),
            settings: Arc::new(settings),
            panic: AtomicBool::new(false),
            total_inflight: total_inflight.clone(),
        };
        Arc::new(Self {
            current: ArcSwap::from_pointee(snapshot),
            upstreams: Mutex::new(HashMap::new()),
            tls,
            total_inflight,
            workers,
            flips: Mutex::new(None),
        })
    }

    /// The snapshot to route one request with.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// The pool this peer routes from.
    pub fn pool(&self) -> Arc<Pool> {
        self.current.load().pool.clone()
    }

    /// Every upstream known (current members and draining ones), for status and probes.
    pub fn upstream(&self, id: &BackendId) -> Option<Arc<Upstream>> {
        self.upstreams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    /// Route from `pool` from now on, unless it is not newer than the current one. Returns
    /// whether it was applied. Tables are built here, once per version, off the request path.
    pub fn publish(&self, pool: Pool) -> bool {
        let cur = self.current.load_full();
        if cur.pool.exists() && pool.version <= cur.pool.version {
            return false;
        }
        let settings = cur.settings.clone();
        let selector = Selector::build(&pool, settings.balance);
        let upstreams = self.upstreams_for(&pool, &selector);
        self.record_pool_metrics(&cur.pool, &pool);
        tracing::info!(
            version = pool.version,
            backends = pool.backends.len(),
            "pool applied"
        );
        let next = Snapshot {
            pool: Arc::new(pool),
            selector: Arc::new(selector),
            upstreams,
            settings,
            panic: AtomicBool::new(false),
            total_inflight: self.total_inflight.clone(),
        };
        next.evaluate_panic();
        self.current.store(Arc::new(next));
        true
    }

    /// New live settings (reload). Rebuilds tables only if the balancing spec changed.
    pub fn set_settings(&self, settings: Settings) {
        let cur = self.current.load_full();
        let selector = if settings.balance == cur.settings.balance {
            cur.selector.clone()
        } else {
            Arc::new(Selector::build(&cur.pool, settings.balance))
        };
        let upstreams = self.upstreams_for(&cur.pool, &selector);
        let next = Snapshot {
            pool: cur.pool.clone(),
            selector,
            upstreams,
            settings: Arc::new(settings),
            panic: AtomicBool::new(false),
            total_inflight: self.total_inflight.clone(),
        };
        next.evaluate_panic();
        self.current.store(Arc::new(next));
    }

    /// Call after a local health flip of `id`.
    pub fn health_changed(&self, id: &BackendId) {
        self.current.load().evaluate_panic();
        if let Some(tx) = self
            .flips
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            let _ = tx.send(id.clone());
        }
    }

    /// Receive the id of every backend whose local view flips from now on.
    pub fn subscribe_flips(&self) -> tokio::sync::mpsc::UnboundedReceiver<BackendId> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        *self.flips.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
        rx
    }

    /// Every backend of the current pool with its upstream (for probes).
    pub fn all_upstreams(&self) -> Vec<Arc<Upstream>> {
        let pool = self.pool();
        let known = self.upstreams.lock().unwrap_or_else(|e| e.into_inner());
        pool.backends
            .keys()
            .filter_map(|id| known.get(id).cloned())
            .collect()
    }

    fn upstreams_for(&self, pool: &Pool, selector: &Selector) -> Arc<[Arc<Upstream>]> {
        let mut known = self.upstreams.lock().unwrap_or_else(|e| e.into_inner());
        // Forget backends that left the pool (their idle connections close with them).
        known.retain(|id, u| pool.backends.get(id).is_some_and(|b| b.addr == u.addr));
        for b in pool.backends.values() {
            if known.contains_key(&b.id) {
                continue;
            }
            match Target::parse(&b.addr, self.tls.as_ref()) {
                Ok(target) => {
                    known.insert(
                        b.id.clone(),
                        Arc::new(Upstream::new(
                            b.id.clone(),
                            b.addr.clone(),
                            target,
                            self.workers,
                        )),
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
                    Arc::new(Upstream::new(
                        m.id.clone(),
                        String::new(),
                        Target {
                            authority: String::new(),
                            tls: None,
                        },
                        self.workers,
                    ))
                })
            })
            .collect()
    }

    fn record_pool_metrics(&self, old: &Pool, new: &Pool) {
        metrics::gauge!(names::POOL_VERSION).set(new.version as f64);
        metrics::gauge!(names::POOL_FINGERPRINT).set(new.fingerprint() as f64);
        for b in new.backends.values() {
            if !old.backends.contains_key(&b.id) {
                metrics::counter!(names::EJECTIONS_TOTAL, "backend" => b.id.to_string())
                    .increment(0);
            }
            for s in BackendState::ALL {
                metrics::gauge!(names::BACKEND_STATE, "backend" => b.id.to_string(), "state" => s.as_str())
                    .set(if b.state == s { 1.0 } else { 0.0 });
            }
            let was = old.backends.get(&b.id).map(|o| o.state);
            if b.state == BackendState::Ejected && was != Some(BackendState::Ejected) {
                metrics::counter!(names::EJECTIONS_TOTAL, "backend" => b.id.to_string())
                    .increment(1);
                tracing::warn!(backend = %b.id, version = new.version, "backend ejected by the cluster");
            }
        }
        for b in old.backends.values() {
            if !new.backends.contains_key(&b.id) {
                for s in BackendState::ALL {
                    metrics::gauge!(names::BACKEND_STATE, "backend" => b.id.to_string(), "state" => s.as_str())
                        .set(0.0);
                }
            }
        }
    }
}
