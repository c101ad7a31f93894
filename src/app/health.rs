//! The health voter's loop: on every local flip and every `RECONCILE` (while a vote waits or a
//! peer is dead; else on a new pool or a change of the dead peers), the core's `Voter` compares
//! the agreed pool with this peer's local view, and its changes go to the cluster.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::cluster::Cluster;
use crate::core::health::Source;
use crate::core::health::{is_prober, Voter};
use crate::core::pool::BackendId;
use crate::core::pool::{NodeId, PoolChange};
use crate::ops::events::Events;
use crate::proxy::table::RoutingTable;

/// How often the voter reconciles without a flip.
const RECONCILE: Duration = Duration::from_millis(500);
/// A vote not yet reflected in the pool is proposed again after this long.
const REVOTE_AFTER: Duration = Duration::from_secs(2);

/// Who probes which backend (`health.probers`), as this peer sees the cluster now: the agreed
/// voters, less those its detector declares dead, ranked per backend (`core::health::probers`).
#[derive(Clone)]
pub struct Assignment {
    pub cluster: Cluster,
    pub me: NodeId,
}

impl Assignment {
    /// Whether this peer probes (and votes on) backend `id` of `table`'s service.
    pub fn probes(&self, table: &RoutingTable, id: &BackendId) -> bool {
        let k = table.settings().probers;
        k == 0
            || is_prober(
                id,
                &table.pool().voters,
                &self.cluster.dead_peers(),
                k,
                &self.me,
            )
    }
}

/// Probes through a table, by this peer's assignment.
pub struct Probing {
    pub table: Arc<RoutingTable>,
    pub assignment: Assignment,
}

/// Slow start: rebuild `table`'s round robin at each step of a backend's ramp (no wakeups
/// while none ramps).
pub fn spawn_ramp(table: Arc<RoutingTable>, shutdown: CancellationToken) {
    let mut installs = table.installs();
    tokio::spawn(async move {
        loop {
            let step = table
                .next_ramp_step()
                .map(|at| Duration::from_millis(at.saturating_sub(crate::clock::unix_ms())));
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = installs.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(step.unwrap_or_default()), if step.is_some() => table.ramp(),
            }
        }
    });
}

pub fn spawn_voter(
    table: Arc<RoutingTable>,
    cluster: Cluster,
    events: Events,
    assignment: Assignment,
    shutdown: CancellationToken,
) {
    let mut flips = table.subscribe_flips();
    let mut voter = Voter::new(assignment.me.clone(), REVOTE_AFTER.as_millis() as u64);
    let epoch = Instant::now();
    let mut installs = table.installs();
    let mut deaths = cluster.dead_changes();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(RECONCILE);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        // Quiet: the last reconcile left no vote waiting and no peer was dead, so until the pool
        // (or the settings), a local flip or the dead peers change it would make nothing again.
        // A quiet voter waits for those instead of ticking (a thousand services' voters are
        // mostly quiet). Its receivers are marked seen before it reads what they tell.
        let mut quiet = false;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick(), if !quiet => {}
                r = installs.changed(), if quiet => if r.is_err() { return },
                r = deaths.changed(), if quiet => if r.is_err() { return },
                Some(id) = flips.recv() => backend_local(&table, &events, &id),
            }
            installs.borrow_and_update();
            let dead = deaths.borrow_and_update().clone();
            let pool = table.pool();
            // A peer not assigned to probe a backend casts no vote on it (`health.probers`).
            let k = table.settings().probers;
            let local_up = |id: &_| {
                !is_prober(id, &pool.voters, &dead, k, &assignment.me)
                    || table.upstream(id).is_none_or(|u| u.is_up())
            };
            let now = epoch.elapsed().as_millis() as u64;
            for change in voter.reconcile(&pool, local_up, &dead, now) {
                match &change {
                    PoolChange::ExpireVotes { peer } => {
                        tracing::info!(%peer, "expiring the health votes of a dead peer")
                    }
                    other => tracing::debug!(change = ?other, "health vote"),
                }
                cluster.submit(PoolChange::in_service(table.service(), change));
            }
            quiet = voter.idle() && dead.is_empty();
        }
    });
}

/// A `backend_local` event for a flip of this peer's own view of `id`.
fn backend_local(table: &RoutingTable, events: &Events, id: &BackendId) {
    let Some(u) = table.upstream(id) else {
        return;
    };
    let (state, why) = match (u.is_up(), u.down_by()) {
        (true, _) => ("up", "it answers again"),
        (false, Some(Source::Traffic)) => ("down", "live requests failed in a row"),
        (false, _) => ("down", "health probes failed in a row"),
    };
    let service = table.service();
    let named = crate::core::pool::service_prefix(service);
    events.emit(
        "backend_local",
        format!("{named}{id} {state} in this peer's view: {why}"),
        serde_json::json!({ "backend": id.as_str(), "service": service, "state": state, "why": why }),
    );
}
