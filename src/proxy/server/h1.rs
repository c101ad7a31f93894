//! HTTP/1.1 client connections, served by Shoal's own loop.
//!
//! hyper's server runs a dispatcher per connection that parses every head into its own types,
//! polls the service through a boxed future and frames the answer through several layers of
//! buffers. Here one loop reads a head out of one buffer with `httparse` (field values shared from
//! it, not copied), hands the request to the forwarder, and writes the answer's head and its body
//! frames straight from the answer: a small answer costs one read and one write. The request
//! body reads from the same buffer as the forwarder polls it, so uploads stream.
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
use crate::proxy::client::{BoxIo, ClientBytes, H1Body, PendingUpgrade, Rewind, SharedClientBytes};
use crate::proxy::conn::ConnState;
use crate::proxy::error::ProxyError;
use crate::proxy::forward::{ConnInfo, Proxy};
use crate::proxy::framing::{self, Framing};
use crate::proxy::response::ResponseBody;
use crate::proxy::wire::{self, FieldRole, WireFields, GATHER, MAX_HEADERS};
use crate::sync::MutexExt;

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
    /// Between requests with nothing read: the connection waits for its next request without
    /// a task (`server::idle`). `h2c`: no byte has come yet, so HTTP/2's preface may still.
    Idle { conn: ClientConn, h2c: bool },
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
pub struct ClientConn {
    wire: SharedClientBytes,
    out: Vec<u8>,
    max_head: usize,
}

impl ClientConn {
    pub fn new(io: BoxIo, max_head: usize, state: Option<Arc<ConnState>>) -> Self {
        Self {
            wire: Arc::new(Mutex::new(ClientBytes::new(io, state))),
            out: Vec::new(),
            max_head,
        }
    }

    /// Serve requests until the connection ends or waits for its next request with nothing
    /// read (`Ended::Idle`: the caller waits for the bytes, see [`Self::poll_idle`]). `h2c`: a
    /// client may open with the HTTP/2 preface (plain connections); `drain`: finish the request
    /// in hand and close.
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
            let (req, fields, asked) = match self.next_request(first).await {
                Ok(Next::Request(r, f, a)) => (r, f, a),
                Ok(Next::Idle) => {
                    return Ended::Idle {
                        conn: self,
                        h2c: first,
                    }
                }
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
            // Boxed: forwarding and answering take kilobytes of state, which a connection
            // waiting for its next request should not keep. One box per request, made in place (not on the stack and then copied in).
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
                    if had_body && !self.wire.locked().body_done() {
                        self.close_lingering().await;
                    } else {
                        self.shutdown().await;
                    }
                    return Ended::Closed;
                }
                Answered::Broken => return Ended::Closed,
            }
            if had_body && !self.wire.locked().body_done() {
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

    /// Between requests: see `Transport::let_go`.
    pub fn let_go(&mut self) -> io::Result<()> {
        self.wire.locked().io.let_go()
    }

    /// Read the bytes a connection between requests waits for (with `cx`'s waker, which need
    /// not be a task's): how many came, 0 at the client's close.
    pub fn poll_idle(&mut self, cx: &mut std::task::Context<'_>) -> Poll<io::Result<usize>> {
        let mut w = self.wire.locked();
        let w = &mut *w;
        w.rb.poll_fill_fresh(&mut w.io, cx)
    }

    /// Read and parse the next request head; `Next::Idle` when nothing of it has come.
    async fn next_request(&mut self, mut h2c: bool) -> Result<Next, Refused> {
        {
            let mut w = self.wire.locked();
            w.answered = false;
            w.rb.release();
        }
        // A connection waiting for its next request keeps no answer buffer: the allocator
        // hands the next answer one back (a free list away), and 10,000 idle connections do not
        // hold 10,000 of them.
        self.out = Vec::new();
        loop {
            {
                let mut w = self.wire.locked();
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
            if self.wire.locked().rb.buf.is_empty() {
                return Ok(Next::Idle);
            }
            match poll_fn(|cx| self.poll_idle(cx)).await {
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
        // An HTTP/2 backend's answer comes as a map: its length field is read by the framing
        // rules (for a HEAD or 304), never written as it came.
        let mut map_framing = Framing::default();
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
                map_framing.field(b"content-length", value.as_bytes());
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
            dated |= fields.has(FieldRole::Date);
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
            let announced = body.announced().or(map_framing.announced_length());
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
        self.wire.locked().answered = true;
        // The connection closes after this answer: its end is sent by the shutdown.
        let last = !keep_alive && !switching;
        let done = if framing == Out::None {
            drop(body);
            self.finish(last).await
        } else {
            self.stream(body, framing, last).await
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
    /// without finishing the message, so the client sees it was cut). An answer framed by the
    /// close (`Out::ToEnd`) that ended is whole: it closes as any last answer does, with a
    /// shutdown (over TLS a close_notify, which tells it from a cut). `last`: as for
    /// [`Self::finish`].
    async fn stream(&mut self, body: ResponseBody, framing: Out, last: bool) -> io::Result<bool> {
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
                        return self.finish(last).await;
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
        self.finish(last).await?;
        Ok(true)
    }

    /// Write `out` and flush.
    async fn flush(&mut self) -> io::Result<bool> {
        self.write_out().await?;
        poll_fn(|cx| Pin::new(&mut self.wire.locked().io).poll_flush(cx)).await?;
        Ok(true)
    }

    /// Write `out`, an answer's end, and flush it unless the connection closes after it
    /// (`last`): then the shutdown that follows sends it, and over TLS its close_notify goes in
    /// the same segment.
    async fn finish(&mut self, last: bool) -> io::Result<bool> {
        if !last {
            return self.flush().await;
        }
        // On plain TCP too: what is written now waits in the socket for the FIN.
        self.wire.locked().io.hold_for_close();
        self.write_out().await?;
        Ok(true)
    }

    /// Write `out` (and clear it, keeping its allocation).
    async fn write_out(&mut self) -> io::Result<()> {
        let out = std::mem::take(&mut self.out);
        let res = self.write_all(&out).await;
        self.out = out;
        self.out.clear();
        res
    }

    async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let n = poll_fn(|cx| Pin::new(&mut self.wire.locked().io).poll_write(cx, data)).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            data = &data[n..];
        }
        Ok(())
    }

    async fn shutdown(&self) {
        let _ = poll_fn(|cx| Pin::new(&mut self.wire.locked().io).poll_shutdown(cx)).await;
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
                    let mut w = self.wire.locked();
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
fn parse(
    shared: &SharedClientBytes,
    w: &mut ClientBytes,
    max_head: usize,
) -> Result<Option<Next>, Refused> {
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
    let decoder: wire::Decoder = framing
        .request(version == Version::HTTP_10)
        .map_err(|refusal| match refusal {
            framing::Refusal::Bad(why) => Refused::Bad(why),
            framing::Refusal::Ambiguous => Refused::Ambiguous,
            framing::Refusal::Coding => Refused::Coding,
        })?
        .into();
    // The fields stay as they came: the forwarder makes a map of them only if it needs one.
    let head = w.rb.buf.split_to(len).freeze();
    let fields = WireFields::new(head.clone(), noted);
    let uri = Uri::from_maybe_shared(head.slice(path_span))
        .map_err(|_| Refused::Bad("bad request target"))?;
    let keep_alive = !framing.close && (version == Version::HTTP_11 || framing.keep_alive);
    let has_body = !decoder.is_end();
    w.set_body_done(!has_body);
    let expect = (has_body
        && version == Version::HTTP_11
        && fields
            .values(FieldRole::Expect)
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
    let upgrade =
        if version == Version::HTTP_11 && framing.upgrade && fields.has(FieldRole::Upgrade) {
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
    /// Between requests, nothing read.
    Idle,
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

#[cfg(test)]
mod tests {
    //! Request heads, byte for byte: what the HTTP/1 loop makes of each (hyper's
    //! `proto/h1/decode.rs` tests are the model), from RFC 9112 and the published smuggling
    //! classes (CL.TE, TE.CL, TE.TE obfuscations, CL.0, Connection-named framing fields, chunk
    //! size and extension tricks, trailers, bare CR and LF, obs-fold, request-target forms).

    use super::*;
    use bytes::Bytes;

    /// What a request's bytes come to.
    #[derive(Debug, PartialEq)]
    enum Seen {
        /// Taken: its body, and what the bytes after it start with.
        Taken(Vec<u8>, &'static str),
        /// The head was taken, the body refused (the client gets 400, no backend failure).
        BadBody,
        /// Refused with this status before any backend.
        Refused(u16),
        /// The head is not complete.
        Partial,
    }

    fn conn(bytes: &[u8]) -> SharedClientBytes {
        let (io, _) = tokio::io::duplex(16);
        let mut rb = wire::ReadBuf::default();
        rb.buf.extend_from_slice(bytes);
        let mut w = ClientBytes::new(Box::new(io), None);
        w.rb = rb;
        Arc::new(Mutex::new(w))
    }

    fn seen(bytes: &[u8]) -> Seen {
        let shared = conn(bytes);
        let parsed = {
            let mut w = shared.locked();
            parse(&shared, &mut w, 8192)
        };
        let (req, keep_alive) = match parsed {
            Ok(Some(Next::Request(req, _, asked))) => (req, asked.keep_alive),
            Ok(Some(_)) => panic!("not a request"),
            Ok(None) => return Seen::Partial,
            Err(Refused::TooLarge) => return Seen::Refused(431),
            Err(Refused::Bad(_) | Refused::Ambiguous) => return Seen::Refused(400),
            Err(Refused::Coding) => return Seen::Refused(501),
            Err(Refused::Method) => return Seen::Refused(405),
        };
        let mut body = req.into_body();
        let mut data = Vec::new();
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        loop {
            match Pin::new(&mut body).poll_frame(&mut cx) {
                Poll::Ready(None) => break,
                Poll::Ready(Some(Ok(f))) => {
                    if let Ok(d) = f.into_data() {
                        data.extend_from_slice(&d);
                    }
                }
                Poll::Ready(Some(Err(_))) => return Seen::BadBody,
                // Every byte is buffered: waiting for more means the body ran past them.
                Poll::Pending => return Seen::BadBody,
            }
        }
        let rest = Bytes::copy_from_slice(&shared.locked().rb.buf);
        let next = match &rest[..] {
            // The connection ends after this one: what follows is never read.
            _ if !keep_alive => "close",
            b"" => "",
            r if r.starts_with(b"GET /next ") => "next",
            _ => "junk",
        };
        Seen::Taken(data, next)
    }

    const NEXT: &str = "GET /next HTTP/1.1\r\nHost: h\r\n\r\n";

    /// Where a connection waits between requests: with nothing read it parks (`Next::Idle`: its
    /// task ends, `server::idle` waits for the bytes); with any byte of a head or of the HTTP/2
    /// preface it reads on in its task (here the client has closed, so it ends), and a whole head
    /// is a request, pipelined bytes after it or not.
    #[tokio::test]
    async fn a_connection_parks_only_with_nothing_read() {
        #[derive(Debug, PartialEq)]
        enum Waits {
            Parked,
            ReadOn,
            Request,
            H2,
        }
        #[rustfmt::skip]
        let cases: &[(&[u8], bool, Waits)] = &[
            (b"", false, Waits::Parked),
            (b"", true, Waits::Parked),
            (b"G", false, Waits::ReadOn),
            (b"GET / HTTP/1.1\r\nHost: h\r\n", false, Waits::ReadOn),
            (b"GET / HTTP/1.1\r\nHost: h\r\n\r\n", false, Waits::Request),
            (b"GET / HTTP/1.1\r\nHost: h\r\n\r\nGET /next HT", false, Waits::Request),
            (b"PRI * HTTP/2.0\r\n", true, Waits::ReadOn),
            (PREFACE, true, Waits::H2),
            // Without h2c (TLS), the preface is a head httparse refuses, never a wait.
            (b"\r\n", false, Waits::ReadOn),
        ];
        for (bytes, h2c, want) in cases {
            let (io, peer) = tokio::io::duplex(64);
            drop(peer);
            let mut w = ClientBytes::new(Box::new(io), None);
            w.rb.buf.extend_from_slice(bytes);
            let mut c = ClientConn {
                wire: Arc::new(Mutex::new(w)),
                out: Vec::new(),
                max_head: 8192,
            };
            let got = match c.next_request(*h2c).await {
                Ok(Next::Idle) => Waits::Parked,
                Ok(Next::Closed) => Waits::ReadOn,
                Ok(Next::Request(..)) => Waits::Request,
                Ok(Next::H2) => Waits::H2,
                Err(_) => panic!("refused: {:?}", String::from_utf8_lossy(bytes)),
            };
            assert_eq!(&got, want, "{:?} h2c={h2c}", String::from_utf8_lossy(bytes));
        }
    }

    /// A parked connection's one read: nothing yet, then what the client sends, then its close.
    #[tokio::test]
    async fn poll_idle_reads_what_comes_and_the_close() {
        use tokio::io::AsyncWriteExt;
        let (io, mut peer) = tokio::io::duplex(64);
        let mut c = ClientConn::new(Box::new(io), 8192, None);
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        assert!(c.poll_idle(&mut cx).is_pending());
        peer.write_all(NEXT.as_bytes()).await.unwrap();
        match c.poll_idle(&mut cx) {
            Poll::Ready(Ok(n)) => assert_eq!(n, NEXT.len()),
            other => panic!("{other:?}"),
        }
        assert!(matches!(c.next_request(false).await, Ok(Next::Request(..))));
        drop(peer);
        assert!(matches!(c.poll_idle(&mut cx), Poll::Ready(Ok(0))));
    }

    /// A socket whose written bytes reach the peer (`sent`) only on a flush or the shutdown, as
    /// a TLS connection's do: what an answer leaves unflushed shows.
    struct Held {
        pending: Vec<u8>,
        sent: Arc<Mutex<(Vec<u8>, bool)>>,
        /// Told that the connection closes after what is written next: how much had been
        /// written then.
        hold: Arc<Mutex<Option<usize>>>,
    }

    impl crate::net::Transport for Held {
        fn hold_for_close(&mut self) {
            let written = self.sent.locked().0.len() + self.pending.len();
            *self.hold.locked() = Some(written);
        }
    }

    impl tokio::io::AsyncRead for Held {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            _: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    impl AsyncWrite for Held {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.pending.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(
            mut self: Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> Poll<io::Result<()>> {
            let pending = std::mem::take(&mut self.pending);
            self.sent.locked().0.extend_from_slice(&pending);
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> Poll<io::Result<()>> {
            let flushed = self.as_mut().poll_flush(cx);
            self.sent.locked().1 = true;
            flushed
        }
    }

    /// How an answer ends, by the request and the answer: kept alive, its end flushed; or the
    /// connection closes after it, the socket is told to hold the end for the FIN, and the end
    /// goes with the shutdown (one segment: on plain TCP the answer and the FIN, over TLS the
    /// answer, close_notify and FIN), never left behind.
    #[tokio::test]
    async fn an_answers_end_is_flushed_or_goes_with_the_shutdown() {
        #[derive(Debug, PartialEq)]
        enum Ends {
            KeptAlive,
            Closed,
        }
        let v11 = Version::HTTP_11;
        let v10 = Version::HTTP_10;
        // version, keep-alive asked, HEAD, draining, the answer's Connection, how it ends
        type Case = (Version, bool, bool, bool, Option<&'static str>, Ends);
        #[rustfmt::skip]
        let cases: &[Case] = &[
            (v11, true, false, false, None, Ends::KeptAlive),
            (v11, false, false, false, None, Ends::Closed),
            (v10, true, false, false, None, Ends::KeptAlive),
            (v10, false, false, false, None, Ends::Closed),
            (v11, true, true, false, None, Ends::KeptAlive),
            (v11, false, true, false, None, Ends::Closed),
            (v11, true, false, true, None, Ends::Closed),
            (v11, true, false, false, Some("close"), Ends::Closed),
        ];
        for (i, (version, keep_alive, head, draining, connection, want)) in cases.iter().enumerate()
        {
            let sent = Arc::new(Mutex::new((Vec::new(), false)));
            let hold = Arc::new(Mutex::new(None));
            let held = Held {
                pending: Vec::new(),
                sent: sent.clone(),
                hold: hold.clone(),
            };
            let mut c = ClientConn::new(Box::new(held), 8192, None);
            let mut resp = Response::new(ResponseBody::full("hello"));
            if let Some(v) = connection {
                resp.headers_mut()
                    .insert(header::CONNECTION, v.parse().unwrap());
            }
            let asked = Asked {
                head: *head,
                version: *version,
                keep_alive: *keep_alive,
                body: false,
                upgrade: None,
            };
            let drain = CancellationToken::new();
            if *draining {
                drain.cancel();
            }
            let answered = c.answer(resp, asked, &drain).await;
            let at_return = sent.locked().0.clone();
            let ends = match answered {
                Answered::KeepAlive => Ends::KeptAlive,
                Answered::Close => {
                    // What the serving loop does next.
                    c.shutdown().await;
                    Ends::Closed
                }
                _ => panic!("case {i}: neither kept alive nor closed"),
            };
            assert_eq!(&ends, want, "case {i}");
            let (all, shut) = sent.locked().clone();
            let text = String::from_utf8_lossy(&all);
            assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "case {i}: {text}");
            assert_eq!(text.ends_with("hello"), !head, "case {i}: {text}");
            match ends {
                Ends::KeptAlive => {
                    assert_eq!(at_return, all, "case {i}: kept alive, yet not flushed");
                    assert!(!shut, "case {i}");
                    assert_eq!(*hold.locked(), None, "case {i}: held back");
                }
                Ends::Closed => {
                    assert!(
                        at_return.is_empty(),
                        "case {i}: flushed before the shutdown"
                    );
                    assert!(shut, "case {i}");
                    // On plain TCP too, the end waits in the socket for the FIN: the socket is
                    // told before the end is written, not after.
                    let told = hold
                        .locked()
                        .unwrap_or_else(|| panic!("case {i}: not held for the FIN"));
                    assert!(told < all.len(), "case {i}: held after its end went");
                    assert!(text.contains("connection: close\r\n"), "case {i}: {text}");
                }
            }
        }
    }

    fn taken(body: &str, next: &'static str) -> Seen {
        Seen::Taken(body.as_bytes().to_vec(), next)
    }

    #[test]
    fn request_heads_byte_for_byte() {
        use Seen::*;
        #[rustfmt::skip]
        let cases: Vec<(String, Seen)> = vec![
            // Plain framing.
            (format!("GET / HTTP/1.1\r\nHost: h\r\n\r\n{NEXT}"), taken("", "next")),
            (format!("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello{NEXT}"), taken("hello", "next")),
            (format!("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n{NEXT}"), taken("", "next")),
            (format!("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 05\r\n\r\nhello{NEXT}"), taken("hello", "next")),
            (format!("POST / HTTP/1.1\r\nHost: h\r\nContent-Length:5\r\n\r\nhello{NEXT}"), taken("hello", "next")),
            (format!("POST / HTTP/1.1\r\nHost: h\r\ncontent-length: 5\r\n\r\nhello{NEXT}"), taken("hello", "next")),
            (format!("POST / HTTP/1.1\r\nHost: h\r\nCONTENT-LENGTH: 5\r\n\r\nhello{NEXT}"), taken("hello", "next")),
            (format!("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5 \r\n\r\nhello{NEXT}"), taken("hello", "next")),
            (format!("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n{NEXT}"), taken("hello", "next")),
            (format!("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: CHUNKED\r\n\r\n5\r\nhello\r\n0\r\n\r\n{NEXT}"), taken("hello", "next")),
            (format!("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding:\tchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n{NEXT}"), taken("hello", "next")),
            (format!("POST / HTTP/1.0\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello{NEXT}"), taken("hello", "close")),
            (format!("POST / HTTP/1.0\r\nHost: h\r\nConnection: keep-alive\r\nContent-Length: 5\r\n\r\nhello{NEXT}"), taken("hello", "next")),
            (format!("GET / HTTP/1.1\nHost: h\n\n{NEXT}"), taken("", "next")),
            // CL.TE and TE.CL: both fields, in either order, however dressed.
            ("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG".into(), Refused(400)),
            ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n".into(), Refused(400)),
            ("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\nTransfer-Encoding: identity\r\n\r\nabcd".into(), Refused(400)),
            ("POST / HTTP/1.0\r\nHost: h\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n".into(), Refused(400)),
            ("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n".into(), Refused(400)),
            // TE.TE: obfuscated codings.
            ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: xchunked\r\n\r\n".into(), Refused(501)),
            ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\n".into(), Refused(501)),
            ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n".into(), Refused(501)),
            ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: identity, chunked\r\n\r\n".into(), Refused(501)),
            ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: x\r\nTransfer-Encoding: chunked\r\n\r\n".into(), Refused(501)),
            ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n\r\n".into(), Refused(400)),
            ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, identity\r\n\r\n".into(), Refused(400)),
            ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n".into(), Refused(400)),
            ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, chunked\r\n\r\n".into(), Refused(400)),
            ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: \"chunked\"\r\n\r\n".into(), Refused(400)),
            ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked;\r\n\r\n".into(), Refused(400)),
            ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: ,chunked\r\n\r\n".into(), Refused(400)),
            ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: \r\n\r\n".into(), Refused(400)),
            ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\x0b\r\n\r\n".into(), Refused(400)),
            ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chu\x00nked\r\n\r\n".into(), Refused(400)),
            ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding : chunked\r\n\r\n".into(), Refused(400)),
            ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding\r\n: chunked\r\n\r\n".into(), Refused(400)),
            ("POST / HTTP/1.1\r\nHost: h\r\n Transfer-Encoding: chunked\r\n\r\n".into(), Refused(400)),
            ("POST / HTTP/1.1\r\nHost: h\r\nX: y\r\n Transfer-Encoding: chunked\r\n\r\n".into(), Refused(400)),
            ("POST / HTTP/1.1\r\nHost: h\r\nX: y\r\n\tTransfer-Encoding: chunked\r\n\r\n".into(), Refused(400)),
            ("POST / HTTP/1.0\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".into(), Refused(400)),
            (format!("POST / HTTP/1.1\r\nHost: h\r\nTransfer_Encoding: chunked\r\n\r\n{NEXT}"), taken("", "next")),
            ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n".into(), BadBody),
            // Content-Length tricks.
            ("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello".into(), Refused(400)),
            ("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!".into(), Refused(400)),
            ("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5, 5\r\n\r\nhello".into(), Refused(400)),
            ("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5,6\r\n\r\nhello".into(), Refused(400)),
            ("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: +5\r\n\r\nhello".into(), Refused(400)),
            ("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: -0\r\n\r\n".into(), Refused(400)),
            ("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0x5\r\n\r\nhello".into(), Refused(400)),
            ("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5 5\r\n\r\nhello".into(), Refused(400)),
            ("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1_0\r\n\r\n".into(), Refused(400)),
            ("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 99999999999999999999\r\n\r\n".into(), Refused(400)),
            ("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: \r\n\r\n".into(), Refused(400)),
            ("POST / HTTP/1.1\r\nHost: h\r\nContent-Length : 5\r\n\r\nhello".into(), Refused(400)),
            ("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhel".into(), BadBody),
            // CL.0: a body that looks like a request is a body.
            (format!("GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 31\r\n\r\n{NEXT}{NEXT}"), taken(NEXT, "next")),
            // Framing fields named in Connection still frame the message.
            (format!("POST / HTTP/1.1\r\nHost: h\r\nConnection: Content-Length\r\nContent-Length: 31\r\n\r\n{NEXT}{NEXT}"), taken(NEXT, "next")),
            (format!("POST / HTTP/1.1\r\nHost: h\r\nConnection: close, Content-Length\r\nContent-Length: 5\r\n\r\nhello{NEXT}"), taken("hello", "close")),
            (format!("POST / HTTP/1.1\r\nHost: h\r\nConnection: Transfer-Encoding\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n{NEXT}"), taken("hello", "next")),
            (format!("POST / HTTP/1.1\r\nConnection: Host\r\nHost: h\r\nContent-Length: 1\r\n\r\nx{NEXT}"), taken("x", "next")),
            // Chunk sizes.
            (format!("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0005\r\nhello\r\n0\r\n\r\n{NEXT}"), taken("hello", "next")),
            (format!("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nA\r\n0123456789\r\n0\r\n\r\n{NEXT}"), taken("0123456789", "next")),
            (format!("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n1\r\nb\r\n0\r\n\r\n{NEXT}"), taken("ab", "next")),
            ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5 \r\nhello\r\n0\r\n\r\n".into(), BadBody),
            ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n 5\r\nhello\r\n0\r\n\r\n".into(), BadBody),
            ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n".into(), BadBody),
            ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n".into(), BadBody),
            ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n+5\r\nhello\r\n0\r\n\r\n".into(), BadBody),
            ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffff1\r\nhello\r\n0\r\n\r\n".into(), BadBody),
            ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloX\r\n0\r\n\r\n".into(), BadBody),
            ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n".into(), BadBody),
            ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\n0\r\n\r\n".into(), BadBody),
            ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\n\r\n".into(), BadBody),
            ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel".into(), BadBody),
            // Chunk extensions.
            (format!("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5;a=b\r\nhello\r\n0\r\n\r\n{NEXT}"), taken("hello", "next")),
            (format!("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5 ; a = \"b c\"\r\nhello\r\n0;x\r\n\r\n{NEXT}"), taken("hello", "next")),
            ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5;a\rb\r\nhello\r\n0\r\n\r\n".into(), BadBody),
            ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5;\r\nhello\r\n0\r\n\r\n".into(), BadBody),
            ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5;=b\r\nhello\r\n0\r\n\r\n".into(), BadBody),
            ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5;a=\"b\r\nhello\r\n0\r\n\r\n".into(), BadBody),
            ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5;a\x00\r\nhello\r\n0\r\n\r\n".into(), BadBody),
            ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5x\r\nhello\r\n0\r\n\r\n".into(), BadBody),
            // Trailers.
            (format!("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-Sum: 1\r\n\r\n{NEXT}"), taken("hello", "next")),
            (format!("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nContent-Length: 40\r\n\r\n{NEXT}"), taken("hello", "next")),
            ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX: 1\r\n folded\r\n\r\n".into(), BadBody),
            ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX: 1\n\r\n".into(), BadBody),
            ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX 1\r\n\r\n".into(), BadBody),
            // Bare CR, control characters, obs-fold in the head.
            ("GET / HTTP/1.1\r\nHost: h\r\nX: a\rb\r\n\r\n".into(), Refused(400)),
            ("GET / HTTP/1.1\r\nHost: h\r\nX: a\x00b\r\n\r\n".into(), Refused(400)),
            ("GET / HTTP/1.1\r\nHost: h\r\nX: a\x7fb\r\n\r\n".into(), Refused(400)),
            ("GET / HTTP/1.1\r\nHost: h\r\nBad Header: 1\r\n\r\n".into(), Refused(400)),
            ("GET / HTTP/1.1\r\nHost: h\r\n: 1\r\n\r\n".into(), Refused(400)),
            ("GET / HTTP/1.1\r\nHost: h\r\nX: 1\r\n folded\r\n\r\n".into(), Refused(400)),
            ("GET / HTTP/1.1\rHost: h\r\n\r\n".into(), Refused(400)),
            // Request lines and targets.
            ("GET  / HTTP/1.1\r\nHost: h\r\n\r\n".into(), Refused(400)),
            ("GET / HTTP/1.2\r\nHost: h\r\n\r\n".into(), Refused(400)),
            ("GET / HTTP/2.0\r\nHost: h\r\n\r\n".into(), Refused(400)),
            ("GET / HTTP/1.1 \r\nHost: h\r\n\r\n".into(), Refused(400)),
            ("GET /\x7f HTTP/1.1\r\nHost: h\r\n\r\n".into(), Refused(400)),
            ("GET /a b HTTP/1.1\r\nHost: h\r\n\r\n".into(), Refused(400)),
            ("G\x00T / HTTP/1.1\r\nHost: h\r\n\r\n".into(), Refused(400)),
            ("G@T / HTTP/1.1\r\nHost: h\r\n\r\n".into(), Refused(400)),
            ("GET example.com:80 HTTP/1.1\r\nHost: h\r\n\r\n".into(), Refused(400)),
            ("GET * HTTP/1.1\r\nHost: h\r\n\r\n".into(), Refused(400)),
            ("GET ftp://h/ HTTP/1.1\r\nHost: h\r\n\r\n".into(), Refused(400)),
            ("GET h/ HTTP/1.1\r\nHost: h\r\n\r\n".into(), Refused(400)),
            ("CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n".into(), Refused(405)),
            ("CONNECT / HTTP/1.1\r\nHost: h\r\n\r\n".into(), Refused(405)),
            (format!("OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n{NEXT}"), taken("", "next")),
            (format!("GET http://h/a?b HTTP/1.1\r\nHost: h\r\n\r\n{NEXT}"), taken("", "next")),
            (format!("GET HTTPS://h/ HTTP/1.1\r\nHost: h\r\n\r\n{NEXT}"), taken("", "next")),
            (format!("PURGE /x HTTP/1.1\r\nHost: h\r\n\r\n{NEXT}"), taken("", "next")),
            // Sizes.
            (format!("GET / HTTP/1.1\r\nHost: h\r\nX: {}\r\n\r\n", "a".repeat(9000)), Refused(431)),
            (format!("GET / HTTP/1.1\r\nHost: h\r\n{}\r\n", "X: 1\r\n".repeat(101)), Refused(431)),
            ("GET / HTTP/1.1\r\nHost: h\r\n".into(), Partial),
            // Pipelined: each request ends where its framing says.
            (format!("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc{NEXT}"), taken("abc", "next")),
            ("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nabcGET /next".into(), taken("ab", "junk")),
        ];
        assert!(cases.len() >= 100, "{}", cases.len());
        for (bytes, want) in cases {
            assert_eq!(seen(bytes.as_bytes()), want, "{bytes:?}");
        }
    }

    /// What hyper's HTTP/1 server (the reference) makes of the same bytes: each request it
    /// served, with its body (None when the body broke off).
    async fn hyper_sees(bytes: Vec<u8>) -> Vec<(String, Option<Vec<u8>>)> {
        use http_body_util::BodyExt;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let record = seen.clone();
        let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            let record = record.clone();
            async move {
                let path = req.uri().path().to_string();
                let body = req.into_body().collect().await.ok();
                let body = body.map(|b| b.to_bytes().to_vec());
                record.lock().unwrap().push((path, body));
                Ok::<_, std::convert::Infallible>(http::Response::new(
                    http_body_util::Empty::<Bytes>::new(),
                ))
            }
        });
        let serving = tokio::spawn(
            hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(server), svc),
        );
        let _ = client.write_all(&bytes).await;
        // Until hyper served both requests or closed; then half-close (a body it waits for
        // ends there) and give it a moment to finish.
        let mut answers = [0u8; 4096];
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(300);
        loop {
            if seen.lock().unwrap().len() >= 2 {
                break;
            }
            let read = tokio::time::timeout_at(deadline, client.read(&mut answers)).await;
            if !matches!(read, Ok(Ok(n)) if n > 0) {
                break;
            }
        }
        let _ = client.shutdown().await;
        let _ = tokio::time::timeout(std::time::Duration::from_millis(300), async {
            while client.read(&mut answers).await.is_ok_and(|n| n > 0) {}
        })
        .await;
        serving.abort();
        let out = seen.lock().unwrap().clone();
        out
    }

    /// One generated request: its head's framing fields and its body, then `NEXT`.
    fn message(post: bool, http10: bool, fields: &[String], body: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(if post {
            b"POST /first "
        } else {
            b"GET /first "
        });
        m.extend_from_slice(if http10 {
            b"HTTP/1.0\r\n"
        } else {
            b"HTTP/1.1\r\n"
        });
        m.extend_from_slice(b"Host: h\r\n");
        for f in fields {
            m.extend_from_slice(f.as_bytes());
            m.extend_from_slice(b"\r\n");
        }
        m.extend_from_slice(b"\r\n");
        m.extend_from_slice(body);
        m.extend_from_slice(NEXT.as_bytes());
        m
    }

    fn field_strategy(len: usize) -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let name = |n: &'static str| {
            prop_oneof![
                Just(n.to_string()),
                Just(n.to_ascii_lowercase()),
                Just(n.to_ascii_uppercase())
            ]
        };
        let cl = (
            name("Content-Length"),
            prop_oneof![
                Just(format!("{len}")),
                Just(format!(" {len} ")),
                Just(format!("0{len}")),
                Just(format!("{len}, {len}")),
                Just(format!("+{len}")),
                Just(format!("{}", len + 1)),
                Just(format!("{}", len.saturating_sub(1))),
                Just("0".to_string()),
            ],
        )
            .prop_map(|(n, v)| format!("{n}: {v}"));
        let te = (
            name("Transfer-Encoding"),
            prop_oneof![
                Just("chunked"),
                Just("Chunked"),
                Just(" chunked"),
                Just("chunked\t"),
                Just("chunked, chunked"),
                Just("gzip, chunked"),
                Just("chunked, gzip"),
                Just("identity"),
                Just("xchunked"),
                Just(""),
            ],
        )
            .prop_map(|(n, v)| format!("{n}: {v}"));
        let connection = prop_oneof![
            Just("Connection: close"),
            Just("Connection: Content-Length"),
            Just("Connection: Transfer-Encoding"),
            Just("Connection: keep-alive, Content-Length"),
        ]
        .prop_map(str::to_string);
        let other = prop_oneof![
            Just("X-A: b"),
            Just("Expect: 100-continue"),
            Just("Upgrade: x")
        ]
        .prop_map(str::to_string);
        prop_oneof![3 => cl, 3 => te, 1 => connection, 1 => other]
    }

    /// A chunked encoding of `payload` split at `cuts`, with extensions and a trailer drawn
    /// from valid and invalid forms.
    fn chunked(payload: &[u8], cuts: &[usize], ext: u8, trailer: u8) -> Vec<u8> {
        let exts: [&[u8]; 8] = [
            b"",
            b";a=b",
            b" ;a",
            b";a=\"x y\"",
            b";",
            b";a\rb",
            b"\t;a",
            b";a=\"b",
        ];
        let mut out = Vec::new();
        let mut at = 0;
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (payload.len() + 1)).collect();
        points.sort_unstable();
        points.push(payload.len());
        for p in points {
            if p <= at {
                continue;
            }
            out.extend_from_slice(format!("{:x}", p - at).as_bytes());
            out.extend_from_slice(exts[ext as usize % exts.len()]);
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(&payload[at..p]);
            out.extend_from_slice(b"\r\n");
            at = p;
        }
        out.extend_from_slice(b"0\r\n");
        let trailers: [&[u8]; 4] = [
            b"",
            b"X-Sum: 1\r\n",
            b"Content-Length: 40\r\n",
            b"X: 1\r\n folded\r\n",
        ];
        out.extend_from_slice(trailers[trailer as usize % trailers.len()]);
        out.extend_from_slice(b"\r\n");
        out
    }

    proptest::proptest! {
        // A bounded run in CI; `PROPTEST_CASES=20000 cargo test --release --lib -- h1::tests::
        // framing_matches` for a longer one.
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(
            std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(400)
        ))]

        /// Differential: whatever Shoal's HTTP/1 loop takes, hyper's server (the reference)
        /// takes with the same body, and the next request starts at the same byte for both.
        /// Shoal may refuse what hyper takes (it is stricter), never the other way round.
        #[test]
        fn framing_matches_hypers_where_shoal_takes_a_message(
            post in proptest::bool::ANY,
            http10 in proptest::bool::weighted(0.15),
            payload in proptest::collection::vec(proptest::num::u8::ANY, 0..40),
            cuts in proptest::collection::vec(0usize..64, 0..4),
            ext in 0u8..16,
            trailer in 0u8..8,
            picks in proptest::collection::vec(0usize..1000, 0..4),
            seed_fields in proptest::collection::vec(field_strategy(7), 4),
            raw_len in 0usize..20,
        ) {
            let fields: Vec<String> = picks.iter().map(|p| seed_fields[p % seed_fields.len()].clone()).collect();
            let chunked_body = fields.iter().any(|f| f.to_ascii_lowercase().starts_with("transfer-encoding"));
            let payload: Vec<u8> = if chunked_body { payload } else { payload.into_iter().take(raw_len).collect() };
            let body = if chunked_body { chunked(&payload, &cuts, ext, trailer) } else { payload.clone() };
            let bytes = message(post, http10, &fields, &body);
            let ours = seen(&bytes);
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let theirs = rt.block_on(hyper_sees(bytes.clone()));
            if let Seen::Taken(data, next) = ours {
                let first = theirs.first();
                proptest::prop_assert!(
                    first.is_some_and(|(p, b)| p == "/first" && b.as_deref() == Some(&data[..])),
                    "Shoal took {:?} with body {:?}; hyper saw {:?}",
                    String::from_utf8_lossy(&bytes), data, theirs
                );
                if next == "next" {
                    proptest::prop_assert!(
                        theirs.get(1).is_some_and(|(p, _)| p == "/next"),
                        "Shoal found the next request after {:?}; hyper saw {:?}",
                        String::from_utf8_lossy(&bytes), theirs
                    );
                }
            }
        }
    }
}
