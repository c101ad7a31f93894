//! The io_uring driver and the epoll path, tried from outside: forwarding, streaming and
//! recovery on both, and more requests at once than the ring has buffers.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::dataplane::*;
use common::*;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn io_uring_workers_forward_stream_and_recover() {
    if !io_uring_here() {
        return;
    }
    forward_stream_and_recover(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn epoll_workers_forward_stream_and_recover() {
    forward_stream_and_recover(false).await;
}

/// Forwarding, framing errors, streaming both ways, a tunnel and a backend's death, with the
/// workers' sockets on io_uring or on epoll (`proxy.io_uring`).
async fn forward_stream_and_recover(io_uring: bool) {
    let rings = if io_uring { 2 } else { 0 };
    let (a, b, c) = three().await;
    let m = Backend::start("m", Behavior::Mirror).await;
    let keys = format!("io_uring = {io_uring}\nworkers = 2");
    let s = Shoal::start(&keys, &backends_toml(&[&a, &b, &c])).await;
    let pid = s.child.as_ref().unwrap().id();
    assert_eq!(rings_of(pid), rings, "one ring per worker: {}", s.log());

    // Round robin over new connections, then over one keep-alive connection.
    let mut seen: HashMap<String, u32> = HashMap::new();
    for _ in 0..30 {
        let v = echo_of(s.proxy, request("GET", s.proxy, "/").body(empty()).unwrap()).await;
        *seen
            .entry(v["name"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    assert_eq!(
        seen.values().copied().collect::<Vec<_>>(),
        vec![10; 3],
        "{seen:?}"
    );
    let mut tx = client(s.proxy).await;
    for i in 0..300 {
        tx.ready().await.unwrap();
        let r = tx
            .send_request(
                request("GET", s.proxy, &format!("/k/{i}"))
                    .body(empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let v: serde_json::Value =
            serde_json::from_slice(&r.into_body().collect().await.unwrap().to_bytes()).unwrap();
        assert_eq!(v["path"], format!("/k/{i}"));
    }

    // A request head that is not HTTP never reaches a backend.
    let before = a.hits() + b.hits() + c.hits();
    let got = raw(
        s.proxy,
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert!(got.starts_with("HTTP/1.1 400"), "{got}");
    assert_eq!(a.hits() + b.hits() + c.hits(), before);

    // Bodies both ways through a mirror, on a one-worker proxy of its own.
    let keys = format!("io_uring = {io_uring}\nworkers = 1");
    let s2 = Shoal::start(&keys, &backends_toml(&[&m])).await;
    assert_streams_both_ways(s2.proxy, &m).await;
    // A client that leaves in the middle of a dripping answer: its connection ends (the failed
    // send on its socket is seen), and the next client is served.
    let mut gone = tokio::net::TcpStream::connect(s2.proxy).await.unwrap();
    gone.write_all(b"GET /drip HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 12];
    gone.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    drop(gone);
    s2.metric_reaches("shoal_client_connections", 0.0, Duration::from_secs(5))
        .await;
    m.set(Behavior::Mirror);
    let r = send(
        s2.proxy,
        request("POST", s2.proxy, "/after")
            .body(full(&b"next"[..]))
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(&r.body()[..], b"next");

    // A WebSocket-style tunnel over a ring's sockets.
    let mut t = open_tunnel(s.proxy).await;
    assert!(echoes(&mut t).await, "the tunnel echoes");

    // Load from 8 keep-alive clients while a backend dies: no GET fails (its pooled
    // connections close under the ring's receives; requests go elsewhere).
    let (ok, failed) = gets_while_killing(s.proxy, &b).await;
    assert_eq!(failed, 0, "ok: {ok}");
    assert!(ok > 200);
    assert_eq!(rings_of(pid), rings, "{}", s.log());
}

/// More requests land at once than a worker's ring has receive buffers (256): the process is
/// stopped while 400 connections each send a request, so their receives all complete in the
/// ring's first turn after it resumes. Those past the ring's buffers read into buffers of their
/// own; every request is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_requests_at_once_than_the_ring_has_buffers() {
    // The proxy dials 400 connections to it at once: a backlog to take them.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let a = Backend::start_on(sock.listen(1024).unwrap(), "a", Behavior::Echo);
    let s = Shoal::start_with_env(
        "workers = 1",
        &backends_toml(&[&a]),
        &[("SHOAL__LOG__LEVEL", "info,shoal::net::uring=debug")],
    )
    .await;
    let mut conns = Vec::new();
    for _ in 0..400 {
        conns.push(tokio::net::TcpStream::connect(s.proxy).await.unwrap());
    }
    // Every connection accepted and its receive queued on the ring before the stop.
    s.metric_reaches("shoal_client_connections", 400.0, Duration::from_secs(5))
        .await;
    s.signal("-STOP");
    for (i, c) in conns.iter_mut().enumerate() {
        let req = format!("GET /burst/{i} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        c.write_all(req.as_bytes()).await.unwrap();
    }
    s.signal("-CONT");
    for (i, mut c) in conns.into_iter().enumerate() {
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut got))
            .await
            .unwrap()
            .unwrap();
        let got = String::from_utf8_lossy(&got);
        assert!(got.starts_with("HTTP/1.1 200"), "{i}: {got}\n{}", s.log());
        assert!(got.contains(&format!("/burst/{i}")), "{i}: {got}");
    }
    if io_uring::IoUring::new(8).is_ok() {
        assert!(
            s.log().contains("no ring buffer left"),
            "no receive ran out of ring buffers: {}",
            s.log()
        );
    }
}

/// How many io_uring instances process `pid` holds (its workers' rings).
fn rings_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .is_ok_and(|l| l.to_string_lossy().contains("io_uring"))
                })
                .count()
        })
        .unwrap_or(0)
}
