//! Client connections between requests, held without a task.
//!
//! A keep-alive connection spends most of its life waiting for its next request. A task waiting
//! for it would keep its serving future (over a kilobyte, in a 128-byte-aligned tokio cell) for
//! each of them; here a connection with nothing read parks instead: its state moves into a
//! [`Parked`] cell whose waker is handed to the socket's read, and the task ends. The read's
//! completion (the ring's or epoll's) wakes the cell, which spawns a task to serve what came, on
//! the same worker. An idle connection then costs its socket's state and this cell: 0.86 KiB in
//! all, measured over 9,900 connections (2.08 KiB with a task each).
//!
//! Parked connections have no timer each: one sweeper per worker closes those idle for
//! `proxy.client_idle_timeout`, and all of them at once when the drain starts (a drain closes
//! connections between requests at once).

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use tokio::sync::OwnedSemaphorePermit;

use super::h1::ClientConn;
use super::Server;
use crate::proxy::forward::ConnInfo;
use crate::sync::MutexExt;

/// What a connection counts against while it is open: `max_connections` and the
/// `shoal_client_connections` gauge, given back when it closes, task or none.
pub(super) struct Held {
    _permit: OwnedSemaphorePermit,
    gauge: metrics::Gauge,
}

impl Held {
    pub(super) fn new(permit: OwnedSemaphorePermit, gauge: metrics::Gauge) -> Self {
        gauge.increment(1.0);
        Self {
            _permit: permit,
            gauge,
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.gauge.decrement(1.0);
    }
}

/// An HTTP/1 connection between requests: all its serving needs, task or none.
pub(super) struct Idle {
    pub conn: ClientConn,
    pub info: ConnInfo,
    /// No byte has come yet on a plain connection: the HTTP/2 preface may still.
    pub h2c: bool,
    pub held: Held,
}

/// A connection's cell while it has no task; the connection keeps one across its requests.
pub(super) struct Parked {
    /// The connection while it waits, and since when: the sweeper closes it
    /// `proxy.client_idle_timeout` later.
    idle: Mutex<Option<(Idle, Instant)>>,
    /// Set by every wake: a wake that came while the connection was being parked is not lost.
    woken: AtomicBool,
    /// The server the connection is served by, and the worker's runtime, where its woken task
    /// runs.
    server: Arc<Server>,
    runtime: tokio::runtime::Handle,
}

thread_local! {
    /// This worker's parked connections, for its sweeper (a connection parks on the worker
    /// that accepted it and stays there).
    static PARKED: RefCell<Vec<Weak<Parked>>> = const { RefCell::new(Vec::new()) };
}

/// Read a connection between requests now and, if nothing came, once more after one turn of
/// the event loop (its reads and completions): what came, or `Pending` to park.
pub(super) async fn look_twice(conn: &mut ClientConn) -> Poll<std::io::Result<usize>> {
    let polled = std::future::poll_fn(|cx| Poll::Ready(conn.poll_idle(cx))).await;
    if polled.is_ready() {
        return polled;
    }
    tokio::task::yield_now().await;
    std::future::poll_fn(|cx| Poll::Ready(conn.poll_idle(cx))).await
}

/// Wait for `idle`'s next bytes without a task. `Some`: bytes came (or a wake did) while it was
/// being parked, so serve on in this task; `None`: parked, or closed (the client closed, or the
/// drain started). `slot` keeps the connection's cell from one request to the next.
pub(super) fn park(
    server: &Arc<Server>,
    mut idle: Idle,
    slot: &mut Option<Arc<Parked>>,
) -> Option<Idle> {
    // A parked connection keeps no send buffer (nor a connection whose answer failed to go).
    if server.drain.is_cancelled() || idle.conn.let_go().is_err() {
        return None;
    }
    let cell = slot
        .get_or_insert_with(|| {
            let cell = Arc::new(Parked {
                idle: Mutex::new(None),
                woken: AtomicBool::new(false),
                server: server.clone(),
                runtime: tokio::runtime::Handle::current(),
            });
            PARKED.with(|p| p.borrow_mut().push(Arc::downgrade(&cell)));
            cell
        })
        .clone();
    cell.woken.store(false, Ordering::SeqCst);
    let waker = Waker::from(cell.clone());
    match idle.conn.poll_idle(&mut Context::from_waker(&waker)) {
        Poll::Ready(Ok(0) | Err(_)) => return None,
        Poll::Ready(Ok(_)) => return Some(idle),
        Poll::Pending => {}
    }
    *cell.idle.locked() = Some((idle, Instant::now()));
    if cell.woken.swap(false, Ordering::SeqCst) {
        // Woken before the cell held the connection: serve on here (if the wake did not).
        return cell.idle.locked().take().map(|(idle, _)| idle);
    }
    None
}

impl Wake for Parked {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::SeqCst);
        let Some((idle, _)) = self.idle.locked().take() else {
            return;
        };
        let server = &self.server;
        let serving = server
            .tracker
            .track_future(server.clone().run_h1(idle, Some(self.clone())));
        self.runtime.spawn(serving);
    }
}

/// One worker's sweeper: closes its parked connections idle for `proxy.client_idle_timeout`,
/// and all of them when the drain starts.
pub(super) async fn sweep(server: Arc<Server>) {
    loop {
        let idle_for = server.client_idle();
        let tick = (idle_for / 8).clamp(Duration::from_millis(10), Duration::from_secs(1));
        let drained = tokio::select! {
            _ = server.drain.cancelled() => true,
            _ = tokio::time::sleep(tick) => false,
        };
        let now = Instant::now();
        let closing = take_parked(|since| drained || now.duration_since(since) >= idle_for);
        if !closing.is_empty() {
            tracing::debug!(
                connections = closing.len(),
                drained,
                "closing idle client connections"
            );
        }
        drop(closing);
        if drained {
            return;
        }
    }
}

/// The parked connections of this worker that `close` picks by when they parked, out of their
/// cells; forgets the cells of closed connections.
fn take_parked(close: impl Fn(Instant) -> bool) -> Vec<Idle> {
    let mut closing = Vec::new();
    PARKED.with(|p| {
        p.borrow_mut().retain(|w| {
            let Some(cell) = w.upgrade() else {
                return false;
            };
            let mut idle = cell.idle.locked();
            if idle.as_ref().is_some_and(|(_, since)| close(*since)) {
                closing.extend(idle.take().map(|(idle, _)| idle));
            }
            true
        })
    });
    closing
}
