//! The discovery loop of each `[[discovery]]` source: resolve every `interval`, keep this peer's
//! latest answer for `/status`, and propose this peer's vote (`core::discovery::Tracker`) when
//! the agreed pool does not show it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::cluster::Cluster;
use crate::config::{DiscoveryConfig, DiscoveryKind};
use crate::core::discovery::Tracker;
use crate::core::pool::{NodeId, PoolChange};
use crate::dns::{Lookup, Resolver};
use crate::ops::telemetry as names;
use crate::proxy::table::RoutingTable;
use crate::sync::MutexExt;

/// Each source's latest answer at this peer, for `/status`.
pub type Answers = Arc<Mutex<BTreeMap<String, Value>>>;

/// A lost proposal is made again after this long.
const REVOTE_AFTER: Duration = Duration::from_secs(2);

pub fn spawn(
    sources: &[DiscoveryConfig],
    table: Arc<RoutingTable>,
    cluster: Cluster,
    me: NodeId,
    answers: Answers,
    shutdown: CancellationToken,
) {
    let epoch = Instant::now();
    for src in sources.iter().cloned() {
        let (table, cluster, me, answers, shutdown) = (
            table.clone(),
            cluster.clone(),
            me.clone(),
            answers.clone(),
            shutdown.clone(),
        );
        for result in ["ok", "empty", "failed"] {
            metrics::counter!(names::DISCOVERY_RESOLUTIONS_TOTAL, "source" => src.name.clone(), "result" => result)
                .increment(0);
        }
        tokio::spawn(async move {
            let lookup = match src.kind {
                DiscoveryKind::A => Lookup::Addresses {
                    name: src.name.clone(),
                    port: src.port.unwrap_or(80),
                },
                DiscoveryKind::Srv => Lookup::Srv {
                    name: src.name.clone(),
                },
            };
            let timeout = src.interval.min(Duration::from_secs(2));
            let resolver = Resolver::new(src.resolver, timeout);
            let mut tracker = Tracker::new(
                &src.name,
                src.weight,
                src.remove_after.as_millis() as u64,
                REVOTE_AFTER.as_millis() as u64,
            )
            .with_protocol(src.protocol());
            let mut tick = tokio::time::interval(src.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let answer = match &resolver {
                    Ok(r) => r.resolve(&lookup).await,
                    Err(e) => Err(e.clone()),
                };
                let now = epoch.elapsed().as_millis() as u64;
                let result = match &answer {
                    Ok(a) if a.is_empty() => "empty",
                    Ok(_) => "ok",
                    Err(_) => "failed",
                };
                metrics::counter!(names::DISCOVERY_RESOLUTIONS_TOTAL, "source" => src.name.clone(), "result" => result)
                    .increment(1);
                tracker.answer(now, answer.as_deref().ok());
                let at = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
                let shown = match &answer {
                    Ok(a) => json!({ "at": at, "addrs": a, "vote": tracker.vote(now) }),
                    Err(e) => {
                        tracing::warn!(source = %src.name, error = %e, "discovery: cannot resolve; keeping this peer's last vote");
                        json!({ "at": at, "error": e })
                    }
                };
                answers.locked().insert(src.name.clone(), shown);
                if let Some(change) = tracker.reconcile(&table.pool(), &me, now) {
                    tracing::debug!(source = %src.name, ?change, "discovery vote");
                    cluster.submit(PoolChange::in_service(table.service(), change));
                }
            }
        });
    }
}
