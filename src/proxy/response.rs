//! What goes to a client: a backend's response body, streamed frame by frame, which hands its
//! connection back to the pool when it ends; or a short local body (errors).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::access::AccessRecord;
use super::upstream::{h1, Lease};
use super::wire::WireFields;

pub use super::body::BodyError;

pin_project_lite::pin_project! {
    /// What goes to a client: a backend's body, or a short local one (errors, admin).
    #[project = ResponseBodyProj]
    pub enum ResponseBody {
        Full { data: Option<Bytes> },
        Upstream { #[pin] inner: Incoming, lease: Option<Lease> },
        // A body read by the request's task from its HTTP/1.1 connection.
        H1 { inner: h1::BackendBody, lease: Option<Lease> },
        // Any of the above, with its access log line written when it ends.
        Logged { inner: Pin<Box<ResponseBody>>, record: Option<Box<AccessRecord>> },
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

    /// `body`, logged (`record`) once its last byte went out, or when it is dropped early.
    pub fn logged(body: ResponseBody, record: AccessRecord) -> Self {
        let mut record = Box::new(record);
        if body.is_end_stream() {
            record.finish(true);
        }
        ResponseBody::Logged {
            inner: Box::pin(body),
            record: Some(record),
        }
    }

    /// A body read from an HTTP/1.1 connection, which goes back to the pool when it ends.
    pub fn h1(mut inner: h1::BackendBody, lease: Lease) -> Self {
        if inner.is_end_stream() {
            // An empty body (e.g. 204, HEAD) is already done: free the connection now.
            lease.release(inner.reusable());
            return ResponseBody::H1 { inner, lease: None };
        }
        ResponseBody::H1 {
            inner,
            lease: Some(lease),
        }
    }

    /// The answer's fields as an HTTP/1 backend sent them, when they are not in the answer's
    /// map (an HTTP/1 client gets them written as they came).
    pub fn wire_fields(&self) -> Option<&WireFields> {
        match self {
            ResponseBody::H1 { inner, .. } => inner.fields(),
            ResponseBody::Logged { inner, .. } => inner.wire_fields(),
            _ => None,
        }
    }

    /// The length a bodiless answer from an HTTP/1 backend announces (HEAD, 304).
    pub fn announced(&self) -> Option<u64> {
        match self {
            ResponseBody::H1 { inner, .. } => inner.announced(),
            ResponseBody::Logged { inner, .. } => inner.announced(),
            _ => None,
        }
    }

    pub fn upstream(inner: Incoming, lease: Option<Lease>) -> Self {
        let mut body = ResponseBody::Upstream { inner, lease };
        // An empty body (e.g. 204, HEAD) is already done: free the connection now.
        if let ResponseBody::Upstream { inner, lease } = &mut body {
            if inner.is_end_stream() {
                if let Some(l) = lease.take() {
                    l.release(None);
                }
            }
        }
        body
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.project() {
            ResponseBodyProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            ResponseBodyProj::Upstream { mut inner, lease } => {
                let polled = inner.as_mut().poll_frame(cx);
                if let (Some(l), Poll::Ready(Some(Ok(f)))) = (lease.as_ref(), &polled) {
                    if let Some(d) = f.data_ref() {
                        l.guard.upstream().count_response_bytes(d.len());
                    }
                }
                // The server stops polling once `is_end_stream` says so, so release on the last
                // data frame too, not only on the final `None`.
                let finished = match &polled {
                    Poll::Ready(None) => true,
                    Poll::Ready(Some(Ok(_))) => inner.is_end_stream(),
                    _ => false,
                };
                if finished {
                    if let Some(l) = lease.take() {
                        l.release(None);
                    }
                }
                polled.map(|f| f.map(|r| r.map_err(Into::into)))
            }
            ResponseBodyProj::H1 { inner, lease } => {
                let polled = Pin::new(&mut *inner).poll_frame(cx);
                match &polled {
                    Poll::Ready(Some(Ok(f))) => {
                        if let (Some(l), Some(d)) = (lease.as_ref(), f.data_ref()) {
                            l.guard.upstream().count_response_bytes(d.len());
                        }
                        // The server stops polling once `is_end_stream` says so: release on
                        // the last frame, not only on the final `None`.
                        if inner.is_end_stream() {
                            if let Some(l) = lease.take() {
                                l.release(inner.reusable());
                            }
                        }
                    }
                    Poll::Ready(None) => {
                        if let Some(l) = lease.take() {
                            l.release(inner.reusable());
                        }
                    }
                    // A broken body leaves no connection to pool; the lease just ends.
                    Poll::Ready(Some(Err(_))) => drop(lease.take()),
                    Poll::Pending => {}
                }
                polled.map(|f| f.map(|r| r.map_err(Into::into)))
            }
            ResponseBodyProj::Logged { inner, record } => {
                let polled = inner.as_mut().poll_frame(cx);
                if let Some(r) = record.as_mut() {
                    match &polled {
                        Poll::Ready(Some(Ok(f))) => {
                            if let Some(d) = f.data_ref() {
                                r.add_response_bytes(d.len());
                            }
                            if inner.is_end_stream() {
                                r.finish(true);
                            }
                        }
                        Poll::Ready(None) => r.finish(true),
                        Poll::Ready(Some(Err(_))) => r.finish(false),
                        Poll::Pending => {}
                    }
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Full { data } => data.is_none(),
            ResponseBody::Upstream { inner, .. } => inner.is_end_stream(),
            ResponseBody::H1 { inner, .. } => inner.is_end_stream(),
            ResponseBody::Logged { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            ResponseBody::Upstream { inner, .. } => inner.size_hint(),
            ResponseBody::H1 { inner, .. } => inner.size_hint(),
            ResponseBody::Logged { inner, .. } => inner.size_hint(),
        }
    }
}
