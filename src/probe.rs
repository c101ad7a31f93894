//! Active health probes, and turning this peer's local view into health votes.
//!
//! Every peer probes every backend (GET `health.path`, 2xx within `health.timeout` passes) at
//! `health.interval` with ±10% jitter. Probe and traffic outcomes feed the same local view; a
//! flip changes this peer's routing at once and, through a vote, the agreed pool: the pool marks
//! a backend `ejected` only when a majority of peers vote it down. The voter reconciles the
//! local view with the agreed votes periodically, so a lost proposal or a restart heals itself,
//! and expires the votes of peers the detector declares dead.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::cluster::Cluster;
use crate::core::health::Source;
use crate::core::pool::{BackendId, NodeId, PoolChange};
use crate::proxy::router::Router;
use crate::proxy::upstream::Upstream;
use crate::telemetry as names;

/// How often the prober looks for added or removed backends, and the voter reconciles.
const RECONCILE: Duration = Duration::from_millis(500);
/// A vote not yet reflected in the pool is proposed again after this long.
const REVOTE_AFTER: Duration = Duration::from_secs(2);

/// Start probing and voting until `shutdown`.
pub fn spawn(router: Arc<Router>, cluster: Cluster, me: NodeId, shutdown: CancellationToken) {
    let flips = router.subscribe_flips();
    tokio::spawn(probe_supervisor(router.clone(), shutdown.clone()));
    tokio::spawn(voter(router, cluster, me, flips, shutdown));
}

/// One probe task per backend of the current pool.
async fn probe_supervisor(router: Arc<Router>, shutdown: CancellationToken) {
    let mut tasks: HashMap<BackendId, (Arc<Upstream>, JoinHandle<()>)> = HashMap::new();
    let mut tick = tokio::time::interval(RECONCILE);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let current = router.all_upstreams();
        tasks.retain(|id, (u, handle)| {
            let keep = current.iter().any(|c| &c.id == id && Arc::ptr_eq(c, u));
            if !keep {
                handle.abort();
            }
            keep
        });
        for u in current {
            if !tasks.contains_key(&u.id) {
                let handle = tokio::spawn(probe_loop(router.clone(), u.clone()));
                tasks.insert(u.id.clone(), (u, handle));
            }
        }
    }
    for (_, (_, h)) in tasks {
        h.abort();
    }
}

async fn probe_loop(router: Arc<Router>, upstream: Arc<Upstream>) {
    let pass = metrics::counter!(names::HEALTH_CHECKS_TOTAL, "backend" => upstream.id.to_string(), "result" => "pass");
    let fail = metrics::counter!(names::HEALTH_CHECKS_TOTAL, "backend" => upstream.id.to_string(), "result" => "fail");
    // Spread probes of different backends (and peers) over the interval.
    let first = router.snapshot().settings.trial_every;
    let offset = rand::thread_rng().gen_range(0..=first.as_millis() as u64);
    tokio::time::sleep(Duration::from_millis(offset)).await;
    loop {
        let settings = router.snapshot().settings.clone();
        let started = Instant::now();
        let ok = upstream
            .probe(&settings.probe_path, settings.probe_timeout)
            .await;
        if ok { &pass } else { &fail }.increment(1);
        if upstream
            .record(Source::Probe, ok, &settings.thresholds)
            .is_some()
        {
            router.health_changed(&upstream.id);
        }
        let interval = settings.trial_every.as_millis() as f64;
        let jittered = interval * rand::thread_rng().gen_range(0.9..=1.1);
        let next = Duration::from_millis(jittered as u64).saturating_sub(started.elapsed());
        tokio::time::sleep(next).await;
    }
}

/// Keep this peer's votes in the agreed pool equal to its local view.
async fn voter(
    router: Arc<Router>,
    cluster: Cluster,
    me: NodeId,
    mut flips: tokio::sync::mpsc::UnboundedReceiver<BackendId>,
    shutdown: CancellationToken,
) {
    let mut pending: HashMap<String, (bool, Instant)> = HashMap::new();
    let mut tick = tokio::time::interval(RECONCILE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
            Some(_) = flips.recv() => {}
        }
        let pool = router.pool();
        if !pool.exists() {
            continue;
        }
        for b in pool.backends.values() {
            let up = router.upstream(&b.id).is_none_or(|u| u.is_up());
            let voted_down = b.down_votes.contains(&me);
            if up != voted_down {
                pending.remove(b.id.as_str());
                continue;
            }
            // The pool disagrees with our view: (re)propose, unless just done.
            let key = b.id.to_string();
            if pending
                .get(&key)
                .is_some_and(|(want_up, at)| *want_up == up && at.elapsed() < REVOTE_AFTER)
            {
                continue;
            }
            pending.insert(key, (up, Instant::now()));
            let change = if up {
                PoolChange::VoteUp {
                    id: b.id.clone(),
                    peer: me.clone(),
                }
            } else {
                PoolChange::VoteDown {
                    id: b.id.clone(),
                    peer: me.clone(),
                }
            };
            tracing::debug!(backend = %b.id, up, "health vote");
            cluster.submit(change);
        }
        for peer in cluster.dead_peers() {
            if pool.backends.values().any(|b| b.down_votes.contains(&peer)) {
                let key = format!("expire:{peer}");
                if pending
                    .get(&key)
                    .is_some_and(|(_, at)| at.elapsed() < REVOTE_AFTER)
                {
                    continue;
                }
                pending.insert(key, (true, Instant::now()));
                tracing::info!(%peer, "expiring the health votes of a dead peer");
                cluster.submit(PoolChange::ExpireVotes { peer });
            }
        }
    }
}
