//! Peer transport: length-prefixed JSON frames over TCP, mutual TLS when `[cluster.tls]` is set.
//!
//! Each pair of peers shares one connection, both ways: the peer with the lower id dials, the
//! other accepts. A connection starts with a `Hello` naming the dialer; with TLS, the dialer's
//! client certificate must chain to the cluster CA and name the claimed id as a DNS SAN, the id
//! must be one of the configured peers, and the dialer checks the server's certificate names the
//! peer it dialed. Every later frame, either way, must carry the authenticated sender, or it is
//! dropped and counted. Both ends say Hello with their cluster id and membership epoch: a peer of
//! another cluster is refused and counted. A link that carries nothing (not even heartbeats)
//! for `idle` is torn down and dialed again, so a link whose packets vanish is noticed. Sending
//! never blocks the caller: a full queue drops the message (Paxos and heartbeats tolerate loss).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
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
use crate::ops::telemetry as names;
use crate::sync::MutexExt;

/// What peers say to each other.
// Most frames are Paxos messages, which carry a pool; boxing it would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Body {
    /// The first frame each way: who sends it (the frame's `from`), of which cluster (empty
    /// while it knows none) and at which membership epoch.
    Hello {
        #[serde(default)]
        cluster: String,
        #[serde(default)]
        epoch: u64,
        /// The receiver is one of the sender's agreed voters: a peer of another cluster that
        /// says so claims this node (see `Body::Claimed`).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        claims: bool,
    },
    /// Never on the wire: the transport tells the driver that a peer of another cluster (named)
    /// lists this node as one of its voters.
    #[serde(skip)]
    Claimed {
        cluster: String,
    },
    Heartbeat,
    /// With each heartbeat of a peer that is not a voter: the address it may be dialed at
    /// (`cluster.advertise`) and the pool version it holds (autopilot promotes learners that are
    /// caught up).
    Progress {
        version: u64,
        advertise: String,
    },
    Paxos {
        msg: Msg,
    },
    /// Never sent: a frame of a kind this version does not know (a newer peer's), read so that
    /// the link survives it, and skipped.
    #[serde(other, skip_serializing)]
    Unknown,
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

/// This node's cluster id and membership epoch, as its Hello says them (the driver updates
/// them as it learns).
#[derive(Clone, Default)]
pub struct Identity(Arc<std::sync::Mutex<(String, u64, std::collections::BTreeSet<NodeId>)>>);

impl Identity {
    /// This node's cluster, epoch and agreed voters (as the driver learned them).
    pub fn set(&self, cluster: &str, epoch: u64, voters: &std::collections::BTreeSet<NodeId>) {
        let mut id = self.0.locked();
        if id.0 != cluster || id.1 != epoch || id.2 != *voters {
            *id = (cluster.to_string(), epoch, voters.clone());
        }
    }

    /// The Hello this node says to `peer`.
    fn hello(&self, peer: &NodeId) -> Body {
        let id = self.0.locked();
        Body::Hello {
            cluster: id.0.clone(),
            epoch: id.1,
            claims: id.2.contains(peer),
        }
    }

    /// Whether a peer that says `cluster` belongs to another cluster than this node.
    fn foreign(&self, cluster: &str) -> bool {
        let id = self.0.locked();
        !cluster.is_empty() && !id.0.is_empty() && cluster != id.0
    }
}

/// TLS material for both directions; a reload swaps it for the connections made after.
#[derive(Clone)]
pub struct PeerTls {
    current: Arc<arc_swap::ArcSwap<TlsPair>>,
}

struct TlsPair {
    acceptor: TlsAcceptor,
    connector: TlsConnector,
}

impl PeerTls {
    pub fn load(t: &ClusterTls) -> Result<Self, crate::net::tls::TlsError> {
        Ok(Self {
            current: Arc::new(arc_swap::ArcSwap::from_pointee(Self::pair(t)?)),
        })
    }

    fn pair(t: &ClusterTls) -> Result<TlsPair, crate::net::tls::TlsError> {
        let (server, client) = crate::net::tls::load_mutual(&t.ca, &t.cert, &t.key)?;
        Ok(TlsPair {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            connector: TlsConnector::from(Arc::new(client)),
        })
    }

    /// Load the files again (SIGHUP); on error the old material stays.
    pub fn reload(&self, t: &ClusterTls) -> Result<(), crate::net::tls::TlsError> {
        self.current.store(Arc::new(Self::pair(t)?));
        Ok(())
    }

    fn connector(&self) -> TlsConnector {
        self.current.load().connector.clone()
    }

    fn acceptor(&self) -> TlsAcceptor {
        self.current.load().acceptor.clone()
    }
}

/// One peer link as the transport keeps it: its outbound queue, and where the accept loop
/// hands it a connection the peer dialed.
struct LinkHandle {
    tx: mpsc::Sender<Body>,
    handoff: mpsc::Sender<Box<dyn PeerIo>>,
}

/// What every link and the accept loop share.
struct Shared {
    me: NodeId,
    tls: Option<PeerTls>,
    identity: Identity,
    idle: Duration,
    inbox: mpsc::Sender<Inbound>,
    shutdown: CancellationToken,
    links: std::sync::Mutex<HashMap<NodeId, LinkHandle>>,
    /// This node is outside the agreed membership (or knows none yet): it dials peers whose
    /// address it knows even where the other side of the pair would dial.
    outside: AtomicBool,
}

/// Outbound queues to every peer, made as peers become known: the configured ones, members of
/// the agreed membership, and learners when they dial in.
#[derive(Clone)]
pub struct Transport {
    shared: Arc<Shared>,
}

impl Transport {
    /// Start the listener and one link per configured peer. Inbound messages go to `inbox`; a
    /// link silent for `idle` is torn down. A learner (`dials_all`) dials every peer it knows;
    /// a voter dials the voters whose id is above its own and takes the other connections.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        me: NodeId,
        listener: TcpListener,
        peers: &[PeerConfig],
        tls: Option<PeerTls>,
        identity: Identity,
        idle: Duration,
        inbox: mpsc::Sender<Inbound>,
        shutdown: CancellationToken,
        dials_all: bool,
    ) -> Transport {
        let t = Transport {
            shared: Arc::new(Shared {
                me,
                tls,
                identity,
                idle,
                inbox,
                shutdown,
                links: std::sync::Mutex::new(HashMap::new()),
                outside: AtomicBool::new(true),
            }),
        };
        for p in peers {
            let dial = dials_all || t.shared.me < p.id;
            t.ensure_with(&p.id, dial, Some(p.addr.as_str()));
        }
        tokio::spawn(accept_loop(listener, t.clone()));
        t
    }

    /// A link to `id`, made if there is none: dialing `dial` (its address) when this side of
    /// the pair dials, else waiting for the peer to dial in.
    pub fn ensure(&self, id: &NodeId, dial: Option<&str>) {
        self.ensure_with(id, dial.is_some(), dial);
    }

    /// Whether this node is outside the agreed membership (see `Shared::outside`).
    pub fn set_outside(&self, outside: bool) {
        self.shared.outside.store(outside, Ordering::Relaxed);
    }

    fn ensure_with(&self, id: &NodeId, dial: bool, addr: Option<&str>) {
        if *id == self.shared.me {
            return;
        }
        let mut links = self.shared.links.locked();
        if links.contains_key(id) {
            return;
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        let (conn_tx, conn_rx) = mpsc::channel(4);
        links.insert(
            id.clone(),
            LinkHandle {
                tx,
                handoff: conn_tx,
            },
        );
        tokio::spawn(link(
            Link {
                shared: self.shared.clone(),
                peer: id.clone(),
                addr: addr.filter(|_| dial).map(str::to_string),
                fallback: addr.filter(|_| !dial).map(str::to_string),
            },
            rx,
            conn_rx,
        ));
    }

    /// Drop the link to `id` (its task ends): a learner that left.
    pub fn forget(&self, id: &NodeId) {
        let mut links = self.shared.links.locked();
        links.remove(id);
    }

    /// The peers this transport has links to.
    pub fn known(&self) -> Vec<NodeId> {
        let links = self.shared.links.locked();
        links.keys().cloned().collect()
    }

    fn knows(&self, id: &NodeId) -> bool {
        let links = self.shared.links.locked();
        links.contains_key(id)
    }

    fn handoff(&self, id: &NodeId) -> Option<mpsc::Sender<Box<dyn PeerIo>>> {
        let links = self.shared.links.locked();
        links.get(id).map(|l| l.handoff.clone())
    }

    pub fn send(&self, to: &NodeId, body: Body) {
        let links = self.shared.links.locked();
        if let Some(l) = links.get(to) {
            // Full queue or closed link: drop; the protocol retries what matters.
            let _ = l.tx.try_send(body);
        }
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

/// What one peer link needs.
struct Link {
    shared: Arc<Shared>,
    peer: NodeId,
    /// The address to dial, when this side dials.
    addr: Option<String>,
    /// The peer's address when the other side dials: used only while this node is outside the
    /// membership and the peer has not dialed for a while.
    fallback: Option<String>,
}

/// Keep the one connection with `peer` (dialing it if our id is lower, else taking the one it
/// dials), send what is queued for it, and pass on what it sends.
/// What one attempt to get a link's connection came to.
enum Got {
    Io(Box<dyn PeerIo>),
    /// None yet: try again.
    Retry,
    /// Shutting down, or the link is gone.
    Stop,
}

/// How a link is doing between connections.
struct Reconnect {
    /// Seconds spent waiting for the peer to dial.
    waited: u32,
    backoff: Duration,
    logged_down: bool,
}

async fn link(
    l: Link,
    mut rx: mpsc::Receiver<Body>,
    mut accepted: mpsc::Receiver<Box<dyn PeerIo>>,
) {
    let mut st = Reconnect {
        waited: 0,
        backoff: Duration::from_millis(50),
        logged_down: false,
    };
    let mut next: Option<Box<dyn PeerIo>> = None;
    loop {
        let io = match next.take() {
            Some(io) => io,
            None => {
                let got = if l.addr.is_some() {
                    dial(&l, &mut st, &mut rx, &mut accepted).await
                } else {
                    await_peer(&l, &mut st, &mut rx, &mut accepted).await
                };
                match got {
                    Got::Io(io) => io,
                    Got::Retry => continue,
                    Got::Stop => return,
                }
            }
        };
        st.backoff = Duration::from_millis(50);
        if st.logged_down {
            tracing::info!(peer = %l.peer, "peer link up");
            st.logged_down = false;
        }
        match carry(&l, io, &mut rx, &mut accepted).await {
            Some(newer) => next = newer,
            None => return,
        }
        tracing::debug!(peer = %l.peer, "peer link broke");
    }
}

/// This side dials: a connection, or (on failure) the queue dropped and a backoff.
async fn dial(
    l: &Link,
    st: &mut Reconnect,
    rx: &mut mpsc::Receiver<Body>,
    accepted: &mut mpsc::Receiver<Box<dyn PeerIo>>,
) -> Got {
    let shutdown = &l.shared.shutdown;
    let me = &l.shared.me;
    let conn = tokio::select! {
        _ = shutdown.cancelled() => return Got::Stop,
        a = accepted.recv() => match a { Some(io) => Ok(io), None => return Got::Stop },
        c = connect(me, &l.peer, l.addr.as_deref().unwrap_or_default(), l.shared.tls.as_ref(), &l.shared.identity) => c,
    };
    match conn {
        Ok(io) => Got::Io(io),
        Err(e) => {
            if !st.logged_down {
                tracing::debug!(peer = %l.peer, error = %e, "cannot reach peer");
                st.logged_down = true;
            }
            // While disconnected, what was queued is stale: drop it.
            while rx.try_recv().is_ok() {}
            tokio::select! {
                _ = shutdown.cancelled() => return Got::Stop,
                _ = tokio::time::sleep(st.backoff) => {}
            }
            st.backoff = (st.backoff * 2).min(Duration::from_secs(1));
            Got::Retry
        }
    }
}

/// The peer dials this side. A node outside the agreed membership (new, removed, or not formed
/// yet) that knows the peer's address dials it after a while anyway: the peer may not know it
/// at all.
async fn await_peer(
    l: &Link,
    st: &mut Reconnect,
    rx: &mut mpsc::Receiver<Body>,
    accepted: &mut mpsc::Receiver<Box<dyn PeerIo>>,
) -> Got {
    let fallback = l
        .fallback
        .as_deref()
        .filter(|_| st.waited >= 2 && l.shared.outside.load(Ordering::Relaxed));
    let dial = async {
        match fallback {
            Some(addr) => {
                connect(
                    &l.shared.me,
                    &l.peer,
                    addr,
                    l.shared.tls.as_ref(),
                    &l.shared.identity,
                )
                .await
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = l.shared.shutdown.cancelled() => Got::Stop,
        a = accepted.recv() => match a { Some(io) => { st.waited = 0; Got::Io(io) }, None => Got::Stop },
        c = dial => match c {
            Ok(io) => Got::Io(io),
            Err(_) => {
                while rx.try_recv().is_ok() {}
                tokio::time::sleep(Duration::from_secs(1)).await;
                Got::Retry
            }
        },
        _ = tokio::time::sleep(Duration::from_secs(1)) => {
            st.waited += 1;
            while rx.try_recv().is_ok() {}
            Got::Retry
        }
    }
}

/// Carry frames both ways on `io` until it breaks (Some: with the newer connection the peer
/// opened meanwhile, if any) or the link stops (None).
async fn carry(
    l: &Link,
    io: Box<dyn PeerIo>,
    rx: &mut mpsc::Receiver<Body>,
    accepted: &mut mpsc::Receiver<Box<dyn PeerIo>>,
) -> Option<Option<Box<dyn PeerIo>>> {
    let me = &l.shared.me;
    let (mut rd, mut wr) = tokio::io::split(io);
    if l.addr.is_none() {
        // Answer the dialer's Hello with ours, so it can check our cluster too.
        let hello = Frame {
            from: me.clone(),
            body: l.shared.identity.hello(&l.peer),
        };
        if !matches!(
            tokio::time::timeout(IO_TIMEOUT, write_frame(&mut wr, &hello)).await,
            Ok(Ok(()))
        ) {
            return Some(None);
        }
    }
    let reader = read_loop(&mut rd, l);
    tokio::pin!(reader);
    loop {
        tokio::select! {
            _ = l.shared.shutdown.cancelled() => return None,
            _ = &mut reader => return Some(None),
            // The peer opened a new connection (it restarted): use that one.
            newer = accepted.recv() => return Some(newer),
            b = rx.recv() => {
                let body = b?;
                let frame = Frame { from: me.clone(), body };
                match tokio::time::timeout(IO_TIMEOUT, write_frame(&mut wr, &frame)).await {
                    Ok(Ok(())) => {}
                    _ => return Some(None),
                }
            }
        }
    }
}

/// Pass on every frame from the link's peer until the connection ends, goes silent for the
/// link's `idle`, or turns out to belong to another cluster; frames claiming another sender are
/// dropped and counted.
async fn read_loop<R: AsyncRead + Unpin>(rd: &mut R, l: &Link) {
    let (peer, inbox) = (&l.peer, &l.shared.inbox);
    loop {
        let frame = match tokio::time::timeout(l.shared.idle, read_frame(rd)).await {
            Ok(Ok(f)) => f,
            Ok(Err(_)) => return,
            Err(_) => {
                tracing::info!(peer = %peer, "peer link silent too long; reconnecting");
                return;
            }
        };
        if let Body::Hello {
            cluster, claims, ..
        } = &frame.body
        {
            if l.shared.identity.foreign(cluster) {
                let why = format!("another cluster ({cluster})");
                metrics::counter!(names::PEER_AUTH_FAILURES_TOTAL, "peer" => frame.from.to_string()).increment(1);
                tracing::warn!(peer = %peer, reason = %why, "peer refused");
                if *claims && frame.from == *peer {
                    claimed(inbox, peer, cluster).await;
                }
                return;
            }
        }
        if frame.from != *peer {
            metrics::counter!(names::PEER_AUTH_FAILURES_TOTAL, "peer" => peer.to_string())
                .increment(1);
            tracing::warn!(peer = %peer, claimed = %frame.from, "frame from another sender dropped");
            continue;
        }
        if matches!(frame.body, Body::Unknown) {
            tracing::debug!(peer = %peer, "a frame of a kind this version does not know: skipped");
            continue;
        }
        let msg = Inbound {
            from: peer.clone(),
            body: frame.body,
        };
        if inbox.send(msg).await.is_err() {
            return;
        }
    }
}

/// A boxed peer stream (plain or TLS).
pub trait PeerIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> PeerIo for T {}

async fn connect(
    me: &NodeId,
    peer: &NodeId,
    addr: &str,
    tls: Option<&PeerTls>,
    identity: &Identity,
) -> std::io::Result<Box<dyn PeerIo>> {
    let tcp = tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    tcp.set_nodelay(true)?;
    let mut io: Box<dyn PeerIo> = match tls {
        None => Box::new(tcp),
        Some(t) => {
            // The peer's certificate must name its id.
            let name = ServerName::try_from(peer.as_str().to_string())
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            let s = tokio::time::timeout(IO_TIMEOUT, t.connector().connect(name, tcp))
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
            body: identity.hello(peer),
        },
    )
    .await?;
    Ok(io)
}

async fn accept_loop(listener: TcpListener, t: Transport) {
    let shutdown = t.shared.shutdown.clone();
    loop {
        let (stream, addr) = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = crate::net::accept(&listener, "cluster") => a,
        };
        let _ = stream.set_nodelay(true);
        let (t, shutdown) = (t.clone(), shutdown.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = authenticate(stream, addr, &t) => {}
            }
        });
    }
}

/// The `peer` label: a peer this node has a link to, or "unknown" (labels stay bounded).
fn label_for(claimed: Option<&NodeId>, t: &Transport) -> String {
    match claimed {
        Some(id) if t.knows(id) => id.to_string(),
        _ => "unknown".to_string(),
    }
}

fn auth_failure(claimed: Option<&NodeId>, t: &Transport, addr: SocketAddr, why: &str) {
    let label = label_for(claimed, t);
    metrics::counter!(names::PEER_AUTH_FAILURES_TOTAL, "peer" => label.clone()).increment(1);
    tracing::warn!(%addr, peer = %label, reason = why, "peer refused");
}

/// Authenticate a dialing peer, then hand the connection to that peer's link (made now for a
/// peer not known yet: a learner joining) and its Hello to the driver (which learns the peer's
/// epoch and role from it, as from every Hello). With TLS, the peer's certificate must chain to
/// the cluster CA and name the id it claims; without TLS (loopback only), the id is taken as
/// said.
async fn authenticate(stream: TcpStream, addr: SocketAddr, t: &Transport) {
    let (tls, identity) = (&t.shared.tls, &t.shared.identity);
    let (mut io, cert): (Box<dyn PeerIo>, Option<CertificateDer<'static>>) = match tls {
        None => (Box::new(stream), None),
        Some(tl) => match tokio::time::timeout(IO_TIMEOUT, tl.acceptor().accept(stream)).await {
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
                auth_failure(None, t, addr, &format!("TLS handshake failed: {e}"));
                return;
            }
            Err(_) => {
                auth_failure(None, t, addr, "TLS handshake timed out");
                return;
            }
        },
    };
    let hello = match tokio::time::timeout(IO_TIMEOUT, read_frame(&mut io)).await {
        Ok(Ok(f)) => f,
        _ => {
            auth_failure(None, t, addr, "no hello");
            return;
        }
    };
    let from = hello.from;
    let Body::Hello {
        cluster, claims, ..
    } = &hello.body
    else {
        auth_failure(Some(&from), t, addr, "no hello");
        return;
    };
    if !crate::core::pool::valid_node_id(from.as_str()) || from == t.shared.me {
        auth_failure(Some(&from), t, addr, "not a valid peer id");
        return;
    }
    let authenticated = tls.is_none() || cert.as_ref().is_some_and(|c| cert_names(c, &from));
    if identity.foreign(cluster) {
        auth_failure(
            Some(&from),
            t,
            addr,
            &format!("another cluster ({cluster})"),
        );
        if *claims && authenticated {
            claimed(&t.shared.inbox, &from, cluster).await;
        }
        return;
    }
    if tls.is_some() {
        let ok = cert.as_ref().is_some_and(|c| cert_names(c, &from));
        if !ok {
            auth_failure(
                Some(&from),
                t,
                addr,
                "certificate does not name the claimed id",
            );
            return;
        }
    }
    // A peer not known yet (a learner) gets a link that waits for its connections.
    t.ensure(&from, None);
    if let Some(tx) = t.handoff(&from) {
        let _ = tx.send(io).await;
    }
    let _ = t
        .shared
        .inbox
        .send(Inbound {
            from,
            body: hello.body,
        })
        .await;
}

/// Tell the driver that `from`, of another cluster, lists this node as a voter.
async fn claimed(inbox: &mpsc::Sender<Inbound>, from: &NodeId, cluster: &str) {
    let _ = inbox
        .send(Inbound {
            from: from.clone(),
            body: Body::Claimed {
                cluster: cluster.to_string(),
            },
        })
        .await;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A length-prefixed frame around `json`.
    fn framed(json: &str) -> Vec<u8> {
        let mut out = (json.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(json.as_bytes());
        out
    }

    async fn read(bytes: &[u8]) -> std::io::Result<Frame> {
        let mut r = bytes;
        read_frame(&mut r).await
    }

    #[tokio::test]
    async fn frames_read_from_bytes() {
        let known = read(&framed(r#"{"from":"a","body":{"kind":"heartbeat"}}"#)).await;
        assert!(matches!(
            known,
            Ok(Frame {
                body: Body::Heartbeat,
                ..
            })
        ));
        let progress = read(&framed(
            r#"{"from":"l","body":{"kind":"progress","version":7,"advertise":"10.0.0.9:7001"}}"#,
        ))
        .await
        .unwrap();
        assert!(matches!(progress.body, Body::Progress { version: 7, .. }));
        // A kind from a newer version: read (the link survives), to be skipped.
        let newer = read(&framed(
            r#"{"from":"b","body":{"kind":"gossip","rumours":[1,2]}}"#,
        ))
        .await
        .unwrap();
        assert_eq!(newer.from.as_str(), "b");
        assert!(matches!(newer.body, Body::Unknown));
        // A known kind with bad fields, no kind, not JSON, cut short, or too large: errors (the
        // link is dropped).
        for bad in [
            framed(r#"{"from":"a","body":{"kind":"progress","version":"seven"}}"#),
            framed(r#"{"from":"a","body":{}}"#),
            framed(r#"{"body":{"kind":"heartbeat"}}"#),
            framed("not json"),
            framed(r#"{"from":"a","body":{"kind":"heartbeat"}}"#)[..20].to_vec(),
            ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec(),
        ] {
            assert!(
                read(&bad).await.is_err(),
                "{:?}",
                String::from_utf8_lossy(&bad)
            );
        }
        // What this version writes, it reads back; `Unknown` is never written.
        let mut out = Vec::new();
        let frame = Frame {
            from: NodeId::new("a"),
            body: Body::Progress {
                version: 3,
                advertise: "127.0.0.1:7004".into(),
            },
        };
        write_frame(&mut out, &frame).await.unwrap();
        assert!(matches!(
            read(&out).await.unwrap().body,
            Body::Progress { version: 3, .. }
        ));
        let never = Frame {
            from: NodeId::new("a"),
            body: Body::Unknown,
        };
        assert!(write_frame(&mut Vec::new(), &never).await.is_err());
    }
}
