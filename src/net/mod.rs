//! Sockets every shell shares: accepting with backoff, and dialing a backend (TCP, optional TLS,
//! an HTTP/1.1 or HTTP/2 handshake). A leaf: it knows nothing of pools, routing or peers.
//! `tls` loads certificates into rustls configs; `uring` drives plain TCP through io_uring.

pub mod tls;
pub mod uring;

use std::error::Error as StdError;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::{Authority, Scheme};
use http::{Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2, TrySendError};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// The header naming the peer that sends a health probe (`X-Shoal-Peer: ID`).
pub const PEER_HEADER: &str = "x-shoal-peer";

/// How long to wait after a failed `accept` (EMFILE and friends) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// The next connection on `listener`. A failed accept is logged and retried after a short
/// backoff instead of spinning; `what` names the listener in the log.
pub async fn accept(listener: &TcpListener, what: &'static str) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(a) => return a,
            Err(e) => after_failed_accept(&e, what).await,
        }
    }
}

/// Whether a failed accept calls for a pause before the next: not when the connection went
/// away while it waited in the queue (ECONNABORTED; the next one may be there already), else
/// yes (out of descriptors or memory, say: retrying at once would spin).
fn pause_after(e: &io::Error) -> bool {
    e.raw_os_error() != Some(libc::ECONNABORTED)
}

/// After a failed accept on listener `what`: log and pause (`ACCEPT_BACKOFF`) where
/// `pause_after` says so.
async fn after_failed_accept(e: &io::Error, what: &'static str) {
    if pause_after(e) {
        tracing::warn!(listener = what, error = %e, "accept failed");
        tokio::time::sleep(ACCEPT_BACKOFF).await;
    }
}

/// A client connection's byte stream (a TCP socket, or TLS over one; a test's pipe), which can be
/// told that the connection closes after what is written next.
pub trait Transport: AsyncRead + AsyncWrite + Unpin {
    /// The connection closes after what is written next: hold back partial segments until the
    /// write side closes (best effort), so that the last bytes and the FIN leave in one segment,
    /// not two.
    fn hold_for_close(&mut self) {}

    /// The connection waits for its next exchange: let go of what a write that completed still
    /// holds (a flush waits for no send on the ring, so its buffer outlives it), and report a
    /// write that failed.
    fn let_go(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Transport for TcpStream {
    fn hold_for_close(&mut self) {
        // TCP_CORK: the shutdown's FIN rides on the held segment and pushes it.
        let _ = socket2::SockRef::from(&*self).set_tcp_cork(true);
    }
}

#[cfg(test)]
impl Transport for tokio::io::DuplexStream {}

/// A listening socket whose connections the runtime does not register: one that goes to the
/// worker's ring is accepted blocking and never enters epoll (a registration, its removal and a
/// mode change saved per connection).
pub struct Accepting(tokio::io::unix::AsyncFd<std::net::TcpListener>);

impl Accepting {
    /// Watch `listener` (non-blocking) on this thread's runtime.
    pub fn new(listener: std::net::TcpListener) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        // SAFETY: the listener owns its descriptor, open for as long as the AsyncFd holds it.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(
                listener,
                tokio::io::Interest::READABLE,
            )
        };
        Ok(Self(fd?))
    }

    /// The next connection: a blocking socket with `blocking` (for the ring), else one ready
    /// for tokio. Failures (out of descriptors, say) are logged and retried after a pause.
    pub async fn accept(&self, blocking: bool) -> (std::net::TcpStream, SocketAddr) {
        let flags = if blocking {
            libc::SOCK_CLOEXEC
        } else {
            libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK
        };
        loop {
            let got = match self.0.readable().await {
                Ok(mut ready) => {
                    match ready.try_io(|l| socket2::SockRef::from(l.get_ref()).accept4(flags)) {
                        Ok(got) => got,
                        // Nothing there after all: readiness is cleared, wait again.
                        Err(_would_block) => continue,
                    }
                }
                Err(e) => Err(e),
            };
            let got = got.and_then(|(s, addr)| {
                let addr = addr
                    .as_socket()
                    .ok_or_else(|| io::Error::other("a connection from no IP address"))?;
                Ok((std::net::TcpStream::from(s), addr))
            });
            match got {
                Ok(a) => return a,
                Err(e) => after_failed_accept(&e, "proxy").await,
            }
        }
    }
}

/// Why a backend address cannot be dialed.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("upstream TLS is not available on this machine")]
    NoTls,
    #[error("bad TLS server name {0:?}")]
    BadServerName(String),
}

/// Where a backend is and how to reach it.
#[derive(Clone)]
pub struct Target {
    /// `host:port` for `TcpStream::connect` (an IP literal skips DNS).
    authority: String,
    /// Some when the backend speaks TLS (`https://host:port`).
    tls: Option<(TlsConnector, ServerName<'static>)>,
    /// Speak HTTP/2 (prior knowledge over TCP, or what ALPN chose over TLS).
    h2: bool,
}

impl Target {
    /// A target from a pool address: `host:port`, or `https://host:port` (needs `tls`, whose
    /// ALPN list should offer what `h2` asks for), spoken to with HTTP/2 when `h2`.
    pub fn parse(addr: &str, tls: Option<&TlsConnector>, h2: bool) -> Result<Target, TargetError> {
        let Some(rest) = addr.strip_prefix("https://") else {
            return Ok(Target {
                authority: addr.to_string(),
                tls: None,
                h2,
            });
        };
        let connector = tls.ok_or(TargetError::NoTls)?.clone();
        let host = rest
            .rsplit_once(':')
            .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
            .unwrap_or(rest);
        let name = ServerName::try_from(host.to_string())
            .map_err(|_| TargetError::BadServerName(host.to_string()))?;
        Ok(Target {
            authority: rest.to_string(),
            tls: Some((connector, name)),
            h2,
        })
    }

    /// A target that can never connect (an address that could not be parsed).
    pub fn unreachable() -> Target {
        Target {
            authority: String::new(),
            tls: None,
            h2: false,
        }
    }

    /// Whether connections to it are HTTP/2 (shared by many requests at once).
    pub fn is_h2(&self) -> bool {
        self.h2
    }

    /// `host:port`, as a Host header for requests that arrived without one.
    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// A new connection's stream: TCP, with TLS on top for an `https://` target.
    pub async fn dial(&self) -> io::Result<BackendIo> {
        let tcp = TcpStream::connect(&self.authority).await?;
        tcp.set_nodelay(true)?;
        Ok(match &self.tls {
            None if crate::net::uring::enabled() => {
                BackendIo::Uring(crate::net::uring::UringStream::from_tokio(tcp)?)
            }
            None => BackendIo::Plain(tcp),
            Some((connector, name)) => {
                BackendIo::Tls(Box::new(connector.connect(name.clone(), tcp).await?))
            }
        })
    }

    /// A new connection (HTTP/1.1, or HTTP/2 for an h2 target); its driver runs as a task on
    /// the calling runtime.
    pub async fn connect<B>(&self) -> io::Result<Sender<B>>
    where
        B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<Box<dyn StdError + Send + Sync>>,
    {
        let io = self.dial().await?;
        let authority = self.authority.clone();
        if self.h2 {
            let default_authority = Authority::try_from(self.authority.as_str())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            let (send, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(hyper_util::rt::TokioTimer::new())
                .handshake(TokioIo::new(io))
                .await
                .map_err(io::Error::other)?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(backend = %authority, error = %e, "backend connection ended");
                }
            });
            let scheme = if self.tls.is_some() {
                Scheme::HTTPS
            } else {
                Scheme::HTTP
            };
            return Ok(Sender::H2 {
                send,
                scheme,
                authority: default_authority,
            });
        }
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(io::Error::other)?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(backend = %authority, error = %e, "backend connection ended");
            }
        });
        Ok(Sender::H1(sender))
    }
}

/// A backend connection ready for requests: HTTP/1.1 (one exchange at a time) or HTTP/2 (a
/// cheap clone per request, all multiplexed on one connection).
pub enum Sender<B> {
    H1(http1::SendRequest<B>),
    H2 {
        send: http2::SendRequest<B>,
        /// `:scheme` of every request (https over TLS).
        scheme: Scheme,
        /// `:authority` for requests that carry no Host.
        authority: Authority,
    },
}

impl<B> Sender<B> {
    /// Another handle on the same connection, for an HTTP/2 one (None for HTTP/1, which
    /// carries one exchange at a time).
    pub fn share(&self) -> Option<Self> {
        match self {
            Sender::H1(_) => None,
            Sender::H2 {
                send,
                scheme,
                authority,
            } => Some(Sender::H2 {
                send: send.clone(),
                scheme: scheme.clone(),
                authority: authority.clone(),
            }),
        }
    }
}

impl<B> Sender<B>
where
    B: http_body::Body + Send + 'static,
{
    /// Whether the connection is HTTP/2 (shared, not checked out one request at a time).
    pub fn is_shared(&self) -> bool {
        matches!(self, Sender::H2 { .. })
    }

    pub fn is_closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_closed(),
            Sender::H2 { send, .. } => send.is_closed(),
        }
    }

    /// Wait until the connection can take a request (an HTTP/1 one whose previous response is
    /// still finishing); fails once it has closed.
    pub async fn ready(&mut self) -> hyper::Result<()> {
        match self {
            Sender::H1(s) => s.ready().await,
            Sender::H2 { send, .. } => send.ready().await,
        }
    }

    /// Send `req`; a request that was never written comes back in the error. For HTTP/2 the
    /// request is put in HTTP/2 form first (`:scheme` and `:authority` from the Host field, no
    /// connection-specific fields).
    pub async fn try_send_request(
        &mut self,
        req: Request<B>,
    ) -> Result<Response<Incoming>, TrySendError<Request<B>>> {
        match self {
            Sender::H1(s) => s.try_send_request(req).await,
            Sender::H2 {
                send,
                scheme,
                authority,
            } => send.try_send_request(h2_form(req, scheme, authority)).await,
        }
    }
}

/// Fields that are connection-specific in HTTP/1 and forbidden in HTTP/2 (RFC 9113 §8.2.2).
const NOT_IN_H2: [&str; 5] = [
    "connection",
    "proxy-connection",
    "keep-alive",
    "transfer-encoding",
    "upgrade",
];

/// An HTTP/1-shaped request in the form an HTTP/2 connection sends: absolute target (so
/// `:scheme` and `:authority` are set, the latter from Host), no Host field, no
/// connection-specific fields, TE only as "trailers".
fn h2_form<B>(mut req: Request<B>, scheme: &Scheme, default: &Authority) -> Request<B> {
    let headers = req.headers_mut();
    let authority = headers
        .remove(header::HOST)
        .and_then(|h| Authority::try_from(h.as_bytes()).ok())
        .unwrap_or_else(|| default.clone());
    for name in NOT_IN_H2 {
        headers.remove(name);
    }
    if headers
        .get(header::TE)
        .is_some_and(|te| te != HeaderValue::from_static("trailers"))
    {
        headers.remove(header::TE);
    }
    let mut parts = std::mem::take(req.uri_mut()).into_parts();
    parts.scheme = Some(scheme.clone());
    parts.authority = Some(authority);
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    if let Ok(uri) = Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
    *req.version_mut() = Version::HTTP_2;
    req
}

/// A backend connection: plain TCP or TLS.
pub enum BackendIo {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    Uring(crate::net::uring::UringStream),
}

impl BackendIo {
    /// Between exchanges: see `Transport::let_go`.
    pub fn let_go(&mut self) -> io::Result<()> {
        match self {
            BackendIo::Uring(s) => Transport::let_go(s),
            BackendIo::Plain(_) | BackendIo::Tls(_) => Ok(()),
        }
    }
}

impl AsyncRead for BackendIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            BackendIo::Uring(s) => Pin::new(s).poll_read(cx, buf),
            BackendIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for BackendIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            BackendIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            BackendIo::Uring(s) => Pin::new(s).poll_write(cx, buf),
            BackendIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            BackendIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            BackendIo::Uring(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            BackendIo::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            BackendIo::Plain(s) => s.is_write_vectored(),
            BackendIo::Uring(s) => s.is_write_vectored(),
            BackendIo::Tls(s) => s.is_write_vectored(),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendIo::Plain(s) => Pin::new(s).poll_flush(cx),
            BackendIo::Uring(s) => Pin::new(s).poll_flush(cx),
            BackendIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            BackendIo::Uring(s) => Pin::new(s).poll_shutdown(cx),
            BackendIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use tokio::io::AsyncWriteExt;

    /// Every listener (proxy, admin, cluster) skips a connection that went away in the queue at
    /// once, and pauses after any other failure (out of descriptors, say) rather than spin.
    #[test]
    fn failed_accepts_pause_unless_the_connection_went_away() {
        for (errno, pause) in [
            (libc::ECONNABORTED, false),
            (libc::EMFILE, true),
            (libc::ENFILE, true),
            (libc::ENOBUFS, true),
            (libc::ENOMEM, true),
        ] {
            let e = io::Error::from_raw_os_error(errno);
            assert_eq!(pause_after(&e), pause, "{e}");
        }
        assert!(pause_after(&io::Error::other(
            "a connection from no IP address"
        )));
    }

    /// Over epoll too, a closing answer's last bytes wait for the FIN (TCP_CORK): nothing
    /// reaches the peer before the shutdown, all of it and the end after.
    #[tokio::test]
    async fn held_bytes_leave_with_the_shutdown() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut s = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        s.set_nodelay(true).unwrap();
        let (mut peer, _) = l.accept().unwrap();
        s.hold_for_close();
        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .await
            .unwrap();
        // Under the cork's own 200 ms limit.
        tokio::time::sleep(Duration::from_millis(50)).await;
        peer.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 256];
        let early = peer.read(&mut buf);
        assert!(
            matches!(&early, Err(e) if e.kind() == io::ErrorKind::WouldBlock),
            "bytes left before the shutdown: {early:?}"
        );
        s.shutdown().await.unwrap();
        peer.set_nonblocking(false).unwrap();
        let mut got = Vec::new();
        peer.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
    }
}
