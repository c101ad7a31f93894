//! The peer shell around the consensus core: one task owns this node's acceptor, proposer and
//! storage, talks to the other peers through the transport, runs heartbeats and the failure
//! detector, and hands every newly learned pool to a `Publish` (in a peer, `app` connects it to
//! the data plane's routing table). It knows neither the data plane nor the admin API.

#![forbid(unsafe_code)]

pub mod storage;
pub mod transport;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Role};
use crate::core::autopilot;
use crate::core::detector::{Detector, DetectorConfig, PeerState, PeerView};
use crate::core::paxos::{Consensus, Durable, Effects, Node, Outcome, ProposerConfig};
use crate::core::pool::{BackendState, ChangeError, NodeId, Pool, PoolChange, PoolDiff, Rules};
use crate::ops::events::Events;
use crate::ops::telemetry as names;
use crate::sync::MutexExt;
use serde_json::json;
use storage::{FileStore, Storage};
use transport::{Body, Identity, Inbound, PeerTls, Transport};

/// How often an idle peer reads the register (catching up on missed learn pushes).
const READ_PERIOD: Duration = Duration::from_secs(2);
/// Pending changes beyond this are refused at once (503).
const MAX_QUEUE: usize = 1024;

/// How long a caller waits for the outcome of its change.
const ANSWER_WITHIN: Duration = Duration::from_secs(30);
/// A queued change not started by this long after it was asked for is dropped (its caller is
/// answered at once): one started later could not finish before `ANSWER_WITHIN`, and would
/// commit behind the back of a caller that was told it timed out.
const START_WITHIN: Duration = Duration::from_secs(25);
/// Proposer timing on real networks (milliseconds).
const PROPOSER: ProposerConfig = ProposerConfig {
    phase_timeout: 500,
    deadline: 3_000,
    backoff_base: 20,
    backoff_cap: 1_000,
};

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
    /// This voter started without its Paxos state and may not take part yet.
    #[error("this peer is catching up (it started without its Paxos state); send changes to another peer")]
    CatchingUp,
    /// The change waited too long to start; it was dropped and will not commit.
    #[error("the change waited too long behind others and was dropped; nothing changed")]
    Expired,
}

/// This peer's consensus status, for `/status`.
#[derive(Clone, Debug, Default)]
pub struct ConsensusStatus {
    pub cluster_id: String,
    /// "voter" (among the agreed voters) or "learner".
    pub role: &'static str,
    /// "voting", "catching_up" or "learner".
    pub consensus: &'static str,
    /// The voters quorums are counted among.
    pub members: Vec<NodeId>,
    /// Why a voter cannot catch up, when it has been stuck a while.
    pub waiting: Option<String>,
    /// The membership epoch, the recorded learners, and the members' cluster addresses where
    /// known.
    pub epoch: u64,
    pub learners: Vec<NodeId>,
    pub addrs: BTreeMap<NodeId, Option<String>>,
}

/// Where learned pools go (in a peer: the data plane's routing table). Called in version order,
/// each version at most once, before the change that produced it is answered.
pub trait Publish: Send + Sync + 'static {
    fn publish(&self, pool: Pool);
    /// Stop routing from any pool (this node found that its pool is not the cluster's).
    fn withdraw(&self);
}

type Reply = oneshot::Sender<Result<Pool, Error>>;

enum Command {
    Change(PoolChange, Option<Reply>),
}

/// A change waiting for the proposer.
struct Queued {
    change: PoolChange,
    reply: Option<Reply>,
    /// Dropped unless started by then.
    start_by: Instant,
    /// Queued again behind a catch-up round.
    after_catch_up: bool,
}

/// The cluster as the admin API and the health checker see it.
#[derive(Clone)]
pub struct Cluster {
    commands: mpsc::Sender<Command>,
    peers: Arc<Mutex<Vec<PeerView>>>,
    quorum: Arc<AtomicBool>,
    /// Peers the detector declares dead, or silent for `cluster.dead_after` already; told to
    /// subscribers only when the list changes (idle health voters wait on it).
    dead: Arc<watch::Sender<Vec<NodeId>>>,
    status: Arc<Mutex<ConsensusStatus>>,
    /// The driver task, taken by `stopped` to wait for it.
    task: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>>,
    /// The rules changes apply under (`health.max_ejected_percent` and `health.probers` from
    /// the config), read at each proposal: a reload changes them.
    rules: Arc<Mutex<Rules>>,
    /// The peer certificates (a reload swaps them for new connections).
    tls: Option<PeerTls>,
}

impl Cluster {
    /// Propose a change without waiting for it (health and discovery votes). Only a voter's
    /// votes count, so a learner's are not proposed at all.
    pub fn submit(&self, change: PoolChange) {
        let vote = matches!(
            change,
            PoolChange::VoteDown { .. }
                | PoolChange::VoteUp { .. }
                | PoolChange::Sightings { .. }
                | PoolChange::ExpireVotes { .. }
        );
        if vote && self.status().role != "voter" {
            return;
        }
        let _ = self.commands.try_send(Command::Change(change, None));
    }

    pub fn dead_peers(&self) -> Vec<NodeId> {
        self.dead.borrow().clone()
    }

    /// A receiver marked changed whenever the list of dead peers changes.
    pub fn dead_changes(&self) -> watch::Receiver<Vec<NodeId>> {
        self.dead.subscribe()
    }

    /// Wait (up to `limit`) for the driver to finish after the shutdown token was cancelled,
    /// so no write to the Paxos state is cut off by the runtime stopping.
    pub async fn stopped(&self, limit: Duration) {
        let task = self.task.locked().take();
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
        self.peers.locked().clone()
    }

    /// Apply what a config reload may change: the ejection cap and the peer certificates (the
    /// old ones stay when the new files do not load).
    pub fn reload(&self, config: &Config) -> Result<(), crate::net::tls::TlsError> {
        if let (Some(tls), Some(files)) = (&self.tls, &config.cluster.tls) {
            tls.reload(files)?;
        }
        let next = Rules {
            cluster_size: self.rules.locked().cluster_size,
            ..config.rules()
        };
        if std::mem::replace(&mut *self.rules.locked(), next) != next {
            // Votes already recorded count under the new cap now, not at the next vote.
            self.submit(PoolChange::Settle);
        }
        Ok(())
    }

    /// Whether a majority of peers answers now.
    pub fn quorum(&self) -> bool {
        self.quorum.load(Ordering::Relaxed)
    }

    pub fn status(&self) -> ConsensusStatus {
        self.status.locked().clone()
    }
}

/// Start this peer's cluster task. Fails if the stored state cannot be read.
pub async fn start(
    config: &Config,
    listener: TcpListener,
    publish: Arc<dyn Publish>,
    events: Events,
    shutdown: CancellationToken,
) -> anyhow::Result<Cluster> {
    let (store, durable, learned) = open_state(config)?;
    if learned.exists() {
        record_pool_metrics(&Pool::default(), &learned);
        publish.publish(learned.clone());
    }
    let tls = match &config.cluster.tls {
        None => None,
        Some(t) => Some(PeerTls::load(t).map_err(|e| anyhow::anyhow!("cluster.tls: {e}"))?),
    };
    describe_metrics(config);
    let (in_tx, in_rx) = mpsc::channel(8192);
    let identity = Identity::default();
    identity.set(&learned.cluster_id, learned.epoch, &learned.voters);
    let role = config.cluster.role;
    let transport = Transport::start(
        config.node.id.clone(),
        listener,
        &config.cluster.peers,
        tls.clone(),
        identity.clone(),
        config.cluster.dead_after,
        in_tx,
        shutdown.clone(),
        role == Role::Learner,
    );
    let (cmd_tx, cmd_rx) = mpsc::channel(MAX_QUEUE);
    let cluster = Cluster {
        commands: cmd_tx,
        peers: Arc::new(Mutex::new(Vec::new())),
        quorum: Arc::new(AtomicBool::new(config.cluster.peers.is_empty())),
        dead: Arc::new(watch::Sender::new(Vec::new())),
        status: Arc::new(Mutex::new(ConsensusStatus::default())),
        task: Arc::new(Mutex::new(None)),
        rules: Arc::new(Mutex::new(config.rules())),
        tls,
    };
    let learned_hint = learned.clone();
    let node = new_node(config, durable, learned);
    let detector_cfg = DetectorConfig {
        interval_ms: config.cluster.heartbeat_interval.as_millis() as u64,
        phi_threshold: config.cluster.phi_threshold,
        dead_after_ms: config.cluster.dead_after.as_millis() as u64,
    };
    let driver = Driver {
        me: config.node.id.clone(),
        role,
        configured: config
            .cluster
            .peers
            .iter()
            .map(|p| (p.id.clone(), p.addr.clone()))
            .collect(),
        detector_cfg,
        fetch_turn: 0,
        node,
        store,
        events,
        rules: cluster.rules.clone(),
        seeds: config.backends.clone(),
        service_seeds: config.service_seeds(),
        publish,
        transport,
        identity,
        published: learned_hint,
        peers: peer_entries(config, detector_cfg),
        queue: VecDeque::new(),
        current: None,
        epoch: Instant::now(),
        view: cluster.clone(),
        conflicts_seen: 0,
        waiting: None,
        claimed: None,
        rejoining: false,
        rejoin_from: None,
        seeding: None,
        peer_clusters: HashMap::new(),
        advertise: advertise(&config.cluster),
        autopilot: autopilot_settings(config),
        autopilot_wait: None,
    };
    let task = tokio::spawn(driver.run(in_rx, cmd_rx, config.cluster.heartbeat_interval, shutdown));
    *cluster.task.locked() = Some(task);
    Ok(cluster)
}

/// `cluster.peers`, each with a fresh detector.
fn peer_entries(config: &Config, detector: DetectorConfig) -> BTreeMap<NodeId, PeerEntry> {
    let entry =
        |p: &crate::config::PeerConfig| PeerEntry::new(p.addr.clone(), Detector::new(detector, 0));
    config
        .cluster
        .peers
        .iter()
        .map(|p| (p.id.clone(), entry(p)))
        .collect()
}

/// `[cluster.autopilot]` in the core's terms, when it is on.
fn autopilot_settings(config: &Config) -> Option<autopilot::Settings> {
    let a = &config.cluster.autopilot;
    a.enabled.then_some(autopilot::Settings {
        voters: a.voters,
        dead_after_ms: a.dead_after.as_millis() as u64,
        stabilization_ms: a.stabilization.as_millis() as u64,
    })
}

/// This peer's Paxos state and the last pool it learned, from `node.data_dir`
/// (`--force-new-cluster` makes it the only voter of a new cluster first).
fn open_state(config: &Config) -> anyhow::Result<(FileStore, Option<Durable>, Pool)> {
    let dir = &config.node.data_dir;
    let mut store = FileStore::open(dir)
        .map_err(|e| anyhow::anyhow!("node.data_dir: cannot use {}: {e}", dir.display()))?;
    let mut durable = store.load().map_err(|e| {
        anyhow::anyhow!(
            "node.data_dir: cannot read the Paxos state in {}: {e} (refusing to start with a blank acceptor under the same id)",
            dir.display()
        )
    })?;
    // A routing hint until the cluster answers: the last pool this peer learned.
    let mut learned = store.load_learned().unwrap_or_default();
    if config.node.force_new_cluster {
        let me = &config.node.id;
        let (forced, pool) = durable
            .clone()
            .unwrap_or_default()
            .force_new_cluster(me, &learned, format!("{:032x}", rand::random::<u128>()))
            .map_err(|e| anyhow::anyhow!("--force-new-cluster: {e}"))?;
        store
            .save(&forced)
            .and_then(|()| store.save_learned(&pool))
            .map_err(|e| anyhow::anyhow!("--force-new-cluster: cannot write the new state: {e}"))?;
        tracing::warn!(
            version = pool.version,
            epoch = pool.epoch,
            cluster_id = %pool.cluster_id,
            backends = pool.backends.len(),
            "forced a new cluster: this peer is the only voter, from its own last state"
        );
        durable = Some(forced);
        learned = pool;
    }
    if durable.is_none() {
        tracing::info!(dir = %dir.display(), "no Paxos state: this voter catches up before it votes (or forms a new cluster with the others)");
    }
    Ok((store, durable, learned))
}

/// Every family shows from the first scrape, before anything happened.
fn describe_metrics(config: &Config) {
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
}

/// This peer's `Node`: the configured voters (the peers, and this node unless it is a learner)
/// until it learns the agreed ones, its state, and a seed for jitter.
fn new_node(config: &Config, durable: Option<Durable>, learned: Pool) -> Node {
    let mut voters: Vec<NodeId> = config.cluster.peers.iter().map(|p| p.id.clone()).collect();
    if config.cluster.role == Role::Voter {
        voters.push(config.node.id.clone());
    }
    voters.sort();
    let seed = {
        // Jitter and incarnations only need to differ between peers and runs.
        let t = crate::clock::unix_nanos();
        t ^ u64::from(std::process::id()).rotate_left(32)
    };
    Node::new(
        config.node.id.clone(),
        voters,
        PROPOSER,
        durable,
        learned,
        seed,
    )
}

/// `cluster.advertise`, else `cluster.listen` unless it is a wildcard address (then none: the
/// peer cannot be promoted by autopilot).
fn advertise(c: &crate::config::ClusterConfig) -> String {
    if !c.advertise.is_empty() {
        c.advertise.clone()
    } else if c.listen.ip().is_unspecified() {
        String::new()
    } else {
        c.listen.to_string()
    }
}

struct PeerEntry {
    /// Its cluster address, when known (a learner that dialed in has none here).
    addr: String,
    detector: Detector,
    state: PeerState,
    /// What its `Progress` says: the address it may be dialed at and the pool version it holds.
    advertise: String,
    version: u64,
    /// Since when (ms) its detector has declared it dead.
    dead_since: Option<u64>,
    /// Since when (ms) it has been alive, dialable and caught up without a break (learners).
    ready_since: Option<u64>,
}

impl PeerEntry {
    fn new(addr: String, detector: Detector) -> Self {
        Self {
            addr,
            detector,
            state: PeerState::Alive,
            advertise: String::new(),
            version: 0,
            dead_since: None,
            ready_since: None,
        }
    }

    /// One heartbeat's look at this peer: its detector's state (an event when it changed), its
    /// readiness for promotion, its metrics, and its line in `/status`. Also says whether it
    /// just came back alive.
    fn observe(
        &mut self,
        id: &NodeId,
        now: u64,
        voters: &[NodeId],
        version: u64,
        events: &Events,
    ) -> (PeerView, PeerState, bool) {
        let state = self.detector.state(now);
        let phi = shown_phi(self.detector.phi(now));
        let came_back = state != self.state && state == PeerState::Alive;
        if state != self.state {
            events.emit(
                "peer_state",
                format!("peer {id} {} (was {})", state.as_str(), self.state.as_str()),
                json!({
                    "peer_id": id.as_str(),
                    "state": state.as_str(),
                    "was": self.state.as_str(),
                    "phi": phi,
                }),
            );
            self.state = state;
        }
        if state == PeerState::Dead {
            self.dead_since.get_or_insert(now);
        } else {
            self.dead_since = None;
        }
        // A learner is ready for promotion while alive, dialable and at most one version
        // behind (a change may be on its way to it).
        let ready = state == PeerState::Alive
            && !voters.contains(id)
            && !self.advertise.is_empty()
            && self.version + 1 >= version;
        self.ready_since = if ready {
            self.ready_since.or(Some(now))
        } else {
            None
        };
        metrics::gauge!(names::PEER_UP, "peer" => id.to_string())
            .set(if state == PeerState::Dead { 0.0 } else { 1.0 });
        metrics::gauge!(names::PEER_PHI, "peer" => id.to_string()).set(phi);
        let view = PeerView {
            id: id.to_string(),
            addr: self.addr.clone(),
            role: if voters.contains(id) {
                "voter"
            } else {
                "learner"
            }
            .to_string(),
            state: state.as_str().to_string(),
            phi,
            last_seen_ms: self.detector.last_seen().map(|t| now.saturating_sub(t)),
        };
        (view, state, came_back)
    }
}

/// Phi as shown (events, `/status`, the metric): two decimals, and 1e9 for infinity.
fn shown_phi(phi: f64) -> f64 {
    if phi.is_finite() {
        (phi * 100.0).round() / 100.0
    } else {
        1e9
    }
}

struct Current {
    reply: Option<Reply>,
    started: Instant,
    /// A read (not timed as a commit).
    is_read: bool,
}

/// The cluster task: drives this peer's `Node` with the network, the disk and the clock.
struct Driver {
    /// This peer's id.
    me: NodeId,
    /// `cluster.role`: a learner dials the voters and follows the pool by asking for it.
    role: Role,
    /// `cluster.peers`: addresses to find the cluster by.
    configured: BTreeMap<NodeId, String>,
    detector_cfg: DetectorConfig,
    /// Which voter a learner asks next for the latest pool.
    fetch_turn: usize,
    node: Node,
    store: FileStore,
    events: Events,
    /// The config's rules, shared with `Cluster` (a reload changes them).
    rules: Arc<Mutex<Rules>>,
    seeds: Vec<crate::core::pool::Backend>,
    /// The config's services, seeded with the cluster.
    service_seeds: Vec<crate::core::pool::ServiceSeed>,
    publish: Arc<dyn Publish>,
    transport: Transport,
    /// What this node's Hello says.
    identity: Identity,
    /// The pool last handed to `publish` (for the metrics of what changed).
    published: Pool,
    peers: BTreeMap<NodeId, PeerEntry>,
    queue: VecDeque<Queued>,
    current: Option<Current>,
    epoch: Instant,
    view: Cluster,
    conflicts_seen: u64,
    /// The last reason logged for not catching up.
    waiting: Option<String>,
    /// Another cluster lists this node as a voter while it holds a cluster of its own with more
    /// than its seed: why it serves nothing (SPEC "No stray cluster").
    claimed: Option<String>,
    /// This node abandoned a one-node cluster of its own for the cluster that claims it and
    /// has not learned that cluster's pool yet: it proposes nothing (no catch-up round among
    /// the voters it would guess), it waits to be told.
    rejoining: bool,
    /// The peer whose cluster claimed this node, while rejoining.
    rejoin_from: Option<NodeId>,
    /// The cluster id of the seed this node proposed to form a cluster, until a pool is learned.
    seeding: Option<String>,
    /// Each peer's cluster id and whether it lists this node as a voter, from its Hello.
    peer_clusters: HashMap<NodeId, (String, bool)>,
    /// The address other peers may dial this one at (`cluster.advertise`, else `listen` unless
    /// it is a wildcard): sent in `Progress` while it is not a voter, so that autopilot may
    /// promote it.
    advertise: String,
    /// `[cluster.autopilot]` when enabled.
    autopilot: Option<autopilot::Settings>,
    /// After an autopilot step: the membership epoch it was proposed at, and until when (ms)
    /// no other is proposed at that epoch.
    autopilot_wait: Option<(u64, u64)>,
}

/// An autopilot step that has not changed the membership after this long may be proposed again.
const AUTOPILOT_RETRY_MS: u64 = 10_000;

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
        self.update_status();
        // Seed (or read) at once: a new cluster gets its pool, a restarted peer catches up.
        self.enqueue_catch_up();
        self.next();
        loop {
            let wake = self
                .node
                .next_wakeup()
                .map(|ms| tokio::time::Instant::from_std(self.epoch + Duration::from_millis(ms)));
            let consensus = self.node.consensus();
            tokio::select! {
                _ = shutdown.cancelled() => {
                    if let Some(o) = self.node.cancel() {
                        self.done(o);
                    }
                    return;
                }
                Some(m) = inbox.recv() => self.inbound(m),
                Some(Command::Change(change, reply)) = commands.recv() => {
                    let start_by = Instant::now() + START_WITHIN;
                    self.queue.push_back(Queued {
                        change,
                        reply,
                        start_by,
                        after_catch_up: false,
                    });
                }
                _ = beat.tick() => self.heartbeat(),
                _ = read.tick() => {
                    if self.node.consensus() == Consensus::NotMember && !self.node.is_catching_up() {
                        self.fetch();
                    } else if self.current.is_none()
                        && self.queue.is_empty()
                        && (self.rejoining || self.node.may_lag())
                    {
                        // A lone voter that holds what it learned has nothing to read (and
                        // would write its acceptor's state again for nothing).
                        self.enqueue_catch_up();
                    }
                }
                _ = async { match wake { Some(w) => tokio::time::sleep_until(w).await, None => std::future::pending().await } } => {
                    let now = self.now_ms();
                    self.node.tick(now);
                    self.pump();
                }
            }
            if self.node.consensus() != consensus {
                // Just caught up (or formed a new cluster): carry on at once.
                tracing::info!(
                    consensus = self.node.consensus().as_str(),
                    "consensus state changed"
                );
                if self.current.is_none() && self.queue.is_empty() {
                    self.enqueue_catch_up();
                }
                self.update_status();
            }
            self.next();
        }
    }

    /// Not a voter: ask one voter (in turn) for the latest pool it learned, instead of running
    /// a Paxos round (any number of learners may do this without slowing the voters down).
    fn fetch(&mut self) {
        let voters: Vec<NodeId> = self
            .node
            .voters()
            .into_iter()
            .filter(|v| *v != self.me)
            .collect();
        if voters.is_empty() {
            return;
        }
        self.fetch_turn = (self.fetch_turn + 1) % voters.len();
        let msg = crate::core::paxos::Msg::Fetch;
        self.transport
            .send(&voters[self.fetch_turn], Body::Paxos { msg });
    }

    /// Ask the peer whose cluster claimed this node for its latest pool.
    fn fetch_from_claimer(&mut self) {
        if let Some(from) = &self.rejoin_from {
            let msg = crate::core::paxos::Msg::Fetch;
            self.transport.send(from, Body::Paxos { msg });
        }
    }

    /// Form the cluster while no pool is known and this voter votes, else an identity read
    /// (which, while catching up, is the catch-up round).
    fn enqueue_catch_up(&mut self) {
        if self.rejoining {
            // Nothing to read from until the claiming cluster's pool (its voters) is learned:
            // ask the peer that claimed this node for it.
            self.fetch_from_claimer();
            return;
        }
        if self.node.consensus() == Consensus::NotMember
            && self.node.learned().exists()
            && !self.node.is_catching_up()
        {
            self.fetch();
            return;
        }
        let change = if self.node.learned().exists() || self.node.consensus() != Consensus::Voting {
            PoolChange::Read
        } else {
            let seed = self
                .node
                .seed(self.seeds.clone(), self.service_seeds.clone());
            if let PoolChange::Seed { cluster_id, .. } = &seed {
                // A node forming a one-node cluster alone (no peers configured): until it
                // commits, messages of another cluster are not its to step (a cluster that
                // lists it claims it instead). Voters forming together propose seeds of their
                // own ids and learn the one that wins.
                if self.configured.is_empty() {
                    self.seeding = Some(cluster_id.clone());
                }
            }
            seed
        };
        let start_by = Instant::now() + START_WITHIN;
        self.queue.push_back(Queued {
            change,
            reply: None,
            start_by,
            after_catch_up: false,
        });
    }

    /// Start the next queued change if the node is free.
    fn next(&mut self) {
        while self.current.is_none() {
            let Some(q) = self.queue.pop_front() else {
                return;
            };
            let refuse = if Instant::now() > q.start_by {
                Some(Error::Expired)
            } else if self.rejoining
                || (self.node.consensus() == Consensus::CatchingUp
                    && matches!(q.change, PoolChange::Seed { .. }))
            {
                Some(Error::CatchingUp)
            } else {
                None
            };
            if let Some(e) = refuse {
                if let Some(tx) = q.reply {
                    let _ = tx.send(Err(e));
                }
                continue;
            }
            let is_read = q.change == PoolChange::Read;
            if !is_read && self.node.is_catching_up() {
                if !q.after_catch_up {
                    // A node catching up takes no change until its catch-up round (a read)
                    // committed: run that first, then this change (once; if this node is still
                    // catching up then, the change is refused).
                    let start_by = q.start_by;
                    self.queue.push_front(Queued {
                        after_catch_up: true,
                        ..q
                    });
                    self.queue.push_front(Queued {
                        change: PoolChange::Read,
                        reply: None,
                        start_by,
                        after_catch_up: false,
                    });
                    continue;
                }
                if let Some(tx) = q.reply {
                    let _ = tx.send(Err(Error::CatchingUp));
                }
                continue;
            }
            let now = self.now_ms();
            let rules = Rules {
                now_unix_ms: crate::clock::unix_ms(),
                ..*self.rules.locked()
            };
            // A read nobody waits for is this peer's periodic one: it yields to other rounds.
            let started = if is_read && q.reply.is_none() {
                self.node.propose_background(rules, now)
            } else {
                self.node.propose(q.change, rules, now)
            };
            if started {
                self.current = Some(Current {
                    reply: q.reply,
                    started: Instant::now(),
                    is_read,
                });
                self.pump();
            } else if let Some(tx) = q.reply {
                let _ = tx.send(Err(Error::NoQuorum));
            }
        }
    }

    /// Carry out what the node produced: what may happen now, then its write, then what
    /// waited for the write (only if it landed).
    fn pump(&mut self) {
        let ready = self.node.ready();
        self.carry(ready.now);
        if let Some(write) = ready.write {
            let store = &mut self.store;
            let ok = match tokio::task::block_in_place(|| store.save(&write.state)) {
                Ok(()) => true,
                Err(e) => {
                    tracing::error!(error = %e, "cannot persist Paxos state; not answering");
                    false
                }
            };
            let held = self.node.written(write, ok);
            self.carry(held);
        }
        let c = self.node.conflicts();
        if c > self.conflicts_seen {
            metrics::counter!(names::PAXOS_ROUNDS_TOTAL, "result" => "conflict")
                .increment(c - self.conflicts_seen);
            self.conflicts_seen = c;
        }
    }

    fn carry(&mut self, effects: Effects) {
        if let Some(pool) = effects.learned {
            self.learned(pool);
        }
        for (to, msg) in effects.messages {
            self.transport.send(&to, Body::Paxos { msg });
        }
        for o in effects.outcomes {
            self.done(o);
        }
    }

    fn inbound(&mut self, m: Inbound) {
        match m.body {
            Body::Hello {
                epoch,
                cluster,
                claims,
            } => {
                self.peer_clusters.insert(m.from.clone(), (cluster, claims));
                // Every peer that says Hello follows the pool: learners that dialed in get the
                // pushes, and a row in the peer table.
                self.node.add_listener(m.from.clone());
                let now = self.now_ms();
                let cfg = self.detector_cfg;
                self.peers
                    .entry(m.from.clone())
                    .or_insert_with(|| PeerEntry::new(String::new(), Detector::new(cfg, now)));
                // A peer at an older membership epoch catches up by learning, never by forming
                // a quorum of its own: send it what this node learned.
                let learned = self.node.learned();
                if learned.exists() && epoch < learned.epoch {
                    let msg = crate::core::paxos::Msg::Learn {
                        pool: learned.clone(),
                    };
                    self.transport.send(&m.from, Body::Paxos { msg });
                }
            }
            Body::Claimed { cluster } => self.claimed_by(m.from, cluster),
            // (The transport skips these.)
            Body::Unknown => {}
            Body::Heartbeat => {
                let now = self.now_ms();
                if let Some(p) = self.peers.get_mut(&m.from) {
                    p.detector.heartbeat(now);
                }
            }
            Body::Progress { version, advertise } => {
                if let Some(p) = self.peers.get_mut(&m.from) {
                    p.version = version;
                    p.advertise = advertise;
                }
            }
            Body::Paxos { msg } => {
                if self.foreign(&m.from, &msg) {
                    return;
                }
                let now = self.now_ms();
                self.node.step(&m.from, msg, now);
                self.pump();
            }
        }
    }

    /// Links to the members of a membership: voters are dialed by the lower id of a pair (or
    /// by a learner), learners dial in themselves.
    fn connect_members(&mut self, pool: &Pool) {
        let now = self.now_ms();
        self.transport
            .set_outside(self.role == Role::Learner || !pool.voters.contains(&self.me));
        for id in pool.voters.iter().chain(&pool.learners) {
            if *id == self.me {
                continue;
            }
            let addr = pool
                .addrs
                .get(id)
                .or_else(|| self.configured.get(id))
                .cloned()
                .unwrap_or_default();
            let voter = pool.voters.contains(id);
            let dial = voter && !addr.is_empty() && (self.role == Role::Learner || self.me < *id);
            self.transport.ensure(id, dial.then_some(addr.as_str()));
            let cfg = self.detector_cfg;
            let entry = self
                .peers
                .entry(id.clone())
                .or_insert_with(|| PeerEntry::new(String::new(), Detector::new(cfg, now)));
            if entry.addr.is_empty() {
                entry.addr = addr;
            }
        }
    }

    /// Learners that left (autoscaled away) leave the peer table and their link once silent
    /// for ten times `dead_after`: members and configured peers stay.
    fn forget_gone_learners(&mut self, now: u64, voters: &[NodeId]) {
        let after = self.detector_cfg.dead_after_ms * 10;
        let learned = self.node.learned();
        let gone: Vec<NodeId> = self
            .peers
            .iter()
            .filter(|(id, p)| {
                !voters.contains(id)
                    && !learned.learners.contains(*id)
                    && !self.configured.contains_key(*id)
                    && p.state == PeerState::Dead
                    && now.saturating_sub(p.detector.last_seen().unwrap_or(0)) > after
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            tracing::info!(peer = %id, "learner gone: forgotten");
            self.peers.remove(&id);
            self.node.remove_listener(&id);
            self.transport.forget(&id);
        }
    }

    /// A pool newer than any before: keep it as the routing hint and route from it.
    fn learned(&mut self, pool: Pool) {
        // A node rejoining its cluster now knows that cluster's voters: its catch-up counts
        // among them.
        self.rejoining = false;
        self.seeding = None;
        if pool.epoch != self.published.epoch || !self.published.exists() {
            self.connect_members(&pool);
        }
        let store = &self.store;
        if let Err(e) = tokio::task::block_in_place(|| store.save_learned_hint(&pool)) {
            tracing::warn!(error = %e, "cannot save the learned pool");
        }
        record_pool_metrics(&self.published, &pool);
        let rules = Rules {
            cluster_size: pool.voters.len().max(1),
            ..*self.rules.locked()
        };
        for service in pool.service_names() {
            let (Some(view), rules) = (
                pool.service_view(service),
                pool.service_rules(service, &rules),
            ) else {
                continue;
            };
            metrics::gauge!(names::EJECTION_CAP, "service" => service.to_string())
                .set(view.ejection_cap(&rules) as f64);
        }
        pool_events(&self.events, &self.published, &pool);
        self.identity
            .set(&pool.cluster_id, pool.epoch, &pool.voters);
        self.published = pool.clone();
        if self.claimed.is_none() {
            self.publish.publish(pool);
        }
        self.update_status();
    }

    /// Whether `msg` from `from` belongs to another cluster than this node's (or the one it is
    /// forming): dropped, never stepped. A link made before this node knew its cluster (its
    /// Hello was checked against none) stays up, so every message is checked here too; one of a
    /// cluster that lists this node as a voter is a claim.
    fn foreign(&mut self, from: &NodeId, msg: &crate::core::paxos::Msg) -> bool {
        if matches!(msg, crate::core::paxos::Msg::Fetch) {
            // Asking for this node's pool changes nothing here.
            return false;
        }
        let (mut theirs, mut claims) = self.peer_clusters.get(from).cloned().unwrap_or_default();
        if let crate::core::paxos::Msg::Learn { pool } = msg {
            if !pool.cluster_id.is_empty() {
                theirs = pool.cluster_id.clone();
                claims = pool.voters.contains(&self.me);
            }
        }
        let ours = match &self.seeding {
            Some(id) if !self.node.learned().exists() => id.clone(),
            _ => self.node.learned().cluster_id.clone(),
        };
        if ours.is_empty() || theirs.is_empty() || theirs == ours {
            return false;
        }
        if claims {
            self.claimed_by(from.clone(), theirs);
        }
        true
    }

    /// `from`, a peer of cluster `cluster`, lists this node as one of its voters (SPEC "No
    /// stray cluster"). A one-node cluster this node formed alone that committed nothing but
    /// its seed (a wiped founder restarted with its old config) is abandoned: the node starts
    /// over with no state and catches up into the cluster that claims it. Anything more it
    /// will not throw away: it stops routing and says why until an operator decides.
    fn claimed_by(&mut self, from: NodeId, cluster: String) {
        let learned = self.node.learned().clone();
        if cluster.is_empty()
            || cluster == learned.cluster_id
            || self.claimed.is_some()
            || !learned.exists()
        {
            // Its own cluster, nothing to abandon (a claim that came after the first), or
            // refused already.
            return;
        }
        let alone = learned.voters.iter().all(|v| *v == self.me);
        if alone && learned.version <= 1 {
            tracing::warn!(
                abandoned = %learned.cluster_id,
                claimed_by = %cluster,
                peer = %from,
                "this peer formed a one-node cluster of its own with nothing but its seed, while cluster {cluster} lists it as a voter: abandoning it to catch up into {cluster}"
            );
            if let Err(e) = tokio::task::block_in_place(|| self.store.clear()) {
                tracing::error!(error = %e, "cannot forget the abandoned cluster's state");
                self.refuse_claimed(&from, &cluster, &learned);
                return;
            }
            // Catching up (not a one-voter cluster of its own again) until it learns the
            // claiming cluster's pool, and proposing nothing before (`rejoining`).
            let mut voters = vec![self.me.clone(), from.clone()];
            voters.sort();
            self.rejoining = true;
            let seed = crate::clock::unix_nanos().max(1);
            self.node = Node::new(
                self.me.clone(),
                voters,
                PROPOSER,
                None,
                Pool::default(),
                seed,
            );
            self.identity.set("", 0, &std::collections::BTreeSet::new());
            self.published = Pool::default();
            self.publish.withdraw();
            self.current = None;
            for q in self.queue.drain(..) {
                if let Some(tx) = q.reply {
                    let _ = tx.send(Err(Error::CatchingUp));
                }
            }
            self.seeding = None;
            self.rejoin_from = Some(from.clone());
            // Every link starts over, so that each side's Hello says what it is now (the
            // claiming cluster's peers then push their pool to this node).
            for p in self.transport.known() {
                self.transport.forget(&p);
            }
            self.peer_clusters.clear();
            self.transport.ensure(&from, None);
            self.fetch_from_claimer();
            self.update_status();
            return;
        }
        self.refuse_claimed(&from, &cluster, &learned);
    }

    fn refuse_claimed(&mut self, from: &NodeId, cluster: &str, learned: &Pool) {
        let why = format!(
            "cluster {cluster} (through peer {from}) lists this peer as a voter, but this peer holds cluster {} at version {}: it serves nothing until an operator decides (wipe this peer's data_dir to join {cluster}, or remove it from {cluster}'s voters)",
            learned.cluster_id, learned.version
        );
        tracing::error!(reason = %why, "claimed by another cluster");
        self.claimed = Some(why);
        self.publish.withdraw();
        self.update_status();
    }

    fn update_status(&mut self) {
        let members = self.node.voters();
        let learned = self.node.learned();
        let status = ConsensusStatus {
            epoch: learned.epoch,
            learners: learned.learners.iter().cloned().collect(),
            addrs: learned
                .voters
                .iter()
                .chain(&learned.learners)
                .map(|id| {
                    let addr = learned
                        .addrs
                        .get(id)
                        .or_else(|| self.configured.get(id))
                        .cloned();
                    (id.clone(), addr)
                })
                .collect(),
            cluster_id: self.node.learned().cluster_id.clone(),
            role: if members.contains(&self.me) {
                "voter"
            } else {
                "learner"
            },
            consensus: self.node.consensus().as_str(),
            members,
            waiting: self.claimed.clone().or_else(|| self.node.refusal()),
        };
        *self.view.status.locked() = status;
    }

    fn done(&mut self, outcome: Outcome) {
        let cur = self.current.take();
        let (result, committed) = match &outcome {
            Outcome::Committed(p) | Outcome::AlreadyCommitted(p) => (Ok(p.clone()), true),
            Outcome::Rejected(e, _) => (Err(Error::Rejected(e.clone())), true),
            Outcome::NotApplied => (Err(Error::NoQuorum), false),
            Outcome::Unknown => (Err(Error::Unknown), false),
        };
        let label = if committed { "committed" } else { "timeout" };
        metrics::counter!(names::PAXOS_ROUNDS_TOTAL, "result" => label).increment(1);
        if let (true, Some(c)) = (committed, &cur) {
            if !c.is_read {
                metrics::histogram!(names::PAXOS_COMMIT_DURATION_SECONDS)
                    .record(c.started.elapsed().as_secs_f64());
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
        let version = self.node.learned().version;
        // Only a peer outside the voters may be promoted: only it says where and how far it is.
        let promotable = !self.advertise.is_empty() && !self.node.voters().contains(&self.me);
        for id in self.peers.keys() {
            self.transport.send(id, Body::Heartbeat);
            if promotable {
                let advertise = self.advertise.clone();
                self.transport
                    .send(id, Body::Progress { version, advertise });
            }
        }
        let now = self.now_ms();
        let mut views = Vec::with_capacity(self.peers.len());
        let voters = self.node.voters();
        self.forget_gone_learners(now, &voters);
        // This peer counts if it votes.
        let mut alive = usize::from(self.node.consensus() == Consensus::Voting);
        let mut dead = Vec::new();
        let dead_after_ms = self.detector_cfg.dead_after_ms;
        let mut came_back = false;
        for (id, p) in self.peers.iter_mut() {
            let (view, state, back) = p.observe(id, now, &voters, version, &self.events);
            came_back |= back;
            if state == PeerState::Alive && voters.contains(id) {
                alive += 1;
            }
            // Gone for the health votes and probers' assignments: declared dead, or silent for
            // `dead_after` already (phi takes a moment to rise: a dead prober is replaced
            // within `dead_after` and one probe interval of its last heartbeat).
            if state == PeerState::Dead || p.detector.silent_for(now) >= dead_after_ms {
                dead.push(id.clone());
            }
            views.push(view);
        }
        *self.view.peers.locked() = views;
        self.view.dead.send_if_modified(|d| {
            let changed = *d != dead;
            if changed {
                *d = dead;
            }
            changed
        });
        self.view
            .quorum
            .store(alive >= self.node.majority(), Ordering::Relaxed);
        let waiting = self.claimed.clone().or_else(|| self.node.refusal());
        if waiting.is_some() && waiting != self.waiting {
            tracing::warn!(reason = waiting.as_deref().unwrap_or(""), "not voting yet");
        }
        self.waiting = waiting;
        self.update_status();
        // A peer came back (a healed partition, a restart): catch up now, not at the next
        // periodic read.
        if came_back && self.current.is_none() && self.queue.is_empty() {
            self.enqueue_catch_up();
        }
        self.autopilot(now);
    }

    /// `[cluster.autopilot]`: propose the core's next membership step, one at a time (the next
    /// once the last one changed the membership, or after `AUTOPILOT_RETRY`).
    fn autopilot(&mut self, now: u64) {
        let Some(settings) = self.autopilot else {
            return;
        };
        let learned = self.node.learned();
        if self.node.consensus() != Consensus::Voting
            || self
                .autopilot_wait
                .is_some_and(|(epoch, until)| epoch == learned.epoch && now < until)
        {
            return;
        }
        let voters: std::collections::BTreeSet<NodeId> = self.node.voters().into_iter().collect();
        let mut view = autopilot::View {
            me: self.me.clone(),
            alive: [self.me.clone()].into_iter().collect(),
            now,
            ..Default::default()
        };
        for (id, p) in &self.peers {
            if p.state == PeerState::Alive {
                view.alive.insert(id.clone());
            }
            if let (Some(since), true) = (p.dead_since, voters.contains(id)) {
                view.dead_since.insert(id.clone(), since);
            }
            if let Some(since) = p.ready_since {
                view.learners.push(autopilot::Ready {
                    id: id.clone(),
                    addr: p.advertise.clone(),
                    since,
                });
            }
        }
        view.voters = voters;
        let Some(step) = autopilot::decide(&view, &settings) else {
            return;
        };
        tracing::warn!(step = ?step, "autopilot");
        self.autopilot_wait = Some((learned.epoch, now + AUTOPILOT_RETRY_MS));
        self.queue.push_back(Queued {
            change: step.into_change(),
            reply: None,
            start_by: Instant::now() + START_WITHIN,
            after_catch_up: false,
        });
    }
}

/// The agreed pool's metrics, as this peer learns a new version: version, fingerprint, each
/// backend's state, and an ejection for every backend that became `ejected`.
/// `pool_changed`, `ejected`, `restored` and `membership_changed` events for a newly learned pool.
fn pool_events(events: &Events, old: &Pool, new: &Pool) {
    if !old.exists() {
        events.emit(
            "pool_changed",
            format!(
                "routing from pool version {} ({} backends)",
                new.version,
                new.backends.len()
            ),
            json!({ "version": new.version, "change": "learned", "through": null }),
        );
        return;
    }
    if new.version == old.version {
        return;
    }
    let d = PoolDiff::between(old, new);
    let through = d.through.as_ref().map(|p| p.to_string());
    let change = if d.changes.is_empty() {
        "no visible change".to_string()
    } else {
        d.changes.join("; ")
    };
    events.emit(
        "pool_changed",
        format!(
            "pool version {}: {change}{}",
            new.version,
            through
                .as_deref()
                .map(|p| format!(" (through {p})"))
                .unwrap_or_default()
        ),
        json!({ "version": new.version, "change": change, "through": through }),
    );
    for (service, id, voters) in &d.ejected {
        let voters: Vec<&str> = voters.iter().map(|v| v.as_str()).collect();
        events.emit(
            "ejected",
            format!(
                "{}{id} ejected by the cluster at version {} (down for {})",
                crate::core::pool::service_prefix(service),
                new.version,
                voters.join(", ")
            ),
            json!({ "backend": id.as_str(), "service": service, "version": new.version, "voters": voters }),
        );
    }
    for (service, id) in &d.restored {
        let voters: Vec<String> = new
            .service_view(service)
            .and_then(|p| p.backends.get(id).cloned())
            .map(|b| b.down_votes.iter().map(|v| v.to_string()).collect())
            .unwrap_or_default();
        events.emit(
            "restored",
            format!(
                "{}{id} restored by the cluster at version {}",
                crate::core::pool::service_prefix(service),
                new.version
            ),
            json!({ "backend": id.as_str(), "service": service, "version": new.version, "voters": voters }),
        );
    }
    if let Some(v) = &d.voters {
        let names: Vec<&str> = v.iter().map(|n| n.as_str()).collect();
        let by = new.membership_note.as_deref();
        let note = by.map(|n| format!(" ({n})")).unwrap_or_default();
        events.emit(
            "membership_changed",
            format!(
                "voters now {} (epoch {}){note}",
                names.join(", "),
                new.epoch
            ),
            json!({
                "voters": names,
                "epoch": new.epoch,
                "version": new.version,
                "by": if by.is_some() { "autopilot" } else { "operator" },
                "why": by,
            }),
        );
    }
}

fn record_pool_metrics(old: &Pool, new: &Pool) {
    metrics::gauge!(names::POOL_VERSION).set(new.version as f64);
    metrics::gauge!(names::POOL_FINGERPRINT).set(new.fingerprint() as f64);
    let names: std::collections::BTreeSet<&str> =
        old.service_names().chain(new.service_names()).collect();
    for service in names {
        let (was, now) = (old.services.get(service), new.services.get(service));
        if was.is_some() && was == now {
            // Unchanged (an `Arc` compare: a pointer, most often): nothing to record.
            continue;
        }
        let none = Default::default();
        let (before, after) = (
            old.backends_of(service).unwrap_or(&none),
            new.backends_of(service).unwrap_or(&none),
        );
        record_service_metrics(service, before, after, new.version);
    }
}

/// One service's backend states and ejections.
fn record_service_metrics(
    service: &str,
    old: &std::collections::BTreeMap<crate::core::pool::BackendId, crate::core::pool::Backend>,
    new: &std::collections::BTreeMap<crate::core::pool::BackendId, crate::core::pool::Backend>,
    version: u64,
) {
    let svc = service.to_string();
    for b in new.values() {
        let id = b.id.to_string();
        let was = old.get(&b.id).map(|o| o.state);
        let ejections = metrics::counter!(names::EJECTIONS_TOTAL, "backend" => id.clone(), "service" => svc.clone());
        if was.is_none() {
            ejections.increment(0);
        }
        for s in BackendState::ALL {
            metrics::gauge!(names::BACKEND_STATE, "backend" => id.clone(), "state" => s.as_str(), "service" => svc.clone())
                .set(if b.state == s { 1.0 } else { 0.0 });
        }
        if b.state == BackendState::Ejected && was != Some(BackendState::Ejected) {
            ejections.increment(1);
            tracing::warn!(service, backend = %b.id, version, "backend ejected by the cluster");
        }
    }
    for b in old.values() {
        if !new.contains_key(&b.id) {
            for s in BackendState::ALL {
                metrics::gauge!(names::BACKEND_STATE, "backend" => b.id.to_string(), "state" => s.as_str(), "service" => svc.clone())
                    .set(0.0);
            }
        }
    }
}
