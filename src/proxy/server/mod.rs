//! Client listeners: accept, limit, terminate TLS, serve HTTP/1.1 (Shoal's own loop, `h1`) and
//! HTTP/2 (hyper's server, after ALPN or the h2c preface), close idle connections, and drain on
//! shutdown.
//!
//! Like nginx's workers, each of `proxy.workers` threads runs its own single-threaded runtime and
//! accepts on its own SO_REUSEPORT socket for every listen address, so a connection and the
//! upstream connections it uses stay on one thread: no work stealing, no cross-thread wakeups on
//! the request path. The control plane (cluster, admin, probes) runs on another runtime.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::Request;
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::body::ClientBody;
use super::client::{BoxIo, Rewind};
use super::conn::{ConnState, Tunnels, WatchedIo};
use super::deadline::Deadline;
use super::forward::{ConnInfo, Proxy};
use h1::Ended;

pub mod h1;
mod idle;
use crate::ops::telemetry as names;

/// How client connections are served.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    pub max_header_bytes: usize,
    pub client_idle_timeout: Duration,
    pub max_connections: usize,
    /// An upgraded tunnel with no byte either way for this long is closed.
    pub tunnel_idle_timeout: Duration,
    /// Plain-TCP connections through one io_uring per worker (`proxy.io_uring`).
    pub io_uring: bool,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Every client listener of one peer, sharing one connection limit and one drain.
pub struct Server {
    proxy: Arc<Proxy>,
    opts: ServerOptions,
    limit: Arc<Semaphore>,
    h2: http2::Builder<TokioExecutor>,
    /// Connection tasks, waited for on drain.
    tracker: TaskTracker,
    /// Cancelled to stop accepting and to ask connections to finish.
    drain: CancellationToken,
    /// Cancelled when the drain is over: worker runtimes stop.
    done: CancellationToken,
    /// `proxy.client_idle_timeout` and `proxy.tunnel_idle_timeout` in milliseconds: live, a
    /// reload changes them for every connection at its next idle check.
    client_idle_ms: AtomicU64,
    tunnel_idle_ms: AtomicU64,
}

/// A TLS server config that a reload can swap.
pub type TlsSwap = Arc<ArcSwap<crate::net::tls::Termination>>;

/// One listen address, bound once per worker with SO_REUSEPORT.
pub struct Listener {
    pub addr: std::net::SocketAddr,
    sockets: Vec<std::net::TcpListener>,
    tls: Option<TlsSwap>,
}

impl Listener {
    /// Bind `addr` `workers` times (port 0 picks one port for all).
    pub fn bind(
        addr: std::net::SocketAddr,
        workers: usize,
        tls: Option<TlsSwap>,
    ) -> std::io::Result<Listener> {
        let mut sockets = Vec::with_capacity(workers);
        let mut bound = addr;
        for _ in 0..workers.max(1) {
            let s = socket2::Socket::new(
                socket2::Domain::for_address(bound),
                socket2::Type::STREAM,
                Some(socket2::Protocol::TCP),
            )?;
            s.set_reuse_address(true)?;
            s.set_reuse_port(true)?;
            s.set_nonblocking(true)?;
            s.bind(&bound.into())?;
            s.listen(1024)?;
            let l: std::net::TcpListener = s.into();
            bound = l.local_addr()?;
            sockets.push(l);
        }
        Ok(Listener {
            addr: bound,
            sockets,
            tls,
        })
    }
}

impl Server {
    pub fn new(proxy: Arc<Proxy>, opts: ServerOptions) -> Arc<Self> {
        // HTTP/1 is served by Shoal's own loop (h1.rs). No per-request header timer: the
        // connection watchdog below closes a connection that sends bytes without starting a
        // request for a whole idle period (slow heads).
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_concurrent_streams(256)
            // Beyond it, h2 answers the stream 431 (as HTTP/1 heads beyond it get 431).
            .max_header_list_size(u32::try_from(opts.max_header_bytes).unwrap_or(u32::MAX));
        Arc::new(Self {
            proxy,
            client_idle_ms: AtomicU64::new(millis(opts.client_idle_timeout)),
            tunnel_idle_ms: AtomicU64::new(millis(opts.tunnel_idle_timeout)),
            limit: Arc::new(Semaphore::new(opts.max_connections)),
            opts,
            h2,
            tracker: TaskTracker::new(),
            drain: CancellationToken::new(),
            done: CancellationToken::new(),
        })
    }

    /// New idle timeouts (a reload): each connection takes them at its next idle check.
    pub fn set_idle_timeouts(&self, client: Duration, tunnel: Duration) {
        self.client_idle_ms.store(millis(client), Ordering::Relaxed);
        self.tunnel_idle_ms.store(millis(tunnel), Ordering::Relaxed);
    }

    fn client_idle(&self) -> Duration {
        Duration::from_millis(self.client_idle_ms.load(Ordering::Relaxed))
    }

    fn tunnel_idle(&self) -> Duration {
        Duration::from_millis(self.tunnel_idle_ms.load(Ordering::Relaxed))
    }

    /// Start `workers` threads, each with its own runtime accepting on its own socket of every
    /// listener, until the drain is over.
    pub fn start_workers(
        self: &Arc<Self>,
        listeners: Vec<Listener>,
        workers: usize,
    ) -> std::io::Result<()> {
        let workers = workers.max(1);
        let mut per_worker: Vec<Vec<(std::net::TcpListener, Option<TlsSwap>)>> =
            (0..workers).map(|_| Vec::new()).collect();
        for l in listeners {
            for (i, s) in l.sockets.into_iter().enumerate() {
                per_worker[i % workers].push((s, l.tls.clone()));
            }
        }
        for (i, sockets) in per_worker.into_iter().enumerate() {
            let this = self.clone();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            std::thread::Builder::new()
                .name(format!("shoal-worker-{}", i + 1))
                .spawn(move || {
                    // Worker numbers start at 1 (0 is off the data plane).
                    let worker = i + 1;
                    rt.block_on(async move {
                        tokio::spawn(timer_floor());
                        tokio::spawn(idle::sweep(this.clone()));
                        crate::proxy::deadline::install();
                        if this.opts.io_uring {
                            if let Err(e) = crate::net::uring::install() {
                                tracing::warn!(error = %e, worker, "proxy.io_uring: the kernel refused a ring; this worker uses epoll");
                            }
                        }
                        for (s, tls) in sockets {
                            match crate::net::Accepting::new(s) {
                                Ok(l) => {
                                    tokio::spawn(this.clone().accept_loop(l, tls, worker));
                                }
                                Err(e) => tracing::error!(error = %e, "cannot use a listener"),
                            }
                        }
                        this.done.cancelled().await;
                    });
                })?;
        }
        Ok(())
    }

    async fn accept_loop(
        self: Arc<Self>,
        listener: crate::net::Accepting,
        tls: Option<TlsSwap>,
        worker: usize,
    ) {
        let refused = metrics::counter!(names::CLIENT_CONNECTIONS_REFUSED_TOTAL);
        loop {
            // A plain connection for the ring is accepted blocking and never enters epoll.
            let ring = tls.is_none() && crate::net::uring::enabled();
            let (stream, client) = tokio::select! {
                _ = self.drain.cancelled() => break,
                a = listener.accept(ring) => a,
            };
            let Ok(permit) = self.limit.clone().try_acquire_owned() else {
                refused.increment(1);
                drop(stream);
                continue;
            };
            let _ = stream.set_nodelay(true);
            let this = self.clone();
            let tls = tls.as_ref().map(|t| t.load_full());
            let fut = async move {
                let held = idle::Held::new(permit, metrics::gauge!(names::CLIENT_CONNECTIONS));
                // One await for every plain connection, whatever its socket: the task's
                // future then holds one connection's state, not one per kind of socket.
                let plain = match tls {
                    None if ring => match crate::net::uring::UringStream::from_std(stream) {
                        Ok(s) => Some((watched(s), held)),
                        Err(e) => {
                            tracing::debug!(error = %e, "io_uring stream");
                            None
                        }
                    },
                    None => match TcpStream::from_std(stream) {
                        Ok(s) => Some((watched(s), held)),
                        Err(e) => {
                            tracing::debug!(error = %e, "client socket");
                            None
                        }
                    },
                    // Boxed: the TLS path's state is several KiB, which a plain connection's
                    // task would otherwise carry.
                    Some(cfg) => {
                        Box::pin(async {
                            let stream = match TcpStream::from_std(stream) {
                                Ok(s) => s,
                                Err(e) => {
                                    tracing::debug!(error = %e, "client socket");
                                    return;
                                }
                            };
                            match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, cfg.accept(stream))
                                .await
                            {
                                Ok(Ok(s)) => {
                                    let h2 = s.get_ref().1.alpn_protocol() == Some(b"h2");
                                    this.serve(watched(s), held, client, true, worker, h2).await
                                }
                                Ok(Err(e)) => {
                                    tracing::debug!(%client, error = %e, "TLS handshake failed")
                                }
                                Err(_) => tracing::debug!(%client, "TLS handshake timed out"),
                            }
                        })
                        .await;
                        None
                    }
                };
                if let Some((io, held)) = plain {
                    this.serve(io, held, client, false, worker, false).await;
                }
            };
            self.tracker.spawn(fut);
        }
        // Dropping the listener here closes it: new connections are refused from now on.
    }

    /// Serve a client connection (`io` and `state` from [`watched`]): one future type for every
    /// kind of socket.
    async fn serve(
        self: &Arc<Self>,
        (io, state): (BoxIo, Arc<ConnState>),
        held: idle::Held,
        client: std::net::SocketAddr,
        https: bool,
        worker: usize,
        alpn_h2: bool,
    ) {
        let info = ConnInfo::new(client, https, worker, state.clone());
        if alpn_h2 {
            let mut h2 = Box::pin(self.serve_h2(Rewind::new(Bytes::new(), io), &info));
            self.watch(&state, h2.as_mut()).await;
            self.watch_tunnels_of(&state).await;
            return;
        }
        let idle = idle::Idle {
            conn: h1::ClientConn::new(io, self.opts.max_header_bytes, Some(state)),
            h2c: !https,
            info,
            held,
        };
        self.clone().run_h1(idle, None).await;
    }

    /// Serve an HTTP/1 connection's requests while they come; between requests with nothing
    /// read, park it (`idle`) and end. `cell`: the connection's parking cell, once it has one.
    async fn run_h1(self: Arc<Self>, mut idle: idle::Idle, mut cell: Option<Arc<idle::Parked>>) {
        loop {
            let idle::Idle {
                conn,
                info,
                h2c,
                held,
            } = idle;
            let state = &info.state;
            let ended = {
                let serving = std::pin::pin!(async {
                    match conn
                        .serve(&self.proxy, &info, state, &self.drain, h2c)
                        .await
                    {
                        Ended::H2(io) => {
                            // Boxed: an HTTP/2 connection's state is large, and most connections
                            // are HTTP/1.
                            Box::pin(self.serve_h2(io, &info)).await;
                            Ended::Closed
                        }
                        ended => ended,
                    }
                });
                self.watch(state, serving).await
            };
            match ended {
                Some(Ended::Idle { conn, h2c }) => {
                    let mut waiting = idle::Idle {
                        conn,
                        info,
                        h2c,
                        held,
                    };
                    // A busy connection's next request is often one turn of the event loop
                    // away: look again after that turn before parking (a new task per request
                    // costs more than the look).
                    idle = match idle::look_twice(&mut waiting.conn).await {
                        Poll::Ready(Ok(n)) if n > 0 => waiting,
                        Poll::Ready(_) => return,
                        Poll::Pending => match idle::park(&self, waiting, &mut cell) {
                            Some(woken) => woken,
                            None => return,
                        },
                    };
                }
                Some(_) => {
                    // A tunnel counts as its connection (`held`) until it ends.
                    self.watch_tunnels_of(state).await;
                    drop(held);
                    return;
                }
                None => return,
            }
        }
    }

    /// Run `conn` under the connection's watchdog: `None` when the watchdog closed it (idle
    /// for `proxy.client_idle_timeout`, a stalled request body, bytes but no request).
    /// `conn` is pinned where it lives (the caller's state): taken by value, it would be held
    /// twice in this future, and copied at each request's start.
    async fn watch<F: std::future::Future>(
        &self,
        state: &ConnState,
        mut conn: Pin<&mut F>,
    ) -> Option<F::Output> {
        let load = |s: &ConnState| {
            (
                s.reads.load(Ordering::Relaxed),
                s.writes.load(Ordering::Relaxed),
                s.requests.load(Ordering::Relaxed),
            )
        };
        let mut seen = load(state);
        // On the worker's wheel, not a tokio timer: a keep-alive connection gets a task (and
        // this watch) for every request.
        let mut period = Deadline::at(Instant::now() + self.client_idle());
        loop {
            tokio::select! {
                biased;
                ended = conn.as_mut() => return Some(ended),
                _ = &mut period => {
                    let now = load(state);
                    if now.0 == seen.0 && state.body_pending.load(Ordering::Relaxed) {
                        // A request body stalled: nothing came from the client for a whole
                        // period (nginx's client_body_timeout). The exchange ends with the
                        // connection; its backend connection is closed, not reused.
                        tracing::debug!("closing a connection whose request body stalled");
                        return None;
                    }
                    if state.active_requests.load(Ordering::Relaxed) == 0 {
                        let (reads, writes, requests) = (now.0 != seen.0, now.1 != seen.1, now.2 != seen.2);
                        if !reads && !writes {
                            tracing::debug!("closing idle client connection");
                            return None;
                        }
                        if reads && !writes && !requests {
                            tracing::debug!("closing a connection that sent bytes but no request");
                            return None;
                        }
                    }
                    seen = now;
                    period = Deadline::at(Instant::now() + self.client_idle());
                }
            }
        }
    }

    /// An upgraded connection lives on as its tunnel: it still counts against
    /// max_connections and in shoal_client_connections, and it closes when idle. A drain
    /// waits for it up to the grace; then the worker stops and the tunnel with it.
    async fn watch_tunnels_of(&self, state: &ConnState) {
        if let Some(tunnels) = state.tunnels.get() {
            tunnels.tracker.close();
            if !tunnels.tracker.is_empty() {
                // Boxed: no connection but an upgraded one needs this state.
                Box::pin(self.watch_tunnels(tunnels, state)).await;
            }
        }
    }

    /// Until the connection's tunnels end: close them when no byte moved either way for
    /// `proxy.tunnel_idle_timeout`.
    async fn watch_tunnels(&self, tunnels: &Tunnels, state: &ConnState) {
        let load = |s: &ConnState| {
            (
                s.reads.load(Ordering::Relaxed),
                s.writes.load(Ordering::Relaxed),
            )
        };
        let mut seen = load(state);
        loop {
            tokio::select! {
                _ = tunnels.tracker.wait() => return,
                _ = tokio::time::sleep(self.tunnel_idle()) => {
                    let now = load(state);
                    if now == seen {
                        tracing::debug!("closing an idle tunnel");
                        tunnels.close.cancel();
                        tunnels.tracker.wait().await;
                        return;
                    }
                    seen = now;
                }
            }
        }
    }

    /// HTTP/2 (ALPN h2, or prior knowledge) through hyper's server; a drain sends GOAWAY and
    /// lets the streams in flight finish.
    async fn serve_h2(&self, io: Rewind, info: &ConnInfo) {
        // What every stream needs, behind one reference count (a clone per stream).
        let conn = Arc::new((self.proxy.clone(), info.clone()));
        let service = service_fn(move |req: Request<Incoming>| {
            let conn = conn.clone();
            async move {
                let (proxy, info) = &*conn;
                let state = &info.state;
                state.requests.fetch_add(1, Ordering::Relaxed);
                state.active_requests.fetch_add(1, Ordering::Relaxed);
                // Made in its box, not on the stack and then copied in.
                let handled = Box::write(
                    Box::new_uninit(),
                    proxy.handle(req.map(ClientBody::H2), None, info),
                );
                let resp = Box::into_pin(handled).await;
                state.active_requests.fetch_sub(1, Ordering::Relaxed);
                Ok::<_, Infallible>(resp)
            }
        });
        let conn = self.h2.serve_connection(TokioIo::new(io), service);
        tokio::pin!(conn);
        let res = tokio::select! {
            res = conn.as_mut() => res,
            _ = self.drain.cancelled() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(e) = res {
            tracing::debug!(error = %e, "HTTP/2 client connection ended with an error");
        }
    }

    /// Stop accepting, ask every connection to finish, and wait up to `grace` for them; then
    /// stop the workers. Returns the number of connections still open when the grace ran out.
    pub async fn drain(&self, grace: Duration) -> usize {
        self.drain.cancel();
        self.tracker.close();
        let left = match tokio::time::timeout(grace, self.tracker.wait()).await {
            Ok(()) => 0,
            Err(_) => self.tracker.len(),
        };
        self.done.cancel();
        left
    }
}

/// A client socket boxed behind the watch of its connection's state (reads and writes seen).
fn watched<I>(io: I) -> (BoxIo, Arc<ConnState>)
where
    I: crate::net::Transport + Send + 'static,
{
    let state = Arc::new(ConnState::default());
    (Box::new(WatchedIo::new(io, state.clone())), state)
}

/// Keeps a worker's tokio timer wheel from ever being empty. tokio wakes its own driver through
/// the eventfd (a write(2)) whenever a new timer is due before the driver's next planned
/// wake-up, and with no timer there is none: the deadline ticker (`deadline.rs`), planning for
/// a deadline seconds away, and a new backend connection's connect timeout, would cost that
/// system call each time. A sleeper a second ahead is always sooner.
async fn timer_floor() {
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}
