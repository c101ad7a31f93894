//! The client connection's byte stream, counted: reads, writes and requests for the idle
//! timeout. (Request framing is checked where heads are parsed, in `server::h1`.)

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The tunnels of one client connection.
#[derive(Clone, Debug, Default)]
pub struct Tunnels {
    pub tracker: tokio_util::task::TaskTracker,
    pub close: tokio_util::sync::CancellationToken,
}

/// Shared between the connection's I/O and its service.
#[derive(Default, Debug)]
pub struct ConnState {
    /// Reads and writes that moved bytes; the watchdog compares them between ticks.
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    /// Requests started on this connection, and those being served now.
    pub requests: AtomicU64,
    pub active_requests: AtomicU64,
    /// A request body is being read and has not ended (HTTP/1): a client that sends nothing
    /// for `proxy.client_idle_timeout` then is cut off, whatever its backend does.
    pub body_pending: AtomicBool,
    /// Set when a 101 went out: the bytes that follow are the tunnel's, not HTTP/1.
    pub upgraded: AtomicBool,
    /// The connection's tunnels, made by the first upgrade (most connections have none).
    pub tunnels: std::sync::OnceLock<Tunnels>,
}

pin_project_lite::pin_project! {
    pub struct WatchedIo<T> {
        #[pin]
        inner: T,
        state: Arc<ConnState>,
    }
}

impl<T> WatchedIo<T> {
    pub fn new(inner: T, state: Arc<ConnState>) -> Self {
        Self { inner, state }
    }
}

impl<T: crate::net::Transport> crate::net::Transport for WatchedIo<T> {
    fn hold_for_close(&mut self) {
        self.inner.hold_for_close();
    }

    fn let_go(&mut self) -> std::io::Result<()> {
        self.inner.let_go()
    }
}

impl<T: AsyncRead> AsyncRead for WatchedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let res = this.inner.poll_read(cx, buf);
        if buf.filled().len() > before {
            this.state.reads.fetch_add(1, Ordering::Relaxed);
        }
        res
    }
}

impl<T: AsyncWrite> AsyncWrite for WatchedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        this.state.writes.fetch_add(1, Ordering::Relaxed);
        this.inner.poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        this.state.writes.fetch_add(1, Ordering::Relaxed);
        this.inner.poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}
