//! A lean HTTP/1.1 client for backend connections, driven by the request's own task.
//!
//! hyper's client runs each connection as a task of its own and hands every request and
//! response through channels (a handoff and two task wake-ups per exchange). Here the request
//! head is written straight from the request's parts, the response head is parsed with
//! `httparse` out of one read buffer, and the response body is read by the body itself as the
//! client side polls it: small answers cost one write and one read. The connection travels with
//! the response body and goes back to the pool when the body ends cleanly.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::header;
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::net::BackendIo;
use crate::proxy::body::RequestBody;
use crate::proxy::framing::{Asked, Framing, ResponseFraming};
use crate::proxy::wire::{
    self, field, invalid, Decoder, Outgoing, WireFields, GATHER, MAX_HEAD, MAX_HEADERS,
};

/// One HTTP/1.1 connection to a backend, idle or carrying one exchange.
pub struct H1Conn {
    io: BackendIo,
    /// Read from the backend and not yet used.
    rb: wire::ReadBuf,
    /// What goes out next (a request head, and small body chunks gathered behind it).
    out: Vec<u8>,
    /// The rest of a request body the backend answered before taking: it keeps going out
    /// while the answer streams (full duplex), and the connection is reused only if it all went.
    upload: Option<(RequestBody, Upload)>,
    /// That rest could not be sent: the connection is not reused.
    unfinished: bool,
}

/// How sending a request failed.
#[derive(Debug)]
pub enum SendError {
    /// Nothing reached the connection: the request may go elsewhere as it is.
    NotSent(io::Error),
    /// The request was (perhaps partly) sent, or the answer broke off.
    Failed(io::Error),
    /// The client's request body broke off or was malformed: the client's failure, not the
    /// backend's.
    Client(io::Error),
}

impl H1Conn {
    pub fn new(io: BackendIo) -> Self {
        Self {
            io,
            rb: wire::ReadBuf::default(),
            out: Vec::new(),
            upload: None,
            unfinished: false,
        }
    }

    /// Let go of large buffers before the connection is parked (a 1 MiB answer grows reads to
    /// 256 KiB; an idle connection keeps none of that).
    pub fn shrink(&mut self) {
        self.rb.shrink();
        if self.out.capacity() > 4 * GATHER {
            self.out = Vec::new();
        }
    }

    /// Whether a parked connection can still carry a request: nothing arrived on it since its
    /// last exchange (an end of stream, an error or stray bytes all mean it cannot), and the
    /// last request's send did not fail (its buffer let go of here). Costs no system call
    /// unless the socket was reported readable.
    pub fn is_open(&mut self) -> bool {
        if !self.rb.buf.is_empty() || self.io.let_go().is_err() {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        let mut byte = [0u8; 1];
        let mut rb = ReadBuf::new(&mut byte);
        Pin::new(&mut self.io)
            .poll_read(&mut cx, &mut rb)
            .is_pending()
    }

    /// Send `req` and read the response head. The body streams out as the client sends it;
    /// an answer may come before it is all sent (a 413, or an echo), and the rest then goes on
    /// as the answer's body is read. `req` is left in place (its body taken once sending began).
    pub async fn send(
        mut self: Box<Self>,
        req: &mut Request<RequestBody>,
        wire: Option<&Outgoing>,
    ) -> Result<Response<BackendBody>, SendError> {
        let framing = self.write_head(req, wire);
        let asked = Asked {
            head: req.method() == Method::HEAD,
            // The forwarder passes Upgrade on only when the client asked to upgrade.
            upgrade: req.headers().contains_key(header::UPGRADE),
        };
        let body = req.body_mut();
        let mut up = Upload {
            framing,
            done: framing == Out::Empty,
            flushing: framing == Out::Empty,
            written: 0,
            sent_any: false,
        };
        let early = poll_fn(|cx| {
            // Once the head is out, an answer may come before the body is all sent.
            if up.sent_any {
                if let Poll::Ready(answered) = self.poll_early(cx, asked) {
                    return Poll::Ready(answered.map(Some).map_err(SendError::Failed));
                }
            }
            self.poll_upload(cx, body, &mut up).map_ok(|()| None)
        })
        .await?;
        if early.is_some() {
            // The rest of the body goes on beside the answer (an echo, a bidirectional stream).
            // A backend that answered before it was handed the whole body may read what is still
            // to come as another request (a body it ignores): that connection is never reused.
            if !up.done {
                self.unfinished = true;
            }
            self.upload = Some((std::mem::replace(body, RequestBody::Empty), up));
        }
        self.read_head(asked, early)
            .await
            .map_err(SendError::Failed)
    }

    /// The request head into `out`, with the framing the body needs: the fields of its map,
    /// then those kept in wire form (`wire`).
    fn write_head(&mut self, req: &Request<RequestBody>, wire: Option<&Outgoing>) -> Out {
        let out = &mut self.out;
        out.clear();
        out.extend_from_slice(req.method().as_str().as_bytes());
        out.push(b' ');
        let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
        out.extend_from_slice(target.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\n");
        // The request is framed by its body (whose length the client's framing decided), never
        // by a Content-Length or Transfer-Encoding field, which are not passed on as received.
        for (name, value) in req.headers() {
            if name != header::CONTENT_LENGTH && name != header::TRANSFER_ENCODING {
                field(out, name, value);
            }
        }
        if let Some(w) = wire {
            w.write(out);
        }
        let body = req.body();
        let framing = if matches!(body, RequestBody::Empty) {
            // A method that carries content gets an explicit empty one.
            if matches!(*req.method(), Method::POST | Method::PUT | Method::PATCH) {
                out.extend_from_slice(b"content-length: 0\r\n");
            }
            Out::Empty
        } else if let Some(n) = body.size_hint().exact() {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
            out.extend_from_slice(b"\r\n");
            Out::Length
        } else {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
            Out::Chunked
        };
        out.extend_from_slice(b"\r\n");
        framing
    }

    /// Drive the upload: gather the body behind the head in `out` and write it out when it is
    /// large, when the client has nothing more for now, and at the end.
    fn poll_upload(
        &mut self,
        cx: &mut Context<'_>,
        body: &mut RequestBody,
        up: &mut Upload,
    ) -> Poll<Result<(), SendError>> {
        loop {
            if up.flushing {
                while up.written < self.out.len() {
                    let wrote = Pin::new(&mut self.io).poll_write(cx, &self.out[up.written..]);
                    match std::task::ready!(wrote) {
                        Ok(0) => {
                            return Poll::Ready(Err(up.failed(io::ErrorKind::WriteZero.into())))
                        }
                        Ok(n) => {
                            up.written += n;
                            up.sent_any = true;
                        }
                        Err(e) => return Poll::Ready(Err(up.failed(e))),
                    }
                }
                std::task::ready!(Pin::new(&mut self.io).poll_flush(cx))
                    .map_err(SendError::Failed)?;
                self.out.clear();
                up.written = 0;
                up.flushing = false;
                if up.done {
                    return Poll::Ready(Ok(()));
                }
            }
            let frame = match Pin::new(&mut *body).poll_frame(cx) {
                Poll::Pending if self.out.is_empty() => return Poll::Pending,
                Poll::Pending => {
                    // The client has nothing more now: the backend gets what there is.
                    up.flushing = true;
                    continue;
                }
                Poll::Ready(f) => f,
            };
            match frame {
                None => {
                    if up.framing == Out::Chunked {
                        self.out.extend_from_slice(b"0\r\n\r\n");
                    }
                    up.done = true;
                    up.flushing = true;
                }
                Some(Err(e)) => return Poll::Ready(Err(SendError::Client(io::Error::other(e)))),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if data.is_empty() => {}
                    Ok(data) => {
                        if up.framing == Out::Chunked {
                            wire::chunk(&mut self.out, &data);
                        } else {
                            self.out.extend_from_slice(&data);
                        }
                        up.flushing = self.out.len() >= GATHER;
                    }
                    Err(frame) => {
                        // Trailers end the body: sent with a chunked one, dropped from a sized one.
                        if up.framing == Out::Chunked {
                            wire::last_chunk(&mut self.out, frame.trailers_ref());
                        }
                        up.done = true;
                        up.flushing = true;
                    }
                },
            }
        }
    }

    /// Ready with the final answer's head once it has arrived while the body is still going
    /// out (interim 1xx answers are dropped here, as `read_head` drops them). An end of stream
    /// or an error fails the exchange. The head is parsed once: `read_head` goes on from it.
    fn poll_early(&mut self, cx: &mut Context<'_>, asked: Asked) -> Poll<io::Result<Head>> {
        loop {
            if let Some(head) = self.parse_head(asked)? {
                if is_interim(&head) {
                    continue;
                }
                return Poll::Ready(Ok(head));
            }
            if self.rb.buf.len() > MAX_HEAD {
                return Poll::Ready(Err(invalid("response head too long")));
            }
            match std::task::ready!(self.poll_fill(cx))? {
                0 => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "backend closed the connection while the request went out",
                    )))
                }
                _ => continue,
            }
        }
    }

    /// Read more from the backend; 0 at the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.rb.poll_fill(&mut self.io, cx)
    }

    /// The response head (1xx answers other than 101 are skipped), with a body reading the
    /// rest from this connection.
    /// `early`: the head `poll_early` already read.
    async fn read_head(
        mut self: Box<Self>,
        asked: Asked,
        early: Option<Head>,
    ) -> io::Result<Response<BackendBody>> {
        let (resp, decided, fields) = match early {
            Some(head) => head,
            None => loop {
                if let Some(head) = self.parse_head(asked)? {
                    if is_interim(&head) {
                        continue;
                    }
                    break head;
                }
                if self.rb.buf.len() > MAX_HEAD {
                    return Err(invalid("response head too long"));
                }
                let n = poll_fn(|cx| self.poll_fill(cx)).await?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "backend closed the connection before answering",
                    ));
                }
            },
        };
        let upgraded = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        let body = BackendBody {
            conn: Some(self),
            framing: decided.body.into(),
            announced: decided.announced,
            keep_alive: decided.reusable && !upgraded,
            upgraded,
            fields: Some(fields),
        };
        Ok(resp.map(|()| body))
    }

    /// A complete response head out of `buf`, if there is one.
    fn parse_head(&mut self, asked: Asked) -> io::Result<Option<Head>> {
        if self.rb.buf.is_empty() {
            return Ok(None);
        }
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut fields);
        let len = match parsed.parse(&self.rb.buf) {
            Ok(httparse::Status::Complete(n)) if n <= MAX_HEAD => n,
            Ok(httparse::Status::Complete(_)) => return Err(invalid("response head too long")),
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(invalid(e)),
        };
        let status = parsed
            .code
            .and_then(|c| StatusCode::from_u16(c).ok())
            .ok_or_else(|| invalid("bad status code"))?;
        let version = if parsed.version == Some(0) {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        // The fields stay as they came (a map is made only for an HTTP/2 client); the body's
        // length is decided once, from them (framing.rs).
        let mut seen = Framing::default();
        let noted = WireFields::note(&self.rb.buf, parsed.headers, &mut seen);
        let decided = seen
            .response(status.as_u16(), version == Version::HTTP_10, asked)
            .map_err(BadAnswer)
            .map_err(invalid)?;
        let fields = WireFields::new(self.rb.buf.split_to(len).freeze(), noted);
        let mut resp = Response::new(());
        *resp.status_mut() = status;
        *resp.version_mut() = version;
        Ok(Some((resp, decided, fields)))
    }
}

/// A backend's answer that cannot be passed on (ambiguous framing, an unsolicited 101): the
/// error inside the I/O error the exchange fails with.
#[derive(Debug)]
pub struct BadAnswer(pub &'static str);

impl std::fmt::Display for BadAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for BadAnswer {}

/// One health probe of an HTTP/1 backend over the same client as traffic: GET `path` on a
/// fresh connection, passing on a 2xx whose body ends where its framing says (an answer that
/// traffic could not pass on fails the probe too).
pub async fn probe(target: &crate::net::Target, path: &str, peer: &str) -> bool {
    let Ok(io) = target.dial().await else {
        return false;
    };
    let (Ok(host), Ok(target_path)) = (
        http::HeaderValue::from_str(target.authority()),
        http::Uri::try_from(path),
    ) else {
        return false;
    };
    let mut req = Request::new(RequestBody::Empty);
    *req.uri_mut() = target_path;
    let h = req.headers_mut();
    h.insert(header::HOST, host);
    h.insert(
        header::USER_AGENT,
        http::HeaderValue::from_static("shoal-health"),
    );
    h.insert(header::CONNECTION, http::HeaderValue::from_static("close"));
    if let Ok(peer) = http::HeaderValue::from_str(peer) {
        h.insert(crate::net::PEER_HEADER, peer);
    }
    let Ok(resp) = Box::new(H1Conn::new(io)).send(&mut req, None).await else {
        return false;
    };
    let ok = resp.status().is_success();
    let mut body = resp.into_body();
    while let Some(frame) = poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        if frame.is_err() {
            return false;
        }
    }
    ok
}

/// A parsed answer head: the answer, its framing decision, its fields.
type Head = (Response<()>, ResponseFraming, WireFields);

/// An interim answer (1xx other than 101), which the client does not get: the final one follows.
fn is_interim((resp, _, _): &Head) -> bool {
    resp.status().is_informational() && resp.status() != StatusCode::SWITCHING_PROTOCOLS
}

/// How a request body is framed on the wire.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Out {
    Empty,
    Length,
    Chunked,
}

/// Where an upload is.
struct Upload {
    framing: Out,
    /// The body has ended; what is in `out` is the last of the request.
    done: bool,
    /// Writing `out` (up to `written`) before taking more of the body.
    flushing: bool,
    written: usize,
    /// Some of the request reached the connection.
    sent_any: bool,
}

impl Upload {
    /// A failed write: `NotSent` while nothing of the request went out.
    fn failed(&self, e: io::Error) -> SendError {
        if self.sent_any {
            SendError::Failed(e)
        } else {
            SendError::NotSent(e)
        }
    }
}

/// A response body read from its connection as the client polls it.
pub struct BackendBody {
    conn: Option<Box<H1Conn>>,
    framing: Decoder,
    /// The length a bodiless answer announces (HEAD, 304).
    announced: Option<u64>,
    /// The connection may carry another exchange once this body has ended.
    keep_alive: bool,
    /// A 101: the connection now belongs to the upgraded protocol.
    upgraded: bool,
    /// The answer's fields, until they are written or made into a map.
    fields: Option<WireFields>,
}

impl BackendBody {
    /// The connection, if the body ended cleanly, the request went out whole and it may carry
    /// another exchange.
    pub fn reusable(&mut self) -> Option<Box<H1Conn>> {
        if !self.keep_alive || !self.framing.is_end() {
            return None;
        }
        let mut conn = self.conn.take()?;
        if let Some((mut body, mut up)) = conn.upload.take() {
            // The answer came before the request's last bytes were known to be out (on an
            // io_uring socket the send's completion may be reaped beside the answer's): a send
            // already done finishes here; one still going keeps the connection from the pool.
            let mut cx = Context::from_waker(Waker::noop());
            match conn.poll_upload(&mut cx, &mut body, &mut up) {
                Poll::Pending => conn.upload = Some((body, up)),
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(_)) => conn.unfinished = true,
            }
        }
        Some(conn).filter(|c| c.rb.buf.is_empty() && c.upload.is_none() && !c.unfinished)
    }

    /// The length a bodiless answer announces (a HEAD's or a 304's Content-Length).
    pub fn announced(&self) -> Option<u64> {
        self.announced
    }

    /// The answer's fields as the backend sent them.
    pub fn fields(&self) -> Option<&WireFields> {
        self.fields.as_ref()
    }

    /// The answer's fields as a map (for an HTTP/2 client; `all` for a 101, whose
    /// Connection and Upgrade go on): none are left to write as they came.
    pub fn take_fields(&mut self, all: bool) -> http::HeaderMap {
        self.fields
            .take()
            .map(|f| f.into_map(all, 0))
            .unwrap_or_default()
    }

    /// After a 101: the connection and what the backend already sent past the head.
    pub fn upgraded(mut self) -> Option<(BackendIo, Bytes)> {
        let conn = self.conn.take().filter(|_| self.upgraded)?;
        Some((conn.io, conn.rb.buf.freeze()))
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Frame<Bytes>>>> {
        let Some(conn) = self.conn.as_mut() else {
            return Poll::Ready(None);
        };
        if let Some((mut body, mut up)) = conn.upload.take() {
            // The request's rest, while the backend takes it; one it stopped taking is left.
            match conn.poll_upload(cx, &mut body, &mut up) {
                Poll::Pending => conn.upload = Some((body, up)),
                // All sent: nothing keeps the connection from carrying another exchange.
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(SendError::Client(e))) => {
                    // The client's body broke off (the client gone, bad chunking): the exchange
                    // ends now, whatever the backend would still send, and takes its
                    // connection with it.
                    conn.unfinished = true;
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(Err(_)) => conn.unfinished = true,
            }
        }
        conn.rb
            .poll_body(&mut conn.io, &mut self.framing, cx, "backend")
    }
}

impl Body for BackendBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<io::Result<Frame<Bytes>>>> {
        let this = self.get_mut();
        let polled = this.poll_next(cx);
        if let Poll::Ready(Some(Err(_))) = &polled {
            // A broken body: the connection is not reused.
            this.keep_alive = false;
            this.framing = Decoder::Done;
            this.conn = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.framing.is_end()
    }

    fn size_hint(&self) -> SizeHint {
        self.framing.size_hint()
    }
}

#[cfg(test)]
mod tests {
    //! Answer heads, byte for byte: how each is framed, whether its connection may be reused,
    //! or that it is refused (a 502; the connection closes).

    use super::*;
    use crate::net::BackendIo;

    #[derive(Debug, PartialEq)]
    enum Seen {
        /// Passed on: status, body, reusable after it.
        Passed(u16, Vec<u8>, bool),
        /// Refused: the exchange fails (the client gets 502).
        Refused,
        /// The body broke off (the client's answer is cut).
        Cut,
        /// The body waits for more than the bytes given (read to the close, or cut short).
        Waiting,
    }

    /// What the client gets of `bytes` from a backend, read as `send` reads it: by `read_head`
    /// alone, or (`early`) first by `poll_early`, as when the answer comes while the request is
    /// still going out, and then by `read_head` from the head it found.
    async fn seen(bytes: &[u8], asked: Asked, early: bool) -> Seen {
        use std::future::Future;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let s = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let _peer = l.accept().await.unwrap();
        let mut conn = Box::new(H1Conn::new(BackendIo::Plain(s)));
        conn.rb.buf.extend_from_slice(bytes);
        // Nothing more comes: a head not found in `bytes` (Pending) is refused too.
        let found = match early {
            false => None,
            true => match poll_fn(|cx| Poll::Ready(conn.poll_early(cx, asked))).await {
                Poll::Ready(Ok(head)) => Some(head),
                _ => return Seen::Refused,
            },
        };
        let mut read = std::pin::pin!(conn.read_head(asked, found));
        let Poll::Ready(Ok(resp)) = poll_fn(|cx| Poll::Ready(read.as_mut().poll(cx))).await else {
            return Seen::Refused;
        };
        let (resp, mut body) = resp.into_parts();
        let mut data = Vec::new();
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        loop {
            if body.is_end_stream() {
                break;
            }
            match Pin::new(&mut body).poll_frame(&mut cx) {
                Poll::Ready(None) => break,
                Poll::Ready(Some(Ok(f))) => {
                    if let Ok(d) = f.into_data() {
                        data.extend_from_slice(&d);
                    }
                }
                Poll::Ready(Some(Err(_))) => return Seen::Cut,
                Poll::Pending => return Seen::Waiting,
            }
        }
        Seen::Passed(resp.status.as_u16(), data, body.reusable().is_some())
    }

    #[tokio::test]
    async fn answer_heads_byte_for_byte() {
        use Seen::*;
        let get = Asked::default();
        let head = Asked {
            head: true,
            upgrade: false,
        };
        let passed = |s: u16, b: &str, reuse: bool| Passed(s, b.as_bytes().to_vec(), reuse);
        #[rustfmt::skip]
        let cases: Vec<(&str, Asked, Seen)> = vec![
            ("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", get, passed(200, "ok", true)),
            ("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", get, passed(200, "", true)),
            ("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n", get, passed(200, "ok", true)),
            ("HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n2\r\nok\r\n0\r\nX-Sum: 1\r\n\r\n", get, passed(200, "ok", true)),
            ("HTTP/1.1 200 OK\nContent-Length: 2\n\nok", get, passed(200, "ok", true)),
            // Bytes past the end of the answer: the connection is not reused.
            ("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n\r\n", get, passed(200, "ok", false)),
            ("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nX", get, passed(200, "", false)),
            // Connection: close, HTTP/1.0, and a length named in Connection.
            ("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", get, passed(200, "ok", false)),
            ("HTTP/1.1 200 OK\r\nConnection: Content-Length\r\nContent-Length: 2\r\n\r\nok", get, passed(200, "ok", true)),
            ("HTTP/1.1 200 OK\r\nConnection: Transfer-Encoding\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n", get, passed(200, "ok", true)),
            ("HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", get, passed(200, "ok", false)),
            ("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok", get, passed(200, "ok", true)),
            // Neither length: to the close, never reused.
            ("HTTP/1.1 200 OK\r\n\r\nuntil the close", get, Waiting),
            // Ambiguous: refused.
            ("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n", get, Refused),
            ("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n", get, Refused),
            ("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok", get, Refused),
            ("HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok", get, Refused),
            ("HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nok", get, Refused),
            ("HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok", get, Refused),
            ("HTTP/1.1 200 OK\r\nContent-Length: 0x2\r\n\r\nok", get, Refused),
            ("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", get, Refused),
            ("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", get, Refused),
            ("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", get, Refused),
            ("HTTP/1.1 200 OK\r\nTransfer-Encoding: xchunked\r\n\r\n", get, Refused),
            ("HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", get, Refused),
            ("HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nok", get, Refused),
            ("HTTP/1.1 200 OK\r\nX: 1\r\n folded\r\n\r\n", get, Refused),
            ("HTTP/1.1 200 OK\r\nX: a\rb\r\n\r\n", get, Refused),
            ("HTTP/1.1 2000 OK\r\n\r\n", get, Refused),
            ("HTTP/1.2 200 OK\r\n\r\n", get, Refused),
            ("HTTX/1.1 200 OK\r\n\r\n", get, Refused),
            // An unsolicited 101.
            ("HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n", get, Refused),
            // Bodiless answers: HEAD, 204, 304, whatever they say.
            ("HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", head, passed(200, "", true)),
            ("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", head, passed(200, "", true)),
            ("HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n", get, passed(204, "", true)),
            ("HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n", get, passed(304, "", true)),
            ("HTTP/1.1 204 No Content\r\n\r\nhello", get, passed(204, "", false)),
            // Interim answers are skipped.
            ("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", get, passed(200, "ok", true)),
            ("HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", get, passed(200, "ok", true)),
            // Bodies cut or malformed.
            ("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nok", get, Waiting),
            ("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokX", get, Cut),
            ("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2;a\rb\r\nok\r\n0\r\n\r\n", get, Cut),
            ("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\nok\r\n0\r\n\r\n", get, Cut),
        ];
        for (bytes, asked, want) in cases {
            for early in [false, true] {
                let got = seen(bytes.as_bytes(), asked, early).await;
                assert_eq!(got, want, "{bytes:?}, early: {early}");
            }
        }
    }

    /// A health probe on the wire: the request it sends (a bodiless GET naming its peer, the
    /// connection closed after), and which answers pass: a 2xx whose body ends where its framing
    /// says; anything traffic could not pass on fails.
    #[tokio::test]
    async fn probes_byte_for_byte() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        #[rustfmt::skip]
        let cases: [(&str, bool); 7] = [
            ("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", true),
            ("HTTP/1.1 204 No Content\r\n\r\n", true),
            ("HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n", false),
            ("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n", false),
            ("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nok", false),
            ("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok", false),
            ("garbage\r\n\r\n", false),
        ];
        for (answer, pass) in cases {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap().to_string();
            let backend = tokio::spawn(async move {
                let (mut s, _) = l.accept().await.unwrap();
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && s.read(&mut byte).await.unwrap() == 1 {
                    head.push(byte[0]);
                }
                s.write_all(answer.as_bytes()).await.unwrap();
                // Then the close, which ends a body that waits for more.
                String::from_utf8(head).unwrap().to_ascii_lowercase()
            });
            let target = crate::net::Target::parse(&addr, None, false).unwrap();
            let ok = probe(&target, "/healthz", "peer-a").await;
            let head = backend.await.unwrap();
            assert_eq!(ok, pass, "{answer:?}");
            assert!(head.starts_with("get /healthz http/1.1\r\n"), "{head}");
            for line in [
                "x-shoal-peer: peer-a",
                "connection: close",
                "user-agent: shoal-health",
            ] {
                assert!(
                    head.contains(&format!("\r\n{line}\r\n")),
                    "{line} in {head}"
                );
            }
            assert!(
                !head.contains("content-length") && !head.contains("transfer-encoding"),
                "{head}"
            );
        }
    }
}
