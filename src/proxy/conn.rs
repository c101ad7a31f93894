//! The client connection's byte stream: activity for the idle timeout, and a watch on HTTP/1
//! request framing.
//!
//! hyper resolves a request carrying both Content-Length and Transfer-Encoding by dropping the
//! length (RFC 9112 §6.3 allows it), so the request would reach us looking clean. Shoal refuses
//! such requests instead (they are how requests get smuggled past proxies), so this wrapper
//! follows HTTP/1 framing on the bytes as they arrive and flags the connection; the service
//! answers 400 and closes. It reads heads line by line and skips bodies by length or chunk size;
//! on HTTP/2, or once a 101 actually went out, it stops looking (an `Upgrade` field alone changes
//! nothing: a backend may refuse the upgrade, and the connection goes on in HTTP/1).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Shared between the connection's I/O and its service.
#[derive(Default, Debug)]
pub struct ConnState {
    /// Reads and writes that moved bytes; the watchdog compares them between ticks.
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    /// Requests started on this connection, and those being served now.
    pub requests: AtomicU64,
    pub active_requests: AtomicU64,
    /// Set when a request head had both Content-Length and Transfer-Encoding.
    pub ambiguous: AtomicBool,
    /// Set when a 101 went out: the bytes that follow are the tunnel's, not HTTP/1.
    pub upgraded: AtomicBool,
}

pin_project_lite::pin_project! {
    pub struct WatchedIo<T> {
        #[pin]
        inner: T,
        state: Arc<ConnState>,
        framing: Framing,
    }
}

impl<T> WatchedIo<T> {
    pub fn new(inner: T, state: Arc<ConnState>) -> Self {
        Self {
            inner,
            state,
            framing: Framing::new(),
        }
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
        let new = &buf.filled()[before..];
        if !new.is_empty() {
            this.state.reads.fetch_add(1, Ordering::Relaxed);
            if !this.state.upgraded.load(Ordering::Relaxed) && this.framing.feed(new) {
                this.state.ambiguous.store(true, Ordering::Relaxed);
            }
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

/// Longest part of a header line we keep: enough for the names and values we look at.
const LINE_KEEP: usize = 96;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading a request head, line by line.
    Head,
    /// Skipping a body of known length.
    Body(u64),
    /// A chunk-size line.
    ChunkSize,
    /// Chunk data, then its CRLF.
    ChunkData(u64),
    ChunkEnd,
    /// Trailer lines after the last chunk, until an empty line.
    Trailers,
    /// Not HTTP/1 framing any more (HTTP/2, upgrade, or something we cannot follow).
    Off,
}

/// Follows HTTP/1 request framing over a byte stream.
#[derive(Debug)]
pub struct Framing {
    phase: Phase,
    line: [u8; LINE_KEEP],
    line_len: usize,
    first_line: bool,
    content_length: Option<u64>,
    saw_te: bool,
    chunked: bool,
}

impl Default for Framing {
    fn default() -> Self {
        Self::new()
    }
}

impl Framing {
    pub fn new() -> Self {
        Self {
            phase: Phase::Head,
            line: [0; LINE_KEEP],
            line_len: 0,
            first_line: true,
            content_length: None,
            saw_te: false,
            chunked: false,
        }
    }

    /// Feed bytes read from the client; true when a head with ambiguous framing completed.
    pub fn feed(&mut self, mut data: &[u8]) -> bool {
        let mut ambiguous = false;
        while !data.is_empty() {
            match self.phase {
                Phase::Off => return ambiguous,
                Phase::Body(n) => {
                    let take = (data.len() as u64).min(n);
                    data = &data[take as usize..];
                    self.phase = if n == take {
                        Phase::Head
                    } else {
                        Phase::Body(n - take)
                    };
                }
                Phase::ChunkData(n) => {
                    let take = (data.len() as u64).min(n);
                    data = &data[take as usize..];
                    self.phase = if n == take {
                        Phase::ChunkEnd
                    } else {
                        Phase::ChunkData(n - take)
                    };
                }
                Phase::Head | Phase::Trailers | Phase::ChunkSize | Phase::ChunkEnd => {
                    let Some(i) = memchr::memchr(b'\n', data) else {
                        self.keep(data);
                        return ambiguous;
                    };
                    let line = &data[..i];
                    data = &data[i + 1..];
                    if self.line_len == 0 {
                        // The whole line arrived in this read: looked at where it is.
                        ambiguous |= self.line_complete(line);
                    } else {
                        self.keep(line);
                        let (kept, n) = (self.line, self.line_len);
                        self.line_len = 0;
                        ambiguous |= self.line_complete(&kept[..n]);
                    }
                }
            }
        }
        ambiguous
    }

    fn keep(&mut self, bytes: &[u8]) {
        let room = LINE_KEEP - self.line_len;
        let n = bytes.len().min(room);
        self.line[self.line_len..self.line_len + n].copy_from_slice(&bytes[..n]);
        self.line_len += n;
    }

    fn line_complete(&mut self, mut line: &[u8]) -> bool {
        if let [head @ .., b'\r'] = line {
            line = head;
        }
        match self.phase {
            Phase::Head => {
                if self.first_line {
                    if line.is_empty() {
                        return false; // tolerated blank lines between requests
                    }
                    if line.starts_with(b"PRI * HTTP/2") {
                        self.phase = Phase::Off;
                    }
                    self.first_line = false;
                    return false;
                }
                // Only two fields matter; most lines are rejected by their first byte. (No
                // space may come between a field name and its colon: RFC 9112 §5.1.)
                match line.first().map(|b| b | 0x20) {
                    None => return self.head_complete(),
                    Some(b'c') if starts_with_ignore_case(line, b"content-length:") => {
                        let n = std::str::from_utf8(trim(&line[15..]))
                            .ok()
                            .and_then(|v| v.split(',').next())
                            .and_then(|v| v.trim().parse::<u64>().ok());
                        self.content_length = Some(n.unwrap_or(0));
                    }
                    Some(b't') if starts_with_ignore_case(line, b"transfer-encoding:") => {
                        let value = trim(&line[18..]);
                        self.saw_te = true;
                        self.chunked = value.len() >= 7
                            && value[value.len() - 7..].eq_ignore_ascii_case(b"chunked");
                    }
                    _ => {}
                }
                false
            }
            Phase::ChunkSize => {
                let digits = line.split(|&b| b == b';').next().unwrap_or(b"");
                let size = std::str::from_utf8(trim(digits))
                    .ok()
                    .and_then(|s| u64::from_str_radix(s, 16).ok());
                match size {
                    Some(0) => self.phase = Phase::Trailers,
                    Some(n) => self.phase = Phase::ChunkData(n),
                    None => self.phase = Phase::Off,
                }
                false
            }
            Phase::ChunkEnd => {
                self.phase = if line.is_empty() {
                    Phase::ChunkSize
                } else {
                    Phase::Off
                };
                false
            }
            Phase::Trailers => {
                if line.is_empty() {
                    self.reset_head();
                }
                false
            }
            Phase::Body(_) | Phase::ChunkData(_) | Phase::Off => false,
        }
    }

    fn head_complete(&mut self) -> bool {
        let ambiguous = self.saw_te && self.content_length.is_some();
        let next = if ambiguous {
            Phase::Off
        } else if self.saw_te {
            if self.chunked {
                Phase::ChunkSize
            } else {
                Phase::Off
            }
        } else {
            match self.content_length {
                Some(n) if n > 0 => Phase::Body(n),
                _ => Phase::Head,
            }
        };
        self.reset_head();
        self.phase = next;
        ambiguous
    }

    fn reset_head(&mut self) {
        self.phase = Phase::Head;
        self.first_line = true;
        self.content_length = None;
        self.saw_te = false;
        self.chunked = false;
    }
}

fn starts_with_ignore_case(line: &[u8], prefix: &[u8]) -> bool {
    line.len() >= prefix.len() && line[..prefix.len()].eq_ignore_ascii_case(prefix)
}

fn trim(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_split(input: &[u8], split: usize) -> bool {
        let mut f = Framing::new();
        let (a, b) = input.split_at(split.min(input.len()));
        f.feed(a) | f.feed(b)
    }

    fn any_split(input: &[u8]) -> bool {
        (0..=input.len()).any(|i| feed_split(input, i))
    }

    fn all_splits(input: &[u8]) -> bool {
        (0..=input.len()).all(|i| feed_split(input, i))
    }

    #[test]
    fn both_headers_flagged_however_the_bytes_arrive() {
        let req = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        assert!(all_splits(req));
        let req = b"POST / HTTP/1.1\r\nHost: x\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n";
        assert!(all_splits(req));
    }

    #[test]
    fn clean_requests_pass() {
        let req = b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\n";
        assert!(!any_split(req));
    }

    #[test]
    fn bodies_are_skipped_not_read_as_heads() {
        // The body text looks like headers; it must not be taken for the next head.
        let body = b"a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let mut req = format!(
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body);
        req.extend_from_slice(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(!any_split(&req));

        let data = b"Content-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let mut chunked = format!(
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n",
            data.len()
        )
        .into_bytes();
        chunked.extend_from_slice(data);
        chunked.extend_from_slice(b"\r\n0\r\n\r\n");
        let clean_len = chunked.len();
        chunked.extend_from_slice(
            b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        assert!(!any_split(&chunked[..clean_len]));
        // The smuggled second request is flagged, however the bytes arrive.
        assert!(all_splits(&chunked));
    }

    #[test]
    fn h2_stops_the_watch_and_an_upgrade_request_does_not() {
        let mut f = Framing::new();
        assert!(!f.feed(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"));
        // Until a 101 actually goes out (the service marks the connection), an Upgrade field
        // with or without Connection: upgrade is just a field.
        for head in [
            &b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n"[..],
            &b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n"[..],
        ] {
            let mut bytes = head.to_vec();
            bytes.extend_from_slice(
                b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            );
            assert!(all_splits(&bytes));
        }
    }
}
