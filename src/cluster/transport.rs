//! Peer transport: length-prefixed JSON frames over TCP, mutual TLS when `[cluster.tls]` is set.
//!
//! Each peer dials every other peer once and sends on that connection; it receives on its
//! listener. A connection starts with a `Hello` naming the sender; with TLS, the sender's client
//! certificate must chain to the cluster CA and name the claimed id as a DNS SAN, and the id must
//! be one of the configured peers. Every later frame must carry the same sender, or it is dropped
//! and counted. Sending never blocks the caller: a full queue drops the message (Paxos and
//! heartbeats tolerate loss).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;

use crate::config::{ClusterTls, PeerConfig};
use crate::core::paxos::Msg;
use crate::core::pool::NodeId;
use crate::telemetry as names;

/// What peers say to each other.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Body {
    Hello,
    Heartbeat,
    Paxos { msg: Msg },
}

#[derive(Debug, Serialize, Deserialize)]
struct Frame {
    from: NodeId,
    body: Body,
}

/// A message from an authenticated peer.
#[derive(Debug)]
pub struct Inbound {
    pub from: NodeId,
    pub body: Body,
}

const MAX_FRAME: usize = 16 * 1024 * 1024;
const QUEUE: usize = 4096;
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// TLS material for both directions.
#[derive(Clone)]
pub struct PeerTls {
    acceptor: TlsAcceptor,
    connector: TlsConnector,
}

impl PeerTls {
    pub fn load(t: &ClusterTls) -> Result<Self, String> {
        let provider = crate::tls::provider();
        let mut roots = rustls::RootCertStore::empty();
        for c in crate::tls::load_certs(&t.ca)? {
            roots
                .add(c)
                .map_err(|e| format!("cluster.tls.ca: unusable CA certificate: {e}"))?;
        }
        let roots = Arc::new(roots);
        let certs = crate::tls::load_certs(&t.cert)?;
        let key = crate::tls::load_key(&t.key)?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .build()
        .map_err(|e| format!("cluster.tls.ca: {e}"))?;
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs.clone(), key.clone_key())
            .map_err(|e| format!("cluster.tls.cert/key: {e}"))?;
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .map_err(|e| format!("cluster.tls.cert/key: {e}"))?;
        Ok(Self {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            connector: TlsConnector::from(Arc::new(client)),
        })
    }
}

/// Outbound queues to every peer.
#[derive(Clone)]
pub struct Transport {
    me: NodeId,
    links: Arc<HashMap<NodeId, mpsc::Sender<Body>>>,
}

impl Transport {
    /// Start the listener and one outbound link per peer. Inbound messages go to `inbox`.
    pub fn start(
        me: NodeId,
        listener: TcpListener,
        peers: &[PeerConfig],
        tls: Option<PeerTls>,
        inbox: mpsc::Sender<Inbound>,
        shutdown: CancellationToken,
    ) -> Transport {
        let known: Arc<Vec<NodeId>> = Arc::new(peers.iter().map(|p| p.id.clone()).collect());
        tokio::spawn(accept_loop(
            listener,
            known,
            tls.clone(),
            inbox,
            shutdown.clone(),
        ));
        let mut links = HashMap::new();
        for p in peers {
            let (tx, rx) = mpsc::channel(QUEUE);
            links.insert(p.id.clone(), tx);
            tokio::spawn(link(
                me.clone(),
                p.clone(),
                tls.clone(),
                rx,
                shutdown.clone(),
            ));
        }
        Transport {
            me,
            links: Arc::new(links),
        }
    }

    pub fn send(&self, to: &NodeId, body: Body) {
        if let Some(tx) = self.links.get(to) {
            // Full queue or closed link: drop; the protocol retries what matters.
            let _ = tx.try_send(body);
        }
    }

    pub fn me(&self) -> &NodeId {
        &self.me
    }
}

async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &Frame) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(frame).map_err(std::io::Error::other)?;
    let mut buf = Vec::with_capacity(bytes.len() + 4);
    buf.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    buf.extend_from_slice(&bytes);
    w.write_all(&buf).await?;
    w.flush().await
}

async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Frame> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "frame too large",
        ));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    serde_json::from_slice(&buf)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Keep a connection to `peer` and send what is queued for it.
async fn link(
    me: NodeId,
    peer: PeerConfig,
    tls: Option<PeerTls>,
    mut rx: mpsc::Receiver<Body>,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(50);
    let mut logged_down = false;
    loop {
        let conn = tokio::select! {
            _ = shutdown.cancelled() => return,
            c = connect(&me, &peer, tls.as_ref()) => c,
        };
        let mut stream = match conn {
            Ok(s) => {
                backoff = Duration::from_millis(50);
                if logged_down {
                    tracing::info!(peer = %peer.id, "peer link up");
                    logged_down = false;
                }
                s
            }
            Err(e) => {
                if !logged_down {
                    tracing::debug!(peer = %peer.id, error = %e, "cannot reach peer");
                    logged_down = true;
                }
                // While disconnected, what was queued is stale: drop it.
                while rx.try_recv().is_ok() {}
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        loop {
            let body = tokio::select! {
                _ = shutdown.cancelled() => return,
                b = rx.recv() => match b { Some(b) => b, None => return },
            };
            let frame = Frame {
                from: me.clone(),
                body,
            };
            match tokio::time::timeout(IO_TIMEOUT, write_frame(&mut stream, &frame)).await {
                Ok(Ok(())) => {}
                _ => {
                    tracing::debug!(peer = %peer.id, "peer link broke");
                    break;
                }
            }
        }
    }
}

/// A boxed peer stream (plain or TLS).
pub trait PeerIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> PeerIo for T {}

async fn connect(
    me: &NodeId,
    peer: &PeerConfig,
    tls: Option<&PeerTls>,
) -> std::io::Result<Box<dyn PeerIo>> {
    let tcp = tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(&peer.addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    tcp.set_nodelay(true)?;
    let mut io: Box<dyn PeerIo> = match tls {
        None => Box::new(tcp),
        Some(t) => {
            // The peer's certificate must name its id.
            let name = ServerName::try_from(peer.id.as_str().to_string())
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            let s = tokio::time::timeout(IO_TIMEOUT, t.connector.connect(name, tcp))
                .await
                .map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out")
                })??;
            Box::new(s)
        }
    };
    write_frame(
        &mut io,
        &Frame {
            from: me.clone(),
            body: Body::Hello,
        },
    )
    .await?;
    Ok(io)
}

async fn accept_loop(
    listener: TcpListener,
    known: Arc<Vec<NodeId>>,
    tls: Option<PeerTls>,
    inbox: mpsc::Sender<Inbound>,
    shutdown: CancellationToken,
) {
    loop {
        let (stream, addr) = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "cluster accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let (known, tls, inbox, shutdown) =
            (known.clone(), tls.clone(), inbox.clone(), shutdown.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = serve_peer(stream, addr, &known, tls.as_ref(), inbox) => {}
            }
        });
    }
}

fn auth_failure(claimed: Option<&NodeId>, known: &[NodeId], addr: SocketAddr, why: &str) {
    let label = match claimed {
        Some(id) if known.contains(id) => id.to_string(),
        _ => "unknown".to_string(),
    };
    metrics::counter!(names::PEER_AUTH_FAILURES_TOTAL, "peer" => label.clone()).increment(1);
    tracing::warn!(%addr, peer = %label, reason = why, "peer refused");
}

async fn serve_peer(
    stream: TcpStream,
    addr: SocketAddr,
    known: &[NodeId],
    tls: Option<&PeerTls>,
    inbox: mpsc::Sender<Inbound>,
) {
    let (mut io, cert): (Box<dyn PeerIo>, Option<CertificateDer<'static>>) = match tls {
        None => (Box::new(stream), None),
        Some(t) => match tokio::time::timeout(IO_TIMEOUT, t.acceptor.accept(stream)).await {
            Ok(Ok(s)) => {
                let cert = s
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .cloned();
                (Box::new(s), cert)
            }
            Ok(Err(e)) => {
                auth_failure(None, known, addr, &format!("TLS handshake failed: {e}"));
                return;
            }
            Err(_) => {
                auth_failure(None, known, addr, "TLS handshake timed out");
                return;
            }
        },
    };
    let hello = match tokio::time::timeout(IO_TIMEOUT, read_frame(&mut io)).await {
        Ok(Ok(f)) => f,
        _ => {
            auth_failure(None, known, addr, "no hello");
            return;
        }
    };
    let from = hello.from;
    if !matches!(hello.body, Body::Hello) || !known.contains(&from) {
        auth_failure(Some(&from), known, addr, "not a configured peer");
        return;
    }
    if tls.is_some() {
        let ok = cert.as_ref().is_some_and(|c| cert_names(c, &from));
        if !ok {
            auth_failure(
                Some(&from),
                known,
                addr,
                "certificate does not name the claimed id",
            );
            return;
        }
    }
    loop {
        let frame = match read_frame(&mut io).await {
            Ok(f) => f,
            Err(_) => return,
        };
        if frame.from != from {
            auth_failure(
                Some(&frame.from),
                known,
                addr,
                "sender differs from the authenticated peer",
            );
            continue;
        }
        if inbox
            .send(Inbound {
                from: from.clone(),
                body: frame.body,
            })
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Whether `cert` is valid for the DNS name `id` (its SAN).
fn cert_names(cert: &CertificateDer<'_>, id: &NodeId) -> bool {
    let Ok(ee) = webpki::EndEntityCert::try_from(cert) else {
        return false;
    };
    let Ok(name) = ServerName::try_from(id.as_str()) else {
        return false;
    };
    ee.verify_is_valid_for_subject_name(&name).is_ok()
}
