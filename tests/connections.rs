//! Client and backend connections, tried from outside: limits, idle and slow clients, drain on
//! SIGTERM, tunnels, and the backend connection pool.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::dataplane::*;
use common::*;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limit_refuses_and_counts() {
    let a = Backend::start("b1", Behavior::Echo).await;
    let s = Shoal::start("max_connections = 2", &backends_toml(&[&a])).await;
    let mut c1 = client(s.proxy).await;
    let mut c2 = client(s.proxy).await;
    for c in [&mut c1, &mut c2] {
        let r = c
            .send_request(request("GET", s.proxy, "/").body(empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let got = raw(
        s.proxy,
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(got, "", "the third connection is closed without an answer");
    let m = s.metrics().await;
    assert_eq!(
        metric(&m, "shoal_client_connections_refused_total"),
        Some(1.0)
    );
    assert_eq!(metric(&m, "shoal_client_connections"), Some(2.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_client_connections_are_closed() {
    let a = Backend::start("b1", Behavior::Echo).await;
    let s = Shoal::start("client_idle_timeout = \"500ms\"", &backends_toml(&[&a])).await;
    let mut c = tokio::net::TcpStream::connect(s.proxy).await.unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(start.elapsed() >= Duration::from_millis(450));
}

/// The connection's watchdog: a request whose body stops coming (nothing from the client for a
/// whole `client_idle_timeout`, nginx's client_body_timeout) closes its connection, while the
/// request is in flight and its backend waits for the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_that_stalls_closes_its_connection() {
    let a = Backend::start("b1", Behavior::Echo).await;
    let s = Shoal::start("client_idle_timeout = \"500ms\"", &backends_toml(&[&a])).await;
    let mut c = tokio::net::TcpStream::connect(s.proxy).await.unwrap();
    c.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
        .await
        .unwrap();
    let start = Instant::now();
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut got)).await;
    assert!(
        read.is_ok(),
        "a stalled body kept the connection open for 5 s"
    );
    assert!(
        got.is_empty(),
        "no answer for a request that never arrived whole: {:?}",
        String::from_utf8_lossy(&got)
    );
    assert!(
        start.elapsed() >= Duration::from_millis(450),
        "closed before a whole idle period: {:?}",
        start.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_request_heads_are_cut_off() {
    let a = Backend::start("b1", Behavior::Echo).await;
    let s = Shoal::start("client_idle_timeout = \"500ms\"", &backends_toml(&[&a])).await;
    let mut c = tokio::net::TcpStream::connect(s.proxy).await.unwrap();
    let start = Instant::now();
    // A byte every 100 ms: never a whole head.
    let mut closed = false;
    for b in
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".iter()
    {
        if c.write_all(&[*b]).await.is_err() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut buf = [0u8; 1];
        if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_millis(1), c.read(&mut buf)).await {
            closed = true;
            break;
        }
    }
    assert!(closed, "a slowloris head kept the connection open");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(a.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests() {
    let slow = Backend::start("slow", Behavior::Slow(Duration::from_millis(1500))).await;
    let mut s = Shoal::start("", &backends_toml(&[&slow])).await;
    let proxy = s.proxy;
    let inflight = tokio::spawn(async move {
        send(proxy, request("GET", proxy, "/").body(empty()).unwrap()).await
    });
    eventually(
        Duration::from_secs(5),
        "the request to reach the backend",
        || async { (slow.hits() >= 1).then_some(()) },
    )
    .await;
    s.signal("-TERM");
    eventually(
        Duration::from_secs(5),
        "the listener to close after SIGTERM",
        || async {
            tokio::net::TcpStream::connect(proxy)
                .await
                .is_err()
                .then_some(())
        },
    )
    .await;
    let r = inflight.await.unwrap().unwrap();
    assert_eq!(r.status(), 200, "the in-flight request finished");
    assert_eq!(s.wait_exit(Duration::from_secs(5)), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_count_as_connections_close_when_idle_and_end_with_the_grace() {
    let a = Backend::start("b1", Behavior::Echo).await;
    let mut s = Shoal::start(
        "max_connections = 2\nworkers = 1\ntunnel_idle_timeout = \"1500ms\"\nshutdown_grace = \"1s\"",
        &backends_toml(&[&a]),
    )
    .await;
    let mut t1 = open_tunnel(s.proxy).await;
    let mut t2 = open_tunnel(s.proxy).await;
    assert!(echoes(&mut t1).await && echoes(&mut t2).await);
    let m = s.metrics().await;
    assert_eq!(metric(&m, "shoal_client_connections"), Some(2.0), "{m}");
    // A third client is refused: the two tunnels hold the two connections.
    let third = raw(
        s.proxy,
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        Duration::from_secs(1),
    )
    .await;
    assert!(
        !third.starts_with("HTTP/1.1 200"),
        "served beyond max_connections: {third}"
    );
    let m = s.metrics().await;
    assert!(
        metric(&m, "shoal_client_connections_refused_total").unwrap_or(0.0) >= 1.0,
        "{m}"
    );
    // t2 stays busy, t1 goes quiet: t1 is closed after tunnel_idle_timeout, t2 is not.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(echoes(&mut t2).await, "a busy tunnel was closed");
    }
    let mut b = [0u8; 1];
    let closed = tokio::time::timeout(Duration::from_secs(2), t1.read(&mut b)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "the idle tunnel is still open"
    );
    s.metric_reaches("shoal_client_connections", 1.0, Duration::from_secs(3))
        .await;
    // A drain waits for the open tunnel up to the grace, then closes it and exits 0.
    s.signal("-TERM");
    let start = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(5), t2.read(&mut b)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "tunnel open after the grace"
    );
    assert!(
        start.elapsed() >= Duration::from_millis(800),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(s.wait_exit(Duration::from_secs(5)), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_field_the_backend_does_not_take_leaves_the_framing_check_on() {
    let a = Backend::start("b1", Behavior::Echo).await;
    let s = Shoal::start("", &backends_toml(&[&a])).await;
    // Upgrade without Connection: upgrade is no upgrade: the backend answers 200 and the
    // connection stays HTTP/1, so a smuggling attempt after it on the same connection gets 400
    // and never reaches the backend.
    let mut c = tokio::net::TcpStream::connect(s.proxy).await.unwrap();
    c.write_all(b"GET /a HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("\"path\"") {
        let n = tokio::time::timeout(Duration::from_secs(3), c.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 200"));
    assert_eq!(a.hits(), 1);
    c.write_all(b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), c.read_to_end(&mut rest)).await;
    let rest = String::from_utf8_lossy(&rest).to_string();
    assert!(rest.starts_with("HTTP/1.1 400"), "{rest}");
    assert_eq!(a.hits(), 1, "the smuggled request reached the backend");
}

/// Pooled backend connections are reused, and one the backend closed while it sat idle is
/// noticed before a request goes on it: a POST after each close is answered (not 502, which a
/// POST written into a closed connection would get, as it is never sent twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_connections_are_reused_and_one_closed_while_idle_costs_no_post() {
    let (addr, accepted) = closing_backend(Duration::from_millis(150)).await;
    let s = Shoal::start(
        "retries = 0\nworkers = 1",
        &format!("[[backends]]\nid = \"closer\"\naddr = \"{addr}\"\n"),
    )
    .await;
    let mut tx = client(s.proxy).await;
    let post = |n: usize| {
        request("POST", s.proxy, "/form")
            .body(full(format!("field={n}")))
            .unwrap()
    };
    for n in 0..20 {
        tx.ready().await.unwrap();
        let r = tx.send_request(post(n)).await.unwrap();
        assert_eq!(r.status(), 200, "request {n}");
        assert_eq!(
            &r.into_body().collect().await.unwrap().to_bytes()[..],
            b"ok"
        );
    }
    // Back to back on one client connection: the same backend connection each time.
    let reused = accepted.load(Ordering::SeqCst);
    assert!(reused <= 2, "{reused} backend connections for 20 requests");
    for n in 0..5 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        tx.ready().await.unwrap();
        let r = tx.send_request(post(n)).await.unwrap();
        assert_eq!(
            r.status(),
            200,
            "POST after the backend closed its connection ({n})"
        );
    }
    assert!(accepted.load(Ordering::SeqCst) >= reused + 5);
    let m = s.metrics().await;
    assert_eq!(
        metric(
            &m,
            "shoal_upstream_errors_total{backend=\"closer\",kind=\"reset\",service=\"default\"}"
        )
        .unwrap_or(0.0),
        0.0,
        "{m}"
    );
}

/// A raw HTTP/1.1 backend that answers "ok" on keep-alive connections and closes each one after
/// `idle` without a request (as Node.js does after 5 s). Counts the connections whose first
/// request was a POST (health probes, GETs on connections of their own, are left out).
async fn closing_backend(idle: Duration) -> (std::net::SocketAddr, Arc<AtomicU64>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (mut c, _) = l.accept().await.unwrap();
            let count = count.clone();
            tokio::spawn(async move {
                let mut first = true;
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    // A whole head and its Content-Length body, or close when idle too long.
                    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n");
                    if let Some(end) = head_end {
                        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .map_or(0, |v| v.trim().parse().unwrap());
                        if buf.len() >= end + 4 + len {
                            if std::mem::take(&mut first) && head.starts_with("post ") {
                                count.fetch_add(1, Ordering::SeqCst);
                            }
                            buf.drain(..end + 4 + len);
                            let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                            if c.write_all(answer).await.is_err() {
                                return;
                            }
                            continue;
                        }
                    }
                    match tokio::time::timeout(idle, c.read(&mut chunk)).await {
                        Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                        _ => return, // idle too long, or the proxy closed: close
                    }
                }
            });
        }
    });
    (addr, accepted)
}

/// Keep-alive connections between requests wait without a task (parked): hundreds of them,
/// idle past the watchdog's period, are each served again on the same connection, then closed
/// by the idle timeout; the drain closes the rest at once. On io_uring and on epoll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_keep_alive_connections_come_back_and_time_out() {
    for io_uring in [true, false] {
        if io_uring && !io_uring_here() {
            continue;
        }
        parked_connections(io_uring).await;
    }
}

async fn parked_connections(io_uring: bool) {
    let a = Backend::start("b1", Behavior::Echo).await;
    let mut s = Shoal::start(
        &format!("client_idle_timeout = \"1500ms\"\nio_uring = {io_uring}\nworkers = 2"),
        &backends_toml(&[&a]),
    )
    .await;
    let proxy = s.proxy;
    let ask = |tx: &mut hyper::client::conn::http1::SendRequest<Body>| {
        tx.send_request(request("GET", proxy, "/again").body(empty()).unwrap())
    };
    let mut conns = Vec::new();
    for _ in 0..300 {
        let stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
        let (mut tx, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        let driver = tokio::spawn(conn);
        let r = ask(&mut tx).await.unwrap();
        assert_eq!(r.status(), 200);
        r.into_body().collect().await.unwrap();
        conns.push((tx, driver));
    }
    let m = s.metrics().await;
    assert_eq!(
        metric(&m, "shoal_client_connections"),
        Some(300.0),
        "io_uring={io_uring}"
    );
    // Idle for most of the timeout: still open; each is answered again, on its connection.
    tokio::time::sleep(Duration::from_millis(900)).await;
    for (tx, _) in &mut conns {
        let r = ask(tx).await.unwrap();
        assert_eq!(r.status(), 200, "io_uring={io_uring}");
        let body = r.into_body().collect().await.unwrap().to_bytes();
        assert!(String::from_utf8_lossy(&body).contains("/again"));
    }
    assert_eq!(a.hits(), 600);
    // Then idle for good: every one is closed by the timeout, and counted out.
    let started = Instant::now();
    for (_, driver) in conns.drain(..) {
        tokio::time::timeout(Duration::from_secs(6), driver)
            .await
            .expect("an idle connection outlived its timeout")
            .unwrap()
            .unwrap();
    }
    assert!(
        started.elapsed() >= Duration::from_millis(1200),
        "{:?}",
        started.elapsed()
    );
    s.metric_reaches("shoal_client_connections", 0.0, Duration::from_secs(3))
        .await;

    // A drain closes parked connections at once, though their timeout is far.
    let mut idle = Vec::new();
    for _ in 0..20 {
        let mut c = tokio::net::TcpStream::connect(proxy).await.unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let n = c.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        idle.push(c);
    }
    // The drain, not the idle timeout nor the exit: an open tunnel keeps the process up (the
    // drain waits for it, up to the 10 s grace), and the idle timeout would take 1.5 s, so each
    // parked connection must close well inside that (a drain closes them at once).
    let mut tunnel = open_tunnel(proxy).await;
    assert!(echoes(&mut tunnel).await);
    s.signal("-TERM");
    let termed = Instant::now();
    for mut c in idle {
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(3), c.read_to_end(&mut rest)).await;
        assert!(
            matches!(read, Ok(Ok(_)) | Ok(Err(_))),
            "io_uring={io_uring}: a parked connection outlived the drain"
        );
    }
    assert!(
        termed.elapsed() < Duration::from_millis(1000),
        "io_uring={io_uring}: parked connections closed {:?} after SIGTERM, as if by their idle \
         timeout",
        termed.elapsed()
    );
    drop(tunnel);
    assert_eq!(s.wait_exit(Duration::from_secs(5)), Some(0));
}
