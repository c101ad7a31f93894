//! A TLS-terminated client connection: rustls's server side over an async socket.
//!
//! What the connection sends leaves when the caller flushes, or before the connection waits for
//! the peer, not on every write. tokio-rustls writes each write's records at once and flushes
//! the handshake's last flight on its own, so a resumed TLS 1.3 connection answered with
//! `Connection: close` cost four sends (the server's flight, the session tickets, the answer,
//! the close_notify) and a FIN, each a TCP segment the peer must be woken for; here it costs two
//! sends in two segments (the flight; then tickets, answer, close_notify and, corked, the FIN).
//! Whatever is queued goes out before a read waits, so no caller that forgets to flush can leave
//! the peer waiting for bytes that sit here.

use std::future::poll_fn;
use std::io::{self, BufRead, IoSlice, Read, Write};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use rustls::server::{Acceptor, ClientHello};
use rustls::{ServerConfig, ServerConnection};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::net::Transport;

/// Plaintext of at least this much is sent on the write that brought it (a big answer streams,
/// and does not wait in rustls's buffer for the flush).
const SEND_AT: usize = 16 * 1024;

/// A server-side TLS connection over `IO`.
pub struct TlsConn<IO> {
    io: IO,
    tls: ServerConnection,
    /// The socket's read side ended.
    eof: bool,
    /// Our close_notify is queued.
    closing: bool,
}

/// The socket as the blocking `Read` and `Write` rustls asks for: `Pending` is `WouldBlock`.
struct Blocking<'a, 'b, IO> {
    io: &'a mut IO,
    cx: &'a mut Context<'b>,
}

impl<IO: AsyncRead + Unpin> Read for Blocking<'_, '_, IO> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut buf = ReadBuf::new(buf);
        match Pin::new(&mut *self.io).poll_read(self.cx, &mut buf) {
            Poll::Ready(Ok(())) => Ok(buf.filled().len()),
            Poll::Ready(Err(e)) => Err(e),
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl<IO: AsyncWrite + Unpin> Write for Blocking<'_, '_, IO> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match Pin::new(&mut *self.io).poll_write(self.cx, buf) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match Pin::new(&mut *self.io).poll_write_vectored(self.cx, bufs) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn invalid(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// The handshake on an accepted socket: read the ClientHello, take the config `pick` chooses for
/// it, and complete the handshake. A refused hello gets its alert before the error returns.
pub async fn accept<IO>(
    mut io: IO,
    pick: impl FnOnce(&ClientHello<'_>) -> Arc<ServerConfig>,
) -> io::Result<TlsConn<IO>>
where
    IO: Transport,
{
    let mut acceptor = Acceptor::default();
    let accepted = loop {
        let n = poll_fn(
            |cx| match acceptor.read_tls(&mut Blocking { io: &mut io, cx }) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Poll::Pending,
                r => Poll::Ready(r),
            },
        )
        .await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "EOF before the ClientHello",
            ));
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => break accepted,
            Ok(None) => {}
            Err((e, mut alert)) => {
                let _ = poll_fn(|cx| send_alert(&mut alert, &mut io, cx)).await;
                return Err(invalid(e));
            }
        }
    };
    let cfg = pick(&accepted.client_hello());
    let tls = match accepted.into_connection(cfg) {
        Ok(tls) => tls,
        Err((e, mut alert)) => {
            let _ = poll_fn(|cx| send_alert(&mut alert, &mut io, cx)).await;
            return Err(invalid(e));
        }
    };
    let mut conn = TlsConn {
        io,
        tls,
        eof: false,
        closing: false,
    };
    poll_fn(|cx| conn.poll_handshake(cx)).await?;
    Ok(conn)
}

fn send_alert<IO: AsyncWrite + Unpin>(
    alert: &mut rustls::server::AcceptedAlert,
    io: &mut IO,
    cx: &mut Context<'_>,
) -> Poll<io::Result<()>> {
    loop {
        match alert.write(&mut Blocking { io, cx }) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Poll::Pending,
            Err(e) => return Poll::Ready(Err(e)),
            Ok(0) => return Poll::Ready(Ok(())),
            Ok(_) => {}
        }
    }
}

impl<IO> TlsConn<IO> {
    /// The socket and the TLS state (ALPN, SNI, version).
    pub fn get_ref(&self) -> (&IO, &ServerConnection) {
        (&self.io, &self.tls)
    }
}

impl<IO: Transport> TlsConn<IO> {
    /// Read what the socket has into rustls and process it; `Ok(0)` at the end of the stream.
    /// A record rustls refuses ends the connection, after a last try to send its alert.
    fn read_io(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let n = match self.tls.read_tls(&mut Blocking {
            io: &mut self.io,
            cx,
        }) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Poll::Pending,
            Err(e) => return Poll::Ready(Err(e)),
            Ok(n) => n,
        };
        if n == 0 {
            self.eof = true;
        }
        if let Err(e) = self.tls.process_new_packets() {
            let _ = self.poll_send(cx);
            return Poll::Ready(Err(invalid(e)));
        }
        Poll::Ready(Ok(n))
    }

    /// Send everything rustls has queued; ready once the socket took it all.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.tls.wants_write() {
            let sent = self.tls.write_tls(&mut Blocking {
                io: &mut self.io,
                cx,
            });
            match sent {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Poll::Pending,
                Err(e) => return Poll::Ready(Err(e)),
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(_) => {}
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Drive the handshake to its end. Each flight is sent before the peer's answer is awaited,
    /// but a full socket does not stop the reading (a peer that writes before it reads must not
    /// wait on us while we wait on it). The last flight (TLS 1.3's tickets, TLS 1.2's Finished
    /// when the client spoke first) stays queued when the client's first request came with its
    /// Finished, to leave with the answer; otherwise it goes now, as far as the socket takes it,
    /// and the rest before the first read waits.
    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if !self.tls.is_handshaking() {
                // Plaintext already read (the reads processed what came): the request is here.
                let request_here =
                    matches!(self.tls.reader().into_first_chunk(), Ok(chunk) if !chunk.is_empty());
                if !request_here {
                    if let Poll::Ready(Err(e)) = self.poll_send(cx) {
                        return Poll::Ready(Err(e));
                    }
                }
                return Poll::Ready(Ok(()));
            }
            let sent = match self.poll_send(cx) {
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => true,
                Poll::Pending => false,
            };
            if self.eof {
                if sent {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "EOF in the TLS handshake",
                    )));
                }
                // The peer stopped sending; what we owe it may still go.
                return Poll::Pending;
            }
            ready!(self.read_io(cx))?;
        }
    }
}

/// Its shutdown holds the last records itself (with the close_notify and the FIN).
impl<IO: Transport> Transport for TlsConn<IO> {}

impl<IO: Transport> AsyncRead for TlsConn<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            // Plaintext already here first, as much as fits.
            let start = buf.filled().len();
            while buf.remaining() > 0 {
                match this.tls.reader().into_first_chunk() {
                    // The peer's close_notify, and everything before it read: the end.
                    Ok([]) => return Poll::Ready(Ok(())),
                    Ok(chunk) => {
                        let n = chunk.len().min(buf.remaining());
                        buf.put_slice(&chunk[..n]);
                        this.tls.reader().consume(n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    // The peer closed without close_notify: what came before goes up first.
                    Err(_) if buf.filled().len() > start => break,
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
            if buf.filled().len() > start || buf.remaining() == 0 || this.eof {
                return Poll::Ready(Ok(()));
            }
            match this.read_io(cx) {
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    // Nothing more from the peer for now: what waits to be sent goes before
                    // this read waits (the peer may be waiting for it).
                    if let Poll::Ready(Err(e)) = this.poll_send(cx) {
                        return Poll::Ready(Err(e));
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

impl<IO: Transport> AsyncWrite for TlsConn<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        loop {
            let n = this.tls.writer().write_vectored(bufs)?;
            if n > 0 || len == 0 {
                if n >= SEND_AT {
                    // Best effort: what the socket does not take now goes with the flush.
                    if let Poll::Ready(Err(e)) = this.poll_send(cx) {
                        return Poll::Ready(Err(e));
                    }
                }
                return Poll::Ready(Ok(n));
            }
            // rustls's buffer is full: the socket takes some of it first.
            ready!(this.poll_send(cx))?;
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.tls.writer().flush()?;
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    /// close_notify, sent with whatever is still queued, then the socket's write side.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.closing {
            this.io.hold_for_close();
            this.tls.send_close_notify();
            this.closing = true;
        }
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    /// A test socket over a duplex. It counts the writes that sent something (each a TCP
    /// segment on a real socket; a vectored write is one, as writev(2) is), and with a seeded
    /// schedule moves a few bytes at a time and is sometimes not ready: every partial read and
    /// write, and every `Pending`.
    struct Sock {
        io: DuplexStream,
        writes: Arc<AtomicUsize>,
        schedule: Option<rand_chacha::ChaCha8Rng>,
    }

    impl Sock {
        /// Every byte at once; the writes counted (the count is returned).
        fn counted(io: DuplexStream) -> (Self, Arc<AtomicUsize>) {
            let writes = Arc::new(AtomicUsize::new(0));
            let sock = Sock {
                io,
                writes: writes.clone(),
                schedule: None,
            };
            (sock, writes)
        }

        /// A few bytes at a time, on `seed`'s schedule.
        fn trickle(io: DuplexStream, seed: u64) -> Self {
            use rand::SeedableRng;
            Sock {
                io,
                writes: Arc::default(),
                schedule: Some(rand_chacha::ChaCha8Rng::seed_from_u64(seed)),
            }
        }

        /// `None`: not ready this time (and wakes itself); else how many bytes may move.
        fn turn(&mut self, cx: &mut Context<'_>) -> Option<usize> {
            use rand::Rng;
            let Some(rng) = &mut self.schedule else {
                return Some(usize::MAX);
            };
            if rng.gen_ratio(1, 5) {
                cx.waker().wake_by_ref();
                return None;
            }
            Some(rng.gen_range(1..=700))
        }
    }

    impl Transport for Sock {}

    impl AsyncRead for Sock {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let Some(k) = self.turn(cx) else {
                return Poll::Pending;
            };
            let mut some = ReadBuf::new(buf.initialize_unfilled_to(k.min(buf.remaining())));
            ready!(Pin::new(&mut self.io).poll_read(cx, &mut some))?;
            let n = some.filled().len();
            buf.advance(n);
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Sock {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let Some(k) = self.turn(cx) else {
                return Poll::Pending;
            };
            let r = Pin::new(&mut self.io).poll_write(cx, &buf[..k.min(buf.len())]);
            if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
                self.writes.fetch_add(1, Ordering::SeqCst);
            }
            r
        }

        fn poll_write_vectored(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            // No more than a turn can move (a trickle must not copy all it is handed each time).
            let most = if self.schedule.is_some() {
                700
            } else {
                usize::MAX
            };
            let all: Vec<u8> = bufs
                .iter()
                .flat_map(|b| b.iter().copied())
                .take(most)
                .collect();
            self.poll_write(cx, &all)
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_shutdown(cx)
        }
    }

    fn configs(tls12_only: bool) -> (Arc<ServerConfig>, Arc<rustls::ClientConfig>) {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let cert = ck.cert.der().clone();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.key_pair.serialize_der().into());
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .unwrap();
        server.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new().unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let versions: &[&rustls::SupportedProtocolVersion] = if tls12_only {
            &[&rustls::version::TLS12]
        } else {
            rustls::DEFAULT_VERSIONS
        };
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (Arc::new(server), Arc::new(client))
    }

    /// A client driven by hand, so that what it sends together leaves in one write: its
    /// Finished and `request` (when given) go in the same segment, as wrk's and curl's do.
    /// Returns what it read, and whether the end was a close_notify.
    async fn client(
        mut io: impl AsyncRead + AsyncWrite + Unpin,
        cfg: Arc<rustls::ClientConfig>,
        request: Option<&[u8]>,
    ) -> (Vec<u8>, io::Result<()>) {
        let mut c = rustls::ClientConnection::new(cfg, "localhost".try_into().unwrap()).unwrap();
        let mut request = request;
        let mut got = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if !c.is_handshaking() {
                if let Some(r) = request.take() {
                    c.writer().write_all(r).unwrap();
                }
            }
            let mut out = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut out).unwrap();
            }
            if !out.is_empty() {
                io.write_all(&out).await.unwrap();
            }
            let n = io.read(&mut buf).await.unwrap();
            if n == 0 {
                return (got, Err(io::ErrorKind::UnexpectedEof.into()));
            }
            let mut read = &buf[..n];
            while !read.is_empty() {
                c.read_tls(&mut read).unwrap();
                if let Err(e) = c.process_new_packets() {
                    return (got, Err(io::Error::new(io::ErrorKind::InvalidData, e)));
                }
                loop {
                    let mut chunk = [0u8; 4096];
                    match c.reader().read(&mut chunk) {
                        Ok(0) => return (got, Ok(())),
                        Ok(k) => got.extend_from_slice(&chunk[..k]),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => return (got, Err(e)),
                    }
                }
            }
        }
    }

    /// The server's side of one exchange: read a request head, answer `answer`, close.
    async fn serve(
        io: DuplexStream,
        cfg: Arc<ServerConfig>,
        answer: &[u8],
    ) -> io::Result<(Vec<u8>, Arc<AtomicUsize>)> {
        let (counted, writes) = Sock::counted(io);
        let mut conn = accept(counted, |_| cfg).await?;
        let mut req = Vec::new();
        let mut buf = [0u8; 1024];
        while !req.ends_with(b"\r\n\r\n") {
            let n = conn.read(&mut buf).await?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            req.extend_from_slice(&buf[..n]);
        }
        conn.write_all(answer).await?;
        conn.shutdown().await?;
        Ok((req, writes))
    }

    const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n";
    const ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nhi";

    #[tokio::test]
    async fn tickets_answer_and_close_notify_leave_together() {
        let (server_cfg, client_cfg) = configs(false);
        let (a, b) = tokio::io::duplex(1 << 20);
        let server = tokio::spawn(serve(a, server_cfg, ANSWER));
        let (got, end) = client(b, client_cfg, Some(REQUEST)).await;
        let (req, writes) = server.await.unwrap().unwrap();
        assert_eq!(req, REQUEST);
        assert_eq!(got, ANSWER);
        assert!(end.is_ok(), "the answer ends with close_notify: {end:?}");
        // The server's flight, then tickets + answer + close_notify (tokio-rustls: four).
        assert_eq!(writes.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_closing_answer_over_tcp_arrives_whole_with_close_notify() {
        // The corked close on a real socket: the answer, the close_notify and the FIN.
        let (server_cfg, client_cfg) = configs(false);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut conn = accept(tcp, |_| server_cfg).await.unwrap();
            let mut buf = [0u8; 1024];
            let n = conn.read(&mut buf).await.unwrap();
            assert_eq!(&buf[..n], REQUEST);
            conn.write_all(ANSWER).await.unwrap();
            conn.shutdown().await.unwrap();
            let cork = socket2::SockRef::from(conn.get_ref().0).tcp_cork().unwrap();
            // Held open until the client has read, so that the end it sees is the shutdown's.
            let _ = conn.read(&mut buf).await;
            cork
        });
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (got, end) = tokio::time::timeout(
            Duration::from_secs(5),
            client(tcp, client_cfg, Some(REQUEST)),
        )
        .await
        .expect("a corked answer was held");
        assert_eq!(got, ANSWER);
        assert!(end.is_ok(), "the answer ends with close_notify: {end:?}");
        assert!(server.await.unwrap(), "the closing socket was corked");
    }

    /// What a hand-driven client has queued, in one write.
    async fn send(c: &mut rustls::ClientConnection, io: &mut DuplexStream) {
        let mut out = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut out).unwrap();
        }
        io.write_all(&out).await.unwrap();
    }

    /// A hand-driven client's hello, and the server's flight read and processed.
    async fn hello(
        io: &mut DuplexStream,
        cfg: Arc<rustls::ClientConfig>,
    ) -> rustls::ClientConnection {
        let mut c = rustls::ClientConnection::new(cfg, "localhost".try_into().unwrap()).unwrap();
        send(&mut c, io).await;
        let mut buf = vec![0u8; 64 * 1024];
        let n = io.read(&mut buf).await.unwrap();
        c.read_tls(&mut &buf[..n]).unwrap();
        c.process_new_packets().unwrap();
        c
    }

    #[tokio::test]
    async fn tickets_go_at_once_to_a_client_that_sends_nothing_yet() {
        let (server_cfg, client_cfg) = configs(false);
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let (counted, writes) = Sock::counted(a);
        let server =
            tokio::spawn(async move { accept(counted, |_| server_cfg).await.map(|_c| ()) });
        // The server's flight; then the client's Finished alone.
        let mut c = hello(&mut b, client_cfg).await;
        assert!(!c.is_handshaking());
        send(&mut c, &mut b).await;
        let mut buf = vec![0u8; 64 * 1024];
        // The tickets come without a request having been sent.
        let n = tokio::time::timeout(Duration::from_secs(5), b.read(&mut buf))
            .await
            .expect("the tickets were held back")
            .unwrap();
        assert!(n > 0);
        c.read_tls(&mut &buf[..n]).unwrap();
        c.process_new_packets().unwrap();
        server.await.unwrap().unwrap();
        assert_eq!(writes.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn tls12_client_gets_the_servers_finished_before_it_speaks() {
        let (server_cfg, client_cfg) = configs(true);
        let (a, b) = tokio::io::duplex(1 << 20);
        let server = tokio::spawn(serve(a, server_cfg, ANSWER));
        let (got, end) =
            tokio::time::timeout(Duration::from_secs(5), client(b, client_cfg, Some(REQUEST)))
                .await
                .expect("a TLS 1.2 handshake waited on a held flight");
        server.await.unwrap().unwrap();
        assert_eq!(got, ANSWER);
        assert!(end.is_ok());
    }

    #[tokio::test]
    async fn a_big_answer_streams_past_rustls_buffer() {
        let (server_cfg, client_cfg) = configs(false);
        // A socket buffer much smaller than the answer: the server must send while it writes.
        let (a, b) = tokio::io::duplex(16 * 1024);
        let mut big = ANSWER[..ANSWER.len() - 2].to_vec();
        big.extend(std::iter::repeat_n(b'x', 1 << 20));
        let big2 = big.clone();
        let server = tokio::spawn(async move { serve(a, server_cfg, &big2).await });
        let (got, end) = tokio::time::timeout(
            Duration::from_secs(10),
            client(b, client_cfg, Some(REQUEST)),
        )
        .await
        .expect("the big answer stalled");
        server.await.unwrap().unwrap();
        assert_eq!(got.len(), big.len());
        assert!(got == big);
        assert!(end.is_ok());
    }

    #[tokio::test]
    async fn garbage_instead_of_a_hello_is_refused_with_an_alert() {
        let (server_cfg, _) = configs(false);
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let server = tokio::spawn(async move { accept(a, |_| server_cfg).await.map(|_c| ()) });
        // A handshake record whose body is no ClientHello.
        b.write_all(&[0x16, 0x03, 0x01, 0x00, 0x04, 0x01, 0x00, 0x00, 0x00])
            .await
            .unwrap();
        let err = server.await.unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let mut buf = [0u8; 64];
        let n = b.read(&mut buf).await.unwrap();
        assert!(n >= 7 && buf[0] == 0x15, "an alert record: {:?}", &buf[..n]);
    }

    #[tokio::test]
    async fn eof_before_and_during_the_handshake_is_an_error() {
        let (server_cfg, client_cfg) = configs(false);
        let (a, b) = tokio::io::duplex(1 << 20);
        drop(b);
        let err = accept(a, |_| server_cfg.clone()).await.err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        // A ClientHello, then the end.
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut c =
            rustls::ClientConnection::new(client_cfg, "localhost".try_into().unwrap()).unwrap();
        send(&mut c, &mut b).await;
        b.shutdown().await.unwrap();
        let err = accept(a, |_| server_cfg).await.err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn an_end_without_close_notify_reads_as_unexpected_eof() {
        let (server_cfg, client_cfg) = configs(false);
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let server = tokio::spawn(async move {
            let mut conn = accept(a, |_| server_cfg).await.unwrap();
            let mut all = Vec::new();
            let res = conn.read_to_end(&mut all).await;
            (all, res)
        });
        let mut c = hello(&mut b, client_cfg).await;
        c.writer().write_all(b"partial").unwrap();
        send(&mut c, &mut b).await;
        drop(b);
        let (all, res) = server.await.unwrap();
        assert_eq!(all, b"partial");
        assert_eq!(res.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }

    /// Against tokio-rustls as the client, both ends on trickling sockets, over many seeds:
    /// every byte of a request and of an answer of any size arrives, in order, and the answer
    /// ends with close_notify. A failing seed is printed.
    #[tokio::test]
    async fn any_schedule_of_partial_reads_and_writes_delivers_every_byte() {
        use rand::{Rng, SeedableRng};
        let (server_cfg, client_cfg) = configs(false);
        let connector = tokio_rustls::TlsConnector::from(client_cfg);
        for seed in 0..48u64 {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let size = [0, 1, 700, 16 * 1024, 70_000, 200_000][rng.gen_range(0..6)];
            let answer: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            let request: Vec<u8> = (0..rng.gen_range(1..3000))
                .map(|i| (i % 241) as u8)
                .collect();
            let (a, b) = tokio::io::duplex(rng.gen_range(64..8192));
            let cfg = server_cfg.clone();
            let (req_len, ans) = (request.len(), answer.clone());
            let server = tokio::spawn(async move {
                let mut conn = accept(Sock::trickle(a, seed ^ 1), |_| cfg).await?;
                let mut got = vec![0u8; req_len];
                conn.read_exact(&mut got).await?;
                // The answer in uneven writes, a flush now and then.
                let mut rest = &ans[..];
                let mut i = 0;
                while !rest.is_empty() {
                    let n = rest.len().min(1 + (i * 7919) % 40_000);
                    conn.write_all(&rest[..n]).await?;
                    if i % 3 == 0 {
                        conn.flush().await?;
                    }
                    rest = &rest[n..];
                    i += 1;
                }
                conn.shutdown().await?;
                io::Result::Ok(got)
            });
            let client = async {
                let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
                let mut tls = connector.connect(name, Sock::trickle(b, seed ^ 2)).await?;
                tls.write_all(&request).await?;
                tls.flush().await?;
                let mut got = Vec::new();
                tls.read_to_end(&mut got).await?;
                io::Result::Ok(got)
            };
            let got = tokio::time::timeout(Duration::from_secs(20), client)
                .await
                .unwrap_or_else(|_| panic!("seed {seed}: stalled"))
                .unwrap_or_else(|e| panic!("seed {seed}: client: {e}"));
            let served = server
                .await
                .unwrap()
                .unwrap_or_else(|e| panic!("seed {seed}: server: {e}"));
            assert_eq!(served, request, "seed {seed}: the request");
            assert!(
                got == answer,
                "seed {seed}: the answer ({} of {size} bytes)",
                got.len()
            );
        }
    }
}
