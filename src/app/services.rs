//! Every service's routing table, kept to the agreed pool. The cluster hands each learned pool
//! here (`Publish`): `default` routes from the pool itself, every other service from its own
//! view of it (`Pool::service_view`), with its settings from the agreed definition laid over this
//! peer's top-level ones. A service that appears gets a table, probes, a health voter and this
//! peer's discovery sources for it; one that goes takes them along. The route table is rebuilt
//! only when the set of definitions changes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::core::pool::{Pool, ServiceDef, DEFAULT_SERVICE};
use crate::proxy::routes::{RouteDef, RouteSet, Routes};
use crate::proxy::table::{RoutingTable, Settings};
use crate::sync::MutexExt;

/// What a new service's table gets started with (probes, voter, discovery); set once the
/// cluster runs.
pub type Spawner = Box<dyn Fn(&str, Arc<RoutingTable>, CancellationToken) + Send + Sync>;

/// One service besides `default` on this peer.
struct Running {
    table: Arc<RoutingTable>,
    def: ServiceDef,
    /// Cancels its probes, voter and discovery.
    stop: CancellationToken,
    started: bool,
}

pub struct Services {
    routes: Arc<Routes>,
    workers: usize,
    config: ArcSwap<Config>,
    running: Mutex<BTreeMap<String, Running>>,
    spawner: OnceLock<Spawner>,
    /// Cancels every service's tasks at shutdown.
    shutdown: CancellationToken,
}

impl Services {
    pub fn new(
        config: &Config,
        default: Arc<RoutingTable>,
        workers: usize,
        shutdown: CancellationToken,
    ) -> Arc<Services> {
        Arc::new(Services {
            routes: Routes::new(default),
            workers,
            config: ArcSwap::from_pointee(config.clone()),
            running: Mutex::new(BTreeMap::new()),
            spawner: OnceLock::new(),
            shutdown,
        })
    }

    /// This peer's config as last loaded.
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    pub fn routes(&self) -> Arc<Routes> {
        self.routes.clone()
    }

    pub fn default_table(&self) -> &Arc<RoutingTable> {
        self.routes.default_table()
    }

    /// The table of service `name`, if this peer routes it.
    pub fn table(&self, name: &str) -> Option<Arc<RoutingTable>> {
        if name == DEFAULT_SERVICE {
            return Some(self.default_table().clone());
        }
        self.running.locked().get(name).map(|r| r.table.clone())
    }

    /// Every service's table, `default` first.
    pub fn tables(&self) -> Vec<Arc<RoutingTable>> {
        let mut out = vec![self.default_table().clone()];
        out.extend(self.running.locked().values().map(|r| r.table.clone()));
        out
    }

    /// Start each service's tasks with `spawner`, now and for every service that appears.
    pub fn set_spawner(&self, spawner: Spawner) {
        if self.spawner.set(spawner).is_err() {
            return;
        }
        let mut running = self.running.locked();
        for (name, r) in running.iter_mut() {
            self.start(name, r);
        }
    }

    fn start(&self, name: &str, r: &mut Running) {
        if let (false, Some(spawn)) = (r.started, self.spawner.get()) {
            spawn(name, r.table.clone(), r.stop.clone());
            r.started = true;
        }
    }

    /// A service's settings on this peer: its definition's keys over the top-level ones (the
    /// top-level ones alone, with a warning, if this peer's config cannot take them).
    fn settings(&self, name: &str, def: &ServiceDef) -> Settings {
        let config = self.config.load();
        match config.effective(def) {
            Ok((balance, health)) => Settings::of_service(&config, &balance, &health),
            Err(e) => {
                tracing::warn!(service = name, problems = %e, "the agreed settings of this service do not apply over this peer's config; using the top-level ones");
                Settings::from_config(&config)
            }
        }
    }

    /// Route from `pool` (a learned version): every service's table to it, services added and
    /// removed, the route table rebuilt if a definition changed.
    pub fn publish(&self, pool: Pool) {
        let current = self.default_table().pool();
        if current.exists() && pool.version <= current.version {
            return;
        }
        let mut running = self.running.locked();
        let mut redefined = false;
        for (name, s) in &pool.services {
            let r = running.entry(name.clone()).or_insert_with(|| {
                redefined = true;
                Running {
                    table: RoutingTable::new(name, self.settings(name, &s.def), self.workers),
                    def: s.def.clone(),
                    stop: self.shutdown.child_token(),
                    started: false,
                }
            });
            if r.def != s.def {
                redefined = true;
                r.table.set_settings(self.settings(name, &s.def));
                r.def = s.def.clone();
            }
            // A version that left this service's backends as they were needs no new table
            // (a thousand services rebuild nothing for a vote in one of them).
            let routed = r.table.pool();
            if !routed.exists() || routed.backends != s.backends || routed.sightings != s.sightings
            {
                if let Some(view) = pool.service_view(name) {
                    r.table.publish(view);
                }
            }
        }
        running.retain(|name, r| {
            let keep = pool.services.contains_key(name);
            if !keep {
                // Its backends leave its registry (and their series the exposition).
                r.table.publish(Pool {
                    version: pool.version,
                    ..Pool::default()
                });
                r.stop.cancel();
                redefined = true;
                tracing::info!(service = %name, "service removed");
            }
            keep
        });
        for (name, r) in running.iter_mut() {
            self.start(name, r);
        }
        if redefined {
            self.install_routes(&running);
        }
        drop(running);
        // `default` last: once it shows a pool (readiness), every service routes from it.
        self.default_table().publish(pool);
    }

    fn install_routes(&self, running: &BTreeMap<String, Running>) {
        if running.is_empty() {
            self.routes.install(None);
            return;
        }
        let defs = running.values().map(|r| RouteDef {
            hosts: r.def.hosts.clone(),
            prefix: r.def.path_prefix.clone(),
            strip: r.def.strip_prefix,
            table: r.table.clone(),
        });
        self.routes.install(Some(RouteSet::build(defs)));
    }

    /// Route from no pool at all (see `RoutingTable::withdraw`).
    pub fn withdraw(&self) {
        self.default_table().withdraw();
        let mut running = self.running.locked();
        for r in running.values() {
            r.table.withdraw();
            r.stop.cancel();
        }
        running.clear();
        self.routes.install(None);
    }

    /// A reload: new settings for every service (each over the new top-level ones), and a
    /// warning for each way this file's services differ from the agreed ones.
    pub fn reload(&self, config: &Config) {
        self.config.store(Arc::new(config.clone()));
        self.default_table()
            .set_settings(Settings::from_config(config));
        let running = self.running.locked();
        for (name, r) in running.iter() {
            r.table.set_settings(self.settings(name, &r.def));
        }
        drop(running);
        self.warn_if_config_differs();
    }

    /// Warn, naming each service and key, where this peer's file disagrees with the agreed
    /// definitions (it routes by the agreed ones). Nothing to compare before a pool is known.
    pub fn warn_if_config_differs(&self) -> Vec<String> {
        let pool = self.default_table().pool();
        if !pool.exists() {
            return Vec::new();
        }
        let config = self.config.load();
        let problems = differences(&config, &pool);
        for p in &problems {
            tracing::warn!(problem = %p, "this peer's config differs from the agreed services; routing by the agreed ones (shoal services apply --config PATH commits the file's)");
        }
        problems
    }
}

/// Each way `config`'s services differ from `pool`'s, naming the service and the key.
pub fn differences(config: &Config, pool: &Pool) -> Vec<String> {
    let mut out = Vec::new();
    for s in &config.services {
        let Some(agreed) = pool.services.get(&s.name) else {
            out.push(format!(
                "services.{}: in this config but not agreed by the cluster",
                s.name
            ));
            continue;
        };
        let (mine, theirs) = (&s.def, &agreed.def);
        if mine.hosts != theirs.hosts {
            out.push(format!(
                "services.{}.hosts: {:?} here, {:?} agreed",
                s.name, mine.hosts, theirs.hosts
            ));
        }
        if mine.path_prefix != theirs.path_prefix {
            out.push(format!(
                "services.{}.path_prefix: {:?} here, {:?} agreed",
                s.name, mine.path_prefix, theirs.path_prefix
            ));
        }
        if mine.strip_prefix != theirs.strip_prefix {
            out.push(format!(
                "services.{}.strip_prefix: {} here, {} agreed",
                s.name, mine.strip_prefix, theirs.strip_prefix
            ));
        }
        for (table, a, b) in [
            ("balance", &mine.balance, &theirs.balance),
            ("health", &mine.health, &theirs.health),
        ] {
            let keys: std::collections::BTreeSet<&String> = a.0.keys().chain(b.0.keys()).collect();
            for k in keys {
                if a.0.get(k) != b.0.get(k) {
                    out.push(format!(
                        "services.{}.{table}.{k}: {} here, {} agreed",
                        s.name,
                        a.0.get(k).map_or("unset".to_string(), |v| v.to_string()),
                        b.0.get(k).map_or("unset".to_string(), |v| v.to_string()),
                    ));
                }
            }
        }
    }
    for name in pool.services.keys() {
        if !config.services.iter().any(|s| &s.name == name) {
            out.push(format!(
                "services.{name}: agreed by the cluster but not in this config"
            ));
        }
    }
    out
}
