//! The client connection's shared pieces: its byte stream as both the HTTP/1 loop
//! (`server::h1`) and the request body being read (`H1Body`, polled by the forwarder, perhaps
//! from another task) use it; and the handoff of an upgraded connection to its tunnel.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http::Request;
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;

use super::wire::{self, Decoder};
use crate::sync::MutexExt;

/// A client's byte stream (plain TCP or TLS), counted by `WatchedIo`.
pub trait ClientIo: crate::net::Transport + Send {}
impl<T: crate::net::Transport + Send> ClientIo for T {}

pub type BoxIo = Box<dyn ClientIo>;

const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// The connection's bytes, shared by the loop (heads, answers) and the body of the request being
/// served (which the forwarder may poll from another task, for an HTTP/2 backend).
pub struct ClientBytes {
    pub io: BoxIo,
    pub rb: wire::ReadBuf,
    /// The answer's head went out: a `100 Continue` would come too late.
    pub answered: bool,
    /// The request body was read to its end: the bytes after it are the next request's.
    body_done: bool,
    /// The connection's state, whose `body_pending` mirrors `body_done` for the idle watchdog
    /// (a client that stalls mid-body is cut off).
    state: Option<Arc<crate::proxy::conn::ConnState>>,
}

impl ClientBytes {
    pub fn new(io: BoxIo, state: Option<Arc<crate::proxy::conn::ConnState>>) -> Self {
        Self {
            io,
            rb: wire::ReadBuf::default(),
            answered: false,
            body_done: true,
            state,
        }
    }

    pub fn body_done(&self) -> bool {
        self.body_done
    }

    pub fn set_body_done(&mut self, done: bool) {
        self.body_done = done;
        if let Some(s) = &self.state {
            s.body_pending
                .store(!done, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

pub type SharedClientBytes = Arc<Mutex<ClientBytes>>;

/// A request body read from the client connection as the forwarder polls it.
pub struct H1Body {
    pub wire: Option<SharedClientBytes>,
    pub decoder: Decoder,
    /// `Expect: 100-continue`: how much of the interim answer went out (None: none owed).
    pub expect: Option<usize>,
}

impl H1Body {
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Frame<Bytes>>>> {
        let Some(shared) = self.wire.as_ref() else {
            return Poll::Ready(None);
        };
        let mut guard = shared.locked();
        let w = &mut *guard;
        if let Some(sent) = self.expect.as_mut() {
            // The client waits for a go-ahead before it sends the body (unless it already
            // started, or an answer went out first).
            if !w.answered && w.rb.buf.is_empty() {
                while *sent < CONTINUE.len() {
                    match std::task::ready!(Pin::new(&mut w.io).poll_write(cx, &CONTINUE[*sent..]))
                    {
                        Ok(0) => return Poll::Ready(Some(Err(io::ErrorKind::WriteZero.into()))),
                        Ok(n) => *sent += n,
                        Err(e) => return Poll::Ready(Some(Err(e))),
                    }
                }
                if let Err(e) = std::task::ready!(Pin::new(&mut w.io).poll_flush(cx)) {
                    return Poll::Ready(Some(Err(e)));
                }
            }
            self.expect = None;
        }
        let polled = w.rb.poll_body(&mut w.io, &mut self.decoder, cx, "client");
        if let Poll::Ready(None | Some(Ok(_))) = &polled {
            // The bytes after the body's end are the next request's.
            w.set_body_done(self.decoder.is_end());
        }
        polled
    }
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<io::Result<Frame<Bytes>>>> {
        let this = self.get_mut();
        let polled = this.poll_next(cx);
        match &polled {
            Poll::Ready(Some(Err(_))) => {
                this.decoder = Decoder::Done;
                this.wire = None;
            }
            Poll::Ready(None) => this.wire = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.decoder.is_end()
    }

    fn size_hint(&self) -> SizeHint {
        self.decoder.size_hint()
    }
}

/// The client's side of an upgrade: the connection, once the 101 went out.
pub enum ClientUpgrade {
    Hyper(hyper::upgrade::OnUpgrade),
    Own(PendingUpgrade),
}

/// Put in the extensions of an HTTP/1 request that carries `Upgrade`.
#[derive(Clone)]
pub struct PendingUpgrade(pub Arc<Mutex<Option<oneshot::Receiver<Rewind>>>>);

impl ClientUpgrade {
    /// The client's side of an upgrade `req` asks for.
    pub fn of<B>(req: &mut Request<B>) -> Self {
        match req.extensions_mut().remove::<PendingUpgrade>() {
            Some(p) => ClientUpgrade::Own(p),
            None => ClientUpgrade::Hyper(hyper::upgrade::on(req)),
        }
    }

    /// The upgraded connection, once the 101 went out.
    pub async fn io(self) -> io::Result<BoxIo> {
        match self {
            ClientUpgrade::Hyper(on) => match on.await {
                Ok(u) => Ok(Box::new(hyper_util::rt::TokioIo::new(u))),
                Err(e) => Err(io::Error::other(e)),
            },
            ClientUpgrade::Own(p) => {
                let rx = p.0.locked().take();
                match rx {
                    Some(rx) => rx
                        .await
                        .map(|r| Box::new(r) as BoxIo)
                        .map_err(|_| io::Error::other("the 101 did not go out")),
                    None => Err(io::Error::other("upgrade already taken")),
                }
            }
        }
    }
}

/// A tunnel's ends write until they close, with nothing to hold back.
impl crate::net::Transport for hyper_util::rt::TokioIo<hyper::upgrade::Upgraded> {}
impl crate::net::Transport for Rewind {}

/// A byte stream with bytes already read from it put back in front.
pub struct Rewind {
    pre: Bytes,
    io: BoxIo,
}

impl Rewind {
    pub fn new(pre: Bytes, io: BoxIo) -> Self {
        Self { pre, io }
    }
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.pre.is_empty() {
            let n = self.pre.len().min(buf.remaining());
            buf.put_slice(&self.pre[..n]);
            self.pre.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
