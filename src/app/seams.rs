//! Where the shells meet: each consumer's seam implemented by the shell that serves it. Nothing
//! else in the crate imports two shells.

use std::sync::Arc;

use crate::app::health::Probing;
use crate::app::probe::{ProbeSettings, Probed};
use crate::app::services::Services;
use crate::cluster::{self, Cluster};
use crate::core::detector::PeerView;
use crate::core::health::Source;
use crate::core::pool::{BackendId, Pool, PoolChange, ServiceDef};
use crate::net::Target;
use crate::ops::admin::{BoxFuture, ConsensusView, ControlError, PoolControl, RoutingView};

/// The cluster's learned pools become every service's routing table.
impl cluster::Publish for Services {
    fn publish(&self, pool: Pool) {
        Services::publish(self, pool);
    }

    fn withdraw(&self) {
        Services::withdraw(self);
    }
}

/// The admin API's changes go through the cluster.
impl PoolControl for Cluster {
    fn change(&self, change: PoolChange) -> BoxFuture<'_, Result<Pool, ControlError>> {
        Box::pin(async move {
            Cluster::change(self, change).await.map_err(|e| match e {
                cluster::Error::Rejected(e) => ControlError::Rejected(e),
                other => ControlError::Unavailable(Box::new(other)),
            })
        })
    }

    fn peers(&self) -> Vec<PeerView> {
        Cluster::peers(self)
    }

    fn gone(&self) -> Vec<crate::core::pool::NodeId> {
        Cluster::dead_peers(self)
    }

    fn quorum(&self) -> bool {
        Cluster::quorum(self)
    }

    fn consensus(&self) -> ConsensusView {
        let s = self.status();
        ConsensusView {
            cluster_id: s.cluster_id,
            role: s.role,
            consensus: s.consensus,
            members: s.members.iter().map(|m| m.to_string()).collect(),
            waiting: s.waiting,
            epoch: s.epoch,
            learners: s.learners.iter().map(|m| m.to_string()).collect(),
            addrs: s
                .addrs
                .iter()
                .map(|(id, a)| (id.to_string(), a.clone()))
                .collect(),
        }
    }
}

/// The admin API reads the pool and the local view from the services' routing tables.
impl RoutingView for Services {
    fn pool(&self) -> Arc<Pool> {
        self.default_table().pool()
    }

    fn local_up(&self, service: &str, id: &BackendId) -> bool {
        self.table(service)
            .and_then(|t| t.upstream(id))
            .is_none_or(|u| u.is_up())
    }

    fn traffic(&self, service: &str, id: &BackendId) -> (u64, u64) {
        self.table(service)
            .and_then(|t| t.upstream(id))
            .map(|u| (u.served(), u.inflight()))
            .unwrap_or_default()
    }

    fn probers(&self, service: &str) -> usize {
        self.table(service).map_or(0, |t| t.settings().probers)
    }

    fn effective(&self, def: &ServiceDef) -> Result<serde_json::Value, String> {
        let (balance, health) = self.config().effective(def)?;
        Ok(serde_json::json!({
            "balance": balance.shown(),
            "health": health.shown(),
        }))
    }
}

/// Probes dial the routing table's upstreams and feed their local view, where this peer is
/// assigned to probe.
impl Probed for Probing {
    fn targets(&self) -> Vec<(BackendId, String, Target)> {
        self.table
            .registry()
            .of_pool(&self.table.pool())
            .into_iter()
            .map(|u| (u.id.clone(), u.addr.clone(), u.target().clone()))
            .collect()
    }

    fn settings(&self) -> ProbeSettings {
        let s = &self.table.snapshot().settings;
        ProbeSettings {
            path: s.probe_path.clone(),
            timeout: s.probe_timeout,
            interval: s.trial_every,
        }
    }

    fn service(&self) -> &str {
        self.table.service()
    }

    fn peer(&self) -> &str {
        self.assignment.me.as_str()
    }

    fn assigned(&self, id: &BackendId) -> bool {
        self.assignment.probes(&self.table, id)
    }

    fn unassigned(&self, id: &BackendId) {
        if let Some(u) = self.table.upstream(id) {
            if u.forget_probes().is_some() {
                self.table.health_changed(id);
            }
        }
    }

    fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.table.installs()
    }

    fn exchange<'a>(
        &'a self,
        target: &'a Target,
        path: &'a str,
        peer: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send + 'a>> {
        Box::pin(crate::proxy::upstream::h1::probe(target, path, peer))
    }

    fn record(&self, id: &BackendId, ok: bool) {
        let Some(upstream) = self.table.upstream(id) else {
            return;
        };
        let thresholds = self.table.snapshot().settings.thresholds;
        if upstream.record(Source::Probe, ok, &thresholds).is_some() {
            self.table.health_changed(id);
        }
    }
}
