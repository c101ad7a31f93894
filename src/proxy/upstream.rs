//! One backend as this peer uses it: a pool of keep-alive HTTP/1.1 connections, the in-flight
//! count, this peer's local health view, and the backend's metric handles.
//!
//! Upstreams outlive pool versions: a new snapshot reuses the `Upstream` of every backend id it
//! keeps, so pooled connections, load and health carry over.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use metrics::{Counter, Gauge, Histogram};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::body::RequestBody;
use crate::core::health::{Local, LocalHealth, Source, Thresholds};
use crate::core::pool::BackendId;
use crate::telemetry as names;

/// Idle connections kept per backend.
const MAX_IDLE: usize = 256;
/// Idle connections older than this are not reused (backends commonly close at 60-75 s).
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

pub type Sender = http1::SendRequest<RequestBody>;

/// Where to connect.
#[derive(Clone)]
pub struct Target {
    /// `host:port` for `TcpStream::connect` (an IP literal skips DNS).
    pub authority: String,
    /// Some when the backend speaks TLS (`https://host:port`).
    pub tls: Option<(TlsConnector, ServerName<'static>)>,
}

impl Target {
    pub fn parse(addr: &str, tls: Option<&TlsConnector>) -> Result<Target, String> {
        match addr.strip_prefix("https://") {
            None => Ok(Target {
                authority: addr.to_string(),
                tls: None,
            }),
            Some(rest) => {
                let connector = tls.ok_or("upstream TLS is not available")?.clone();
                let host = rest
                    .rsplit_once(':')
                    .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
                    .unwrap_or(rest);
                let name = ServerName::try_from(host.to_string())
                    .map_err(|e| format!("bad TLS server name {host:?}: {e}"))?;
                Ok(Target {
                    authority: rest.to_string(),
                    tls: Some((connector, name)),
                })
            }
        }
    }
}

/// Why an attempt failed, as `shoal_upstream_errors_total{kind}` counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    Connect,
    Timeout,
    Reset,
    Status,
}

struct Idle {
    sender: Sender,
    since: Instant,
}

struct Metrics {
    by_class: names::StatusCounters,
    duration: Histogram,
    errors: [Counter; 4],
    up: Gauge,
}

impl Metrics {
    fn new(id: &str) -> Self {
        let err = |k: &'static str| metrics::counter!(names::UPSTREAM_ERRORS_TOTAL, "backend" => id.to_string(), "kind" => k);
        Self {
            by_class: names::StatusCounters::new(id),
            duration: metrics::histogram!(names::REQUEST_DURATION_SECONDS, "backend" => id.to_string()),
            errors: [err("connect"), err("timeout"), err("reset"), err("status")],
            up: metrics::gauge!(names::BACKEND_UP, "backend" => id.to_string()),
        }
    }
}

/// One backend's runtime state.
pub struct Upstream {
    pub id: BackendId,
    pub addr: String,
    target: Target,
    /// Idle connections, one pool per worker thread (slot 0: off the data plane), so a
    /// connection is only ever used by the thread whose runtime drives it.
    idle: Box<[Mutex<Vec<Idle>>]>,
    inflight: AtomicU64,
    health: Mutex<LocalHealth>,
    /// False only while the local view is clean (up, no failure streak): successes skip the lock.
    dirty: AtomicBool,
    up: AtomicBool,
    /// Down because of traffic (not probes): trial requests may bring it back.
    trial_ok: AtomicBool,
    /// When the last trial request was let through while down (ms since `epoch`).
    last_trial_ms: AtomicU64,
    epoch: Instant,
    metrics: Metrics,
}

impl Upstream {
    pub fn new(id: BackendId, addr: String, target: Target, workers: usize) -> Self {
        let metrics = Metrics::new(id.as_str());
        metrics.up.set(1.0);
        Self {
            id,
            addr,
            target,
            idle: (0..=workers).map(|_| Mutex::new(Vec::new())).collect(),
            inflight: AtomicU64::new(0),
            health: Mutex::new(LocalHealth::default()),
            dirty: AtomicBool::new(false),
            up: AtomicBool::new(true),
            trial_ok: AtomicBool::new(false),
            last_trial_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            metrics,
        }
    }

    /// The backend's `host:port`, for requests that arrived without a Host.
    pub fn host_header(&self) -> Option<http::HeaderValue> {
        http::HeaderValue::from_str(&self.target.authority).ok()
    }

    /// This peer's own view, without side effects.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Usable for a new request: up, or taken down by traffic and due a trial request (at most
    /// one per `trial_every`), so a backend that recovered is found again between probes.
    pub fn usable(&self, trial_every: Duration) -> bool {
        if self.is_up() {
            return true;
        }
        if !self.trial_ok.load(Ordering::Relaxed) {
            return false;
        }
        let now = self.epoch.elapsed().as_millis() as u64;
        let last = self.last_trial_ms.load(Ordering::Relaxed);
        now.saturating_sub(last) >= trial_every.as_millis() as u64
            && self
                .last_trial_ms
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    pub fn inflight(&self) -> u64 {
        self.inflight.load(Ordering::Relaxed)
    }

    /// Count one request in flight until the guard drops.
    pub fn start(self: &Arc<Self>) -> InflightGuard {
        self.inflight.fetch_add(1, Ordering::Relaxed);
        InflightGuard(self.clone())
    }

    /// Record an outcome into the local view; returns the new state when it flips.
    pub fn record(&self, source: Source, ok: bool, t: &Thresholds) -> Option<Local> {
        if ok && source == Source::Traffic && !self.dirty.load(Ordering::Relaxed) {
            return None;
        }
        let mut h = self.health.lock().unwrap_or_else(|e| e.into_inner());
        let flip = h.record(source, ok, t);
        self.dirty
            .store(!ok || h.state() == Local::Down, Ordering::Relaxed);
        self.trial_ok
            .store(h.down_by() == Some(Source::Traffic), Ordering::Relaxed);
        if let Some(state) = flip {
            self.up.store(state == Local::Up, Ordering::Relaxed);
            self.metrics
                .up
                .set(if state == Local::Up { 1.0 } else { 0.0 });
            match state {
                Local::Down => {
                    tracing::warn!(backend = %self.id, ?source, "backend down (local view)")
                }
                Local::Up => tracing::info!(backend = %self.id, ?source, "backend up (local view)"),
            }
        }
        flip
    }

    pub fn count_response(&self, status: u16, elapsed: Duration) {
        self.metrics.by_class.count(status);
        self.metrics.duration.record(elapsed.as_secs_f64());
    }

    pub fn count_error(&self, kind: ErrorKind) {
        self.metrics.errors[kind as usize].increment(1);
    }

    fn pool(&self) -> &Mutex<Vec<Idle>> {
        &self.idle[super::server::worker_index() % self.idle.len()]
    }

    /// A ready connection: a pooled one if any is still open, else a new one.
    pub async fn checkout(&self, connect_timeout: Duration) -> Result<Sender, io::Error> {
        loop {
            let idle = {
                let mut pool = self.pool().lock().unwrap_or_else(|e| e.into_inner());
                pool.pop()
            };
            let Some(mut idle) = idle else { break };
            if idle.since.elapsed() > IDLE_TIMEOUT || idle.sender.is_closed() {
                continue;
            }
            // Normally ready at once; waits only if the previous response is still finishing.
            if idle.sender.ready().await.is_ok() {
                return Ok(idle.sender);
            }
        }
        match tokio::time::timeout(connect_timeout, self.connect()).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
        }
    }

    /// Return a connection whose exchange completed.
    pub fn checkin(&self, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let mut pool = self.pool().lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < MAX_IDLE {
            pool.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    /// One active health probe on a fresh connection: GET `path`, pass on 2xx within `timeout`.
    pub async fn probe(&self, path: &str, timeout: Duration) -> bool {
        let attempt = async {
            let mut sender = self.connect().await.ok()?;
            let req = http::Request::get(path)
                .header(http::header::HOST, self.target.authority.as_str())
                .header(http::header::USER_AGENT, "shoal-health")
                .header(http::header::CONNECTION, "close")
                .body(RequestBody::Empty)
                .ok()?;
            let resp = sender.send_request(req).await.ok()?;
            Some(resp.status().is_success())
        };
        matches!(tokio::time::timeout(timeout, attempt).await, Ok(Some(true)))
    }

    async fn connect(&self) -> Result<Sender, io::Error> {
        let tcp = TcpStream::connect(&self.target.authority).await?;
        tcp.set_nodelay(true)?;
        let io = match &self.target.tls {
            None => UpstreamIo::Plain(tcp),
            Some((connector, name)) => {
                UpstreamIo::Tls(Box::new(connector.connect(name.clone(), tcp).await?))
            }
        };
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(io::Error::other)?;
        let id = self.id.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(backend = %id, error = %e, "upstream connection ended");
            }
        });
        Ok(sender)
    }
}

/// Decrements the in-flight count when dropped.
pub struct InflightGuard(Arc<Upstream>);

impl InflightGuard {
    pub fn upstream(&self) -> &Arc<Upstream> {
        &self.0
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A backend connection: plain TCP or TLS.
pub enum UpstreamIo {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamIo::Plain(s) => s.is_write_vectored(),
            UpstreamIo::Tls(s) => s.is_write_vectored(),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
