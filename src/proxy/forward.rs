//! Forwarding one client request, in three steps: plan (hash key, rewritten request, what can
//! rebuild it for a retry), attempt (one backend, with timeouts), on-outcome (record it in the
//! backend's local view and metrics, then answer, or retry on the next candidate when safe).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use hyper::body::Incoming;
use metrics::Counter;

use super::access::AccessRecord;
use super::body::{ClientBody, RequestBody, SharedTape, Tape, REPLAY_LIMIT};
use super::client::ClientUpgrade;
use super::conn::{ConnState, Tunnels};
use super::deadline;
use super::error::ProxyError;
use super::response::ResponseBody;
use super::routes::{self, Route, Routes};
use super::table::{Candidates, RoutingTable, Settings, Snapshot};
use super::upstream::h1::{self, SendError};
use super::upstream::{BackendConn, ErrorKind, Lease, Sender, Upstream};
use super::wire::{FieldRole, Outgoing, WireFields};
use crate::config::HashKey;
use crate::core::balance::{hash, Algorithm};
use crate::core::health::Source;
use crate::ops::telemetry as names;

/// What the server knows about the client connection.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub client: SocketAddr,
    pub https: bool,
    /// The client's IP as a header value (for X-Forwarded-For), made once per connection.
    pub client_ip: HeaderValue,
    /// The data-plane worker serving the connection (its upstream connections are its own).
    pub worker: usize,
    /// The client connection's shared state; an upgraded connection's tunnel runs in its
    /// `tunnels` (so the tunnel counts as this client connection until it ends, and closes
    /// when idle or when the grace is over).
    pub state: Arc<ConnState>,
}

impl ConnInfo {
    pub fn new(client: SocketAddr, https: bool, worker: usize, state: Arc<ConnState>) -> Self {
        let client_ip = HeaderValue::from_str(&client.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        Self {
            client,
            https,
            client_ip,
            worker,
            state,
        }
    }
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// RFC 9110 §7.6.1 hop-by-hop fields (plus the legacy Keep-Alive, Proxy-Connection, Trailer).
fn hop_by_hop() -> [&'static HeaderName; 7] {
    [
        &header::CONNECTION,
        &PROXY_CONNECTION,
        &KEEP_ALIVE,
        &header::TE,
        &header::TRAILER,
        &header::TRANSFER_ENCODING,
        &header::UPGRADE,
    ]
}

/// What the one pass of `strip_hop_by_hop` saw, so the caller looks nothing up again.
#[derive(Default)]
struct Seen {
    /// The `Upgrade` value when the message asks for one (`Connection: upgrade` + `Upgrade`).
    upgrade: Option<HeaderValue>,
    /// `TE` listed `trailers`.
    te_trailers: bool,
    /// Host fields (2 means two or more), and the first.
    hosts: u8,
    host: Option<HeaderValue>,
    /// An X-Forwarded-For field is there.
    forwarded_for: bool,
}

/// Remove hop-by-hop fields, including those the `Connection` field names.
fn strip_hop_by_hop(headers: &mut HeaderMap) -> Seen {
    // One pass over the fields; removals (hash lookups) only for what is there. Tokens that
    // name no field to drop ("close", "keep-alive", "upgrade") allocate nothing.
    let mut upgrade_requested = false;
    let mut named: Vec<HeaderName> = Vec::new();
    // Which of the hop-by-hop fields are there (bit i: hop_by_hop()[i]): only those are
    // removed, each removal being a hash lookup.
    let mut present = 0u8;
    let mut seen = Seen::default();
    for (name, value) in headers.iter() {
        if name == header::HOST {
            seen.hosts = (seen.hosts + 1).min(2);
            if seen.host.is_none() {
                seen.host = Some(value.clone());
            }
        } else if name == X_FORWARDED_FOR {
            seen.forwarded_for = true;
        } else if name == header::TE {
            seen.te_trailers |= value
                .to_str()
                .unwrap_or_default()
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
        }
        if name == header::CONNECTION {
            for t in value.to_str().unwrap_or_default().split(',') {
                let t = t.trim();
                if t.eq_ignore_ascii_case("upgrade") {
                    upgrade_requested = true;
                } else if !(t.is_empty()
                    || t.eq_ignore_ascii_case("close")
                    || t.eq_ignore_ascii_case("keep-alive"))
                {
                    if let Ok(n) = HeaderName::from_bytes(t.as_bytes()) {
                        // Never let a client strip the fields we route and forward by.
                        if n != header::HOST && n != X_FORWARDED_FOR {
                            named.push(n);
                        }
                    }
                }
            }
        }
        if let Some(i) = hop_by_hop().iter().position(|h| *h == name) {
            present |= 1 << i;
        }
    }
    if upgrade_requested {
        seen.upgrade = headers.get(header::UPGRADE).cloned();
    }
    for name in named {
        headers.remove(&name);
    }
    for (i, name) in hop_by_hop().into_iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
    seen
}

/// Whether a request's fields can stay in wire form to the end: nothing on its way reads them
/// (no access log, no hash on a field, no upgrade) and no backend of the pool speaks HTTP/2.
fn wire_will_do(snap: &Snapshot, fields: &WireFields) -> bool {
    lines_will_do(snap) && !fields.has(FieldRole::Upgrade)
}

/// Whether a request may go to its backend as lines, its map never rewritten: no access log, no
/// hash on a field, and no backend of the pool speaks HTTP/2.
fn lines_will_do(snap: &Snapshot) -> bool {
    let settings = &snap.settings;
    let hashes_a_field = matches!(settings.balance.algorithm, Algorithm::ConsistentHash(_))
        && matches!(settings.hash_key, HashKey::Header(_) | HashKey::Cookie(_));
    !settings.access_log && !snap.any_h2 && !hashes_a_field
}

fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// The request's hash key, hashed; `None` when the request does not carry it.
fn hash_key(key: &HashKey, req: &Request<ClientBody>, client: &SocketAddr) -> Option<u64> {
    match key {
        HashKey::ClientIp => Some(match client.ip() {
            std::net::IpAddr::V4(a) => hash::hash_key(&a.octets()),
            std::net::IpAddr::V6(a) => hash::hash_key(&a.octets()),
        }),
        HashKey::Path => Some(hash::hash_key(req.uri().path().as_bytes())),
        HashKey::Header(name) => req
            .headers()
            .get(name)
            .map(|v| hash::hash_key(v.as_bytes())),
        HashKey::Cookie(name) => req
            .headers()
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|pair| {
                let (k, v) = pair.trim().split_once('=')?;
                (k == name).then(|| hash::hash_key(v.as_bytes()))
            }),
        HashKey::Query(name) => req.uri().query().and_then(|q| {
            q.split('&').find_map(|pair| {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                (k == name).then(|| hash::hash_key(v.as_bytes()))
            })
        }),
    }
}

/// What lets a request that was sent go again after its backend failed.
struct Template {
    /// Method, target, fields and taped body to rebuild it from; None when the sent request
    /// itself comes back to be sent again (a bodiless request to a pool of HTTP/1.1 backends,
    /// whose client leaves the request in place): no copy is made then.
    copy: Option<Box<Saved>>,
    /// Safe to send again after a backend received it (else only after a refusal that says
    /// it was not processed).
    idempotent: bool,
}

/// A copy of a request to send again (boxed: most requests need none).
struct Saved {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    /// None for a bodiless request.
    tape: Option<SharedTape>,
}

impl Template {
    /// The request again, unless its body cannot be replayed (too long, not sent whole).
    fn build(&self) -> Option<Request<RequestBody>> {
        let copy = self.copy.as_ref()?;
        let body = match &copy.tape {
            None => RequestBody::Empty,
            Some(t) => Tape::replay(t)?,
        };
        let mut req = Request::new(body);
        *req.method_mut() = copy.method.clone();
        *req.uri_mut() = copy.uri.clone();
        *req.headers_mut() = copy.headers.clone();
        Some(req)
    }

    fn can_replay(&self) -> bool {
        self.copy
            .as_ref()
            .and_then(|c| c.tape.as_ref())
            .is_none_or(|t| Tape::replay(t).is_some())
    }
}

/// What forwarding one request needs before the first attempt.
struct Plan {
    /// The hashed key (consistent hashing only; None when the request lacks it).
    key: Option<u64>,
    /// The rewritten request, until an attempt takes it (a connect failure hands it back).
    pending: Option<Request<RequestBody>>,
    /// What rebuilds a request that was sent, when sending it again is safe.
    template: Option<Template>,
    /// `request_for` added a Host for the backend (an HTTP/1.0 client sent none).
    host_added: bool,
    /// The client said `TE: trailers` (kept for HTTP/2 backends, gRPC's way of saying it takes
    /// trailers; removed for HTTP/1 ones, to which it is hop-by-hop).
    te_trailers: bool,
    /// The client's side of an upgrade, and the Upgrade value forwarded.
    upgrade: Option<(ClientUpgrade, HeaderValue)>,
    /// The client speaks HTTP/1 (an answer's fields from an HTTP/1 backend go to it as they came).
    client_h1: bool,
    /// The request's fields in wire form, written after its map's (empty then) by the HTTP/1
    /// client; kept here across attempts.
    wire: Option<Outgoing>,
    /// Set when the client's body broke off (see `RequestBody::Stream`); none for a bodiless
    /// request.
    body_broke: Option<Arc<AtomicBool>>,
}

impl Plan {
    fn new(
        mut req: Request<ClientBody>,
        fields: Option<WireFields>,
        conn: &ConnInfo,
        snap: &Snapshot,
        seen: Option<Arc<AtomicU64>>,
    ) -> Result<Plan, ProxyError> {
        let settings = &snap.settings;
        // Content-Length with Transfer-Encoding never gets here: the HTTP/1 loop refuses such
        // heads (server/h1.rs), and HTTP/2 has no such framing.
        let key = match settings.balance.algorithm {
            Algorithm::ConsistentHash(_) => hash_key(&settings.hash_key, &req, &conn.client),
            Algorithm::RoundRobin => None,
        };
        let client_h1 = req.version() != Version::HTTP_2;
        let client_upgrade = req
            .headers()
            .contains_key(header::UPGRADE)
            .then(|| ClientUpgrade::of(&mut req));
        let Rewritten {
            request: mut first,
            upgrade,
            te_trailers,
            wire,
        } = rewrite(req, fields, lines_will_do(snap), conn, seen)?;
        let body_broke = match first.body() {
            RequestBody::Stream { broke, .. } => Some(broke.clone()),
            _ => None,
        };
        // A sent request is sent again only if idempotent, or (any method) after an HTTP/2
        // backend refused its stream or went away without processing it; its body is taped
        // (up to 64 KiB) as it streams.
        let idempotent = is_idempotent(first.method());
        let replayable = (idempotent || snap.any_h2) && upgrade.is_none() && settings.retries > 0;
        let bodiless = first.body().is_end_stream();
        let fits = first
            .body()
            .size_hint()
            .upper()
            .is_none_or(|n| n <= REPLAY_LIMIT as u64);
        let template = (replayable && (bodiless || fits)).then(|| {
            let tape = (!bodiless).then(|| {
                let t = Tape::shared();
                first.body_mut().tape(t.clone());
                t
            });
            let copy = (!bodiless || snap.any_h2).then(|| {
                Box::new(Saved {
                    method: first.method().clone(),
                    uri: first.uri().clone(),
                    headers: first.headers().clone(),
                    tape,
                })
            });
            Template { copy, idempotent }
        });
        Ok(Plan {
            key,
            pending: Some(first),
            template,
            host_added: false,
            te_trailers,
            upgrade: client_upgrade.zip(upgrade),
            client_h1,
            wire,
            body_broke,
        })
    }

    /// Whether the client's body broke off or was malformed: a failed attempt was then the
    /// client's doing, not the backend's (no health record, no retry).
    fn client_failed(&self) -> bool {
        self.body_broke
            .as_ref()
            .is_some_and(|b| b.load(Ordering::Relaxed))
    }

    /// The request for an attempt on `upstream`: the original, or a rebuilt one for a retry.
    fn request_for(&mut self, upstream: &Upstream) -> Option<Request<RequestBody>> {
        let mut request = self
            .pending
            .take()
            .or_else(|| self.template.as_ref().and_then(Template::build))?;
        if !matches!(request.body(), RequestBody::Empty) {
            request.body_mut().count_into(upstream.request_bytes());
        }
        if self.te_trailers && !upstream.target().is_h2() {
            request.headers_mut().remove(header::TE);
        }
        if let Some(w) = &mut self.wire {
            // An HTTP/1.0 client may send no Host; HTTP/1.1 to the backend needs one.
            if w.needs_host {
                w.host = upstream.host_header();
            }
        } else if !request.headers().contains_key(header::HOST) {
            // An HTTP/1.0 client may send no Host; HTTP/1.1 to the backend needs one.
            if let Some(h) = upstream.host_header() {
                request.headers_mut().insert(header::HOST, h);
                self.host_added = true;
            }
        }
        Some(request)
    }

    /// Take back a bodiless request an HTTP/1.1 attempt sent, when the template keeps no copy.
    fn take_back(&mut self, sent: Option<Request<RequestBody>>) {
        let kept = self.template.as_ref().is_some_and(|t| t.copy.is_some());
        if let (false, Some(mut r)) = (kept, sent) {
            if matches!(r.body(), RequestBody::Empty) {
                if std::mem::take(&mut self.host_added) {
                    r.headers_mut().remove(header::HOST);
                }
                self.pending = Some(r);
            }
        }
    }

    /// Whether a request that reached a backend may go to another one: an idempotent one, or
    /// any one the backend left `unprocessed` (RFC 9113 §8.7).
    fn can_resend(&self, unprocessed: bool) -> bool {
        self.template
            .as_ref()
            .is_some_and(|t| (t.idempotent || unprocessed) && t.can_replay())
    }

    /// The client's response: the backend's streamed back (its connection leased until the body
    /// ends), or, for an accepted upgrade, the 101 while a tunnel splices the two connections.
    fn respond(
        self,
        mut parts: http::response::Parts,
        reply: Reply,
        mut lease: Lease,
        conn: &ConnInfo,
    ) -> Response<ResponseBody> {
        let body = match reply {
            Reply::H1(mut body) => {
                if let (StatusCode::SWITCHING_PROTOCOLS, Some((client, _))) =
                    (parts.status, self.upgrade)
                {
                    parts.headers = body.take_fields(true);
                    if let Some((backend, early)) = body.upgraded() {
                        let tunnels = conn.state.tunnels.get_or_init(Tunnels::default);
                        let close = tunnels.close.clone();
                        tunnels
                            .tracker
                            .spawn(tunnel(client, backend, early, lease, close));
                    }
                    return Response::from_parts(parts, ResponseBody::empty());
                }
                if !self.client_h1 {
                    // An HTTP/1 client gets the fields written as they came, less the
                    // hop-by-hop ones; an HTTP/2 one needs them as a map. The framing fields
                    // are the proxy's to write: a bodiless answer's length (HEAD, 304) from
                    // the framing decision, any other from the body.
                    parts.headers = body.take_fields(false);
                    if let Some(n) = body.announced() {
                        parts
                            .headers
                            .insert(header::CONTENT_LENGTH, HeaderValue::from(n));
                    }
                }
                ResponseBody::h1(body, lease)
            }
            Reply::H2(body, sender) => {
                strip_hop_by_hop(&mut parts.headers);
                lease.h2 = Some(sender);
                ResponseBody::upstream(body, Some(lease))
            }
        };
        Response::from_parts(parts, body)
    }
}

/// A backend's answer body, before it becomes the client's.
// Only ever moved into the client's body, never kept: boxing would cost an allocation per answer.
#[allow(clippy::large_enum_variant)]
enum Reply {
    /// Read from its HTTP/1.1 connection, which it carries.
    H1(h1::BackendBody),
    /// A stream of the worker's shared HTTP/2 connection.
    H2(Incoming, Sender),
}

/// How one attempt on one backend ended.
enum Attempt {
    Response(http::response::Parts, Reply),
    /// Never reached the backend; the request comes back intact.
    NotSent(Request<RequestBody>, std::io::Error),
    /// Sent (at least partly) and then failed.
    /// The request comes back when the client left it in place (HTTP/1.1; its body is gone).
    Failed(ErrorKind, Option<Request<RequestBody>>),
    /// An HTTP/2 backend did not process the stream (REFUSED_STREAM, or left out by its GOAWAY).
    Unprocessed,
    /// The client's request body broke off or was malformed while it went out.
    ClientFailed,
    /// The backend's answer could not be passed on (its framing, an unsolicited 101); as
    /// `Failed`, a failure of the backend.
    BadAnswer(&'static str, Option<Request<RequestBody>>),
}

/// Remove a service's path prefix from the request's target before it is forwarded
/// ("/v1/x?q" less "/v1/" is "/x?q").
fn strip_prefix(req: &mut Request<ClientBody>, prefix: &str) -> Result<(), ProxyError> {
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let stripped = routes::strip(target, prefix);
    let mut parts = req.uri().clone().into_parts();
    parts.path_and_query = stripped.parse().ok();
    *req.uri_mut() =
        Uri::from_parts(parts).map_err(|_| ProxyError::BadRequest("bad request target"))?;
    Ok(())
}

/// The reason an HTTP/1 backend's answer was refused, if that is why the exchange failed.
fn bad_answer(e: &std::io::Error) -> Option<&'static str> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<h1::BadAnswer>())
        .map(|b| b.0)
}

/// The forwarding service shared by every client connection of one peer.
pub struct Proxy {
    routes: Arc<Routes>,
    retries: Counter,
    /// `shoal_requests_total{service="none", backend="none"}`: routed nowhere (404).
    unrouted: names::StatusCounters,
}

impl Proxy {
    pub fn new(routes: Arc<Routes>) -> Arc<Self> {
        Arc::new(Self {
            routes,
            retries: metrics::counter!(names::RETRIES_TOTAL),
            unrouted: names::StatusCounters::new(names::NO_BACKEND, names::NO_BACKEND),
        })
    }

    /// The service table for a request and the prefix to strip from its path, if its service
    /// says so; `NoRoute` when no service takes it (404).
    fn route(
        &self,
        req: &Request<ClientBody>,
        fields: Option<&WireFields>,
    ) -> Result<(Arc<RoutingTable>, Option<Box<str>>), ProxyError> {
        let host = match req.uri().authority() {
            Some(a) => Some(a.as_str().as_bytes()),
            None => match fields {
                Some(f) => f.values(FieldRole::Host).next(),
                None => req.headers().get(header::HOST).map(HeaderValue::as_bytes),
            },
        };
        match self.routes.route(host, req.uri().path()) {
            Route::To { table, strip } => Ok((table, strip)),
            Route::Miss => {
                let shown = |b: &[u8]| String::from_utf8_lossy(b).chars().take(200).collect();
                Err(ProxyError::NoRoute {
                    host: host.map(shown).unwrap_or_default(),
                    path: shown(req.uri().path().as_bytes()),
                })
            }
        }
    }

    /// Serve one client request. Never fails: every error becomes a response, here.
    /// `fields`: an HTTP/1 client's fields in wire form (the request's map is empty then).
    pub async fn handle(
        &self,
        req: Request<ClientBody>,
        fields: Option<WireFields>,
        conn: &ConnInfo,
    ) -> Response<ResponseBody> {
        let start = Instant::now();
        let mut req = req;
        let routed = self.route(&req, fields.as_ref());
        // A request routed nowhere is answered (and logged) under `default`'s settings.
        let table = match &routed {
            Ok((t, _)) => t.clone(),
            Err(_) => self.routes.default_table().clone(),
        };
        let snap = table.snapshot();
        // The fields stay in wire form when nothing here needs them as a map.
        let fields = fields.and_then(|f| {
            if wire_will_do(&snap, &f) {
                Some(f)
            } else {
                // Room for what the forwarder adds: X-Forwarded-For, -Proto, -Host.
                *req.headers_mut() = f.into_map(true, 4);
                None
            }
        });
        let record = snap
            .settings
            .access_log
            .then(|| AccessRecord::begin(&mut req, conn.client, start));
        let seen = record.as_ref().map(|r| r.request_bytes.clone());
        let mut attempts = 0;
        let missed = routed.is_err();
        let outcome = match routed {
            Ok((_, strip)) => match strip.map(|p| strip_prefix(&mut req, &p)) {
                Some(Err(e)) => Err(e),
                _ => {
                    self.forward(&table, req, fields, conn, &snap, start, &mut attempts, seen)
                        .await
                }
            },
            Err(e) => Err(e),
        };
        let (resp, backend) = match outcome {
            Ok((resp, upstream)) => (resp, Some(upstream)),
            Err(e) => {
                match e {
                    ProxyError::NoRoute { .. } => &self.unrouted,
                    _ => &table.local_responses,
                }
                .count(e.status().as_u16());
                tracing::debug!(error = %e, "answered locally");
                (e.response(), None)
            }
        };
        match record {
            None => resp,
            Some(mut r) => {
                let service = if missed {
                    names::NO_BACKEND
                } else {
                    table.service()
                };
                let backend = backend.as_ref().map(|u| u.id.as_str());
                r.respond(resp.status().as_u16(), service, backend, attempts);
                resp.map(|body| ResponseBody::logged(body, r))
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn forward(
        &self,
        table: &RoutingTable,
        req: Request<ClientBody>,
        fields: Option<WireFields>,
        conn: &ConnInfo,
        snap: &Snapshot,
        start: Instant,
        attempts: &mut u32,
        seen: Option<Arc<AtomicU64>>,
    ) -> Result<(Response<ResponseBody>, Arc<Upstream>), ProxyError> {
        let settings = &snap.settings;
        let mut plan = Plan::new(req, fields, conn, snap, seen)?;
        let candidates = Candidates {
            snapshot: snap,
            registry: table.registry(),
        };
        let bounded = settings.balance.bounded_load > 0.0;
        let mut route = snap.selector.route(plan.key, table.in_panic(), &candidates);
        let mut last_err = ProxyError::NoBackend;
        for attempt in 0..=settings.retries {
            let Some(member) = route.next() else { break };
            let upstream = &snap.upstreams[member as usize];
            if attempt > 0 {
                self.retries.increment(1);
            }
            let Some(request) = plan.request_for(upstream) else {
                break;
            };
            *attempts += 1;
            let guard = upstream.start(bounded);
            let wire = plan.wire.as_ref();
            // The first attempt starts with the request (one clock reading for both).
            let began = if attempt == 0 { start } else { Instant::now() };
            match self
                .attempt(upstream, request, wire, settings, conn.worker, began)
                .await
            {
                Attempt::Response(parts, reply) => {
                    let status = parts.status.as_u16();
                    let failed = matches!(status, 502..=504).then_some(ErrorKind::Status);
                    self.on_outcome(table, upstream, failed, settings);
                    upstream.count_response(status, start.elapsed());
                    let lease = Lease {
                        guard,
                        worker: conn.worker,
                        h2: None,
                    };
                    return Ok((plan.respond(parts, reply, lease, conn), upstream.clone()));
                }
                Attempt::NotSent(request, err) => {
                    // Nothing reached the backend: any method may go elsewhere.
                    self.on_outcome(table, upstream, Some(ErrorKind::Connect), settings);
                    tracing::debug!(backend = %upstream.id, error = %err, "connect failed");
                    plan.pending = Some(request);
                    last_err = ProxyError::Connect;
                }
                Attempt::ClientFailed => return Err(ProxyError::ClientBody),
                Attempt::Failed(..) | Attempt::Unprocessed if plan.client_failed() => {
                    tracing::debug!(backend = %upstream.id, "the client's request body broke off");
                    return Err(ProxyError::ClientBody);
                }
                Attempt::Unprocessed => {
                    // Not processed: any method may go elsewhere, if it can be rebuilt. Counted
                    // as a reset, but not a health failure: the backend is busy or going away.
                    tracing::debug!(backend = %upstream.id, "stream not processed (refused or GOAWAY)");
                    upstream.count_error(ErrorKind::Reset);
                    last_err = ProxyError::Reset;
                    if !plan.can_resend(true) {
                        return Err(last_err);
                    }
                }
                Attempt::BadAnswer(why, sent) => {
                    self.on_outcome(table, upstream, Some(ErrorKind::Reset), settings);
                    last_err = ProxyError::BadResponse(why);
                    if !plan.can_resend(false) {
                        return Err(last_err);
                    }
                    plan.take_back(sent);
                }
                Attempt::Failed(kind, sent) => {
                    self.on_outcome(table, upstream, Some(kind), settings);
                    last_err = if kind == ErrorKind::Timeout {
                        ProxyError::Timeout
                    } else {
                        ProxyError::Reset
                    };
                    if !plan.can_resend(false) {
                        // The request (or part of its body) was sent, and it is not safe or
                        // not possible to send it again.
                        return Err(last_err);
                    }
                    plan.take_back(sent);
                }
            }
        }
        Err(last_err)
    }

    /// One attempt on one backend.
    async fn attempt(
        &self,
        upstream: &Upstream,
        mut request: Request<RequestBody>,
        wire: Option<&Outgoing>,
        settings: &Settings,
        worker: usize,
        mut began: Instant,
    ) -> Attempt {
        // A pooled connection may have closed since it was parked; the request comes back
        // untouched then, and we take another connection (a few times at most).
        for _ in 0..3 {
            let conn = match upstream.pooled(worker, began) {
                Some(c) => c,
                None => match upstream.connect(worker, settings.connect_timeout).await {
                    // The answer's time starts once connected.
                    Ok(c) => {
                        began = Instant::now();
                        c
                    }
                    Err(e) => return Attempt::NotSent(request, e),
                },
            };
            let deadline = began + settings.request_timeout;
            let mut sender = match conn {
                BackendConn::H2(sender) => sender,
                BackendConn::H1(c) => {
                    let sent = c.send(&mut request, wire);
                    match deadline::timeout_at(deadline, sent).await {
                        Ok(Ok(resp)) => {
                            let (parts, body) = resp.into_parts();
                            return Attempt::Response(parts, Reply::H1(body));
                        }
                        Ok(Err(SendError::NotSent(e))) => {
                            tracing::debug!(backend = %upstream.id, error = %e, "connection closed before the request went out");
                            continue;
                        }
                        Ok(Err(SendError::Client(e))) => {
                            tracing::debug!(backend = %upstream.id, error = %e, "the client's request body broke off");
                            return Attempt::ClientFailed;
                        }
                        Ok(Err(SendError::Failed(e))) => {
                            tracing::debug!(backend = %upstream.id, error = %e, "backend failed before answering");
                            if let Some(bad) = bad_answer(&e) {
                                return Attempt::BadAnswer(bad, Some(request));
                            }
                            return Attempt::Failed(ErrorKind::Reset, Some(request));
                        }
                        Err(_) => return Attempt::Failed(ErrorKind::Timeout, Some(request)),
                    }
                }
            };
            // Boxed: an HTTP/2 exchange's state (about 600 bytes) would otherwise widen every
            // request's forwarding future, HTTP/1 ones included, and each move of it.
            let sent = Box::pin(sender.try_send_request(request));
            match deadline::timeout_at(deadline, sent).await {
                Ok(Ok(resp)) => {
                    let (parts, body) = resp.into_parts();
                    return Attempt::Response(parts, Reply::H2(body, sender));
                }
                Ok(Err(mut e)) => match e.take_message() {
                    Some(r) => {
                        request = r;
                        continue;
                    }
                    None if unprocessed(e.error()) => return Attempt::Unprocessed,
                    None => {
                        tracing::debug!(backend = %upstream.id, error = %e.error(), "backend failed before answering");
                        return Attempt::Failed(ErrorKind::Reset, None);
                    }
                },
                Err(_) => return Attempt::Failed(ErrorKind::Timeout, None),
            }
        }
        Attempt::NotSent(
            request,
            std::io::Error::other("pooled connections kept closing"),
        )
    }

    /// An attempt's outcome (`failure` None for a good answer) into the backend's metrics and
    /// this peer's local view; a flip changes routing at once and tells the health voter.
    fn on_outcome(
        &self,
        table: &RoutingTable,
        upstream: &Upstream,
        failure: Option<ErrorKind>,
        settings: &Settings,
    ) {
        if let Some(kind) = failure {
            upstream.count_error(kind);
        }
        if upstream
            .record(Source::Traffic, failure.is_none(), &settings.thresholds)
            .is_some()
        {
            table.health_changed(&upstream.id);
        }
    }
}

/// Whether an HTTP/2 backend did no processing of the stream (RFC 9113 §8.7): it reset it with
/// REFUSED_STREAM, or its GOAWAY left the stream out. The h2 crate gives a stream the backend's
/// GOAWAY as its error only when the stream's id is above the frame's last stream id, or when
/// the stream was to open after it (one the GOAWAY covers ends normally, or as a broken pipe if
/// the connection closes under it), so a remote GOAWAY, whatever its code, means unprocessed.
fn unprocessed(e: &hyper::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(h2) = s.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM)
                || (h2.is_go_away() && h2.is_remote());
        }
        source = s.source();
    }
    false
}

/// Turn the client's request into the backend's: origin-form target, HTTP/1.1, hop-by-hop
/// fields removed, X-Forwarded-* set, Host kept. The fields are rewritten in the request's map;
/// or, when `fields` holds them in wire form, beside it (`Outgoing`); or, when `lines` (nothing
/// reads the map later and no backend speaks HTTP/2), from an HTTP/2 client's map straight into
/// the lines an HTTP/1 backend gets.
fn rewrite(
    req: Request<ClientBody>,
    fields: Option<WireFields>,
    lines: bool,
    conn: &ConnInfo,
    seen: Option<Arc<AtomicU64>>,
) -> Result<Rewritten, ProxyError> {
    let (mut parts, body) = req.into_parts();
    if parts.method == Method::CONNECT {
        // No key allows tunnels to arbitrary targets, over HTTP/1 or HTTP/2 (SPEC: 405).
        return Err(ProxyError::MethodNotAllowed);
    }
    let as_lines = match &fields {
        None if lines && parts.version == Version::HTTP_2 => rewrite_map_as_lines(&parts, conn)?,
        _ => None,
    };
    let (upgrade, trailers, wire) = match (fields, as_lines) {
        (Some(f), _) => (None, false, Some(rewrite_wire(f, &parts, conn)?)),
        (None, Some(out)) => {
            // Every field the backend gets is in `out`.
            parts.headers = HeaderMap::new();
            (None, false, Some(out))
        }
        (None, None) => {
            let (upgrade, trailers) = rewrite_map(&mut parts, conn)?;
            (upgrade, trailers, None)
        }
    };
    // Origin form: the path and query only (a cheap clone of the received bytes).
    let mut target = http::uri::Parts::default();
    target.path_and_query = Some(
        parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
    );
    let uri = Uri::from_parts(target).map_err(|_| ProxyError::BadRequest("bad request target"))?;
    let body = if body.is_end_stream() {
        RequestBody::Empty
    } else {
        RequestBody::Stream {
            inner: body,
            tape: None,
            bytes: None,
            seen,
            broke: Arc::new(AtomicBool::new(false)),
        }
    };
    parts.uri = uri;
    parts.version = Version::HTTP_11;
    // What the client's server put there (an upgrade handle, say) is not the backend's.
    parts.extensions.clear();
    Ok(Rewritten {
        request: Request::from_parts(parts, body),
        upgrade,
        te_trailers: trailers,
        wire,
    })
}

/// What `rewrite` makes of a client's request.
struct Rewritten {
    /// The backend's request (origin-form target, HTTP/1.1, fields rewritten unless `wire`).
    request: Request<RequestBody>,
    /// The Upgrade value to forward, if the client asked for one.
    upgrade: Option<HeaderValue>,
    /// The client said `TE: trailers`.
    te_trailers: bool,
    /// The rewritten fields in wire form, when the client's came that way.
    wire: Option<Outgoing>,
}

/// Where the Host a request goes on with comes from (the one policy both rewrites apply).
enum ReceivedHost<'a> {
    /// The client's one Host field, which goes on as it came.
    Field(&'a [u8]),
    /// The target's authority (absolute form, or HTTP/2's `:authority`): it replaces any Host
    /// field (RFC 9112 §3.2.2).
    Target(HeaderValue),
    /// None (an HTTP/1.0 client): each attempt sends its backend's.
    None,
}

impl ReceivedHost<'_> {
    /// The host the request goes on with, if any.
    fn bytes(&self) -> Option<&[u8]> {
        match self {
            ReceivedHost::Field(f) => Some(f),
            ReceivedHost::Target(v) => Some(v.as_bytes()),
            ReceivedHost::None => None,
        }
    }
}

/// The received Host of a request whose Host fields are `hosts`: refused when there are
/// several, when the one there is not a valid host, or when an HTTP/1.1 request has none.
fn received_host<'a>(
    mut hosts: impl Iterator<Item = &'a [u8]>,
    uri: &Uri,
    version: Version,
) -> Result<ReceivedHost<'a>, ProxyError> {
    let field = hosts.next();
    if hosts.next().is_some() {
        return Err(ProxyError::BadRequest("more than one Host"));
    }
    if let Some(f) = field {
        if !valid_host(f) {
            return Err(ProxyError::BadRequest("bad Host"));
        }
    }
    if let Some(a) = uri.authority() {
        if !valid_host(a.as_str().as_bytes()) {
            return Err(ProxyError::BadRequest("bad request target"));
        }
        let v = HeaderValue::from_str(a.as_str())
            .map_err(|_| ProxyError::BadRequest("bad request target"))?;
        return Ok(ReceivedHost::Target(v));
    }
    match field {
        Some(f) => Ok(ReceivedHost::Field(f)),
        None if version == Version::HTTP_11 => Err(ProxyError::BadRequest("missing Host")),
        None => Ok(ReceivedHost::None),
    }
}

/// A Host value: `host[:port]` (a name, an IPv4 address or a bracketed IPv6 one), no userinfo.
fn valid_host(h: &[u8]) -> bool {
    !h.is_empty()
        && h.len() <= 255
        && h.iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:[]%".contains(b))
}

/// The proxy's lines of a request in wire form: X-Forwarded-For (after the `prior` values),
/// X-Forwarded-Proto, and X-Forwarded-Host when the request goes on with a `host`.
fn forwarded_lines<'a>(
    out: &mut Vec<u8>,
    prior: impl Iterator<Item = &'a [u8]>,
    conn: &ConnInfo,
    host: Option<&[u8]>,
) {
    out.extend_from_slice(b"x-forwarded-for: ");
    forwarded_for(prior, conn.client_ip.as_bytes(), out);
    out.extend_from_slice(if conn.https {
        b"\r\nx-forwarded-proto: https\r\n"
    } else {
        b"\r\nx-forwarded-proto: http\r\n"
    });
    if let Some(h) = host {
        out.extend_from_slice(b"x-forwarded-host: ");
        out.extend_from_slice(h);
        out.extend_from_slice(b"\r\n");
    }
}

/// The X-Forwarded-For value: the prior fields' values that are text, then the client.
fn forwarded_for<'a>(prior: impl Iterator<Item = &'a [u8]>, client_ip: &[u8], out: &mut Vec<u8>) {
    for v in prior {
        if v.iter().all(|b| *b == b'\t' || (b' '..=b'~').contains(b)) {
            out.extend_from_slice(v);
            out.extend_from_slice(b", ");
        }
    }
    out.extend_from_slice(client_ip);
}

/// The rewrite of a request's fields in its map. Returns the Upgrade value to forward and
/// whether the client said `TE: trailers`.
fn rewrite_map(
    parts: &mut http::request::Parts,
    conn: &ConnInfo,
) -> Result<(Option<HeaderValue>, bool), ProxyError> {
    let fields = strip_hop_by_hop(&mut parts.headers);
    // The request goes on framed by its body alone.
    parts.headers.remove(header::CONTENT_LENGTH);
    let host = match received_host(
        parts
            .headers
            .get_all(header::HOST)
            .iter()
            .map(HeaderValue::as_bytes),
        &parts.uri,
        parts.version,
    )? {
        ReceivedHost::Field(_) => fields.host,
        ReceivedHost::Target(v) => Some(v),
        ReceivedHost::None => None,
    };
    // `TE: trailers` says the client takes trailers (gRPC sends it); it is hop-by-hop, but this
    // proxy passes trailers through, so an HTTP/2 backend is told the same (`request_for` drops
    // it for HTTP/1 ones).
    let trailers = fields.te_trailers;
    // Only HTTP/1.1 upgrades (HTTP/2 has no Upgrade).
    let upgrade = fields.upgrade.filter(|_| parts.version == Version::HTTP_11);
    if trailers {
        parts
            .headers
            .insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if let Some(u) = &upgrade {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, u.clone());
    }
    // HTTP/2 may split Cookie into several fields; an HTTP/1 backend gets them joined with "; "
    // (RFC 9113 section 8.2.3).
    if parts.version == Version::HTTP_2 {
        let mut cookies = parts.headers.get_all(header::COOKIE).iter();
        if let (Some(_), Some(_)) = (cookies.next(), cookies.next()) {
            let joined: Vec<&[u8]> = parts
                .headers
                .get_all(header::COOKIE)
                .iter()
                .map(|v| v.as_bytes())
                .collect();
            let joined = joined.join(&b"; "[..]);
            let v = HeaderValue::from_bytes(&joined)
                .map_err(|_| ProxyError::BadRequest("bad Cookie"))?;
            parts.headers.insert(header::COOKIE, v);
        }
    }
    // X-Forwarded-For: the client after whatever is there.
    let xff = if !fields.forwarded_for {
        // The usual case: the connection's own value, made once per connection.
        conn.client_ip.clone()
    } else {
        let mut v = Vec::with_capacity(64);
        forwarded_for(
            parts
                .headers
                .get_all(&X_FORWARDED_FOR)
                .iter()
                .map(HeaderValue::as_bytes),
            conn.client_ip.as_bytes(),
            &mut v,
        );
        HeaderValue::from_bytes(&v).map_err(|_| ProxyError::BadRequest("bad X-Forwarded-For"))?
    };
    parts.headers.insert(&X_FORWARDED_FOR, xff);
    parts.headers.insert(
        &X_FORWARDED_PROTO,
        HeaderValue::from_static(if conn.https { "https" } else { "http" }),
    );
    if let Some(host) = host {
        parts.headers.insert(&X_FORWARDED_HOST, host.clone());
        parts.headers.insert(header::HOST, host);
    }
    Ok((upgrade, trailers))
}

/// The rewrite of `rewrite_map` done by writing an HTTP/1 backend's lines from the map as it
/// came, never changing the map (each insertion and removal there is a hash and a probe): the
/// fields that go on as they are in one pass, then the proxy's. For an HTTP/2 client, whose
/// fields always come as a map, when nothing reads the map afterwards. `None` when a field
/// asks for what only the map rewrite does: a Connection field (which may name others to drop;
/// HTTP/2 forbids it, but the rule is the map's to apply) or an Upgrade.
fn rewrite_map_as_lines(
    parts: &http::request::Parts,
    conn: &ConnInfo,
) -> Result<Option<Outgoing>, ProxyError> {
    let headers = &parts.headers;
    let mut out = Vec::with_capacity(256);
    let (mut hosts, mut prior_for, mut prior_host) = (false, false, false);
    // HTTP/2 may split Cookie into several fields; an HTTP/1 backend gets one, joined with "; "
    // (RFC 9113 section 8.2.3).
    let join_cookies = parts.version == Version::HTTP_2;
    let mut cookie: Vec<u8> = Vec::new();
    for (name, value) in headers {
        if name == header::CONNECTION || name == header::UPGRADE {
            return Ok(None);
        }
        if name == header::HOST {
            hosts = true;
        } else if name == X_FORWARDED_FOR {
            prior_for = true;
        } else if name == X_FORWARDED_HOST {
            prior_host = true;
        } else if name == header::COOKIE && join_cookies {
            cookie.extend_from_slice(if cookie.is_empty() {
                b"cookie: "
            } else {
                b"; "
            });
            cookie.extend_from_slice(value.as_bytes());
        } else if !(name == header::CONTENT_LENGTH
            || name == X_FORWARDED_PROTO
            || hop_by_hop().contains(&name))
        {
            super::wire::field(&mut out, name, value);
        }
    }
    if !cookie.is_empty() {
        out.extend_from_slice(&cookie);
        out.extend_from_slice(b"\r\n");
    }
    let host_fields = hosts.then(|| headers.get_all(header::HOST));
    let host = received_host(
        host_fields.iter().flatten().map(HeaderValue::as_bytes),
        &parts.uri,
        parts.version,
    )?;
    let received = host.bytes();
    let prior = prior_for.then(|| headers.get_all(&X_FORWARDED_FOR));
    let prior = prior.iter().flatten().map(HeaderValue::as_bytes);
    forwarded_lines(&mut out, prior, conn, received);
    match received {
        Some(h) => {
            out.extend_from_slice(b"host: ");
            out.extend_from_slice(h);
            out.extend_from_slice(b"\r\n");
        }
        // With no host to tell, the client's X-Forwarded-Host goes on as it came.
        None if prior_host => {
            for v in headers.get_all(&X_FORWARDED_HOST) {
                super::wire::field(&mut out, &X_FORWARDED_HOST, v);
            }
        }
        None => {}
    }
    Ok(Some(Outgoing {
        needs_host: received.is_none(),
        fields: WireFields::empty(),
        added: out,
        host: None,
    }))
}

/// The same rewrite of an HTTP/1 client's fields kept in wire form, for an HTTP/1 backend
/// (no upgrade: those go through the map): the client's lines pass as they came, less the
/// framing and hop-by-hop ones and the X-Forwarded-* ones the proxy sets, and the proxy's
/// lines follow.
fn rewrite_wire(
    mut fields: WireFields,
    parts: &http::request::Parts,
    conn: &ConnInfo,
) -> Result<Outgoing, ProxyError> {
    // Reading the fields first (the lines are borrowed), then marking those not passed on.
    let (added, host) = {
        let host = received_host(fields.values(FieldRole::Host), &parts.uri, parts.version)?;
        let received = host.bytes();
        let mut added = Vec::with_capacity(128);
        let prior = fields.values(FieldRole::ForwardedFor);
        forwarded_lines(&mut added, prior, conn, received);
        if let ReceivedHost::Target(a) = &host {
            added.extend_from_slice(b"host: ");
            added.extend_from_slice(a.as_bytes());
            added.extend_from_slice(b"\r\n");
        }
        let replaced = matches!(host, ReceivedHost::Target(_));
        (added, (received.is_some(), replaced))
    };
    let (has_host, replaced) = host;
    fields.drop_all(FieldRole::ForwardedFor);
    fields.drop_all(FieldRole::ForwardedProto);
    if has_host {
        fields.drop_all(FieldRole::ForwardedHost);
    }
    if replaced {
        fields.drop_all(FieldRole::Host);
    }
    Ok(Outgoing {
        needs_host: !has_host,
        fields,
        added,
        host: None,
    })
}

/// Splice an upgraded client connection to the upgraded backend connection (`early`: what the
/// backend sent right behind its 101). The lease keeps the backend counted in flight for the
/// tunnel's life; its connection is never pooled again.
async fn tunnel(
    client: ClientUpgrade,
    mut backend: crate::net::BackendIo,
    early: bytes::Bytes,
    lease: Lease,
    close: tokio_util::sync::CancellationToken,
) {
    match client.io().await {
        Ok(mut c) => {
            let splice = async {
                if !early.is_empty() {
                    tokio::io::AsyncWriteExt::write_all(&mut c, &early).await?;
                }
                tokio::io::copy_bidirectional(&mut c, &mut backend).await
            };
            tokio::select! {
                r = splice => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "tunnel closed");
                    }
                }
                _ = close.cancelled() => tracing::debug!("tunnel closed (idle, or the shutdown grace ended)"),
            }
        }
        Err(e) => tracing::debug!(error = %e, "client upgrade failed"),
    }
    drop(lease);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_fields_and_connection_tokens_go() {
        let mut h = map(&[
            ("connection", "close, x-a"),
            ("connection", "X-B"),
            ("x-a", "1"),
            ("x-b", "2"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("proxy-connection", "keep-alive"),
            ("host", "h"),
            ("x-keep", "3"),
        ]);
        assert_eq!(strip_hop_by_hop(&mut h).upgrade, None);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, vec!["host", "x-keep"]);
    }

    #[test]
    fn one_pass_sees_hosts_forwarded_for_and_te_trailers() {
        let mut h = map(&[
            ("host", "a"),
            ("te", "gzip, Trailers"),
            ("x-forwarded-for", "1.2.3.4"),
            ("host", "b"),
        ]);
        let seen = strip_hop_by_hop(&mut h);
        assert_eq!(seen.hosts, 2);
        assert_eq!(seen.host, Some(HeaderValue::from_static("a")));
        assert!(seen.te_trailers && seen.forwarded_for);
        assert!(!h.contains_key("te"));
        let seen = strip_hop_by_hop(&mut map(&[("te", "gzip")]));
        assert!(!seen.te_trailers && !seen.forwarded_for && seen.hosts == 0);
    }

    #[test]
    fn upgrade_is_reported_only_when_connection_asks() {
        let mut h = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert_eq!(
            strip_hop_by_hop(&mut h).upgrade,
            Some(HeaderValue::from_static("websocket"))
        );
        assert!(h.is_empty());
        let mut h = map(&[("upgrade", "websocket")]);
        assert_eq!(strip_hop_by_hop(&mut h).upgrade, None);
        // Host and X-Forwarded-For cannot be named away.
        let mut h = map(&[
            ("connection", "host, x-forwarded-for"),
            ("host", "h"),
            ("x-forwarded-for", "1.2.3.4"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2);
    }

    /// The fields an HTTP/1 backend gets, by either rewrite, as sorted `name: value` lines.
    fn both_rewrites(
        head: &[u8],
    ) -> (
        Result<Vec<String>, ProxyError>,
        Result<Vec<String>, ProxyError>,
    ) {
        let mut slots = [httparse::EMPTY_HEADER; 64];
        let mut parsed = httparse::Request::new(&mut slots);
        let len = match parsed.parse(head) {
            Ok(httparse::Status::Complete(n)) => n,
            other => panic!("test head does not parse: {other:?}"),
        };
        let target = parsed.path.unwrap().to_string();
        let mut framing = crate::proxy::framing::Framing::default();
        let noted = WireFields::note(head, parsed.headers, &mut framing);
        let fields = WireFields::new(bytes::Bytes::copy_from_slice(&head[..len]), noted);
        let conn = test_conn();
        let parts = || {
            let mut req = Request::new(());
            *req.uri_mut() = target.parse().unwrap();
            req.into_parts().0
        };
        // The wire rewrite, as the HTTP/1 client writes it.
        let wire = rewrite_wire(fields.clone(), &parts(), &conn).map(|o| sorted_lines(&o));
        // The map rewrite, as `handle` makes the map.
        let mut p = parts();
        p.headers = fields.into_map(true, 4);
        let map = map_rewritten(&mut p, &conn);
        (wire, map)
    }

    fn test_conn() -> ConnInfo {
        let state = Arc::new(crate::proxy::conn::ConnState::default());
        ConnInfo::new("10.1.2.3:5555".parse().unwrap(), false, 0, state)
    }

    /// What an HTTP/1 backend gets of an `Outgoing`, as sorted `name: value` lines.
    fn sorted_lines(o: &Outgoing) -> Vec<String> {
        let mut text = Vec::new();
        o.write(&mut text);
        let mut v: Vec<String> = String::from_utf8_lossy(&text)
            .split("\r\n")
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (n, v) = l.split_once(':').unwrap();
                format!("{}: {}", n.to_ascii_lowercase(), v.trim())
            })
            .collect();
        v.sort();
        v
    }

    /// The map rewrite of `p`, as the HTTP/1 client writes the map (TE and the framing fields
    /// are the client's to write), as sorted lines.
    fn map_rewritten(
        p: &mut http::request::Parts,
        conn: &ConnInfo,
    ) -> Result<Vec<String>, ProxyError> {
        rewrite_map(p, conn).map(|_| {
            let mut out = Vec::new();
            for (n, v) in &p.headers {
                if n != header::TE && n != header::CONTENT_LENGTH && n != header::TRANSFER_ENCODING
                {
                    crate::proxy::wire::field(&mut out, n, v);
                }
            }
            sorted_lines(&Outgoing {
                fields: WireFields::empty(),
                added: out,
                needs_host: false,
                host: None,
            })
        })
    }

    /// An HTTP/2 client's request to `target` with these fields, rewritten by the map rewrite
    /// and written as lines from the map; whether the lines ask for the backend's Host.
    #[allow(clippy::type_complexity)]
    fn map_and_lines(
        pairs: &[(&str, &str)],
        target: &str,
    ) -> (
        Result<Vec<String>, ProxyError>,
        Result<Option<(Vec<String>, bool)>, ProxyError>,
    ) {
        let conn = test_conn();
        let parts = || {
            let mut req = Request::new(());
            *req.uri_mut() = target.parse().unwrap();
            *req.version_mut() = Version::HTTP_2;
            *req.headers_mut() = map(pairs);
            req.into_parts().0
        };
        let lines = rewrite_map_as_lines(&parts(), &conn)
            .map(|o| o.map(|o| (sorted_lines(&o), o.needs_host)));
        (map_rewritten(&mut parts(), &conn), lines)
    }

    #[test]
    fn an_http2_maps_lines_are_its_map_rewrite_on_examples() {
        let pairs = [
            ("cookie", "a=1"),
            ("x-forwarded-for", "1.1.1.1"),
            ("te", "trailers"),
            ("content-length", "0"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "spoofed"),
            ("accept", "*/*"),
            ("cookie", "b=2"),
            ("keep-alive", "5"),
        ];
        let (map, lines) = map_and_lines(&pairs, "http://abs.example/x");
        let (lines, needs_host) = lines.unwrap().unwrap();
        assert_eq!(map.unwrap(), lines);
        assert!(!needs_host);
        assert_eq!(
            lines,
            [
                "accept: */*",
                "cookie: a=1; b=2",
                "host: abs.example",
                "x-forwarded-for: 1.1.1.1, 10.1.2.3",
                "x-forwarded-host: abs.example",
                "x-forwarded-proto: http",
            ]
        );
        // No authority and no Host: the backend's Host is added per attempt, and the client's
        // X-Forwarded-Host goes on.
        let (map, lines) = map_and_lines(&[("x-forwarded-host", "h")], "/x");
        let (lines, needs_host) = lines.unwrap().unwrap();
        assert_eq!(map.unwrap(), lines);
        assert!(needs_host);
        assert_eq!(
            lines,
            [
                "x-forwarded-for: 10.1.2.3",
                "x-forwarded-host: h",
                "x-forwarded-proto: http"
            ]
        );
        // Refused alike.
        let (map, lines) = map_and_lines(&[("host", "a"), ("host", "b")], "/x");
        assert_eq!(map.unwrap_err(), lines.unwrap_err());
        // What only the map rewrite does is left to it.
        for pair in [("connection", "x-a"), ("upgrade", "websocket")] {
            assert!(matches!(map_and_lines(&[pair], "/").1, Ok(None)));
        }
    }

    #[test]
    fn the_two_rewrites_apply_one_policy_on_examples() {
        let (wire, map) = both_rewrites(
            b"GET http://abs.example/x HTTP/1.1\r\nHost: other\r\nConnection: X-Gone, Content-Length\r\nX-Gone: 1\r\nX-Forwarded-For: 1.1.1.1\r\nX-Forwarded-For: \xffbad\r\nContent-Length: 0\r\nKeep-Alive: 5\r\nX-Kept: y\r\n\r\n",
        );
        assert_eq!(wire, map);
        assert_eq!(
            wire.unwrap(),
            [
                "host: abs.example",
                "x-forwarded-for: 1.1.1.1, 10.1.2.3",
                "x-forwarded-host: abs.example",
                "x-forwarded-proto: http",
                "x-kept: y",
            ]
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(500))]

        /// One header policy, two encoders: for any head, the wire rewrite and the map rewrite
        /// give an HTTP/1 backend the same fields, or refuse it alike.
        #[test]
        fn the_two_rewrites_give_the_same_fields(
            picks in proptest::collection::vec((0usize..16, 0usize..8), 0..10),
            absolute in proptest::bool::weighted(0.2),
        ) {
            const NAMES: [&str; 16] = [
                "Host", "X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host", "Connection",
                "Keep-Alive", "TE", "Trailer", "Proxy-Connection", "Content-Length", "X-A", "x-a",
                "Cookie", "Accept", "Expect", "X-Named",
            ];
            const VALUES: [&str; 8] = [
                "a", "h.example:8080", "1.2.3.4", "X-A, close", "trailers", "x-named",
                "keep-alive, X-Forwarded-For", "",
            ];
            let mut head = String::from(if absolute { "GET http://t.example/p HTTP/1.1\r\n" } else { "GET /p HTTP/1.1\r\n" });
            for (n, v) in &picks {
                head.push_str(&format!("{}: {}\r\n", NAMES[*n], VALUES[*v]));
            }
            head.push_str("\r\n");
            let (wire, map) = both_rewrites(head.as_bytes());
            proptest::prop_assert_eq!(wire, map, "{}", head);
        }

        /// One header policy, two encoders: for any HTTP/2 client's map, the lines written from
        /// it and its map rewrite give an HTTP/1 backend the same fields, or refuse it alike.
        #[test]
        fn an_http2_maps_lines_are_its_map_rewrite(
            picks in proptest::collection::vec((0usize..14, 0usize..7), 0..10),
            authority in proptest::bool::weighted(0.7),
        ) {
            const NAMES: [&str; 14] = [
                "host", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "te",
                "trailer", "keep-alive", "content-length", "cookie", "x-a", "accept", "cookie",
                "proxy-connection", "transfer-encoding",
            ];
            const VALUES: [&str; 7] = [
                "a", "h.example:8080", "1.2.3.4", "trailers", "s=1", "", "bad host",
            ];
            let pairs: Vec<(&str, &str)> =
                picks.iter().map(|(n, v)| (NAMES[*n], VALUES[*v])).collect();
            let target = if authority { "http://t.example/p" } else { "/p" };
            let (map, lines) = map_and_lines(&pairs, target);
            match (map, lines) {
                (Ok(map), Ok(Some((lines, needs_host)))) => {
                    proptest::prop_assert_eq!(&map, &lines, "{:?}", pairs);
                    proptest::prop_assert_eq!(
                        needs_host,
                        !map.iter().any(|l| l.starts_with("host:")),
                        "{:?}", pairs
                    );
                }
                (Err(m), Err(l)) => proptest::prop_assert_eq!(m, l, "{:?}", pairs),
                other => proptest::prop_assert!(false, "{:?}: {:?}", pairs, other),
            }
        }
    }
}
