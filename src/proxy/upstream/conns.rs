//! Keep-alive connections to one backend, one idle list per data-plane worker, so a connection
//! is only ever used by the thread whose runtime drives it. An HTTP/2 backend has one shared
//! connection per worker instead: every request of the worker is a stream on it.

use std::io;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::h1;
use crate::net::Target;
use crate::proxy::body::RequestBody;
use crate::sync::MutexExt;

/// Idle connections kept per backend and worker.
const MAX_IDLE: usize = 256;
/// Idle connections older than this are not reused (backends commonly close at 60-75 s).
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// A handle on a shared HTTP/2 connection (its driver runs as a task of the worker).
pub type Sender = crate::net::Sender<RequestBody>;

/// A connection checked out for one request: an HTTP/1.1 one of its own (driven by the
/// request's task), or a handle on the worker's shared HTTP/2 connection.
pub enum BackendConn {
    /// Boxed: it moves from the idle list through the request and back as one pointer.
    H1(Box<h1::H1Conn>),
    H2(Sender),
}

struct Idle {
    conn: Box<h1::H1Conn>,
    since: Instant,
}

/// One worker's connections to the backend.
#[derive(Default)]
struct Slot {
    idle: Vec<Idle>,
    shared: Option<Sender>,
}

/// Idle connections of one backend, by worker (slot 0: off the data plane).
pub struct ConnPool {
    slots: Box<[Mutex<Slot>]>,
    /// HTTP/2: held while a worker dials its shared connection, so requests arriving meanwhile
    /// wait for it instead of each dialing their own.
    dialing: Box<[tokio::sync::Mutex<()>]>,
}

impl ConnPool {
    pub fn new(workers: usize) -> Self {
        Self {
            slots: (0..=workers).map(|_| Mutex::default()).collect(),
            dialing: (0..=workers).map(|_| tokio::sync::Mutex::new(())).collect(),
        }
    }

    fn slot(&self, worker: usize) -> std::sync::MutexGuard<'_, Slot> {
        self.slots[worker % self.slots.len()].locked()
    }

    /// An open connection for `worker` that needs no dial (`now`: the caller's clock reading):
    /// a parked HTTP/1.1 one, or the worker's HTTP/2 one.
    pub fn pooled(&self, worker: usize, target: &Target, now: Instant) -> Option<BackendConn> {
        if target.is_h2() {
            return self.open_shared(worker);
        }
        let mut slot = self.slot(worker);
        while let Some(mut idle) = slot.idle.pop() {
            // Anything that arrived on a parked connection (the backend closing it, mostly)
            // makes it unusable; checking costs no system call while nothing did.
            if now.saturating_duration_since(idle.since) <= IDLE_TIMEOUT && idle.conn.is_open() {
                return Some(BackendConn::H1(idle.conn));
            }
        }
        None
    }

    /// A new connection for `worker` (HTTP/2: the worker's shared one, unless one opened
    /// meanwhile).
    pub async fn connect(
        &self,
        worker: usize,
        target: &Target,
        connect_timeout: Duration,
    ) -> io::Result<BackendConn> {
        // The slow paths (a handshake, a dial) are boxed: inline, their futures would make
        // every request's forwarding future several KiB larger, and it is moved as it starts.
        if target.is_h2() {
            return Box::pin(self.shared(worker, target, connect_timeout)).await;
        }
        let io = Box::pin(timed(connect_timeout, target.dial())).await?;
        Ok(BackendConn::H1(Box::new(h1::H1Conn::new(io))))
    }

    /// The worker's HTTP/2 connection, if it has one open.
    fn open_shared(&self, worker: usize) -> Option<BackendConn> {
        let mut slot = self.slot(worker);
        slot.shared = slot.shared.take().filter(|s| !s.is_closed());
        slot.shared
            .as_ref()
            .and_then(|s| s.share())
            .map(BackendConn::H2)
    }

    /// The worker's HTTP/2 connection to the backend, made when there is none open.
    async fn shared(
        &self,
        worker: usize,
        target: &Target,
        connect_timeout: Duration,
    ) -> io::Result<BackendConn> {
        if let Some(s) = self.open_shared(worker) {
            return Ok(s);
        }
        let _dialing = self.dialing[worker % self.dialing.len()].lock().await;
        if let Some(s) = self.open_shared(worker) {
            return Ok(s);
        }
        let sender = timed(connect_timeout, target.connect()).await?;
        self.slot(worker).shared = sender.share();
        Ok(BackendConn::H2(sender))
    }

    /// Park an HTTP/1.1 connection whose exchange completed.
    pub fn checkin(&self, worker: usize, mut conn: Box<h1::H1Conn>) {
        conn.shrink();
        // Also starts watching it: a socket on an io_uring has its receive queued from here,
        // so a close while parked is known by checkout (an epoll one asks the socket then).
        if !conn.is_open() {
            return;
        }
        let mut slot = self.slot(worker);
        if slot.idle.len() < MAX_IDLE {
            slot.idle.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }
}

async fn timed<T>(
    limit: Duration,
    connecting: impl std::future::Future<Output = io::Result<T>>,
) -> io::Result<T> {
    match tokio::time::timeout(limit, connecting).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
    }
}
