//! Bodies on both sides of the proxy. Nothing is buffered: request and response bodies stream
//! frame by frame; a finished upstream response hands its connection back to the pool. The one
//! copy kept is a tape of a small idempotent request's body, to send it again after a reset.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::upstream::{InflightGuard, Sender};

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
        let t = tape.lock().unwrap_or_else(|e| e.into_inner());
        (t.complete && !t.spoiled).then(|| RequestBody::Replay {
            chunks: t.chunks.iter().cloned().collect(),
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
        Stream { #[pin] inner: Incoming, tape: Option<SharedTape> },
        Replay { chunks: VecDeque<Bytes> },
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
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.project() {
            RequestBodyProj::Stream { mut inner, tape } => {
                let polled = inner.as_mut().poll_frame(cx);
                if let Some(tape) = tape {
                    let mut t = tape.lock().unwrap_or_else(|e| e.into_inner());
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
            RequestBodyProj::Replay { chunks } => {
                Poll::Ready(chunks.pop_front().map(|c| Ok(Frame::data(c))))
            }
            RequestBodyProj::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Stream { inner, .. } => inner.is_end_stream(),
            RequestBody::Replay { chunks } => chunks.is_empty(),
            RequestBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Stream { inner, .. } => inner.size_hint(),
            RequestBody::Replay { chunks } => {
                SizeHint::with_exact(chunks.iter().map(|c| c.len() as u64).sum())
            }
            RequestBody::Empty => SizeHint::with_exact(0),
        }
    }
}

/// Keeps the backend connection and the in-flight count with the response until its body ends.
pub struct Lease {
    pub sender: Sender,
    pub guard: InflightGuard,
}

impl Lease {
    fn release(self) {
        self.guard.upstream().checkin(self.sender);
    }
}

pin_project_lite::pin_project! {
    /// What goes to a client: a backend's body, or a short local one (errors, admin).
    #[project = ResponseBodyProj]
    pub enum ResponseBody {
        Full { data: Option<Bytes> },
        Upstream { #[pin] inner: Incoming, lease: Option<Lease> },
    }
}

impl ResponseBody {
    pub fn full(data: impl Into<Bytes>) -> Self {
        ResponseBody::Full {
            data: Some(data.into()),
        }
    }

    pub fn empty() -> Self {
        ResponseBody::Full { data: None }
    }

    pub fn upstream(inner: Incoming, lease: Option<Lease>) -> Self {
        let mut body = ResponseBody::Upstream { inner, lease };
        // An empty body (e.g. 204, HEAD) is already done: free the connection now.
        if let ResponseBody::Upstream { inner, lease } = &mut body {
            if inner.is_end_stream() {
                if let Some(l) = lease.take() {
                    l.release();
                }
            }
        }
        body
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.project() {
            ResponseBodyProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            ResponseBodyProj::Upstream { mut inner, lease } => {
                let polled = inner.as_mut().poll_frame(cx);
                // The server stops polling once `is_end_stream` says so, so release on the last
                // data frame too, not only on the final `None`.
                let finished = match &polled {
                    Poll::Ready(None) => true,
                    Poll::Ready(Some(Ok(_))) => inner.is_end_stream(),
                    _ => false,
                };
                if finished {
                    if let Some(l) = lease.take() {
                        l.release();
                    }
                }
                if let Poll::Ready(Some(Err(_))) = &polled {
                    // The backend broke off mid-body: drop the connection, not pool it.
                    lease.take();
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Full { data } => data.is_none(),
            ResponseBody::Upstream { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            ResponseBody::Upstream { inner, .. } => inner.size_hint(),
        }
    }
}
