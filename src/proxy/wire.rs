//! HTTP/1.1 on the wire, shared by both of Shoal's ends (the client side in `server::h1`, the
//! backend side in `upstream::h1`): an adaptive read buffer, the message-body decoder
//! (Content-Length, chunked with trailers, read-to-close), a head's fields kept as the lines they
//! came in (`WireFields`) and the writing of field lines.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http_body::Frame;
use tokio::io::AsyncRead;

use super::framing::{BodyLength, Framing};

/// The longest head (or chunk-size line, or trailer section) taken from a peer.
pub const MAX_HEAD: usize = 64 * 1024;
/// Header fields taken in one head (hyper's default; HAProxy's is 101).
pub const MAX_HEADERS: usize = 100;
/// Reads start at this size and double while they fill the buffer, up to `READ_MAX`.
pub const READ_MIN: usize = 8 * 1024;
const READ_MAX: usize = 256 * 1024;
/// Body data up to this size is gathered with a head into one write.
pub const GATHER: usize = 16 * 1024;

pub fn invalid(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// One `name: value` line of a head or a trailer section.
pub fn field(out: &mut Vec<u8>, name: &HeaderName, value: &HeaderValue) {
    out.extend_from_slice(name.as_str().as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// `n` in hex, into `buf`.
pub fn hex(mut n: usize, buf: &mut [u8; 18]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b"0123456789abcdef"[n & 15];
        n >>= 4;
        if n == 0 {
            return &buf[i..];
        }
    }
}

/// One chunk of a chunked body: its size line, the data, its CRLF.
pub fn chunk(out: &mut Vec<u8>, data: &[u8]) {
    let mut size = [0u8; 18];
    out.extend_from_slice(hex(data.len(), &mut size));
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// The end of a chunked body: the last chunk and the trailer section.
pub fn last_chunk(out: &mut Vec<u8>, trailers: Option<&HeaderMap>) {
    out.extend_from_slice(b"0\r\n");
    for (name, value) in trailers.into_iter().flatten() {
        field(out, name, value);
    }
    out.extend_from_slice(b"\r\n");
}

/// What was read from a peer and not yet used, and how much the next read asks for.
#[derive(Debug)]
pub struct ReadBuf {
    pub buf: BytesMut,
    read_size: usize,
}

impl Default for ReadBuf {
    fn default() -> Self {
        Self {
            buf: BytesMut::new(),
            read_size: READ_MIN,
        }
    }
}

impl ReadBuf {
    /// Read more into `buf`; 0 at the end of the stream. Reads grow while they fill the room.
    pub fn poll_fill<I: AsyncRead + Unpin + ?Sized>(
        &mut self,
        io: &mut I,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < READ_MIN / 4 {
            self.buf.reserve(self.read_size);
        }
        let room = self.buf.capacity() - self.buf.len();
        let n = std::task::ready!(tokio_util::io::poll_read_buf(
            Pin::new(io),
            cx,
            &mut self.buf
        ))?;
        if n == room && self.read_size < READ_MAX {
            self.read_size *= 2;
        }
        Poll::Ready(Ok(n))
    }

    /// Like `poll_fill`, for a buffer let go of while its connection was idle: the read goes
    /// to the stack first, and the buffer is made for what came (a small head costs a small
    /// allocation; a connection waiting for its next request holds none).
    pub fn poll_fill_fresh<I: AsyncRead + Unpin + ?Sized>(
        &mut self,
        io: &mut I,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        if self.buf.capacity() != 0 {
            return self.poll_fill(io, cx);
        }
        // Not zeroed: a read may come to nothing (the socket not readable yet).
        let mut stack = [std::mem::MaybeUninit::<u8>::uninit(); 4096];
        let mut rb = tokio::io::ReadBuf::uninit(&mut stack);
        std::task::ready!(Pin::new(io).poll_read(cx, &mut rb))?;
        self.buf.extend_from_slice(rb.filled());
        Poll::Ready(Ok(rb.filled().len()))
    }

    /// The next frame of a body framed by `decoder`, reading from `io` as needed. A body read
    /// to the close ends cleanly there; any other ends early with an error saying `who` closed.
    pub fn poll_body<I: AsyncRead + Unpin + ?Sized>(
        &mut self,
        io: &mut I,
        decoder: &mut Decoder,
        cx: &mut Context<'_>,
        who: &'static str,
    ) -> Poll<Option<io::Result<Frame<Bytes>>>> {
        loop {
            match decoder.decode(&mut self.buf) {
                Ok(Decoded::Frame(f)) => return Poll::Ready(Some(Ok(f))),
                Ok(Decoded::End) => return Poll::Ready(None),
                Ok(Decoded::More) => {}
                Err(e) => return Poll::Ready(Some(Err(e))),
            }
            match std::task::ready!(self.poll_fill(io, cx)) {
                Ok(0) if *decoder == Decoder::ToEnd => {
                    *decoder = Decoder::Done;
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    let e = format!("{who} closed the connection mid-body");
                    return Poll::Ready(Some(Err(io::Error::new(io::ErrorKind::UnexpectedEof, e))));
                }
                Ok(_) => {}
                Err(e) => return Poll::Ready(Some(Err(e))),
            }
        }
    }

    /// Let go of the buffer when nothing is in it (an idle connection keeps no memory for reads).
    pub fn release(&mut self) {
        if self.buf.is_empty() {
            self.buf = BytesMut::new();
            self.read_size = READ_MIN;
        }
    }

    /// Let go of a buffer grown by a large message (nothing buffered is lost); reads start
    /// small again.
    pub fn shrink(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > READ_MIN {
            self.buf = BytesMut::new();
        }
        self.read_size = READ_MIN;
    }
}

/// How much of a message body is left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoder {
    Length(u64),
    Chunked(Chunk),
    /// Until the peer closes.
    ToEnd,
    Done,
}

/// Where a chunked body's reader is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk {
    Size,
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    Trailers,
}

/// What the decoder made of the buffered bytes.
pub enum Decoded {
    Frame(Frame<Bytes>),
    /// The body has ended (trailers, if any, came as the last frame).
    End,
    /// Nothing usable is buffered: read more.
    More,
}

impl From<BodyLength> for Decoder {
    fn from(length: BodyLength) -> Self {
        match length {
            BodyLength::Length(n) => Decoder::Length(n),
            BodyLength::Chunked => Decoder::Chunked(Chunk::Size),
            BodyLength::ToClose => Decoder::ToEnd,
        }
    }
}

impl Decoder {
    pub fn is_end(&self) -> bool {
        matches!(self, Decoder::Done | Decoder::Length(0))
    }

    /// What is known of the body's remaining length.
    pub fn size_hint(&self) -> http_body::SizeHint {
        match self {
            Decoder::Length(n) => http_body::SizeHint::with_exact(*n),
            Decoder::Done => http_body::SizeHint::with_exact(0),
            _ => http_body::SizeHint::default(),
        }
    }

    /// The next frame out of `buf`, if it holds one.
    pub fn decode(&mut self, buf: &mut BytesMut) -> io::Result<Decoded> {
        loop {
            match self {
                Decoder::Done | Decoder::Length(0) => {
                    *self = Decoder::Done;
                    return Ok(Decoded::End);
                }
                Decoder::Length(left) => {
                    if buf.is_empty() {
                        return Ok(Decoded::More);
                    }
                    let n = (*left).min(buf.len() as u64) as usize;
                    *left -= n as u64;
                    return Ok(Decoded::Frame(Frame::data(buf.split_to(n).freeze())));
                }
                Decoder::ToEnd => {
                    if buf.is_empty() {
                        return Ok(Decoded::More);
                    }
                    return Ok(Decoded::Frame(Frame::data(buf.split().freeze())));
                }
                Decoder::Chunked(state) => match state {
                    Chunk::Size => {
                        let Some(eol) = memchr::memchr(b'\n', buf) else {
                            if buf.len() > MAX_HEAD {
                                return Err(invalid("chunk size line too long"));
                            }
                            return Ok(Decoded::More);
                        };
                        let size = chunk_size(&buf[..eol])?;
                        buf.advance(eol + 1);
                        *state = if size == 0 {
                            Chunk::Trailers
                        } else {
                            Chunk::Data(size)
                        };
                    }
                    Chunk::Data(left) => {
                        if buf.is_empty() {
                            return Ok(Decoded::More);
                        }
                        let n = (*left).min(buf.len() as u64) as usize;
                        *left -= n as u64;
                        if *left == 0 {
                            *state = Chunk::DataEnd;
                        }
                        return Ok(Decoded::Frame(Frame::data(buf.split_to(n).freeze())));
                    }
                    Chunk::DataEnd => {
                        // Exactly CRLF after a chunk's data (RFC 9112 §7.1).
                        if buf.starts_with(b"\r\n") {
                            buf.advance(2);
                        } else if buf.len() < 2 && buf.first().is_none_or(|b| *b == b'\r') {
                            return Ok(Decoded::More);
                        } else {
                            return Err(invalid("missing CRLF after chunk"));
                        }
                        *state = Chunk::Size;
                    }
                    Chunk::Trailers => {
                        let Some((n, trailers)) = trailer_section(buf)? else {
                            return Ok(Decoded::More);
                        };
                        buf.advance(n);
                        *self = Decoder::Done;
                        return Ok(match trailers {
                            Some(t) => Decoded::Frame(Frame::trailers(t)),
                            None => Decoded::End,
                        });
                    }
                },
            }
        }
    }
}

/// A chunk-size line (without its LF): the size, or why the line is refused. Strict (RFC 9112
/// §7.1): 1 to 16 hex digits, then optional extensions (`;` after optional blanks, then token,
/// `=`, quoted-string or blank characters only: no control character, no bare CR), then CR.
fn chunk_size(line: &[u8]) -> io::Result<u64> {
    let Some(line) = line.strip_suffix(b"\r") else {
        return Err(invalid("chunk size line not ended by CRLF"));
    };
    let digits = line
        .iter()
        .position(|b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    if digits == 0 || digits > 16 {
        return Err(invalid("bad chunk size"));
    }
    if !chunk_extensions_ok(&line[digits..]) {
        return Err(invalid("bad chunk extension"));
    }
    let size = line[..digits].iter().try_fold(0u64, |n, d| {
        let d = (*d as char).to_digit(16)? as u64;
        n.checked_mul(16)?.checked_add(d)
    });
    size.ok_or_else(|| invalid("chunk size too large"))
}

/// Chunk extensions (RFC 9112 §7.1.1): `*( BWS ";" BWS name [ BWS "=" BWS value ] )`, a name a
/// token, a value a token or a quoted string (no control character but HTAB inside).
fn chunk_extensions_ok(mut ext: &[u8]) -> bool {
    fn blanks(s: &[u8]) -> &[u8] {
        let n = s.iter().take_while(|b| matches!(**b, b' ' | b'\t')).count();
        &s[n..]
    }
    let token = |s: &[u8]| {
        s.iter()
            .take_while(|b| super::framing::is_tchar(**b))
            .count()
    };
    while !ext.is_empty() {
        ext = blanks(ext);
        let Some(rest) = ext.strip_prefix(b";") else {
            return false;
        };
        ext = blanks(rest);
        let n = token(ext);
        if n == 0 {
            return false;
        }
        ext = blanks(&ext[n..]);
        let Some(rest) = ext.strip_prefix(b"=") else {
            continue;
        };
        ext = blanks(rest);
        if let Some(mut q) = ext.strip_prefix(b"\"") {
            loop {
                match q {
                    [b'"', rest @ ..] => {
                        ext = rest;
                        break;
                    }
                    [b'\\', c, rest @ ..] if matches!(*c, b'\t' | b' '..=b'~' | 0x80..=0xff) => {
                        q = rest
                    }
                    [c, rest @ ..] if matches!(*c, b'\t' | b' ' | b'!' | 0x23..=0x5b | 0x5d..=0x7e | 0x80..=0xff) => {
                        q = rest
                    }
                    _ => return false,
                }
            }
        } else {
            let n = token(ext);
            if n == 0 {
                return false;
            }
            ext = &ext[n..];
        }
    }
    true
}

/// A complete trailer section at the front of `buf`: its length, and the trailer fields to pass
/// on (none left after dropping the ones a trailer may not carry: `None`). Every line ends in
/// CRLF; obsolete line folding, a bare CR or LF, or a bad field is refused.
fn trailer_section(buf: &[u8]) -> io::Result<Option<(usize, Option<HeaderMap>)>> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    match httparse::parse_headers(buf, &mut fields) {
        Ok(httparse::Status::Complete((n, fields))) => {
            let section = &buf[..n];
            let bare_lf =
                memchr::memchr_iter(b'\n', section).any(|i| i == 0 || section[i - 1] != b'\r');
            if bare_lf {
                return Err(invalid("trailer line not ended by CRLF"));
            }
            let mut trailers = HeaderMap::new();
            for f in fields.iter() {
                if super::framing::forbidden_in_trailers(f.name.as_bytes()) {
                    continue;
                }
                let name = HeaderName::from_bytes(f.name.as_bytes());
                let value = HeaderValue::from_bytes(f.value);
                match (name, value) {
                    (Ok(name), Ok(value)) => {
                        trailers.append(name, value);
                    }
                    _ => return Err(invalid("bad trailer field")),
                }
            }
            Ok(Some((n, (!trailers.is_empty()).then_some(trailers))))
        }
        Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD => Ok(None),
        Ok(httparse::Status::Partial) => Err(invalid("trailers too long")),
        Err(_) => Err(invalid("bad trailer section")),
    }
}

/// What a field's name says to a proxy passing the head on.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum FieldRole {
    Length,
    Coding,
    Connection,
    Upgrade,
    Te,
    /// Another hop-by-hop field (RFC 9110 §7.6.1: Trailer, plus the legacy Keep-Alive and
    /// Proxy-Connection).
    Hop,
    Date,
    Host,
    Expect,
    ForwardedFor,
    ForwardedProto,
    ForwardedHost,
    Other,
}

impl FieldRole {
    pub fn of(name: &[u8]) -> FieldRole {
        let is = |n: &[u8]| name.eq_ignore_ascii_case(n);
        match name.len() {
            2 if is(b"te") => FieldRole::Te,
            4 if is(b"date") => FieldRole::Date,
            4 if is(b"host") => FieldRole::Host,
            6 if is(b"expect") => FieldRole::Expect,
            7 if is(b"trailer") => FieldRole::Hop,
            7 if is(b"upgrade") => FieldRole::Upgrade,
            10 if is(b"connection") => FieldRole::Connection,
            10 if is(b"keep-alive") => FieldRole::Hop,
            14 if is(b"content-length") => FieldRole::Length,
            15 if is(b"x-forwarded-for") => FieldRole::ForwardedFor,
            16 if is(b"proxy-connection") => FieldRole::Hop,
            16 if is(b"x-forwarded-host") => FieldRole::ForwardedHost,
            17 if is(b"transfer-encoding") => FieldRole::Coding,
            17 if is(b"x-forwarded-proto") => FieldRole::ForwardedProto,
            _ => FieldRole::Other,
        }
    }

    /// Never passed on as received: the framing fields (the proxy writes its own, from its
    /// decision) and the hop-by-hop ones.
    fn hop_by_hop(self) -> bool {
        matches!(
            self,
            FieldRole::Length
                | FieldRole::Coding
                | FieldRole::Connection
                | FieldRole::Upgrade
                | FieldRole::Te
                | FieldRole::Hop
        )
    }

    /// Never dropped by being named in `Connection`: what a request is routed and forwarded by.
    fn nameable(self) -> bool {
        !matches!(self, FieldRole::Host | FieldRole::ForwardedFor)
    }
}

/// Where one field is in its head.
#[derive(Clone, Copy)]
pub struct Span {
    name: (u32, u32),
    value: (u32, u32),
    role: FieldRole,
    /// Passed on: not a framing field, not hop-by-hop, not one the proxy writes itself.
    keep: bool,
}

/// A head's fields as the peer sent them: the head's bytes and where each field is, with what
/// a proxy does not pass on marked. Passed from one HTTP/1 peer to another, the kept lines are
/// copied as they came; only an HTTP/2 peer (or a 101, an upgrade, an access log, a hash on a
/// field) needs them as a `HeaderMap`, whose building (a name lookup, a hash and a shared slice
/// per field) was most of the cost of passing a small exchange on. The framing fields are never
/// kept: what goes on is framed by `framing`'s decision alone.
#[derive(Clone)]
pub struct WireFields {
    head: Bytes,
    spans: Vec<Span>,
}

/// The fields `WireFields::note` found, before the head is split off its buffer.
pub struct Noted(Vec<Span>);

impl WireFields {
    /// Note the fields httparse read out of `buf` (whose first bytes are the head), taking in
    /// their framing; `WireFields::new` makes them once the head is split off.
    pub fn note(buf: &[u8], fields: &[httparse::Header<'_>], framing: &mut Framing) -> Noted {
        let base = buf.as_ptr() as usize;
        let mut spans = Vec::with_capacity(fields.len());
        let mut named = false;
        for f in fields {
            let name = f.name.as_bytes();
            let at = |s: &[u8]| (s.as_ptr() as usize - base) as u32;
            let (n, v) = (at(name), at(f.value));
            let role = FieldRole::of(name);
            match role {
                FieldRole::Length | FieldRole::Coding => framing.field(name, f.value),
                FieldRole::Connection => named |= framing.connection(f.value),
                _ => {}
            }
            spans.push(Span {
                name: (n, n + name.len() as u32),
                value: (v, v + f.value.len() as u32),
                role,
                keep: !role.hop_by_hop(),
            });
        }
        let text = |(a, b): (u32, u32)| &buf[a as usize..b as usize];
        if named {
            // Fields the Connection field names are hop-by-hop too; never the ones a request is
            // routed and forwarded by.
            for c in spans
                .clone()
                .iter()
                .filter(|s| s.role == FieldRole::Connection)
            {
                for token in text(c.value).split(|b| *b == b',') {
                    let token = token.trim_ascii();
                    for s in spans.iter_mut() {
                        if s.role.nameable() && text(s.name).eq_ignore_ascii_case(token) {
                            s.keep = false;
                        }
                    }
                }
            }
        }
        Noted(spans)
    }

    /// The fields of `head` (split off the buffer `note` read), as noted.
    pub fn new(head: Bytes, Noted(spans): Noted) -> Self {
        Self { head, spans }
    }

    /// No fields (an `Outgoing` whose lines are all the proxy's).
    pub fn empty() -> Self {
        Self {
            head: Bytes::new(),
            spans: Vec::new(),
        }
    }

    fn bytes(&self, (a, b): (u32, u32)) -> &[u8] {
        &self.head[a as usize..b as usize]
    }

    /// Whether a field of this role is there.
    pub fn has(&self, role: FieldRole) -> bool {
        self.spans.iter().any(|s| s.role == role)
    }

    /// The values of the fields of this role, in order.
    pub fn values(&self, role: FieldRole) -> impl Iterator<Item = &[u8]> {
        self.spans
            .iter()
            .filter(move |s| s.role == role)
            .map(|s| self.bytes(s.value))
    }

    /// The value of the first field of this role, sharing the head's bytes.
    pub fn value(&self, role: FieldRole) -> Option<HeaderValue> {
        let s = self.spans.iter().find(|s| s.role == role)?;
        HeaderValue::from_maybe_shared(self.head.slice(s.value.0 as usize..s.value.1 as usize)).ok()
    }

    /// Pass none of the fields of this role on (the proxy writes its own).
    pub fn drop_all(&mut self, role: FieldRole) {
        for s in self.spans.iter_mut().filter(|s| s.role == role) {
            s.keep = false;
        }
    }

    /// The kept fields as the lines they came in: consecutive kept lines ending in CRLF are
    /// copied as one run (a bare LF ending is written as CRLF).
    pub fn write(&self, out: &mut Vec<u8>) {
        let mut run: Option<(u32, u32)> = None;
        for s in self.spans.iter().filter(|s| s.keep) {
            run = match run {
                Some((a, b)) if self.head.get(b as usize..s.name.0 as usize) == Some(b"\r\n") => {
                    Some((a, s.value.1))
                }
                Some(r) => {
                    out.extend_from_slice(self.bytes(r));
                    out.extend_from_slice(b"\r\n");
                    Some((s.name.0, s.value.1))
                }
                None => Some((s.name.0, s.value.1)),
            };
        }
        if let Some(r) = run {
            out.extend_from_slice(self.bytes(r));
            out.extend_from_slice(b"\r\n");
        }
    }

    /// The fields as a map (values sharing the head's bytes), with `room` for more: the kept
    /// ones, or with `all` every one, as received (a 101's Connection and Upgrade go on; a
    /// request's map is rewritten by the forwarder).
    pub fn into_map(self, all: bool, room: usize) -> HeaderMap {
        let mut map = HeaderMap::with_capacity(self.spans.len() + room);
        for s in self.spans.iter().filter(|s| all || s.keep) {
            let name = HeaderName::from_bytes(self.bytes(s.name));
            let value = HeaderValue::from_maybe_shared(
                self.head.slice(s.value.0 as usize..s.value.1 as usize),
            );
            // httparse checked both as strictly; nothing it let through is refused here.
            if let (Ok(name), Ok(value)) = (name, value) {
                map.append(name, value);
            }
        }
        map
    }
}

/// A request's fields on their way to an HTTP/1 backend in wire form: the client's kept
/// fields, the lines the proxy adds, and the Host to send when the client's fields have none.
pub struct Outgoing {
    pub fields: WireFields,
    pub added: Vec<u8>,
    /// Neither a Host field nor an absolute-form target (an HTTP/1.0 client): each attempt
    /// sends its backend's `host`.
    pub needs_host: bool,
    pub host: Option<HeaderValue>,
}

impl Outgoing {
    pub fn write(&self, out: &mut Vec<u8>) {
        self.fields.write(out);
        out.extend_from_slice(&self.added);
        if let Some(h) = &self.host {
            field(out, &http::header::HOST, h);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An `Outgoing` with no client fields (an HTTP/2 client's, written as lines) writes the
    /// proxy's lines alone, then the backend's Host when one is set.
    #[test]
    fn an_outgoing_with_no_client_fields_writes_only_the_proxys_lines() {
        let empty = WireFields::empty();
        assert!(!empty.has(FieldRole::Host) && empty.values(FieldRole::Other).next().is_none());
        assert!(empty.clone().into_map(true, 0).is_empty());
        let mut o = Outgoing {
            fields: empty,
            added: b"accept: */*\r\nx-forwarded-for: 10.0.0.1\r\n".to_vec(),
            needs_host: true,
            host: None,
        };
        let mut out = Vec::new();
        o.write(&mut out);
        assert_eq!(out, b"accept: */*\r\nx-forwarded-for: 10.0.0.1\r\n");
        o.host = Some(HeaderValue::from_static("b.example:8080"));
        out.clear();
        o.write(&mut out);
        assert_eq!(
            out,
            b"accept: */*\r\nx-forwarded-for: 10.0.0.1\r\nhost: b.example:8080\r\n"
        );
    }

    #[test]
    fn hex_sizes() {
        let mut b = [0u8; 18];
        assert_eq!(hex(0, &mut b), b"0");
        assert_eq!(hex(255, &mut b), b"ff");
        assert_eq!(hex(0x10000, &mut b), b"10000");
        assert_eq!(hex(usize::MAX, &mut b), b"ffffffffffffffff");
    }

    fn decode_all(mut d: Decoder, input: &[u8], step: usize) -> io::Result<(Vec<u8>, bool)> {
        let mut buf = BytesMut::new();
        let mut data = Vec::new();
        let mut trailers = false;
        let mut rest = input;
        loop {
            match d.decode(&mut buf)? {
                Decoded::Frame(f) => match f.into_data() {
                    Ok(b) => data.extend_from_slice(&b),
                    Err(_) => trailers = true,
                },
                Decoded::End => return Ok((data, trailers)),
                Decoded::More => {
                    if rest.is_empty() {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                    let n = step.min(rest.len());
                    buf.extend_from_slice(&rest[..n]);
                    rest = &rest[n..];
                }
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_however_the_bytes_arrive() {
        let input = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-t: 1\r\n\r\n";
        for step in 1..input.len() {
            let (data, trailers) = decode_all(Decoder::Chunked(Chunk::Size), input, step).unwrap();
            assert_eq!(data, b"hello world");
            assert!(trailers);
        }
        assert!(decode_all(Decoder::Chunked(Chunk::Size), b"zz\r\n", 4).is_err());
        assert!(decode_all(Decoder::Chunked(Chunk::Size), b"1\r\naXX", 7).is_err());
        let (data, _) = decode_all(Decoder::Length(3), b"abcdef", 2).unwrap();
        assert_eq!(data, b"abc");
    }

    /// Chunked bodies, byte for byte (hyper's `decode.rs` tests are the model): what each
    /// decodes to, or that it is refused, however the bytes are split.
    #[test]
    fn chunked_body_table() {
        #[rustfmt::skip]
        let cases: &[(&[u8], Option<&[u8]>)] = &[
            (b"0\r\n\r\n", Some(b"")),
            (b"1\r\na\r\n0\r\n\r\n", Some(b"a")),
            (b"A\r\n0123456789\r\n0\r\n\r\n", Some(b"0123456789")),
            (b"a\r\n0123456789\r\n0\r\n\r\n", Some(b"0123456789")),
            (b"0001\r\nx\r\n0\r\n\r\n", Some(b"x")),
            (b"1;ext\r\nx\r\n0\r\n\r\n", Some(b"x")),
            (b"1;a=b;c=\"d e\"\r\nx\r\n0\r\n\r\n", Some(b"x")),
            (b"1 ;a=b\r\nx\r\n0\r\n\r\n", Some(b"x")),
            (b"1\t;a\r\nx\r\n0\r\n\r\n", Some(b"x")),
            (b"0;last\r\n\r\n", Some(b"")),
            (b"1\r\nx\r\n0\r\nx-sum: 1\r\n\r\n", Some(b"x")),
            (b"1\r\nx\r\n0\r\nContent-Length: 9\r\n\r\n", Some(b"x")),
            // Refused: sizes.
            (b"\r\nx\r\n0\r\n\r\n", None),
            (b"g\r\nx\r\n0\r\n\r\n", None),
            (b"-1\r\nx\r\n0\r\n\r\n", None),
            (b"+1\r\nx\r\n0\r\n\r\n", None),
            (b"0x1\r\nx\r\n0\r\n\r\n", None),
            (b" 1\r\nx\r\n0\r\n\r\n", None),
            (b"1 \r\nx\r\n0\r\n\r\n", None),
            (b"1\x00\r\nx\r\n0\r\n\r\n", None),
            (b"10000000000000000\r\nx\r\n", None),
            (b"fffffffffffffffff\r\nx", None),
            // Refused: line endings.
            (b"1\nx\r\n0\r\n\r\n", None),
            (b"1\r\nx\n0\r\n\r\n", None),
            (b"1\r\nx\r0\r\n\r\n", None),
            (b"1\r\nxy\r\n0\r\n\r\n", None),
            (b"1\r\nx\r\n0\n\r\n", None),
            (b"1\r\nx\r\n0\r\n\n", None),
            (b"1\r\nx\r\n0\r\nx-sum: 1\n\r\n", None),
            // Refused: extensions with control characters (a bare CR, a LF, NUL, DEL).
            (b"1;a\rb\r\nx\r\n0\r\n\r\n", None),
            (b"1;a\x00\r\nx\r\n0\r\n\r\n", None),
            (b"1;a\x7f\r\nx\r\n0\r\n\r\n", None),
            (b"1;a\x0b\r\nx\r\n0\r\n\r\n", None),
            (b"1a;\r\nx", None),
            (b"1 a\r\nx\r\n0\r\n\r\n", None),
            (b"1,2\r\nx\r\n0\r\n\r\n", None),
            // Refused: trailer sections.
            (b"0\r\nx-sum 1\r\n\r\n", None),
            (b"0\r\nx-sum: 1\r\n folded\r\n\r\n", None),
            (b"0\r\n: 1\r\n\r\n", None),
            (b"0\r\nx sum: 1\r\n\r\n", None),
        ];
        for (input, want) in cases {
            for step in [1, 2, 3, 7, input.len()] {
                let got = decode_all(Decoder::Chunked(Chunk::Size), input, step);
                match want {
                    Some(data) => assert_eq!(
                        got.as_ref().map(|(d, _)| &d[..]).ok(),
                        Some(*data),
                        "{:?} step {step}: {got:?}",
                        String::from_utf8_lossy(input)
                    ),
                    None => assert!(
                        got.as_ref()
                            .is_err_and(|e| e.kind() == io::ErrorKind::InvalidData),
                        "{:?} step {step} was taken: {got:?}",
                        String::from_utf8_lossy(input)
                    ),
                }
            }
        }
    }

    #[test]
    fn trailers_lose_the_fields_a_trailer_may_not_carry() {
        let mut buf = BytesMut::from(
            &b"0\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\nHost: h\r\ngrpc-status: 0\r\n\r\n"[..],
        );
        let mut d = Decoder::Chunked(Chunk::Size);
        let Decoded::Frame(f) = d.decode(&mut buf).unwrap() else {
            panic!("no trailers")
        };
        let t = f.into_trailers().unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(t["grpc-status"], "0");
        assert!(buf.is_empty() && d == Decoder::Done);
        // Only forbidden fields: the body just ends.
        let mut buf = BytesMut::from(&b"0\r\nContent-Length: 5\r\n\r\n"[..]);
        let mut d = Decoder::Chunked(Chunk::Size);
        assert!(matches!(d.decode(&mut buf).unwrap(), Decoded::End));
    }

    fn wire_fields(head: &[u8]) -> io::Result<(WireFields, Framing)> {
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut fields);
        let len = match parsed.parse(head).map_err(invalid)? {
            httparse::Status::Complete(n) => n,
            httparse::Status::Partial => return Err(invalid("partial")),
        };
        let mut framing = Framing::default();
        let noted = WireFields::note(head, parsed.headers, &mut framing);
        let head = Bytes::copy_from_slice(&head[..len]);
        Ok((WireFields::new(head, noted), framing))
    }

    #[test]
    fn wire_fields_pass_on_what_a_proxy_may() {
        let (f, framing) = wire_fields(
            b"HTTP/1.1 200 OK\r\nServer: s\r\nConnection: keep-alive, X-Named\r\nX-Named: 1\r\n\
              Keep-Alive: timeout=5\r\nX-A: a\r\nx-b:b\nContent-Length: 3\r\nDate: d\r\n\r\n",
        )
        .unwrap();
        assert!(framing.keep_alive);
        assert!(f.has(FieldRole::Date));
        let mut out = Vec::new();
        f.write(&mut out);
        // Kept lines as they came (runs copied whole); the bare LF after x-b becomes CRLF. The
        // framing fields are never passed on as received.
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "Server: s\r\nX-A: a\r\nx-b:b\r\nDate: d\r\n"
        );
        let map = f.clone().into_map(false, 0);
        assert_eq!(map.len(), 4);
        assert!(!map.contains_key("x-named") && !map.contains_key("connection"));
        assert_eq!(f.into_map(true, 0).len(), 8);

        // A Connection field naming the framing fields, Host or X-Forwarded-For removes none
        // of them from what the framing decision sees, and Host and X-Forwarded-For still go.
        let (f, framing) = wire_fields(
            b"HTTP/1.1 200 OK\r\nConnection: Content-Length, Host, X-Forwarded-For, X-Gone\r\n\
              Content-Length: 5\r\nHost: h\r\nX-Forwarded-For: 1.2.3.4\r\nX-Gone: 1\r\n\r\n",
        )
        .unwrap();
        let decided = framing.response(200, false, Default::default()).unwrap();
        assert_eq!(decided.body, BodyLength::Length(5));
        let mut out = Vec::new();
        f.write(&mut out);
        assert_eq!(out, b"Host: h\r\nX-Forwarded-For: 1.2.3.4\r\n");
    }
}
