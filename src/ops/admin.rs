//! The admin API (JSON over HTTP on `admin.listen`) and `/metrics`.
//!
//! Reads come from this peer's routing state; changes go through a `PoolControl`, which in a
//! cluster runs a Paxos round and answers only once a majority committed.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;

use crate::core::detector::PeerView;
use crate::core::pool::{
    Backend, BackendId, ChangeError, NodeId, Overrides, Pool, PoolChange, Protocol, ServiceDef,
    DEFAULT_SERVICE,
};

/// Why a pool change did not commit, as the admin API needs to know it.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The change's precondition failed; nothing changed.
    #[error(transparent)]
    Rejected(#[from] ChangeError),
    /// The cluster could not decide now (no quorum, busy, outcome unknown); the message says
    /// which, and whether the change may still have committed.
    #[error(transparent)]
    Unavailable(Box<dyn std::error::Error + Send + Sync>),
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the admin API needs from the cluster (the consumer owns the seam; `app` implements it).
pub trait PoolControl: Send + Sync + 'static {
    /// Commit `change` (by a majority, in a cluster) and return the pool it produced.
    fn change(&self, change: PoolChange) -> BoxFuture<'_, Result<Pool, ControlError>>;
    /// The other peers as this peer sees them.
    fn peers(&self) -> Vec<PeerView>;
    /// The peers this peer counts as gone (their votes expire, others take their probes).
    fn gone(&self) -> Vec<NodeId>;
    /// Whether a majority of peers answers now.
    fn quorum(&self) -> bool;
    /// This peer's place in the consensus.
    fn consensus(&self) -> ConsensusView;
}

/// `/status`'s consensus fields.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ConsensusView {
    pub cluster_id: String,
    /// "voter" or "learner".
    pub role: &'static str,
    /// "voting", "catching_up" or "learner".
    pub consensus: &'static str,
    /// The agreed voters.
    pub members: Vec<String>,
    /// Why a voter that started without state cannot vote yet, when it has waited a while.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
    /// The membership epoch and the recorded learners.
    pub epoch: u64,
    pub learners: Vec<String>,
    /// Members' cluster addresses, where known.
    pub addrs: std::collections::BTreeMap<String, Option<String>>,
}

/// What the admin API reads from the data plane.
pub trait RoutingView: Send + Sync + 'static {
    /// The pool this peer routes from.
    fn pool(&self) -> Arc<Pool>;
    /// This peer's own view of a backend of a service: up (or not probed yet) or down.
    fn local_up(&self, service: &str, id: &BackendId) -> bool;
    /// Responses this peer got from a backend so far, and its requests in flight now.
    fn traffic(&self, service: &str, id: &BackendId) -> (u64, u64);
    /// `health.probers` of a service on this peer (0: every peer probes).
    fn probers(&self, service: &str) -> usize;
    /// A service definition's effective `balance` and `health` on this peer (its keys over
    /// this peer's top-level ones), or why they are not valid (naming each key).
    fn effective(&self, def: &ServiceDef) -> Result<serde_json::Value, String>;
}

/// Shared state of the admin server.
pub struct Admin {
    pub node: NodeId,
    pub token: Option<String>,
    pub routing: Arc<dyn RoutingView>,
    pub control: Arc<dyn PoolControl>,
    pub metrics: PrometheusHandle,
    /// This peer's recent events (`/events`).
    pub events: crate::ops::events::Events,
    /// Sets the gauges that are read rather than pushed (quorum, members, in-flight), before
    /// each scrape.
    pub collect: Box<dyn Fn() + Send + Sync>,
    /// This peer's latest answer of each discovery source (`/status`).
    pub discovery: Box<dyn Fn() -> serde_json::Value + Send + Sync>,
    /// When the peer started (`/status` reports `uptime_ms`, the clock rates are computed by).
    pub started: std::time::Instant,
    /// Set once every listener is bound.
    pub listening: AtomicBool,
    /// Set when the peer starts draining: `/readyz` fails from then on.
    pub shutting_down: AtomicBool,
}

/// Admin responses: whole bodies, or a stream (`/events?follow=1`).
pub type AdminBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;
type Resp = Response<AdminBody>;

fn whole(b: impl Into<Bytes>) -> AdminBody {
    Full::new(b.into()).boxed()
}

/// The status page: plain HTML, CSS and a little JavaScript, served from the binary.
const STATUS_PAGE: &str = include_str!("status_page.html");

const MAX_BODY: usize = 64 * 1024;
/// Admin requests in progress at once; more are answered 503 at once (a scraper gone wild, or a
/// script in a loop, cannot queue work behind the operator's).
pub const ADMIN_CONCURRENCY: usize = 64;
/// The longest an admin request may take to its answer's head (a change waits for its commit,
/// whose own deadline is shorter; an event stream's body is not bounded by it).
pub const ADMIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// An admin request, its body limited to `MAX_BODY`.
type AdminRequest = Request<Limited<Incoming>>;

fn json_response(status: StatusCode, v: &impl Serialize) -> Resp {
    let body = serde_json::to_vec_pretty(v).unwrap_or_default();
    let mut r = Response::new(whole(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// Every way an admin request fails, and the one place each becomes an answer.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("missing or wrong bearer token")]
    Unauthorized,
    #[error("no such endpoint: {0}")]
    NoEndpoint(String),
    #[error("{method} is not allowed on {path}")]
    MethodNotAllowed { method: Method, path: String },
    #[error("not ready: listeners not bound, no pool known yet, or shutting down")]
    NotReady,
    #[error("the admin API is busy ({ADMIN_CONCURRENCY} requests in progress); retry")]
    Busy,
    #[error("the request took longer than {} s", ADMIN_TIMEOUT.as_secs())]
    TimedOut,
    #[error(transparent)]
    Control(#[from] ControlError),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::NoEndpoint(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::NotReady | ApiError::Busy => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::TimedOut => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Control(ControlError::Unavailable(_)) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Control(ControlError::Rejected(e)) => match e {
                ChangeError::NotFound(_)
                | ChangeError::PeerNotFound(_)
                | ChangeError::ServiceNotFound(_) => StatusCode::NOT_FOUND,
                ChangeError::Invalid(_)
                | ChangeError::InvalidPeer(_)
                | ChangeError::InvalidService(_) => StatusCode::BAD_REQUEST,
                ChangeError::Exists(_)
                | ChangeError::AddrInUse(..)
                | ChangeError::AlreadySeeded(_)
                | ChangeError::Full
                | ChangeError::TooLarge(_)
                | ChangeError::PeerExists(_)
                | ChangeError::LastVoter(_)
                | ChangeError::DefaultService(_)
                | ChangeError::RouteTaken { .. } => StatusCode::CONFLICT,
            },
        }
    }

    /// `{"error": "..."}` with the status; 503 says when to retry, 401 how to authenticate.
    pub fn response(&self) -> Resp {
        let status = self.status();
        let mut r = json_response(status, &json!({ "error": self.to_string() }));
        if status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

impl From<ChangeError> for ApiError {
    fn from(e: ChangeError) -> Self {
        ApiError::Control(ControlError::Rejected(e))
    }
}

/// The agreed membership as the API shows it: voters and recorded learners with their cluster
/// addresses (`known` fills in those of the first voters, which came from config files).
pub fn membership_json(
    pool: &Pool,
    known: &std::collections::BTreeMap<String, Option<String>>,
) -> serde_json::Value {
    let row = |id: &NodeId| {
        let addr = pool
            .addrs
            .get(id)
            .cloned()
            .or_else(|| known.get(id.as_str()).cloned().flatten());
        json!({ "id": id.as_str(), "addr": addr })
    };
    json!({
        "version": pool.version,
        "epoch": pool.epoch,
        "voters": pool.voters.iter().map(row).collect::<Vec<_>>(),
        "learners": pool.learners.iter().map(row).collect::<Vec<_>>(),
    })
}

/// The pool as the API shows it: backends sorted by id, without the vote bookkeeping.
pub fn pool_json(pool: &Pool) -> serde_json::Value {
    let backends: Vec<_> = pool
        .backends
        .values()
        .map(|b| {
            json!({
                "id": b.id.as_str(),
                "addr": b.addr,
                "weight": b.weight,
                "state": b.state.as_str(),
                "protocol": b.protocol.as_str(),
                "usable_since": b.usable_since,
            })
        })
        .collect();
    json!({ "version": pool.version, "backends": backends })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PeerBody {
    id: String,
    addr: String,
    #[serde(default)]
    role: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddBody {
    addr: String,
    #[serde(default = "one")]
    weight: u32,
    id: Option<String>,
    /// "http1" (default) or "h2".
    protocol: Option<String>,
}

fn one() -> u32 {
    1
}

/// `PUT /services`: definitions to commit as one change (`shoal services apply`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApplyBody {
    services: Vec<NamedDef>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NamedDef {
    name: String,
    def: ServiceDef,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceBody {
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    path_prefix: Option<String>,
    #[serde(default)]
    strip_prefix: bool,
    #[serde(default)]
    balance: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    health: serde_json::Map<String, serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WeightBody {
    weight: u32,
}

fn invalid(e: crate::core::pool::InvalidBackend) -> ApiError {
    ApiError::BadRequest(format!("{}: {e}", e.field()))
}

impl Admin {
    /// Serve the admin API on `listener` until `shutdown`.
    pub fn spawn(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let stack = self.service();
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    a = crate::net::accept(&listener, "admin") => a,
                };
                let svc = TowerToHyperService::new(stack.clone());
                tokio::spawn(async move {
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        })
    }

    /// The admin API as a tower stack, outermost first: every failure becomes its answer (the
    /// stack's own error never happens: it is the type hyper wants);
    /// over `ADMIN_CONCURRENCY` requests in progress, 503 at once; an answer's head within
    /// `ADMIN_TIMEOUT`; the bearer token (except on the open endpoints); the body limit; then
    /// the routes. One clone per connection: the limit is shared by all of them.
    pub fn service(
        self: Arc<Self>,
    ) -> impl tower::Service<
        Request<Incoming>,
        Response = Resp,
        Error = tower::BoxError,
        Future = impl Send + 'static,
    > + Clone
           + Send
           + 'static {
        let token = self.token.clone();
        let routes = tower::service_fn(move |req: AdminRequest| {
            let this = self.clone();
            async move { this.handle(req).await.map_err(tower::BoxError::from) }
        });
        ServiceBuilder::new()
            .map_result(|r: Result<Resp, tower::BoxError>| {
                Ok::<_, tower::BoxError>(r.unwrap_or_else(|e| answer(e).response()))
            })
            .load_shed()
            .concurrency_limit(ADMIN_CONCURRENCY)
            .timeout(ADMIN_TIMEOUT)
            .filter(move |req: Request<Incoming>| authorized(token.as_deref(), req))
            .map_request(|req: Request<Incoming>| req.map(|b| Limited::new(b, MAX_BODY)))
            .service(routes)
    }

    pub fn ready(&self) -> bool {
        self.listening.load(Ordering::Relaxed)
            && !self.shutting_down.load(Ordering::Relaxed)
            && self.routing.pool().exists()
    }

    /// The endpoints anyone may read (the auth layer lets them through): probes, the status
    /// page, the scrape.
    fn open_endpoint(&self, method: &Method, path: &str) -> Option<Result<Resp, ApiError>> {
        if method != Method::GET || !OPEN.contains(&path) {
            return None;
        }
        match (method, path) {
            (&Method::GET, "/livez") => Some(Ok(json_response(
                StatusCode::OK,
                &json!({"status": "alive"}),
            ))),
            (&Method::GET, "/readyz") => Some(match self.ready() {
                true => Ok(json_response(StatusCode::OK, &json!({"status": "ready"}))),
                false => Err(ApiError::NotReady),
            }),
            (&Method::GET, "/") => {
                let mut r = Response::new(whole(STATUS_PAGE));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/html; charset=utf-8"),
                );
                r.headers_mut().insert(
                    header::CONTENT_SECURITY_POLICY,
                    HeaderValue::from_static(
                        "default-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline'",
                    ),
                );
                Some(Ok(r))
            }
            (&Method::GET, "/metrics") => {
                (self.collect)();
                let pool = self.routing.pool();
                let mut current: std::collections::HashSet<(&str, &str)> = pool
                    .backends
                    .keys()
                    .map(|id| (DEFAULT_SERVICE, id.as_str()))
                    .collect();
                for (name, svc) in &pool.services {
                    current.extend(svc.backends.keys().map(|id| (name.as_str(), id.as_str())));
                }
                let services: std::collections::HashSet<&str> = pool.service_names().collect();
                let text = crate::ops::telemetry::without_removed_backends(
                    &self.metrics.render(),
                    &services,
                    &current,
                );
                let peers = self.control.peers();
                let known: std::collections::HashSet<&str> =
                    peers.iter().map(|p| p.id.as_str()).collect();
                let mut text = crate::ops::telemetry::without_departed_peers(&text, &known);
                text.push_str(&crate::ops::telemetry::process_metrics());
                let mut r = Response::new(whole(text));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                Some(Ok(r))
            }
            _ => None,
        }
    }

    async fn handle(&self, req: AdminRequest) -> Result<Resp, ApiError> {
        let path = req.uri().path().to_string();
        let method = req.method().clone();
        if let Some(answer) = self.open_endpoint(&method, &path) {
            return answer;
        }
        // Discovered backends' ids hold a slash (`NAME/IP:PORT`): in a path it is %2F.
        let decoded: Vec<String> = path
            .trim_matches('/')
            .split('/')
            .map(percent_decode)
            .collect();
        let segments: Vec<&str> = decoded.iter().map(String::as_str).collect();
        match (&method, segments.as_slice()) {
            (m, ["pool", rest @ ..]) => {
                let (m, rest) = (m.clone(), rest.to_vec());
                self.pool_op(DEFAULT_SERVICE, &m, &rest, req, &path).await
            }
            (&Method::GET, ["services"]) => Ok(json_response(StatusCode::OK, &self.services())),
            (&Method::PUT, ["services"]) => {
                let body: ApplyBody = read_json(req).await?;
                self.apply_services(body).await
            }
            (&Method::GET, ["services", name]) => self.service_answer(name),
            (&Method::PUT, ["services", name]) => {
                let name = name.to_string();
                let body: ServiceBody = read_json(req).await?;
                self.put_service(&name, body).await
            }
            (&Method::DELETE, ["services", name]) => self.remove_service(name).await,
            // `/services/{name}/pool`, its backends, and the same under `.../pool/backends/`.
            (m, ["services", name, "pool", rest @ ..]) => {
                let (m, name, rest) = (m.clone(), name.to_string(), rest.to_vec());
                self.pool_op(&name, &m, &rest, req, &path).await
            }
            (m, ["services", name, rest @ ..]) if rest.first() == Some(&"backends") => {
                let (m, name, rest) = (m.clone(), name.to_string(), rest.to_vec());
                self.pool_op(&name, &m, &rest, req, &path).await
            }
            (&Method::GET, ["peers"]) => Ok(json_response(StatusCode::OK, &self.control.peers())),
            (&Method::GET, ["status"]) => Ok(json_response(StatusCode::OK, &self.status())),
            (&Method::GET, ["events"]) => Ok(self.events_answer(req.uri().query())),
            (&Method::POST, ["peers"]) => self.add_peer(read_json(req).await?).await,
            (&Method::DELETE, ["peers", id]) => {
                let change = PoolChange::RemovePeer {
                    id: NodeId::new(*id),
                };
                self.commit_membership(change, StatusCode::OK).await
            }
            (
                _,
                ["peers"] | ["peers", _] | ["status"] | ["events"] | ["services"] | ["services", _],
            ) => Err(ApiError::MethodNotAllowed { method, path }),
            _ => Err(ApiError::NoEndpoint(path)),
        }
    }

    /// `GET /services/{name}`: its definition, effective keys and pool.
    fn service_answer(&self, name: &str) -> Result<Resp, ApiError> {
        let pool = self.routing.pool();
        let default = ServiceDef::default();
        let def = match pool.services.get(name) {
            Some(s) => &s.def,
            None if name == DEFAULT_SERVICE => &default,
            None => return Err(ChangeError::ServiceNotFound(name.to_string()).into()),
        };
        let view = pool.service_view(name).unwrap_or_default();
        let mut out = self.service_json(name, def, &view);
        out["version"] = json!(pool.version);
        Ok(json_response(StatusCode::OK, &out))
    }

    /// `DELETE /services/{name}`: it goes with its pool, once committed.
    async fn remove_service(&self, name: &str) -> Result<Resp, ApiError> {
        let change = PoolChange::RemoveService {
            name: name.to_string(),
        };
        let pool = self.control.change(change).await?;
        Ok(json_response(
            StatusCode::OK,
            &json!({ "version": pool.version, "removed": name }),
        ))
    }

    /// `GET /events`: the events kept, or (`?follow=1`) a stream of them.
    fn events_answer(&self, query: Option<&str>) -> Resp {
        let follow = query.is_some_and(|q| {
            q.split('&')
                .any(|kv| kv == "follow=1" || kv == "follow=true")
        });
        if follow {
            return self.follow_events();
        }
        let recent = self.events.recent();
        let all: Vec<&serde_json::Value> = recent.iter().map(|e| &**e).collect();
        json_response(StatusCode::OK, &all)
    }

    /// `POST /peers`: a voter or a recorded learner, once committed.
    async fn add_peer(&self, body: PeerBody) -> Result<Resp, ApiError> {
        let learner = match body.role.as_deref() {
            None | Some("voter") => false,
            Some("learner") => true,
            Some(other) => {
                return Err(ApiError::BadRequest(format!(
                    "role {other:?}: expected \"voter\" or \"learner\""
                )))
            }
        };
        let id = NodeId::new(body.id);
        crate::core::pool::check_peer(&id, &body.addr).map_err(ApiError::BadRequest)?;
        let change = PoolChange::AddPeer {
            id,
            addr: body.addr,
            learner,
        };
        self.commit_membership(change, StatusCode::CREATED).await
    }

    /// `/events?follow=1`: the events kept, then each new one, as server-sent events; a comment
    /// every 15 s keeps proxies from closing the stream (and finds clients that left).
    fn follow_events(&self) -> Resp {
        let (backlog, mut live) = self.events.follow();
        let (mut tx, body) = http_body_util::channel::Channel::<Bytes, Infallible>::new(16);
        tokio::spawn(async move {
            for e in backlog {
                if tx
                    .send_data(crate::ops::events::sse_frame(&e).into())
                    .await
                    .is_err()
                {
                    return;
                }
            }
            let mut ping = tokio::time::interval(std::time::Duration::from_secs(15));
            ping.tick().await;
            loop {
                let frame = tokio::select! {
                    e = live.recv() => match e {
                        Ok(e) => crate::ops::events::sse_frame(&e),
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                            format!(": {n} events skipped (too slow)\n\n")
                        }
                        Err(_) => return,
                    },
                    _ = ping.tick() => ": ping\n\n".to_string(),
                };
                if tx.send_data(frame.into()).await.is_err() {
                    return;
                }
            }
        });
        let mut r = Response::new(body.boxed());
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        r.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        r
    }

    /// `/pool/...` of the service `default`, or `/services/{name}/pool` and
    /// `/services/{name}/backends/...`: `rest` is what follows `pool`.
    async fn pool_op(
        &self,
        service: &str,
        method: &Method,
        rest: &[&str],
        req: AdminRequest,
        path: &str,
    ) -> Result<Resp, ApiError> {
        let change = match (method, rest) {
            (&Method::GET, []) => {
                let pool = self.routing.pool();
                let view = pool
                    .service_view(service)
                    .ok_or_else(|| ChangeError::ServiceNotFound(service.to_string()))?;
                return Ok(json_response(StatusCode::OK, &pool_json(&view)));
            }
            (&Method::POST, ["backends"]) => {
                let body: AddBody = read_json(req).await?;
                let protocol = match body.protocol.as_deref() {
                    None => Protocol::Http1,
                    Some(p) => p.parse().map_err(invalid)?,
                };
                let backend = Backend::checked(body.id.as_deref(), &body.addr, body.weight)
                    .map_err(invalid)?
                    .with_protocol(protocol);
                let change = PoolChange::AddBackend { backend };
                return self.commit(service, change, StatusCode::CREATED).await;
            }
            (&Method::DELETE, ["backends", id]) => PoolChange::RemoveBackend {
                id: BackendId::new(*id),
            },
            (&Method::POST, ["backends", id, op @ ("drain" | "undrain")]) => PoolChange::SetState {
                id: BackendId::new(*id),
                draining: *op == "drain",
            },
            (&Method::PUT, ["backends", id]) => {
                let id = BackendId::new(*id);
                let body: WeightBody = read_json(req).await?;
                let weight = crate::core::pool::check_weight(body.weight).map_err(invalid)?;
                PoolChange::SetWeight { id, weight }
            }
            (_, [] | ["backends", ..]) => {
                return Err(ApiError::MethodNotAllowed {
                    method: method.clone(),
                    path: path.to_string(),
                })
            }
            _ => return Err(ApiError::NoEndpoint(path.to_string())),
        };
        self.commit(service, change, StatusCode::OK).await
    }

    /// `GET /services`: every service, `default` first... sorted by name, with its effective
    /// settings on this peer and its backends.
    fn services(&self) -> serde_json::Value {
        let pool = self.routing.pool();
        let mut rows: Vec<(String, serde_json::Value)> = Vec::new();
        let default = ServiceDef::default();
        for name in pool.service_names() {
            let def = pool.services.get(name).map_or(&default, |s| &s.def);
            let view = pool.service_view(name).unwrap_or_default();
            rows.push((name.to_string(), self.service_json(name, def, &view)));
        }
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        json!({
            "version": pool.version,
            "services": rows.into_iter().map(|(_, v)| v).collect::<Vec<_>>(),
        })
    }

    fn service_json(&self, name: &str, def: &ServiceDef, view: &Pool) -> serde_json::Value {
        let settings = self
            .routing
            .effective(def)
            .unwrap_or_else(|e| json!({ "error": e }));
        json!({
            "name": name,
            "hosts": def.hosts,
            "path_prefix": def.path_prefix,
            "strip_prefix": def.strip_prefix,
            "balance": settings.get("balance"),
            "health": settings.get("health"),
            "overrides": { "balance": def.balance, "health": def.health },
            "backends": pool_json(view)["backends"],
        })
    }

    /// `PUT /services`: every definition checked (400 naming the service and key), then all
    /// committed as one change; answered with the services.
    async fn apply_services(&self, body: ApplyBody) -> Result<Resp, ApiError> {
        let mut seeds = Vec::new();
        for (i, s) in body.services.into_iter().enumerate() {
            let at = |e: String| ApiError::BadRequest(format!("services[{i}] ({}): {e}", s.name));
            if !crate::core::pool::valid_service_name(&s.name) || s.name == DEFAULT_SERVICE {
                return Err(at(
                    "bad service name (expected [a-z0-9-]{1,32}, not default)".into(),
                ));
            }
            let def = s.def.clone().checked().map_err(at)?;
            self.routing.effective(&def).map_err(at)?;
            seeds.push(crate::core::pool::ServiceSeed {
                name: s.name,
                def,
                backends: Vec::new(),
            });
        }
        self.control
            .change(PoolChange::ApplyServices { services: seeds })
            .await?;
        Ok(json_response(StatusCode::OK, &self.services()))
    }

    /// `PUT /services/{name}`: checked here (400 naming the key), committed, answered with the
    /// service (201 when new).
    async fn put_service(&self, name: &str, body: ServiceBody) -> Result<Resp, ApiError> {
        if !crate::core::pool::valid_service_name(name) {
            return Err(ApiError::BadRequest(format!(
                "service name {name:?}: expected 1-32 characters of a-z, 0-9 and -"
            )));
        }
        let def = ServiceDef {
            hosts: body.hosts,
            path_prefix: body.path_prefix,
            strip_prefix: body.strip_prefix,
            balance: Overrides(body.balance.into_iter().collect()),
            health: Overrides(body.health.into_iter().collect()),
        }
        .checked()
        .map_err(ApiError::BadRequest)?;
        self.routing.effective(&def).map_err(ApiError::BadRequest)?;
        let existed = self.routing.pool().services.contains_key(name);
        let change = PoolChange::PutService {
            name: name.to_string(),
            def,
        };
        let pool = self.control.change(change).await?;
        let svc = pool
            .services
            .get(name)
            .ok_or_else(|| ChangeError::ServiceNotFound(name.to_string()))?;
        let view = pool.service_view(name).unwrap_or_default();
        let status = if existed {
            StatusCode::OK
        } else {
            StatusCode::CREATED
        };
        let mut out = self.service_json(name, &svc.def, &view);
        out["version"] = json!(pool.version);
        Ok(json_response(status, &out))
    }

    /// Commit a change to a service's backends and answer with that service's pool. The
    /// cluster published it to this peer's routing before answering, so its own GET /pool shows
    /// the change from now on.
    async fn commit(
        &self,
        service: &str,
        change: PoolChange,
        ok: StatusCode,
    ) -> Result<Resp, ApiError> {
        let pool = self
            .control
            .change(PoolChange::in_service(service, change))
            .await?;
        let view = pool
            .service_view(service)
            .ok_or_else(|| ChangeError::ServiceNotFound(service.to_string()))?;
        Ok(json_response(ok, &pool_json(&view)))
    }

    /// Commit a change of the membership and answer with the membership it produced.
    async fn commit_membership(
        &self,
        change: PoolChange,
        ok: StatusCode,
    ) -> Result<Resp, ApiError> {
        let pool = self.control.change(change).await?;
        let known = self.control.consensus().addrs;
        Ok(json_response(ok, &membership_json(&pool, &known)))
    }

    /// One service's backends as `/status` shows them: agreed state, this peer's view, traffic.
    fn status_rows(&self, service: &str, pool: &Pool, dead: &[NodeId]) -> Vec<serde_json::Value> {
        // Every live voter probes every backend unless `health.probers` assigns them.
        let k = match self.routing.probers(service) {
            0 => pool.voters.len(),
            k => k,
        };
        pool.backends
            .values()
            .map(|b| {
                let up = self.routing.local_up(service, &b.id);
                let (requests, inflight) = self.routing.traffic(service, &b.id);
                let probers =
                    crate::core::health::probers(&b.id, &pool.voters, dead, k).unwrap_or_default();
                json!({
                    "id": b.id.as_str(),
                    "addr": b.addr,
                    "weight": b.weight,
                    "requests": requests,
                    "inflight": inflight,
                    "state": b.state.as_str(),
                    "local": if up { "up" } else { "down" },
                    "down_votes": b.down_votes.iter().map(|p| p.as_str()).collect::<Vec<_>>(),
                    "probers": probers.iter().map(|p| p.as_str()).collect::<Vec<_>>(),
                })
            })
            .collect()
    }

    fn status(&self) -> serde_json::Value {
        let pool = self.routing.pool();
        let dead = self.control.gone();
        let backends = self.status_rows(DEFAULT_SERVICE, &pool, &dead);
        let services: Vec<_> = pool
            .service_names()
            .map(|name| {
                let view = pool.service_view(name).unwrap_or_default();
                let def = pool
                    .services
                    .get(name)
                    .map(|s| s.def.clone())
                    .unwrap_or_default();
                json!({
                    "name": name,
                    "hosts": def.hosts,
                    "path_prefix": def.path_prefix,
                    "backends": self.status_rows(name, &view, &dead),
                })
            })
            .collect();
        let c = self.control.consensus();
        json!({
            "node": self.node.as_str(),
            "cluster_id": c.cluster_id,
            "role": c.role,
            "consensus": c.consensus,
            "members": c.members,
            "membership": {
                "epoch": c.epoch,
                "voters": c.members.iter().map(|id| json!({"id": id, "addr": c.addrs.get(id).cloned().flatten()})).collect::<Vec<_>>(),
                "learners": c.learners.iter().map(|id| json!({"id": id, "addr": c.addrs.get(id).cloned().flatten()})).collect::<Vec<_>>(),
            },
            "waiting": c.waiting,
            "pool_version": pool.version,
            "uptime_ms": self.started.elapsed().as_millis() as u64,
            "quorum": self.control.quorum(),
            "shutting_down": self.shutting_down.load(Ordering::Relaxed),
            "backends": backends,
            "services": services,
            "discovery": (self.discovery)(),
        })
    }
}

/// The endpoints anyone may read: probes, the status page and the scrape.
fn open(req: &Request<Incoming>) -> bool {
    req.method() == Method::GET && OPEN.contains(&req.uri().path())
}

/// The endpoints anyone may `GET` (`Admin::open_endpoint` answers them).
const OPEN: [&str; 4] = ["/livez", "/readyz", "/", "/metrics"];

/// The auth layer's rule: with `admin.token` set, every endpoint but the open ones wants
/// `Authorization: Bearer TOKEN` (compared in constant time).
fn authorized(token: Option<&str>, req: Request<Incoming>) -> Result<Request<Incoming>, ApiError> {
    let Some(token) = token else { return Ok(req) };
    if open(&req) {
        return Ok(req);
    }
    let expected = format!("Bearer {token}");
    let ok = req
        .headers()
        .get(header::AUTHORIZATION)
        .is_some_and(|v| constant_time_eq(v.as_bytes(), expected.as_bytes()));
    if ok {
        Ok(req)
    } else {
        Err(ApiError::Unauthorized)
    }
}

/// What a failure of any layer answers.
fn answer(e: tower::BoxError) -> ApiError {
    match e.downcast::<ApiError>() {
        Ok(api) => *api,
        Err(e) if e.is::<tower::load_shed::error::Overloaded>() => ApiError::Busy,
        Err(e) if e.is::<tower::timeout::error::Elapsed>() => ApiError::TimedOut,
        Err(e) => ApiError::BadRequest(e.to_string()),
    }
}

async fn read_json<T: serde::de::DeserializeOwned>(req: AdminRequest) -> Result<T, ApiError> {
    let body = req
        .into_body()
        .collect()
        .await
        .map_err(|_| ApiError::BadRequest("body unreadable or over 64 KiB".into()))?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("bad JSON body: {e}")))
}

/// `%XX` escapes decoded (a bad escape is kept as it is).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::pool::InvalidBackend;

    /// One status per variant, and the headers that go with them.
    #[test]
    fn every_error_has_its_answer() {
        let unavailable = || ControlError::Unavailable("no quorum".into());
        let cases = [
            (ApiError::BadRequest("x".into()), 400),
            (ApiError::Unauthorized, 401),
            (ApiError::NoEndpoint("/x".into()), 404),
            (
                ApiError::MethodNotAllowed {
                    method: Method::PATCH,
                    path: "/pool".into(),
                },
                405,
            ),
            (ApiError::NotReady, 503),
            (ApiError::Busy, 503),
            (ApiError::TimedOut, 504),
            (ApiError::Control(unavailable()), 503),
            (ChangeError::NotFound(BackendId::new("w")).into(), 404),
            (ChangeError::Invalid(InvalidBackend::Weight(0)).into(), 400),
            (ChangeError::Exists(BackendId::new("w")).into(), 409),
            (
                ChangeError::AddrInUse("a:1".into(), BackendId::new("w")).into(),
                409,
            ),
            (ChangeError::AlreadySeeded(3).into(), 409),
            (ChangeError::Full.into(), 409),
            (ChangeError::TooLarge(1 << 24).into(), 409),
        ];
        for (e, code) in cases {
            let r = e.response();
            assert_eq!(r.status().as_u16(), code, "{e:?}");
            assert_eq!(r.headers().contains_key(header::RETRY_AFTER), code == 503);
            assert_eq!(
                r.headers().contains_key(header::WWW_AUTHENTICATE),
                code == 401
            );
        }
    }

    /// A cluster whose changes take `.0` to commit; `.1` counts those begun.
    struct Slow(std::time::Duration, Arc<std::sync::atomic::AtomicUsize>);

    impl PoolControl for Slow {
        fn change(&self, _: PoolChange) -> BoxFuture<'_, Result<Pool, ControlError>> {
            self.1.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                tokio::time::sleep(self.0).await;
                Ok(Pool::default())
            })
        }
        fn peers(&self) -> Vec<PeerView> {
            Vec::new()
        }
        fn gone(&self) -> Vec<NodeId> {
            Vec::new()
        }
        fn quorum(&self) -> bool {
            true
        }
        fn consensus(&self) -> ConsensusView {
            ConsensusView::default()
        }
    }

    struct Empty;

    impl RoutingView for Empty {
        fn pool(&self) -> Arc<Pool> {
            Arc::new(Pool::default())
        }
        fn local_up(&self, _: &str, _: &BackendId) -> bool {
            true
        }
        fn effective(&self, _: &ServiceDef) -> Result<serde_json::Value, String> {
            Ok(json!({}))
        }
        fn traffic(&self, _: &str, _: &BackendId) -> (u64, u64) {
            (0, 0)
        }
        fn probers(&self, _: &str) -> usize {
            0
        }
    }

    async fn send(addr: std::net::SocketAddr, head: &str) -> u16 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(head.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 12];
        s.read_exact(&mut buf).await.unwrap();
        std::str::from_utf8(&buf[9..12]).unwrap().parse().unwrap()
    }

    /// The tower stack over a real socket: the token guards all but the open endpoints, a body
    /// over the limit is refused, and past `ADMIN_CONCURRENCY` requests in progress the next
    /// one is answered 503 at once while the others go on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_admin_stack_authenticates_limits_and_sheds() {
        let begun = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let admin = Arc::new(Admin {
            node: NodeId::new("a"),
            token: Some("s3cret".into()),
            routing: Arc::new(Empty),
            control: Arc::new(Slow(std::time::Duration::from_secs(3), begun.clone())),
            metrics: metrics_exporter_prometheus::PrometheusBuilder::new()
                .build_recorder()
                .handle(),
            events: crate::ops::events::Events::new("a"),
            collect: Box::new(|| {}),
            discovery: Box::new(|| json!([])),
            started: std::time::Instant::now(),
            listening: AtomicBool::new(true),
            shutting_down: AtomicBool::new(false),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        admin.spawn(listener, stop.clone());
        assert_eq!(
            send(addr, "GET /livez HTTP/1.1\r\nHost: a\r\n\r\n").await,
            200
        );
        assert_eq!(
            send(addr, "GET /pool HTTP/1.1\r\nHost: a\r\n\r\n").await,
            401
        );
        let auth = "Authorization: Bearer s3cret\r\n";
        assert_eq!(
            send(
                addr,
                &format!("GET /pool HTTP/1.1\r\nHost: a\r\n{auth}\r\n")
            )
            .await,
            200
        );
        // Valid JSON (whitespace pads it): only the limit can refuse it.
        let big = format!(r#"{{"weight": 2{}}}"#, " ".repeat(MAX_BODY));
        let fits = format!(
            "PUT /pool/backends/w HTTP/1.1\r\nHost: a\r\n{auth}Content-Length: 13\r\n\r\n{{\"weight\": 2}}"
        );
        assert_eq!(send(addr, &fits).await, 200);
        let over = format!(
            "PUT /pool/backends/w HTTP/1.1\r\nHost: a\r\n{auth}Content-Length: {}\r\n\r\n{big}",
            big.len()
        );
        assert_eq!(send(addr, &over).await, 400);
        let remove = format!("DELETE /pool/backends/w HTTP/1.1\r\nHost: a\r\n{auth}\r\n");
        let base = begun.load(Ordering::SeqCst);
        let slow: Vec<_> = (0..ADMIN_CONCURRENCY)
            .map(|_| {
                let r = remove.clone();
                tokio::spawn(async move { send(addr, &r).await })
            })
            .collect();
        // Every slow change is in progress (each holds a place until it commits).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while begun.load(Ordering::SeqCst) < base + ADMIN_CONCURRENCY {
            assert!(
                std::time::Instant::now() < deadline,
                "the slow changes never began"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(send(addr, &remove).await, 503);
        assert_eq!(
            begun.load(Ordering::SeqCst),
            base + ADMIN_CONCURRENCY,
            "shed before it ran"
        );
        for s in slow {
            assert_eq!(s.await.unwrap(), 200);
        }
        stop.cancel();
    }
}
