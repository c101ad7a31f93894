//! HTTP/1.1 client connections, served by Shoal's own loop.
//!
//! hyper's server runs a dispatcher per connection that parses every head into its own types,
//! polls the service through a boxed future and frames the answer through several layers of
//! buffers. Here one loop reads a head out of one buffer with `httparse` (field values shared from
//! it, not copied), hands the request to the forwarder, and writes the answer's head and its body
//! frames straight from the answer: a small answer costs one read and one write. The request
//! body reads from the same buffer as the forwarder polls it, so uploads stream as before.
//!
//! Shoal's rules for a request head (RFC 9112): Content-Length with Transfer-Encoding is refused
//! (400, the connection closes: the framing smuggling relies on), as is a Transfer-Encoding whose
//! last coding is not chunked or that comes with HTTP/1.0, and a Content-Length that is not one
//! number; a head over `proxy.max_header_bytes` or with more than 100 fields gets 431; anything
//! httparse cannot read gets 400. None of these reach a backend.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::Poll;

use http::header;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use tokio::io::AsyncWrite;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::proxy::body::ClientBody;
use crate::proxy::client::{lock, BoxIo, H1Body, PendingUpgrade, Rewind, SharedWire, Wire};
use crate::proxy::conn::ConnState;
use crate::proxy::error::ProxyError;
use crate::proxy::forward::{ConnInfo, Proxy};
use crate::proxy::framing;
use crate::proxy::response::ResponseBody;
use crate::proxy::wire::{self, Framing, Role, WireFields, GATHER, MAX_HEADERS};

/// The HTTP/2 connection preface (RFC 9113 §3.4): a client speaking HTTP/2 with prior knowledge.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The answer buffer's first size: most answer heads fit.
const HEAD_ROOM: usize = 512;
/// How the HTTP/1 loop ended.
pub enum Ended {
    /// The connection is done (closed by either side, idle, drained, or refused).
    Closed,
    /// The client spoke HTTP/2 with prior knowledge: the bytes, with what was already read.
    H2(Rewind),
    /// A 101 went out: the connection now belongs to the tunnel.
    Upgraded,
}

/// What the loop keeps of a request while its answer goes out.
struct Asked {
    head: bool,
    version: Version,
    keep_alive: bool,
    /// The request has a body (it must be read to its end before the next head).
    body: bool,
    upgrade: Option<oneshot::Sender<Rewind>>,
}

/// Why a head was refused.
enum Refused {
    TooLarge,
    Bad(&'static str),
    Ambiguous,
    /// A transfer coding other than chunked (501).
    Coding,
    /// CONNECT (405).
    Method,
}

/// One client connection speaking HTTP/1.1 (or 1.0).
pub struct Conn {
    wire: SharedWire,
    out: Vec<u8>,
    max_head: usize,
}

impl Conn {
    pub fn new(io: BoxIo, max_head: usize) -> Self {
        Self {
            wire: Arc::new(Mutex::new(Wire {
                io,
                rb: wire::ReadBuf::default(),
                answered: false,
                body_done: true,
            })),
            out: Vec::new(),
            max_head,
        }
    }

    /// Serve requests until the connection ends. `h2c`: a client may open with the HTTP/2
    /// preface (plain connections); `drain`: finish the request in hand and close.
    pub async fn serve(
        mut self,
        proxy: &Arc<Proxy>,
        info: &ConnInfo,
        state: &ConnState,
        drain: &CancellationToken,
        h2c: bool,
    ) -> Ended {
        let mut first = h2c;
        loop {
            let (req, fields, asked) = match self.next_request(first, drain).await {
                Ok(Next::Request(r, f, a)) => (r, f, a),
                Ok(Next::H2) => {
                    return match Arc::try_unwrap(self.wire) {
                        Ok(w) => {
                            let w = w.into_inner().unwrap_or_else(|e| e.into_inner());
                            Ended::H2(Rewind::new(w.rb.buf.freeze(), w.io))
                        }
                        Err(_) => Ended::Closed,
                    };
                }
                Ok(Next::Closed) => return Ended::Closed,
                Err(refused) => {
                    let resp = match refused {
                        Refused::TooLarge => {
                            let mut r = Response::new(ResponseBody::empty());
                            *r.status_mut() = StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE;
                            r
                        }
                        Refused::Bad(why) => ProxyError::BadRequest(why).response(),
                        Refused::Ambiguous => ProxyError::AmbiguousFraming.response(),
                        Refused::Coding => ProxyError::UnknownCoding.response(),
                        Refused::Method => ProxyError::MethodNotAllowed.response(),
                    };
                    let asked = Asked {
                        head: false,
                        version: Version::HTTP_11,
                        keep_alive: false,
                        body: false,
                        upgrade: None,
                    };
                    // Boxed, as below: an answer's state is no idle connection's to carry.
                    let _ = Box::pin(self.answer(resp, asked, drain)).await;
                    self.close_lingering().await;
                    return Ended::Closed;
                }
            };
            first = false;
            state.requests.fetch_add(1, Ordering::Relaxed);
            state.active_requests.fetch_add(1, Ordering::Relaxed);
            let had_body = asked.body;
            // Boxed: forwarding and answering take kilobytes of state (the forwarding future
            // alone is 6.5 KiB), which a connection waiting for its next request should not
            // keep. One box per request, made in place (not on the stack and then copied in).
            let exchange = Box::write(
                Box::new_uninit(),
                self.exchange(proxy, req, fields, asked, info, drain),
            );
            let (upgraded, outcome) = Box::into_pin(exchange).await;
            state.active_requests.fetch_sub(1, Ordering::Relaxed);
            match outcome {
                Answered::KeepAlive => {}
                Answered::Upgrade(tx) if upgraded => {
                    state.upgraded.store(true, Ordering::Relaxed);
                    if let Ok(w) = Arc::try_unwrap(self.wire) {
                        let w = w.into_inner().unwrap_or_else(|e| e.into_inner());
                        let _ = tx.send(Rewind::new(w.rb.buf.freeze(), w.io));
                    }
                    return Ended::Upgraded;
                }
                Answered::Upgrade(_) | Answered::Close => {
                    if had_body && !lock(&self.wire).body_done {
                        self.close_lingering().await;
                    } else {
                        self.shutdown().await;
                    }
                    return Ended::Closed;
                }
                Answered::Broken => return Ended::Closed,
            }
            if had_body && !lock(&self.wire).body_done {
                // The forwarder did not take the whole body (a backend answered early): the
                // next request's bytes cannot be found.
                self.close_lingering().await;
                return Ended::Closed;
            }
        }
    }

    /// One request forwarded and its answer written: whether the answer switched protocols,
    /// and how the connection goes on.
    async fn exchange(
        &mut self,
        proxy: &Arc<Proxy>,
        req: Request<ClientBody>,
        fields: WireFields,
        asked: Asked,
        info: &ConnInfo,
        drain: &CancellationToken,
    ) -> (bool, Answered) {
        let resp = proxy.handle(req, Some(fields), info).await;
        let upgraded = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        (upgraded, self.answer(resp, asked, drain).await)
    }

    /// Read and parse the next request head.
    async fn next_request(
        &mut self,
        mut h2c: bool,
        drain: &CancellationToken,
    ) -> Result<Next, Refused> {
        {
            let mut w = lock(&self.wire);
            w.answered = false;
            w.rb.release();
        }
        // A connection waiting for its next request keeps no answer buffer: the allocator
        // hands the next answer one back (a free list away), and 10,000 idle connections do not
        // hold 10,000 of them.
        self.out = Vec::new();
        loop {
            {
                let mut w = lock(&self.wire);
                let buf = &w.rb.buf;
                if h2c && !buf.is_empty() {
                    let n = buf.len().min(PREFACE.len());
                    if buf[..n] != PREFACE[..n] {
                        h2c = false;
                    } else if n == PREFACE.len() {
                        return Ok(Next::H2);
                    }
                }
                if !h2c && !buf.is_empty() {
                    if let Some(next) = parse(&self.wire, &mut w, self.max_head)? {
                        return Ok(next);
                    }
                }
            }
            let idle = lock(&self.wire).rb.buf.is_empty();
            let read = poll_fn(|cx| {
                let mut w = lock(&self.wire);
                let w = &mut *w;
                w.rb.poll_fill_fresh(&mut w.io, cx)
            });
            let n = if idle {
                // Between requests a drain closes the connection at once.
                tokio::select! {
                    biased;
                    n = read => n,
                    _ = drain.cancelled() => return Ok(Next::Closed),
                }
            } else {
                read.await
            };
            match n {
                Ok(0) | Err(_) => return Ok(Next::Closed),
                Ok(_) => {}
            }
        }
    }

    /// Write the answer: its head, then its body as the body yields it.
    async fn answer(
        &mut self,
        resp: Response<ResponseBody>,
        asked: Asked,
        drain: &CancellationToken,
    ) -> Answered {
        let (parts, body) = resp.into_parts();
        let status = parts.status;
        let mut keep_alive = asked.keep_alive && !drain.is_cancelled();
        let out = &mut self.out;
        out.clear();
        // Room for most heads at once (status line, the backend's fields, date).
        out.reserve(HEAD_ROOM);
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
        out.extend_from_slice(b"\r\n");
        let switching = status == StatusCode::SWITCHING_PROTOCOLS && asked.upgrade.is_some();
        // The answer is framed by the backend's framing decision (its body's length), never by
        // a received Content-Length or Transfer-Encoding, which are not passed on as they came.
        let mut map_length = MapLength::None;
        let mut dated = false;
        for (name, value) in &parts.headers {
            if name == header::CONNECTION && !switching {
                // The connection's fate is this loop's to say (a local answer asks for close).
                if value.as_bytes().eq_ignore_ascii_case(b"close") {
                    keep_alive = false;
                }
                continue;
            }
            if name == header::CONTENT_LENGTH {
                map_length = map_length.and(value.as_bytes());
                continue;
            }
            if name == header::TRANSFER_ENCODING {
                continue;
            }
            dated |= name == header::DATE;
            wire::field(out, name, value);
        }
        if let Some(fields) = body.wire_fields() {
            fields.write(out);
            dated |= fields.has(Role::Date);
        }
        if !dated {
            out.extend_from_slice(b"date: ");
            date(|d| out.extend_from_slice(d));
            out.extend_from_slice(b"\r\n");
        }
        let bodiless = status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED;
        let framing = if bodiless || asked.head {
            // No body follows. A HEAD's or a 304's length describes what a GET would get.
            let announced = body.announced().or(map_length.value());
            if let Some(n) = announced.filter(|_| !bodiless || status == StatusCode::NOT_MODIFIED) {
                content_length(out, n);
            }
            Out::None
        } else if let Some(n) = body.size_hint().exact() {
            content_length(out, n);
            Out::Length(n)
        } else if asked.version == Version::HTTP_11 {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
            Out::Chunked
        } else {
            keep_alive = false;
            Out::ToEnd
        };
        if !switching {
            if !keep_alive {
                out.extend_from_slice(b"connection: close\r\n");
            } else if asked.version == Version::HTTP_10 {
                out.extend_from_slice(b"connection: keep-alive\r\n");
            }
        }
        out.extend_from_slice(b"\r\n");
        lock(&self.wire).answered = true;
        let done = if framing == Out::None {
            drop(body);
            self.flush().await
        } else {
            self.stream(body, framing).await
        };
        match done {
            Ok(true) if switching => match asked.upgrade {
                Some(tx) => Answered::Upgrade(tx),
                None => Answered::Close,
            },
            Ok(true) if keep_alive => Answered::KeepAlive,
            Ok(true) => Answered::Close,
            Ok(false) | Err(_) => Answered::Broken,
        }
    }

    /// Write the body after the head in `out`; false if it broke off (the connection must close
    /// without finishing the message, so the client sees it was cut).
    async fn stream(&mut self, body: ResponseBody, framing: Out) -> io::Result<bool> {
        let mut body = std::pin::pin!(body);
        let mut left = match framing {
            Out::Length(n) => n,
            _ => u64::MAX,
        };
        loop {
            // Take what the body has now; when it has nothing, what is gathered goes out first.
            let polled = poll_fn(|cx| Poll::Ready(body.as_mut().poll_frame(cx))).await;
            let frame = match polled {
                Poll::Ready(f) => f,
                Poll::Pending => {
                    self.flush().await?;
                    poll_fn(|cx| body.as_mut().poll_frame(cx)).await
                }
            };
            let frame = match frame {
                None => break,
                Some(Ok(f)) => f,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "answer body broke off");
                    self.flush().await?;
                    return Ok(false);
                }
            };
            match frame.into_data() {
                Ok(data) if data.is_empty() => {}
                Ok(mut data) => {
                    if framing != Out::Chunked {
                        if data.len() as u64 > left {
                            // More than the head announced: the message would be corrupt.
                            data.truncate(left as usize);
                            self.out.extend_from_slice(&data);
                            self.flush().await?;
                            return Ok(false);
                        }
                        left -= data.len() as u64;
                    }
                    if data.len() >= GATHER {
                        // Large data goes out as it is, not through `out`.
                        if framing == Out::Chunked {
                            let mut size = [0u8; 18];
                            self.out.extend_from_slice(wire::hex(data.len(), &mut size));
                            self.out.extend_from_slice(b"\r\n");
                        }
                        self.flush().await?;
                        self.write_all(&data).await?;
                        if framing == Out::Chunked {
                            self.out.extend_from_slice(b"\r\n");
                        }
                    } else if framing == Out::Chunked {
                        wire::chunk(&mut self.out, &data);
                    } else {
                        self.out.extend_from_slice(&data);
                    }
                    if self.out.len() >= GATHER {
                        self.flush().await?;
                    }
                }
                Err(frame) => {
                    if framing == Out::Chunked {
                        wire::last_chunk(&mut self.out, frame.trailers_ref());
                        self.flush().await?;
                        return Ok(true);
                    }
                    break;
                }
            }
        }
        match framing {
            Out::Chunked => wire::last_chunk(&mut self.out, None),
            Out::Length(_) if left != 0 => {
                // Less than the head announced.
                self.flush().await?;
                return Ok(false);
            }
            _ => {}
        }
        self.flush().await?;
        Ok(framing != Out::ToEnd)
    }

    /// Write `out` and flush.
    async fn flush(&mut self) -> io::Result<bool> {
        let out = std::mem::take(&mut self.out);
        let res = self.write_all(&out).await;
        self.out = out;
        self.out.clear();
        res?;
        poll_fn(|cx| Pin::new(&mut lock(&self.wire).io).poll_flush(cx)).await?;
        Ok(true)
    }

    async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let n = poll_fn(|cx| Pin::new(&mut lock(&self.wire).io).poll_write(cx, data)).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            data = &data[n..];
        }
        Ok(())
    }

    async fn shutdown(&self) {
        let _ = poll_fn(|cx| Pin::new(&mut lock(&self.wire).io).poll_shutdown(cx)).await;
    }

    /// [`Self::linger`] in a box of its own: its timer and reads are no state for a connection
    /// to carry while it serves (three call sites would each keep a slot in its future).
    async fn close_lingering(&self) {
        Box::pin(self.linger()).await
    }

    /// Close after an answer while the client may still be sending (an unread body, a refused
    /// head): stop writing, then read and drop what comes for a short while, so that closing
    /// with unread bytes (a reset) cannot destroy the answer before the client reads it.
    async fn linger(&self) {
        self.shutdown().await;
        let mut budget: usize = 1 << 20;
        let drop_all = async {
            loop {
                let n = poll_fn(|cx| {
                    let mut w = lock(&self.wire);
                    let w = &mut *w;
                    w.rb.buf.clear();
                    w.rb.poll_fill(&mut w.io, cx)
                })
                .await;
                match n {
                    Ok(n) if n > 0 && n <= budget => budget -= n,
                    _ => return,
                }
            }
        };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), drop_all).await;
    }
}

/// A complete head out of the buffer, if there is one.
fn parse(shared: &SharedWire, w: &mut Wire, max_head: usize) -> Result<Option<Next>, Refused> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut fields);
    let len = match parsed.parse(&w.rb.buf) {
        Ok(httparse::Status::Complete(n)) if n <= max_head => n,
        Ok(httparse::Status::Complete(_)) => return Err(Refused::TooLarge),
        Ok(httparse::Status::Partial) if w.rb.buf.len() > max_head => {
            return Err(Refused::TooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Refused::TooLarge),
        Err(_) => return Err(Refused::Bad("malformed request head")),
    };
    let method = parsed
        .method
        .and_then(|m| Method::from_bytes(m.as_bytes()).ok())
        .ok_or(Refused::Bad("bad method"))?;
    let version = match parsed.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    if method == Method::CONNECT {
        // No key allows tunnels to arbitrary targets (SPEC: 405 unless one does).
        return Err(Refused::Method);
    }
    let path = parsed.path.unwrap_or("/");
    if !target_form_ok(&method, path.as_bytes()) {
        return Err(Refused::Bad("bad request target"));
    }
    let path_at = path.as_ptr() as usize - w.rb.buf.as_ptr() as usize;
    let path_span = path_at..path_at + path.len();
    let mut framing = Framing::default();
    let noted = WireFields::note(&w.rb.buf, parsed.headers, &mut framing);
    // The body's length, decided once from the fields as received (framing.rs).
    let decoder =
        framing
            .request(version == Version::HTTP_10)
            .map_err(|refusal| match refusal {
                framing::Refusal::Bad(why) => Refused::Bad(why),
                framing::Refusal::Ambiguous => Refused::Ambiguous,
                framing::Refusal::Coding => Refused::Coding,
            })?;
    // The fields stay as they came: the forwarder makes a map of them only if it needs one.
    let head = w.rb.buf.split_to(len).freeze();
    let fields = WireFields::new(head.clone(), noted);
    let uri = Uri::from_maybe_shared(head.slice(path_span))
        .map_err(|_| Refused::Bad("bad request target"))?;
    let keep_alive = !framing.close && (version == Version::HTTP_11 || framing.keep_alive);
    let has_body = !decoder.is_end();
    w.body_done = !has_body;
    let expect = (has_body
        && version == Version::HTTP_11
        && fields
            .values(Role::Expect)
            .next()
            .is_some_and(|v| v.eq_ignore_ascii_case(b"100-continue")))
    .then_some(0);
    let body = H1Body {
        wire: has_body.then(|| shared.clone()),
        decoder,
        expect,
    };
    let mut req = Request::new(ClientBody::H1(body));
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = version;
    let upgrade = if version == Version::HTTP_11 && framing.upgrade && fields.has(Role::Upgrade) {
        let (tx, rx) = oneshot::channel();
        req.extensions_mut()
            .insert(PendingUpgrade(Arc::new(Mutex::new(Some(rx)))));
        Some(tx)
    } else {
        None
    };
    let asked = Asked {
        head: req.method() == Method::HEAD,
        version,
        keep_alive,
        body: has_body,
        upgrade,
    };
    Ok(Some(Next::Request(req, fields, asked)))
}

/// Whether a request target has a form its method may use (RFC 9112 §3.2): origin form
/// (`/path`) for any method, absolute form (`http://host/path`) for any method, asterisk form
/// (`*`) for OPTIONS only. Authority form is CONNECT's, which is refused before this.
fn target_form_ok(method: &Method, target: &[u8]) -> bool {
    match target.first() {
        Some(b'/') => true,
        Some(b'*') => target.len() == 1 && *method == Method::OPTIONS,
        _ => {
            let lower = |n: usize| target.get(..n).map(<[u8]>::to_ascii_lowercase);
            lower(7).as_deref() == Some(b"http://") || lower(8).as_deref() == Some(b"https://")
        }
    }
}

// Only ever returned, never kept: boxing the request would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
enum Next {
    Request(Request<ClientBody>, WireFields, Asked),
    H2,
    Closed,
}

enum Answered {
    KeepAlive,
    Close,
    /// The 101 went out: the connection goes to the tunnel.
    Upgrade(oneshot::Sender<Rewind>),
    /// The answer could not be written whole.
    Broken,
}

/// How an answer body is framed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Out {
    None,
    Length(u64),
    Chunked,
    /// Until the connection closes (HTTP/1.0 clients, unknown length).
    ToEnd,
}

fn content_length(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(b"content-length: ");
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// The Content-Length of an answer's map (an HTTP/2 backend's HEAD or 304): exactly one field of
/// one number, or nothing.
#[derive(Clone, Copy)]
enum MapLength {
    None,
    One(u64),
    Bad,
}

impl MapLength {
    fn and(self, value: &[u8]) -> Self {
        let v = value.trim_ascii();
        match self {
            MapLength::None
                if !v.is_empty() && v.len() <= 19 && v.iter().all(u8::is_ascii_digit) =>
            {
                MapLength::One(v.iter().fold(0, |n, d| n * 10 + u64::from(d - b'0')))
            }
            _ => MapLength::Bad,
        }
    }

    fn value(self) -> Option<u64> {
        match self {
            MapLength::One(n) => Some(n),
            _ => None,
        }
    }
}

/// Today's `Date` value, formatted once a second per thread.
fn date(f: impl FnOnce(&[u8])) {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};
    thread_local! {
        static CACHE: RefCell<(u64, Vec<u8>)> = const { RefCell::new((0, Vec::new())) };
    }
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != secs || c.1.is_empty() {
            c.0 = secs;
            c.1 = httpdate::fmt_http_date(now).into_bytes();
        }
        f(&c.1);
    });
}
