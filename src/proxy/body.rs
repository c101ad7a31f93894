//! What goes to a backend. Nothing is buffered: a request body streams frame by frame. The one
//! copy kept is a tape of a small idempotent request's body, to send it again after a reset.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::client::H1Body;
use crate::sync::MutexExt;

/// Why a body broke off (the client's or a backend's connection failed mid-body).
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// A client's request body: read by Shoal's own HTTP/1 loop, or by hyper's HTTP/2 server.
pub enum ClientBody {
    H1(H1Body),
    H2(Incoming),
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            ClientBody::H1(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(Into::into))),
            ClientBody::H2(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(Into::into))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::H1(b) => b.is_end_stream(),
            ClientBody::H2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::H1(b) => b.size_hint(),
            ClientBody::H2(b) => b.size_hint(),
        }
    }
}

/// Request bodies up to this size are kept while they stream, so that an idempotent request
/// whose backend failed after receiving it can be retried (as linkerd does, at 64 KiB).
pub const REPLAY_LIMIT: usize = 64 * 1024;

/// A copy of a request body as it went out.
#[derive(Default, Debug)]
pub struct Tape {
    chunks: Vec<Bytes>,
    len: usize,
    complete: bool,
    /// Too long, trailers, or a broken stream: cannot be replayed.
    spoiled: bool,
}

pub type SharedTape = Arc<Mutex<Tape>>;

impl Tape {
    pub fn shared() -> SharedTape {
        Arc::new(Mutex::new(Tape::default()))
    }

    /// The whole body, if it was sent whole and kept whole.
    pub fn replay(tape: &SharedTape) -> Option<RequestBody> {
        let t = tape.locked();
        (t.complete && !t.spoiled).then(|| RequestBody::Replay {
            chunks: t.chunks.iter().cloned().collect(),
            bytes: None,
        })
    }

    fn record(&mut self, frame: &Frame<Bytes>) {
        match frame.data_ref() {
            Some(d) if !self.spoiled && self.len + d.len() <= REPLAY_LIMIT => {
                self.len += d.len();
                self.chunks.push(d.clone());
            }
            _ => {
                self.spoiled = true;
                self.chunks.clear();
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// What goes to a backend: the client's body as it arrives (taped when it may be replayed),
    /// a replay of a taped body, or nothing.
    #[project = RequestBodyProj]
    pub enum RequestBody {
        Stream {
            #[pin] inner: ClientBody,
            tape: Option<SharedTape>,
            bytes: Option<metrics::Counter>,
            // The client's body bytes, for the access log.
            seen: Option<Arc<AtomicU64>>,
            // Set when the client's body broke off or was malformed: whatever the attempt
            // then saw was the client's failure, not the backend's.
            broke: Arc<AtomicBool>,
        },
        Replay { chunks: VecDeque<Bytes>, bytes: Option<metrics::Counter> },
        Empty,
    }
}

impl RequestBody {
    /// Keep a copy of this body as it streams.
    pub fn tape(&mut self, tape: SharedTape) {
        if let RequestBody::Stream { tape: t, .. } = self {
            *t = Some(tape);
        }
    }

    /// Count the bytes that go out (`shoal_request_bytes_total` of the attempt's backend).
    pub fn count_into(&mut self, counter: metrics::Counter) {
        match self {
            RequestBody::Stream { bytes, .. } | RequestBody::Replay { bytes, .. } => {
                *bytes = Some(counter)
            }
            RequestBody::Empty => {}
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.project() {
            RequestBodyProj::Stream {
                mut inner,
                tape,
                bytes,
                seen,
                broke,
            } => {
                let polled = inner.as_mut().poll_frame(cx);
                if let Poll::Ready(Some(Err(_))) = &polled {
                    broke.store(true, Ordering::Relaxed);
                }
                if let Poll::Ready(Some(Ok(f))) = &polled {
                    if let Some(d) = f.data_ref() {
                        if let Some(c) = bytes.as_ref() {
                            c.increment(d.len() as u64);
                        }
                        if let Some(s) = seen.as_ref() {
                            s.fetch_add(d.len() as u64, Ordering::Relaxed);
                        }
                    }
                }
                if let Some(tape) = tape {
                    let mut t = tape.locked();
                    match &polled {
                        Poll::Ready(Some(Ok(frame))) => {
                            t.record(frame);
                            t.complete = inner.is_end_stream();
                        }
                        Poll::Ready(None) => t.complete = true,
                        Poll::Ready(Some(Err(_))) => t.spoiled = true,
                        Poll::Pending => {}
                    }
                }
                polled
            }
            RequestBodyProj::Replay { chunks, bytes } => {
                let next = chunks.pop_front();
                if let (Some(c), Some(d)) = (bytes.as_ref(), &next) {
                    c.increment(d.len() as u64);
                }
                Poll::Ready(next.map(|c| Ok(Frame::data(c))))
            }
            RequestBodyProj::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Stream { inner, .. } => inner.is_end_stream(),
            RequestBody::Replay { chunks, .. } => chunks.is_empty(),
            RequestBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Stream { inner, .. } => inner.size_hint(),
            RequestBody::Replay { chunks, .. } => {
                SizeHint::with_exact(chunks.iter().map(|c| c.len() as u64).sum())
            }
            RequestBody::Empty => SizeHint::with_exact(0),
        }
    }
}
