//! The published routing table: one immutable `Snapshot` per pool version (or settings reload)
//! behind an atomic pointer. Requests load it once and keep it for their whole life; `publish`
//! builds the next one off the request path and swaps it in. The upstreams it points to come
//! from the registry, which outlives versions.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::mpsc;

use super::upstream::{Registry, Upstream};
use crate::config::{BalanceConfig, Config, HashKey, HealthConfig};
use crate::core::balance::{BalanceSpec, Ramp, Selector, Usable};
use crate::core::health::Thresholds;
use crate::core::pool::{BackendId, Pool};
use crate::ops::telemetry as names;
use crate::sync::MutexExt;

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
    /// `health.slow_start`: round robin ramps a newly usable backend over this long.
    pub slow_start: Duration,
    /// `health.probers`: how many voters probe each backend (0: every peer).
    pub probers: usize,
}

impl Settings {
    /// The ramp to build a selector with now.
    fn ramp(&self) -> Option<Ramp> {
        (!self.slow_start.is_zero()).then(|| Ramp {
            now_ms: crate::clock::unix_ms(),
            slow_start_ms: self.slow_start.as_millis() as u64,
        })
    }
}

impl Settings {
    /// The top-level service's (`default`) settings.
    pub fn from_config(c: &Config) -> Self {
        Self::of_service(c, &c.balance, &c.health)
    }

    /// A service's settings: the proxy's and the log's from `c`, and its own balancing and
    /// health.
    pub fn of_service(c: &Config, balance: &BalanceConfig, health: &HealthConfig) -> Self {
        Self {
            connect_timeout: c.proxy.connect_timeout,
            request_timeout: c.proxy.request_timeout,
            retries: c.proxy.retries,
            hash_key: balance.hash_key.clone(),
            balance: balance.spec(),
            thresholds: health.thresholds(),
            panic_below_percent: health.panic_below_percent,
            trial_every: health.interval,
            probe_path: health.path.clone(),
            probe_timeout: health.timeout,
            access_log: c.log.access_log,
            slow_start: health.slow_start,
            probers: health.probers as usize,
        }
    }
}

/// One pool version, ready to route. Immutable once published.
pub struct Snapshot {
    pub pool: Arc<Pool>,
    pub selector: Arc<Selector>,
    /// Indexed like `selector.members()`.
    pub upstreams: Arc<[Arc<Upstream>]>,
    pub settings: Arc<Settings>,
    /// Some backend speaks HTTP/2: a stream it refuses may go elsewhere whatever the method, so
    /// every request keeps what rebuilds it.
    pub any_h2: bool,
}

/// A snapshot as the selector asks about it: this peer's health view and the in-flight loads.
pub struct Candidates<'a> {
    pub snapshot: &'a Snapshot,
    pub registry: &'a Registry,
}

impl Usable for Candidates<'_> {
    fn usable(&self, m: u32) -> bool {
        self.snapshot.upstreams[m as usize].usable(self.snapshot.settings.trial_every)
    }
    fn inflight(&self, m: u32) -> u64 {
        self.snapshot.upstreams[m as usize].inflight()
    }
    fn total_inflight(&self) -> u64 {
        self.registry.total_inflight()
    }
}

/// The current snapshot, the upstream registry, and what local health flips change.
pub struct RoutingTable {
    current: ArcSwap<Snapshot>,
    registry: Registry,
    /// Fewer usable members than `panic_below_percent`: route to all. Re-evaluated on every
    /// publish and local health flip, never per request.
    panic: AtomicBool,
    /// Told about every local health flip (the health voter listens).
    flips: Mutex<Option<mpsc::UnboundedSender<BackendId>>>,
    /// The service this table routes (`default` for the top-level pool).
    service: Arc<str>,
    /// `shoal_requests_total{service, backend="none"}`: answered without a backend.
    pub local_responses: names::StatusCounters,
    /// Counts installed snapshots: who acts on a new pool or settings (the probes) waits on it.
    installed: tokio::sync::watch::Sender<u64>,
}

impl RoutingTable {
    pub fn new(service: &str, settings: Settings, workers: usize) -> Arc<Self> {
        let empty = Pool::default();
        let snapshot = Snapshot {
            selector: Arc::new(Selector::build(&empty, settings.balance)),
            pool: Arc::new(empty),
            upstreams: Arc::from(Vec::new()),
            settings: Arc::new(settings),
            any_h2: false,
        };
        Arc::new(Self {
            current: ArcSwap::from_pointee(snapshot),
            registry: Registry::new(service, workers),
            panic: AtomicBool::new(false),
            flips: Mutex::new(None),
            service: Arc::from(service),
            local_responses: names::StatusCounters::new(service, names::NO_BACKEND),
            installed: tokio::sync::watch::Sender::new(0),
        })
    }

    /// A receiver that sees every snapshot installed from now on (a new pool or settings).
    pub fn installs(&self) -> tokio::sync::watch::Receiver<u64> {
        self.installed.subscribe()
    }

    /// The service this table routes.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The live settings.
    pub fn settings(&self) -> Arc<Settings> {
        self.current.load().settings.clone()
    }

    /// The snapshot to route one request with.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// The pool this peer routes from.
    pub fn pool(&self) -> Arc<Pool> {
        self.current.load().pool.clone()
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Route to every member regardless of local health (too few are usable).
    pub fn in_panic(&self) -> bool {
        self.panic.load(Ordering::Relaxed)
    }

    /// The upstream of backend `id`, if the pool has it.
    pub fn upstream(&self, id: &BackendId) -> Option<Arc<Upstream>> {
        self.registry.get(id)
    }

    /// Route from `pool` from now on, unless it is not newer than the current one. Returns
    /// whether it was applied. Tables are built here, once per version, off the request path.
    pub fn publish(&self, pool: Pool) -> bool {
        let cur = self.current.load_full();
        if cur.pool.exists() && pool.version <= cur.pool.version {
            return false;
        }
        tracing::info!(
            service = %self.service,
            version = pool.version,
            backends = pool.backends.len(),
            "pool applied"
        );
        let selector = Selector::build_ramped(&pool, cur.settings.balance, cur.settings.ramp());
        self.install(Arc::new(pool), Arc::new(selector), cur.settings.clone());
        true
    }

    /// When a backend in its slow start next takes a larger share (Unix ms): then `ramp`.
    pub fn next_ramp_step(&self) -> Option<u64> {
        self.current.load().selector.next_step()
    }

    /// Rebuild the selector of the current pool for the ramp's step now.
    pub fn ramp(&self) {
        let cur = self.current.load_full();
        let selector = Selector::build_ramped(&cur.pool, cur.settings.balance, cur.settings.ramp());
        self.install(cur.pool.clone(), Arc::new(selector), cur.settings.clone());
    }

    /// Route from no pool at all (every request gets 503, `/readyz` fails): the node found
    /// that the pool it held is not its cluster's. The next pool published is taken whatever
    /// its version.
    pub fn withdraw(&self) {
        let cur = self.current.load_full();
        tracing::warn!("routing withdrawn: this peer's pool is not its cluster's");
        let pool = Pool::default();
        let selector = Selector::build(&pool, cur.settings.balance);
        self.install(Arc::new(pool), Arc::new(selector), cur.settings.clone());
    }

    /// New live settings (reload). Rebuilds tables only if the balancing spec changed.
    pub fn set_settings(&self, settings: Settings) {
        let cur = self.current.load_full();
        let selector = if settings.balance == cur.settings.balance
            && settings.slow_start == cur.settings.slow_start
        {
            cur.selector.clone()
        } else {
            Arc::new(Selector::build_ramped(
                &cur.pool,
                settings.balance,
                settings.ramp(),
            ))
        };
        self.install(cur.pool.clone(), selector, Arc::new(settings));
    }

    fn install(&self, pool: Arc<Pool>, selector: Arc<Selector>, settings: Arc<Settings>) {
        let upstreams = self.registry.members(&pool, &selector);
        let any_h2 = upstreams.iter().any(|u| u.target().is_h2());
        self.current.store(Arc::new(Snapshot {
            pool,
            selector,
            upstreams,
            settings,
            any_h2,
        }));
        self.installed.send_modify(|n| *n += 1);
        self.evaluate_panic();
    }

    /// Call after a local health flip of `id`.
    pub fn health_changed(&self, id: &BackendId) {
        self.evaluate_panic();
        if let Some(tx) = self.flips.locked().as_ref() {
            let _ = tx.send(id.clone());
        }
    }

    /// Receive the id of every backend whose local view flips from now on.
    pub fn subscribe_flips(&self) -> mpsc::UnboundedReceiver<BackendId> {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.flips.locked() = Some(tx);
        rx
    }

    fn evaluate_panic(&self) {
        let snap = self.current.load();
        let panic = snap
            .selector
            .in_panic(snap.settings.panic_below_percent, |m| {
                snap.upstreams[m as usize].is_up()
            });
        if self.panic.swap(panic, Ordering::Relaxed) != panic {
            if panic {
                tracing::warn!(
                    version = snap.pool.version,
                    "too few usable backends: routing to all (panic)"
                );
            } else {
                tracing::info!(
                    version = snap.pool.version,
                    "enough usable backends again: panic over"
                );
            }
        }
    }
}
