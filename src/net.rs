//! Sockets every shell shares: accepting with backoff, and dialing a backend (TCP, optional TLS,
//! HTTP/1.1 handshake). A leaf: it knows nothing of pools, routing or peers.

use std::error::Error as StdError;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// How long to wait after a failed `accept` (EMFILE and friends) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// The next connection on `listener`. A failed accept is logged and retried after a short
/// backoff instead of spinning; `what` names the listener in the log.
pub async fn accept(listener: &TcpListener, what: &'static str) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(a) => return a,
            Err(e) => {
                tracing::warn!(listener = what, error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
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
}

impl Target {
    /// A target from a pool address: `host:port`, or `https://host:port` (needs `tls`).
    pub fn parse(addr: &str, tls: Option<&TlsConnector>) -> Result<Target, TargetError> {
        let Some(rest) = addr.strip_prefix("https://") else {
            return Ok(Target {
                authority: addr.to_string(),
                tls: None,
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
        })
    }

    /// A target that can never connect (an address that could not be parsed).
    pub fn unreachable() -> Target {
        Target {
            authority: String::new(),
            tls: None,
        }
    }

    /// `host:port`, as a Host header for requests that arrived without one.
    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// A new HTTP/1.1 connection; its driver runs as a task on the calling runtime.
    pub async fn connect<B>(&self) -> io::Result<http1::SendRequest<B>>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn StdError + Send + Sync>>,
    {
        let tcp = TcpStream::connect(&self.authority).await?;
        tcp.set_nodelay(true)?;
        let io = match &self.tls {
            None => BackendIo::Plain(tcp),
            Some((connector, name)) => {
                BackendIo::Tls(Box::new(connector.connect(name.clone(), tcp).await?))
            }
        };
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(io::Error::other)?;
        let authority = self.authority.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(backend = %authority, error = %e, "backend connection ended");
            }
        });
        Ok(sender)
    }
}

/// A backend connection: plain TCP or TLS.
enum BackendIo {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for BackendIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
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
            BackendIo::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            BackendIo::Plain(s) => s.is_write_vectored(),
            BackendIo::Tls(s) => s.is_write_vectored(),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendIo::Plain(s) => Pin::new(s).poll_flush(cx),
            BackendIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            BackendIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
