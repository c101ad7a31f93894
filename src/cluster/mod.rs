//! The peer shell around the consensus core: one task owns this node's acceptor, proposer and
//! storage, talks to the other peers through the transport, runs heartbeats and the failure
//! detector, and hands every newly learned pool to a `Publish` (in a peer, `app` connects it to
//! the data plane's routing table). It knows neither the data plane nor the admin API.

pub mod storage;
pub mod transport;

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::core::detector::{Detector, DetectorConfig, PeerState, PeerView};
use crate::core::paxos::{Acceptor, Action, Durable, Msg, Outcome, Proposer, ProposerConfig};
use crate::core::pool::{BackendState, ChangeError, NodeId, Pool, PoolChange, Rules};
use crate::telemetry as names;
use storage::{FileStore, Storage};
use transport::{Body, Inbound, PeerTls, Transport};

/// How often an idle peer reads the register (catching up on missed learn pushes).
const READ_PERIOD: Duration = Duration::from_secs(2);
/// Pending changes beyond this are refused at once (503).
const MAX_QUEUE: usize = 1024;

/// How long a caller waits for the outcome of its change.
const ANSWER_WITHIN: Duration = Duration::from_secs(30);

/// Why a change did not commit.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The change's precondition failed against the agreed pool; nothing changed.
    #[error(transparent)]
    Rejected(#[from] ChangeError),
    /// No majority answered before any accept carrying the change went out: it did not happen.
    #[error("no quorum: no majority of peers answered; nothing changed")]
    NoQuorum,
    /// Too many changes are waiting already; nothing changed.
    #[error("too many pending changes; nothing changed")]
    Busy,
    /// Accepts were sent but a majority did not confirm in time.
    #[error("outcome unknown: a majority did not confirm in time (the change may have committed; read the pool before retrying)")]
    Unknown,
    /// The cluster task is gone (shutting down).
    #[error("the cluster task is not running")]
    Stopped,
}

/// Where learned pools go (in a peer: the data plane's routing table). Called in version order,
/// each version at most once, before the change that produced it is answered.
pub trait Publish: Send + Sync + 'static {
    fn publish(&self, pool: Pool);
}

type Reply = oneshot::Sender<Result<Pool, Error>>;

enum Command {
    Change(PoolChange, Option<Reply>),
}

/// The cluster as the admin API and the health checker see it.
#[derive(Clone)]
pub struct Cluster {
    commands: mpsc::Sender<Command>,
    peers: Arc<Mutex<Vec<PeerView>>>,
    quorum: Arc<AtomicBool>,
    /// Peers the detector currently declares dead.
    dead: Arc<Mutex<Vec<NodeId>>>,
    /// The driver task, taken by `stopped` to wait for it.
    task: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

impl Cluster {
    /// Propose a change without waiting for it (health votes).
    pub fn submit(&self, change: PoolChange) {
        let _ = self.commands.try_send(Command::Change(change, None));
    }

    pub fn dead_peers(&self) -> Vec<NodeId> {
        self.dead.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Wait (up to `limit`) for the driver to finish after the shutdown token was cancelled,
    /// so no write to the Paxos state is cut off by the runtime stopping.
    pub async fn stopped(&self, limit: Duration) {
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = task {
            let _ = tokio::time::timeout(limit, t).await;
        }
    }

    /// Commit `change` through a majority and return the pool it produced.
    pub async fn change(&self, change: PoolChange) -> Result<Pool, Error> {
        let (tx, rx) = oneshot::channel();
        if self
            .commands
            .try_send(Command::Change(change, Some(tx)))
            .is_err()
        {
            return Err(Error::Busy);
        }
        match tokio::time::timeout(ANSWER_WITHIN, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(Error::Stopped),
            Err(_) => Err(Error::Unknown),
        }
    }

    /// The other peers as this peer's detector sees them.
    pub fn peers(&self) -> Vec<PeerView> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether a majority of peers answers now.
    pub fn quorum(&self) -> bool {
        self.quorum.load(Ordering::Relaxed)
    }
}

/// Start this peer's cluster task. Fails if the stored state cannot be read.
pub async fn start(
    config: &Config,
    listener: TcpListener,
    publish: Arc<dyn Publish>,
    shutdown: CancellationToken,
) -> anyhow::Result<Cluster> {
    let mut store = FileStore::open(&config.node.data_dir).map_err(|e| {
        anyhow::anyhow!(
            "node.data_dir: cannot use {}: {e}",
            config.node.data_dir.display()
        )
    })?;
    let durable = store.load().map_err(|e| {
        anyhow::anyhow!(
            "node.data_dir: cannot read the Paxos state in {}: {e} (refusing to start with a blank acceptor under the same id)",
            config.node.data_dir.display()
        )
    })?;
    let fresh = durable.is_none();
    let durable = durable.unwrap_or_default();
    // A routing hint until the cluster answers: the last pool this peer learned.
    let learned = store.load_learned().unwrap_or_default();
    if learned.exists() {
        record_pool_metrics(&Pool::default(), &learned);
        publish.publish(learned.clone());
    }
    let tls = match &config.cluster.tls {
        None => None,
        Some(t) => Some(PeerTls::load(t).map_err(|e| anyhow::anyhow!("cluster.tls: {e}"))?),
    };
    // Every family shows from the first scrape, before anything happened.
    metrics::counter!(names::PEER_AUTH_FAILURES_TOTAL, "peer" => "unknown").increment(0);
    for result in ["committed", "conflict", "timeout"] {
        metrics::counter!(names::PAXOS_ROUNDS_TOTAL, "result" => result).increment(0);
    }
    let _ = metrics::histogram!(names::PAXOS_COMMIT_DURATION_SECONDS);
    for p in &config.cluster.peers {
        metrics::gauge!(names::PEER_UP, "peer" => p.id.to_string()).set(1.0);
        metrics::gauge!(names::PEER_PHI, "peer" => p.id.to_string()).set(0.0);
        metrics::counter!(names::PEER_AUTH_FAILURES_TOTAL, "peer" => p.id.to_string()).increment(0);
    }
    let (in_tx, in_rx) = mpsc::channel(8192);
    let transport = Transport::start(
        config.node.id.clone(),
        listener,
        &config.cluster.peers,
        tls,
        in_tx,
        shutdown.clone(),
    );
    let (cmd_tx, cmd_rx) = mpsc::channel(MAX_QUEUE);
    let cluster = Cluster {
        commands: cmd_tx,
        peers: Arc::new(Mutex::new(Vec::new())),
        quorum: Arc::new(AtomicBool::new(config.cluster.peers.is_empty())),
        dead: Arc::new(Mutex::new(Vec::new())),
        task: Arc::new(Mutex::new(None)),
    };
    let mut ids: Vec<NodeId> = config.cluster.peers.iter().map(|p| p.id.clone()).collect();
    ids.push(config.node.id.clone());
    ids.sort();
    let seed = {
        // Jitter only needs to differ between peers and runs.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        t ^ u64::from(std::process::id())
    };
    let epoch = Instant::now();
    let detector_cfg = DetectorConfig {
        interval_ms: config.cluster.heartbeat_interval.as_millis() as u64,
        phi_threshold: config.cluster.phi_threshold,
        dead_after_ms: config.cluster.dead_after.as_millis() as u64,
    };
    let driver = Driver {
        me: config.node.id.clone(),
        acceptor: Acceptor::new(durable.acceptor.clone()),
        proposer: Proposer::new(
            config.node.id.clone(),
            ids,
            ProposerConfig {
                phase_timeout: 500,
                deadline: 3_000,
                backoff_base: 20,
                backoff_cap: 1_000,
            },
            durable.counter_reserved,
            seed,
        ),
        durable,
        store,
        rules: config.rules(),
        seeds: config.backends.clone(),
        learned,
        publish,
        transport,
        peers: config
            .cluster
            .peers
            .iter()
            .map(|p| {
                (
                    p.id.clone(),
                    PeerEntry {
                        addr: p.addr.clone(),
                        detector: Detector::new(detector_cfg, 0),
                        state: PeerState::Alive,
                    },
                )
            })
            .collect(),
        queue: VecDeque::new(),
        current: None,
        epoch,
        view: cluster.clone(),
        conflicts_seen: 0,
    };
    if fresh {
        tracing::info!(dir = %config.node.data_dir.display(), "no Paxos state yet: a new acceptor");
    }
    let task = tokio::spawn(driver.run(in_rx, cmd_rx, config.cluster.heartbeat_interval, shutdown));
    *cluster.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
    Ok(cluster)
}

struct PeerEntry {
    addr: String,
    detector: Detector,
    state: PeerState,
}

struct Current {
    reply: Option<Reply>,
    started: Instant,
    /// A read (not timed as a commit).
    is_read: bool,
}

struct Driver {
    me: NodeId,
    acceptor: Acceptor,
    proposer: Proposer,
    durable: Durable,
    store: FileStore,
    rules: Rules,
    seeds: Vec<crate::core::pool::Backend>,
    learned: Pool,
    publish: Arc<dyn Publish>,
    transport: Transport,
    peers: BTreeMap<NodeId, PeerEntry>,
    queue: VecDeque<(PoolChange, Option<Reply>)>,
    current: Option<Current>,
    epoch: Instant,
    view: Cluster,
    conflicts_seen: u64,
}

impl Driver {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    async fn run(
        mut self,
        mut inbox: mpsc::Receiver<Inbound>,
        mut commands: mpsc::Receiver<Command>,
        heartbeat: Duration,
        shutdown: CancellationToken,
    ) {
        let mut beat = tokio::time::interval(heartbeat);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut read = tokio::time::interval(READ_PERIOD);
        read.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        // Seed (or read) at once: a new cluster gets its pool, a restarted peer catches up.
        self.enqueue_catch_up();
        self.next();
        loop {
            let wake = self
                .proposer
                .next_wakeup()
                .map(|ms| tokio::time::Instant::from_std(self.epoch + Duration::from_millis(ms)));
            tokio::select! {
                _ = shutdown.cancelled() => {
                    if let Some(o) = self.proposer.cancel() {
                        self.done(o);
                    }
                    return;
                }
                Some(m) = inbox.recv() => self.inbound(m),
                Some(Command::Change(change, reply)) = commands.recv() => {
                    self.queue.push_back((change, reply));
                    self.next();
                }
                _ = beat.tick() => self.heartbeat(),
                _ = read.tick() => {
                    if self.current.is_none() && self.queue.is_empty() {
                        self.enqueue_catch_up();
                        self.next();
                    }
                }
                _ = async { match wake { Some(w) => tokio::time::sleep_until(w).await, None => std::future::pending().await } } => {
                    let mut out = Vec::new();
                    let now = self.now_ms();
                    self.proposer.tick(now, &mut out);
                    self.act(out);
                    self.next();
                }
            }
        }
    }

    /// A seed while no pool is known, else an identity read.
    fn enqueue_catch_up(&mut self) {
        let change = if self.learned.exists() {
            PoolChange::Read
        } else {
            PoolChange::Seed {
                backends: self.seeds.clone(),
            }
        };
        self.queue.push_back((change, None));
    }

    /// Start the next queued change if the proposer is free.
    fn next(&mut self) {
        while self.current.is_none() {
            let Some((change, reply)) = self.queue.pop_front() else {
                return;
            };
            let is_read = change == PoolChange::Read;
            let mut out = Vec::new();
            let now = self.now_ms();
            if self.proposer.propose(change, self.rules, now, &mut out) {
                self.current = Some(Current {
                    reply,
                    started: Instant::now(),
                    is_read,
                });
                self.act(out);
            }
        }
    }

    fn persist(&mut self) -> bool {
        let d = self.durable.clone();
        let store = &mut self.store;
        match tokio::task::block_in_place(|| store.save(&d)) {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(error = %e, "cannot persist Paxos state; not answering");
                false
            }
        }
    }

    /// Carry out proposer actions; messages to self are handled here, in order.
    fn act(&mut self, out: Vec<Action>) {
        let mut work: VecDeque<Action> = out.into();
        while let Some(a) = work.pop_front() {
            match a {
                Action::SaveCounter(c) => {
                    self.durable.counter_reserved = c;
                    if !self.persist() {
                        // Without the reservation on disk no ballot may leave.
                        if let Some(o) = self.proposer.cancel() {
                            self.done(o);
                        }
                        return;
                    }
                }
                Action::Send(to, msg) if to == self.me => {
                    if let Some(reply) = self.accept(&msg) {
                        let mut more = Vec::new();
                        let (me, now) = (self.me.clone(), self.now_ms());
                        self.proposer.on_message(&me, &reply, now, &mut more);
                        work.extend(more);
                    }
                }
                Action::Send(to, msg) => self.transport.send(&to, Body::Paxos { msg }),
                Action::Done(o) => self.done(o),
            }
        }
        let c = self.proposer.conflicts();
        if c > self.conflicts_seen {
            metrics::counter!(names::PAXOS_ROUNDS_TOTAL, "result" => "conflict")
                .increment(c - self.conflicts_seen);
            self.conflicts_seen = c;
        }
    }

    /// The acceptor's side: handle, persist if changed, then (and only then) reply.
    fn accept(&mut self, msg: &Msg) -> Option<Msg> {
        let (changed, reply) = self.acceptor.handle(msg)?;
        if changed {
            self.durable.acceptor = self.acceptor.state().clone();
            if !self.persist() {
                return None;
            }
        }
        Some(reply)
    }

    fn inbound(&mut self, m: Inbound) {
        match m.body {
            Body::Hello => {}
            Body::Heartbeat => {
                let now = self.now_ms();
                if let Some(p) = self.peers.get_mut(&m.from) {
                    p.detector.heartbeat(now);
                }
            }
            Body::Paxos { msg } => match msg {
                Msg::Prepare { ref ballot } | Msg::Accept { ref ballot, .. } => {
                    self.proposer.observe(ballot);
                    if let Some(reply) = self.accept(&msg) {
                        self.transport.send(&m.from, Body::Paxos { msg: reply });
                    }
                }
                Msg::Learn { pool } => {
                    self.learn(pool);
                }
                other => {
                    let mut out = Vec::new();
                    let now = self.now_ms();
                    self.proposer.on_message(&m.from, &other, now, &mut out);
                    self.act(out);
                    self.next();
                }
            },
        }
    }

    fn learn(&mut self, pool: Pool) -> bool {
        if pool.version <= self.learned.version && self.learned.exists() {
            return false;
        }
        record_pool_metrics(&self.learned, &pool);
        self.learned = pool.clone();
        let store = &self.store;
        if let Err(e) = tokio::task::block_in_place(|| store.save_learned(&pool)) {
            tracing::warn!(error = %e, "cannot save the learned pool");
        }
        self.publish.publish(pool);
        true
    }

    fn done(&mut self, outcome: Outcome) {
        let cur = self.current.take();
        let (result, committed) = match &outcome {
            Outcome::Committed(p) | Outcome::AlreadyCommitted(p) => {
                (Ok(p.clone()), Some(p.clone()))
            }
            Outcome::Rejected(e, p) => (Err(Error::Rejected(e.clone())), Some(p.clone())),
            Outcome::NotApplied => (Err(Error::NoQuorum), None),
            Outcome::Unknown => (Err(Error::Unknown), None),
        };
        let label = if committed.is_some() {
            "committed"
        } else {
            "timeout"
        };
        metrics::counter!(names::PAXOS_ROUNDS_TOTAL, "result" => label).increment(1);
        if let Some(pool) = committed {
            if let Some(c) = &cur {
                if !c.is_read {
                    metrics::histogram!(names::PAXOS_COMMIT_DURATION_SECONDS)
                        .record(c.started.elapsed().as_secs_f64());
                }
            }
            if self.learn(pool.clone()) {
                for id in self.peers.keys() {
                    self.transport.send(
                        id,
                        Body::Paxos {
                            msg: Msg::Learn { pool: pool.clone() },
                        },
                    );
                }
            }
        }
        if let Some(Current {
            reply: Some(tx), ..
        }) = cur
        {
            let _ = tx.send(result);
        }
    }

    fn heartbeat(&mut self) {
        for id in self.peers.keys() {
            self.transport.send(id, Body::Heartbeat);
        }
        let now = self.now_ms();
        let mut views = Vec::with_capacity(self.peers.len());
        let mut alive = 1; // this peer
        let mut dead = Vec::new();
        let mut came_back = false;
        for (id, p) in self.peers.iter_mut() {
            let state = p.detector.state(now);
            if state != p.state {
                came_back |= state == PeerState::Alive;
                match state {
                    PeerState::Alive => tracing::info!(peer = %id, "peer alive"),
                    PeerState::Suspect => tracing::warn!(peer = %id, "peer suspect"),
                    PeerState::Dead => tracing::warn!(peer = %id, "peer dead"),
                }
                p.state = state;
            }
            if state == PeerState::Alive {
                alive += 1;
            }
            if state == PeerState::Dead {
                dead.push(id.clone());
            }
            let phi = p.detector.phi(now);
            let phi = if phi.is_finite() {
                (phi * 100.0).round() / 100.0
            } else {
                1e9
            };
            metrics::gauge!(names::PEER_UP, "peer" => id.to_string())
                .set(if state == PeerState::Dead { 0.0 } else { 1.0 });
            metrics::gauge!(names::PEER_PHI, "peer" => id.to_string()).set(phi);
            views.push(PeerView {
                id: id.to_string(),
                addr: p.addr.clone(),
                state: state.as_str().to_string(),
                phi,
                last_seen_ms: p.detector.last_seen().map(|t| now.saturating_sub(t)),
            });
        }
        *self.view.peers.lock().unwrap_or_else(|e| e.into_inner()) = views;
        *self.view.dead.lock().unwrap_or_else(|e| e.into_inner()) = dead;
        self.view
            .quorum
            .store(alive >= self.proposer.majority(), Ordering::Relaxed);
        // A peer came back (a healed partition, a restart): catch up now, not at the next
        // periodic read.
        if came_back && self.current.is_none() && self.queue.is_empty() {
            self.enqueue_catch_up();
            self.next();
        }
    }
}

/// The agreed pool's metrics, as this peer learns a new version: version, fingerprint, each
/// backend's state, and an ejection for every backend that became `ejected`.
fn record_pool_metrics(old: &Pool, new: &Pool) {
    metrics::gauge!(names::POOL_VERSION).set(new.version as f64);
    metrics::gauge!(names::POOL_FINGERPRINT).set(new.fingerprint() as f64);
    for b in new.backends.values() {
        let id = b.id.to_string();
        let was = old.backends.get(&b.id).map(|o| o.state);
        if was.is_none() {
            metrics::counter!(names::EJECTIONS_TOTAL, "backend" => id.clone()).increment(0);
        }
        for s in BackendState::ALL {
            metrics::gauge!(names::BACKEND_STATE, "backend" => id.clone(), "state" => s.as_str())
                .set(if b.state == s { 1.0 } else { 0.0 });
        }
        if b.state == BackendState::Ejected && was != Some(BackendState::Ejected) {
            metrics::counter!(names::EJECTIONS_TOTAL, "backend" => id.clone()).increment(1);
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
