//! Wiring: one peer from a config (listeners, routing table, cluster, probes, admin), its reload
//! and its drain. The only module that sees every shell: they meet here through the seams in
//! `seams` and the health voter in `health`.

#![forbid(unsafe_code)]

mod discovery;
mod health;
pub mod probe;
mod seams;
pub mod services;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::cluster::Cluster;
use crate::config::Config;
use crate::ops::admin::Admin;
use crate::ops::events::Events;
use crate::ops::telemetry::{self, LogReload};
use crate::proxy::server::{Listener, Server, ServerOptions};
use crate::proxy::table::{RoutingTable, Settings};
use crate::proxy::Proxy;
use crate::sync::MutexExt;
use services::Services;

/// A running peer.
pub struct Peer {
    pub config: Config,
    /// What happened here recently (`/events`).
    pub events: Events,
    /// The `default` service's routing table.
    pub table: Arc<RoutingTable>,
    /// Every service's routing table and the route lookup.
    pub services: Arc<Services>,
    pub cluster: Cluster,
    pub admin: Arc<Admin>,
    server: Arc<Server>,
    tls: Option<Arc<ArcSwap<crate::net::tls::Termination>>>,
    shutdown: CancellationToken,
    /// The addresses actually bound (ports may have been 0).
    pub proxy_addrs: Vec<std::net::SocketAddr>,
    pub admin_addr: std::net::SocketAddr,
}

async fn bind(addr: std::net::SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("{what}: cannot listen on {addr}"))
}

impl Peer {
    /// Bind every listener and start serving.
    pub async fn start(config: Config) -> anyhow::Result<Peer> {
        let metrics = telemetry::prometheus();
        telemetry::spawn_upkeep(&metrics);
        let workers = match config.proxy.workers {
            0 => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            n => n,
        };
        let table = RoutingTable::new(
            crate::core::pool::DEFAULT_SERVICE,
            Settings::from_config(&config),
            workers,
        );
        let shutdown = CancellationToken::new();
        let services = Services::new(&config, table.clone(), workers, shutdown.clone());
        let proxy = Proxy::new(services.routes());
        let server = Server::new(
            proxy,
            ServerOptions {
                max_header_bytes: config.proxy.max_header_bytes,
                client_idle_timeout: config.proxy.client_idle_timeout,
                max_connections: config.proxy.max_connections,
                tunnel_idle_timeout: config.proxy.tunnel_idle_timeout,
                io_uring: config.proxy.io_uring,
            },
        );

        let (listeners, tls) = bind_listeners(&config, workers)?;
        let proxy_addrs: Vec<std::net::SocketAddr> = listeners.iter().map(|l| l.addr).collect();
        let admin_listener = bind(config.admin.listen, "admin.listen").await?;
        let admin_addr = admin_listener.local_addr()?;

        let cluster_listener = bind(config.cluster.listen, "cluster.listen").await?;
        let events = Events::new(config.node.id.as_str());
        let cluster = crate::cluster::start(
            &config,
            cluster_listener,
            services.clone(),
            events.clone(),
            shutdown.clone(),
        )
        .await?;
        let answers = discovery::Answers::default();
        // Each service's probes, health voter and discovery: `default`'s now, the others' as
        // they appear in the agreed pool.
        let spawner = service_tasks(&config, &cluster, &events, &answers, &services);
        spawner(
            crate::core::pool::DEFAULT_SERVICE,
            table.clone(),
            shutdown.clone(),
        );
        services.set_spawner(spawner);
        spawn_service_seeding(services.clone(), cluster.clone(), shutdown.clone());

        let admin = Arc::new(Admin {
            node: config.node.id.clone(),
            token: config.admin.token.clone(),
            routing: services.clone(),
            control: Arc::new(cluster.clone()),
            metrics,
            events: events.clone(),
            collect: collector(services.clone(), cluster.clone()),
            discovery: Box::new(move || {
                serde_json::to_value(&*answers.locked()).unwrap_or_default()
            }),
            started: std::time::Instant::now(),
            listening: Default::default(),
            shutting_down: Default::default(),
        });
        admin.clone().spawn(admin_listener, shutdown.clone());
        server
            .start_workers(listeners, workers)
            .context("cannot start the worker threads")?;
        admin.listening.store(true, Ordering::Relaxed);
        tracing::info!(
            node = %config.node.id,
            proxy = ?proxy_addrs,
            admin = %admin_addr,
            "peer started"
        );
        Ok(Peer {
            events,
            config,
            table,
            services,
            cluster,
            admin,
            server,
            tls,
            shutdown,
            proxy_addrs,
            admin_addr,
        })
    }

    /// Apply what can change live from a new config; say what needs a restart. Certificates are
    /// loaded first: if any fails, nothing changes and the reason is returned.
    pub fn reload(&mut self, mut new: Config, log: Option<&LogReload>) -> Result<(), String> {
        let proxy_tls = match (&self.tls, &new.proxy.tls) {
            (Some(_), Some(t)) => Some(
                crate::net::tls::load_termination(&t.cert, &t.key)
                    .map_err(|e| format!("proxy.tls: {e}"))?,
            ),
            _ => None,
        };
        self.cluster
            .reload(&new)
            .map_err(|e| format!("cluster.tls: {e}"))?;
        if let (Some(swap), Some(cfg)) = (&self.tls, proxy_tls) {
            swap.store(cfg);
        }
        self.services.reload(&new);
        if let Some(h) = log {
            if let Ok(f) = tracing_subscriber::EnvFilter::try_new(&new.log.level) {
                let _ = h.reload(f);
            }
        }
        self.server
            .set_idle_timeouts(new.proxy.client_idle_timeout, new.proxy.tunnel_idle_timeout);
        // What only a restart changes keeps its running value, also in the kept config (so a
        // later reload compares against what runs), and the reload says so.
        let old = &self.config;
        keep("proxy.workers", &old.proxy.workers, &mut new.proxy.workers);
        keep(
            "proxy.io_uring",
            &old.proxy.io_uring,
            &mut new.proxy.io_uring,
        );
        keep(
            "proxy.max_connections",
            &old.proxy.max_connections,
            &mut new.proxy.max_connections,
        );
        keep(
            "proxy.max_header_bytes",
            &old.proxy.max_header_bytes,
            &mut new.proxy.max_header_bytes,
        );
        keep("proxy.listen", &old.proxy.listen, &mut new.proxy.listen);
        keep("admin.listen", &old.admin.listen, &mut new.admin.listen);
        keep(
            "cluster.listen",
            &old.cluster.listen,
            &mut new.cluster.listen,
        );
        keep("node.id", &old.node.id, &mut new.node.id);
        match (&old.proxy.tls, &mut new.proxy.tls) {
            (Some(o), Some(n)) => keep("proxy.tls.listen", &o.listen, &mut n.listen),
            (None, None) => {}
            (o, n) => {
                tracing::warn!(
                    key = "proxy.tls",
                    "proxy.tls changes only on restart; kept the old value"
                );
                *n = o.clone();
            }
        }
        record_certificate_expiry(&new);
        self.config = new;
        Ok(())
    }

    /// Stop accepting, finish in-flight requests up to `shutdown_grace`, stop everything.
    pub async fn drain(&self) {
        self.admin.shutting_down.store(true, Ordering::Relaxed);
        // /readyz fails at once; the listeners keep serving until whatever routes to this peer
        // (a load balancer, Kubernetes endpoints) has noticed.
        let delay = self.config.proxy.shutdown_delay;
        if !delay.is_zero() {
            tracing::info!(
                ?delay,
                "not ready; closing the listeners after shutdown_delay"
            );
            tokio::time::sleep(delay).await;
        }
        let grace = self.config.proxy.shutdown_grace;
        let left = self.server.drain(grace).await;
        if left > 0 {
            tracing::warn!(
                connections = left,
                "shutdown grace ran out; closing the rest"
            );
        }
        self.shutdown.cancel();
    }
}

/// A reloaded key that only a restart changes: if it differs, warn and keep the running value.
fn keep<T: PartialEq + Clone>(key: &str, running: &T, new: &mut T) {
    if running != new {
        tracing::warn!(key, "{key} changes only on restart; kept the old value");
        *new = running.clone();
    }
}

/// The gauges read at scrape time: build info, quorum, members, requests in flight per backend.
fn collector(services: Arc<Services>, cluster: Cluster) -> Box<dyn Fn() + Send + Sync> {
    Box::new(move || {
        metrics::gauge!(
            telemetry::BUILD_INFO,
            "version" => env!("CARGO_PKG_VERSION"),
            "commit" => telemetry::COMMIT
        )
        .set(1.0);
        metrics::gauge!(telemetry::QUORUM).set(if cluster.quorum() { 1.0 } else { 0.0 });
        let status = cluster.status();
        metrics::gauge!(telemetry::MEMBERS, "role" => "voter").set(status.members.len() as f64);
        // Learners: the recorded ones, the others this peer sees alive, and itself if it is one.
        let mut learners: std::collections::BTreeSet<String> =
            status.learners.iter().map(|l| l.to_string()).collect();
        for p in cluster.peers() {
            if p.role == "learner" && p.state != "dead" {
                learners.insert(p.id);
            }
        }
        if status.role == "learner" {
            learners.insert(String::from("(this peer)"));
        }
        metrics::gauge!(telemetry::MEMBERS, "role" => "learner").set(learners.len() as f64);
        for table in services.tables() {
            for u in table.registry().of_pool(&table.pool()) {
                metrics::gauge!(telemetry::BACKEND_INFLIGHT, "backend" => u.id.to_string(), "service" => table.service().to_string())
                    .set(u.inflight() as f64);
            }
        }
    })
}

/// Once a pool is known: warn where this file's services differ from the agreed ones, and if the
/// agreed state has no services but the file has (a cluster formed before it had any), commit
/// the file's.
fn spawn_service_seeding(services: Arc<Services>, cluster: Cluster, shutdown: CancellationToken) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let pool = services.default_table().pool();
            if !pool.exists() {
                continue;
            }
            let config = services.config();
            if !pool.services.is_empty() || config.services.is_empty() {
                services.warn_if_config_differs();
                return;
            }
            let change = crate::core::pool::PoolChange::ApplyServices {
                services: config.service_seeds(),
            };
            match cluster.change(change).await {
                Ok(_) => {
                    tracing::info!(
                        services = config.services.len(),
                        "the agreed state had no services: seeded this config's"
                    );
                    return;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "seeding the services: will retry");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    });
}

/// `shoal_certificate_expiry_timestamp_seconds` for the proxy's and the cluster's certificates.
fn record_certificate_expiry(config: &Config) {
    let certs = [
        ("proxy", config.proxy.tls.as_ref().map(|t| &t.cert)),
        ("cluster", config.cluster.tls.as_ref().map(|t| &t.cert)),
    ];
    for (name, path) in certs {
        if let Some(at) = path.and_then(|p| crate::cli::cert::expiry_of(p)) {
            metrics::gauge!(telemetry::CERTIFICATE_EXPIRY_TIMESTAMP_SECONDS, "cert" => name)
                .set(at as f64);
        }
    }
}

/// `shoal run`: start, then serve until SIGTERM/SIGINT (drain, exit 0); SIGHUP reloads.
pub async fn run(config: Config, path: PathBuf, log: Option<LogReload>) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut peer = Peer::start(config).await?;
    for result in ["ok", "failed"] {
        metrics::counter!(telemetry::CONFIG_RELOADS_TOTAL, "result" => result).increment(0);
    }
    record_certificate_expiry(&peer.config);
    crate::ops::notify::notify("READY=1");
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                crate::ops::notify::reloading();
                let done = crate::config::load(&path)
                    .map_err(|e| e.to_string())
                    .and_then(|new| peer.reload(new, log.as_ref()));
                let result = match done {
                    Ok(()) => {
                        peer.events.emit(
                            "reload",
                            format!("config reloaded from {}", path.display()),
                            serde_json::json!({ "result": "ok", "why": null }),
                        );
                        "ok"
                    }
                    Err(e) => {
                        tracing::error!(problems = %e, "reload failed; keeping the old config");
                        peer.events.emit(
                            "reload",
                            format!("reload failed; keeping the old config: {e}"),
                            serde_json::json!({ "result": "failed", "why": e }),
                        );
                        "failed"
                    }
                };
                metrics::counter!(telemetry::CONFIG_RELOADS_TOTAL, "result" => result).increment(1);
                crate::ops::notify::notify("READY=1");
            }
        }
    }
    crate::ops::notify::notify("STOPPING=1");
    tracing::info!("shutting down: draining in-flight requests");
    peer.drain().await;
    // Let the last responses flush.
    tokio::time::sleep(Duration::from_millis(10)).await;
    Ok(())
}

/// The proxy's listeners (plain, then TLS), bound before anything else starts, and the TLS
/// termination config a reload swaps.
#[allow(clippy::type_complexity)]
fn bind_listeners(
    config: &Config,
    workers: usize,
) -> anyhow::Result<(
    Vec<Listener>,
    Option<Arc<ArcSwap<crate::net::tls::Termination>>>,
)> {
    let mut listeners = Vec::new();
    for addr in &config.proxy.listen {
        let l = Listener::bind(*addr, workers, None)
            .with_context(|| format!("proxy.listen: cannot listen on {addr}"))?;
        listeners.push(l);
    }
    let tls = match &config.proxy.tls {
        None => None,
        Some(t) => {
            let cfg = crate::net::tls::load_termination(&t.cert, &t.key).context("proxy.tls")?;
            let swap = Arc::new(ArcSwap::new(cfg));
            for addr in &t.listen {
                let l = Listener::bind(*addr, workers, Some(swap.clone()))
                    .with_context(|| format!("proxy.tls.listen: cannot listen on {addr}"))?;
                listeners.push(l);
            }
            Some(swap)
        }
    };
    Ok((listeners, tls))
}

/// What starts a service's probes, slow-start ramp, discovery and health voter on its table.
fn service_tasks(
    config: &Config,
    cluster: &crate::cluster::Cluster,
    events: &Events,
    answers: &discovery::Answers,
    services: &Arc<Services>,
) -> services::Spawner {
    let (cluster, events, me, answers, services) = (
        cluster.clone(),
        events.clone(),
        config.node.id.clone(),
        answers.clone(),
        Arc::downgrade(services),
    );
    let assignment = health::Assignment {
        cluster: cluster.clone(),
        me: me.clone(),
    };
    Box::new(move |name, table, stop| {
        let probing = health::Probing {
            table: table.clone(),
            assignment: assignment.clone(),
        };
        crate::app::probe::spawn(Arc::new(probing), stop.clone());
        health::spawn_ramp(table.clone(), stop.clone());
        let sources = match services.upgrade() {
            Some(s) if name == crate::core::pool::DEFAULT_SERVICE => s.config().discovery.clone(),
            Some(s) => s
                .config()
                .services
                .iter()
                .find(|c| c.name == name)
                .map(|c| c.discovery.clone())
                .unwrap_or_default(),
            None => Vec::new(),
        };
        discovery::spawn(
            &sources,
            table.clone(),
            cluster.clone(),
            me.clone(),
            answers.clone(),
            stop.clone(),
        );
        health::spawn_voter(
            table,
            cluster.clone(),
            events.clone(),
            assignment.clone(),
            stop,
        );
    })
}
