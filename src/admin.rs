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
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{normalize_backend_addr, valid_backend_id};
use crate::core::pool::{Backend, BackendId, ChangeError, NodeId, Pool, PoolChange, MAX_WEIGHT};
use crate::proxy::router::Router;

/// Why a pool change did not commit.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The change's precondition failed; nothing changed.
    #[error(transparent)]
    Rejected(#[from] ChangeError),
    /// No majority answered in time.
    #[error("no quorum: {0}")]
    NoQuorum(String),
    /// Accepts were sent but not confirmed: the change may or may not have committed.
    #[error("outcome unknown (the change may have committed; read the pool before retrying): {0}")]
    Unknown(String),
}

/// One row of `GET /peers`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PeerView {
    pub id: String,
    pub addr: String,
    pub state: String,
    pub phi: f64,
    pub last_seen_ms: Option<u64>,
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the admin API needs from the cluster.
pub trait PoolControl: Send + Sync + 'static {
    /// Commit `change` (by a majority, in a cluster) and return the pool it produced.
    fn change(&self, change: PoolChange) -> BoxFuture<'_, Result<Pool, ControlError>>;
    /// The other peers as this peer sees them.
    fn peers(&self) -> Vec<PeerView>;
    /// Whether a majority of peers answers now.
    fn quorum(&self) -> bool;
}

/// Shared state of the admin server.
pub struct Admin {
    pub node: NodeId,
    pub token: Option<String>,
    pub router: Arc<Router>,
    pub control: Arc<dyn PoolControl>,
    pub metrics: PrometheusHandle,
    /// Set once every listener is bound.
    pub listening: AtomicBool,
}

type Resp = Response<Full<Bytes>>;

const MAX_BODY: usize = 64 * 1024;

fn json_response(status: StatusCode, v: &impl Serialize) -> Resp {
    let body = serde_json::to_vec_pretty(v).unwrap_or_default();
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: StatusCode, msg: impl std::fmt::Display) -> Resp {
    let mut r = json_response(status, &json!({ "error": msg.to_string() }));
    if status == StatusCode::SERVICE_UNAVAILABLE {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    r
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
            })
        })
        .collect();
    json!({ "version": pool.version, "backends": backends })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddBody {
    addr: String,
    #[serde(default = "one")]
    weight: u32,
    id: Option<String>,
}

fn one() -> u32 {
    1
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WeightBody {
    weight: u32,
}

impl Admin {
    /// Serve the admin API on `listener` until `shutdown`.
    pub fn spawn(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    a = listener.accept() => match a {
                        Ok(a) => a,
                        Err(e) => {
                            tracing::warn!(error = %e, "admin accept failed");
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                };
                let this = self.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let this = this.clone();
                        async move { Ok::<_, Infallible>(this.handle(req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        })
    }

    pub fn ready(&self) -> bool {
        self.listening.load(Ordering::Relaxed) && self.router.pool().exists()
    }

    async fn handle(&self, req: Request<Incoming>) -> Resp {
        let path = req.uri().path().to_string();
        let method = req.method().clone();
        match (&method, path.as_str()) {
            (&Method::GET, "/livez") => {
                return json_response(StatusCode::OK, &json!({"status": "alive"}))
            }
            (&Method::GET, "/readyz") => {
                return if self.ready() {
                    json_response(StatusCode::OK, &json!({"status": "ready"}))
                } else {
                    error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "not ready: listeners not bound or no pool known yet",
                    )
                };
            }
            (&Method::GET, "/metrics") => {
                let mut r = Response::new(Full::new(Bytes::from(self.metrics.render())));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                return r;
            }
            _ => {}
        }
        if let Some(token) = &self.token {
            let expected = format!("Bearer {token}");
            let ok = req
                .headers()
                .get(header::AUTHORIZATION)
                .is_some_and(|v| constant_time_eq(v.as_bytes(), expected.as_bytes()));
            if !ok {
                let mut r = error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
                r.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                return r;
            }
        }
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        match (&method, segments.as_slice()) {
            (&Method::GET, ["pool"]) => {
                json_response(StatusCode::OK, &pool_json(&self.router.pool()))
            }
            (&Method::GET, ["peers"]) => json_response(StatusCode::OK, &self.control.peers()),
            (&Method::GET, ["status"]) => json_response(StatusCode::OK, &self.status()),
            (&Method::POST, ["pool", "backends"]) => {
                let body: AddBody = match read_json(req).await {
                    Ok(b) => b,
                    Err(r) => return r,
                };
                let addr = match normalize_backend_addr(&body.addr) {
                    Ok(a) => a,
                    Err(e) => return error(StatusCode::BAD_REQUEST, format!("addr: {e}")),
                };
                if !(1..=MAX_WEIGHT).contains(&body.weight) {
                    return error(
                        StatusCode::BAD_REQUEST,
                        format!("weight: must be 1..=1000, got {}", body.weight),
                    );
                }
                let id = body.id.unwrap_or_else(|| addr.clone());
                if !valid_backend_id(&id) {
                    return error(
                        StatusCode::BAD_REQUEST,
                        format!(
                            "id: bad id {id:?} (1 to 64 printable characters, no spaces or '/')"
                        ),
                    );
                }
                let change = PoolChange::AddBackend {
                    backend: Backend::new(id, addr, body.weight),
                };
                self.commit(change, StatusCode::CREATED).await
            }
            (&Method::DELETE, ["pool", "backends", id]) => {
                self.commit(
                    PoolChange::RemoveBackend {
                        id: BackendId::new(*id),
                    },
                    StatusCode::OK,
                )
                .await
            }
            (&Method::POST, ["pool", "backends", id, op @ ("drain" | "undrain")]) => {
                let change = PoolChange::SetState {
                    id: BackendId::new(*id),
                    draining: *op == "drain",
                };
                self.commit(change, StatusCode::OK).await
            }
            (&Method::PUT, ["pool", "backends", id]) => {
                let id = BackendId::new(*id);
                let body: WeightBody = match read_json(req).await {
                    Ok(b) => b,
                    Err(r) => return r,
                };
                if !(1..=MAX_WEIGHT).contains(&body.weight) {
                    return error(
                        StatusCode::BAD_REQUEST,
                        format!("weight: must be 1..=1000, got {}", body.weight),
                    );
                }
                self.commit(
                    PoolChange::SetWeight {
                        id,
                        weight: body.weight,
                    },
                    StatusCode::OK,
                )
                .await
            }
            (_, ["pool"] | ["peers"] | ["status"] | ["pool", "backends", ..]) => error(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{method} is not allowed on {path}"),
            ),
            _ => error(StatusCode::NOT_FOUND, format!("no such endpoint: {path}")),
        }
    }

    async fn commit(&self, change: PoolChange, ok: StatusCode) -> Resp {
        match self.control.change(change).await {
            // The cluster task published the pool to this peer's routing before answering, so
            // its own GET /pool shows the change from now on.
            Ok(pool) => json_response(ok, &pool_json(&pool)),
            Err(ControlError::Rejected(e)) => {
                let status = match e {
                    ChangeError::NotFound(_) => StatusCode::NOT_FOUND,
                    ChangeError::BadWeight(_) => StatusCode::BAD_REQUEST,
                    ChangeError::Exists(_)
                    | ChangeError::AddrInUse(..)
                    | ChangeError::AlreadySeeded(_) => StatusCode::CONFLICT,
                };
                error(status, e)
            }
            Err(e @ ControlError::NoQuorum(_)) => error(StatusCode::SERVICE_UNAVAILABLE, e),
            Err(e @ ControlError::Unknown(_)) => error(StatusCode::SERVICE_UNAVAILABLE, e),
        }
    }

    fn status(&self) -> serde_json::Value {
        let pool = self.router.pool();
        let backends: Vec<_> = pool
            .backends
            .values()
            .map(|b| {
                let up = self.router.upstream(&b.id).is_none_or(|u| u.is_up());
                json!({
                    "id": b.id.as_str(),
                    "state": b.state.as_str(),
                    "local": if up { "up" } else { "down" },
                    "down_votes": b.down_votes.iter().map(|p| p.as_str()).collect::<Vec<_>>(),
                })
            })
            .collect();
        json!({
            "node": self.node.as_str(),
            "pool_version": pool.version,
            "quorum": self.control.quorum(),
            "backends": backends,
        })
    }
}

async fn read_json<T: serde::de::DeserializeOwned>(req: Request<Incoming>) -> Result<T, Resp> {
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "body unreadable or over 64 KiB",
            ))
        }
    };
    serde_json::from_slice(&body)
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("bad JSON body: {e}")))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
